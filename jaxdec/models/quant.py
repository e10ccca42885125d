"""Block-quantized weights kept as stored in GGUF (Q4_1, Q8_0) and dequantized inside jitted matmuls.

A `QTensor` is a pytree standing for a `[out, in]` float matrix W stored in blocks of 32 along `in`:

* Q4_1: ``codes`` uint8 ``[out, in/32, 16]`` (two 4-bit codes per byte: element i of a block is the low
  nibble of byte i for i < 16 and the high nibble of byte i-16 otherwise, GGUF's layout),
  ``scale``/``offset`` float32 ``[out, in/32]``; ``W = code * scale + offset``.
* Q8_0: ``codes`` int8 ``[out, in/32, 32]``, ``scale`` ``[out, in/32]``, ``offset`` None; ``W = code * scale``.

`dequantize` gives exactly the float32 matrix that `gguf.quants.dequantize` gives (the same float32
products, no fused multiply-add), so the block-quantized path computes with the same weights as the
float32 path.

Speed. Decoding reads every weight once per token, so at small batch the matmul is bound by how many bytes
it streams and how cheaply it turns codes into weights. XLA:CPU cannot fuse a dequantization into its
dot: it writes the float32 matrix out and reads it back, so the best pure-XLA form is only about 1.3x
faster than float32 weights (see ``experiments/results/perf_notes.md``). `matmul` therefore runs a small native
kernel on CPU: an XLA FFI custom call (C++ source below, compiled once per machine with the system C++
compiler into ``~/.cache/jaxdec``) that reads the codes as stored, builds each block's weights in
registers (``code * scale + offset`` with the same two float32 roundings as gguf, via a 16-entry lookup
table for Q4_1) and multiply-accumulates them against up to 8 activation rows at a time. Its results
equal ``x @ dequantize(W).T`` up to float32 summation order. Where no compiler, no AVX2 or no CPU backend
is available, the same function falls back to a pure-XLA path (with one warning; the test suite fails
instead unless ``JAXDEC_ALLOW_NO_NATIVE=1`` says the machine cannot build the kernels).
``JAXDEC_QMATMUL=native|xla|auto`` (default auto) forces a path; ``JAXDEC_QMATMUL_THREADS=n`` caps the
kernel's threads (0: XLA's pool).

Stacked layer weights (``[L, out, ...]``, run by `lax.scan`) are not sliced by the scan: slicing copies
each layer's codes every step. `scan_layer_params` hands the layer body a `LayerSlice` (stacked tensor +
traced layer index) that the kernel reads in place.

Float32 weights get the same treatment: float32 matrix stacks also reach `matmul` as `LayerSlice`s, and
products with few activation rows (at most `F32_NATIVE_MAX_ROWS`, static at trace time: decode steps and
speculative verify blocks) run a native float32 kernel (``jaxdec_f32_matmul``) that reads the layer in
place, instead of XLA's copy of the layer followed by its dot (which also packs its operands, costly for
2-16 rows). More rows, ``JAXDEC_QMATMUL=xla``, non-float32 activations or no native library: XLA's
``einsum`` of the sliced layer, as before. Results equal ``x @ W[l].T`` up to float32 summation order;
gradients (in x and in the stack) go through XLA (a `jax.custom_jvp`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.compress.dfloat11 import DF11Slice, DF11Stack

BLOCK = 32
IMPLS = ("auto", "native", "xla")


@struct.dataclass
class QTensor:
    codes: jax.Array
    scale: jax.Array
    offset: Optional[jax.Array]
    kind: str = struct.field(pytree_node=False, default="q4_1")

    @property
    def shape(self):
        out, nb = self.scale.shape[-2:]
        return tuple(self.scale.shape[:-2]) + (out, nb * BLOCK)


@struct.dataclass
class LayerSlice:
    """Layer ``index`` of a stacked ``[L, out, in]`` QTensor or float32 array, read in place by the native
    kernels (no per-layer copy); `materialize` gives the layer itself (a copy, for the XLA paths)."""

    w: QTensor | jax.Array
    index: jax.Array

    @property
    def shape(self):
        return self.w.shape[1:]

    @property
    def kind(self):
        """The QTensor's kind, or "f32" for a float array stack."""
        return self.w.kind if isinstance(self.w, QTensor) else "f32"

    @property
    def quantized(self) -> bool:
        return isinstance(self.w, QTensor)

    def materialize(self) -> QTensor | jax.Array:
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.index, 0, keepdims=False), self.w)


def _unpack(codes: jax.Array, kind: str) -> jax.Array:
    if kind == "q4_1":
        lo = codes & 0x0F
        hi = codes >> 4
        return jnp.concatenate([lo, hi], axis=-1)
    return codes


def dequantize(w) -> jax.Array:
    """Float32 `[..., out, in]` matrix of a QTensor or LayerSlice (identity on plain arrays; a LayerSlice
    of a float stack gives its layer)."""
    if isinstance(w, LayerSlice):
        w = w.materialize()
    if not isinstance(w, QTensor):
        return w
    q = _unpack(w.codes, w.kind).astype(jnp.float32)
    deq = q * w.scale.astype(jnp.float32)[..., None]
    if w.offset is not None:
        deq = deq + w.offset.astype(jnp.float32)[..., None]
    return deq.reshape(w.shape)


