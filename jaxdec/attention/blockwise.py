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

``cache_layout="bksd"`` takes head-major caches (``[B,KVH,S,D]``, stacked ``[L,B,KVH,S,D]``): how the model's
`jaxdec.cache.kv.KVCache` stores them, so each chunk is read in place in the order the dots want (the default
"bskd" is `attend`'s layout).

The loop has a traced bound, so the function is forward-only (no reverse-mode derivative); code that
differentiates through attention uses ``attend`` (the model's ``attention_impl="reference"``).

With a sliding window the loop also starts late: chunks that lie wholly before every query's window
are skipped (the same rule as the Pallas tree-attention kernel's ``window_lo``).

The pieces are exposed for the other attention paths: `block_partial` (the block's own keys),
`cache_partial` (fold the committed chunks of a ragged cache into an online-softmax state; slot j of
row b may sit at position ``kpos_offset[b] + j``) and `finish`. Where they are used: `LlamaModel`'s
default "xla" attention (prefill chunks, decode steps, every verify block and tree mask, explicit
attention arrays via ``cache_mask``) and the shared-prefix (Hydragen) attention
`jaxdec.attention.hydragen.hydragen_attend` (its per-row suffixes through `cache_partial`, its shared
prefix through the same chunk loop bounded by the prefix length). The Pallas tree-attention kernel
follows the same rule in its own loop (``pallas_kernels/tree_attention.py``: cache blocks visited are
``[window_lo // block_k, cdiv(length, block_k))`` per row).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxdec.attention.reference import NEG

KEY_CHUNK = 512  # cache slots read per loop trip
# layout of the cache loop's scores and state: "head" ([B,KVH,T*G,C]: the dots' natural order; with the model's
# head-major cache no transposing copy is made per chunk: experiments/results/perf_notes.md section 6) or "token"
# ([B,T,KVH,G,C], the default until session 13). Both are tested against the reference; the golden outputs are
# the same with either (tests/test_golden.py, full tier, session 13).
CACHE_LAYOUT = "head"
LAYOUTS = ("token", "head")
# layout of the cache buffer itself: "bskd" ([B,S,KVH,D]) or "bksd" (head-major [B,KVH,S,D], what KVCache stores)
CACHE_LAYOUTS = ("bskd", "bksd")

__all__ = ["blockwise_attend", "block_partial", "cache_partial", "finish", "chunk_range", "KEY_CHUNK"]


def block_partial(qg, k_new, v_new, block_mask, q_pos, sliding_window=None):
    """Online-softmax state ``(m, l, o)`` of the block's own keys: ``qg [B,T,KVH,G,D]`` (float32, already
    scaled), ``k_new/v_new [B,T,KVH,D]``, ``block_mask [B,T,T]``. Returns ``m, l [B,T,KVH,G]``, ``o
    [B,T,KVH,G,D]``; a query that sees no block key has ``l == 0``."""
    f32 = jnp.float32
    sn = jnp.einsum("btkgd,bjkd->btkgj", qg, k_new.astype(f32))  # [B,T,KVH,G,T]
    mn = block_mask
    if sliding_window is not None:
        mn = mn & (q_pos[:, :, None] - q_pos[:, None, :] < sliding_window)
    visn = mn[:, :, None, None, :]
    sn = jnp.where(visn, sn, NEG)
    m = sn.max(-1)  # [B,T,KVH,G]
    pn = jnp.where(visn, jnp.exp(sn - m[..., None]), 0.0)
    return m, pn.sum(-1), jnp.einsum("btkgj,bjkd->btkgd", pn, v_new.astype(f32))


def chunk_range(lengths, size: int, c: int, q_pos=None, sliding_window=None, kpos_offset=0):
    """(first, end) chunk indices of the loop over a buffer of ``size`` slots read ``c`` at a time: ``end =
    ceil(max(lengths) / c)`` (the longest committed row), ``first`` = the first chunk holding a slot inside
    the sliding window of at least one query (0 without a window). Both traced int32 scalars."""
    n_max = -(-size // c)
    end = jnp.minimum((jnp.max(lengths) + c - 1) // c, n_max).astype(jnp.int32)
    if sliding_window is None or q_pos is None:
        return jnp.zeros((), jnp.int32), end
    off = jnp.broadcast_to(jnp.asarray(kpos_offset, jnp.int32).reshape(-1), (q_pos.shape[0],))
    lo = jnp.min(q_pos.astype(jnp.int32).min(axis=1) - off) - int(sliding_window) + 1  # first visible slot
    return (jnp.maximum(lo, 0) // c).astype(jnp.int32), end


def cache_partial(qg, k_cache, v_cache, lengths, carry, q_pos, *, kpos_offset=0, sliding_window=None,
                  cache_mask=None, key_chunk: int = KEY_CHUNK, layer=None, layout: Optional[str] = None,
                  cache_layout: str = "bskd"):
    """Fold the committed entries of a ragged cache ``k_cache/v_cache [B,S,KVH,D]`` (or a stacked
    ``[L,B,S,KVH,D]`` read at ``layer``) into the online-softmax state ``carry = (m, l, o)`` of queries
    ``qg [B,T,KVH,G,D]`` (float32, scaled). Row b holds ``lengths[b]`` entries; slot j sits at position
    ``kpos_offset + j`` (scalar or ``[B]``; used by the sliding window only). Chunks of ``key_chunk``
    slots are read by a loop over `chunk_range` (trip count from the lengths, not the buffer);
    ``cache_mask [B,T,S]`` optionally narrows the visible slots. Slots past a row's length never reach
    the state (scores and values are selected, never multiplied by 0). ``layout``: see `CACHE_LAYOUT`
    (None: that default). ``cache_layout``: "bskd" (``[B,S,KVH,D]``, stacked ``[L,B,S,KVH,D]``) or "bksd"
    (head-major ``[B,KVH,S,D]`` / ``[L,B,KVH,S,D]``, the layout of `jaxdec.cache.kv.KVCache`: each chunk is
    read as the dots want it, no transposing copy)."""
    b, t, kvh, g, d = qg.shape
    if cache_layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache_layout must be one of {CACHE_LAYOUTS}, got {cache_layout!r}")
    heads_major = cache_layout == "bksd"
    s = k_cache.shape[-2] if heads_major else k_cache.shape[-3]
    if s == 0:
        return carry
    layout = CACHE_LAYOUT if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "head":
        return _cache_partial_head(qg, k_cache, v_cache, lengths, carry, q_pos, kpos_offset, sliding_window,
                                   cache_mask, key_chunk, layer, heads_major)
    f32 = jnp.float32
    lengths = jnp.asarray(lengths, jnp.int32)
    c = min(int(key_chunk), s)
    n_max = -(-s // c)
    ar = jnp.arange(c, dtype=jnp.int32)
    off = None
    if sliding_window is not None:
        off = jnp.asarray(kpos_offset, jnp.int32)
        off = off.reshape(-1, 1, 1) if off.ndim else off

    def body(i, carry):
        m, l, o = carry
        lo = i * c
        start = jnp.minimum(lo, s - c)  # the last chunk may overlap the one before: skip the overlap
        kc, vc = _read_chunk(k_cache, start, c, layer, heads_major), _read_chunk(v_cache, start, c, layer, heads_major)
        kpos = start + ar  # [C] slot index
        slot_ok = (kpos >= lo)[None, :] & (kpos[None, :] < lengths[:, None])  # [B,C]
        vis = jnp.broadcast_to(slot_ok[:, None, :], (b, t, c))
        if cache_mask is not None:
            vis = vis & jax.lax.dynamic_slice_in_dim(cache_mask, start, c, axis=2)
        if sliding_window is not None:
            vis = vis & (q_pos[:, :, None] - (off + kpos[None, None, :]) < sliding_window)
        vis5 = vis[:, :, None, None, :]
        sc = jnp.einsum("btkgd,bkcd->btkgc" if heads_major else "btkgd,bckd->btkgc", qg, kc)
        sc = jnp.where(vis5, sc, NEG)
        m_new = jnp.maximum(m, sc.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(vis5, jnp.exp(sc - m_new[..., None]), 0.0)
        ok_v = slot_ok[:, None, :, None] if heads_major else slot_ok[:, :, None, None]
        vc = jnp.where(ok_v, vc, 0.0)  # select: 0 * NaN would be NaN
        l = l * alpha + p.sum(-1)
        o = o * alpha[..., None] + jnp.einsum("btkgc,bkcd->btkgd" if heads_major else "btkgc,bckd->btkgd", p, vc)
        return m_new, l, o

    if n_max == 1:  # the whole cache is one chunk: no loop (a short decode costs what it did)
        return body(jnp.zeros((), jnp.int32), carry)
    first, end = chunk_range(lengths, s, c, q_pos, sliding_window, kpos_offset)
    return jax.lax.fori_loop(first, jnp.maximum(first, end), body, carry)


def _cache_partial_head(qg, k_cache, v_cache, lengths, carry, q_pos, kpos_offset, sliding_window, cache_mask,
                        key_chunk, layer, heads_major):
    """`cache_partial` in head-major layout: queries ``[B,KVH,T*G,D]``, each chunk's keys/values as
    ``[B,KVH,C,D]`` (swapped unless the cache is head-major), state ``[B,KVH,N(,D)]`` (row n = t*G + g). The
    scores are computed key-major, ``[B,KVH,C,N]`` (``K.q^T``: the chunk's C keys are the dot's long side; the
    ``q.K^T`` orientation, with the few query rows of a KV head as M, ran at about half speed on XLA:CPU,
    perf_notes section 6), the softmax reduces over C, and the probabilities are turned to ``[N,C]`` (small)
    for the value dot, whose batch axes are merged."""
    b, t, kvh, g, d = qg.shape
    s = k_cache.shape[-2] if heads_major else k_cache.shape[-3]
    n_rows = t * g
    f32 = jnp.float32
    lengths = jnp.asarray(lengths, jnp.int32)
    c = min(int(key_chunk), s)
    n_max = -(-s // c)
    ar = jnp.arange(c, dtype=jnp.int32)
    to_head = lambda x: jnp.moveaxis(x, 2, 1).reshape((b, kvh, n_rows) + x.shape[4:])  # noqa: E731
    qh = to_head(qg)
    state = tuple(to_head(x) for x in carry)
    qpos_rows = None
    if sliding_window is not None:
        off = jnp.asarray(kpos_offset, jnp.int32)
        off = off.reshape(-1, 1, 1) if off.ndim else off
        qpos_rows = jnp.repeat(q_pos.astype(jnp.int32), g, axis=1)[:, None, None, :] - off[..., None]  # [B,1,1,N]

    def read(buf, start):  # -> [B,KVH,C,D]
        x = _read_chunk(buf, start, c, layer, heads_major)
        return x if heads_major else jnp.swapaxes(x, 1, 2)

    def body(i, st):
        m, l, o = st
        lo = i * c
        start = jnp.minimum(lo, s - c)
        kc, vc = read(k_cache, start), read(v_cache, start)
        kpos = start + ar
        slot_ok = (kpos >= lo)[None, :] & (kpos[None, :] < lengths[:, None])  # [B,C]
        vis = slot_ok[:, None, :, None]  # [B,1,C,1]
        if cache_mask is not None:
            cm = jax.lax.dynamic_slice_in_dim(cache_mask, start, c, axis=2)  # [B,T,C]
            vis = vis & jnp.swapaxes(jnp.repeat(cm, g, axis=1), 1, 2)[:, None]  # [B,1,C,N]
        if sliding_window is not None:
            vis = vis & (qpos_rows - kpos[None, None, :, None] < sliding_window)
        sc = jnp.einsum("bkcd,bknd->bkcn", kc, qh)  # key-major scores [B,KVH,C,N]
        sc = jnp.where(vis, sc, NEG)
        m_new = jnp.maximum(m, sc.max(-2))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(sc - m_new[:, :, None, :]), 0.0)
        vc = jnp.where(slot_ok[:, None, :, None], vc, 0.0)  # select: 0 * NaN would be NaN
        pv = jnp.einsum("bnc,bcd->bnd", jnp.swapaxes(p, -1, -2).reshape(b * kvh, n_rows, c),
                        vc.reshape(b * kvh, c, d)).reshape(b, kvh, n_rows, d)
        return m_new, l * alpha + p.sum(-2), o * alpha[..., None] + pv

    if n_max == 1:
        state = body(jnp.zeros((), jnp.int32), state)
    else:
        first, end = chunk_range(lengths, s, c, q_pos, sliding_window, kpos_offset)
        state = jax.lax.fori_loop(first, jnp.maximum(first, end), body, state)
    back = lambda x: jnp.moveaxis(x.reshape((b, kvh, t, g) + x.shape[3:]), 1, 2)  # noqa: E731
    return tuple(back(x) for x in state)


def _read_chunk(buf, start, c: int, layer, heads_major: bool):
    """Slots ``start .. start + c - 1`` of a cache buffer as float32: ``[B,KVH,C,D]`` from a head-major buffer
    (``[B,KVH,S,D]``, or ``[L,B,KVH,S,D]`` read at ``layer``), else ``[B,C,KVH,D]``. A slice of the buffer in
    its own layout (no copy of the layer)."""
    axis = 2 if heads_major else 1
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(buf, start, c, axis=axis).astype(jnp.float32)
    z = jnp.zeros((), jnp.int32)
    idx = [jnp.asarray(layer, jnp.int32), z, z, z, z]
    idx[axis + 1] = start
    size = list(buf.shape)
    size[0], size[axis + 1] = 1, c
    return jax.lax.dynamic_slice(buf, tuple(idx), tuple(size))[0].astype(jnp.float32)


def finish(m, l, o):
    """Normalise an online-softmax state; a query that saw no key (``l == 0``) outputs zeros."""
    ok = (l > 0)[..., None]
    return jnp.where(ok, o / jnp.where(ok, l[..., None], 1.0), 0.0)


def blockwise_attend(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos,
                     sliding_window: Optional[int] = None, scale: Optional[float] = None, cache_mask=None,
                     key_chunk: int = KEY_CHUNK, layer=None, layout: Optional[str] = None,
                     cache_layout: str = "bskd"):
    """See the module docstring. ``layer`` (a traced int): ``k_cache/v_cache`` are a model's whole
    stacked cache ``[L,B,S,KVH,D]`` and layer ``layer`` is read, chunk by chunk, straight from the stack
    (no per-layer copy of the cache enters the loop). ``layout``: the cache loop's layout (`CACHE_LAYOUT`).
    ``cache_layout``: "bskd" (the shapes above) or "bksd" (head-major ``[B,KVH,S,D]`` / ``[L,B,KVH,S,D]``, how
    `jaxdec.cache.kv.KVCache` stores its buffers)."""
    b, t, h, d = q.shape
    kvh = k_cache.shape[-3] if cache_layout == "bksd" else k_cache.shape[-2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kvh, g, d) * scale
    carry = block_partial(qg, k_new, v_new, block_mask, q_pos, sliding_window)
    carry = cache_partial(qg, k_cache, v_cache, lengths, carry, q_pos, sliding_window=sliding_window,
                          cache_mask=cache_mask, key_chunk=key_chunk, layer=layer, layout=layout,
                          cache_layout=cache_layout)
    return finish(*carry).reshape(b, t, h, d).astype(q.dtype)
