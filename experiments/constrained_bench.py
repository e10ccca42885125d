"""Constrained decoding cost (issue 18): per-step host mask time (mean, p50, p99), grammar compile time, and
end-to-end tokens/s of greedy decoding with and without a JSON-schema constraint at batch 1 and 8.

Each cell is one batch size; inside it the unconstrained and the constrained run alternate repetition by
repetition (each compiled first, untimed), so their ratio is taken under the same load. Prompts and
schemas are the committed ones (tests/data/constrained/schemas.jsonl). The unconstrained run decodes a
fixed number of tokens (EOS ignored): as many as the constrained batch runs steps (its longest row; the
constrained rows end when their grammar is complete), so both runs make the same number of model calls
and prefill weighs the same in both. Reported: new tokens per second and time per model call. Mask times are the host callback's own time per step for the
whole batch (`Session.mask_seconds`); grammar compile time is llguidance's, per schema, on a fresh engine.

    python experiments/constrained_bench.py                # batch 1 and 8, 64 new tokens, 3 repetitions
    python experiments/constrained_bench.py --smoke        # batch 1, 8 tokens, to a temp dir
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

SCHEMAS = os.path.join(runner.ROOT, "tests", "data", "constrained", "schemas.jsonl")


@dataclasses.dataclass(frozen=True)
class Config:
    new_tokens: int = field(default=64, metadata={"help": "max new tokens per row"})
    reps: int = field(default=3, metadata={"help": "interleaved repetitions per variant"})
    weights: str = field(default="q", metadata={"help": "f32 or q"})
    batches: tuple[int, ...] = runner.select((1, 8))


SMOKE = Config(new_tokens=8, reps=1, batches=(1,))


def _pct(xs, q):
    import numpy as np
    return float(np.percentile(np.asarray(xs, float), q)) if xs else float("nan")


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    import jaxdec
    from jaxdec.constrained import json_schema
    from jaxdec.constrained.engines import LLGuidanceEngine

    rows = [json.loads(x) for x in open(SCHEMAS) if x.strip()]
    m = jaxdec.load(weights=cfg.weights)
    tok = m.tokenizer

    def measure(cell):
        b = int(cell[1:])
        sel = rows[:b]
        ids = [tok.chat_ids(r["prompt"]) for r in sel]
        cons = [json_schema(r["schema"]) for r in sel]
        eng = LLGuidanceEngine(tok, m.model.vocab_size, 2)
        t = time.perf_counter()
        for c in cons:
            eng.compile(c)
        compile_ms = (time.perf_counter() - t) * 1e3 / len(cons)

        def constrained():
            return jaxdec.generate(m.model, m.params, ids, max_new_tokens=cfg.new_tokens, tokenizer=tok,
                                   constraint=cons)

        steps = max(len(x) for x in constrained().tokens)  # compile, untimed; the batch runs this many steps

        def plain():  # the same number of steps (EOS ignored), so prefill weighs the same in both
            return jaxdec.generate(m.model, m.params, ids, max_new_tokens=steps, min_new_tokens=steps)

        runs = {"plain": plain, "constrained": constrained}
        plain()  # compile, untimed
        tps = {k: [] for k in runs}
        step_ms = {k: [] for k in runs}
        masks, ok = [], []
        for rep in range(cfg.reps):
            for k in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                t = time.perf_counter()
                g = runs[k]()
                s = time.perf_counter() - t
                tps[k].append(sum(len(x) for x in g.tokens) / s)
                step_ms[k].append(1e3 * s / g.stats["model_calls"])
                if k == "constrained":
                    masks += g.extras["constraint_session"].mask_seconds
                    ok = g.constraint_ok
        med = {k: sorted(v)[len(v) // 2] for k, v in tps.items()}
        ms = {k: sorted(v)[len(v) // 2] for k, v in step_ms.items()}
        return {"batch": b, "steps": steps, "plain_ms_per_step": ms["plain"], "constrained_ms_per_step": ms["constrained"],
                "step_ratio": ms["plain"] / ms["constrained"], "plain_tok_s": med["plain"], "constrained_tok_s": med["constrained"],
                "ratio": med["constrained"] / med["plain"], "spread": {k: [min(v), max(v)] for k, v in tps.items()},
                "mask_ms_mean": 1e3 * sum(masks) / max(len(masks), 1), "mask_ms_p50": 1e3 * _pct(masks, 50),
                "mask_ms_p99": 1e3 * _pct(masks, 99), "compile_ms_per_schema": compile_ms,
                "constraint_ok": sum(bool(x) for x in ok), "rows": len(ok)}

    def body(rec):
        lines = ["| batch | plain tok/s | constrained tok/s | ratio | plain / constrained ms per step (ratio) | "
                 "mask ms mean / p50 / p99 (whole batch) | compile ms / schema | constraint_ok |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in rec["cells_order"]:
            r = runner.result(rec, c)
            lines.append(f"| {r['batch']} | {r['plain_tok_s']:.1f} | {r['constrained_tok_s']:.1f} | {r['ratio']:.2f} | "
                         f"{r['plain_ms_per_step']:.1f} / {r['constrained_ms_per_step']:.1f} ({r['step_ratio']:.2f}) | "
                         f"{r['mask_ms_mean']:.3f} / {r['mask_ms_p50']:.3f} / {r['mask_ms_p99']:.3f} | "
                         f"{r['compile_ms_per_schema']:.1f} | {r['constraint_ok']}/{r['rows']} |")
        return lines

    runner.run_experiment("constrained", cfg, [f"b{b}" for b in cfg.batches], measure, opts=opts,
                          title="Constrained decoding: mask time and tokens/s with and without a JSON schema",
                          markdown=body)


if __name__ == "__main__":
    main()
