"""KV memory: Hydragen shared-prefix attention, compressed KV caches (KIVI, GEAR, Mustafar, Double
Sparsity) and their byte accounting. Small random inputs only (fast on CPU)."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdec.attention.reference import attend, causal_block_mask
from jaxdec.attention.hydragen import hydragen_attend, split_shared_prefix


def _close(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * max(np.abs(ref).max(), 1e-30))


def _hydragen_case(seed, b=5, t=3, h=9, kvh=3, d=16, p_cap=24, prefix_len=19, s_cap=11,
                   sliding_window=None, poison=True):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    q = f(b, t, h, d)
    pk, pv = f(p_cap, kvh, d), f(p_cap, kvh, d)
    sk, sv = f(b, s_cap, kvh, d), f(b, s_cap, kvh, d)
    suf = jnp.asarray(rng.integers(0, s_cap + 1, size=b).astype(np.int32))
    suf = suf.at[0].set(0).at[1].set(s_cap)  # empty and full suffixes
    if poison:  # garbage past the valid entries must never leak
        pk = pk.at[prefix_len:].set(jnp.nan)
        pv = pv.at[prefix_len:].set(jnp.nan)
        mask = (jnp.arange(s_cap)[None, :] >= suf[:, None])[:, :, None, None]
        sk = jnp.where(mask, jnp.nan, sk)
        sv = jnp.where(mask, jnp.nan, sv)
    kn, vn = f(b, t, kvh, d), f(b, t, kvh, d)
    bm = causal_block_mask(b, t)
    qpos = (prefix_len + suf)[:, None] + jnp.arange(t)[None, :]
    out = hydragen_attend(q, pk, pv, prefix_len, sk, sv, suf, kn, vn, bm, qpos,
                          sliding_window=sliding_window)
    # reference: the concatenated per-row cache
    s = prefix_len + s_cap
    kc = np.zeros((b, s, kvh, d), np.float32)
    vc = np.zeros((b, s, kvh, d), np.float32)
    for i in range(b):
        n = int(suf[i])
        kc[i, :prefix_len] = np.asarray(pk[:prefix_len])
        vc[i, :prefix_len] = np.asarray(pv[:prefix_len])
        kc[i, prefix_len:prefix_len + n] = np.asarray(sk[i, :n])
        vc[i, prefix_len:prefix_len + n] = np.asarray(sv[i, :n])
    ref = attend(q, jnp.asarray(kc), jnp.asarray(vc), prefix_len + suf, kn, vn, bm, qpos,
                 sliding_window=sliding_window)
    return out, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hydragen_equals_attend(seed):
    out, ref = _hydragen_case(seed)
    _close(out, ref)


def test_hydragen_decode_step_sliding_window_and_empty_prefix():
    out, ref = _hydragen_case(3, t=1, sliding_window=7)
    _close(out, ref)
    out, ref = _hydragen_case(4, prefix_len=0, poison=True)
    _close(out, ref)


def test_hydragen_fully_masked_rows_zero():
    b, t, h, kvh, d = 2, 2, 9, 3, 8
    z = jnp.zeros
    q = jnp.ones((b, t, h, d))
    out = hydragen_attend(q, z((4, kvh, d)), z((4, kvh, d)), 0, z((b, 3, kvh, d)), z((b, 3, kvh, d)),
                          jnp.zeros((b,), jnp.int32), z((b, t, kvh, d)), z((b, t, kvh, d)),
                          jnp.zeros((b, t, t), bool), jnp.zeros((b, t), jnp.int32))
    assert np.all(np.asarray(out) == 0)


def test_split_shared_prefix_round_trip():
    rng = np.random.default_rng(5)
    b, s, kvh, d, p = 4, 20, 3, 8, 9
    k = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    k[:, :p] = k[0, :p]
    v[:, :p] = v[0, :p]
    lengths = jnp.asarray([9, 12, 20, 15], jnp.int32)
    pk, pv, sk, sv, sl = split_shared_prefix(jnp.asarray(k), jnp.asarray(v), lengths, p)
    q = jnp.asarray(rng.normal(size=(b, 1, 9, d)).astype(np.float32))
    kn = jnp.asarray(rng.normal(size=(b, 1, kvh, d)).astype(np.float32))
    vn = jnp.asarray(rng.normal(size=(b, 1, kvh, d)).astype(np.float32))
    bm = causal_block_mask(b, 1)
    qpos = lengths[:, None]
    out = hydragen_attend(q, pk, pv, p, sk, sv, sl, kn, vn, bm, qpos)
    ref = attend(q, jnp.asarray(k), jnp.asarray(v), lengths, kn, vn, bm, qpos)
    _close(out, ref)
