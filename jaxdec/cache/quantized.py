"""Quantized KV caches for evaluation: KIVI int8/int4 and int4 + GEAR residual.

Each method is a small frozen dataclass with

* ``compress(k, v, lengths) -> (k_hat, v_hat)``: a float cache ``k, v [B,S,KVH,D]`` (one layer;
  ``lengths [B]`` valid tokens) goes in, and what attention would read comes out: the dequantized
  (plus residual-corrected) keys/values, same shape, float32. Slots at or past ``lengths`` are passed
  through unchanged (attention never reads them, the model overwrites them).
* ``bytes_per_token(n_tokens, num_kv_heads, head_dim)``: stored bytes per token of ONE layer for a
  sequence of ``n_tokens`` tokens, everything included (codes, per-group scales and minimums, the
  full-precision recent window, GEAR's low-rank factors and sparse outlier values + indices).
  Multiply by the number of layers for the whole model.

KIVI (per-channel keys in groups of ``key_group`` tokens, per-token values in groups of
``value_group`` channels, the most recent tokens full precision) reuses the layout and helpers of
``pallas_kernels.quantized_kv_attention`` (`quantize_kv_cache` + its dequantizers), so what this
module's ``compress`` returns is exactly what the Pallas kernel and its reference read.

GEAR (on the quantized part only; the recent window stays exact): (1) per token and KV head, the
``outliers`` largest-magnitude entries are kept exactly as a sparse matrix S; (2) the rest ``X - S``
is KIVI-quantized; (3) the quantization error ``E = X - S - deq(X - S)`` of each (row, KV head) is
approximated by its rank-``rank`` truncated SVD L (via ``eigh`` of the D x D Gram matrix). Attention reads ``deq + S + L``.

Scales, minimums, window entries, low-rank factors and outlier values are stored in ``scale_bytes``
bytes each (4: float32, as held here; pass 2 to account an fp16 store); an outlier index costs one
byte (head dims up to 256).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quantized_kv_attention import (
    SUPPORTED_BITS, dequantize_keys, dequantize_values, quantize_kv_cache,
)

__all__ = ["FP32", "KIVI", "GEAR", "kivi_dense", "valid_mask"]


def valid_mask(lengths, s):
    """``[B,S,1,1]`` bool: slot j of row b holds a committed token."""
    return (jnp.arange(s)[None, :] < lengths[:, None])[:, :, None, None]


def _check(bits, key_group, value_group, residual, head_dim=None):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    for name, g in (("key_group", key_group), ("value_group", value_group)):
        if not isinstance(g, int) or g < 1:
            raise ValueError(f"{name} must be a positive int, got {g!r}")
    if not isinstance(residual, int) or residual < key_group:
        raise ValueError(f"residual window ({residual}) must be at least key_group ({key_group})")
    if head_dim is not None and head_dim % value_group:
        raise ValueError(f"value_group={value_group} does not divide the head dim ({head_dim})")


def kivi_dense(k, v, lengths, *, bits, key_group, value_group, residual):
    """KIVI-quantize then dequantize a ragged cache; returns float32 ``(k_hat, v_hat, q_lengths)``
    laid out contiguously (quantized tokens then the exact recent window)."""
    b, s, kvh, d = k.shape
    qc = quantize_kv_cache(k, v, lengths, bits=bits, key_group=key_group,
                           value_group=value_group, residual=residual)
    kd = dequantize_keys(qc.k_codes, qc.k_scale, qc.k_min, bits=bits, group_size=key_group)[:, :s]
    vd = dequantize_values(qc.v_codes, qc.v_scale, qc.v_min, bits=bits,
                           group_size=value_group)[:, :s]
    qmask = valid_mask(qc.q_lengths, s)
    vmask = valid_mask(jnp.asarray(lengths, jnp.int32), s)
    k_hat = jnp.where(qmask, kd, k.astype(jnp.float32))
    v_hat = jnp.where(qmask, vd, v.astype(jnp.float32))
    # outside the valid range keep the input untouched
    k_hat = jnp.where(vmask, k_hat, k.astype(jnp.float32))
    v_hat = jnp.where(vmask, v_hat, v.astype(jnp.float32))
    return k_hat, v_hat, qc.q_lengths


@dataclasses.dataclass(frozen=True)
class FP32:
    """The uncompressed float32 cache (baseline)."""
    name: str = "fp32"

    def compress(self, k, v, lengths):
        return k.astype(jnp.float32), v.astype(jnp.float32)

    def bytes_per_token(self, n_tokens, num_kv_heads, head_dim):
        return 2 * num_kv_heads * head_dim * 4


def _window_tokens(n_tokens, key_group, residual):
    over = max(n_tokens - residual, 0)
    q_len = -(-over // key_group) * key_group
    return q_len, n_tokens - q_len


@dataclasses.dataclass(frozen=True)
class KIVI:
    """KIVI int8/int4 cache (keys per channel, values per token, exact recent window)."""
    bits: int = 4
    key_group: int = 32
    value_group: int = 32
    residual: int = 32
    scale_bytes: int = 4

    def __post_init__(self):
        _check(self.bits, self.key_group, self.value_group, self.residual)

    @property
    def name(self):
        return f"kivi-int{self.bits}"

    def compress(self, k, v, lengths):
        _check(self.bits, self.key_group, self.value_group, self.residual, k.shape[-1])
        k_hat, v_hat, _ = kivi_dense(k, v, lengths, bits=self.bits, key_group=self.key_group,
                                     value_group=self.value_group, residual=self.residual)
        return k_hat, v_hat

    def _quant_bytes(self, q_len, kvh, d):
        codes = 2 * q_len * kvh * d * self.bits / 8
        k_scales = 2 * math.ceil(q_len / self.key_group) * kvh * d * self.scale_bytes
        v_scales = 2 * q_len * kvh * (d // self.value_group) * self.scale_bytes
        return codes + k_scales + v_scales

    def bytes_per_token(self, n_tokens, num_kv_heads, head_dim):
        if head_dim % self.value_group:
            raise ValueError(f"value_group={self.value_group} does not divide the head dim "
                             f"({head_dim})")
        q_len, r_len = _window_tokens(n_tokens, self.key_group, self.residual)
        window = 2 * r_len * num_kv_heads * head_dim * self.scale_bytes
        return (self._quant_bytes(q_len, num_kv_heads, head_dim) + window) / n_tokens


def _top_outliers(x, n):
    """Per token and head keep the ``n`` largest-|x| entries: ``(sparse, rest)`` with x = sparse + rest."""
    if n == 0:
        return jnp.zeros_like(x), x
    _, idx = lax.top_k(jnp.abs(x), n)  # [B,S,KVH,n]
    keep = jax.nn.one_hot(idx, x.shape[-1], dtype=jnp.int32).sum(-2) > 0
    return jnp.where(keep, x, 0.0), jnp.where(keep, 0.0, x)


def _low_rank(e, mask, rank):
    """Rank-``rank`` truncated SVD of each (row, KV head) matrix ``e[b, :, h, :]`` over masked tokens.

    Computed as the projection onto the top-``rank`` right singular vectors, found by ``eigh`` of the
    small ``[D,D]`` Gram matrix (same result as the SVD's truncation, much cheaper for long S)."""
    if rank == 0:
        return jnp.zeros_like(e)
    em = jnp.where(mask, e, 0.0)
    gram = jnp.einsum("bshd,bshe->bhde", em, em)  # [B,KVH,D,D]
    _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
    top = vecs[..., -rank:]  # [B,KVH,D,r]
    lr = jnp.einsum("bshd,bhdr,bher->bshe", em, top, top)
    return jnp.where(mask, lr, 0.0)


@dataclasses.dataclass(frozen=True)
class GEAR:
    """KIVI quantization plus GEAR's error correction: sparse outliers + low-rank residual."""
    bits: int = 4
    key_group: int = 32
    value_group: int = 32
    residual: int = 32
    rank: int = 4
    outliers: int = 1  # per token, per KV head, per K/V (1 of 64 channels ~ 1.6 %)
    scale_bytes: int = 4

    def __post_init__(self):
        _check(self.bits, self.key_group, self.value_group, self.residual)
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {self.rank!r}")
        if not isinstance(self.outliers, int) or self.outliers < 0:
            raise ValueError(f"outliers must be a non-negative int, got {self.outliers!r}")

    @property
    def name(self):
        return f"kivi-int{self.bits}+gear(r={self.rank},s={self.outliers})"

    def compress(self, k, v, lengths):
        d = k.shape[-1]
        _check(self.bits, self.key_group, self.value_group, self.residual, d)
        if self.outliers > d or self.rank > d:
            raise ValueError(f"outliers ({self.outliers}) and rank ({self.rank}) must be <= D ({d})")
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        s = k.shape[1]
        ks, kr = _top_outliers(k, self.outliers)
        vs, vr = _top_outliers(v, self.outliers)
        kq, vq, q_len = kivi_dense(kr, vr, lengths, bits=self.bits, key_group=self.key_group,
                                   value_group=self.value_group, residual=self.residual)
        qmask = valid_mask(q_len, s)
        k_hat = jnp.where(qmask, kq + ks + _low_rank(kr - kq, qmask, self.rank), k)
        v_hat = jnp.where(qmask, vq + vs + _low_rank(vr - vq, qmask, self.rank), v)
        return k_hat, v_hat

    def bytes_per_token(self, n_tokens, num_kv_heads, head_dim):
        kivi = KIVI(self.bits, self.key_group, self.value_group, self.residual, self.scale_bytes)
        base = kivi.bytes_per_token(n_tokens, num_kv_heads, head_dim) * n_tokens
        q_len, _ = _window_tokens(n_tokens, self.key_group, self.residual)
        sparse = 2 * q_len * num_kv_heads * self.outliers * (self.scale_bytes + 1)
        # U [q_len, r] * sigma folded in, and V^T [r, D], per (K/V, KV head)
        low_rank = 2 * num_kv_heads * self.rank * (q_len + head_dim) * self.scale_bytes if q_len else 0
        return (base + sparse + low_rank) / n_tokens
