"""DFloat11-style lossless compression of bfloat16 weights.

A bfloat16 is 1 sign bit, 8 exponent bits and 7 mantissa bits. The exponents of trained weights take
few values with a very skewed distribution (~2.6 bits of entropy), so DFloat11 entropy-codes them and
keeps sign+mantissa raw:

* ``sign_mantissa`` uint8 ``[N]``: ``sign << 7 | mantissa`` (1 byte per weight, stored as is);
* ``stream`` uint8: the exponents, Huffman-coded (canonical code, lengths capped at `MAX_LEN` bits),
  concatenated MSB-first;
* ``block_offsets`` int64 ``[N/BLOCK]``: the bit offset where each block of `BLOCK` weights starts, so
  decoding runs all blocks in parallel (DFloat11's per-thread start positions);
* the decode tables ``lut_symbol``/``lut_length`` (``2**max_len`` entries each): the next ``max_len``
  bits of the stream index the symbol and its code length.

`encode` runs on the host (NumPy); `decode` is pure ``jnp`` (usable inside ``jit``, e.g. per layer
right before the layer's matmuls) and is bit-exact: ``decode(encode(w))`` has the same bits as ``w``.
"""
from __future__ import annotations

import dataclasses
import heapq

import numpy as np

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["DF11Tensor", "DF11Stack", "encode", "decode", "encode_stack", "decode_layer", "DF11Slice", "bf16_params",
           "compress_params", "huffman_lengths", "MAX_LEN", "BLOCK"]

MAX_LEN = 16
BLOCK = 128


