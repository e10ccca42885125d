"""Logits processors and sampling (jaxdec.core.processors / jaxdec.core.sampling).

References are independent of jaxdec: a NumPy implementation written here (float32 for the
elementwise ops, float64 for every decision) and Hugging Face's own processors, built by HF's own
`_get_logits_processor` so that HF decides the order. A draw whose float64 decision margin is within
`TOL` of a threshold is "ambiguous" (float32 rounding may legitimately go either way) and is skipped
with `assume`; deliberate exact ties are not ambiguous and are compared exactly.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxdec.core import processors as P
from jaxdec.core import sampling as S
from stat_checks import pooled_chisquare_p  # noqa: E402

TOL = 1e-5
ALPHA = 1e-4
HYP = settings(derandomize=True, max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
BATCH = 3
VOCABS = [5, 12, 16, 40]  # torch sorts <= 16 entries stably, more with an arbitrary tie order


# ==================================================================================================
# Independent NumPy reference (imports nothing from jaxdec)
# ==================================================================================================

def _softmax64(row):
    row = np.asarray(row, np.float64)
    finite = np.isfinite(row)
    out = np.zeros_like(row)
    if finite.any():
        z = row[finite] - row[finite].max()
        e = np.exp(z)
        out[finite] = e / e.sum()
    return out


def ref_repetition(x, seen, r):
    """x float32 [B,V]; seen bool [B,V]; r [B]."""
    out = x.copy()
    for b in range(x.shape[0]):
        rb = np.float32(r[b])
        for v in range(x.shape[1]):
            if seen[b, v]:
                out[b, v] = out[b, v] * rb if out[b, v] < 0 else out[b, v] / rb
    return out, False


def ref_temperature(x, t):
    out = x.copy()
    for b in range(x.shape[0]):
        if t[b] > 0:
            out[b] = x[b] / np.float32(t[b])
    return out, False


def ref_top_k(x, k):
    out = x.copy()
    V = x.shape[1]
    for b in range(x.shape[0]):
        kb = int(k[b])
        if kb <= 0 or kb >= V:
            continue
        kth = sorted(x[b].tolist(), reverse=True)[kb - 1]
        out[b, x[b] < kth] = -np.inf
    return out, False


def split_ties(x, kept):
    """Whether some group of equal finite logits is partly kept and partly removed."""
    for b in range(x.shape[0]):
        for v in np.unique(x[b][np.isfinite(x[b])]):
            grp = kept[b][x[b] == v]
            if grp.any() and not grp.all():
                return True
    return False


def ref_top_p(x, p):
    out = x.copy()
    amb = False
    V = x.shape[1]
    for b in range(x.shape[0]):
        pb = np.float32(p[b])
        if pb >= 1:
            continue
        thr = float(np.float32(1) - pb)
        order = np.argsort(x[b], kind="stable")  # ties: lower index first (removed first)
        cum = np.cumsum(_softmax64(x[b])[order])
        remove = cum <= thr
        remove[-1] = False
        amb |= bool(np.any(np.abs(cum[:-1] - thr) < TOL))
        out[b, order[remove]] = -np.inf
    return out, amb


def ref_min_p(x, m):
    out = x.copy()
    amb = False
    for b in range(x.shape[0]):
        mb = float(np.float32(m[b]))
        if mb == 0:
            continue
        probs = _softmax64(x[b])
        thr = mb * probs.max()
        remove = probs < thr
        remove[np.argmax(probs)] = False
        near = np.abs(probs - thr) < TOL * thr
        amb |= bool(np.any(near & (x[b] != x[b].max())))
        out[b, remove] = -np.inf
    return out, amb


def ref_typical(x, mass):
    out = x.copy()
    amb = False
    V = x.shape[1]
    for b in range(x.shape[0]):
        tb = float(np.float32(mass[b]))
        if tb >= 1:
            continue
        probs = _softmax64(x[b])
        logp = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), -np.inf)
        ent = -sum(pi * li for pi, li in zip(probs, logp) if pi > 0)
        score = np.abs(-logp - ent)
        order = np.argsort(score, kind="stable")
        cum = np.cumsum(probs[order])
        last = min(int(np.sum(cum < tb)), V - 1)
        thr = score[order][last]
        remove = score > thr
        amb |= bool(np.any(np.abs(cum - tb) < TOL))
        gap = np.abs(score - thr)
        amb |= bool(np.any((gap > 0) & (gap < TOL * (1 + abs(thr)))))
        out[b, remove] = -np.inf
    return out, amb


def ref_chain(x, seen, t, k, p, m, tp, r):
    """HF's order as read from transformers' `_get_logits_processor`; greedy rows: penalty only."""
    amb = False
    if seen is not None:
        x, _ = ref_repetition(x, seen, r)
    out = x.copy()
    for b in range(x.shape[0]):
        if t[b] <= 0:
            continue
        row = x[b:b + 1]
        row, _ = ref_temperature(row, t[b:b + 1])
        for fn, par in ((ref_top_k, k), (ref_top_p, p), (ref_min_p, m), (ref_typical, tp)):
            row, a = fn(row, par[b:b + 1])
            amb |= a
        out[b] = row[0]
    return out, amb


def ref_seen(histories, V):
    seen = np.zeros((len(histories), V), bool)
    for b, h in enumerate(histories):
        for tok in h:
            if 0 <= tok < V:
                seen[b, tok] = True
    return seen


def assert_same_logits(ours, ref):
    ours = np.asarray(ours)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(ours[fin], ref[fin])


# ==================================================================================================
# Hugging Face chain (HF decides which processors and in which order)
# ==================================================================================================

def hf_processor_list(t, k, p, m, tp, r):
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    class _Cfg:
        is_encoder_decoder = False

    class _Model(GenerationMixin):
        config = _Cfg()

    f = lambda v: float(np.float32(v))
    greedy = t <= 0
    gc = GenerationConfig(do_sample=not greedy, temperature=None if greedy else f(t),
                          top_k=None if greedy else int(k), top_p=None if greedy else f(p),
                          min_p=None if greedy else f(m), typical_p=None if greedy else f(tp),
                          repetition_penalty=f(r))
    gc._eos_token_tensor = None
    return _Model()._get_logits_processor(generation_config=gc, input_ids_seq_length=1,
                                          encoder_input_ids=None, logits_processor=None, device="cpu",
                                          model_kwargs={})


@contextlib.contextmanager
def stable_torch_sort():
    """torch.sort on CPU orders ties arbitrarily beyond 16 entries (stable below). For V > 16 we compare
    with HF's algorithm run on a stable sort, the rule jaxdec documents."""
    orig = torch.sort

    def sort(input, dim=-1, descending=False, stable=None, **kw):
        return orig(input, dim=dim, descending=descending, stable=True, **kw)

    with mock.patch.object(torch, "sort", sort):
        yield