def _in_place(v) -> bool:
    """Stacked layer params that `scan_layer_params` keeps whole: block-quantized and DFloat11 stacks, and
    float32 matrix stacks ``[L, out, in]`` (the linear weights; norms and biases are ``[L, n]``)."""
    if isinstance(v, (QTensor, DF11Stack)):
        return True
    return isinstance(v, (jax.Array, np.ndarray)) and v.ndim == 3 and v.dtype == np.float32


def scan_layer_params(layers: dict):
    """Split stacked layer params for `lax.scan`: returns ``(xs, pick)``.

    Scan over ``xs`` (the remaining arrays: norms, biases) as usual and call ``pick(xs_slice, i)`` in the
    body to get layer ``i``'s params; block-quantized and float32 matrix stacks come back as `LayerSlice`s
    of the unsliced stacks (read in place by the native kernels; `LayerSlice.materialize` or `dequantize`
    gives the layer's matrix) and DFloat11-compressed ones as `DF11Slice`s (decoded by `matmul`, right
    before the product). A scan slice would copy every layer's matrix each step.
    """
    fixed = {k: v for k, v in layers.items() if _in_place(v)}
    xs = {k: v for k, v in layers.items() if k not in fixed}

    def pick(xs_slice: dict, index) -> dict:
        p = dict(xs_slice)
        i = jnp.asarray(index, jnp.int32)
        p.update({k: (DF11Slice(v, i) if isinstance(v, DF11Stack) else LayerSlice(v, i)) for k, v in fixed.items()})
        return p

    return xs, pick