def huffman_lengths(freq: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Code length per symbol (0 for absent symbols); frequencies of rare symbols are raised until
    every length is <= ``max_len`` (still a valid prefix code, slightly sub-optimal)."""
    freq = np.asarray(freq, np.int64)
    present = np.flatnonzero(freq)
    if present.size == 0:
        return np.zeros(freq.shape, np.int64)
    if present.size == 1:
        out = np.zeros(freq.shape, np.int64)
        out[present[0]] = 1
        return out
    f = freq.astype(np.float64)
    floor = 0.0
    while True:
        w = np.maximum(f[present], floor)
        heap = [(w[i], i, [i]) for i in range(present.size)]
        heapq.heapify(heap)
        depth = np.zeros(present.size, np.int64)
        tie = present.size
        while len(heap) > 1:
            a, _, sa = heapq.heappop(heap)
            b, _, sb = heapq.heappop(heap)
            depth[sa] += 1
            depth[sb] += 1
            heapq.heappush(heap, (a + b, tie, sa + sb))
            tie += 1
        if depth.max() <= max_len:
            out = np.zeros(freq.shape, np.int64)
            out[present] = depth
            return out
        floor = max(floor * 2, f.sum() / 2 ** max_len)


def _canonical_codes(lengths):
    """Canonical Huffman codes (ints) for the given lengths (symbols sorted by (length, symbol))."""
    codes = np.zeros(lengths.shape, np.int64)
    order = sorted((int(l), s) for s, l in enumerate(lengths) if l > 0)
    code, prev = 0, order[0][0]
    for i, (l, s) in enumerate(order):
        if i:
            code = (code + 1) << (l - prev)
        prev = l
        codes[s] = code
    return codes


@dataclasses.dataclass
class DF11Tensor:
    sign_mantissa: np.ndarray  # uint8 [N]
    stream: np.ndarray  # uint8 [bytes] (+4 bytes of padding)
    block_offsets: np.ndarray  # int64 [ceil(N/BLOCK)]
    lut_symbol: np.ndarray  # uint8 [2**max_len]
    lut_length: np.ndarray  # uint8 [2**max_len]
    max_len: int
    shape: tuple

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def nbytes(self, with_tables: bool = True) -> int:
        n = self.sign_mantissa.nbytes + self.stream.nbytes + self.block_offsets.size * 4
        if with_tables:
            n += self.lut_symbol.nbytes + self.lut_length.nbytes
        return n

    def ratio(self, with_tables: bool = True) -> float:
        """Compressed size / bfloat16 size."""
        return self.nbytes(with_tables) / (2 * self.size)


def _code_tables(lengths, codes, max_len):
    lut_s = np.zeros(2 ** max_len, np.uint8)
    lut_l = np.zeros(2 ** max_len, np.uint8)
    for s in np.flatnonzero(lengths):
        ln = int(lengths[s])
        lo = int(codes[s]) << (max_len - ln)
        lut_s[lo:lo + (1 << (max_len - ln))] = s
        lut_l[lo:lo + (1 << (max_len - ln))] = ln
    return lut_s, lut_l


def _bitstream(exp, lengths, codes):
    """MSB-first concatenation of the codes of ``exp`` -> (packed bytes, start bit of each symbol).

    Codes are at most 16 bits, so each one touches at most 3 bytes: shift it into a 24-bit window
    aligned to its first byte and add the three bytes into place (codes never share a bit, so adding
    is OR-ing; `np.bincount` does the scatter-add exactly in float64)."""
    el, ec = lengths[exp], codes[exp]
    ends = np.cumsum(el)
    starts = ends - el
    nbytes = (int(ends[-1]) + 7) // 8 if exp.size else 0
    first = starts >> 3
    window = ec << (24 - el - (starts & 7))
    out = np.zeros(nbytes + 2, np.float64)
    for j, shift in enumerate((16, 8, 0)):
        out += np.bincount(first + j, weights=(window >> shift) & 0xFF, minlength=nbytes + 2)[:nbytes + 2]
    return out[:nbytes].astype(np.uint8), starts


def encode(w) -> DF11Tensor:
    """bfloat16 array -> `DF11Tensor` (host side)."""
    a = np.asarray(w)
    if a.dtype != jnp.bfloat16:
        raise ValueError(f"DFloat11 encodes bfloat16 weights, got {a.dtype}")
    bits = a.reshape(-1).view(np.uint16)
    exp = ((bits >> 7) & 0xFF).astype(np.int64)
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    lengths = huffman_lengths(np.bincount(exp, minlength=256))
    codes = _canonical_codes(lengths)
    max_len = max(int(lengths.max()), 1)
    packed, starts = _bitstream(exp, lengths, codes)
    lut_s, lut_l = _code_tables(lengths, codes, max_len)
    return DF11Tensor(sm, np.concatenate([packed, np.zeros(4, np.uint8)]), starts[::BLOCK].astype(np.int64),
                      lut_s, lut_l, max_len, tuple(a.shape))


def _decode_exponents(stream, block_offsets, lut_symbol, lut_length, max_len: int, n: int):
    """Exponent bytes of ``n`` weights: every block of `BLOCK` codes decodes in parallel, one code per
    step (``stream`` uint8 with 4 bytes of padding; ``block_offsets`` the start bit of each block)."""
    stream = stream.astype(jnp.uint32)
    lut_s = lut_symbol.astype(jnp.uint32)
    lut_l = lut_length.astype(jnp.int32)

    def step(pos, _):  # pos [nb] bit offsets
        byte = pos >> 3
        word = (stream[byte] << 24) | (stream[byte + 1] << 16) | (stream[byte + 2] << 8) | stream[byte + 3]
        window = (word << (pos & 7).astype(jnp.uint32)) >> (32 - max_len)
        return pos + lut_l[window], lut_s[window]

    _, syms = jax.lax.scan(step, block_offsets.astype(jnp.int32), None, length=BLOCK)  # [BLOCK, nb]
    return syms.T.reshape(-1)[:n]


def _assemble(sign_mantissa, exp, shape):
    sm = sign_mantissa.astype(jnp.uint32)
    bits = ((sm & 0x80) << 8) | (exp << 7) | (sm & 0x7F)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16).reshape(shape)


def decode(t: DF11Tensor):
    """`DF11Tensor` -> the bit-identical bfloat16 array (pure jnp; all blocks decode in parallel)."""
    exp = _decode_exponents(jnp.asarray(t.stream), jnp.asarray(t.block_offsets), jnp.asarray(t.lut_symbol),
                            jnp.asarray(t.lut_length), t.max_len, t.size)
    return _assemble(jnp.asarray(t.sign_mantissa), exp, t.shape)


# --------------------------------------------------------------- stacked layer weights inside the model
@struct.dataclass
class DF11Stack:
    """A stacked ``[L, out, in]`` bfloat16 weight kept compressed (one Huffman code for all layers).

    Only these bytes live in memory; `matmul` (``jaxdec.quant``) decodes layer ``i`` inside the
    layer scan right before its product (`decode_layer`), so at most one layer's matrix is ever
    materialised. Arrays: ``sign_mantissa`` uint8 ``[L, out*in]``, ``stream`` uint8 ``[L, bytes]``
    (each layer's code stream, zero-padded to the longest), ``block_offsets`` int32 ``[L, nb]``,
    ``lut_symbol``/``lut_length`` uint8 ``[2**max_len]`` (shared).
    """

    sign_mantissa: jax.Array
    stream: jax.Array
    block_offsets: jax.Array
    lut_symbol: jax.Array
    lut_length: jax.Array
    max_len: int = struct.field(pytree_node=False)
    shape: tuple = struct.field(pytree_node=False)  # [L, out, in]

    @property
    def dtype(self):
        return jnp.bfloat16

    def nbytes(self) -> int:
        return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in
                       (self.sign_mantissa, self.stream, self.block_offsets, self.lut_symbol, self.lut_length)))

    def ratio(self) -> float:
        """Compressed bytes / bfloat16 bytes."""
        return self.nbytes() / (2 * int(np.prod(self.shape)))


def encode_stack(w) -> DF11Stack:
    """bfloat16 ``[L, out, in]`` -> `DF11Stack` (host side)."""
    a = np.asarray(w)
    if a.dtype != jnp.bfloat16:
        raise ValueError(f"DFloat11 encodes bfloat16 weights, got {a.dtype}")
    if a.ndim != 3:
        raise ValueError(f"encode_stack expects a stacked [L, out, in] weight, got shape {a.shape}")
    bits = a.reshape(a.shape[0], -1).view(np.uint16)
    exp = ((bits >> 7) & 0xFF).astype(np.int64)
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    lengths = huffman_lengths(np.bincount(exp.reshape(-1), minlength=256))
    codes = _canonical_codes(lengths)
    max_len = max(int(lengths.max()), 1)
    streams, offsets = [], []
    for layer_exp in exp:
        packed, starts = _bitstream(layer_exp, lengths, codes)
        streams.append(packed)
        offsets.append(starts[::BLOCK].astype(np.int32))
    width = max(s.size for s in streams) + 4
    stream = np.zeros((len(streams), width), np.uint8)
    for i, s in enumerate(streams):
        stream[i, :s.size] = s
    lut_s, lut_l = _code_tables(lengths, codes, max_len)
    return DF11Stack(jnp.asarray(sm), jnp.asarray(stream), jnp.asarray(np.stack(offsets)), jnp.asarray(lut_s),
                     jnp.asarray(lut_l), max_len, tuple(a.shape))


def decode_layer(s: DF11Stack, index) -> jax.Array:
    """Layer ``index`` (traced) of a `DF11Stack` as the bit-identical bfloat16 ``[out, in]`` matrix."""
    pick = lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False)
    n = s.shape[1] * s.shape[2]
    exp = _decode_exponents(pick(s.stream), pick(s.block_offsets), s.lut_symbol, s.lut_length, s.max_len, n)
    return _assemble(pick(s.sign_mantissa), exp, s.shape[1:])


@struct.dataclass
class DF11Slice:
    """Layer ``index`` of a `DF11Stack`, decoded only when a product needs it (`materialize`), so a
    layer skipped by the model's ``layers`` mask is never decoded."""

    w: DF11Stack
    index: jax.Array

    @property
    def shape(self):
        return self.w.shape[1:]

    def materialize(self) -> jax.Array:
        return decode_layer(self.w, self.index)


LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def bf16_params(params):
    """Round every weight matrix of float32 model params to bfloat16 (norms and biases stay float32):
    the model DFloat11 compresses losslessly. Block-quantized params are refused."""
    def cast(a):
        if not isinstance(a, (jax.Array, np.ndarray)):
            raise ValueError(f"bf16_params needs float32 params, found {type(a).__name__}")
        return jnp.asarray(a, jnp.bfloat16)
    out = dict(params)
    out["embed"] = cast(params["embed"])
    if "lm_head" in params:
        out["lm_head"] = cast(params["lm_head"])
    out["layers"] = {k: (cast(v) if k in LAYER_MATRICES else v) for k, v in params["layers"].items()}
    return out


def compress_params(params):
    """bfloat16 model params (`bf16_params`) -> the same params with every stacked layer matrix a
    `DF11Stack`. The embedding / LM head stay bfloat16 (the head is one [V, E] product per token and
    the embedding is read by rows; decoding them whole each step would cost more than they save)."""
    layers = dict(params["layers"])
    for k in LAYER_MATRICES:
        if k in layers:
            layers[k] = encode_stack(layers[k])
    return dict(params, layers=layers)
