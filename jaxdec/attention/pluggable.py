"""A Llama forward pass with a pluggable, per-layer-parameterised attention function.

``LlamaModel.__call__`` picks its attention by name and passes it no per-layer data, so methods whose
attention needs per-layer state (Double Sparsity's calibrated channels, a Hydragen prefix per layer)
or that need the per-layer queries (Double Sparsity calibration) cannot run through it. `forward`
is the same computation as ``LlamaModel.__call__`` (no ``layers`` skipping, no ``logits_at``; tested
equal to it) with

* ``attn(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos, extra, sliding_window=...)``
  called in every layer, ``extra`` being that layer's slice of ``layer_extra`` (a pytree with a
  leading ``[L]`` axis, scanned with the layers; None passes None);
* ``collect=True`` also returning every layer's post-RoPE queries and keys of the block
  (``q [L,B,T,H,D]``, ``k [L,B,T,KVH,D]``).

The shared model could take the same two arguments (see the issue-5 report); then this file goes.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdec.attention.reference import attend, causal_block_mask
from jaxdec.cache.kv import KVCache, append
from jaxdec.models.llama import apply_rope, rms_norm, rope_tables
from jaxdec.models.quant import embed_lookup, matmul, scan_layer_params

__all__ = ["forward", "plain_attn"]


def plain_attn(q, kc, vc, lengths, k, v, block_mask, q_pos, extra, sliding_window=None):
    return attend(q, kc, vc, lengths, k, v, block_mask, q_pos, sliding_window=sliding_window)


def forward(model, params, tokens, positions, cache: KVCache, mask=None,
            attn: Optional[Callable] = None, layer_extra=None, collect: bool = False):
    """-> ``(logits [B,T,V], cache)`` or, with ``collect``, ``(logits, cache, (q, k))``."""
    c = model.config
    attn = plain_attn if attn is None else attn
    b, t = tokens.shape
    x = embed_lookup(params["embed"], tokens).astype(jnp.float32)
    cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
    block_mask = causal_block_mask(b, t) if mask is None else mask
    lengths = cache.lengths
    layer_xs, pick_layer = scan_layer_params(params["layers"])

    def layer(h, xs):
        p, index, kc, vc, extra = xs
        p = pick_layer(p, index)
        hn = rms_norm(h, p["attn_norm"], c.rms_norm_eps)
        q, k, v = matmul(hn, p["wq"]), matmul(hn, p["wk"]), matmul(hn, p["wv"])
        if c.qkv_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        a = attn(q, kc, vc, lengths, k, v, block_mask, positions, extra,
                 sliding_window=c.sliding_window)
        h = h + matmul(a.reshape(b, t, c.num_heads * c.head_dim), p["wo"])
        hn = rms_norm(h, p["mlp_norm"], c.rms_norm_eps)
        h = h + matmul(jax.nn.silu(matmul(hn, p["w_gate"])) * matmul(hn, p["w_up"]), p["w_down"])
        return h, (k, v, q if collect else None)

    h, (k_new, v_new, qs) = jax.lax.scan(
        layer, x, (layer_xs, jnp.arange(c.num_layers, dtype=jnp.int32), cache.k, cache.v,
                   layer_extra))
    cache = append(cache, k_new, v_new)
    h = rms_norm(h, params["final_norm"], c.rms_norm_eps)
    head = params["lm_head"] if "lm_head" in params else params["embed"]
    logits = matmul(h, head)
    if collect:
        return logits, cache, (qs, k_new)
    return logits, cache
