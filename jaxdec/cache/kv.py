"""Contiguous KV cache with per-row lengths (rows of a batch may be at different positions).

Layout: ``k``/``v`` are head-major ``[L, B, KVH, S, D]`` (the slot axis next to the head dimension, so
attention reads a layer's chunk of keys/values as its dots want them, with no transposing copy);
``lengths[b]`` is how many committed tokens row ``b`` holds. Blocks of new keys/values (`append`, a model's
``kv`` output) are ``[L, B, T, KVH, D]``; `swap_heads_slots` turns a buffer into ``[L, B, S, KVH, D]`` and
back (a copy). Position ``j`` of a row always holds the token at sequence position ``j`` (no left padding),
so a row's RoPE positions equal its cache indices. Everything here is a pure function with static shapes.

Shared-prefix mode (Hydragen). When rows continue the same prompt, the cache may hold that prompt
ONCE: ``prefix_k/prefix_v [L, G, P, KVH, D]`` with ``prefix_len [G]`` (int32) valid entries, for G
groups of contiguous rows (``B // G`` rows each; G = 1 when the whole batch shares one prompt, G =
prompts when each of several prompts has n rows). ``k``/``v`` then hold only each row's *suffix*: slot
``j`` of row ``b`` (group ``g = b // (B // G)``) is the token at position ``prefix_len[g] + j``.
``lengths`` keeps its meaning (the row's total committed length, prefix included), so RoPE positions,
`rollback` and every caller that reasons in positions are unchanged; only the write offset into
``k``/``v`` becomes ``lengths - prefix_len[group]`` (`KVCache.offsets`). Row gathers (beam reordering)
must keep rows inside their group. The model attends with
`jaxdec.attention.hydragen.hydragen_attend` when a prefix is present. The default (``prefix_k=None``)
is the ordinary cache, unchanged.

* `append` writes a block of T new keys/values at each row's own offset and advances its length
  (rows flagged in ``advance`` only).
* `rollback` sets lengths back (rejected draft tokens become invisible; nothing needs erasing).
* `gather_block` compacts an accepted path: entries at ``start + idx[b, i]`` move to ``start + i``.
* `with_prefix_buffer` turns an (empty) ordinary cache into an empty shared-prefix cache with a prefix
  buffer of P slots; `set_prefix` fills the prefix; `to_plain` expands a prefix cache back into an
  ordinary one (tests, debugging).

Writing past the cache is never silent: the drivers check room on the host before a loop starts, and
`check_room` is available for callers that build their own loops.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, KVH, S, D]   (the per-row suffix in shared-prefix mode)
    v: jax.Array  # [L, B, KVH, S, D]
    lengths: jax.Array  # [B] int32, total committed length (prefix included)
    prefix_k: Optional[jax.Array] = None  # [L, G, P, KVH, D], group g shared by its B // G rows
    prefix_v: Optional[jax.Array] = None  # [L, G, P, KVH, D]
    prefix_len: Optional[jax.Array] = None  # [G] int32: valid prefix entries per group

    @property
    def size(self) -> int:
        """Slots per row in ``k``/``v`` (suffix slots in shared-prefix mode)."""
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def has_prefix(self) -> bool:
        return self.prefix_k is not None

    @property
    def prefix_size(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[2]

    @property
    def prefix_groups(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[1]

    @property
    def row_prefix_len(self) -> jax.Array:
        """``[B]`` prefix length of each row's group (zeros for an ordinary cache)."""
        if self.prefix_k is None:
            return jnp.zeros_like(self.lengths)
        return jnp.repeat(self.prefix_len, self.batch // self.prefix_groups)

    @property
    def offsets(self) -> jax.Array:
        """Per-row write offset into ``k``/``v``: ``lengths`` (ordinary) or ``lengths - prefix_len``."""
        if self.prefix_k is None:
            return self.lengths
        return self.lengths - self.row_prefix_len

    def to_slot(self, positions):
        """Per-row sequence positions ``[B]`` -> slots of ``k``/``v``."""
        if self.prefix_k is None:
            return positions
        return positions - self.row_prefix_len

    @classmethod
    def create(cls, num_layers: int, batch: int, size: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32, prefix_size: Optional[int] = None, prefix_groups: int = 1) -> "KVCache":
        """An empty cache; with ``prefix_size`` an empty shared-prefix cache (``size`` suffix slots)."""
        shape = (num_layers, batch, num_kv_heads, size, head_dim)
        c = cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))
        return c if prefix_size is None else with_prefix_buffer(c, prefix_size, prefix_groups)


