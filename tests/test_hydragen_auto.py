"""Hydragen used automatically: rows that share one prompt decode against ONE prefix copy.

* shared-prefix `KVCache` properties: append / rollback / gather_block / beam reorder / row expansion
  on a prefix cache leave exactly the visible contents that the same operations leave on an ordinary
  cache holding the prompt in every row (NumPy model of the plain cache, hypothesis, derandomized);
* on the real default model (float32): the Hydragen path (what auto, `shared_prefix=None`, picks)
  and the plain path (`shared_prefix=False`) give the same tokens for n>1 sampling with fixed seeds and
  for beam search with 4 beams; a spy model records at trace time that the cache it was handed really
  had a shared prefix on the Hydragen path and none on the plain path (so the test cannot pass through
  the plain path twice);
* the auto rule and the forced-path errors.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxdec.cache.kv import KVCache, append, check_room, gather_block, rollback, to_plain
from jaxdec.core.generate import prefix_groups, use_shared_prefix
from jaxdec.models.llama import LlamaModel
from jaxdec.search.common import expand_cache, reorder_cache

L, KVH, D = 2, 2, 3  # the NumPy model below is slot-major [L,B,S,KVH,D]; KVCache buffers are head-major


# ------------------------------------------------------------------------------------------------
# cache properties: prefix mode == the plain cache's visible contents
# ------------------------------------------------------------------------------------------------
@st.composite
def prefix_scenario(draw):
    g = draw(st.integers(1, 3))  # prefix groups (prompts)
    b = g * draw(st.integers(1, 3))  # rows, B // G per group
    p_cap = draw(st.integers(1, 8))
    plen = [draw(st.integers(0, p_cap)) for _ in range(g)]
    s = draw(st.integers(6, 12))
    t = draw(st.integers(1, 4))
    suf = [draw(st.integers(0, s - t)) for _ in range(b)]
    seed = draw(st.integers(0, 2**16))
    return b, g, p_cap, plen, s, t, suf, seed


def _make(b, g, p_cap, plen, s, suf, seed):
    """(prefix-mode cache, NumPy plain k, v [L,B,p_cap+s,KVH,D], lengths, per-row prefix lengths)."""
    rng = np.random.default_rng(seed)
    pk, pv = (rng.normal(size=(L, g, p_cap, KVH, D)).astype(np.float32) for _ in range(2))
    sk, sv = (rng.normal(size=(L, b, s, KVH, D)).astype(np.float32) for _ in range(2))
    row_plen = np.repeat(np.array(plen, np.int32), b // g)
    lengths = (row_plen + np.array(suf, np.int32)).astype(np.int32)
    for gi in range(g):  # prefix slots past prefix_len are garbage and must never show
        pk[:, gi, plen[gi]:] = np.nan
        pv[:, gi, plen[gi]:] = np.nan
    cache = KVCache(jnp.asarray(sk.swapaxes(2, 3)), jnp.asarray(sv.swapaxes(2, 3)), jnp.asarray(lengths),
                    jnp.asarray(pk), jnp.asarray(pv), jnp.asarray(plen, jnp.int32))
    kk = np.zeros((L, b, p_cap + s, KVH, D), np.float32)
    vv = np.zeros_like(kk)
    for r in range(b):
        pl, gi = row_plen[r], r // (b // g)
        kk[:, r, :pl], vv[:, r, :pl] = pk[:, gi, :pl], pv[:, gi, :pl]
        kk[:, r, pl:pl + s], vv[:, r, pl:pl + s] = sk[:, r], sv[:, r]
    return cache, kk, vv, lengths, row_plen


def _visible_equal(cache, kk, vv, lengths):
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    plain = to_plain(cache)
    pk, pv = np.asarray(plain.k).swapaxes(2, 3), np.asarray(plain.v).swapaxes(2, 3)
    for r, n in enumerate(lengths):
        np.testing.assert_array_equal(pk[:, r, :n], kk[:, r, :n])
        np.testing.assert_array_equal(pv[:, r, :n], vv[:, r, :n])


@settings(max_examples=15, deadline=None, derandomize=True)
@given(prefix_scenario(), st.data())
def test_prefix_cache_append_rollback_gather_equal_plain(sc, data):
    b, g, p_cap, plen, s, t, suf, seed = sc
    cache, kk, vv, lens, row_plen = _make(b, g, p_cap, plen, s, suf, seed)
    _visible_equal(cache, kk, vv, lens)
    np.testing.assert_array_equal(np.asarray(cache.offsets), lens - row_plen)
    check_room(cache, min(plen) + s)
    with pytest.raises(ValueError, match="cache too small"):
        check_room(cache, min(plen) + s + 1)
    # append (some rows advance)
    rng = np.random.default_rng(seed + 1)
    kn, vn = (rng.normal(size=(L, b, t, KVH, D)).astype(np.float32) for _ in range(2))
    adv = np.array(data.draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    cache = append(cache, jnp.asarray(kn), jnp.asarray(vn), advance=jnp.asarray(adv))
    for r in range(b):
        kk[:, r, lens[r]:lens[r] + t] = kn[:, r]
        vv[:, r, lens[r]:lens[r] + t] = vn[:, r]
    start = lens.copy()
    lens = lens + np.where(adv, t, 0)
    _visible_equal(cache, kk, vv, lens)
    # gather_block: compact an accepted path of the block just written at `start`
    idx = np.zeros((b, t), np.int32)
    keep = np.zeros((b,), np.int32)
    for r in range(b):
        n = data.draw(st.integers(0, t))
        idx[r, :n] = sorted(data.draw(st.lists(st.integers(0, t - 1), min_size=n, max_size=n, unique=True)))
        keep[r] = n
    g = gather_block(cache, jnp.asarray(start), jnp.asarray(idx), jnp.asarray(keep))
    k2, v2 = kk.copy(), vv.copy()
    for r in range(b):
        for i in range(keep[r]):
            k2[:, r, start[r] + i] = kk[:, r, start[r] + idx[r, i]]
            v2[:, r, start[r] + i] = vv[:, r, start[r] + idx[r, i]]
    _visible_equal(g, k2, v2, start + keep)
    assert g.prefix_k is cache.prefix_k  # the prefix is never copied or touched
    # rollback to anywhere between the prefix and the current length
    back = np.array([data.draw(st.integers(int(pl), int(n))) for pl, n in zip(row_plen, lens)], np.int32)
    _visible_equal(rollback(cache, jnp.asarray(back)), kk, vv, back)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(prefix_scenario(), st.data())
def test_prefix_cache_beam_reorder_and_expand_equal_plain(sc, data):
    """reorder_cache with a window starting at the prompt (what beam search does, within a prompt's
    rows) and expand_cache move suffix rows only, and equal the plain cache's row gather."""
    b, g, p_cap, plen, s, t, suf, seed = sc
    suf = [data.draw(st.integers(0, s)) for _ in range(b)]
    cache, kk, vv, lens, row_plen = _make(b, g, p_cap, plen, s, suf, seed)
    per = b // g  # beams are reordered within their prompt's group
    idx = np.array([(r // per) * per + data.draw(st.integers(0, per - 1)) for r in range(b)], np.int32)
    start = jnp.asarray(row_plen)
    window = data.draw(st.integers(max(suf), s))
    out = reorder_cache(cache, jnp.asarray(idx), start, window)
    assert out.k.shape == cache.k.shape and out.prefix_k is cache.prefix_k
    _visible_equal(out, kk[:, idx], vv[:, idx], lens[idx])
    r = data.draw(st.integers(1, 3))
    ex = expand_cache(cache, r)
    assert ex.k.shape[1] == b * r and ex.prefix_k is cache.prefix_k
    _visible_equal(ex, np.repeat(kk, r, axis=1), np.repeat(vv, r, axis=1), np.repeat(lens, r))


def test_plain_cache_has_no_prefix_fields():
    c = KVCache.create(2, 3, 8, 1, 4)
    assert c.prefix_k is None and not c.has_prefix and len(jax.tree.leaves(c)) == 3
    np.testing.assert_array_equal(np.asarray(c.offsets), np.asarray(c.lengths))


# ------------------------------------------------------------------------------------------------
# the auto rule and forced paths (no model run)
# ------------------------------------------------------------------------------------------------
class _Dec:
    shared_prefix_ok = True


class _NoDec:
    pass


def test_auto_rule_and_forced_errors():
    from jaxdec.search.token import TokenDecoder
    m = type("M", (), {"supports_shared_prefix": True})()
    assert use_shared_prefix(None, m, _Dec(), 1, 4)
    assert use_shared_prefix(None, m, _Dec(), 2, 4)  # two prompts with 4 rows each
    assert not use_shared_prefix(None, m, _Dec(), 0, 4)  # rows do not group by prompt
    assert not use_shared_prefix(None, m, _Dec(), 1, 1)  # one row: nothing to share
    assert not use_shared_prefix(None, m, _NoDec(), 1, 4)  # decoder did not opt in
    assert not use_shared_prefix(None, object(), _Dec(), 1, 4)  # model cannot take a prefix
    assert not use_shared_prefix(None, m, _Dec(), 1, 4, mesh=object())
    assert not use_shared_prefix(False, m, _Dec(), 1, 4)
    assert use_shared_prefix(True, m, _Dec(), 1, 1)
    with pytest.raises(ValueError, match="shared_prefix=True but the rows"):
        use_shared_prefix(True, m, _Dec(), 0, 4)
    with pytest.raises(ValueError, match="shared_prefix=True but the decoder"):
        use_shared_prefix(True, m, _NoDec(), 1, 4)
    with pytest.raises(ValueError, match="shared_prefix must be"):
        use_shared_prefix("yes", m, _Dec(), 1, 4)
    # grouping of generate's rows (prompt-major, n each) into compiled batches
    a, b = [1, 2], [3]
    assert prefix_groups([a] * 4, 4, 4) == 1
    assert prefix_groups([a] * 4 + [b] * 4, 8, 4) == 2
    assert prefix_groups([a] * 4 + [b] * 4, 4, 4) == 1  # one prompt per batch
    assert prefix_groups([a] * 3 + [b] * 3, 6, 3) == 2
    assert prefix_groups([a] * 3 + [b] * 3, 4, 3) == 0  # batches cut prompts at other boundaries
    assert prefix_groups([a, b], 2, 1) == 0
    assert TokenDecoder.shared_prefix_ok and LlamaModel.supports_shared_prefix


# ------------------------------------------------------------------------------------------------
# real default model: Hydragen path == plain path, and the Hydragen path really ran
# ------------------------------------------------------------------------------------------------
SEEN: list = []  # (prefix?, T) recorded at trace time by the spy model


@dataclasses.dataclass(frozen=True)
class SpyModel(LlamaModel):
    def __call__(self, params, tokens, positions, cache, *args, **kw):
        SEEN.append((cache.prefix_k is not None, tokens.shape[0], tokens.shape[1]))
        return super().__call__(params, tokens, positions, cache, *args, **kw)


@pytest.fixture(scope="module")
def spy(model_f32):
    model, params = model_f32
    return SpyModel(model.config), params


def _run_both(fn):
    """fn(shared_prefix) -> Generation; returns (auto result, plain result, what each traced). Auto
    must pick Hydragen here (one prompt, several rows)."""
    SEEN.clear()
    hyd = fn(None)
    seen_h = list(SEEN)
    SEEN.clear()
    plain = fn(False)
    seen_p = list(SEEN)
    return hyd, plain, seen_h, seen_p


def _check_paths(seen_h, seen_p, rows):
    # Hydragen: prefill at batch 1 into a plain batch-1 cache, then decode calls on a prefix cache
    assert (False, 1, 64) in seen_h and (True, rows, 1) in seen_h, seen_h
    assert not any(p for p, _, _ in seen_p) and (False, rows, 1) in seen_p, seen_p


def test_hydragen_sampling_n4_same_tokens_as_plain(spy, chat_prompt_ids):
    from jaxdec.core.generate import generate
    model, params = spy
    n, new = 4, 20
    for i, prompt in enumerate(chat_prompt_ids[:2]):
        run = lambda sp: generate(model, params, [prompt], method="sample", n=n, seed=7 + i, max_new_tokens=new,
                                  sampling={"temperature": 1.0, "top_k": 50}, shared_prefix=sp)
        hyd, plain, seen_h, seen_p = _run_both(run)
        if i == 0:  # traced once; later prompts reuse the compiled programs
            _check_paths(seen_h, seen_p, n)
        assert hyd.stats["shared_prefix"] and not plain.stats["shared_prefix"]
        assert hyd.stats["cache_size"] == 32 and plain.stats["cache_size"] == 128  # suffix slots only
        assert hyd.tokens == plain.tokens, (i, hyd.tokens, plain.tokens)
        assert len({tuple(t) for t in hyd.tokens}) > 1  # the rows really sampled different continuations
    # several prompts with batch_size = n: every compiled batch holds one prompt, so auto uses Hydragen
    # per batch (same compiled programs as above); it equals the plain cache on the same batches
    two = chat_prompt_ids[:2]
    run = lambda sp: generate(model, params, two, method="sample", n=n, seed=11, max_new_tokens=new,
                              batch_size=n, sampling={"temperature": 1.0, "top_k": 50}, shared_prefix=sp)
    hyd, plain, _, _ = _run_both(run)
    assert hyd.stats["shared_prefix"] and hyd.stats["prefix_groups"] == 1 and not plain.stats["shared_prefix"]
    assert hyd.tokens == plain.tokens


def test_hydragen_grouped_two_prompts_in_one_batch(spy, chat_prompt_ids):
    """Two prompts of different lengths x n=2 rows in ONE batch: two prefix groups (each prompt
    prefilled once, batch 2), same tokens as the plain cache."""
    from jaxdec.core.generate import generate
    model, params = spy
    two = [chat_prompt_ids[0], chat_prompt_ids[4]]
    assert len(two[0]) != len(two[1])
    run = lambda sp: generate(model, params, two, method="sample", n=2, seed=5, max_new_tokens=20,
                              sampling={"temperature": 1.0, "top_k": 50}, shared_prefix=sp)
    hyd, plain, seen_h, seen_p = _run_both(run)
    assert hyd.stats["prefix_groups"] == 2 and not plain.stats["shared_prefix"]
    assert (False, 2, 64) in seen_h and (True, 4, 1) in seen_h, seen_h
    assert not any(p for p, _, _ in seen_p), seen_p
    assert hyd.tokens == plain.tokens


def test_hydragen_beam4_same_tokens_as_plain(spy, chat_prompt_ids):
    from jaxdec.search.beam import beam_search
    model, params = spy
    for i, prompt in enumerate(chat_prompt_ids[:2]):
        run = lambda sp: beam_search(model, params, [prompt], num_beams=4, max_new_tokens=24, shared_prefix=sp)
        hyd, plain, seen_h, seen_p = _run_both(run)
        if i == 0:
            _check_paths(seen_h, seen_p, 4)
        assert hyd.stats["shared_prefix"] and not plain.stats["shared_prefix"]
        hb = [h["tokens"] for h in hyd.extras["beams"][0]]
        pb = [h["tokens"] for h in plain.extras["beams"][0]]
        assert hb == pb, (i, hb, pb)  # all 4 returned hypotheses, in order
        np.testing.assert_allclose([h["score"] for h in hyd.extras["beams"][0]],
                                   [h["score"] for h in plain.extras["beams"][0]], rtol=1e-5, atol=1e-6)


def test_hydragen_best_of_n_first_finish_stochastic_beam_same_as_plain(spy, chat_prompt_ids, monkeypatch):
    """The other decoders that share a prompt over several rows take the Hydragen path on the real model
    (``stats["shared_prefix"]``) and give the plain cache's results (the plain run forces the auto rule
    to say no, so both runs go through the same public call)."""
    import importlib
    rule_homes = [m for m in (importlib.import_module(n) for n in ("jaxdec.core.driver", "jaxdec.core.generate",
                                                                  "jaxdec.search.common"))
                  if hasattr(m, "use_shared_prefix")]
    from jaxdec.search.stochastic import stochastic_beam_search
    from jaxdec.search.testtime import best_of_n, first_finish
    model, params = spy
    prompt = chat_prompt_ids[0]
    samp = {"temperature": 1.0, "top_k": 50}  # best-of-N shares its compiled programs with the n=4 test above
    runs = {
        "best_of_n": lambda: best_of_n(model, params, [prompt], n=4, sampling=samp, seed=7, max_new_tokens=20),
        "first_finish": lambda: first_finish(model, params, [prompt], n=4, sampling=samp, seed=7, max_new_tokens=20),
        "stochastic_beam": lambda: stochastic_beam_search(model, params, [prompt], k=4, max_new_tokens=20, seed=7),
    }
    for name, run in runs.items():
        SEEN.clear()
        hyd = run()
        used_prefix = any(p for p, _, _ in SEEN)
        with monkeypatch.context() as mp:
            for mod in rule_homes:
                mp.setattr(mod, "use_shared_prefix", lambda sp, *a, _o=mod.use_shared_prefix, **k: _o(False, *a, **k))
            SEEN.clear()
            plain = run()
            assert not any(p for p, _, _ in SEEN), name
        assert hyd.stats.get("shared_prefix") and not plain.stats.get("shared_prefix"), (name, hyd.stats)
        assert used_prefix or name == "best_of_n", name  # traced on a prefix cache (best-of-N: traced above)
        assert hyd.tokens == plain.tokens, name
        for key in ("ranked", "beams"):
            if key in hyd.extras:
                assert [[h["tokens"] for h in r] if isinstance(r, list) else r for r in hyd.extras[key]] == \
                    [[h["tokens"] for h in r] if isinstance(r, list) else r for r in plain.extras[key]], (name, key)
