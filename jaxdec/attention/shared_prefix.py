"""Hydragen decoding for rows that share a prompt (n>1 sampling, best-of-N, beams after prefill).

The prompt is prefilled ONCE (batch 1); its per-layer keys/values become the shared prefix
``(prefix_k, prefix_v) [L,P,KVH,D]`` with ``prefix_len`` valid entries. The n rows then decode with a
small per-row *suffix* cache (`KVCache` of ``[L,n,S,KVH,D]``, lengths = tokens generated so far) and
every layer's attention is `hydragen_attend` (one batched matmul against the prefix + per-row
suffix attention, merged by log-sum-exp). Row b's token at suffix slot j sits at position
``prefix_len + j``.

This runs through `jaxdec.attention.pluggable.forward` (the shared ``LlamaModel`` cannot yet pass a
per-layer prefix to its attention; see the issue-5 report for the change that would make it
automatic in the generic loop).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdec.attention.hydragen import hydragen_attend
from jaxdec.attention.pluggable import forward
from jaxdec.cache.kv import KVCache

__all__ = ["SharedPrefix", "prefill_prefix", "hydragen_layer_attn", "decode_shared"]


class SharedPrefix(NamedTuple):
    k: jax.Array  # [L,P,KVH,D]
    v: jax.Array  # [L,P,KVH,D]
    length: jax.Array  # scalar int32


def hydragen_layer_attn(q, kc, vc, lengths, k_new, v_new, block_mask, q_pos, extra,
                        sliding_window=None):
    pk, pv, plen = extra
    return hydragen_attend(q, pk, pv, plen, kc, vc, lengths, k_new, v_new, block_mask, q_pos,
                           sliding_window=sliding_window)


def prefill_prefix(model, params, prompt, size=None):
    """Prefill one prompt (``[T]`` ids) -> (last-position logits ``[V]``, `SharedPrefix`)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    t = prompt.shape[0]
    size = t if size is None else size
    cache = model.init_cache(1, size)
    logits, cache = forward(model, params, prompt[None], jnp.arange(t, dtype=jnp.int32)[None], cache)
    return logits[0, -1], SharedPrefix(cache.k[:, 0], cache.v[:, 0], jnp.asarray(t, jnp.int32))


def decode_shared(model, params, tokens, prefix: SharedPrefix, suffix: KVCache):
    """One block ``tokens [n,T]`` for n rows sharing ``prefix`` -> (logits ``[n,T,V]``, suffix)."""
    n, t = tokens.shape
    positions = prefix.length + suffix.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    num_layers = prefix.k.shape[0]
    extra = (prefix.k, prefix.v, jnp.broadcast_to(prefix.length, (num_layers,)))
    return forward(model, params, tokens, positions, suffix, attn=hydragen_layer_attn,
                   layer_extra=extra)
