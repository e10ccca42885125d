"""KIVI-layout quantized KV cache and a Pallas attention kernel that dequantizes inside.

Layout (KIVI: keys per-channel, values per-token, plus a full-precision recent window)
--------------------------------------------------------------------------------------
For a cache of ``Sq`` quantized slots (``Sq`` a multiple of ``key_group``), ``KVH`` KV heads and
head dim ``D``:

* ``k_codes [B,Sq,KVH,Dc] uint8`` and ``v_codes [B,Sq,KVH,Dc] uint8``: unsigned codes in
  ``[0, 2**bits - 1]``. ``bits=8``: one code per byte, ``Dc = D``. ``bits=4``: two codes per byte,
  ``Dc = D/2``, in *half-split* layout: byte j holds channel j in its low nibble and channel
  ``j + D/2`` in its high nibble (so unpacking never interleaves lanes).
* keys, per channel: every ``key_group`` consecutive tokens share, per (KV head, channel), one
  ``k_scale``/``k_min``: ``[B,Sq/key_group,KVH,D] float32``. ``k = code * k_scale + k_min``.
* values, per token: every ``value_group`` consecutive channels of one token share one
  ``v_scale``/``v_min``: ``[B,Sq,KVH,D/value_group] float32``.
* ``q_lengths [B]``: row b's quantized tokens are positions ``[0, q_lengths[b])``.
* ``k_res, v_res [B,R,KVH,D]`` (full precision) with ``res_lengths [B]``: the most recent tokens,
  residual slot i sitting at position ``q_lengths[b] + i``. Row b has ``q_lengths + res_lengths``
  tokens in all.

Quantization is asymmetric min/max: ``scale = (max - min) / (2**bits - 1)``,
``code = clip(round((x - min) / scale))``, so ``|x - dequant(x)| <= scale / 2`` (up to float
rounding). Supported widths: 4 and 8 bits.

Attention (``quantized_kv_attention``) has the block interface of
``jaxdec.attention.reference.attend`` with the ragged cache replaced by a ``QuantizedKVCache``:
``q [B,T,H,D]``, the block's own ``k_new, v_new [B,T,KVH,D]``, ``block_mask [B,T,T]``,
``q_pos [B,T]``, optional static ``sliding_window`` and ``scale``; GQA ``h -> h // (H/KVH)``; a
query that sees no key outputs zeros. Its reference, ``reference_quantized_attention``, dequantizes
the whole cache, lays quantized and residual tokens out contiguously and calls ``attend``.

Kernel: grid ``(B, KVH, row_blocks)`` with the ``T*G`` query rows of one KV head per program (as in
``tree_attention``); three online-softmax phases: the block's own keys; the quantized cache in
steps of one key group (``key_group`` tokens: the per-channel key scale/min is then a single row
vector for the step, applied to the codes by broadcasting; per-token value scales are spread over
their channels by exact selects, so the kernel's dequantized values equal the reference's); the
residual window in steps of ``block_res`` tokens. Only
steps that can hold a visible key are visited (lengths and sliding window), and values of
invisible slots are zeroed before ``p @ v``, so garbage/NaN in unused slots never leaks.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.tree_attention import (
    _check_inputs, default_interpret, dot_nt, finalize, init_state, pv,
    prepare_rows, rows_to_heads, softmax_step, window_lo,
)

__all__ = [
    "QuantizedKVCache", "SUPPORTED_BITS",
    "quantize_keys_per_channel", "dequantize_keys",
    "quantize_values_per_token", "dequantize_values",
    "pack_int4", "unpack_int4", "quantize_kv_cache",
    "reference_quantized_attention", "quantized_kv_attention",
]

SUPPORTED_BITS = (4, 8)


# ----------------------------------------------------------------------------------------------
# quantization helpers
# ----------------------------------------------------------------------------------------------

def _check_bits(bits):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_group(group_size, extent, what):
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if extent % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {what} ({extent})")


def pack_int4(codes):
    """``codes [...,D]`` in [0,15] -> ``uint8 [...,D/2]``, half-split (low nibble: channel j,
    high nibble: channel j + D/2)."""
    d = codes.shape[-1]
    if d % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {d}")
    c = codes.astype(jnp.uint8)
    return c[..., : d // 2] | (c[..., d // 2:] << 4)


def unpack_int4(packed):
    """Inverse of :func:`pack_int4`: ``uint8 [...,D/2]`` -> ``uint8 [...,D]``."""
    return jnp.concatenate([packed & 15, packed >> 4], axis=-1)


def _minmax_quantize(x, axis, bits):
    """Asymmetric quantization with one (scale, min) per slice reduced over ``axis``."""
    x = x.astype(jnp.float32)
    qmax = 2 ** bits - 1
    mn = jnp.min(x, axis=axis, keepdims=True)
    mx = jnp.max(x, axis=axis, keepdims=True)
    scale = (mx - mn) / qmax
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round((x - mn) / safe), 0, qmax).astype(jnp.uint8)
    return codes, scale, mn


def quantize_keys_per_channel(k, *, bits: int, group_size: int):
    """Per-channel key quantization (KIVI).

    ``k [B,S,KVH,D]`` -> ``(codes [B,S,KVH,Dc] uint8, scale [B,S/G,KVH,D] f32,
    min [B,S/G,KVH,D] f32)`` where G = ``group_size`` consecutive tokens share one scale/min per
    channel and ``Dc = D`` (8 bits) or ``D/2`` (4 bits, packed). ValueError unless bits is 4 or 8
    and G divides S.
    """
    _check_bits(bits)
    b, s, kvh, d = k.shape
    _check_group(group_size, s, "token axis (S) of the keys")
    if bits == 4 and d % 2:
        raise ValueError(f"4-bit packing needs an even head dim, got D={d}")
    kg = k.reshape(b, s // group_size, group_size, kvh, d)
    codes, scale, mn = _minmax_quantize(kg, 2, bits)
    codes = codes.reshape(b, s, kvh, d)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, scale[:, :, 0], mn[:, :, 0]


def dequantize_keys(codes, scale, mn, *, bits: int, group_size: int):
    """Inverse of :func:`quantize_keys_per_channel` -> float32 ``[B,S,KVH,D]``."""
    _check_bits(bits)
    c = unpack_int4(codes) if bits == 4 else codes
    b, s, kvh, d = c.shape
    _check_group(group_size, s, "token axis (S) of the keys")
    cg = c.reshape(b, s // group_size, group_size, kvh, d).astype(jnp.float32)
    return (cg * scale[:, :, None] + mn[:, :, None]).reshape(b, s, kvh, d)


def quantize_values_per_token(v, *, bits: int, group_size: int):
    """Per-token value quantization (KIVI).

    ``v [B,S,KVH,D]`` -> ``(codes [B,S,KVH,Dc] uint8, scale [B,S,KVH,D/G] f32,
    min [B,S,KVH,D/G] f32)`` where G = ``group_size`` consecutive channels of one token share a
    scale/min. ValueError unless bits is 4 or 8 and G divides D.
    """
    _check_bits(bits)
    b, s, kvh, d = v.shape
    _check_group(group_size, d, "head dim (D) of the values")
    if bits == 4 and d % 2:
        raise ValueError(f"4-bit packing needs an even head dim, got D={d}")
    vg = v.reshape(b, s, kvh, d // group_size, group_size)
    codes, scale, mn = _minmax_quantize(vg, 4, bits)
    codes = codes.reshape(b, s, kvh, d)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, scale[..., 0], mn[..., 0]


def dequantize_values(codes, scale, mn, *, bits: int, group_size: int):
    """Inverse of :func:`quantize_values_per_token` -> float32 ``[B,S,KVH,D]``."""
    _check_bits(bits)
    c = unpack_int4(codes) if bits == 4 else codes
    b, s, kvh, d = c.shape
    _check_group(group_size, d, "head dim (D) of the values")
    cg = c.reshape(b, s, kvh, d // group_size, group_size).astype(jnp.float32)
    return (cg * scale[..., None] + mn[..., None]).reshape(b, s, kvh, d)


@flax.struct.dataclass
class QuantizedKVCache:
    """One layer's KIVI cache (see the module docstring for the layout). A pytree; the three
    ints are static."""
    k_codes: jax.Array   # [B,Sq,KVH,Dc] uint8
    k_scale: jax.Array   # [B,Sq/key_group,KVH,D] f32
    k_min: jax.Array     # [B,Sq/key_group,KVH,D] f32
    v_codes: jax.Array   # [B,Sq,KVH,Dc] uint8
    v_scale: jax.Array   # [B,Sq,KVH,D/value_group] f32
    v_min: jax.Array     # [B,Sq,KVH,D/value_group] f32
    q_lengths: jax.Array  # [B] int32
    k_res: jax.Array     # [B,R,KVH,D]
    v_res: jax.Array     # [B,R,KVH,D]
    res_lengths: jax.Array  # [B] int32
    bits: int = flax.struct.field(pytree_node=False, default=8)
    key_group: int = flax.struct.field(pytree_node=False, default=32)
    value_group: int = flax.struct.field(pytree_node=False, default=32)

    @property
    def head_dim(self) -> int:
        return self.k_res.shape[-1]

    @property
    def lengths(self) -> jax.Array:
        return self.q_lengths + self.res_lengths

    def validate(self):
        """Static shape checks; raises ValueError."""
        _check_bits(self.bits)
        b, sq, kvh, dc = self.k_codes.shape
        d = self.head_dim
        if self.k_res.ndim != 4 or self.k_res.shape != self.v_res.shape or \
                self.k_res.shape[0] != b or self.k_res.shape[2] != kvh:
            raise ValueError(f"k_res/v_res must be [B,R,KVH,D], got {self.k_res.shape}, "
                             f"{self.v_res.shape}")
        if dc != (d // 2 if self.bits == 4 else d) or self.v_codes.shape != self.k_codes.shape:
            raise ValueError(f"codes {self.k_codes.shape}/{self.v_codes.shape} do not match "
                             f"head dim {d} at {self.bits} bits")
        if self.bits == 4 and d % 2:
            raise ValueError(f"4-bit packing needs an even head dim, got D={d}")
        _check_group(self.key_group, sq, "quantized token axis (Sq) of the keys")
        _check_group(self.value_group, d, "head dim (D) of the values")
        ks = (b, sq // self.key_group, kvh, d)
        vs = (b, sq, kvh, d // self.value_group)
        if self.k_scale.shape != ks or self.k_min.shape != ks:
            raise ValueError(f"k_scale/k_min must be {ks}, got {self.k_scale.shape}, "
                             f"{self.k_min.shape}")
        if self.v_scale.shape != vs or self.v_min.shape != vs:
            raise ValueError(f"v_scale/v_min must be {vs}, got {self.v_scale.shape}, "
                             f"{self.v_min.shape}")
        if self.q_lengths.shape != (b,) or self.res_lengths.shape != (b,):
            raise ValueError("q_lengths/res_lengths must be [B]")


def quantize_kv_cache(k, v, lengths, *, bits: int = 8, key_group: int = 32,
                      value_group: int = 32, residual: int = 64) -> QuantizedKVCache:
    """Quantize a contiguous ragged cache ``k, v [B,S,KVH,D]`` (``lengths [B]`` valid tokens).

    Per row, the quantized prefix is the shortest whole number of key groups that leaves at most
    ``residual`` tokens: ``q_len = max(0, ceil((len - residual) / key_group)) * key_group``; the
    remaining ``len - q_len`` most recent tokens (between ``residual - key_group + 1`` and
    ``residual`` once the row is long enough) stay full precision in a window of ``residual``
    slots. Needs ``residual >= key_group``; ``Sq`` = S rounded up to a multiple of ``key_group``.
    """
    _check_bits(bits)
    b, s, kvh, d = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if not isinstance(key_group, (int, np.integer)) or key_group < 1:
        raise ValueError(f"key_group must be a positive int, got {key_group!r}")
    if not isinstance(residual, (int, np.integer)) or residual < key_group:
        raise ValueError(f"residual window ({residual}) must be at least key_group ({key_group})")
    _check_group(value_group, d, "head dim (D) of the values")
    sq = -(-s // key_group) * key_group
    pad = ((0, 0), (0, sq - s), (0, 0), (0, 0))
    kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)
    kc, ksc, kmn = quantize_keys_per_channel(kp, bits=bits, group_size=key_group)
    vc, vsc, vmn = quantize_values_per_token(vp, bits=bits, group_size=value_group)
    ln = jnp.clip(jnp.asarray(lengths).astype(jnp.int32), 0, s)
    over = jnp.maximum(ln - residual, 0)
    q_len = (over + key_group - 1) // key_group * key_group
    r_len = ln - q_len
    rpad = ((0, 0), (0, residual), (0, 0), (0, 0))
    take = jax.vmap(lambda x, st: lax.dynamic_slice_in_dim(x, st, residual, axis=0))
    k_res = take(jnp.pad(kp, rpad), q_len)
    v_res = take(jnp.pad(vp, rpad), q_len)
    return QuantizedKVCache(kc, ksc, kmn, vc, vsc, vmn, q_len, k_res, v_res, r_len,
                            bits=bits, key_group=key_group, value_group=value_group)


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------

def reference_quantized_attention(q, cache: QuantizedKVCache, k_new, v_new, block_mask, q_pos,
                                  sliding_window: Optional[int] = None,
                                  scale: Optional[float] = None):
    """Dequantize the cache, lay it out contiguously, then ``jaxdec.attention.reference.attend``."""
    from jaxdec.attention.reference import attend
    cache.validate()
    sq = cache.k_codes.shape[1]
    r = cache.k_res.shape[1]
    kd = dequantize_keys(cache.k_codes, cache.k_scale, cache.k_min, bits=cache.bits,
                         group_size=cache.key_group)
    vd = dequantize_values(cache.v_codes, cache.v_scale, cache.v_min, bits=cache.bits,
                           group_size=cache.value_group)
    ql = jnp.clip(cache.q_lengths.astype(jnp.int32), 0, sq)
    rl = jnp.clip(cache.res_lengths.astype(jnp.int32), 0, r)
    pad = ((0, 0), (0, r), (0, 0), (0, 0))
    put = jax.vmap(lambda full, res, st: lax.dynamic_update_slice_in_dim(full, res, st, axis=0))
    kf = put(jnp.pad(kd, pad), cache.k_res.astype(jnp.float32), ql)
    vf = put(jnp.pad(vd, pad), cache.v_res.astype(jnp.float32), ql)
    out = attend(q.astype(jnp.float32), kf, vf, ql + rl, k_new.astype(jnp.float32),
                 v_new.astype(jnp.float32), block_mask, q_pos, sliding_window, scale)
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------

def _kivi_kernel(bounds_ref, qpos_ref, q_ref, kc_ref, ksc_ref, kmn_ref, vc_ref, vsc_ref, vmn_ref,
                 kr_ref, vr_ref, kn_ref, vn_ref, mask_ref, *rest, scale, bits, key_group,
                 value_group, head_dim, block_t, n_t_chunks, block_res, res_len_cap, sq,
                 window, n_poison):
    o_ref = rest[n_poison]
    d = head_dim
    # int4: the two nibbles of a byte are channels j and j + D/2, so the value accumulator and the
    # quantized-key dot work on channel halves ("parts"); all slicing is done on refs (loads).
    parts = [(0, d)] if bits == 8 else [(0, d // 2), (d // 2, d)]
    q = q_ref[...].astype(jnp.float32) * scale  # [br, D]
    q_parts = [q_ref[:, a:e].astype(jnp.float32) * scale for a, e in parts]
    rows = q.shape[0]
    qpos = qpos_ref[...]  # [br, 1]
    lo, q_len, r_len = bounds_ref[0], bounds_ref[1], bounds_ref[2]

    def update(carry, s, vis, v_parts):
        accs, m, l = carry
        m_new, l_new, corr, p = softmax_step(m, l, s, vis)
        return tuple(corr * a + pv(p, vp) for a, vp in zip(accs, v_parts)), m_new, l_new

    _, m0, l0 = init_state(rows, d)
    carry = (tuple(jnp.zeros((rows, e - a), jnp.float32) for a, e in parts), m0, l0)

    # 1. the block's own keys.
    def tbody(c, carry):
        ts = pl.multiple_of(c * block_t, block_t)
        kn = kn_ref[pl.ds(ts, block_t), :]
        vis = mask_ref[:, pl.ds(ts, block_t)] != 0
        s = dot_nt(q.astype(kn.dtype), kn)
        return update(carry, s, vis, [vn_ref[pl.ds(ts, block_t), a:e] for a, e in parts])

    carry = lax.fori_loop(0, n_t_chunks, tbody, carry)

    # 2. quantized tokens, one key group per step: the group's per-channel key scale/min are one
    #    row vector; per-token value scales are spread over their channels with exact selects.
    cols = jnp.arange(key_group, dtype=jnp.int32)

    def expand(ref, start, a, e):  # [G, D/value_group] groups -> [G, e-a] channels
        grp = (a + jnp.arange(e - a, dtype=jnp.int32)) // value_group
        out = jnp.zeros((key_group, e - a), jnp.float32)
        for gi in range(a // value_group, (e - 1) // value_group + 1):
            col = ref[pl.ds(start, key_group), pl.ds(gi, 1)].astype(jnp.float32)  # [G, 1]
            out = jnp.where(grp[None, :] == gi, col, out)
        return out

    def qbody(i, carry):
        start = pl.multiple_of(i * key_group, key_group)
        kpos = start + cols
        ok = kpos < q_len
        codes_k = kc_ref[pl.ds(start, key_group), :].astype(jnp.int32)
        codes_v = vc_ref[pl.ds(start, key_group), :].astype(jnp.int32)
        s = jnp.zeros((rows, key_group), jnp.float32)
        v_parts = []
        for n, (a, e) in enumerate(parts):
            if bits == 8:
                ck, cv = codes_k, codes_v
            else:
                ck = (codes_k & 15) if n == 0 else (codes_k >> 4)
                cv = (codes_v & 15) if n == 0 else (codes_v >> 4)
            k = (ck.astype(jnp.float32) * ksc_ref[pl.ds(i, 1), a:e].astype(jnp.float32)
                 + kmn_ref[pl.ds(i, 1), a:e].astype(jnp.float32))
            s = s + dot_nt(q_parts[n], k)
            v = cv.astype(jnp.float32) * expand(vsc_ref, start, a, e) + expand(vmn_ref, start, a, e)
            v_parts.append(jnp.where(ok[:, None], v, 0.0))  # NaN scales of unused slots stay out
        vis = ok[None, :]
        if window is not None:
            vis = vis & (qpos - kpos[None, :] < window)
        return update(carry, s, vis, v_parts)

    if sq > 0:
        first = lo // key_group
        last = (q_len + key_group - 1) // key_group
        carry = lax.fori_loop(first, jnp.maximum(first, last), qbody, carry)

    # 3. full-precision residual window, blocks of block_res slots at positions q_len + i.
    rcols = jnp.arange(block_res, dtype=jnp.int32)

    def rbody(i, carry):
        start = i * block_res
        ks = jnp.minimum(start, res_len_cap - block_res)  # last block overlaps the previous one
        idx = ks + rcols
        ok = (idx >= start) & (idx < r_len)
        k = kr_ref[pl.ds(ks, block_res), :]
        s = dot_nt(q.astype(k.dtype), k)
        v_parts = []
        for a, e in parts:
            v = vr_ref[pl.ds(ks, block_res), a:e]
            v_parts.append(jnp.where(ok[:, None], v, jnp.zeros_like(v)))
        vis = ok[None, :]
        if window is not None:
            vis = vis & (qpos - (q_len + idx)[None, :] < window)
        return update(carry, s, vis, v_parts)

    if res_len_cap > 0:
        first = jnp.maximum(lo - q_len, 0) // block_res
        last = (r_len + block_res - 1) // block_res
        carry = lax.fori_loop(first, jnp.maximum(first, last), rbody, carry)

    accs, m, l = carry
    for (a, e), acc in zip(parts, accs):
        o_ref[:, a:e] = finalize(acc, l).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sliding_window", "scale", "block_r", "block_t",
                                             "block_res", "interpret", "poison"))
def _quantized_attention(q, cache, k_new, v_new, block_mask, q_pos, *, sliding_window, scale,
                         block_r, block_t, block_res, interpret, poison):
    b, t, h, d = q.shape
    kvh = cache.k_res.shape[2]
    g = h // kvh
    sq = cache.k_codes.shape[1]
    r = cache.k_res.shape[1]
    qr, kn, vn, mrows, prow, br, bt, rp, tp = prepare_rows(
        q, k_new, v_new, block_mask, q_pos, sliding_window, block_r, block_t)
    k_res, v_res = cache.k_res, cache.v_res
    bres = min(block_res, max(16, 1 << max(0, r - 1).bit_length())) if r else block_res
    rcap = max(r, bres) if r else 0
    if 0 < r < bres:  # tiny residual window: pad to one block
        pad = ((0, 0), (0, bres - r), (0, 0), (0, 0))
        k_res, v_res = jnp.pad(k_res, pad), jnp.pad(v_res, pad)
    q_len = jnp.clip(cache.q_lengths.astype(jnp.int32), 0, sq)
    r_len = jnp.clip(cache.res_lengths.astype(jnp.int32), 0, r)
    bounds = jnp.stack([window_lo(q_pos, sliding_window), q_len, r_len], axis=1)  # [B,3]

    kc, vc = cache.k_codes, cache.v_codes
    ksc, kmn = cache.k_scale.astype(jnp.float32), cache.k_min.astype(jnp.float32)
    vsc, vmn = cache.v_scale.astype(jnp.float32), cache.v_min.astype(jnp.float32)
    if sq == 0:  # keep every operand non-empty; the quantized phase is skipped statically
        kc = jnp.zeros((b, cache.key_group, kvh, kc.shape[3]), kc.dtype)
        vc = jnp.zeros_like(kc)
        ksc = kmn = jnp.zeros((b, 1, kvh, d), jnp.float32)
        vsc = vmn = jnp.zeros((b, cache.key_group, kvh, d // cache.value_group), jnp.float32)
    if r == 0:
        k_res = v_res = jnp.zeros((b, 16, kvh, d), q.dtype)

    def whole(x):  # one (batch row, kv head) slice of a [B,N,KVH,C] array
        return pl.BlockSpec((None, x.shape[1], None, x.shape[3]),
                            lambda i, j, rr: (i, 0, j, 0))

    in_specs = [
        pl.BlockSpec((None, 3), lambda i, j, rr: (i, 0)),
        pl.BlockSpec((None, br, 1), lambda i, j, rr: (i, rr, 0)),
        pl.BlockSpec((None, None, br, d), lambda i, j, rr: (i, j, rr, 0)),
        whole(kc), whole(ksc), whole(kmn), whole(vc), whole(vsc), whole(vmn),
        whole(k_res), whole(v_res), whole(kn), whole(vn),
        pl.BlockSpec((None, br, tp), lambda i, j, rr: (i, rr, 0)),
    ]
    args = [bounds, prow, qr, kc, ksc, kmn, vc, vsc, vmn, k_res, v_res, kn, vn, mrows]
    out_shape = jax.ShapeDtypeStruct((b, kvh, rp, d), q.dtype)
    out_spec = pl.BlockSpec((None, None, br, d), lambda i, j, rr: (i, j, rr, 0))
    aliases = {}
    if poison:  # test hook: the output starts as NaN and must be fully overwritten
        aliases[len(args)] = 0
        args.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs.append(out_spec)
    kernel = functools.partial(
        _kivi_kernel, scale=float(scale), bits=cache.bits, key_group=cache.key_group,
        value_group=cache.value_group, head_dim=d, block_t=bt, n_t_chunks=tp // bt,
        block_res=bres, res_len_cap=rcap, sq=sq, window=sliding_window, n_poison=len(aliases))
    o = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, kvh, rp // br), in_specs=in_specs,
        out_specs=out_spec, input_output_aliases=aliases, interpret=interpret,
        name="kivi_attention",
    )(*args)
    return rows_to_heads(o, b, t, kvh, g, d)


def quantized_kv_attention(q, cache: QuantizedKVCache, k_new, v_new, block_mask, q_pos,
                           sliding_window: Optional[int] = None, scale: Optional[float] = None, *,
                           block_r: int = 64, block_t: int = 64, block_res: int = 64,
                           interpret: Optional[bool] = None, _poison_output: bool = False):
    """Attention of a block of T tokens over a KIVI cache plus the block (Pallas kernel).

    Same result as :func:`reference_quantized_attention`. ``q [B,T,H,D]``, ``k_new/v_new
    [B,T,KVH,D]``, ``block_mask [B,T,T]`` bool, ``q_pos [B,T]``; output ``[B,T,H,D]`` in q's dtype.
    ``block_r``/``block_t``/``block_res`` (powers of two) tile the query rows, the block keys and
    the residual window; the quantized part is walked one key group at a time.
    """
    q = jnp.asarray(q)
    k_new, v_new = jnp.asarray(k_new), jnp.asarray(v_new)
    block_mask, q_pos = jnp.asarray(block_mask), jnp.asarray(q_pos)
    cache.validate()
    b = q.shape[0]
    kvh, d = cache.k_res.shape[2], cache.head_dim
    dummy = jax.ShapeDtypeStruct((b, 0, kvh, d), q.dtype)
    _check_inputs(q, dummy, dummy, cache.q_lengths, k_new, v_new, block_mask, q_pos)
    for name, val in (("block_r", block_r), ("block_t", block_t), ("block_res", block_res)):
        if not isinstance(val, (int, np.integer)) or val < 1 or val & (val - 1):
            raise ValueError(f"{name} must be a positive power of two, got {val!r}")
    if sliding_window is not None:
        if isinstance(sliding_window, jax.core.Tracer):
            raise ValueError("sliding_window must be a static Python int (or None)")
        sliding_window = int(min(int(sliding_window), 2 ** 30))
    scale = d ** -0.5 if scale is None else float(scale)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _quantized_attention(q, cache, k_new, v_new, block_mask, q_pos,
                                sliding_window=sliding_window, scale=scale, block_r=int(block_r),
                                block_t=int(block_t), block_res=int(block_res),
                                interpret=interpret, poison=bool(_poison_output))
