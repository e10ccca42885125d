"""DFloat11-style lossless bfloat16 compression: bit-identical round trips."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdec.compress.dfloat11 import BLOCK, MAX_LEN, decode, encode, huffman_lengths


def _bits(x):
    return np.asarray(x).view(np.uint16)


@pytest.mark.parametrize("shape", [(257, 129), (BLOCK,), (3,)])
def test_round_trip_bit_identical(shape):
    rng = np.random.default_rng(0)
    w = (rng.normal(size=shape) * 0.02).astype(jnp.bfloat16)
    flat = w.reshape(-1)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e38, 1.0], np.float32)
    flat[: min(flat.size, specials.size)] = specials[: flat.size].astype(jnp.bfloat16)
    t = encode(w)
    out = jax.jit(lambda: decode(t))()
    assert out.dtype == jnp.bfloat16 and out.shape == w.shape
    np.testing.assert_array_equal(_bits(out), _bits(w))
    if w.size > 1000:
        assert t.ratio(with_tables=False) < 0.8  # ~11 bits per weight (decode tables are per tensor)


def test_skewed_frequencies_respect_max_len_and_prefix_property():
    freq = np.zeros(256, np.int64)
    freq[:40] = (10 ** np.linspace(9, 0, 40)).astype(np.int64)
    ln = huffman_lengths(freq)
    assert ln.max() <= MAX_LEN and np.all(ln[:40] > 0) and np.all(ln[40:] == 0)
    assert np.sum(2.0 ** -ln[:40]) <= 1.0 + 1e-12  # Kraft


def test_rejects_non_bf16():
    with pytest.raises(ValueError, match="bfloat16"):
        encode(np.zeros(4, np.float32))
