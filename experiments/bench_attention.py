"""Decode-step attention benchmarks (one layer's attention, default model shapes: 9 query heads,
3 KV heads, head dim 64).

1. Hydragen vs plain attention: n rows (default 16) share a prompt of P tokens (default 1024) and each
   has its own suffix of S generated tokens (default 64, ragged); one decode step (T=1). Plain attention
   reads the n-fold replicated cache ``[n, P+S, KVH, D]``; Hydragen reads one prefix ``[P, KVH, D]``
   (all rows' queries in one matmul) plus the per-row suffixes.
2. Quantized vs fp32 cache attention at C tokens (default 4096), batch B (default 4), T=1: the fp32
   ``attend`` vs KIVI int8 / int4 caches dequantized inside the same XLA program
   (``reference_quantized_attention``), and on a GPU also the Pallas kernels
   (``quantized_kv_attention`` / ``tree_attention``).

Timing: jitted functions, warm-up call (compile time reported separately), then ``--reps`` interleaved
repetitions of every variant (each timed call ends in ``block_until_ready``); median and min/max.
Runs through experiments/runner.py: two cells (``hydragen``, ``quantized``), each resumable; writes
``experiments/results/bench_attention.{json,md}`` with the config, commit, machine and load average.

    python experiments/bench_attention.py            # full sizes (CPU: ~1 min)
    python experiments/bench_attention.py --smoke    # tiny sizes, written to a temp dir (smoke test)
    python experiments/bench_attention.py --ctx 8192 --fresh   # another size (--fresh replaces the results)
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)
from jaxdec.attention.hydragen import hydragen_attend
from jaxdec.attention.reference import attend, causal_block_mask
from pallas_kernels.quantized_kv_attention import (quantize_kv_cache, quantized_kv_attention,
                                                   reference_quantized_attention)

H, KVH, D = 9, 3, 64


@dataclasses.dataclass(frozen=True)
class Config:
    n: int = dataclasses.field(default=16, metadata={"help": "Hydragen: rows sharing the prompt"})
    prefix: int = dataclasses.field(default=1024, metadata={"help": "Hydragen: shared prompt tokens"})
    suffix: int = dataclasses.field(default=64, metadata={"help": "Hydragen: max per-row suffix tokens"})
    batch: int = dataclasses.field(default=4, metadata={"help": "quantized cache: batch"})
    ctx: int = dataclasses.field(default=4096, metadata={"help": "quantized cache: cached tokens"})
    reps: int = dataclasses.field(default=7, metadata={"help": "interleaved timed repetitions"})
    pallas: bool = dataclasses.field(default=False, metadata={"help": "also time the Pallas kernels (on by "
                                                                      "default on a GPU)"})


SMOKE = Config(n=4, prefix=128, suffix=16, batch=2, ctx=256, reps=5)
DEPENDS = {"hydragen": ["n", "prefix", "suffix", "reps"], "quantized": ["batch", "ctx", "reps", "pallas"]}


def _timeit(fns: dict, args: dict, reps: int):
    compile_s, times = {}, {k: [] for k in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args[name]))
        compile_s[name] = time.perf_counter() - t0
    for _ in range(reps):
        for name, fn in fns.items():  # interleaved
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                   "max_ms": 1e3 * max(ts), "first_call_s": compile_s[name]}
            for name, ts in times.items()}


def bench_hydragen(n, prefix, suffix, reps, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    q = f(n, 1, H, D)
    pk, pv = f(prefix, KVH, D), f(prefix, KVH, D)
    sk, sv = f(n, suffix, KVH, D), f(n, suffix, KVH, D)
    suf = jnp.asarray(rng.integers(suffix // 2, suffix + 1, size=n).astype(np.int32))
    kn, vn = f(n, 1, KVH, D), f(n, 1, KVH, D)
    bm = causal_block_mask(n, 1)
    qpos = (prefix + suf)[:, None]
    # the plain layout: every row holds its own copy of the prompt
    kc = jnp.concatenate([jnp.broadcast_to(pk, (n, prefix, KVH, D)), sk], axis=1)
    vc = jnp.concatenate([jnp.broadcast_to(pv, (n, prefix, KVH, D)), sv], axis=1)
    lengths = prefix + suf
    plain = jax.jit(lambda q, kc, vc, ln, kn, vn, bm, qp: attend(q, kc, vc, ln, kn, vn, bm, qp))
    hyd = jax.jit(lambda q, pk, pv, sk, sv, suf, kn, vn, bm, qp:
                  hydragen_attend(q, pk, pv, prefix, sk, sv, suf, kn, vn, bm, qp))
    args = {"plain": (q, kc, vc, lengths, kn, vn, bm, qpos),
            "hydragen": (q, pk, pv, sk, sv, suf, kn, vn, bm, qpos)}
    res = _timeit({"plain": plain, "hydragen": hyd}, args, reps)
    diff = float(jnp.abs(plain(*args["plain"]) - hyd(*args["hydragen"])).max())
    res["max_abs_diff"] = diff
    res["kv_bytes"] = {"plain": int(kc.nbytes + vc.nbytes),
                       "hydragen": int(pk.nbytes + pv.nbytes + sk.nbytes + sv.nbytes)}
    res["speedup"] = res["plain"]["median_ms"] / res["hydragen"]["median_ms"]
    return res


def bench_quantized(batch, ctx, reps, pallas, seed=1):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    q = f(batch, 1, H, D)
    kc, vc = f(batch, ctx, KVH, D), f(batch, ctx, KVH, D)
    kn, vn = f(batch, 1, KVH, D), f(batch, 1, KVH, D)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    bm = causal_block_mask(batch, 1)
    qpos = lengths[:, None]
    fns = {"fp32 attend": jax.jit(lambda q, kc, vc, ln, kn, vn, bm, qp:
                                  attend(q, kc, vc, ln, kn, vn, bm, qp))}
    args = {"fp32 attend": (q, kc, vc, lengths, kn, vn, bm, qpos)}
    nbytes = {"fp32 attend": int(kc.nbytes + vc.nbytes)}
    errs = {}
    for bits in (8, 4):
        cache = quantize_kv_cache(kc, vc, lengths, bits=bits, key_group=32, value_group=32,
                                  residual=64)
        name = f"int{bits} dequant-in-XLA"
        fns[name] = jax.jit(lambda q, c, kn, vn, bm, qp:
                            reference_quantized_attention(q, c, kn, vn, bm, qp))
        args[name] = (q, cache, kn, vn, bm, qpos)
        nbytes[name] = int(sum(x.nbytes for x in jax.tree.leaves(cache)))
        if pallas:
            pname = f"int{bits} pallas"
            fns[pname] = jax.jit(lambda q, c, kn, vn, bm, qp:
                                 quantized_kv_attention(q, c, kn, vn, bm, qp))
            args[pname] = args[name]
            nbytes[pname] = nbytes[name]
    if pallas:
        from pallas_kernels.tree_attention import tree_attention
        fns["fp32 pallas"] = jax.jit(lambda q, kc, vc, ln, kn, vn, bm, qp:
                                     tree_attention(q, kc, vc, ln, kn, vn, bm, qp))
        args["fp32 pallas"] = args["fp32 attend"]
        nbytes["fp32 pallas"] = nbytes["fp32 attend"]
    res = _timeit(fns, args, reps)
    ref = fns["fp32 attend"](*args["fp32 attend"])
    for k in fns:
        errs[k] = float(jnp.abs(fns[k](*args[k]) - ref).max())
    for k in res:
        res[k]["cache_bytes"] = nbytes[k]
        res[k]["max_abs_diff_vs_fp32"] = errs.get(k, 0.0)
    return res


def markdown(rec):
    hy, qz, c = runner.result(rec, "hydragen"), runner.result(rec, "quantized"), rec["config"]
    lines = [f"One layer's attention, {H} query / {KVH} KV heads, head dim {D}, T=1; median of "
             f"{c['reps']} interleaved reps (min-max); first call (compile + run) separately.", ""]
    if hy:
        lines += [f"## Hydragen: n={c['n']} rows sharing a {c['prefix']}-token prompt, suffixes <= "
                  f"{c['suffix']} tokens", "",
                  "| variant | median ms | min-max ms | first call s | KV bytes read |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for k in ("plain", "hydragen"):
            r = hy[k]
            lines.append(f"| {k} | {r['median_ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} | "
                         f"{r['first_call_s']:.2f} | {hy['kv_bytes'][k]:,} |")
        lines += ["", f"Speedup {hy['speedup']:.2f}x; max |plain - hydragen| = {hy['max_abs_diff']:.2e}.", ""]
    if qz:
        lines += [f"## Quantized vs fp32 cache: batch {c['batch']}, {c['ctx']} cached tokens", "",
                  "| variant | median ms | min-max ms | first call s | cache bytes | max abs diff vs fp32 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for k, r in qz.items():
            lines.append(f"| {k} | {r['median_ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} | "
                         f"{r['first_call_s']:.2f} | {r['cache_bytes']:,} | "
                         f"{r['max_abs_diff_vs_fp32']:.2e} |")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    cfg = dataclasses.replace(cfg, pallas=cfg.pallas or jax.default_backend() == "gpu")
    cells = {"hydragen": lambda: bench_hydragen(cfg.n, cfg.prefix, cfg.suffix, cfg.reps),
             "quantized": lambda: bench_quantized(cfg.batch, cfg.ctx, cfg.reps, cfg.pallas)}
    d = jax.devices()[0]
    rec = runner.run_experiment("bench_attention", cfg, list(cells), lambda c: cells[c](), opts=opts,
                                title="Decode-step attention benchmark", markdown=markdown,
                                depends=DEPENDS.get, info={"heads": H, "kv_heads": KVH, "head_dim": D,
                                                           "device": str(getattr(d, "device_kind", d))})
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
