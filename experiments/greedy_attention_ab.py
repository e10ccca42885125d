"""A/B of greedy decoding speed at short prompts: the model's "xla" (blockwise) attention against the
"reference" attention (the path before issue 23), same process, same weights, interleaved repetitions.

    python experiments/greedy_attention_ab.py [--weights f32] [--reps 5] [--new 32] [--batch 1]

Prints steps/s (new tokens per second per row, prefill included, after a warm-up call) with the median
and spread, and the load average (benchlib; a loaded run is flagged).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxdec  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="f32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    load = benchlib.LoadMonitor()
    m = jaxdec.load(weights=a.weights)
    prompts = [m.tokenizer.chat_ids(q) for q in ["What is the capital of France? Answer in one sentence.",
                                                  "Write a Python function that checks whether a number is prime.",
                                                  "Give me three tips for staying focused while studying.",
                                                  "Explain recursion to a child."]][:a.batch]
    models = {"reference": m.model.with_attention("reference"), "xla (blockwise)": m.model}
    run = lambda mod: jaxdec.generate(mod, m.params, prompts, max_new_tokens=a.new, stop_ids=())  # noqa: E731
    outs = {k: run(v).tokens for k, v in models.items()}  # warm-up (compile)
    assert outs["reference"] == outs["xla (blockwise)"], "tokens differ"
    times = {k: [] for k in models}
    for _ in range(a.reps):
        for k, v in models.items():
            t0 = time.perf_counter()
            run(v)
            times[k].append(time.perf_counter() - t0)
    load.finish()
    print(f"weights={a.weights} batch={a.batch} new={a.new} reps={a.reps}; same tokens")
    for k, ts in times.items():
        sps = [a.new / t for t in ts]
        print(f"  {k:16s}: median {statistics.median(sps):6.1f} steps/s (min {min(sps):.1f}, max {max(sps):.1f})")
    print(load.summary_line())


if __name__ == "__main__":
    main()
