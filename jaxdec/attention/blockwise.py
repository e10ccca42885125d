"""Blockwise attention whose cost follows the committed lengths of the cache, not its size.

Same signature and semantics as `jaxdec.attention.reference.attend` (the oracle it is tested
against): a block of T new queries ``q [B,T,H,D]`` over a ragged cache ``k_cache/v_cache [B,S,KVH,D]``
with ``lengths [B]`` committed entries, plus the block's own keys ``k_new/v_new [B,T,KVH,D]`` under
``block_mask [B,T,T]``; ``q_pos [B,T]``; optional ``sliding_window``, ``scale`` and ``cache_mask
[B,T,S]``. GQA: query head h reads KV head ``h // (H // KVH)``. A query that sees no key outputs zeros.

How it differs from `attend`:

* the cache is read in key chunks of ``key_chunk`` slots by a `lax.fori_loop` whose trip count is
  ``ceil(max(lengths) / key_chunk)``, a traced value: a decode step with 256 committed tokens in a
  4096-slot cache reads one 512-slot chunk, not 4096 slots; scores are never larger than
  ``[B,T,KVH,G,key_chunk]``;
* the softmax is online (running max ``m``, denominator ``l``, unnormalised output ``o``), starting
  from the block's own keys and then folding in the cache chunks;
* masking acts on scores and probabilities by selection only. Values of slots a row may not see are
  replaced by zeros inside the chunk being read (a select, never ``0 * x``), so stale or non-finite
  data past a row's length (after a rollback, or never written) cannot reach the output. No masked
  copy of the whole cache is made.

The loop has a traced bound, so the function is forward-only (no reverse-mode derivative); code that
differentiates through attention uses ``attend`` (the model's ``attention_impl="reference"``).

Where it is used: `LlamaModel`'s default "xla" attention (prefill chunks, decode steps, every verify
block and tree mask, explicit attention arrays via ``cache_mask``). Not yet: a shared-prefix (Hydragen)
cache keeps `jaxdec.attention.hydragen.hydragen_attend`, which reads its whole prefix and suffix buffers
(its suffix part could become a call of this function), and the Pallas tree-attention kernel still reads
every cache slot.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxdec.attention.reference import NEG

KEY_CHUNK = 512  # cache slots read per loop trip

__all__ = ["blockwise_attend", "KEY_CHUNK"]


def blockwise_attend(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos,
                     sliding_window: Optional[int] = None, scale: Optional[float] = None, cache_mask=None,
                     key_chunk: int = KEY_CHUNK, layer=None):
    """See the module docstring. ``layer`` (a traced int): ``k_cache/v_cache`` are a model's whole
    stacked cache ``[L,B,S,KVH,D]`` and layer ``layer`` is read, chunk by chunk, straight from the stack
    (no per-layer copy of the cache enters the loop)."""
    b, t, h, d = q.shape
    s, kvh = k_cache.shape[-3], k_cache.shape[-2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    f32 = jnp.float32
    qg = q.astype(f32).reshape(b, t, kvh, g, d) * scale
    lengths = jnp.asarray(lengths, jnp.int32)

    # the block's own keys: the initial (m, l, o)
    sn = jnp.einsum("btkgd,bjkd->btkgj", qg, k_new.astype(f32))  # [B,T,KVH,G,T]
    mn = block_mask
    if sliding_window is not None:
        mn = mn & (q_pos[:, :, None] - q_pos[:, None, :] < sliding_window)
    visn = mn[:, :, None, None, :]
    sn = jnp.where(visn, sn, NEG)
    m = sn.max(-1)  # [B,T,KVH,G]
    pn = jnp.where(visn, jnp.exp(sn - m[..., None]), 0.0)
    l = pn.sum(-1)
    o = jnp.einsum("btkgj,bjkd->btkgd", pn, v_new.astype(f32))

    if s > 0:
        c = min(int(key_chunk), s)
        n_max = -(-s // c)
        n = jnp.minimum((jnp.max(lengths) + c - 1) // c, n_max)
        ar = jnp.arange(c, dtype=jnp.int32)

        def read(buf, start):
            if layer is None:
                return jax.lax.dynamic_slice_in_dim(buf, start, c, axis=1).astype(f32)  # [B,C,KVH,D]
            z = jnp.zeros((), jnp.int32)
            return jax.lax.dynamic_slice(buf, (jnp.asarray(layer, jnp.int32), z, start, z, z),
                                         (1, b, c, kvh, d))[0].astype(f32)

        def body(i, carry):
            m, l, o = carry
            lo = i * c
            start = jnp.minimum(lo, s - c)  # the last chunk may overlap the one before: skip the overlap
            kc, vc = read(k_cache, start), read(v_cache, start)  # [B,C,KVH,D]
            kpos = start + ar  # [C]
            slot_ok = (kpos >= lo)[None, :] & (kpos[None, :] < lengths[:, None])  # [B,C]
            vis = jnp.broadcast_to(slot_ok[:, None, :], (b, t, c))
            if cache_mask is not None:
                vis = vis & jax.lax.dynamic_slice_in_dim(cache_mask, start, c, axis=2)
            if sliding_window is not None:
                vis = vis & (q_pos[:, :, None] - kpos[None, None, :] < sliding_window)
            vis5 = vis[:, :, None, None, :]
            sc = jnp.einsum("btkgd,bckd->btkgc", qg, kc)
            sc = jnp.where(vis5, sc, NEG)
            m_new = jnp.maximum(m, sc.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(vis5, jnp.exp(sc - m_new[..., None]), 0.0)
            vc = jnp.where(slot_ok[:, :, None, None], vc, 0.0)  # select: 0 * NaN would be NaN
            l = l * alpha + p.sum(-1)
            o = o * alpha[..., None] + jnp.einsum("btkgc,bckd->btkgd", p, vc)
            return m_new, l, o

        if n_max == 1:  # the whole cache is one chunk: no loop (a short decode costs what it did)
            m, l, o = body(jnp.zeros((), jnp.int32), (m, l, o))
        else:
            m, l, o = jax.lax.fori_loop(0, n, body, (m, l, o))

    ok = (l > 0)[..., None]
    out = jnp.where(ok, o / jnp.where(ok, l[..., None], 1.0), 0.0)
    return out.reshape(b, t, h, d).astype(q.dtype)