def test_hf_order_is_the_one_documented():
    lp = hf_processor_list(0.7, 5, 0.9, 0.1, 0.8, 1.3)
    assert [type(q).__name__ for q in lp] == [
        "RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
        "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper"]
    # greedy (do_sample=False): only the penalty precedes argmax
    assert [type(q).__name__ for q in hf_processor_list(0.0, 5, 0.9, 0.1, 0.8, 1.3)] == [
        "RepetitionPenaltyLogitsProcessor"]


# ==================================================================================================
# Strategies
# ==================================================================================================

GRID = [-np.inf, -3.0, -1.0, -0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0]  # deliberate ties, -0.0, -inf


@st.composite
def logits_st(draw, V=None):
    V = V or draw(st.sampled_from(VOCABS))
    # rounded to 1e-4 so no value is subnormal (XLA on CPU flushes subnormals to zero, torch does not)
    elem = st.one_of(st.sampled_from(GRID), st.floats(-8, 8).map(lambda v: round(v, 4)))
    x = draw(hnp.arrays(np.float32, (BATCH, V), elements=elem))
    assume(np.isfinite(x).any(axis=1).all())
    return x


def rows(strategy):
    return st.lists(strategy, min_size=BATCH, max_size=BATCH).map(np.array)


f32 = lambda lo, hi: st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32)
temps = rows(st.one_of(st.just(0.0), st.just(1.0), f32(0.1, 3.0)))
top_ps = rows(st.one_of(st.just(1.0), f32(0.01, 1.0)))
min_ps = rows(st.one_of(st.just(0.0), st.just(1.0), f32(0.0, 1.0)))
typicals = rows(st.one_of(st.just(1.0), f32(0.01, 0.999)))
penalties = rows(st.one_of(st.just(1.0), f32(0.5, 2.0)))


# jitted once per (processor, V); parameters are traced
_top_k = jax.jit(P.top_k)
_top_p = jax.jit(P.top_p)
_min_p = jax.jit(P.min_p)
_typical = jax.jit(P.typical_p)
_temp = jax.jit(P.temperature)
_rep = jax.jit(P.repetition_penalty)
_process = jax.jit(P.process)
_sample = jax.jit(S.sample)
_seen_from = jax.jit(P.seen_mask_from_tokens, static_argnums=1)


# ==================================================================================================
# Each processor's mask against the NumPy reference
# ==================================================================================================

@HYP
@given(data=st.data())
def test_top_k_matches_reference(data):
    x = data.draw(logits_st())
    k = data.draw(rows(st.integers(0, x.shape[1] + 2)))
    ref, _ = ref_top_k(x, k)
    event(f"top-k kept more than k (ties): {bool((np.isfinite(ref).sum(1) > np.where(k > 0, k, 10**9)).any())}")
    assert_same_logits(_top_k(x, jnp.asarray(k, jnp.int32)), ref)


@HYP
@given(x=logits_st(), p=top_ps)
def test_top_p_matches_reference(x, p):
    ref, amb = ref_top_p(x, p)
    assume(not amb)
    event(f"top-p removed tokens: {bool((np.isneginf(ref) & np.isfinite(x)).any())}")
    event(f"top-p split a tie group: {split_ties(x, np.isfinite(ref))}")
    assert_same_logits(_top_p(x, jnp.asarray(p, jnp.float32)), ref)


