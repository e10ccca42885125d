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

__all__ = ["DF11Tensor", "encode", "decode", "huffman_lengths", "MAX_LEN", "BLOCK"]

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


def encode(w) -> DF11Tensor:
    """bfloat16 array -> `DF11Tensor` (host side)."""
    a = np.asarray(w)
    if a.dtype != jnp.bfloat16:
        raise ValueError(f"DFloat11 encodes bfloat16 weights, got {a.dtype}")
    bits = a.reshape(-1).view(np.uint16)
    n = bits.size
    exp = ((bits >> 7) & 0xFF).astype(np.int64)
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    lengths = huffman_lengths(np.bincount(exp, minlength=256))
    codes = _canonical_codes(lengths)
    max_len = int(lengths.max())
    el, ec = lengths[exp], codes[exp]
    ends = np.cumsum(el)
    starts = ends - el
    total = int(ends[-1]) if n else 0
    owner = np.repeat(np.arange(n), el)
    j = np.arange(total) - starts[owner]
    bitv = ((ec[owner] >> (el[owner] - 1 - j)) & 1).astype(np.uint8)
    stream = np.concatenate([np.packbits(bitv), np.zeros(4, np.uint8)])
    lut_s = np.zeros(2 ** max_len, np.uint8)
    lut_l = np.zeros(2 ** max_len, np.uint8)
    for s in np.flatnonzero(lengths):
        l = int(lengths[s])
        lo = int(codes[s]) << (max_len - l)
        lut_s[lo:lo + (1 << (max_len - l))] = s
        lut_l[lo:lo + (1 << (max_len - l))] = l
    return DF11Tensor(sm, stream, starts[::BLOCK].astype(np.int64), lut_s, lut_l, max_len,
                      tuple(a.shape))


def decode(t: DF11Tensor):
    """`DF11Tensor` -> the bit-identical bfloat16 array (pure jnp; all blocks decode in parallel)."""
    n = t.size
    nb = t.block_offsets.size
    stream = jnp.asarray(t.stream).astype(jnp.uint32)
    lut_s = jnp.asarray(t.lut_symbol).astype(jnp.uint32)
    lut_l = jnp.asarray(t.lut_length).astype(jnp.int32)
    ml = t.max_len

    def step(i, carry):
        pos, out = carry  # pos [nb] bit offsets
        byte = pos >> 3
        word = (stream[byte] << 24) | (stream[byte + 1] << 16) | (stream[byte + 2] << 8) | stream[byte + 3]
        window = (word << (pos & 7).astype(jnp.uint32)) >> (32 - ml)
        sym = lut_s[window]
        out = out.at[:, i].set(sym)
        return pos + lut_l[window], out

    pos0 = jnp.asarray(t.block_offsets).astype(jnp.int32)
    _, exps = jax.lax.fori_loop(0, BLOCK, step, (pos0, jnp.zeros((nb, BLOCK), jnp.uint32)))
    exp = exps.reshape(-1)[:n]
    sm = jnp.asarray(t.sign_mantissa).astype(jnp.uint32)
    bits = ((sm & 0x80) << 8) | (exp << 7) | (sm & 0x7F)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16).reshape(t.shape)
