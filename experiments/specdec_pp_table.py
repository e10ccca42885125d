"""SpecDec++ (Huang et al. 2024): the learned stopping rule against fixed draft lengths, on held-out prompts.

One draft for every row (the one the acceptance head was trained on, read from its heads file: by
default the target's first N layers; a head trained on the shipped EAGLE head's chain, ``python -m
train.specdec_pp --drafter eagle``, gives EAGLE rows: fixed chains and the learned stop, no ``conf-`` rows),
greedy verification, batch 1, weights q, a fixed N new tokens
(EOS ignored), on the held-out prompts of experiments/heads_table.py (HumanEval 100-163 and the ``chat``
/ ``copy`` groups of jaxdec/data/prompts/heads_heldout.jsonl):

* jaxdec greedy (the baseline of every speedup, measured in the same run);
* ``fixed-k``: the draft-model chain of exactly k tokens, k = ``--fixed`` (1..8);
* ``conf-h``: the chain with the draft's own confidence as the acceptance predictor (today's
  ``methods.specdec_pp``: stop once ``1 - prod max q > h``), up to ``--max-tokens``;
* ``learned-h``: the trained acceptance head (`jaxdec.speculative.heads.acceptance`), stop once the
  predicted P(at least one rejection) would exceed h, with the lookahead output (no draft call spent on a
  token the rule would decline); ``paper-h``: the same head with the paper's rule as stated (go on while
  the last token was proposed); ``-min0``: ``min_tokens=0`` (a step may propose nothing when the head
  predicts a rejection of the first token: a one-token verify call instead of a two-token block).

Every speculative row verifies with ``--verify-buckets`` (default ``auto``: `SpeculativeDecoder`'s
``verify_buckets``, the target call sized to the drafted tokens, so an adaptive row that stops early pays
for a short block; ``off``: the full ``max_tokens + 1`` block every step, the table before buckets).

Per row: τ (tokens per target call per row, bonus included), draft calls per target call, verify block
tokens per target call (what the buckets ran), acceptance per position, step cost (time per target call /
greedy's time per token), tok/s, and the speedup over greedy
(median of per-repetition ratios, >= 5 interleaved repetitions, [min, max]); rows whose tokens differ from
greedy (must be 0). The summary names the best fixed length per group and whether a learned row beats it.

    python experiments/specdec_pp_table.py --smoke
    python experiments/specdec_pp_table.py --quick     # 2 prompts per group, 32 new tokens
    python experiments/specdec_pp_table.py --quick --verify-buckets off   # every step pays the full block
    python experiments/specdec_pp_table.py             # 4 + 4 + 3 prompts, 48 new tokens

Writes experiments/results/specdec_pp/specdec_pp_table.{json,md}.
"""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import runner  # noqa: E402
from heads_table import GROUPS, heads_facts, heldout_prompts, measure_group  # noqa: E402
from spec_bench import Jaxdec as Method  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results", "specdec_pp")


class Recorded(Method):
    """A jaxdec row that keeps the statistics of its last call (measure_group reports timings only)."""

    last_stats: dict = {}

    def __call__(self, prompts, n_new):
        toks, stats = super().__call__(prompts, n_new)
        Recorded.last_stats[self.name] = stats
        return toks, stats


def parse_buckets(text: str):
    """``--verify-buckets``: 'auto', 'off' or ascending block lengths '1,2,4,8' -> verify_buckets."""
    t = text.strip().lower()
    if t == "auto":
        return "auto"
    if t == "off":
        return ()
    try:
        vals = tuple(int(x) for x in t.split(","))
    except ValueError:
        raise ValueError(f"--verify-buckets: expected auto, off or e.g. 1,2,4,8, got {text!r}") from None
    if min(vals) < 1 or any(a >= b for a, b in zip(vals, vals[1:])):
        raise ValueError(f"--verify-buckets: block lengths must be >= 1 and strictly ascending, got {text!r}")
    return vals