# ------------------------------------------------------------------------------------------- matmul
def _impl(impl: Optional[str]) -> str:
    impl = impl or os.environ.get("JAXDEC_QMATMUL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"quantized matmul impl must be one of {IMPLS}, got {impl!r}")
    return impl


def f32_native_max_rows() -> int:
    """Most activation rows for which a float32 `LayerSlice` product runs the native kernel
    (``JAXDEC_F32_NATIVE_MAX_ROWS``, default `F32_NATIVE_MAX_ROWS`; 0 turns that path off)."""
    try:
        return max(0, int(os.environ.get("JAXDEC_F32_NATIVE_MAX_ROWS", str(F32_NATIVE_MAX_ROWS))))
    except ValueError:
        raise ValueError("JAXDEC_F32_NATIVE_MAX_ROWS must be an integer >= 0") from None


def matmul(x: jax.Array, w, impl: Optional[str] = None) -> jax.Array:
    """``x @ W.T`` for ``x [..., in]`` and a float, `QTensor`, `LayerSlice` or `DF11Slice` ``W [out, in]``
    (a bfloat16 ``W`` is promoted: float32 products of the bfloat16 values).

    impl: "auto" (native kernel where available, else XLA), "native" or "xla"; default from the
    ``JAXDEC_QMATMUL`` environment variable (read at trace time).

    A `LayerSlice` of a float32 stack runs the native float32 kernel (reading the layer in place) when
    x is float32 with at most `f32_native_max_rows()` rows (static at trace time) on CPU and impl is not
    "xla"; otherwise, and for float arrays, it is XLA's ``einsum`` of the (sliced) matrix.
    """
    if isinstance(w, DF11Slice):
        w = w.materialize()
    if isinstance(w, LayerSlice) and not w.quantized:
        return _matmul_f32_slice(x, w, _impl(impl))
    if not isinstance(w, (QTensor, LayerSlice)):
        return jnp.einsum("...i,oi->...o", x, w)
    impl = _impl(impl)
    stacked = w.w if isinstance(w, LayerSlice) else w
    if stacked.codes.ndim != (4 if isinstance(w, LayerSlice) else 3):
        raise ValueError(f"matmul needs a 2-D weight (or a LayerSlice of a stack), got shape {w.shape}")
    on_cpu = jax.default_backend() == "cpu"  # elsewhere the kernel is not even built (unless forced)
    if impl != "xla" and x.dtype == jnp.float32 and (on_cpu or impl == "native"):
        lib = native_kernels(required=(impl == "native"))
        if lib is not None:
            return jax.lax.platform_dependent(x, cpu=lambda x_: _matmul_native(x_, w),
                                              default=lambda x_: _matmul_xla(x_, w))
    elif impl == "native":
        raise ValueError(f"the native quantized matmul needs float32 activations, got {x.dtype}")
    return _matmul_xla(x, w)


def _matmul_f32_slice(x: jax.Array, w: LayerSlice, impl: str) -> jax.Array:
    stack = w.w
    if stack.ndim != 3:
        raise ValueError(f"a float LayerSlice needs a [L, out, in] stack, got shape {stack.shape}")
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    index = jnp.asarray(w.index, jnp.int32)
    if (impl != "xla" and x.dtype == jnp.float32 and stack.dtype == jnp.float32
            and rows <= f32_native_max_rows() and (jax.default_backend() == "cpu" or impl == "native")):
        lib = native_kernels(required=(impl == "native"))
        if lib is not None:
            return jax.lax.platform_dependent(x, stack, index, cpu=_f32_native, default=_f32_xla)
    return _f32_xla(x, stack, index)


def _f32_xla(x: jax.Array, stack: jax.Array, index: jax.Array) -> jax.Array:
    """``x @ stack[index].T`` in XLA (the slice is a copy of the layer's matrix)."""
    return jnp.einsum("...i,oi->...o", x, jax.lax.dynamic_index_in_dim(stack, index, 0, keepdims=False))


@jax.custom_jvp
def _f32_native(x, stack, index):
    return native_kernels(required=True).call_f32(x, stack, index)


@functools.partial(_f32_native.defjvp, symbolic_zeros=True)
def _f32_native_jvp(primals, tangents):
    """d(x @ W[l].T) = dx @ W[l].T + x @ dW[l].T, both in XLA; symbolic-zero tangents are skipped (so a
    gradient in x alone never builds a zero tangent of the whole weight stack)."""
    x, stack, index = primals
    dx, dstack, _ = tangents
    y = _f32_native(x, stack, index)
    zero = jax.custom_derivatives.SymbolicZero
    dy = None
    if not isinstance(dx, zero):
        dy = _f32_xla(dx, stack, index)
    if not isinstance(dstack, zero):
        t = _f32_xla(x, dstack, index)
        dy = t if dy is None else dy + t
    return y, (jnp.zeros_like(y) if dy is None else dy)


def _dot_dequantized(x: jax.Array, w: QTensor) -> jax.Array:
    """``x @ dequantize(w).T`` for a 2-D QTensor, in XLA."""
    if w.kind != "q4_1":
        return jnp.einsum("...i,oi->...o", x, dequantize(w).astype(x.dtype))
    # Q4_1: the low and high nibbles hold elements 0-15 and 16-31 of each block; two dots against the
    # matching halves of x avoid interleaving the nibbles into one matrix (a concatenate XLA runs slowly)
    out, nb = w.scale.shape
    s, m = w.scale.astype(jnp.float32)[..., None], w.offset.astype(jnp.float32)[..., None]
    lo = ((w.codes & 0x0F).astype(jnp.float32) * s + m).reshape(out, nb * 16).astype(x.dtype)
    hi = ((w.codes >> 4).astype(jnp.float32) * s + m).reshape(out, nb * 16).astype(x.dtype)
    xb = x.reshape(x.shape[:-1] + (nb, 2, 16))
    lead = x.shape[:-1] + (nb * 16,)
    return (jnp.einsum("...i,oi->...o", xb[..., 0, :].reshape(lead), lo)
            + jnp.einsum("...i,oi->...o", xb[..., 1, :].reshape(lead), hi))


def _matmul_xla(x: jax.Array, w) -> jax.Array:
    """Pure-XLA fallback: dequantize (chunks of) W, then float32 dots."""
    if isinstance(w, LayerSlice):
        w = w.materialize()
    out = w.shape[-2]
    chunks = out // 2048 if out % 2048 == 0 else 1
    if chunks <= 1:
        return _dot_dequantized(x, w)
    # a large matrix (the LM head): 2048 rows at a time, so no [out, in] float32 copy is made
    parts = jax.tree.map(lambda a: a.reshape((chunks, out // chunks) + a.shape[1:]), w)
    _, ys = jax.lax.scan(lambda _, part: (None, _dot_dequantized(x, part)), None, parts)
    return jnp.moveaxis(ys, 0, -2).reshape(x.shape[:-1] + (out,))


def _threads() -> int:
    try:
        return max(0, int(os.environ.get("JAXDEC_QMATMUL_THREADS", "0")))
    except ValueError:
        raise ValueError("JAXDEC_QMATMUL_THREADS must be an integer >= 0") from None


def _min_parallel_work() -> int:
    """Multiply-adds below which a product runs on one thread (``JAXDEC_QMATMUL_MIN_PARALLEL``)."""
    try:
        return max(0, int(os.environ.get("JAXDEC_QMATMUL_MIN_PARALLEL", str(1 << 20))))
    except ValueError:
        raise ValueError("JAXDEC_QMATMUL_MIN_PARALLEL must be an integer >= 0") from None


@jax.custom_jvp
def _matmul_native(x, w):
    return native_kernels(required=True).call(x, w)


@_matmul_native.defjvp
def _matmul_native_jvp(primals, tangents):
    x, w = primals
    dx, _ = tangents  # the weights are constants (integer codes): no tangent flows into them
    return _matmul_native(x, w), _matmul_xla(dx, w)


def embed_lookup(w, ids: jax.Array) -> jax.Array:
    """Rows ``W[ids]`` of an embedding table; for a QTensor only the gathered rows are dequantized."""
    if not isinstance(w, QTensor):
        return jnp.take(w, ids, axis=0)
    rows = QTensor(jnp.take(w.codes, ids, axis=0), jnp.take(w.scale, ids, axis=0),
                   None if w.offset is None else jnp.take(w.offset, ids, axis=0), w.kind)
    return dequantize(rows)


# ---------------------------------------------------------------- host-side conversion from GGUF bytes
def from_gguf_bytes(raw: np.ndarray, kind: str, shape: tuple) -> QTensor:
    """Split raw GGUF block bytes (uint8 ``[out, nblocks * bytes_per_block]``) into a QTensor."""
    out, n_in = shape
    if n_in % BLOCK:
        raise ValueError(f"inner dimension {n_in} is not a multiple of the block size {BLOCK}")
    nb = n_in // BLOCK
    raw = np.ascontiguousarray(raw).reshape(out, nb, -1)
    scale = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "q4_1":
        offset = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = raw[..., 4:20].copy()
        return QTensor(jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(offset), "q4_1")
    if kind == "q8_0":
        codes = raw[..., 2:34].copy().view(np.int8)
        return QTensor(jnp.asarray(codes), jnp.asarray(scale), None, "q8_0")
    raise ValueError(f"unsupported block-quantized kind {kind!r}; expected 'q4_1' or 'q8_0'")


def stack(ws: list) -> QTensor | jax.Array:
    """Stack per-layer tensors on a new leading axis (plain arrays or QTensors of one kind)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *ws)


# ------------------------------------------------------------------------------ native CPU kernels
_TARGETS = {"q4_1": "jaxdec_q4_1_matmul", "q8_0": "jaxdec_q8_0_matmul", "f32": "jaxdec_f32_matmul"}
# float32 LayerSlice products with at most this many activation rows run the native kernel (more rows:
# XLA's dot, whose operand packing pays off with enough rows; whole-model crossover measured at 64-96
# rows, see experiments/results/perf_notes.md section 2.4)
F32_NATIVE_MAX_ROWS = 32

_NATIVE_SOURCE = r"""
// jaxdec: y[r, o] = sum_i x[r, i] * W[o, i] for GGUF block-quantized W (Q4_1, Q8_0) and for float32 W
// (one layer of a stacked [L, out, in] matrix, read in place), as XLA FFI handlers.
// Weights are built per 32-element block in registers with gguf's float32 roundings
// (Q4_1: code * scale + offset, Q8_0: code * scale; compiled with -ffp-contract=off so these stay
// a multiply then an add); products are accumulated with FMA, 8 activation rows at a time.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <immintrin.h>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// block scales/offsets are float32 or float16 (GGUF stores float16; the conversion is exact)
inline float scalar(const float* p, int64_t i) { return p[i]; }
inline float scalar(const uint16_t* p, int64_t i) { return _cvtsh_ss(p[i]); }

#if defined(__AVX512F__)
// ---- AVX-512: 16 lanes; Q4_1 weights by a 16-entry table lookup (k * scale + offset for k = 0..15)
template <int R, int OT, typename S>
inline void q41_tile(const float* x, int64_t K, const uint8_t* codes, const S* scale, const S* offset, float* y,
                     int64_t N, int64_t o) {
  const int64_t nb = K / 32;
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 x0[R], x1[R];
    for (int r = 0; r < R; ++r) {
      x0[r] = _mm512_loadu_ps(x + r * K + b * 32);
      x1[r] = _mm512_loadu_ps(x + r * K + b * 32 + 16);
    }
    for (int t = 0; t < OT; ++t) {
      const int64_t ob = (o + t) * nb + b;
      __m512 table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(scalar(scale, ob))), _mm512_set1_ps(scalar(offset, ob)));
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ob * 16)));
      __m512 lo = _mm512_permutexvar_ps(v, table);  // the permute reads the low 4 bits of each index
      __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      for (int r = 0; r < R; ++r) {
        acc[t][r] = _mm512_fmadd_ps(x0[r], lo, acc[t][r]);
        acc[t][r] = _mm512_fmadd_ps(x1[r], hi, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = _mm512_reduce_add_ps(acc[t][r]);
}

template <int R, int OT, typename S>
inline void q80_tile(const float* x, int64_t K, const int8_t* codes, const S* scale, float* y, int64_t N,
                     int64_t o) {
  const int64_t nb = K / 32;
  __m512 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 x0[R], x1[R];
    for (int r = 0; r < R; ++r) {
      x0[r] = _mm512_loadu_ps(x + r * K + b * 32);
      x1[r] = _mm512_loadu_ps(x + r * K + b * 32 + 16);
    }
    for (int t = 0; t < OT; ++t) {
      const int64_t ob = (o + t) * nb + b;
      const __m512 sv = _mm512_set1_ps(scalar(scale, ob));
      const int8_t* c = codes + ob * 32;
      __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)))), sv);
      __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)))), sv);
      for (int r = 0; r < R; ++r) {
        acc[t][r] = _mm512_fmadd_ps(x0[r], w0, acc[t][r]);
        acc[t][r] = _mm512_fmadd_ps(x1[r], w1, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = _mm512_reduce_add_ps(acc[t][r]);
}
// ---- float32 weights: W[o, k] read as stored (a layer of a [L, N, K] stack in place)
// OT outputs per pass, the weight chunks in registers and each activation row loaded once per chunk;
// the last K % 16 elements by masked loads (masked-off lanes are neither read nor faulted).
template <int R> constexpr int f32_outputs() { return R <= 6 ? 4 : 3; }  // OT*R + OT + 1 <= 32 zmm

template <int R, int OT>
inline void f32_tile(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t o) {
  __m512 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const float* wr = w + o * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[OT];
    for (int t = 0; t < OT; ++t) wv[t] = _mm512_loadu_ps(wr + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int t = 0; t < OT; ++t) acc[t][r] = _mm512_fmadd_ps(xv, wv[t], acc[t][r]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[OT];
    for (int t = 0; t < OT; ++t) wv[t] = _mm512_maskz_loadu_ps(m, wr + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * K + k);
      for (int t = 0; t < OT; ++t) acc[t][r] = _mm512_fmadd_ps(xv, wv[t], acc[t][r]);
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = _mm512_reduce_add_ps(acc[t][r]);
}
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
// ---- AVX2: 8 lanes; codes widened and converted, then scaled
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 widen_u8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 widen_i8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

template <int R, int OT, typename S>
inline void q41_tile(const float* x, int64_t K, const uint8_t* codes, const S* scale, const S* offset, float* y,
                     int64_t N, int64_t o) {
  const int64_t nb = K / 32;
  const __m128i mask = _mm_set1_epi8(15);
  __m256 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int t = 0; t < OT; ++t) {
      const int64_t ob = (o + t) * nb + b;
      const __m256 sv = _mm256_set1_ps(scalar(scale, ob)), mv = _mm256_set1_ps(scalar(offset, ob));
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ob * 16));
      const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
      __m256 w[4] = {widen_u8(lo), widen_u8(_mm_srli_si128(lo, 8)), widen_u8(hi), widen_u8(_mm_srli_si128(hi, 8))};
      for (int j = 0; j < 4; ++j) w[j] = _mm256_add_ps(_mm256_mul_ps(w[j], sv), mv);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j)
          acc[t][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + b * 32 + 8 * j), w[j], acc[t][r]);
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = hsum8(acc[t][r]);
}