_candidates = jax.jit(P._top_k_top_p, static_argnums=3)


@HYP
@given(data=st.data())
def test_candidate_top_k_top_p_matches_reference(data):
    """top-k then top-p from the ``c`` largest logits (`lax.top_k`, the full sort only through a cond),
    against the NumPy reference, with c from 1 to beyond V: rows take the fast path, the fallback, or mix
    them in one batch; many ties (GRID values) put the cut inside tie groups."""
    x = data.draw(logits_st())
    v = x.shape[1]
    k = data.draw(rows(st.integers(0, v + 2)))
    p = data.draw(top_ps)
    c = data.draw(st.sampled_from([1, 2, 3, 4, 8, 16, 64]))
    ref, _ = ref_top_k(x, k)
    ref, amb = ref_top_p(ref, p)
    assume(not amb)
    event(f"candidates < V: {c < v}")
    event(f"top-p split a tie group: {split_ties(x, np.isfinite(ref))}")
    assert_same_logits(_candidates(x, jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32), c), ref)


def test_candidate_path_and_its_fallback_both_run():
    """The fast path really decides when the candidates suffice, and the full sort when they do not: with
    the full sort replaced by a marker, the first case is unchanged and the second returns the marker."""
    x = jnp.asarray([[4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
    marker = lambda z, k, p: jnp.full_like(z, 7.0)  # noqa: E731
    k0, p_easy, p_hard = jnp.zeros((1,), jnp.int32), jnp.asarray([0.5]), jnp.asarray([0.999])
    easy = P._top_k_top_p(x, k0, p_easy, 2)  # the top token alone holds > 0.5 of the mass
    with mock.patch.object(P, "_top_k_top_p_sorted", marker):
        np.testing.assert_array_equal(P._top_k_top_p(x, k0, p_easy, 2), easy)
        assert np.isfinite(np.asarray(easy)).sum() == 1
        # p = 0.999 needs tokens outside the two candidates: the full sort (here the marker) decides
        assert np.all(np.asarray(P._top_k_top_p(x, k0, p_hard, 2)) == 7.0)
        assert np.all(np.asarray(P._top_k_top_p(x, jnp.asarray([3]), jnp.ones((1,)), 2)) == 7.0)  # k > c
    hard = P._top_k_top_p(x, k0, p_hard, 2)
    np.testing.assert_array_equal(hard, P._top_k_top_p_sorted(x, k0, p_hard))


def test_candidate_tiers_run_in_turn():
    """Default tiers: the smaller candidate set decides when it can, the larger one when only it can, the
    full sort otherwise; every case equals the full sort's result."""
    x = jnp.asarray([[5.0, 4.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
    k0 = jnp.zeros((1,), jnp.int32)
    ps = {2: 0.6, 4: 0.9, 8: 0.9999}  # the tier each needs (mass of the top 1 / 3 tokens: 0.633 / 0.951)
    marker = lambda z, k, p: jnp.full_like(z, 7.0)  # noqa: E731
    with mock.patch.object(P, "CANDIDATE_TIERS", (2, 4)):
        tiered = jax.jit(lambda x, k, p: P._top_k_top_p(x, k, p))  # own lambdas: jit caches by function
        ref = jax.jit(lambda x, k, p: P._top_k_top_p_sorted(x, k, p))
        ok2 = jax.jit(lambda x, k, p: P._top_k_top_p_candidates(x, k, p, 2)[1])
        with mock.patch.object(P, "_top_k_top_p_sorted", marker):
            marked = jax.jit(lambda x, k, p: P._top_k_top_p(x, k, p))  # traced (inside the patch) at its first call below
            got = {need: np.asarray(marked(x, k0, jnp.asarray([p], jnp.float32))) for need, p in ps.items()}
        for need, p in ps.items():
            p = jnp.asarray([p], jnp.float32)
            np.testing.assert_array_equal(tiered(x, k0, p), ref(x, k0, p))
            assert np.all(got[need] == 7.0) == (need > 4), need
            assert bool(ok2(x, k0, p)[0]) == (need <= 2), need


@HYP
@given(x=logits_st(), m=min_ps)
def test_min_p_matches_reference(x, m):
    ref, amb = ref_min_p(x, m)
    assume(not amb)
    event(f"min-p removed tokens: {bool((np.isneginf(ref) & np.isfinite(x)).any())}")
    assert_same_logits(_min_p(x, jnp.asarray(m, jnp.float32)), ref)


@HYP
@given(x=logits_st(), tp=typicals)
def test_typical_p_matches_reference(x, tp):
    ref, amb = ref_typical(x, tp)
    assume(not amb)
    event(f"typical removed tokens: {bool((np.isneginf(ref) & np.isfinite(x)).any())}")
    assert_same_logits(_typical(x, jnp.asarray(tp, jnp.float32)), ref)


@HYP
@given(x=logits_st(), t=temps)
def test_temperature_matches_reference(x, t):
    ref, _ = ref_temperature(x, t)
    assert_same_logits(_temp(x, jnp.asarray(t, jnp.float32)), ref)


@HYP
@given(data=st.data())
def test_repetition_penalty_mask_and_history_match_reference(data):
    x = data.draw(logits_st())
    V = x.shape[1]
    r = data.draw(penalties)
    hist = data.draw(st.lists(st.lists(st.integers(-1, V - 1), max_size=6), min_size=BATCH, max_size=BATCH))
    seen = ref_seen(hist, V)
    ref, _ = ref_repetition(x, seen, r)
    assert_same_logits(_rep(x, jnp.asarray(seen), jnp.asarray(r, jnp.float32)), ref)
    # the same penalty from a -1-padded token history (fixed width: one compile per V)
    padded = np.full((BATCH, 6), -1, np.int32)
    for b, h in enumerate(hist):
        padded[b, :len(h)] = h
    np.testing.assert_array_equal(np.asarray(_seen_from(padded, V)), seen)
    assert_same_logits(_rep(x, jnp.asarray(padded), jnp.asarray(r, jnp.float32)), ref)


def test_seen_mask_update_marks_only_valid_rows():
    seen = np.zeros((3, 6), bool)
    seen[0, 1] = True
    out = np.asarray(P.update_seen_mask(jnp.asarray(seen), jnp.array([2, 3, 5]), jnp.array([True, False, True])))
    want = seen.copy()
    want[0, 2] = want[2, 5] = True
    np.testing.assert_array_equal(out, want)


def test_hand_checked_tie_rules():
    x = np.full((1, 40), -np.inf, np.float32)  # -inf padding: shares compiled shapes with other tests
    x[0, :7] = [1, 1, 1, 1, 0, 2, 2]
    # top-k keeps every token tied with the k-th value: k=3 keeps the two 2s and all four 1s
    np.testing.assert_array_equal(np.isfinite(np.asarray(_top_k(x, 3)))[0, :7], [1, 1, 1, 1, 0, 1, 1])
    # top-p splits the tie group of 1s by index: ascending order 4,0,1,2,3,5,6 (lower index first)
    pr = _softmax64(x[0, :7])
    cum = np.cumsum(pr[[4, 0, 1, 2, 3, 5, 6]])
    p = float(1 - (cum[2] + cum[3]) / 2)  # cut after token 1: tokens 4, 0, 1 removed
    np.testing.assert_array_equal(np.isfinite(np.asarray(_top_p(x, p)))[0, :7], [0, 0, 1, 1, 0, 1, 1])
    # the top token always survives, the higher index of tied maxima (last in ascending order)
    np.testing.assert_array_equal(np.isfinite(np.asarray(_top_p(x, 1e-6)))[0, :7], [0, 0, 0, 0, 0, 0, 1])
    # min-p = 1 keeps exactly the tied maxima
    np.testing.assert_array_equal(np.isfinite(np.asarray(_min_p(x, 1.0)))[0, :7], [0, 0, 0, 0, 0, 1, 1])
    # greedy: lowest index among tied maxima
    sp = P.SamplingParams.create(1, temperature=0.0)
    assert int(_sample(jax.random.split(jax.random.key(0), 1), x, sp)[0]) == 5


# ==================================================================================================
# The composed chain against Hugging Face
# ==================================================================================================

@st.composite
def chain_case(draw, V=None):
    x = draw(logits_st(V))
    V = x.shape[1]
    t = draw(temps)
    k = draw(rows(st.integers(0, V + 2)))
    p, m, tp, r = draw(top_ps), draw(min_ps), draw(typicals), draw(penalties)
    hist = draw(st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=6),
                         min_size=BATCH, max_size=BATCH))
    return x, t, k, p, m, tp, r, hist


def run_hf_chain(x, t, k, p, m, tp, r, hist):
    out = np.empty_like(x)
    V = x.shape[1]
    ctx = stable_torch_sort() if V > 16 else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for b in range(x.shape[0]):
            lp = hf_processor_list(t[b], k[b], p[b], m[b], tp[b], r[b])
            ids = torch.tensor([hist[b]], dtype=torch.long)
            out[b] = lp(ids, torch.tensor(x[b:b + 1]))[0].numpy()
    return out


def params_of(t, k, p, m, tp, r):
    return P.SamplingParams.create(len(t), temperature=t, top_k=k, top_p=p, min_p=m, typical_p=tp,
                                   repetition_penalty=r)


def assert_close_to_hf(ours, hf):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(hf))
    fin = np.isfinite(hf)
    np.testing.assert_allclose(ours[fin], hf[fin], rtol=0, atol=1e-5 * max(1.0, np.abs(hf[fin]).max()))


@settings(HYP, max_examples=40)
@given(case=chain_case())
def test_chain_matches_hugging_face(case):
    x, t, k, p, m, tp, r, hist = case
    seen = ref_seen(hist, x.shape[1])
    ref, amb = ref_chain(x, seen, t, k, p, m, tp, r)
    assume(not amb)
    event(f"V > 16 (HF run on a stable sort): {x.shape[1] > 16}")
    event(f"chain split a tie group: {split_ties(x, np.isfinite(ref))}")
    ours = _process(x, params_of(t, k, p, m, tp, r), jnp.asarray(seen))
    assert_close_to_hf(ours, run_hf_chain(x, t, k, p, m, tp, r, hist))
    assert_same_logits(ours, ref)


@HYP
@given(data=st.data())
def test_top_p_and_top_k_ties_match_hugging_face(data):
    """Logits from a 4-value grid, so the cut usually falls inside a group of tied tokens."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    V = data.draw(st.sampled_from(VOCABS))
    x = data.draw(hnp.arrays(np.float32, (BATCH, V), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0])))
    p = data.draw(rows(f32(0.01, 0.99)))
    k = data.draw(rows(st.integers(1, V)))
    ref, amb = ref_top_p(x, p)
    assume(not amb)
    event(f"top-p split a tie group: {split_ties(x, np.isfinite(ref))}")
    ours_p, ours_k = np.asarray(_top_p(x, jnp.asarray(p, jnp.float32))), np.asarray(_top_k(x, jnp.asarray(k)))
    ctx = stable_torch_sort() if V > 16 else contextlib.nullcontext()
    with ctx:
        for b in range(BATCH):
            hp = TopPLogitsWarper(float(np.float32(p[b])))(None, torch.tensor(x[b:b + 1]))[0].numpy()
            hk = TopKLogitsWarper(int(k[b]))(None, torch.tensor(x[b:b + 1]))[0].numpy()
            np.testing.assert_array_equal(ours_p[b], hp)
            np.testing.assert_array_equal(ours_k[b], hk)
    assert_same_logits(ours_p, ref)


def test_chain_matches_hugging_face_at_full_vocab():
    V = 49152
    rng = np.random.default_rng(7)
    # a low tail and 30 strong tokens per row: cumulative sums over 49k float32 terms differ between
    # implementations by ~1e-6, so the cut points must not sit in the dense tail
    x = (rng.standard_normal((BATCH, V)) * 0.5 - 10).astype(np.float32)
    for b in range(BATCH):
        x[b, rng.choice(V, 30, replace=False)] = rng.uniform(5, 15, 30).round(2)
    t, k, p = np.array([0.7, 1.3, 0.0]), np.array([50, 0, 5]), np.array([0.9, 0.95, 0.5])
    m, tp, r = np.array([0.02, 0.0, 0.0]), np.array([1.0, 0.9, 1.0]), np.array([1.3, 1.1, 1.2])
    hist = [rng.integers(0, V, 40).tolist() for _ in range(BATCH)]
    seen = ref_seen(hist, V)
    ref, amb = ref_chain(x, seen, t, k, p, m, tp, r)
    assert not amb
    ours = _process(x, params_of(t, k, p, m, tp, r), jnp.asarray(seen))
    assert_close_to_hf(ours, run_hf_chain(x, t, k, p, m, tp, r, hist))
    assert_same_logits(ours, ref)
    assert 2 <= np.isfinite(np.asarray(ours[0])).sum() <= 50  # the filters really cut


def test_greedy_rows_equal_hf_greedy_argmax():
    rng = np.random.default_rng(3)
    V = 40
    for r in (np.array([1.0, 1.3, 0.7]), np.array([2.0, 1.0, 1.1])):
        x = np.round(rng.standard_normal((BATCH, V)) * 2, 1).astype(np.float32)  # rounding makes ties
        hist = [rng.integers(0, V, 8).tolist() for _ in range(BATCH)]
        sp = P.SamplingParams.create(BATCH, temperature=0.0, top_k=3, top_p=0.5, repetition_penalty=r)
        toks = np.asarray(_sample(jax.random.split(jax.random.key(0), BATCH), x, sp,
                                  jnp.asarray(ref_seen(hist, V))))
        for b in range(BATCH):
            lp = hf_processor_list(0.0, 3, 0.5, 0.0, 1.0, r[b])
            scores = lp(torch.tensor([hist[b]]), torch.tensor(x[b:b + 1]))
            assert toks[b] == int(torch.argmax(scores, dim=-1)[0])


# ==================================================================================================
# Per-row parameters and recompilation
# ==================================================================================================

@settings(HYP, max_examples=30)
@given(case=chain_case(V=40))
def test_batch_rows_equal_rows_alone(case):
    x, t, k, p, m, tp, r, hist = case
    seen = ref_seen(hist, x.shape[1])
    batch = np.asarray(_process(x, params_of(t, k, p, m, tp, r), jnp.asarray(seen)))
    for b in range(BATCH):
        sl = slice(b, b + 1)
        alone = _process(x[sl], params_of(t[sl], k[sl], p[sl], m[sl], tp[sl], r[sl]), jnp.asarray(seen[sl]))
        np.testing.assert_array_equal(np.asarray(alone)[0], batch[b])


def test_new_parameter_values_do_not_retrace():
    traces = [0]

    @jax.jit
    def step(keys, logits, params, seen):
        traces[0] += 1
        return S.sample(keys, logits, params, seen)

    B, V = 4, 64
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, V)), jnp.float32)
    seen = jnp.zeros((B, V), bool).at[:, 3].set(True)
    keys = jax.random.split(jax.random.key(1), B)
    settings_list = [dict(), dict(temperature=0.0), dict(top_k=[1, 5, 0, V]), dict(top_p=[0.1, 0.5, 0.9, 1.0]),
                     dict(temperature=[0.0, 0.5, 1.5, 0.0], min_p=0.3, typical_p=0.4, repetition_penalty=1.7),
                     dict(top_k=7, top_p=0.3)]
    outs = [step(keys, x, P.SamplingParams.create(B, **kw), seen) for kw in settings_list]
    jax.block_until_ready(outs)
    assert traces[0] == 1
    # positive control: the counter does move when a shape changes (one more row, one more trace)
    step(jax.random.split(jax.random.key(1), B + 1), jnp.concatenate([x, x[:1]]), P.SamplingParams.create(B + 1),
         jnp.concatenate([seen, seen[:1]]))
    assert traces[0] == 2
    assert np.asarray(outs[1]).tolist() == np.argmax(np.asarray(P.repetition_penalty(x, seen, 1.0)), -1).tolist()


def test_row_sample_independent_of_neighbours():
    B, V = BATCH, 40
    rng = np.random.default_rng(5)
    row0 = rng.standard_normal(V).astype(np.float32)
    target = dict(temperature=0.8, top_k=10, top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0)
    keys0 = jax.random.split(jax.random.key(11), 24)
    results = []
    for trial in range(3):
        x = rng.standard_normal((B, V)).astype(np.float32) * (trial + 1)
        x[0] = row0
        per = {name: [target[name]] + list(vals) for name, vals in {
            "temperature": rng.choice([0.0, 0.5, 2.0], B - 1), "top_k": rng.integers(0, V, B - 1),
            "top_p": rng.choice([1.0, 0.3], B - 1), "min_p": rng.choice([0.0, 0.2], B - 1),
            "typical_p": rng.choice([1.0, 0.5], B - 1), "repetition_penalty": np.ones(B - 1)}.items()}
        params = P.SamplingParams.create(B, **per)
        other = jax.random.split(jax.random.key(100 + trial), B - 1)
        results.append([int(_sample(jnp.concatenate([k0[None], other]), x, params)[0]) for k0 in keys0])
    alone = [int(_sample(k0[None], row0[None], P.SamplingParams.create(1, **target))[0]) for k0 in keys0]
    assert results[0] == results[1] == results[2] == alone
    assert len(set(alone)) > 3  # the row really samples


def test_raw_uint32_keys_equal_typed_keys():
    keys = jax.random.split(jax.random.key(4), BATCH)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((BATCH, 40)), jnp.float32)
    sp = P.SamplingParams.create(BATCH, temperature=[1.0, 0.0, 2.0], top_p=0.9)
    np.testing.assert_array_equal(_sample(keys, x, sp), _sample(jax.random.key_data(keys), x, sp))


def test_gumbel_at_equals_jax_gumbel_bit_for_bit():
    """`gumbel_at` computes JAX's own Gumbel noise at chosen indices only: equal bits, any index."""
    V = 5000
    idx = jnp.asarray(np.random.default_rng(3).choice(V, 300, replace=False), jnp.int32)
    for seed in range(5):
        key = jax.random.fold_in(jax.random.key(seed), 7)
        full = np.asarray(jax.random.gumbel(key, (V,), jnp.float32))
        np.testing.assert_array_equal(np.asarray(jax.jit(S.gumbel_at)(key, idx)), full[np.asarray(idx)])
    assert S.gumbel_reproducible(jax.random.split(jax.random.key(0), 2))
    assert not S.gumbel_reproducible(jax.random.split(jax.random.key(0, impl="rbg"), 2))


_sample_processed = jax.jit(S.sample_processed)
_full_categorical = jax.jit(lambda keys, x: jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32))


def test_kept_token_draw_gives_the_full_draws_tokens():
    """When every sampling row keeps few tokens the draw looks only at them; its tokens equal
    `jax.random.categorical` over the whole row, key for key, in each tier (<= 128, <= 1024 kept) and
    past them (full draw), with ties among the kept logits and greedy rows mixed in. With the kept-token
    draw replaced by a marker, the first two cases return the marker: that path really decides them."""
    B, V = 16, 4096
    rng = np.random.default_rng(11)
    greedy = jnp.asarray(np.arange(B) % 5 == 4)
    cases = []
    for kept in (1, 50, 128, 700, 1024, 2000):
        x = np.round(rng.standard_normal((B, V)) * 2, 1).astype(np.float32)  # rounded: many ties
        thr = np.sort(x, axis=1)[:, -kept][:, None]
        x = np.where(x >= thr, x, -np.inf).astype(np.float32)
        x[:, :] = np.where((np.isfinite(x).cumsum(1) > kept) & np.isfinite(x), -np.inf, x)  # exactly `kept`
        x[greedy] = rng.standard_normal((int(greedy.sum()), V)).astype(np.float32)  # greedy rows keep all
        cases.append((kept, jnp.asarray(x)))
    for kept, x in cases:
        for seed in range(10):
            keys = jax.random.split(jax.random.key(1000 * kept + seed), B)
            want = np.where(np.asarray(greedy), np.argmax(np.asarray(x), -1), np.asarray(_full_categorical(keys, x)))
            np.testing.assert_array_equal(np.asarray(_sample_processed(keys, x, greedy)), want, err_msg=f"kept {kept}")
    marker = lambda keys, x, kc: jnp.full((x.shape[0],), -7, jnp.int32)  # noqa: E731
    with mock.patch.object(S, "_draw_among", marker):
        marked = jax.jit(lambda k, x, g: S.sample_processed(k, x, g))  # traced inside the patch
        keys = jax.random.split(jax.random.key(0), B)
        for kept, x in cases:
            got = np.asarray(marked(keys, x, greedy))[~np.asarray(greedy)]
            assert np.all(got == -7) == (kept <= S.DRAW_CANDIDATES[-1]), kept


def test_logprob_helpers():
    x = np.array([[0.0, 1.0, -np.inf, 2.0]], np.float32)
    want = x[0].astype(np.float64) - np.log(np.exp(x[0][np.isfinite(x[0])].astype(np.float64)).sum())
    np.testing.assert_allclose(S.token_logprobs(x, jnp.array([3])), [want[3]], rtol=1e-6)
    assert np.isneginf(np.asarray(S.token_logprobs(x, jnp.array([2])))[0])
    p = np.exp(want[np.isfinite(want)])
    np.testing.assert_allclose(S.entropy(x), [-(p * np.log(p)).sum()], rtol=1e-6)


# ==================================================================================================
# Statistical: chi-square against the exact processed distribution, with negative controls
# ==================================================================================================

N_DRAWS = 100_000
V_STAT = 24
_stat_rng = np.random.default_rng(2024)
STAT_LOGITS = (_stat_rng.standard_normal(V_STAT) * 1.5).astype(np.float32)
STAT_LOGITS[5] = STAT_LOGITS[9]  # a tie
STAT_SEEN = np.zeros(V_STAT, bool)
STAT_SEEN[np.argsort(STAT_LOGITS)[-3:]] = True  # penalize the three largest

STAT_SETTINGS = {
    "top_k": dict(temperature=0.7, top_k=6),
    "top_p": dict(temperature=0.7, top_p=0.8),
    "min_p": dict(temperature=0.7, min_p=0.1),
    "typical": dict(temperature=0.7, typical_p=0.6),
    "all": dict(temperature=0.9, top_k=12, top_p=0.95, min_p=0.05, typical_p=0.9, repetition_penalty=1.3),
}
_FULL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0)


@jax.jit
def _draw_many(keys, logits, seen, params):
    n = keys.shape[0]
    return S.sample(keys, jnp.broadcast_to(logits, (n, logits.shape[-1])),
                    params, jnp.broadcast_to(seen, (n, seen.shape[-1])))


def draws(setting, seed):
    params = P.SamplingParams.create(N_DRAWS, **setting)
    keys = jax.random.split(jax.random.key(seed), N_DRAWS)
    toks = np.asarray(_draw_many(keys, jnp.asarray(STAT_LOGITS), jnp.asarray(STAT_SEEN), params))
    return np.bincount(toks, minlength=V_STAT)


def expected_probs(setting):
    s = {**_FULL, **setting}
    one = lambda name: np.array([s[name]])
    out, amb = ref_chain(STAT_LOGITS[None], STAT_SEEN[None], one("temperature"), one("top_k"), one("top_p"),
                         one("min_p"), one("typical_p"), one("repetition_penalty"))
    assert not amb
    return _softmax64(out[0])


@pytest.mark.parametrize("name", list(STAT_SETTINGS))
def test_sampler_matches_processed_distribution(name):
    setting = STAT_SETTINGS[name]
    probs = expected_probs(setting)
    support = probs > 0
    assert 4 <= support.sum() < V_STAT  # the setting really filters, and leaves room for a test

    seed = 10 * list(STAT_SETTINGS).index(name)
    counts = draws(setting, seed=seed + 1)
    assert counts.sum() == N_DRAWS
    assert counts[~support].sum() == 0  # never a masked token
    assert pooled_chisquare_p(counts, probs) > ALPHA

    # negative controls: same test, wrong distribution, must reject
    hotter = {**setting, "temperature": setting["temperature"] * 1.1}
    assert pooled_chisquare_p(draws(hotter, seed=seed + 2), probs) < ALPHA
    assert pooled_chisquare_p(draws({}, seed=seed + 3), probs) < ALPHA


# ==================================================================================================
# Through `generate`: the joint distribution of three sampled tokens of a context-dependent toy LM
# ==================================================================================================
GEN_V, GEN_ROWS, GEN_PROMPT = 6, 24_000, (3, 1, 4)
GEN_SETTING = dict(temperature=0.9, top_k=4, top_p=0.9, repetition_penalty=1.8)


def ref_generate_joint(table, prompt, n, setting):
    """Exact joint distribution ``[V]*n`` of the first n tokens that sampling with `setting` draws from
    the trigram table (logits after ``..., prev, tok`` are ``table[prev, tok]``), by enumeration with
    the NumPy reference chain above: the penalty sees the prompt and the tokens drawn so far."""
    V = table.shape[-1]
    s = {**_FULL, **setting}
    one = {name: np.array([s[name]]) for name in s}
    joint = np.zeros((V,) * n)
    amb = False

    def walk(seq, prob, depth):
        nonlocal amb
        if depth == n:
            joint[tuple(seq[len(prompt):])] += prob
            return
        x = table[seq[-2], seq[-1]][None].astype(np.float32)
        out, a = ref_chain(x, ref_seen([seq], V), one["temperature"], one["top_k"], one["top_p"],
                           one["min_p"], one["typical_p"], one["repetition_penalty"])
        amb |= a
        probs = _softmax64(out[0])
        for t in np.nonzero(probs)[0]:
            walk(seq + [int(t)], prob * probs[t], depth + 1)

    walk(list(prompt), 1.0, 0)
    return joint, amb


def generate_joint_counts(model, table, setting, seed):
    from jaxdec.core.generate import generate
    g = generate(model, {"table": jnp.asarray(table)}, [list(GEN_PROMPT)], method="sample", sampling=setting,
                 n=GEN_ROWS, max_new_tokens=3, stop_ids=(), seed=seed, shared_prefix=False)
    toks = np.asarray(g.tokens)
    assert toks.shape == (GEN_ROWS, 3)
    return np.bincount((toks[:, 0] * GEN_V + toks[:, 1]) * GEN_V + toks[:, 2], minlength=GEN_V ** 3)


def test_generate_sampling_joint_matches_numpy_reference():
    """`generate(method="sample")` end to end (prefill, per-row keys folded per token, the seen-token mask
    carried through the loop, top-k, top-p, repetition penalty): the joint of three tokens equals the
    NumPy reference's. Negative controls, same counts or same test: the reference without the
    repetition penalty, without top-p, or at temperature 0.99 is rejected."""
    from jaxdec.testing.toy_speculative import TrigramModel, random_table
    table = random_table(8, GEN_V, 1.2)
    joint, amb = ref_generate_joint(table, GEN_PROMPT, 3, GEN_SETTING)
    assert not amb and abs(joint.sum() - 1) < 1e-9
    support = joint > 0
    assert 15 <= support.sum() < GEN_V ** 3 // 2  # top-k/top-p really cut, and enough bins remain
    model = TrigramModel(GEN_V, num_layers=6)  # a config of its own: no other test shares these programs
    counts = generate_joint_counts(model, table, GEN_SETTING, seed=5)
    assert counts[~support.ravel()].sum() == 0  # never a token that top-k / top-p removed
    assert pooled_chisquare_p(counts, joint) > ALPHA
    for wrong in ({**GEN_SETTING, "repetition_penalty": 1.0}, {**GEN_SETTING, "top_p": 1.0},
                  {**GEN_SETTING, "temperature": 0.99}):
        assert pooled_chisquare_p(counts, ref_generate_joint(table, GEN_PROMPT, 3, wrong)[0]) < ALPHA, wrong
    # A broken key fold (every token of a row drawn with the same key) fails this test: shown by
    # `python experiments/mutation_checks.py` (experiments/results/mutation_checks.log), not here, to
    # keep CI free of a second compile.


# ==================================================================================================
# Bad input
# ==================================================================================================

BAD = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", [1.0, -1.0, 1.0]),
    ("top_k", -1), ("top_k", 1.5), ("top_k", [1, 2]),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", float("inf")),
    ("min_p", -0.01), ("min_p", 1.5),
    ("typical_p", 0.0), ("typical_p", 1.2),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("temperature", [[1.0, 1.0, 1.0]]), ("top_p", "high"), ("min_p", [0.1, None, 0.2]),
]


@pytest.mark.parametrize("name,value", BAD)
def test_invalid_parameter_raises_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        P.SamplingParams.create(3, **{name: value})


@pytest.mark.parametrize("batch", [0, -2, 1.5, True])
def test_invalid_batch_raises(batch):
    with pytest.raises(ValueError, match="batch"):
        P.SamplingParams.create(batch)


def test_create_broadcasts_and_types():
    sp = P.SamplingParams.create(3, temperature=[0.0, 0.5, 1.0], top_k=4, top_p=(1.0, 0.5, 0.2),
                                 min_p=1.0, typical_p=1.0, repetition_penalty=np.array([1.0, 2.0, 0.5]))
    assert sp.batch_size == 3
    assert sp.top_k.dtype == jnp.int32 and sp.top_k.tolist() == [4, 4, 4]
    for f in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty"):
        a = getattr(sp, f)
        assert a.dtype == jnp.float32 and a.shape == (3,)
    assert len(jax.tree.leaves(sp)) == 6
