"""Sparse KV caches for evaluation: Mustafar per-token magnitude pruning and Double Sparsity.

Mustafar (unstructured, per token): for every token and KV head, the key vector and the value vector
each keep their ``D - round(sparsity * D)`` largest-magnitude entries; the rest become zero. Storage is
Mustafar's bitmap format: a ``D``-bit bitmap plus the kept values per vector. Same ``compress`` /
``bytes_per_token`` interface as ``jaxdec.cache.quantized`` (ragged cache in, what attention reads
out; slots past ``lengths`` untouched). ``window`` most recent tokens may be kept dense (default 0).

Double Sparsity (post-training sparse attention): the cache itself is kept whole, plus a *label
cache* holding only ``r`` calibrated channels of every key. Offline, `calibrate_channels` picks, per
layer and KV head, the ``r`` channels with the largest mean ``|q_c k_c|`` over calibration queries and
keys (for GQA, summed over the group's query heads). At decode time `double_sparse_attend` scores every
cached token approximately on those channels (``q[ch] . k[ch]``), keeps each query head's top
``max(min_tokens, ceil(token_frac * length))`` tokens (ties at the threshold are all kept) and runs
exact attention on them plus the block's own keys. It is an attention function, not a cache transform:
with all channels and all tokens it equals ``attend`` exactly. Its ``bytes_per_token`` is the stored
size (full cache + label cache: more than fp32); ``bytes_read_per_token`` is what one decode step reads
(label cache + the selected fraction of the full cache), the quantity Double Sparsity reduces.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxdec.attention.hydragen import merge_partials
from jaxdec.attention.reference import NEG
from jaxdec.cache.quantized import valid_mask

__all__ = ["Mustafar", "prune_per_token", "DoubleSparsity", "calibrate_channels",
           "double_sparse_attend"]


def prune_per_token(x, keep: int):
    """Keep the ``keep`` largest-|x| entries of every vector along the last axis (exactly ``keep``,
    ties broken by index), zero the rest."""
    d = x.shape[-1]
    if keep >= d:
        return x
    if keep <= 0:
        return jnp.zeros_like(x)
    _, idx = lax.top_k(jnp.abs(x), keep)
    m = jax.nn.one_hot(idx, d, dtype=jnp.int32).sum(-2) > 0
    return jnp.where(m, x, 0.0)


@dataclasses.dataclass(frozen=True)
class Mustafar:
    sparsity: float = 0.5
    window: int = 0
    value_bytes: int = 4

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be a non-negative int, got {self.window!r}")

    @property
    def name(self):
        return f"mustafar-{round(self.sparsity * 100)}%"

    def kept(self, head_dim: int) -> int:
        return head_dim - int(round(self.sparsity * head_dim))

    def compress(self, k, v, lengths):
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        s, d = k.shape[1], k.shape[-1]
        n = self.kept(d)
        ln = jnp.asarray(lengths, jnp.int32)
        pruned = valid_mask(jnp.maximum(ln - self.window, 0), s)
        return (jnp.where(pruned, prune_per_token(k, n), k),
                jnp.where(pruned, prune_per_token(v, n), v))

    def bytes_per_token(self, n_tokens, num_kv_heads, head_dim):
        n_sparse = max(n_tokens - self.window, 0)
        sparse = n_sparse * (head_dim / 8 + self.kept(head_dim) * self.value_bytes)
        dense = (n_tokens - n_sparse) * head_dim * self.value_bytes
        return 2 * num_kv_heads * (sparse + dense) / n_tokens


def calibrate_channels(q, k, r: int):
    """Offline Double Sparsity calibration for one layer.

    ``q [N,H,D]`` calibration queries and ``k [M,KVH,D]`` calibration keys (any tokens, e.g. every
    position of a few prompts). Importance of channel c for KV head j is the mean over all
    (query, key) pairs and the group's query heads of ``|q_c k_c|``, which factorises into
    ``sum_g mean|q_c| * mean|k_c|``. Returns int32 ``[KVH, r]`` channel indices (largest first).
    """
    n, h, d = q.shape
    kvh = k.shape[1]
    if not isinstance(r, int) or not 1 <= r <= d:
        raise ValueError(f"r must be an int in [1, {d}], got {r!r}")
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({kvh})")
    qa = jnp.abs(q.astype(jnp.float32)).mean(0).reshape(kvh, h // kvh, d).sum(1)  # [KVH,D]
    ka = jnp.abs(k.astype(jnp.float32)).mean(0)  # [KVH,D]
    _, idx = lax.top_k(qa * ka, r)
    return idx.astype(jnp.int32)


def double_sparse_attend(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos, channels,
                         token_frac: float = 1 / 8, min_tokens: int = 16,
                         sliding_window: Optional[int] = None, scale: Optional[float] = None):
    """Double Sparsity decode attention (``attend``'s interface plus ``channels [KVH, r]``)."""
    b, t, h, d = q.shape
    s, kvh = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kvh, g, d) * scale
    # approximate scores on the label channels (the label cache is k_cache[..., channels])
    lab_k = jnp.take_along_axis(k_cache.astype(jnp.float32), channels[None, None], axis=-1)
    lab_q = jnp.take_along_axis(qg, channels[None, None, :, None, :], axis=-1)
    approx = jnp.einsum("btkgr,bskr->btkgs", lab_q, lab_k)
    kpos = jnp.arange(s)
    vis = jnp.broadcast_to(kpos[None, None, :] < lengths[:, None, None], (b, t, s))
    mn = block_mask
    if sliding_window is not None:
        vis = vis & (q_pos[:, :, None] - kpos[None, None, :] < sliding_window)
        mn = mn & (q_pos[:, :, None] - q_pos[:, None, :] < sliding_window)
    vis5 = jnp.broadcast_to(vis[:, :, None, None, :], approx.shape)
    approx = jnp.where(vis5, approx, NEG)
    budget = jnp.maximum(jnp.ceil(token_frac * lengths).astype(jnp.int32), min_tokens)
    budget = jnp.clip(budget, 1, s)
    srt = -jnp.sort(-approx, axis=-1)  # descending
    thr = jnp.take_along_axis(srt, jnp.broadcast_to((budget - 1)[:, None, None, None, None],
                                                    srt.shape[:-1] + (1,)), axis=-1)
    sel = vis5 & (approx >= thr)
    # exact attention on the selected tokens + the block's own keys
    vc = jnp.where(valid_mask(lengths, s), v_cache.astype(jnp.float32), 0.0)
    sc = jnp.einsum("btkgd,bskd->btkgs", qg, k_cache.astype(jnp.float32))
    sn = jnp.einsum("btkgd,bjkd->btkgj", qg, k_new.astype(jnp.float32))
    vn5 = jnp.broadcast_to(mn[:, :, None, None, :], sn.shape)

    def part(sco, m, vals, eq):
        sco = jnp.where(m, sco, NEG)
        mx = sco.max(-1)
        p = jnp.where(m, jnp.exp(sco - mx[..., None]), 0.0)
        return mx, p.sum(-1), jnp.einsum(eq, p, vals)

    out = merge_partials([part(sc, sel, vc, "btkgs,bskd->btkgd"),
                          part(sn, vn5, v_new.astype(jnp.float32), "btkgj,bjkd->btkgd")])
    return out.reshape(b, t, h, d).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class DoubleSparsity:
    """Configuration + byte accounting of Double Sparsity (channels come from `calibrate_channels`)."""
    channel_frac: float = 1 / 8
    token_frac: float = 1 / 8
    min_tokens: int = 16
    value_bytes: int = 4

    def __post_init__(self):
        if not 0 < self.channel_frac <= 1 or not 0 < self.token_frac <= 1:
            raise ValueError("channel_frac and token_frac must be in (0, 1]")

    @property
    def name(self):
        return f"double-sparsity-1/{round(1 / self.channel_frac)}"

    def channels(self, head_dim: int) -> int:
        return max(1, int(round(self.channel_frac * head_dim)))

    def bytes_per_token(self, n_tokens, num_kv_heads, head_dim):
        """Stored: the full float cache plus the label cache."""
        return num_kv_heads * (2 * head_dim + self.channels(head_dim)) * self.value_bytes

    def bytes_read_per_token(self, n_tokens, num_kv_heads, head_dim):
        """Read by one decode step, per cached token: label cache + the selected tokens' K and V."""
        sel = min(n_tokens, max(self.min_tokens, math.ceil(self.token_frac * n_tokens)))
        full = 2 * num_kv_heads * head_dim * self.value_bytes * sel
        return num_kv_heads * self.channels(head_dim) * self.value_bytes + full / n_tokens
