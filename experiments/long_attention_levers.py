"""Long prompts (issue 23), goal 5: levers on the blockwise attention's cache loop, one layer of the default
model's shape (9 query heads, 3 KV heads, D=64, float32), batch 1, all variants interleaved in one process.

Variants of `jaxdec.attention.blockwise.cache_partial` (the block's own keys and the finish are shared):

* ``cur``: the landed loop: scores ``einsum("btkgd,bckd->btkgc")`` in token-major layout (XLA:CPU puts the
  dot's batch dims (b, k) first and transposes around it);
* ``km``: head-major: queries ``[B,KVH,T*G,D]``, the chunk's keys/values swapped to ``[B,KVH,C,D]``, state and
  scores in the dot's natural order ``[B,KVH,T*G,C]`` (one transpose of q and of the state per call, not per
  chunk);
* ``bd``: one plain GEMM per chunk: keys ``[B,C,KVH*D]`` times a block-diagonal query matrix
  ``[B,KVH*D,T*KVH*G]`` (3x the multiplies, no batch dims in the middle);
* ``red``: decode form without dots: products summed over D and over C (T=1 only).

Each is timed for ``--key-chunks`` sizes at a short context (256 committed tokens) and a long one
(4000 for T=1 decode; 3584 for T=512, the last chunk of a 4096-token chunked prefill), 4096 cache slots.
Outputs are checked against ``cur`` (rtol 1e-4). Median and min over ``--reps`` interleaved repetitions.

    python experiments/long_attention_levers.py --t 1 --reps 15
    python experiments/long_attention_levers.py --t 512 --reps 3 --key-chunks 512 1024
    python experiments/long_attention_levers.py --smoke      # one small cell, a check that it runs
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import runner  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    t: int = dataclasses.field(default=1, metadata={"help": "query block (1: a decode step; 512: a prefill chunk)"})
    key_chunks: tuple[int, ...] = (512, 1024)
    variants: tuple[str, ...] = ("cur", "km", "bd", "red")
    reps: int = dataclasses.field(default=15, metadata={"help": "interleaved repetitions"})
    slots: int = 4096


SMOKE = Config(t=1, key_chunks=(64,), reps=2, slots=256)


def _variants():
    import jax
    import jax.numpy as jnp
    from jaxdec.attention import blockwise as bw
    from jaxdec.attention.reference import NEG

    def loop(s, c, lengths, body, carry):
        n = jnp.minimum((jnp.max(lengths) + c - 1) // c, -(-s // c))
        return jax.lax.fori_loop(0, n, body, carry)

    def chunk(buf, i, c, s, lengths):
        lo = i * c
        start = jnp.minimum(lo, s - c)
        kpos = start + jnp.arange(c)
        ok = (kpos >= lo)[None] & (kpos[None] < lengths[:, None])  # [B,C]
        return jax.lax.dynamic_slice_in_dim(buf, start, c, axis=1), ok

    def km(qg, kc_all, vc_all, lengths, carry, c):
        b, t, kvh, g, d = qg.shape
        s = kc_all.shape[1]
        tok = lambda x: jnp.moveaxis(x, 2, 1).reshape((b, kvh, t * g) + x.shape[4:])  # noqa: E731
        qk, carry = tok(qg), tuple(tok(x) for x in carry)

        def body(i, carry):
            m, l, o = carry
            kc, ok = chunk(kc_all, i, c, s, lengths)
            vc, _ = chunk(vc_all, i, c, s, lengths)
            sc = jnp.einsum("bknd,bkcd->bknc", qk, jnp.swapaxes(kc, 1, 2))
            vis = ok[:, None, None, :]
            sc = jnp.where(vis, sc, NEG)
            m_new = jnp.maximum(m, sc.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(vis, jnp.exp(sc - m_new[..., None]), 0.0)
            vc = jnp.swapaxes(jnp.where(ok[:, :, None, None], vc, 0.0), 1, 2)
            return m_new, l * alpha + p.sum(-1), o * alpha[..., None] + jnp.einsum("bknc,bkcd->bknd", p, vc)

        back = lambda x: jnp.moveaxis(x.reshape((b, kvh, t, g) + x.shape[3:]), 1, 2)  # noqa: E731
        return tuple(back(x) for x in loop(s, c, lengths, body, carry))

    def bd(qg, kc_all, vc_all, lengths, carry, c):
        b, t, kvh, g, d = qg.shape
        s = kc_all.shape[1]
        eye = jnp.eye(kvh, dtype=qg.dtype)
        qbd = jnp.einsum("btkgd,kj->bjdtkg", qg, eye).reshape(b, kvh * d, t * kvh * g)

        def body(i, carry):
            m, l, o = carry
            kc, ok = chunk(kc_all, i, c, s, lengths)
            vc, _ = chunk(vc_all, i, c, s, lengths)
            sc = jnp.einsum("bcx,bxn->bcn", kc.reshape(b, c, kvh * d), qbd).reshape(b, c, t, kvh, g)
            vis = ok[:, :, None, None, None]
            sc = jnp.where(vis, sc, NEG)
            m_new = jnp.maximum(m, sc.max(1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(vis, jnp.exp(sc - m_new[:, None]), 0.0)
            vc = jnp.where(ok[:, :, None, None], vc, 0.0).reshape(b, c, kvh * d)
            pv = jnp.einsum("bcn,bcx->bnx", p.reshape(b, c, t * kvh * g), vc).reshape(b, t, kvh, g, kvh, d)
            return m_new, l * alpha + p.sum(1), o * alpha[..., None] + jnp.einsum("btkgjd,kj->btkgd", pv, eye)

        return loop(s, c, lengths, body, carry)

    def red(qg, kc_all, vc_all, lengths, carry, c):
        s = kc_all.shape[1]

        def body(i, carry):
            m, l, o = carry
            kc, ok = chunk(kc_all, i, c, s, lengths)
            vc, _ = chunk(vc_all, i, c, s, lengths)
            sc = (qg[:, :, None] * kc[:, None, :, :, None, :]).sum(-1)  # [B,T,C,KVH,G]
            vis = ok[:, None, :, None, None]
            sc = jnp.where(vis, sc, NEG)
            m_new = jnp.maximum(m, sc.max(2))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(vis, jnp.exp(sc - m_new[:, :, None]), 0.0)
            vc = jnp.where(ok[:, :, None, None], vc, 0.0)
            return (m_new, l * alpha + p.sum(2),
                    o * alpha[..., None] + (p[..., None] * vc[:, None, :, :, None, :]).sum(2))

        return loop(s, c, lengths, body, carry)

    return {"km": km, "bd": bd, "red": red}, bw


def measure(cfg: Config) -> dict:
    import numpy as np
    import jax
    import jax.numpy as jnp
    fns, bw = _variants()
    rng = np.random.default_rng(0)
    b, h, kvh, d, t, s = 1, 9, 3, 64, cfg.t, cfg.slots
    g = h // kvh
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, kc, vc, kn = arr(b, t, h, d), arr(b, s, kvh, d), arr(b, s, kvh, d), arr(b, t, kvh, d)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    long_ctx = min(s - t, 3584 if t > 1 else 4000)
    contexts = (min(256, s - t), long_ctx)
    progs, outs = {}, {}
    for ctx in contexts:
        lengths = jnp.asarray([ctx], jnp.int32)
        qp = lengths[:, None] + jnp.arange(t)
        for v in cfg.variants:
            if v == "red" and t > 1:
                continue
            for c in cfg.key_chunks:
                if v == "cur":
                    f = jax.jit(lambda q, kc, vc, ln, c=c, qp=qp: bw.blockwise_attend(q, kc, vc, ln, kn, kn, mask, qp,
                                                                                      key_chunk=c))
                else:
                    def f0(q, kc, vc, ln, c=c, qp=qp, fn=fns[v]):
                        qg = q.reshape(b, t, kvh, g, d) * d ** -0.5
                        carry = bw.block_partial(qg, kn, kn, mask, qp)
                        return bw.finish(*fn(qg, kc, vc, ln, carry, c)).reshape(b, t, h, d)
                    f = jax.jit(f0)
                key = f"{v} chunk {c} @ {ctx}"
                progs[key] = (f, (q, kc, vc, lengths))
                outs[key] = np.asarray(f(q, kc, vc, lengths))
    for key, o in outs.items():
        ref = outs[f"cur chunk {cfg.key_chunks[0]} @ {key.rsplit('@ ', 1)[1]}"]
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    times = {k: [] for k in progs}
    for _ in range(cfg.reps):
        for k, (f, a) in progs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * float(min(v))} for k, v in times.items()}


def markdown(rec: dict) -> list:
    r = runner.result(rec, "levers")
    if r is None:
        return ["(not measured)"]
    lines = [f"One layer's cache loop, T={rec['config']['t']}, batch 1, {rec['config']['slots']} slots; ms per call "
             "(median / min of the interleaved repetitions).", "", "| variant | median ms | min ms |",
             "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v['median_ms']:.3f} | {v['min_ms']:.3f} |" for k, v in r.items()]
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    runner.run_experiment(f"long_attention_levers_t{cfg.t}", cfg, ["levers"], lambda cell: measure(cfg), opts=opts,
                          title=f"Blockwise attention levers, query block T={cfg.t}", markdown=markdown)


if __name__ == "__main__":
    main()