def with_buckets(dec, vb):
    """The decoder with ``vb`` (a listed length past a short row's block is dropped: the block is always a bucket)."""
    if not vb:
        return dec
    if isinstance(vb, tuple):
        t = int(dec.drafter.num_nodes) + 1
        vb = tuple(b for b in vb if b < t) + (t,)
    return dataclasses.replace(dec, verify_buckets=vb)


class Setup:
    def __init__(self, cfg):
        self.cfg, self.methods = cfg, None

    def get(self):
        if self.methods is not None:
            return self
        import jaxdec
        from jaxdec.speculative import methods
        from jaxdec.speculative.heads import acceptance as A
        from jaxdec.speculative.heads import shipped_heads
        cfg = self.cfg
        m = jaxdec.load(weights=cfg.weights)
        self.prompts = heldout_prompts(m.tokenizer, cfg.n_code, cfg.n_chat, cfg.n_copy)
        path = cfg.heads or shipped_heads(A.KIND, "smollm2-135m")
        if path is None:
            raise SystemExit("no specdec_pp heads shipped and none given (--heads PATH)")
        self.heads = heads_facts(path)
        config, hp, meta = A.load_acceptance(path, None)
        self.heads["draft"] = config.draft
        vb = parse_buckets(cfg.verify_buckets)
        rows = [Recorded("jaxdec-greedy", m.model, m.params)]
        if config.draft.startswith("eagle:"):  # a head trained on an EAGLE head's chain (train.specdec_pp --drafter eagle)
            eagle = cfg.eagle or shipped_heads("eagle", "smollm2-135m")
            self.heads["eagle"] = heads_facts(eagle)
            for k in cfg.fixed:
                dec, p = methods.eagle(m.model, m.params, eagle, target=m.path, num_tokens=k, tree_topk=0)
                rows.append(Recorded(f"fixed-{k}", m.model, p, with_buckets(dec, vb)))
            dec, p = methods.eagle(m.model, m.params, eagle, target=m.path, num_tokens=cfg.max_tokens, tree_topk=0,
                                   stop_head=path)
        else:
            dm, dp = A.resolve_draft(m.model, m.params, config, target=m.path)
            draft = (dm, dp)
            for k in cfg.fixed:
                dec, p = methods.draft_model(m.model, m.params, draft=draft, num_tokens=k)
                rows.append(Recorded(f"fixed-{k}", m.model, p, with_buckets(dec, vb)))
            for h in cfg.confidence:
                dec, p = methods.draft_model(m.model, m.params, draft=draft, num_tokens=cfg.max_tokens,
                                             stop_threshold=h)
                rows.append(Recorded(f"conf-{h:g}", m.model, p, with_buckets(dec, vb)))
            dec, p = A.build(m.model, m.params, path, target=m.path, draft=draft, num_tokens=cfg.max_tokens)
        dec = with_buckets(dec, vb)
        for h in cfg.thresholds:  # one compiled program: the settings are traced params
            for mt in cfg.min_tokens:
                name = f"learned-{h:g}" + ("" if mt == 1 else f"-min{mt}")
                rows.append(Recorded(name, m.model, A.with_settings(p, threshold=h, min_tokens=mt, lookahead=True),
                                     dec))
        for h in cfg.paper_thresholds:
            rows.append(Recorded(f"paper-{h:g}", m.model, A.with_settings(p, threshold=h, lookahead=False), dec))
        self.methods = [r for r in rows if r.name == "jaxdec-greedy" or not cfg.methods
                        or any(s in r.name for s in cfg.methods)]
        return self


