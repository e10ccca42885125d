"""Contiguous KV cache with per-row lengths (rows of a batch may be at different positions).

Layout: ``k``/``v`` are ``[L, B, S, KVH, D]``; ``lengths[b]`` is how many committed tokens row ``b``
holds. Position ``j`` of a row always holds the token at sequence position ``j`` (no left padding), so a
row's RoPE positions equal its cache indices. Everything here is a pure function with static shapes.

* `append` writes a block of T new keys/values at each row's own offset and advances its length
  (rows flagged in ``advance`` only).
* `rollback` sets lengths back (rejected draft tokens become invisible; nothing needs erasing).
* `gather_block` compacts an accepted path: entries at ``start + idx[b, i]`` move to ``start + i``.

Writing past the cache is never silent: the drivers check room on the host before a loop starts, and
`check_room` is available for callers that build their own loops.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, KVH, D]
    v: jax.Array  # [L, B, S, KVH, D]
    lengths: jax.Array  # [B] int32

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def create(cls, num_layers: int, batch: int, size: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, batch, size, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def _write_rows(buf: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
    """buf [L,B,S,...] <- new [L,B,T,...] at per-row offsets along S."""
    def one(b_buf, b_new, off):  # b_buf [L,S,...], b_new [L,T,...]
        start = (0, off) + (0,) * (b_buf.ndim - 2)
        return jax.lax.dynamic_update_slice(b_buf, b_new.astype(b_buf.dtype), start)
    return jax.vmap(one, in_axes=(1, 1, 0), out_axes=1)(buf, new, offsets)


def append(cache: KVCache, k_new: jax.Array, v_new: jax.Array, advance=None) -> KVCache:
    """Write ``k_new/v_new [L,B,T,KVH,D]`` at each row's length; advance lengths by T (where ``advance``)."""
    t = k_new.shape[2]
    k = _write_rows(cache.k, k_new, cache.lengths)
    v = _write_rows(cache.v, v_new, cache.lengths)
    step = jnp.full_like(cache.lengths, t) if advance is None else jnp.where(advance, t, 0)
    return KVCache(k, v, cache.lengths + step)


def rollback(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Set each row's committed length (must not exceed what was written)."""
    return cache.replace(lengths=jnp.asarray(lengths, jnp.int32))


def gather_block(cache: KVCache, start: jax.Array, idx: jax.Array, n_keep: jax.Array) -> KVCache:
    """Compact an accepted path of a block written at ``start``.

    ``idx [B, P]`` are block-relative indices of the accepted nodes in order; after the call the
    entries at ``start + idx[b, i]`` sit at ``start + i`` and the row's length is ``start + n_keep``.
    Indices past ``n_keep`` are ignored (their slots hold whatever they gathered).
    """
    p = idx.shape[1]

    def one(b_buf, s, ix):  # b_buf [L,S,KVH,D]
        src = jnp.clip(s + ix, 0, b_buf.shape[1] - 1)
        rows = jnp.take(b_buf, src, axis=1)  # [L,P,KVH,D]
        return jax.lax.dynamic_update_slice(b_buf, rows, (0, s, 0, 0))

    k = jax.vmap(one, in_axes=(1, 0, 0), out_axes=1)(cache.k, start, idx)
    v = jax.vmap(one, in_axes=(1, 0, 0), out_axes=1)(cache.v, start, idx)
    del p
    return KVCache(k, v, (start + n_keep).astype(jnp.int32))


def check_room(cache_size: int, needed: int, what: str = "prompt + max_new_tokens") -> None:
    if needed > cache_size:
        raise ValueError(f"cache too small: {what} needs {needed} positions but the cache holds {cache_size}")


def bucket(n: int, multiple: int = 64) -> int:
    """Round a length up to the next bucket: multiples of `multiple` up to 512, then powers of two."""
    if n <= 0:
        return multiple
    if n <= 512:
        return -(-n // multiple) * multiple
    p = 1024
    while p < n:
        p *= 2
    return p
