"""Reference attention of a block of T new tokens over a ragged KV cache plus the block itself.

This is the single definition of decode-time attention in jaxdec (the XLA path); Pallas kernels in
``pallas_kernels/`` are tested against it.

Shapes: ``q [B,T,H,D]``; cache ``k_cache/v_cache [B,S,KVH,D]`` with ``lengths [B]`` committed entries;
the block's own ``k_new/v_new [B,T,KVH,D]``; ``block_mask [B,T,T]`` bool (query i may see block key j;
causal for a chain, ancestor-or-self for a tree); ``q_pos [B,T]`` positions of the block's tokens
(cache key j sits at position j). GQA: query head h reads KV head ``h // (H // KVH)``.
A query whose every key is masked outputs zeros.

Optional ``cache_mask [B,T,S]`` bool narrows which committed cache entries each query may see (an
explicit attention mask over cache slots; entries at or past ``lengths`` stay invisible either way).
Without it (the default) the program is exactly the one without the argument.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxdec.masks import ATTENTION_MASK_VALUE as NEG  # finite: a fully masked row stays finite


def causal_block_mask(batch: int, t: int) -> jax.Array:
    m = jnp.tril(jnp.ones((t, t), bool))
    return jnp.broadcast_to(m, (batch, t, t))


def attend(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos,
           sliding_window: Optional[int] = None, scale: Optional[float] = None, cache_mask=None):
    b, t, h, d = q.shape
    kvh = k_cache.shape[2]
    g = h // kvh
    s = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kvh, g, d) * scale
    sc = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache)  # [B,KVH,G,T,S]
    sn = jnp.einsum("btkgd,bjkd->bkgtj", qg, k_new)  # [B,KVH,G,T,T]
    kpos = jnp.arange(s)[None, None, :]  # [1,1,S]
    mc = kpos < lengths[:, None, None]  # [B,1,S]
    mc = jnp.broadcast_to(mc, (b, t, s))
    if cache_mask is not None:
        mc = mc & cache_mask
    mn = block_mask
    if sliding_window is not None:
        mc = mc & (q_pos[:, :, None] - kpos < sliding_window)
        mn = mn & (q_pos[:, :, None] - q_pos[:, None, :] < sliding_window)
    sc = jnp.where(mc[:, None, None], sc, NEG)
    sn = jnp.where(mn[:, None, None], sn, NEG)
    m = jnp.maximum(sc.max(-1, keepdims=True), sn.max(-1, keepdims=True))
    pc = jnp.where(mc[:, None, None], jnp.exp(sc - m), 0.0)
    pn = jnp.where(mn[:, None, None], jnp.exp(sn - m), 0.0)
    denom = pc.sum(-1, keepdims=True) + pn.sum(-1, keepdims=True)
    # zero unused cache slots so that garbage (even NaN) beyond `lengths` can never leak through 0 * x
    v_cache = jnp.where((jnp.arange(s)[None, :] < lengths[:, None])[:, :, None, None], v_cache, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", pc, v_cache) + jnp.einsum("bkgtj,bjkd->btkgd", pn, v_new)
    denom = jnp.moveaxis(denom[..., 0], 3, 1)[..., None]  # [B,T,KVH,G,1]
    out = jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out.reshape(b, t, h, d).astype(q.dtype)
