"""A/B of greedy decoding speed at short prompts: the model's "xla" (blockwise) attention against the
"reference" attention (the path before issue 23), same process, same weights, interleaved repetitions.

    python experiments/greedy_attention_ab.py [--weights f32] [--reps 5] [--new 32] [--batch 1]
    python experiments/greedy_attention_ab.py --smoke        # 2 repetitions of 4 tokens, to a temp dir

One cell (both attentions alternate inside it, so their ratio is taken under the same load): steps/s (new
tokens per second per row, prefill included, after a warm-up call) with the median and spread, and a
check that both produce the same tokens. Writes results/greedy_attention_ab.{json,md} through runner.py.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a Python function that checks whether a number is prime.",
           "Give me three tips for staying focused while studying.",
           "Explain recursion to a child."]


@dataclasses.dataclass(frozen=True)
class Config:
    weights: str = dataclasses.field(default="f32", metadata={"choices": ["f32", "q"]})
    reps: int = 5
    new: int = dataclasses.field(default=32, metadata={"help": "new tokens per row"})
    batch: int = dataclasses.field(default=1, metadata={"help": "rows (at most 4 prompts)"})


SMOKE = Config(reps=2, new=4)


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    import jaxdec

    def measure(cell):
        m = jaxdec.load(weights=cfg.weights)
        prompts = [m.tokenizer.chat_ids(q) for q in PROMPTS][:cfg.batch]
        models = {"reference": m.model.with_attention("reference"), "blockwise": m.model}
        run = lambda mod: jaxdec.generate(mod, m.params, prompts, max_new_tokens=cfg.new, stop_ids=())  # noqa: E731
        outs = {k: run(v).tokens for k, v in models.items()}  # warm-up (compile)
        times = {k: [] for k in models}
        for rep in range(cfg.reps):
            for k in (list(models) if rep % 2 == 0 else list(models)[::-1]):
                t0 = time.perf_counter()
                run(models[k])
                times[k].append(time.perf_counter() - t0)
        out = {"same_tokens": outs["reference"] == outs["blockwise"]}
        for k, ts in times.items():
            sps = [cfg.new / t for t in ts]
            out[k] = {"median": statistics.median(sps), "min": min(sps), "max": max(sps)}
        return out

    def body(rec):
        r = runner.result(rec, "ab")
        lines = ["| attention | median steps/s | min | max |", "| --- | --- | --- | --- |"]
        for k in ("reference", "blockwise"):
            lines.append(f"| {k} | {r[k]['median']:.1f} | {r[k]['min']:.1f} | {r[k]['max']:.1f} |")
        return lines + ["", f"Same tokens: {r['same_tokens']}"]

    runner.run_experiment("greedy_attention_ab", cfg, ["ab"], measure, opts=opts,
                          title="Greedy at short prompts: blockwise vs reference attention", markdown=body)


if __name__ == "__main__":
    main()
