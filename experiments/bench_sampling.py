"""Sampling throughput with top-k / top-p from `lax.top_k` candidates against the full-vocabulary sort, in one
run (issue 24, item 1).

`jaxdec.core.processors._top_k_top_p` takes top-k and top-p from the TOP_CANDIDATES largest logits and falls
back to a stable sort of all 49152 logits only when a row's kept set may reach beyond them; the old rule
sorted every row at every step. Each cell is one sampling setting at one batch size; inside it the two
variants alternate repetition by repetition (each variant recompiled after `jax.clear_caches()`, its
first call untimed), so their ratio is taken under the same load. Greedy at the same batch is the
reference the issue's goal names ("sampling within 15 % of greedy"). HF is not run here (see
bench_greedy.py for the peer); tokens of the two variants are compared (same keys: they must agree unless a
cut falls within float rounding of a token's cumulative mass).

    python experiments/bench_sampling.py                    # batch 32 (2 prompts x n=16), 32 new tokens
    python experiments/bench_sampling.py --smoke            # batch 4, 4 tokens, to a temp dir
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

SETTINGS = {
    "greedy": {},
    "temp0.8": {"temperature": 0.8},
    "top_k50": {"temperature": 0.8, "top_k": 50},
    "top_p0.95": {"temperature": 0.8, "top_p": 0.95},
    "top_k50_top_p0.95": {"temperature": 0.8, "top_k": 50, "top_p": 0.95},
}


@dataclasses.dataclass(frozen=True)
class Config:
    n: int = field(default=16, metadata={"help": "samples per prompt (batch = prompts x n)"})
    prompts: int = field(default=2, metadata={"help": "chat prompts"})
    new_tokens: int = field(default=32, metadata={"help": "new tokens per row (min = max)"})
    reps: int = field(default=3, metadata={"help": "interleaved repetitions per variant"})
    weights: str = field(default="f32", metadata={"help": "f32 or q"})
    settings: tuple[str, ...] = runner.select(tuple(SETTINGS))


SMOKE = Config(n=2, prompts=2, new_tokens=4, reps=1, settings=("greedy", "top_p0.95"))


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    import jax
    import jaxdec
    from jaxdec.core import processors as P
    from bench_greedy import PROMPTS

    m = jaxdec.load(weights=cfg.weights)
    ids = [m.tokenizer.chat_ids(p) for p in PROMPTS[:cfg.prompts]]
    fast_fn = P._top_k_top_p

    def sorted_fn(x, k, p, candidates=None):
        return P._top_k_top_p_sorted(x, k, p)

    def once(setting, variant):
        P._top_k_top_p = fast_fn if variant == "candidates" else sorted_fn
        jax.clear_caches()
        kw = dict(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, n=cfg.n, seed=0)
        if SETTINGS[setting]:
            kw.update(method="sample", sampling=SETTINGS[setting])
        jaxdec.generate(m.model, m.params, ids, **kw)  # compile, untimed
        t = time.perf_counter()
        g = jaxdec.generate(m.model, m.params, ids, **kw)
        return time.perf_counter() - t, sum(len(r) for r in g.tokens), g.tokens

    def measure(setting):
        variants = ("candidates",) if setting == "greedy" else ("candidates", "full_sort")
        secs = {v: [] for v in variants}
        toks, new = {}, 0
        try:
            for rep in range(cfg.reps):
                for v in (variants if rep % 2 == 0 else variants[::-1]):
                    s, new, toks[v] = once(setting, v)
                    secs[v].append(s)
        finally:
            P._top_k_top_p = fast_fn
        out = {"batch": cfg.n * cfg.prompts, "new_tokens": new}
        for v in variants:
            out[f"{v}_tok_s"] = new / min(secs[v])
        if "full_sort" in variants:
            out["speedup"] = out["candidates_tok_s"] / out["full_sort_tok_s"]
            out["same_tokens"] = toks["candidates"] == toks["full_sort"]
        return out

    def body(rec):
        greedy = runner.result(rec, "greedy") if "greedy" in rec["cells_order"] else None
        lines = ["| setting | batch | candidates tok/s | full sort tok/s | speedup | vs greedy | same tokens |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in rec["cells_order"]:
            r = runner.result(rec, c)
            rel = f"{r['candidates_tok_s'] / greedy['candidates_tok_s']:.2f}" if greedy else "-"
            lines.append(f"| {c} | {r['batch']} | {r['candidates_tok_s']:.1f} | {r.get('full_sort_tok_s', float('nan')):.1f} "
                         f"| {r.get('speedup', float('nan')):.2f}x | {rel} | {r.get('same_tokens', '-')} |")
        return lines

    runner.run_experiment("bench_sampling", cfg, list(cfg.settings), measure, opts=opts,
                          title="Sampling throughput: top-k/top-p candidates vs the full sort", markdown=body)


if __name__ == "__main__":
    main()
