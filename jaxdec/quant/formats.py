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

    w: QTensor | PackedQ8 | jax.Array
    index: jax.Array

    @property
    def shape(self):
        return self.w.shape[1:]

    @property
    def kind(self):
        """The QTensor's (or PackedQ8's) kind, or "f32" for a float array stack."""
        return self.w.kind if isinstance(self.w, (QTensor, PackedQ8)) else "f32"

    @property
    def quantized(self) -> bool:
        return isinstance(self.w, (QTensor, PackedQ8))

    def materialize(self) -> QTensor | jax.Array:
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.index, 0, keepdims=False), self.w)


@struct.dataclass
class PackedQ8:
    """A QTensor repacked for the int8-activation kernel (``activations="q8"``, lossy, opt-in): output
    features in groups of 16, so that one 64-byte load holds 4 consecutive codes of each of 16 outputs.

    ``codes`` uint8 ``[..., G, nb, C, 16, 4]`` (G = ceil(out / 16); Q4_1: C = 4 and byte i of chunk c holds
    block elements 8c+i (low nibble) and 8c+4+i (high nibble); Q8_0: C = 8, byte i of chunk c holds element
    4c+i as code + 128), ``scale``/``offset`` ``[..., G, nb, 16]``, float16 when that holds them exactly (GGUF's
    own scales always are), else float32 (offset None for Q8_0); padded
    outputs have zero codes and scales. `pack_q8` makes one from a QTensor, `unpack_q8` gives it back."""

    codes: jax.Array
    scale: jax.Array
    offset: Optional[jax.Array]
    kind: str = struct.field(pytree_node=False, default="q4_1")
    out: int = struct.field(pytree_node=False, default=0)

    @property
    def shape(self):
        return tuple(self.scale.shape[:-3]) + (self.out, self.scale.shape[-2] * BLOCK)


def pack_q8(w: QTensor) -> PackedQ8:
    """Repack a (stacked) Q4_1 or Q8_0 QTensor for the int8-activation kernel (host-side, numpy)."""
    if not isinstance(w, QTensor) or w.kind not in ("q4_1", "q8_0"):
        raise ValueError(f"pack_q8 needs a Q4_1 or Q8_0 QTensor, got {type(w).__name__}")
    codes = np.asarray(w.codes)
    lead, (n, nb) = codes.shape[:-3], codes.shape[-3:-1]
    g = -(-n // 16)
    pad = [(0, 0)] * len(lead) + [(0, g * 16 - n), (0, 0)]
    scale = np.pad(np.asarray(w.scale, np.float32), pad)
    k = len(lead)
    # [..., G, 16, nb] -> [..., G, nb, 16]
    to_lanes = lambda a: np.moveaxis(a.reshape(lead + (g, 16, nb)), k + 1, k + 2)
    if w.kind == "q4_1":
        full = np.concatenate([codes & 0x0F, codes >> 4], axis=-1)  # [..., n, nb, 32] in element order
        full = np.pad(full, pad + [(0, 0)]).reshape(lead + (g, 16, nb, 4, 2, 4))  # k = 8c + 4h + i
        packed = (full[..., 0, :] | (full[..., 1, :] << 4)).astype(np.uint8)  # [..., G, 16, nb, 4, 4]
        offset = to_lanes(np.pad(np.asarray(w.offset, np.float32), pad))
    else:
        full = (codes.astype(np.int16) + 128).astype(np.uint8)
        full = np.pad(full, pad + [(0, 0)], constant_values=128)
        packed = full.reshape(lead + (g, 16, nb, 8, 4))
        offset = None
    # [..., G, 16, nb, C, 4] -> [..., G, nb, C, 16, 4]
    packed = np.moveaxis(packed, k + 1, k + 3)
    scale = to_lanes(scale)
    # float16 as GGUF stores them (12 % fewer bytes per Q4_1 block), when that is exact; else float32
    half = all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in (scale, offset) if a is not None)
    dt = np.float16 if half else np.float32
    return PackedQ8(jnp.asarray(np.ascontiguousarray(packed)), jnp.asarray(np.ascontiguousarray(scale.astype(dt))),
                    None if offset is None else jnp.asarray(np.ascontiguousarray(offset.astype(dt))), w.kind, int(n))


def unpack_q8(w: PackedQ8) -> QTensor:
    """The QTensor a PackedQ8 was made from (traceable; for the XLA path and checks)."""
    c = w.codes
    lead = c.shape[:-5]
    g, nb, cc = c.shape[-5:-2]
    k = len(lead)
    c = jnp.moveaxis(c, k + 3, k + 1)  # [..., G, 16, nb, C, 4]
    lanes = lambda a: jnp.moveaxis(a, k + 2, k + 1).reshape(lead + (g * 16, nb))[..., :w.out, :]
    if w.kind == "q4_1":
        full = jnp.stack([c & 0x0F, c >> 4], axis=-2).reshape(lead + (g * 16, nb, 32))[..., :w.out, :, :]
        codes = (full[..., :16] | (full[..., 16:] << 4)).astype(jnp.uint8)
        return QTensor(codes, lanes(w.scale).astype(jnp.float32), lanes(w.offset).astype(jnp.float32), "q4_1")
    codes = (c.astype(jnp.int16) - 128).astype(jnp.int8).reshape(lead + (g * 16, nb, 32))[..., :w.out, :, :]
    return QTensor(codes, lanes(w.scale).astype(jnp.float32), None, "q8_0")


def pack_params_q8(params: dict) -> dict:
    """Params of a ``weights="q"`` model for int8 activations: every block-quantized layer matrix repacked
    (`pack_q8`) and the LM head too (a tied one gets its own packed ``lm_head``; the embedding table stays
    as it is, for row lookups). Float tensors (norms) are unchanged."""
    out = dict(params)
    out["layers"] = {k: pack_q8(v) if isinstance(v, QTensor) else v for k, v in params["layers"].items()}
    head = params.get("lm_head", params["embed"])
    if isinstance(head, QTensor):
        out["lm_head"] = pack_q8(head)
    if not any(isinstance(v, PackedQ8) for v in jax.tree.leaves(out, is_leaf=lambda v: isinstance(v, PackedQ8))):
        raise ValueError("activations='q8' needs block-quantized weights (weights='q'); these params have none")
    return out


def quantize_activations(x: jax.Array) -> tuple:
    """Per-32-block int8 quantization of ``x [..., K]`` as the kernel does it: (q int32 ``[..., nb, 32]``,
    dx float32 ``[..., nb]``) with dx = max|x| / 127 and q = round-half-even(x * (1 / dx))."""
    xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // BLOCK, BLOCK))
    d = jnp.max(jnp.abs(xb), axis=-1) / jnp.float32(127.0)
    inv = jnp.where(d != 0, jnp.float32(1.0) / jnp.where(d != 0, d, 1), 0)
    return jnp.round(xb * inv[..., None]).astype(jnp.int32), d


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
    if isinstance(w, PackedQ8):
        w = unpack_q8(w)
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
    if isinstance(v, (QTensor, PackedQ8, DF11Stack)):
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

