"""Pallas tree attention: a block of T new tokens over a ragged KV cache plus the block itself.

``tree_attention`` has exactly the signature and semantics of the jnp reference
``jaxdec.attention.reference.attend`` (which is this kernel's reference implementation):

* ``q [B,T,H,D]`` queries of the block's T tokens;
* ``k_cache, v_cache [B,S,KVH,D]`` a ragged cache, row b holding ``lengths[b]`` committed entries
  (cache key j sits at position j; slots ``>= lengths[b]`` are never read into the result, even if
  they hold NaN);
* ``k_new, v_new [B,T,KVH,D]`` the block's own keys/values, visible through ``block_mask [B,T,T]``
  (bool; query i may see block key j: causal for a chain, ancestor-or-self for a tree, see
  :func:`tree_mask_from_parents`);
* ``q_pos [B,T]`` the positions of the block's tokens (used by the sliding window only);
* ``sliding_window``: optional static int; key at position p is visible to a query at position
  ``qp`` only when ``qp - p < sliding_window`` (both for cache and block keys);
* ``scale``: static float, default ``D ** -0.5``;
* GQA: query head h reads KV head ``h // (H // KVH)``.
A query that sees no key outputs zeros. Output ``[B,T,H,D]`` in ``q.dtype``.

Kernel design (flash-decoding style)
------------------------------------
Grid ``(B, KVH, row_blocks, num_splits)``. The G = H // KVH query heads of one KV head and the T
block tokens are flattened into ``R = T*G`` query rows (row ``t*G + g``), padded to a multiple of
``block_r``; each program owns ``block_r`` rows of one (batch row, KV head), so a KV block is loaded
once for all heads that share it. Each program keeps an online-softmax state (running max ``m``,
normaliser ``l``, unnormalised accumulator ``acc``, all float32) and

1. (split 0 only) folds in the block's own keys in chunks of ``block_t`` under the
   (row-expanded) block mask, with the sliding window already folded into that mask;
2. loops (``lax.fori_loop`` with a dynamic trip count) over cache blocks of ``block_k`` keys,
   visiting only blocks that can hold a visible key: ``[lo // block_k, cdiv(min(len, S), block_k))``
   where ``lo`` is the first key position inside every query's sliding window. This is the lengths
   rule every attention path follows (`jaxdec.attention.blockwise`: the loop bound comes from the
   committed lengths, never from the buffer); the kernel applies it per batch row, and the test hook
   ``_count_blocks`` reports the blocks each program visited. The cache is
   never padded or copied when ``S >= block_k``: the last block is read at start ``S - block_k``
   and the keys it shares with the previous block are masked out. Values of masked slots are
   zeroed with ``where`` before the ``p @ v`` product, so NaN/garbage in unused slots cannot leak.

With ``num_splits > 1`` the cache blocks are divided into contiguous chunks over the last grid axis
(flash-decoding's split-K, useful when ``B * KVH`` is small and ``S`` long); every split writes its
partial ``(acc, m, l)`` and a small jnp epilogue merges them. With one split the kernel normalises
and writes the output directly.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


__all__ = [
    "tree_attention",
    "tree_mask_from_parents",
    "is_valid_tree",
    "reference_attention",
    "default_interpret",
]


def reference_attention(*args, **kwargs):
    """The kernel's reference: ``jaxdec.attention.reference.attend`` (same arguments)."""
    from jaxdec.attention.reference import attend
    return attend(*args, **kwargs)


def default_interpret() -> bool:
    """Pallas interpret mode is the default when JAX's default backend is the CPU."""
    return jax.default_backend() == "cpu"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(n: int, cap: int) -> int:
    """Tile size for an axis of n items: a power of two >= 16, at most ``cap`` (also a power of 2)."""
    return min(cap, max(16, _next_pow2(n)))


# ----------------------------------------------------------------------------------------------
# Kernel building blocks (shared with quantized_kv_attention)
# ----------------------------------------------------------------------------------------------

