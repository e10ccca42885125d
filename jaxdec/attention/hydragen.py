"""Hydragen: shared-prefix attention decomposed into one batched prefix part and per-row suffixes.

When the B rows of a batch (beams, best-of-N samples, n>1 sampling) share a prompt, their caches hold
B copies of the same prefix keys/values. Hydragen keeps ONE copy ``prefix_k/prefix_v [P,KVH,D]`` and
computes attention in two parts that are merged exactly by log-sum-exp:

* prefix part: the queries of all rows and all block positions are stacked into one matrix per KV head
  (``[B*T*G, D]``) and multiplied with the single prefix (one matmul instead of B matrix-vector
  products, and the prefix is read once instead of B times);
* suffix part: each row's own cache ``suffix_k/suffix_v [B,S,KVH,D]`` (``suffix_lengths[B]`` entries,
  suffix slot j at position ``prefix_len + j``) plus the block's own keys ``k_new/v_new`` under
  ``block_mask``, i.e. ordinary decode attention (`jaxdec.attention.blockwise.cache_partial`).

Both parts read their buffers in key chunks up to the committed lengths only (``prefix_len``, the longest
suffix), as every attention path does (`jaxdec.attention.blockwise`).

Each part returns ``(m, l, o)`` with ``m`` the max score, ``l = sum exp(s - m)`` and
``o = sum exp(s - m) v`` (unnormalised). The merge is
``out = (o1 e^{m1-m} + o2 e^{m2-m}) / (l1 e^{m1-m} + l2 e^{m2-m})`` with ``m = max(m1, m2)``, which
equals softmax attention over the concatenation. `hydragen_attend` therefore equals
``jaxdec.attention.reference.attend`` on the cache ``prefix[:prefix_len] ++ suffix[b, :suffix_lengths[b]]``
with lengths ``prefix_len + suffix_lengths``; a query that sees no key outputs zeros.

Automatic use: a `jaxdec.cache.kv.KVCache` may carry the prefixes (``prefix_k/prefix_v
[L,G,P,KVH,D]``, ``prefix_len [G]``: G groups of contiguous rows, G = 1 for one prompt; ``k/v`` then
hold the suffixes). ``LlamaModel.__call__`` attends with `hydragen_attend`
in every layer when the cache has a prefix (the layer's prefix slice scanned with the layers), and
`generate` / the search drivers build such a cache whenever every row of a batch continues one prompt
(``shared_prefix=None`` auto; see `jaxdec.core.generate.use_shared_prefix`).

`split_shared_prefix` builds the Hydragen inputs from an ordinary ragged cache whose rows share their
first ``prefix_len`` entries (it reads row 0 for the prefix); `merge_partials` is exposed for
tree-shaped sharing (more than two levels of shared segments merge the same way, pairwise).
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from jaxdec.attention.blockwise import KEY_CHUNK, block_partial, cache_partial, chunk_range
from jaxdec.attention.reference import NEG

__all__ = ["hydragen_attend", "prefix_partial", "grouped_prefix_partial", "suffix_partial",
           "merge_partials", "split_shared_prefix"]


def _partial(s, vis, v_of, eq: str):
    """Masked (m, l, o) of one score block. ``s`` scores, ``vis`` same-shape bool."""
    s = jnp.where(vis, s, NEG)
    m = s.max(-1)
    p = jnp.where(vis, jnp.exp(s - m[..., None]), 0.0)
    l = p.sum(-1)
    o = jnp.einsum(eq, p, v_of)
    return m, l, o


def prefix_partial(q, prefix_k, prefix_v, prefix_len, q_pos, sliding_window=None, scale=None,
                   key_chunk: int = KEY_CHUNK):
    """Prefix part: all rows' queries against one shared prefix.

    ``q [B,T,H,D]``, ``prefix_k/prefix_v [P,KVH,D]``, ``prefix_len`` scalar (first entries valid),
    ``q_pos [B,T]``. Returns ``m, l [B,T,KVH,G]`` and ``o [B,T,KVH,G,D]``.

    The prefix is read in chunks of ``key_chunk`` slots by a loop whose trip count is
    ``ceil(prefix_len / key_chunk)`` (the lengths rule of `jaxdec.attention.blockwise`; with a sliding
    window, chunks before every query's window are skipped); each chunk is multiplied once with the
    stacked query matrix of all rows. Slots past ``prefix_len`` never reach the result.
    """
    b, t, h, d = q.shape
    p_cap, kvh, _ = prefix_k.shape
    g = h // kvh
    n = b * t * g
    scale = d ** -0.5 if scale is None else scale
    f32 = jnp.float32
    # [KVH, B*T*G, D]: the batched query matrix for each KV head (one matmul per head and chunk)
    qm = jnp.moveaxis((q.astype(f32).reshape(b, t, kvh, g, d) * scale), 2, 0).reshape(kvh, n, d)
    qpos_n = jnp.broadcast_to(q_pos.astype(jnp.int32)[:, :, None], (b, t, g)).reshape(n)  # [N]
    plen = jnp.asarray(prefix_len, jnp.int32).reshape(())
    carry = (jnp.full((kvh, n), NEG, f32), jnp.zeros((kvh, n), f32), jnp.zeros((kvh, n, d), f32))
    if p_cap > 0:
        c = min(int(key_chunk), p_cap)
        ar = jnp.arange(c, dtype=jnp.int32)

        def body(i, carry):
            m, l, o = carry
            lo = i * c
            start = jnp.minimum(lo, p_cap - c)  # the last chunk may overlap the one before
            kc = jax.lax.dynamic_slice_in_dim(prefix_k, start, c, axis=0).astype(f32)  # [C,KVH,D]
            vc = jax.lax.dynamic_slice_in_dim(prefix_v, start, c, axis=0).astype(f32)
            kpos = start + ar
            ok = (kpos >= lo) & (kpos < plen)  # [C]
            vis = jnp.broadcast_to(ok[None, :], (n, c))
            if sliding_window is not None:
                vis = vis & (qpos_n[:, None] - kpos[None, :] < sliding_window)
            sc = jnp.where(vis[None], jnp.einsum("knd,ckd->knc", qm, kc), NEG)  # [KVH,N,C]
            m_new = jnp.maximum(m, sc.max(-1))
            alpha = jnp.exp(m - m_new)
            pr = jnp.where(vis[None], jnp.exp(sc - m_new[..., None]), 0.0)
            vc = jnp.where(ok[:, None, None], vc, 0.0)  # select: 0 * NaN would be NaN
            return m_new, l * alpha + pr.sum(-1), o * alpha[..., None] + jnp.einsum("knc,ckd->knd", pr, vc)

        if p_cap <= c:
            carry = body(jnp.zeros((), jnp.int32), carry)
        else:
            first, end = chunk_range(plen.reshape(1), p_cap, c, q_pos, sliding_window)
            carry = jax.lax.fori_loop(first, jnp.maximum(first, end), body, carry)
    m, l, o = carry
    m = jnp.moveaxis(m.reshape(kvh, b, t, g), 0, 2)
    l = jnp.moveaxis(l.reshape(kvh, b, t, g), 0, 2)
    o = jnp.moveaxis(o.reshape(kvh, b, t, g, d), 0, 2)
    return m, l, o


def suffix_partial(q, suffix_k, suffix_v, suffix_lengths, prefix_len, k_new, v_new, block_mask,
                   q_pos, sliding_window=None, scale=None, key_chunk: int = KEY_CHUNK, layer=None,
                   cache_layout: str = "bskd"):
    """Per-row part: each row's suffix cache plus the block's own keys.

    Suffix slot j of row b sits at position ``prefix_len + j`` (``prefix_len`` scalar or ``[B]``). Returns ``m, l [B,T,KVH,G]``,
    ``o [B,T,KVH,G,D]``. The suffix is read through `jaxdec.attention.blockwise.cache_partial` (chunks up
    to the longest suffix only); ``layer``: ``suffix_k/suffix_v`` are a stacked ``[L,B,S,KVH,D]`` cache
    read at that layer. ``cache_layout`` "bksd": the suffixes are head-major (``[B,KVH,S,D]`` /
    ``[L,B,KVH,S,D]``, a `jaxdec.cache.kv.KVCache`'s buffers).
    """
    b, t, h, d = q.shape
    kvh = suffix_k.shape[-3] if cache_layout == "bksd" else suffix_k.shape[-2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kvh, g, d) * scale
    carry = block_partial(qg, k_new, v_new, block_mask, q_pos, sliding_window)
    return cache_partial(qg, suffix_k, suffix_v, suffix_lengths, carry, q_pos, kpos_offset=prefix_len,
                         sliding_window=sliding_window, key_chunk=key_chunk, layer=layer, cache_layout=cache_layout)


def merge_partials(parts):
    """Exact log-sum-exp merge of ``[(m, l, o), ...]`` -> normalised output ``[..., D]`` (zeros where
    no part saw a key)."""
    m = parts[0][0]
    for mi, _, _ in parts[1:]:
        m = jnp.maximum(m, mi)
    l_tot = 0.0
    o_tot = 0.0
    for mi, li, oi in parts:
        w = jnp.where(li > 0, jnp.exp(mi - m), 0.0)
        l_tot = l_tot + li * w
        o_tot = o_tot + oi * w[..., None]
    ok = l_tot > 0
    return jnp.where(ok[..., None], o_tot / jnp.where(ok, l_tot, 1.0)[..., None], 0.0)


def grouped_prefix_partial(q, prefix_k, prefix_v, prefix_len, q_pos, sliding_window=None, scale=None):
    """Prefix part with G prefixes: ``prefix_k/prefix_v [G,P,KVH,D]``, ``prefix_len [G]``; rows come
    in G contiguous groups of ``B // G`` (group g = rows ``g*B/G .. (g+1)*B/G - 1``), each group's
    queries batched against its own prefix. Returns what `prefix_partial` returns."""
    b = q.shape[0]
    g = prefix_k.shape[0]
    if b % g:
        raise ValueError(f"batch ({b}) must be a multiple of the number of prefix groups ({g})")
    per = lambda x: x.reshape((g, b // g) + x.shape[1:])
    m, l, o = jax.vmap(lambda qq, pk, pv, pl, qp: prefix_partial(qq, pk, pv, pl, qp, sliding_window, scale))(
        per(q), prefix_k, prefix_v, jnp.asarray(prefix_len).reshape(g), per(q_pos))
    unper = lambda x: x.reshape((b,) + x.shape[2:])
    return unper(m), unper(l), unper(o)


def hydragen_attend(q, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, suffix_lengths,
                    k_new, v_new, block_mask, q_pos, sliding_window: Optional[int] = None,
                    scale: Optional[float] = None, layer=None, cache_layout: str = "bskd"):
    """Shared-prefix attention; equals ``attend`` on the concatenated per-row caches.

    ``q [B,T,H,D]``; ``prefix_k/prefix_v [P,KVH,D]`` with ``prefix_len`` (scalar) valid entries shared
    by every row, or grouped ``[G,P,KVH,D]`` with ``prefix_len [G]`` (rows in G contiguous groups of
    B/G, each sharing its group's prefix: several prompts with n rows each); ``suffix_k/suffix_v
    [B,S,KVH,D]`` with ``suffix_lengths [B]``; ``k_new/v_new [B,T,KVH,D]``; ``block_mask [B,T,T]``;
    ``q_pos [B,T]``. Returns ``[B,T,H,D]``. ``layer`` (traced int): the suffixes are a model's stacked
    ``[L,B,S,KVH,D]`` cache, read at that layer chunk by chunk (no per-layer copy). ``cache_layout`` "bksd":
    the suffixes are head-major, ``[B,KVH,S,D]`` / ``[L,B,KVH,S,D]`` (a `jaxdec.cache.kv.KVCache`'s buffers).

    Both parts follow the committed lengths (`jaxdec.attention.blockwise`): the prefix is read up to
    ``max(prefix_len)``, the suffixes up to the longest suffix, in chunks.
    """
    b, t, h, d = q.shape
    grouped = prefix_k.ndim == 4
    if prefix_k.ndim not in (3, 4) or prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k/prefix_v must both be [P,KVH,D] or [G,P,KVH,D], got {prefix_k.shape}, "
                         f"{prefix_v.shape}")
    sfx_shape = suffix_k.shape if layer is None else suffix_k.shape[1:]
    want = "[B,KVH,S,D]" if cache_layout == "bksd" else "[B,S,KVH,D]"
    if len(sfx_shape) != 4 or suffix_k.shape != suffix_v.shape or sfx_shape[0] != b:
        raise ValueError(f"suffix_k/suffix_v must both be {want}, got {suffix_k.shape}, {suffix_v.shape}")
    kvh = prefix_k.shape[-2]
    if sfx_shape[1 if cache_layout == "bksd" else 2] != kvh or h % kvh or prefix_k.shape[-1] != d:
        raise ValueError(f"head layout mismatch: q {q.shape}, prefix {prefix_k.shape}, "
                         f"suffix {suffix_k.shape}")
    qf = q.astype(jnp.float32)
    if grouped:
        g = prefix_k.shape[0]
        if b % g:
            raise ValueError(f"batch ({b}) must be a multiple of the number of prefix groups ({g})")
        p1 = grouped_prefix_partial(qf, prefix_k, prefix_v, prefix_len, q_pos, sliding_window, scale)
        row_plen = jnp.repeat(jnp.asarray(prefix_len).reshape(g), b // g)
    else:
        p1 = prefix_partial(qf, prefix_k, prefix_v, prefix_len, q_pos, sliding_window, scale)
        row_plen = prefix_len
    p2 = suffix_partial(qf, suffix_k, suffix_v, suffix_lengths, row_plen, k_new, v_new, block_mask, q_pos,
                        sliding_window, scale, layer=layer, cache_layout=cache_layout)
    out = merge_partials([p1, p2])
    return out.reshape(b, t, h, d).astype(q.dtype)


def split_shared_prefix(k_cache, v_cache, lengths, prefix_len: int,
                        suffix_size: Optional[int] = None) -> Tuple[jax.Array, ...]:
    """Ordinary ragged cache ``[B,S,KVH,D]`` whose rows share their first ``prefix_len`` (static)
    entries -> ``(prefix_k, prefix_v, suffix_k, suffix_v, suffix_lengths)`` for `hydragen_attend`.
    The prefix is read from row 0 (callers guarantee the rows agree there)."""
    s = k_cache.shape[1]
    suffix_size = s - prefix_len if suffix_size is None else suffix_size
    if not 0 <= prefix_len <= s:
        raise ValueError(f"prefix_len {prefix_len} outside the cache (size {s})")
    sk = jax.lax.dynamic_slice_in_dim(jnp.pad(k_cache, ((0, 0), (0, suffix_size), (0, 0), (0, 0))),
                                      prefix_len, suffix_size, axis=1)
    sv = jax.lax.dynamic_slice_in_dim(jnp.pad(v_cache, ((0, 0), (0, suffix_size), (0, 0), (0, 0))),
                                      prefix_len, suffix_size, axis=1)
    return (k_cache[0, :prefix_len], v_cache[0, :prefix_len], sk, sv,
            jnp.maximum(lengths - prefix_len, 0).astype(jnp.int32))