template <int R, int OT, typename S>
inline void q80_tile(const float* x, int64_t K, const int8_t* codes, const S* scale, float* y, int64_t N,
                     int64_t o) {
  const int64_t nb = K / 32;
  __m256 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int t = 0; t < OT; ++t) {
      const int64_t ob = (o + t) * nb + b;
      const __m256 sv = _mm256_set1_ps(scalar(scale, ob));
      const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ob * 32));
      const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ob * 32 + 16));
      __m256 w[4] = {widen_i8(q0), widen_i8(_mm_srli_si128(q0, 8)), widen_i8(q1), widen_i8(_mm_srli_si128(q1, 8))};
      for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(w[j], sv);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j)
          acc[t][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + b * 32 + 8 * j), w[j], acc[t][r]);
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = hsum8(acc[t][r]);
}
// ---- float32 weights (see the AVX-512 version); 16 ymm registers, so fewer outputs per pass
template <int R> constexpr int f32_outputs() { return R <= 2 ? 4 : (R <= 6 ? 2 : 1); }

template <int R, int OT>
inline void f32_tile(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t o) {
  __m256 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  const float* wr = w + o * K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[OT];
    for (int t = 0; t < OT; ++t) wv[t] = _mm256_loadu_ps(wr + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int t = 0; t < OT; ++t) acc[t][r] = _mm256_fmadd_ps(xv, wv[t], acc[t][r]);
    }
  }
  if (k < K) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K - k)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 wv[OT];
    for (int t = 0; t < OT; ++t) wv[t] = _mm256_maskload_ps(wr + t * K + k, m);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_maskload_ps(x + r * K + k, m);
      for (int t = 0; t < OT; ++t) acc[t][r] = _mm256_fmadd_ps(xv, wv[t], acc[t][r]);
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = hsum8(acc[t][r]);
}
constexpr const char* kIsa = "avx2";
#else
#error "jaxdec native kernels need AVX2+FMA or AVX-512"
#endif

