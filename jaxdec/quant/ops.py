"""``x @ W.T`` for float, block-quantized (`QTensor`), stacked (`LayerSlice`) and DFloat11 weights: the
native-kernel path and the pure-XLA fallback (see `jaxdec.quant` for when each runs)."""
from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.compress.dfloat11 import DF11Slice
from jaxdec.quant.formats import LayerSlice, PackedQ8, QTensor, dequantize, quantize_activations, unpack_q8
from jaxdec.quant.native import native_kernels

IMPLS = ("auto", "native", "xla")
# float32 LayerSlice products with at most this many activation rows run the native kernel (more rows:
# XLA's dot, whose operand packing pays off with enough rows; whole-model crossover measured at 64-96
# rows, see experiments/results/perf_notes.md section 2.4)
F32_NATIVE_MAX_ROWS = 32


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
    if isinstance(w, PackedQ8) or (isinstance(w, LayerSlice) and isinstance(w.w, PackedQ8)):
        return _matmul_q8a(x, w, _impl(impl))
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


def _matmul_q8a(x: jax.Array, w, impl: str) -> jax.Array:
    """Int8 activations against repacked weights (lossy): the native VNNI kernel on CPU, else
    `q8a_reference` (the same quantization of x, float32 products)."""
    if impl != "xla" and x.dtype == jnp.float32 and (jax.default_backend() == "cpu" or impl == "native"):
        lib = native_kernels(required=(impl == "native"))
        if lib is not None and lib.has_q8a:
            return jax.lax.platform_dependent(x, cpu=lambda x_: _q8a_native(x_, w),
                                              default=lambda x_: q8a_reference(x_, w))
        if impl == "native":
            raise RuntimeError("JAXDEC_QMATMUL=native but this CPU has no AVX512-VNNI for int8 activations")
    return q8a_reference(x, w)


def q8a_reference(x: jax.Array, w) -> jax.Array:
    """What the int8-activation kernel computes, in XLA: x quantized per 32-element block (as the kernel
    does, `quantize_activations`), dequantized, times the exact weights."""
    if isinstance(w, LayerSlice):
        w = w.materialize()
    q, d = quantize_activations(x)
    xq = (q.astype(jnp.float32) * d[..., None]).reshape(x.shape)
    return _matmul_xla(xq, unpack_q8(w))


@jax.custom_jvp
def _q8a_native(x, w):
    return native_kernels(required=True).call_q8a(x, w)


@_q8a_native.defjvp
def _q8a_native_jvp(primals, tangents):
    """Straight-through: the tangent in x is that of the exact product (quantization has zero derivative
    almost everywhere, which would stop every gradient)."""
    x, w = primals
    dx, _ = tangents
    return _q8a_native(x, w), _matmul_xla(dx, unpack_q8(w.materialize() if isinstance(w, LayerSlice) else w))


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


@jax.custom_jvp
def _matmul_native(x, w):
    return native_kernels(required=True).call(x, w)


@_matmul_native.defjvp
def _matmul_native_jvp(primals, tangents):
    x, w = primals
    dx, _ = tangents  # the weights are constants (integer codes): no tangent flows into them
    return _matmul_native(x, w), _matmul_xla(dx, w)

