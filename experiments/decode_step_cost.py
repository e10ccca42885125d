"""Cost of one decode step against the cache size and the committed length (issue 23).

One model call with a 1-token block per row on the default model, the cache holding ``--committed``
tokens (random finite keys/values) in caches of 512 and 4096 slots, with the model's "reference" attention
(`attend`: reads every slot) and its "xla" blockwise attention (reads ceil(committed / 512) chunks). Only the
logits are returned, so the timing is the forward pass (the real loop updates its cache in place).
Median of interleaved repetitions; the load average is recorded (benchlib) and a loaded run flagged.

    python experiments/decode_step_cost.py [--weights f32|q] [--reps 7] [--committed 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdec  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="f32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--committed", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sizes", default="512,4096")
    a = ap.parse_args()
    load = benchlib.LoadMonitor()
    m = jaxdec.load(weights=a.weights)
    model, params = m.model, m.params
    fns = {"reference": model.with_attention("reference"), "blockwise": model.with_attention("xla")}
    rng = np.random.default_rng(0)
    b = a.batch
    progs, args = {}, {}
    for s in (int(x) for x in a.sizes.split(",")):
        cache = model.init_cache(b, s)
        k = jnp.asarray(rng.normal(size=cache.k.shape).astype(np.float32) * 0.1)
        cache = cache.replace(k=k, v=k, lengths=jnp.full((b,), a.committed, jnp.int32))
        tok = jnp.ones((b, 1), jnp.int32)
        pos = jnp.full((b, 1), a.committed, jnp.int32)
        for name, fn in fns.items():
            f = jax.jit(lambda p, t, ps, c, fn=fn: fn(p, t, ps, c).logits)
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, tok, pos, cache))
            print(f"compile+first {name} S={s}: {time.perf_counter() - t0:.1f}s", flush=True)
            progs[(name, s)] = f
            args[(name, s)] = (params, tok, pos, cache)
    times = {key: [] for key in progs}
    for _ in range(a.reps):
        for key, f in progs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[key]))
            times[key].append(time.perf_counter() - t0)
    load.finish()
    print(f"weights={a.weights} batch={b} committed={a.committed} reps={a.reps}")
    for key, ts in times.items():
        print(f"  {key[0]:10s} S={key[1]:5d}: median {1e3 * statistics.median(ts):7.1f} ms "
              f"(min {1e3 * min(ts):.1f}, max {1e3 * max(ts):.1f})")
    print(load.summary_line())


if __name__ == "__main__":
    main()