// Outputs [o0, o1) for rows [0, R) (R <= 8): several outputs per pass when there are few rows.
template <int R, typename S>
void rows_q41(const float* x, int64_t K, const uint8_t* c, const S* s, const S* m, float* y, int64_t N, int64_t o0,
              int64_t o1) {
  constexpr int OT = R == 1 ? 4 : (R == 2 ? 2 : 1);
  int64_t o = o0;
  for (; o + OT <= o1; o += OT) q41_tile<R, OT, S>(x, K, c, s, m, y, N, o);
  for (; o < o1; ++o) q41_tile<R, 1, S>(x, K, c, s, m, y, N, o);
}

template <int R, typename S>
void rows_q80(const float* x, int64_t K, const int8_t* c, const S* s, float* y, int64_t N, int64_t o0,
              int64_t o1) {
  constexpr int OT = R == 1 ? 4 : (R == 2 ? 2 : 1);
  int64_t o = o0;
  for (; o + OT <= o1; o += OT) q80_tile<R, OT, S>(x, K, c, s, y, N, o);
  for (; o < o1; ++o) q80_tile<R, 1, S>(x, K, c, s, y, N, o);
}

template <int R>
void rows_f32(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t o0, int64_t o1) {
  constexpr int OT = f32_outputs<R>();
  int64_t o = o0;
  for (; o + OT <= o1; o += OT) f32_tile<R, OT>(x, K, w, y, N, o);
  for (; o < o1; ++o) f32_tile<R, 1>(x, K, w, y, N, o);
}

