"""Block-quantized weights kept as stored in GGUF (Q4_1, Q8_0) and dequantized inside jitted matmuls.

A `QTensor` is a pytree standing for a `[out, in]` float matrix W stored in blocks of 32 along `in`:

* Q4_1: ``codes`` uint8 ``[out, in/32, 16]`` (two 4-bit codes per byte: element i of a block is the low
  nibble of byte i for i < 16 and the high nibble of byte i-16 otherwise, GGUF's layout),
  ``scale``/``offset`` float32 ``[out, in/32]``; ``W = code * scale + offset``.
* Q8_0: ``codes`` int8 ``[out, in/32, 32]``, ``scale`` ``[out, in/32]``, ``offset`` None; ``W = code * scale``.

`dequantize` gives exactly the float32 matrix that `gguf.quants.dequantize` gives (the same float32
products), so the block-quantized path computes with the same weights as the float32 path.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

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


def _unpack(codes: jax.Array, kind: str) -> jax.Array:
    if kind == "q4_1":
        lo = codes & 0x0F
        hi = codes >> 4
        return jnp.concatenate([lo, hi], axis=-1)
    return codes


def dequantize(w) -> jax.Array:
    """Float32 `[..., out, in]` matrix of a QTensor (identity on plain arrays)."""
    if not isinstance(w, QTensor):
        return w
    q = _unpack(w.codes, w.kind).astype(jnp.float32)
    deq = q * w.scale[..., None]
    if w.offset is not None:
        deq = deq + w.offset[..., None]
    return deq.reshape(w.shape)


def matmul(x: jax.Array, w) -> jax.Array:
    """``x @ W.T`` for ``x [..., in]`` and a float or block-quantized ``W [out, in]``."""
    return jnp.einsum("...i,oi->...o", x, dequantize(w))


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
