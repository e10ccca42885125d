"""Block-quantized tensor formats kept as stored in GGUF (Q4_1, Q8_0): `QTensor`, `LayerSlice` (one layer
of a stacked tensor, read in place), exact dequantization, conversion from GGUF bytes, and the split of
stacked layer params for `lax.scan`. See `jaxdec.quant` for the formats' layout."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.compress.dfloat11 import DF11Slice, DF11Stack

BLOCK = 32


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