def _precision(dtype):
    # float32 operands: ask for full-precision products (on GPU otherwise TF32 would be used).
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def dot_nt(a, b):
    """``a [M,K] @ b[N,K]^T`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """``a [M,K] @ b[K,N]`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def softmax_step(m, l, s, visible):
    """Online-softmax bookkeeping for one block of scores.

    m, l [R,1] f32 running max / normaliser; s [R,N] f32 scores; visible [R,N] bool.
    Returns (m_new, l_new, corr, p): the caller rescales its accumulators by ``corr`` and adds
    ``p @ v``. Masked scores never enter ``m`` and their probabilities are exactly 0, as in the
    reference, so a row with no visible key keeps ``l == 0``.
    """
    # imported here, not at module level: importing any jaxdec module runs jaxdec/__init__, whose imports
    # reach cache/quantized.py and back into pallas_kernels (an import loop; tests/test_layering.py)
    from jaxdec.masks import ATTENTION_MASK_VALUE
    s = jnp.where(visible, s, ATTENTION_MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    corr = jnp.exp(m - m_new)
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    l_new = corr * l + jnp.sum(p, axis=1, keepdims=True)
    return m_new, l_new, corr, p


def pv(p, v):
    """``p [R,N] f32 @ v [N,D]`` (p cast to v's dtype for low-precision values)."""
    return dot_nn(p if v.dtype == jnp.float32 else p.astype(v.dtype), v)


def online_update(carry, s, visible, v):
    """One online-softmax step on carry = (acc [R,D], m [R,1], l [R,1]) (all float32).

    ``v [N,D]``: the caller has already zeroed rows that no query may see (0 * NaN = NaN).
    """
    acc, m, l = carry
    m_new, l_new, corr, p = softmax_step(m, l, s, visible)
    return corr * acc + pv(p, v), m_new, l_new


def init_state(rows: int, d: int):
    from jaxdec.masks import ATTENTION_MASK_VALUE  # here, not at import (see softmax_step)
    return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows, 1), ATTENTION_MASK_VALUE, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))


def finalize(acc, l):
    """Normalise; a row that saw no key (l == 0) outputs zeros."""
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def block_part(q, kn_ref, vn_ref, mask_ref, carry, n_chunks, block_t):
    """Fold the block's own keys (chunks of ``block_t`` along T) into the state."""
    def body(c, carry):
        ts = pl.multiple_of(c * block_t, block_t)
        kn = kn_ref[pl.ds(ts, block_t), :]
        vn = vn_ref[pl.ds(ts, block_t), :]
        vis = mask_ref[:, pl.ds(ts, block_t)] != 0
        s = dot_nt(q.astype(kn.dtype), kn)
        return online_update(carry, s, vis, vn)
    return lax.fori_loop(0, n_chunks, body, carry)


def prepare_rows(q, k_new, v_new, block_mask, q_pos, sliding_window, block_r, block_t):
    """Layout plumbing shared by the kernels.

    Returns (q_rows [B,KVH,Rp,D], kn [B,Tp,KVH,D], vn [B,Tp,KVH,D], mask_rows int32 [B,Rp,Tp],
    qpos_rows int32 [B,Rp,1], br, bt, Rp, Tp). Row ``t*G + g`` is query token t, head g of the group.
    The sliding window of the block part is folded into ``mask_rows``.
    """
    b, t, h, d = q.shape
    kvh = k_new.shape[2]
    g = h // kvh
    r = t * g
    br = _tile(r, block_r)
    bt = _tile(t, block_t)
    rp, tp = _round_up(r, br), _round_up(t, bt)
    qr = q.reshape(b, t, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, r, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
    kn = jnp.pad(k_new, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    vn = jnp.pad(v_new, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    mn = block_mask != 0 if block_mask.dtype != jnp.bool_ else block_mask
    q_pos = q_pos.astype(jnp.int32)
    if sliding_window is not None:
        mn = mn & (q_pos[:, :, None] - q_pos[:, None, :] < sliding_window)
    mrows = jnp.repeat(mn, g, axis=1).astype(jnp.int32)  # [B,R,T]
    mrows = jnp.pad(mrows, ((0, 0), (0, rp - r), (0, tp - t)))
    prow = jnp.pad(jnp.repeat(q_pos, g, axis=1), ((0, 0), (0, rp - r)))[:, :, None]
    return qr, kn, vn, mrows, prow, br, bt, rp, tp


def window_lo(q_pos, sliding_window):
    """First key position inside the window of at least one query, per batch row ([B] int32)."""
    if sliding_window is None:
        return jnp.zeros((q_pos.shape[0],), jnp.int32)
    lo = jnp.min(q_pos.astype(jnp.int32), axis=1) - sliding_window + 1
    return jnp.maximum(lo, 0).astype(jnp.int32)


def rows_to_heads(o, b, t, kvh, g, d):
    """[B,KVH,Rp,D] -> [B,T,H,D]."""
    o = o[:, :, :t * g].reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, t, kvh * g, d)


# ----------------------------------------------------------------------------------------------
# tree attention kernel
# ----------------------------------------------------------------------------------------------

def _tree_kernel(bounds_ref, qpos_ref, q_ref, kc_ref, vc_ref, kn_ref, vn_ref, mask_ref, *rest,
                 scale, block_k, block_t, n_t_chunks, seq_len, window, blocks_per_split, n_poison,
                 count_blocks=False):
    out_refs = rest[n_poison:]
    if count_blocks:  # test hook: the number of cache blocks this program's loop visited
        out_refs, count_ref = out_refs[:-1], out_refs[-1]
    split = pl.program_id(3)
    q = q_ref[...].astype(jnp.float32) * scale  # [br, D]
    carry = init_state(q.shape[0], q.shape[1])

    # 1. the block's own keys (tree / causal mask), done by split 0 only.
    carry = block_part(q, kn_ref, vn_ref, mask_ref, carry,
                       jnp.where(split == 0, n_t_chunks, 0), block_t)

    # 2. the cache, blocks of block_k keys, only blocks that can hold a visible key.
    lo = bounds_ref[0]
    hi = bounds_ref[1]  # = clip(lengths[b], 0, S)
    first = jnp.maximum(split * blocks_per_split, lo // block_k)
    last = jnp.minimum((split + 1) * blocks_per_split, (hi + block_k - 1) // block_k)
    qpos = qpos_ref[...]  # [br, 1]
    cols = jnp.arange(block_k, dtype=jnp.int32)

    def body(i, carry):
        if count_blocks:
            carry, visited = carry
        start = i * block_k
        ks = jnp.minimum(start, seq_len - block_k)  # last block overlaps the previous one
        kpos = ks + cols
        ok = (kpos >= start) & (kpos < hi)  # [bk]: fresh and committed
        k = kc_ref[pl.ds(ks, block_k), :]
        v = vc_ref[pl.ds(ks, block_k), :]
        v = jnp.where(ok[:, None], v, jnp.zeros_like(v))  # NaN in unused slots must not leak
        s = dot_nt(q.astype(k.dtype), k)
        vis = ok[None, :]
        if window is not None:
            vis = vis & (qpos - kpos[None, :] < window)
        new = online_update(carry, s, vis, v)
        return (new, visited + 1) if count_blocks else new

    if count_blocks:
        (acc, m, l), visited = lax.fori_loop(first, jnp.maximum(first, last), body, (carry, jnp.zeros((), jnp.int32)))
        count_ref[...] = jnp.full(count_ref.shape, visited, jnp.int32)
    else:
        acc, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, carry)
    if len(out_refs) == 1:
        o_ref, = out_refs
        o_ref[...] = finalize(acc, l).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def _check_inputs(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos):
    if q.ndim != 4:
        raise ValueError(f"q must be [B,T,H,D], got shape {q.shape}")
    b, t, h, d = q.shape
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [B,S,KVH,D], got {k_cache.shape} and "
                         f"{v_cache.shape}")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"cache shape {k_cache.shape} does not match q shape {q.shape}")
    kvh = k_cache.shape[2]
    if kvh == 0 or h % kvh:
        raise ValueError(f"query heads H={h} must be a multiple of KV heads KVH={kvh}")
    if k_new.shape != (b, t, kvh, d) or v_new.shape != (b, t, kvh, d):
        raise ValueError(f"k_new/v_new must be [B,T,KVH,D]={(b, t, kvh, d)}, got {k_new.shape} "
                         f"and {v_new.shape}")
    if block_mask.shape != (b, t, t):
        raise ValueError(f"block_mask must be [B,T,T]={(b, t, t)}, got {block_mask.shape}")
    if q_pos.shape != (b, t):
        raise ValueError(f"q_pos must be [B,T]={(b, t)}, got {q_pos.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]={(b,)}, got {lengths.shape}")


@functools.partial(jax.jit, static_argnames=("sliding_window", "scale", "block_k", "block_r",
                                             "block_t", "num_splits", "interpret", "poison",
                                             "count_blocks"))
def _tree_attention(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos, *,
                    sliding_window, scale, block_k, block_r, block_t, num_splits, interpret,
                    poison, count_blocks=False):
    b, t, h, d = q.shape
    s = k_cache.shape[1]
    kvh = k_cache.shape[2]
    g = h // kvh
    qr, kn, vn, mrows, prow, br, bt, rp, tp = prepare_rows(
        q, k_new, v_new, block_mask, q_pos, sliding_window, block_r, block_t)

    bk = block_k
    if s < bk:  # tiny cache: pad it to one block (a copy of fewer than block_k slots per row)
        pad = ((0, 0), (0, bk - s), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    seq_len = max(s, bk)
    n_blocks = -(-seq_len // bk)
    splits = max(1, min(num_splits, n_blocks))
    bps = -(-n_blocks // splits)

    hi = jnp.clip(lengths.astype(jnp.int32), 0, s)
    bounds = jnp.stack([window_lo(q_pos, sliding_window), hi], axis=1)  # [B,2]

    grid = (b, kvh, rp // br, splits)
    in_specs = [
        pl.BlockSpec((None, 2), lambda i, j, r, c: (i, 0)),                     # bounds
        pl.BlockSpec((None, br, 1), lambda i, j, r, c: (i, r, 0)),              # q positions
        pl.BlockSpec((None, None, br, d), lambda i, j, r, c: (i, j, r, 0)),     # q rows
        pl.BlockSpec((None, seq_len, None, d), lambda i, j, r, c: (i, 0, j, 0)),  # k cache
        pl.BlockSpec((None, seq_len, None, d), lambda i, j, r, c: (i, 0, j, 0)),  # v cache
        pl.BlockSpec((None, tp, None, d), lambda i, j, r, c: (i, 0, j, 0)),     # k new
        pl.BlockSpec((None, tp, None, d), lambda i, j, r, c: (i, 0, j, 0)),     # v new
        pl.BlockSpec((None, br, tp), lambda i, j, r, c: (i, r, 0)),             # block mask rows
    ]
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((b, kvh, rp, d), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, br, d), lambda i, j, r, c: (i, j, r, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((b, kvh, splits, rp, d), jnp.float32),
                     jax.ShapeDtypeStruct((b, kvh, splits, rp, 1), jnp.float32),
                     jax.ShapeDtypeStruct((b, kvh, splits, rp, 1), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, br, d), lambda i, j, r, c: (i, j, c, r, 0)),
                     pl.BlockSpec((None, None, None, br, 1), lambda i, j, r, c: (i, j, c, r, 0)),
                     pl.BlockSpec((None, None, None, br, 1), lambda i, j, r, c: (i, j, c, r, 0))]
    args = [bounds, prow, qr, k_cache, v_cache, kn, vn, mrows]
    aliases = {}
    if poison:  # test hook: outputs start as NaN and must be fully overwritten
        for n, (shp, spec) in enumerate(zip(out_shape, out_specs)):
            aliases[len(args)] = n
            args.append(jnp.full(shp.shape, jnp.nan, shp.dtype))
            in_specs.append(spec)
    if count_blocks:
        out_shape = out_shape + [jax.ShapeDtypeStruct((b, kvh, rp // br, splits, 1), jnp.int32)]
        out_specs = out_specs + [pl.BlockSpec((None, None, None, None, 1), lambda i, j, r, c: (i, j, r, c, 0))]
    kernel = functools.partial(
        _tree_kernel, scale=float(scale), block_k=bk, block_t=bt, n_t_chunks=tp // bt,
        seq_len=seq_len, window=sliding_window, blocks_per_split=bps,
        n_poison=len(aliases), count_blocks=count_blocks)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        input_output_aliases=aliases, interpret=interpret, name="tree_attention",
    )(*args)
    counts = None
    if count_blocks:
        outs, counts = outs[:-1], outs[-1][..., 0].sum(axis=3)  # [B,KVH,row blocks]: blocks over all splits
    if splits == 1:
        o = outs[0]
    else:  # merge the splits' partial softmax states
        acc, m, l = outs
        m_all = jnp.max(m, axis=2, keepdims=True)
        w = jnp.where(l > 0, jnp.exp(m - m_all), 0.0)
        o = finalize(jnp.sum(w * acc, axis=2), jnp.sum(w * l, axis=2)).astype(q.dtype)
    out = rows_to_heads(o, b, t, kvh, g, d)
    return (out, counts) if count_blocks else out


def tree_attention(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos,
                   sliding_window: Optional[int] = None, scale: Optional[float] = None, *,
                   block_k: int = 128, block_r: int = 64, block_t: int = 64,
                   num_splits: int = 1, interpret: Optional[bool] = None,
                   _poison_output: bool = False, _count_blocks: bool = False):
    """Attention of a block of T tokens over a ragged cache plus the block (Pallas kernel).

    Same arguments and result as ``jaxdec.attention.reference.attend`` (see the module docstring
    for shapes). Keyword-only tuning: ``block_k`` cache keys per inner step, ``block_r`` query rows
    (T*G flattened) per program, ``block_t`` block keys per step (all powers of two >= 16 for GPU),
    ``num_splits`` split-K factor over the cache, ``interpret`` (default: True on a CPU backend).
    ``_count_blocks`` (test hook): also return ``[B,KVH,row blocks]`` int32, the number of cache blocks
    each program's loop visited (summed over splits): the lengths rule says ``cdiv(length, block_k)``
    minus the blocks before every query's window, whatever the cache size.
    """
    q, k_cache, v_cache = jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache)
    k_new, v_new = jnp.asarray(k_new), jnp.asarray(v_new)
    lengths, block_mask, q_pos = jnp.asarray(lengths), jnp.asarray(block_mask), jnp.asarray(q_pos)
    _check_inputs(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos)
    for name, val in (("block_k", block_k), ("block_r", block_r), ("block_t", block_t)):
        if not isinstance(val, (int, np.integer)) or val < 1 or val & (val - 1):
            raise ValueError(f"{name} must be a positive power of two, got {val!r}")
    if not isinstance(num_splits, (int, np.integer)) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if sliding_window is not None:
        if isinstance(sliding_window, jax.core.Tracer):
            raise ValueError("sliding_window must be a static Python int (or None)")
        sliding_window = int(min(int(sliding_window), 2 ** 30))
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _tree_attention(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos,
                           sliding_window=sliding_window, scale=scale, block_k=int(block_k),
                           block_r=int(block_r), block_t=int(block_t),
                           num_splits=int(num_splits), interpret=interpret,
                           poison=bool(_poison_output), count_blocks=bool(_count_blocks))


# ----------------------------------------------------------------------------------------------
# tree masks
# ----------------------------------------------------------------------------------------------

def is_valid_tree(parents) -> jax.Array:
    """Traceable check: per tree (leading dims), every ``parents[i]`` is -1 or in ``[0, i)``."""
    p = jnp.asarray(parents)
    idx = jnp.arange(p.shape[-1])
    return jnp.all((p == -1) | ((p >= 0) & (p < idx)), axis=-1)


def tree_mask_from_parents(parents) -> jax.Array:
    """Ancestor-or-self mask of a token tree given as parent indices.

    ``parents [T]`` or ``[B,T]`` int: ``parents[i]`` is the index of node i's parent inside the
    block, or -1 for a root (a node that attaches directly to the cache). Nodes are in topological
    order, so a valid parent index satisfies ``-1 <= parents[i] < i``. Returns bool ``[T,T]`` or
    ``[B,T,T]``: ``mask[..., i, j]`` is True iff j is i or an ancestor of i. A chain
    ``parents = [-1, 0, 1, ...]`` gives the causal mask.

    Concrete (non-traced) input is validated and a ValueError ("tree mask not a valid tree")
    names the first offending node. Traced input (under ``jit``) cannot raise; check it with
    :func:`is_valid_tree` — an invalid entry then yields a mask that is not a tree.
    """
    if not isinstance(parents, jax.core.Tracer):
        pn = np.asarray(parents)
        if pn.ndim not in (1, 2):
            raise ValueError(f"tree mask not a valid tree: parents must be [T] or [B,T], got "
                             f"shape {pn.shape}")
        if pn.size and not np.issubdtype(pn.dtype, np.integer):
            raise ValueError(f"tree mask not a valid tree: parents must be integers, got "
                             f"{pn.dtype}")
        idx = np.arange(pn.shape[-1])
        bad = ~((pn == -1) | ((pn >= 0) & (pn < idx)))
        if bad.any():
            where = tuple(int(x) for x in np.argwhere(bad)[0])
            node = where[-1]
            raise ValueError(
                f"tree mask not a valid tree: node {node} (at index {where}) has parent "
                f"{int(pn[where])}; each parent must be -1 (root) or an earlier node in "
                f"[0, {node})")
    p = jnp.asarray(parents).astype(jnp.int32)
    t = p.shape[-1]
    idx = jnp.arange(t, dtype=jnp.int32)
    m = (p[..., :, None] == idx) | (idx[:, None] == idx)  # self + parent edge
    for _ in range(max(0, math.ceil(math.log2(max(t, 1))))):  # transitive closure by squaring
        mi = m.astype(jnp.int32)
        m = m | (jnp.matmul(mi, mi) > 0)
    return m