def measure(setup, cfg, group):
    """heads_table's measurement, each row with the verify block tokens per target call it ran."""
    Recorded.last_stats.clear()
    out = measure_group(setup, cfg, group)
    for r in out["rows"]:
        raw = Recorded.last_stats.get(r["method"], {}).get("raw") or {}
        calls = max(int(raw.get("model_calls", 0)) - 1, 0)  # the prefill call has no verify block
        r["block_tokens_per_call"] = (float(raw["block_tokens"]) / calls) if calls and "block_tokens" in raw else None
    return out


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def verdict(rows) -> dict:
    """The best fixed length and the best learned row by median speedup, and whether the learned one wins."""
    fixed = [r for r in rows if r["method"].startswith("fixed-")]
    learned = [r for r in rows if r["method"].startswith(("learned-", "paper-"))]
    if not fixed or not learned:
        return {}
    bf = max(fixed, key=lambda r: r["speedup_median"])
    bl = max(learned, key=lambda r: r["speedup_median"])
    return {"best_fixed": bf["method"], "best_fixed_speedup": bf["speedup_median"], "best_learned": bl["method"],
            "best_learned_speedup": bl["speedup_median"], "learned_wins": bl["speedup_median"] > bf["speedup_median"]}


def markdown(rec):
    c = rec["config"]
    res = {k: r for k in rec["cells_order"] if (r := runner.result(rec, k))}
    if not res:
        return ["(no group measured)"]
    lines = [f"Batch 1, {c['new_tokens']} new tokens per prompt (EOS ignored), weights {c['weights']}, greedy "
             f"verification, {c['reps']} interleaved repetitions; speedup = median of per-repetition ratios to "
             "jaxdec greedy in the same run [min, max]; step cost = time per target call / greedy's time per token "
             "(draft calls and the verify block together); τ = tokens per target call per row, bonus included; "
             "draft calls / call counts every call of the draft model (the first one feeds the last accepted "
             "token and the bonus); block = verify block tokens per target call (verify buckets: "
             f"{c.get('verify_buckets', 'off')}).", ""]
    h = next(iter(res.values()))["heads"]
    ev = h.get("final_eval") or {}
    lines += [f"Acceptance head: `{h['file']}` ({h['size_mib']} MiB, draft `{h.get('draft')}`, {h.get('steps')} "
              f"steps, {_f(None if h.get('wall_s') is None else h['wall_s'] / 60, '{:.1f}')} min, commit "
              f"{str(h.get('commit'))[:12]}; held-out eval: "
              + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, (int, float)) and k != "step")
              + f"); trained with `{h.get('command')}`.", ""]
    summary = ["## Summary: the learned stop against the best fixed draft length", "",
               "| group | best fixed (speedup) | best learned (speedup) | learned wins |", "| --- | --- | --- | --- |"]
    for group, g in res.items():
        v = verdict(g["rows"])
        if v:
            summary.append(f"| {group} | {v['best_fixed']} ({v['best_fixed_speedup']:.2f}) | {v['best_learned']} "
                           f"({v['best_learned_speedup']:.2f}) | {'yes' if v['learned_wins'] else 'no'} |")
    lines += summary + [""]
    for group, g in res.items():
        lines += [f"## {group} (held-out prompts, lengths {g['prompt_lengths']})",
                  benchlib.LoadMonitor.markdown_of(rec["cells"][group].get("load")), "",
                  "| method | τ | draft calls / call | block | acceptance per position | step cost | tok/s | speedup vs "
                  "greedy | rows ≠ greedy |", "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: |"]
        for r in g["rows"]:
            acc = r["acceptance_per_position"]
            acc_s = "-" if not acc else " ".join("-" if a != a else f"{a:.2f}" for a in acc[:8])
            lines.append(f"| {r['method']} | {_f(r['tau'])} | {r['draft_calls_per_call']:.2f} | "
                         f"{_f(r.get('block_tokens_per_call'))} | {acc_s} | "
                         f"{r['step_cost_vs_greedy']:.2f} | {r['tokens_per_s_median']:.1f} | {r['speedup_median']:.2f} "
                         f"[{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | {r['rows_differing_from_greedy']} |")
        lines.append("")
    return lines