template <typename F>
void by_rows(int64_t nr, F f) {
  switch (nr) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

// Work sharing on XLA's intra-op pool. Chunks are claimed from an atomic counter by the calling thread
// and by helper tasks alike, and the caller only waits for chunks already claimed by running threads,
// so it never depends on a queued task being started (no deadlock when the pool is busy).
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t max_threads, int64_t min_work, int64_t work, int64_t nchunks,
                  F fn) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  if (work < min_work) threads = 1;  // small products: not worth waking a thread
  threads = std::min(threads, nchunks);
  if (threads <= 1) {
    for (int64_t i = 0; i < nchunks; ++i) fn(i);
    return;
  }
  auto shared = std::make_shared<Shared>();
  auto run = [shared, fn, nchunks]() {
    int64_t i;
    while ((i = shared->next.fetch_add(1)) < nchunks) {
      fn(i);
      shared->done.fetch_add(1);
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (shared->done.load() < nchunks) std::this_thread::yield();
}

struct Dims {
  int64_t R, K, N, nb, layer;
};

ffi::ErrorOr<Dims> dims_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& scale, int64_t index,
                           int64_t y_count) {
  auto xd = x.dimensions();
  auto sd = scale.dimensions();
  if (xd.size() < 1 || sd.size() < 2) return ffi::Unexpected(ffi::Error::InvalidArgument("bad ranks"));
  Dims d;
  d.K = xd.back();
  d.N = sd[sd.size() - 2];
  d.nb = sd[sd.size() - 1];
  if (d.K != d.nb * 32) return ffi::Unexpected(ffi::Error::InvalidArgument("x and W inner sizes differ"));
  d.R = d.K ? x.element_count() / d.K : 0;
  int64_t layers = (d.N * d.nb) ? scale.element_count() / (d.N * d.nb) : 0;
  if (y_count != d.R * d.N) return ffi::Unexpected(ffi::Error::InvalidArgument("bad output size"));
  d.layer = std::min<int64_t>(std::max<int64_t>(index, 0), std::max<int64_t>(layers - 1, 0));
  return d;
}

constexpr int64_t kChunk = 64;  // output features per work item

template <typename S>
void q41_run(ffi::ThreadPool& pool, int64_t max_threads, int64_t min_work, const Dims& d, const float* xp, const uint8_t* codes,
             const S* scale, const S* offset, float* yp) {
  const int64_t per_layer = d.N * d.nb;
  const uint8_t* cp = codes + d.layer * per_layer * 16;
  const S* sp = scale + d.layer * per_layer;
  const S* mp = offset + d.layer * per_layer;
  const int64_t nchunks = (d.N + kChunk - 1) / kChunk;
  parallel_for(pool, max_threads, min_work, d.R * d.N * d.K, nchunks, [=](int64_t i) {
    const int64_t o0 = i * kChunk, o1 = std::min(d.N, o0 + kChunk);
    for (int64_t r0 = 0; r0 < d.R; r0 += 8) {
      by_rows(std::min<int64_t>(8, d.R - r0), [&](auto rc) {
        rows_q41<decltype(rc)::value, S>(xp + r0 * d.K, d.K, cp, sp, mp, yp + r0 * d.N, d.N, o0, o1);
      });
    }
  });
}

template <typename S>
void q80_run(ffi::ThreadPool& pool, int64_t max_threads, int64_t min_work, const Dims& d, const float* xp, const int8_t* codes,
             const S* scale, float* yp) {
  const int64_t per_layer = d.N * d.nb;
  const int8_t* cp = codes + d.layer * per_layer * 32;
  const S* sp = scale + d.layer * per_layer;
  const int64_t nchunks = (d.N + kChunk - 1) / kChunk;
  parallel_for(pool, max_threads, min_work, d.R * d.N * d.K, nchunks, [=](int64_t i) {
    const int64_t o0 = i * kChunk, o1 = std::min(d.N, o0 + kChunk);
    for (int64_t r0 = 0; r0 < d.R; r0 += 8) {
      by_rows(std::min<int64_t>(8, d.R - r0), [&](auto rc) {
        rows_q80<decltype(rc)::value, S>(xp + r0 * d.K, d.K, cp, sp, yp + r0 * d.N, d.N, o0, o1);
      });
    }
  });
}

