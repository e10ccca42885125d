"""Property tests: KV cache append / rollback / gather_block against a NumPy model of the cache (head-major
buffers ``[L,B,KVH,S,D]``; blocks of new entries ``[L,B,T,KVH,D]``)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from jaxdec.cache import KVCache, append, bucket, check_room, gather_block, rollback
from jaxdec.cache.kv import read_rows, swap_heads_slots

L, KVH, D = 2, 2, 3


@st.composite
def scenario(draw):
    b = draw(st.integers(1, 3))
    s = draw(st.integers(8, 16))
    t = draw(st.integers(1, 4))
    lens = [draw(st.integers(0, s - t)) for _ in range(b)]
    seed = draw(st.integers(0, 2**16))
    return b, s, t, lens, seed


def _np_cache(b, s, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(L, b, KVH, s, D)).astype(np.float32), rng.normal(size=(L, b, KVH, s, D)).astype(np.float32)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(scenario(), st.lists(st.booleans(), min_size=3, max_size=3))
def test_append_writes_at_each_rows_offset(sc, adv):
    b, s, t, lens, seed = sc
    k, v = _np_cache(b, s, seed)
    rng = np.random.default_rng(seed + 1)
    kn = rng.normal(size=(L, b, t, KVH, D)).astype(np.float32)
    vn = rng.normal(size=(L, b, t, KVH, D)).astype(np.float32)
    advance = np.array(adv[:b])
    c = append(KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lens, jnp.int32)), jnp.asarray(kn),
               jnp.asarray(vn), advance=jnp.asarray(advance))
    ek, ev = k.copy(), v.copy()
    for r in range(b):
        ek[:, r, :, lens[r]:lens[r] + t] = kn[:, r].swapaxes(1, 2)  # [L,T,KVH,D] -> [L,KVH,T,D]
        ev[:, r, :, lens[r]:lens[r] + t] = vn[:, r].swapaxes(1, 2)
    np.testing.assert_array_equal(np.asarray(c.k), ek)
    np.testing.assert_array_equal(np.asarray(c.v), ev)
    np.testing.assert_array_equal(np.asarray(c.lengths), np.array(lens) + np.where(advance, t, 0))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(scenario(), st.data())
def test_gather_block_compacts_accepted_path(sc, data):
    b, s, t, lens, seed = sc
    k, v = _np_cache(b, s, seed)
    idx = np.zeros((b, t), np.int32)
    keep = np.zeros((b,), np.int32)
    for r in range(b):
        n = data.draw(st.integers(0, t))
        path = sorted(data.draw(st.lists(st.integers(0, t - 1), min_size=n, max_size=n, unique=True)))
        idx[r, :n] = path
        keep[r] = n
    c = gather_block(KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lens, jnp.int32)),
                     jnp.asarray(lens, jnp.int32), jnp.asarray(idx), jnp.asarray(keep))
    ck = np.asarray(c.k)
    for r in range(b):
        for i in range(keep[r]):
            np.testing.assert_array_equal(ck[:, r, :, lens[r] + i], k[:, r, :, lens[r] + idx[r, i]])
        # committed prefix untouched
        np.testing.assert_array_equal(ck[:, r, :, :lens[r]], k[:, r, :, :lens[r]])
    np.testing.assert_array_equal(np.asarray(c.lengths), np.array(lens) + keep)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(scenario())
def test_read_rows_inverts_append(sc):
    """What `append` wrote at each row's offset comes back from `read_rows` as the block it was given
    ([L,B,T,KVH,D]); a head-major reading of the same slots as slot-major would not (KVH > 1)."""
    b, s, t, lens, seed = sc
    k, v = _np_cache(b, s, seed)
    kn = np.random.default_rng(seed + 2).normal(size=(L, b, t, KVH, D)).astype(np.float32)
    c = append(KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lens, jnp.int32)), jnp.asarray(kn), jnp.asarray(kn))
    got = np.asarray(read_rows(c.k, jnp.asarray(lens, jnp.int32), t))
    np.testing.assert_array_equal(got, kn)
    wrong = np.stack([np.asarray(c.k)[:, r].reshape(L, s, KVH, D)[:, lens[r]:lens[r] + t] for r in range(b)], 1)
    assert not np.array_equal(wrong, kn)


def test_cache_buffers_are_head_major():
    c = KVCache.create(3, 2, 16, 4, 8)
    assert c.k.shape == (3, 2, 4, 16, 8) and c.size == 16 and c.batch == 2
    assert swap_heads_slots(c.k).shape == (3, 2, 16, 4, 8)


def test_rollback_hides_rejected_entries_from_attention():
    from jaxdec.attention.reference import attend, causal_block_mask
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(1, 1, 8, 1, 4)), jnp.float32)  # [L,B,S,KVH,D] for attend
    v = jnp.asarray(rng.normal(size=(1, 1, 8, 1, 4)), jnp.float32)
    c = KVCache(swap_heads_slots(k), swap_heads_slots(v), jnp.asarray([6], jnp.int32))
    short = rollback(c, jnp.asarray([3]))
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 4)), jnp.float32)
    kn = jnp.asarray(rng.normal(size=(1, 1, 1, 4)), jnp.float32)
    pos = jnp.asarray([[3]])
    a = attend(q, swap_heads_slots(short.k)[0], swap_heads_slots(short.v)[0], short.lengths, kn, kn,
               causal_block_mask(1, 1), pos)
    # same as a cache physically truncated to 3 entries
    b = attend(q, k[0, :, :3], v[0, :, :3], jnp.asarray([3]), kn, kn, causal_block_mask(1, 1), pos)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # and different from the un-rolled-back cache (the rejected entries did matter)
    c6 = attend(q, k[0], v[0], jnp.asarray([6]), kn, kn, causal_block_mask(1, 1), jnp.asarray([[6]]))
    assert not np.allclose(np.asarray(a), np.asarray(c6))


def test_nan_beyond_length_never_leaks():
    from jaxdec.attention.reference import attend, causal_block_mask
    rng = np.random.default_rng(1)
    k = rng.normal(size=(1, 8, 1, 4)).astype(np.float32)
    v = rng.normal(size=(1, 8, 1, 4)).astype(np.float32)
    k[:, 5:] = np.nan
    v[:, 5:] = np.nan
    q = jnp.asarray(rng.normal(size=(1, 2, 1, 4)), jnp.float32)
    out = attend(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray([5]), q[:, :, :1], q[:, :, :1],
                 causal_block_mask(1, 2), jnp.asarray([[5, 6]]))
    assert np.isfinite(np.asarray(out)).all()


def test_bucket_and_room():
    assert bucket(1) == 64 and bucket(64) == 64 and bucket(65) == 128 and bucket(513) == 1024
    check_room(128, 128)
    try:
        check_room(128, 129)
    except ValueError as e:
        assert "cache too small" in str(e)
    else:
        raise AssertionError("check_room accepted an overflow")


def test_writes_past_the_end_are_dropped():
    """A block that runs past a row's last slot writes only the slots that exist: nothing shifts back over
    committed entries (a clamped dynamic_update_slice would move the whole block left), other rows are
    untouched; read_rows clamps reads the same way."""
    from jaxdec.cache.kv import read_rows, write_rows
    buf = jnp.arange(15, dtype=jnp.float32).reshape(1, 3, 1, 5, 1)  # [L=1, B=3, KVH=1, S=5, D=1]
    new = -jnp.ones((1, 3, 3, 1, 1), jnp.float32) * jnp.arange(1, 4, dtype=jnp.float32)[None, None, :, None, None]
    out = np.asarray(write_rows(buf, new, jnp.array([3, 0, 4])))[0, :, 0, :, 0]
    ref = np.arange(15, dtype=np.float32).reshape(3, 5)
    ref[0, 3:5] = [-1, -2]  # slots 3, 4; the third value falls off the end
    ref[1, 0:3] = [-1, -2, -3]
    ref[2, 4] = -1
    np.testing.assert_array_equal(out, ref)
    got = np.asarray(read_rows(buf, jnp.array([3, 0, 4]), 3))[0, :, :, 0, 0]
    np.testing.assert_array_equal(got, [[3, 4, 4], [5, 6, 7], [14, 14, 14]])