@dataclasses.dataclass(frozen=True)
class Config:
    new_tokens: int = 48
    n_code: int = dataclasses.field(default=4, metadata={"help": "HumanEval 100-163 prompts"})
    n_chat: int = dataclasses.field(default=4, metadata={"help": "held-out chat prompts"})
    n_copy: int = dataclasses.field(default=3, metadata={"help": "held-out copy-heavy prompts"})
    reps: int = dataclasses.field(default=5, metadata={"help": ">= 5 interleaved repetitions"})
    weights: str = dataclasses.field(default="q", metadata={"choices": ["f32", "q"]})
    heads: str = dataclasses.field(default="", metadata={"help": "specdec_pp heads file (default: the shipped one)"})
    eagle: str = dataclasses.field(default="", metadata={
        "help": "with a head trained on an EAGLE chain: the EAGLE heads file (default: the shipped one)"})
    fixed: tuple[int, ...] = dataclasses.field(default=(1, 2, 3, 4, 5, 6, 7, 8),
                                               metadata={"help": "fixed draft lengths"})
    confidence: tuple[float, ...] = dataclasses.field(default=(0.3,), metadata={
        "help": "confidence-stop thresholds (methods.specdec_pp's default 0.3)"})
    thresholds: tuple[float, ...] = dataclasses.field(default=(0.5, 0.7), metadata={
        "help": "learned-stop thresholds (lookahead rule)"})
    paper_thresholds: tuple[float, ...] = dataclasses.field(default=(0.7,), metadata={
        "help": "learned-stop thresholds with the paper's rule as stated"})
    max_tokens: int = dataclasses.field(default=8, metadata={"help": "longest draft of the adaptive rows"})
    min_tokens: tuple[int, ...] = dataclasses.field(default=(1, 0), metadata={
        "help": "candidates the learned rows always propose (one row per value; 0: a step may draft nothing)"})
    verify_buckets: str = dataclasses.field(default="auto", metadata={
        "help": "verify block sizing of every speculative row: auto, off, or ascending lengths such as 1,2,4,8"})
    methods: tuple[str, ...] = runner.select((), "only rows whose name contains one of these (greedy always runs)")
    groups: tuple[str, ...] = runner.select(GROUPS, "prompt groups (cells)")


QUICK = Config(new_tokens=32, n_code=2, n_chat=2, n_copy=2)
SMOKE = Config(new_tokens=4, n_code=1, n_chat=1, n_copy=1, groups=("chat",), fixed=(1, 2), thresholds=(0.7,))


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE, presets={"quick": QUICK})
    if cfg.reps < 5:
        opts.parser.error("--reps must be >= 5 (DESIGN.md: median of at least 5 interleaved repetitions)")
    bad = [g for g in cfg.groups if g not in GROUPS]
    if bad:
        opts.parser.error(f"unknown --groups {bad}; known: {', '.join(GROUPS)}")
    for p in (cfg.heads, cfg.eagle):
        if p and not os.path.isfile(p):
            opts.parser.error(f"heads file not found: {p!r}")
    if any(k < 1 for k in cfg.fixed) or cfg.max_tokens < 1 or any(k < 0 for k in cfg.min_tokens):
        opts.parser.error("--fixed lengths and --max-tokens must be >= 1")
    if any(not 0 <= h < 1 for h in (*cfg.confidence, *cfg.thresholds, *cfg.paper_thresholds)):
        opts.parser.error("thresholds must be in [0, 1)")
    try:
        vb = parse_buckets(cfg.verify_buckets)
    except ValueError as e:
        opts.parser.error(str(e))
    if isinstance(vb, tuple) and vb and vb[-1] > cfg.max_tokens + 1:
        opts.parser.error(f"--verify-buckets: block lengths must be <= --max-tokens + 1 = {cfg.max_tokens + 1}")
    setup = Setup(cfg)
    rec = runner.run_experiment("specdec_pp_table", cfg, list(cfg.groups), lambda g: measure(setup, cfg, g),
                                opts=opts, markdown=markdown, results_dir=RESULTS,
                                title="SpecDec++: learned stop vs fixed draft lengths, held-out prompts, batch 1")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