def with_prefix_buffer(cache: KVCache, prefix_size: int, groups: int = 1) -> KVCache:
    """An ordinary cache -> a shared-prefix cache with ``groups`` empty prefix buffers of
    ``prefix_size`` slots (``prefix_len = 0``; ``k``/``v`` become the suffix buffers; the batch must be
    a multiple of ``groups``, rows ``g*B/G .. (g+1)*B/G - 1`` forming group g)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"a shared prefix needs a KVCache, got {type(cache).__name__}")
    if cache.prefix_k is not None:
        raise ValueError("cache already has a shared prefix")
    if not isinstance(prefix_size, int) or prefix_size < 1:
        raise ValueError(f"prefix_size must be an integer >= 1, got {prefix_size!r}")
    l, b, kvh, _, d = cache.k.shape
    if not isinstance(groups, int) or groups < 1 or b % groups:
        raise ValueError(f"groups must be an integer >= 1 dividing the batch ({b}), got {groups!r}")
    z = jnp.zeros((l, groups, prefix_size, kvh, d), cache.k.dtype)
    return cache.replace(prefix_k=z, prefix_v=z, prefix_len=jnp.zeros((groups,), jnp.int32))


def set_prefix(cache: KVCache, prefix_k, prefix_v, prefix_len) -> KVCache:
    """Install the prefixes ``[L,G,P,KVH,D]`` (``prefix_len [G]`` valid entries); every row's suffix
    is emptied (lengths = its group's prefix_len)."""
    g = prefix_k.shape[1]
    plen = jnp.asarray(prefix_len, jnp.int32).reshape((g,))
    c = cache.replace(prefix_k=prefix_k.astype(cache.k.dtype), prefix_v=prefix_v.astype(cache.v.dtype),
                      prefix_len=plen)
    return c.replace(lengths=c.row_prefix_len)


def to_plain(cache: KVCache, size: Optional[int] = None) -> KVCache:
    """A shared-prefix cache -> the equivalent ordinary cache (prefix copied into every row)."""
    if cache.prefix_k is None:
        return cache
    l, b, kvh, s, d = cache.k.shape
    size = cache.prefix_size + s if size is None else size
    plen = cache.row_prefix_len[:, None]  # [B,1]
    pos = jnp.arange(size)[None, :]
    rows = jnp.arange(b) // (b // cache.prefix_groups)
    pidx = jnp.clip(pos, 0, cache.prefix_size - 1)[0]
    pk = jnp.swapaxes(jnp.take(cache.prefix_k, rows, axis=1)[:, :, pidx], 2, 3)  # [L,B,KVH,size,D]
    pv = jnp.swapaxes(jnp.take(cache.prefix_v, rows, axis=1)[:, :, pidx], 2, 3)
    sl = jnp.clip(pos - plen, 0, s - 1)  # [B,size]
    sk = jax.vmap(lambda buf, ix: jnp.take(buf, ix, axis=2), in_axes=(1, 0), out_axes=1)(cache.k, sl)
    sv = jax.vmap(lambda buf, ix: jnp.take(buf, ix, axis=2), in_axes=(1, 0), out_axes=1)(cache.v, sl)
    sel = (pos < plen)[None, :, None, :, None]
    return KVCache(jnp.where(sel, pk, sk), jnp.where(sel, pv, sv), cache.lengths)


def _row_cols(offsets: jax.Array, n: int):
    """Index arrays selecting ``n`` consecutive slots from each row's offset: rows [B,1], cols [B,n]."""
    return jnp.arange(offsets.shape[0])[:, None], offsets[:, None] + jnp.arange(n)[None, :]


def read_rows(buf: jax.Array, offsets: jax.Array, n: int) -> jax.Array:
    """A cache buffer ``[L,B,KVH,S,D]`` -> ``[L,B,n,KVH,D]``: row b's slots ``offsets[b] .. offsets[b] + n - 1``
    (indices past the end are clamped)."""
    rows, cols = _row_cols(offsets, n)
    return jnp.transpose(buf.at[:, rows, :, cols].get(mode="clip"), (2, 0, 1, 3, 4))  # from [B,n,L,KVH,D]


def write_rows(buf: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
    """A cache buffer ``[L,B,KVH,S,D]`` <- ``new [L,B,T,KVH,D]`` at per-row offsets along S; slots past the
    end are dropped (callers check room first).

    One scatter in the buffer's own layout (only the small block of new entries is reordered). (A ``vmap``
    of ``dynamic_update_slice`` over the batch axis made XLA pick a batch-major layout for the loop-carried
    cache and transpose the whole cache twice per decode step: 1.6x slower at batch 8.)
    """
    rows, cols = _row_cols(offsets, new.shape[2])
    upd = jnp.transpose(new.astype(buf.dtype), (1, 2, 0, 3, 4))  # [B,T,L,KVH,D]: the indexed axes first
    return buf.at[:, rows, :, cols].set(upd, mode="drop")


def swap_heads_slots(buf: jax.Array) -> jax.Array:
    """A cache buffer ``[L,B,KVH,S,D]`` as ``[L,B,S,KVH,D]``, or back (a transposed copy: the shared-prefix
    buffers, tests, and code that wants one position's keys of every head together)."""
    return jnp.swapaxes(buf, 2, 3)


def append(cache: KVCache, k_new: jax.Array, v_new: jax.Array, advance=None) -> KVCache:
    """Write ``k_new/v_new [L,B,T,KVH,D]`` at each row's length; advance lengths by T (where ``advance``)."""
    t = k_new.shape[2]
    off = cache.offsets
    k = write_rows(cache.k, k_new, off)
    v = write_rows(cache.v, v_new, off)
    step = jnp.full_like(cache.lengths, t) if advance is None else jnp.where(advance, t, 0)
    return cache.replace(k=k, v=v, lengths=cache.lengths + step)


def rollback(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Set each row's committed length (must not exceed what was written; in shared-prefix mode not
    below ``prefix_len``)."""
    return cache.replace(lengths=jnp.asarray(lengths, jnp.int32))


def gather_block(cache: KVCache, start: jax.Array, idx: jax.Array, n_keep: jax.Array) -> KVCache:
    """Compact an accepted path of a block written at ``start`` (a sequence position per row).

    ``idx [B, P]`` are block-relative indices of the accepted nodes in order; after the call the
    entries at ``start + idx[b, i]`` sit at ``start + i`` and the row's length is ``start + n_keep``.
    Indices past ``n_keep`` are ignored (their slots hold whatever they gathered).
    """
    s0 = cache.to_slot(jnp.asarray(start, jnp.int32))
    src = jnp.clip(s0[:, None] + idx, 0, cache.size - 1)  # [B,P]
    rows = jnp.arange(idx.shape[0])[:, None]

    def one(buf):  # gathered [B,P,L,KVH,D], written back in the same index order
        got = buf.at[:, rows, :, src].get(mode="clip")
        _, cols = _row_cols(s0, idx.shape[1])
        return buf.at[:, rows, :, cols].set(got, mode="drop")

    return cache.replace(k=one(cache.k), v=one(cache.v), lengths=(start + n_keep).astype(jnp.int32))


def check_room(cache_size, needed: int, what: str = "prompt + max_new_tokens") -> None:
    """Raise unless ``needed`` positions fit. ``cache_size`` is an int (positions) or a concrete
    `KVCache` (its capacity in positions: ``size``, plus the shortest group's ``prefix_len`` in
    shared-prefix mode)."""
    if isinstance(cache_size, KVCache):
        c = cache_size
        cache_size = c.size + (0 if c.prefix_k is None else int(jnp.min(c.prefix_len)))
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


def need_size(n: int, chunk=None, multiple: int = 64) -> int:
    """Slots for ``n`` positions when attention follows the committed lengths (empty slots cost nothing):
    up to 512 as `bucket` (multiples of ``multiple``); above, a multiple of the prefill ``chunk`` (at
    least ``multiple``), not the next power of two. ``chunk=None`` (a model without chunked prefill)
    keeps `bucket`."""
    if chunk is None or n <= 512:
        return bucket(n, multiple)
    step = max(int(chunk), multiple)
    return -(-n // step) * step
