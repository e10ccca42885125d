"""`jaxdec.core.reduce.argmax` (the decoders' argmax) gives jnp.argmax's index for every input: ties (the
first maximum), -inf rows, NaN rows (the first NaN), any leading shape."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdec.core.reduce import argmax

FAST = jax.jit(argmax)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), n=st.integers(1, 70), levels=st.integers(1, 4), seed=st.integers(0, 2 ** 31 - 1),
       specials=st.lists(st.sampled_from(["nan", "-inf", "inf", "ninf_row"]), max_size=3))
def test_argmax_equals_jnp_argmax(rows, n, levels, seed, specials):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, (rows, n)).astype(np.float32)  # few distinct values: many ties
    for s in specials:
        r, c = rng.integers(rows), rng.integers(n)
        if s == "ninf_row":
            x[r] = -np.inf
        else:
            x[r, c] = {"nan": np.nan, "-inf": -np.inf, "inf": np.inf}[s]
    got = np.asarray(FAST(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))


def test_vocabulary_sized_rows_and_leading_dims():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 49152)).astype(np.float32)
    x[0, 1, [7, 9000]] = 50.0  # a tie far apart: the first index wins
    got = np.asarray(FAST(jnp.asarray(x)))
    assert got[0, 1] == 7
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    last = x.shape[-1] - 1 - np.argmax(x[..., ::-1], axis=-1)  # negative control: the last maximum differs
    assert (last != got).any()
