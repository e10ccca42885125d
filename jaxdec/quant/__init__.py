"""Quantized tensors: block-quantized weights kept as stored in GGUF (Q4_1, Q8_0) and dequantized inside jitted matmuls.

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
kernel on CPU: an XLA FFI custom call (C++ source ``jaxdec/kernels/cpu/qmatmul.cc``, compiled once per
machine with the system C++ compiler into ``~/.cache/jaxdec/kernels`` by ``python -m jaxdec.kernels build``,
which ``make install`` runs, or else on first use; see `jaxdec.kernels.build`) that reads the codes as stored, builds each block's weights in
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

Int8 activations (``jaxdec.load(..., activations="q8")``, lossy, opt-in): `pack_params_q8` repacks every
block-quantized matrix (and the LM head) into `PackedQ8` (16 output features per 64-byte load); `matmul` then
quantizes x per 32-element block (`quantize_activations`) and runs integer dot products (AVX512-VNNI kernel
``jaxdec_q8a_matmul``; elsewhere `q8a_reference`, the same quantization in XLA). See perf_notes section 5.

Modules: `formats` (QTensor, PackedQ8, LayerSlice, dequantize, GGUF conversion, packing, scan_layer_params),
`ops` (matmul, native and XLA paths), `native` (loading and registering the compiled kernels).
"""
from jaxdec.quant.formats import (BLOCK, LayerSlice, PackedQ8, QTensor, dequantize, embed_lookup, from_gguf_bytes,
                                  pack_params_q8, pack_q8, quantize_activations, scan_layer_params, stack,
                                  unpack_q8)
from jaxdec.quant.native import build_native, native_kernels
from jaxdec.quant.ops import F32_NATIVE_MAX_ROWS, IMPLS, f32_native_max_rows, matmul, q8a_reference

__all__ = ["BLOCK", "IMPLS", "F32_NATIVE_MAX_ROWS", "LayerSlice", "PackedQ8", "QTensor", "build_native", "dequantize",
           "embed_lookup", "f32_native_max_rows", "from_gguf_bytes", "matmul", "native_kernels", "pack_params_q8",
           "pack_q8", "q8a_reference", "quantize_activations", "scan_layer_params", "stack", "unpack_q8"]
