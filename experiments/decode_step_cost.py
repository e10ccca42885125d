"""Cost of one decode step against the cache size and the committed length (issue 23).

One model call with a 1-token block per row on the default model, the cache holding ``--committed``
tokens (random finite keys/values) in caches of 512 and 4096 slots, with the model's "reference" attention
(`attend`: reads every slot) and its "xla" blockwise attention (reads ceil(committed / 512) chunks). Only the
logits are returned, so the timing is the forward pass (the real loop updates its cache in place).
Median of interleaved repetitions; the load average is recorded (benchlib) and a loaded run flagged.
Runs through experiments/runner.py: one cell (every size and attention interleaved, so the sizes compare within
one run); writes experiments/results/decode_step_cost.{json,md} with the config, commit, machine and load.

    python experiments/decode_step_cost.py [--weights f32|q] [--reps 7] [--committed 256] [--sizes 512 4096]
    python experiments/decode_step_cost.py --smoke     # tiny sizes, written to a temp dir
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdec  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    weights: str = dataclasses.field(default="f32", metadata={"choices": ["f32", "q", "bf16"]})
    reps: int = 7
    committed: int = dataclasses.field(default=256, metadata={"help": "tokens the cache holds"})
    batch: int = 1
    sizes: tuple[str, ...] = dataclasses.field(default=("512", "4096"), metadata={
        "help": "cache sizes in slots (space- or comma-separated)"})


SMOKE = Config(reps=2, committed=16, sizes=("512", "1024"))


def measure(cfg) -> dict:
    m = jaxdec.load(weights=cfg.weights)
    model, params = m.model, m.params
    fns = {"reference": model.with_attention("reference"), "blockwise": model.with_attention("xla")}
    rng = np.random.default_rng(0)
    b = cfg.batch
    progs, args = {}, {}
    for s in (int(x) for v in cfg.sizes for x in v.split(",") if x.strip()):
        cache = model.init_cache(b, s)
        k = jnp.asarray(rng.normal(size=cache.k.shape).astype(np.float32) * 0.1)
        cache = cache.replace(k=k, v=k, lengths=jnp.full((b,), cfg.committed, jnp.int32))
        tok = jnp.ones((b, 1), jnp.int32)
        pos = jnp.full((b, 1), cfg.committed, jnp.int32)
        for name, fn in fns.items():
            f = jax.jit(lambda p, t, ps, c, fn=fn: fn(p, t, ps, c).logits)
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, tok, pos, cache))
            print(f"compile+first {name} S={s}: {time.perf_counter() - t0:.1f}s", flush=True)
            progs[(name, s)] = f
            args[(name, s)] = (params, tok, pos, cache)
    times = {key: [] for key in progs}
    for _ in range(cfg.reps):
        for key, f in progs.items():  # interleaved
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[key]))
            times[key].append(time.perf_counter() - t0)
    return {"rows": [{"attention": k[0], "cache_slots": k[1], "median_ms": 1e3 * statistics.median(ts),
                      "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts), "seconds": ts}
                     for k, ts in times.items()]}


def markdown(rec):
    c, r = rec["config"], runner.result(rec, "step")
    lines = [f"weights={c['weights']} batch={c['batch']} committed={c['committed']} reps={c['reps']}; one model call "
             "with a 1-token block per row, logits only; median of interleaved repetitions (ms).", "",
             "| attention | cache slots | median ms | min ms | max ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in (r or {"rows": []})["rows"]:
        lines.append(f"| {row['attention']} | {row['cache_slots']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | "
                     f"{row['max_ms']:.1f} |")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    rec = runner.run_experiment("decode_step_cost", cfg, ["step"], lambda cell: measure(cfg), opts=opts,
                                markdown=markdown, title="Cost of one decode step vs cache size and committed length")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