ffi::Error Q41Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scale,
                   ffi::AnyBuffer offset, ffi::BufferR0<ffi::S32> index, ffi::Result<ffi::AnyBuffer> y,
                   int64_t max_threads, int64_t min_work) {
  auto d_or = dims_of(x, scale, index.typed_data()[0], y->element_count());
  if (d_or.has_error()) return d_or.error();
  if (offset.element_type() != scale.element_type())
    return ffi::Error::InvalidArgument("scale and offset dtypes differ");
  const float* xp = static_cast<const float*>(x.untyped_data());
  const uint8_t* cp = static_cast<const uint8_t*>(codes.untyped_data());
  float* yp = static_cast<float*>(y->untyped_data());
  if (scale.element_type() == ffi::DataType::F32) {
    q41_run(pool, max_threads, min_work, d_or.value(), xp, cp, static_cast<const float*>(scale.untyped_data()),
            static_cast<const float*>(offset.untyped_data()), yp);
  } else if (scale.element_type() == ffi::DataType::F16) {
    q41_run(pool, max_threads, min_work, d_or.value(), xp, cp, static_cast<const uint16_t*>(scale.untyped_data()),
            static_cast<const uint16_t*>(offset.untyped_data()), yp);
  } else {
    return ffi::Error::InvalidArgument("block scales must be float32 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error Q80Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scale,
                   ffi::BufferR0<ffi::S32> index, ffi::Result<ffi::AnyBuffer> y, int64_t max_threads,
                   int64_t min_work) {
  auto d_or = dims_of(x, scale, index.typed_data()[0], y->element_count());
  if (d_or.has_error()) return d_or.error();
  const float* xp = static_cast<const float*>(x.untyped_data());
  const int8_t* cp = static_cast<const int8_t*>(codes.untyped_data());
  float* yp = static_cast<float*>(y->untyped_data());
  if (scale.element_type() == ffi::DataType::F32) {
    q80_run(pool, max_threads, min_work, d_or.value(), xp, cp, static_cast<const float*>(scale.untyped_data()), yp);
  } else if (scale.element_type() == ffi::DataType::F16) {
    q80_run(pool, max_threads, min_work, d_or.value(), xp, cp, static_cast<const uint16_t*>(scale.untyped_data()), yp);
  } else {
    return ffi::Error::InvalidArgument("block scales must be float32 or float16");
  }
  return ffi::Error::Success();
}

// float32 W: x [..., K], W [L, N, K] (or [N, K]); layer `index` (clamped) is read in place
ffi::Error F32Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::BufferR0<ffi::S32> index,
                   ffi::Result<ffi::AnyBuffer> y, int64_t max_threads, int64_t min_work) {
  if (x.element_type() != ffi::DataType::F32 || w.element_type() != ffi::DataType::F32 ||
      y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("the float32 matmul needs float32 x, W and y");
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() < 1 || wd.size() < 2) return ffi::Error::InvalidArgument("bad ranks");
  const int64_t K = xd.back(), N = wd[wd.size() - 2];
  if (wd.back() != K) return ffi::Error::InvalidArgument("x and W inner sizes differ");
  const int64_t R = K ? x.element_count() / K : 0;
  if (y->element_count() != R * N) return ffi::Error::InvalidArgument("bad output size");
  float* yp = static_cast<float*>(y->untyped_data());
  if (K == 0) {
    std::fill(yp, yp + R * N, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t layers = N ? w.element_count() / (N * K) : 0;
  const int64_t layer = std::min<int64_t>(std::max<int64_t>(index.typed_data()[0], 0),
                                          std::max<int64_t>(layers - 1, 0));
  const float* xp = static_cast<const float*>(x.untyped_data());
  const float* wp = static_cast<const float*>(w.untyped_data()) + layer * N * K;
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  parallel_for(pool, max_threads, min_work, R * N * K, nchunks, [=](int64_t i) {
    const int64_t o0 = i * kChunk, o1 = std::min(N, o0 + kChunk);
    for (int64_t r0 = 0; r0 < R; r0 += 8) {
      by_rows(std::min<int64_t>(8, R - r0), [&](auto rc) {
        rows_f32<decltype(rc)::value>(xp + r0 * K, K, wp, yp + r0 * N, N, o0, o1);
      });
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdecF32Matmul, F32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("min_parallel_work"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdecQ41Matmul, Q41Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("min_parallel_work"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdecQ80Matmul, Q80Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("min_parallel_work"));

extern "C" const char* JaxdecKernelIsa() { return kIsa; }
"""

_BUILD_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")


def _cache_dir() -> str:
    base = os.environ.get("JAXDEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jaxdec")
    return os.path.join(base, "kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_native(extra_flags: tuple = (), out_dir: Optional[str] = None) -> str:
    """Compile the kernels into a shared library (cached by source, flags, compiler and CPU); its path."""
    import jaxlib
    cxx = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C++ compiler ({cxx!r}): {e}") from None
    flags = _BUILD_FLAGS + tuple(extra_flags) + ("-I", jax.ffi.include_dir())
    key = hashlib.sha256("\0".join((_NATIVE_SOURCE, " ".join(flags), version, jaxlib.__version__,
                                    _cpu_flags())).encode()).hexdigest()[:16]
    out_dir = out_dir or _cache_dir()
    path = os.path.join(out_dir, f"jaxdec_qmatmul_{key}.so")
    if os.path.exists(path):
        return path
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise OSError(f"{out_dir} is not writable")
    except OSError:
        out_dir = os.path.join(tempfile.gettempdir(), f"jaxdec-kernels-{os.getuid()}")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, os.path.basename(path))
        if os.path.exists(path):
            return path
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = os.path.join(tmp, "qmatmul.cc")
        with open(src, "w") as f:
            f.write(_NATIVE_SOURCE)
        so = os.path.join(tmp, "qmatmul.so")
        r = subprocess.run([cxx, *flags, src, "-o", so], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the native kernels failed:\n{r.stderr[-2000:]}")
        os.replace(so, path)  # atomic: concurrent builders race harmlessly
    return path


class _Native:
    """A loaded kernel library, registered with XLA under ``jaxdec_{q4_1,q8_0,f32}_matmul{suffix}``."""

    def __init__(self, path: str, suffix: str = ""):
        import ctypes
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.JaxdecKernelIsa.restype = ctypes.c_char_p
        self.isa = self.lib.JaxdecKernelIsa().decode()
        self.targets = {k: v + suffix for k, v in _TARGETS.items()}
        jax.ffi.register_ffi_target(self.targets["q4_1"], jax.ffi.pycapsule(self.lib.JaxdecQ41Matmul),
                                    platform="cpu")
        jax.ffi.register_ffi_target(self.targets["q8_0"], jax.ffi.pycapsule(self.lib.JaxdecQ80Matmul),
                                    platform="cpu")
        jax.ffi.register_ffi_target(self.targets["f32"], jax.ffi.pycapsule(self.lib.JaxdecF32Matmul),
                                    platform="cpu")

    @staticmethod
    def _attrs() -> dict:
        return {"max_threads": np.int64(_threads()), "min_parallel_work": np.int64(_min_parallel_work())}

    def call_f32(self, x: jax.Array, w: jax.Array, index=0) -> jax.Array:
        """The float32 custom call: ``x [..., in] @ w[index].T`` for ``w [L, out, in]`` (or ``[out, in]``,
        index 0); the layer is read in place (an out-of-range index is clamped)."""
        if w.ndim not in (2, 3) or x.shape[-1] != w.shape[-1]:
            raise ValueError(f"call_f32 needs x [..., in] and W [L, out, in] or [out, in]; got {x.shape}, {w.shape}")
        res = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[-2],), jnp.float32)
        call = jax.ffi.ffi_call(self.targets["f32"], res, vmap_method="sequential")
        return call(x.astype(jnp.float32), w.astype(jnp.float32), jnp.asarray(index, jnp.int32), **self._attrs())

    def call(self, x: jax.Array, w) -> jax.Array:
        """The custom call itself (float32 ``x [..., in]``, a 2-D QTensor or a LayerSlice of a QTensor stack)."""
        if isinstance(w, LayerSlice) and not w.quantized:
            return self.call_f32(x, w.w, w.index)
        if isinstance(w, LayerSlice):
            q, index = w.w, jnp.asarray(w.index, jnp.int32)
        else:
            q, index = w, jnp.zeros((), jnp.int32)
        res = jax.ShapeDtypeStruct(x.shape[:-1] + (q.scale.shape[-2],), jnp.float32)
        attrs = self._attrs()
        call = jax.ffi.ffi_call(self.targets[q.kind], res, vmap_method="sequential")
        sdt = q.scale.dtype if q.scale.dtype in (jnp.float16, jnp.float32) else jnp.float32
        if q.kind == "q4_1":
            return call(x, q.codes, q.scale.astype(sdt), q.offset.astype(sdt), index, **attrs)
        return call(x, q.codes, q.scale.astype(sdt), index, **attrs)


_NATIVE_STATE: dict = {}


def native_kernels(required: bool = False) -> Optional[_Native]:
    """The registered native kernels, building them on first use; None (with one warning) if impossible."""
    if "lib" not in _NATIVE_STATE:
        lib, err = None, None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            err = f"native kernels are x86-64 only (this is {platform.machine()})"
        elif "cpu" not in {d.platform for d in jax.devices("cpu")}:
            err = "no CPU backend"
        else:
            try:
                lib = _Native(build_native())
            except Exception as e:  # noqa: BLE001 - any build/load failure means: use the XLA path
                err = str(e)
        _NATIVE_STATE["lib"], _NATIVE_STATE["error"] = lib, err
        if lib is None and os.environ.get("JAXDEC_QMATMUL", "auto") != "xla":
            warnings.warn(f"jaxdec: native matmul kernels unavailable, using the slower XLA path ({err}); "
                          f"tests/test_quant.py fails on this unless JAXDEC_ALLOW_NO_NATIVE=1",
                          RuntimeWarning, stacklevel=3)
    if required and _NATIVE_STATE["lib"] is None:
        raise RuntimeError(f"JAXDEC_QMATMUL=native but the native kernels are unavailable: {_NATIVE_STATE['error']}")
    return _NATIVE_STATE["lib"]
