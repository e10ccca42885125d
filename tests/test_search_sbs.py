"""Stochastic beam search draws k sequences *without replacement* from the model's sequence distribution.

On a tiny table model (3 tokens, EOS = 0, at most 3 new tokens: 15 complete sequences) the exact law of
an ordered without-replacement sample is P(y1, y2, y3) = p1 * p2 / (1 - p1) * p3 / (1 - p1 - p2). We draw
N independent k = 3 samples (one prompt row each, fixed seeds) and run a chi-square test on the ordered
triples (bins with expected count < 5 pooled, alpha = 1e-4); inclusion probabilities are reported.
Negative controls that the same test must reject: independent per-step Gumbel noise (no conditioning
on the parent, `exact=False`), and samples drawn at temperature 1.1.
"""
from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
from scipy import stats

ALPHA = 1e-4
N = 24000
K = 3
PROMPT = [1, 2]


@pytest.fixture(scope="module")
def toy():
    from jaxdec.testing.toy_search import TableModel
    model = TableModel(vocab_size=3, eos_ids=(0,))
    return model, model.init_params(3, scale=0.8, prev_scale=0.6)


def exact_ordered(model, params, temperature=1.0):
    seqs = model.enumerate_sequences(params, PROMPT, 3)
    lp = np.array([l for _, l in seqs])
    if temperature != 1.0:  # the temperature-scaled sequence law, by enumeration with scaled tables
        scaled = {k: v / temperature for k, v in params.items()}
        lp = np.array([l for _, l in model.enumerate_sequences(scaled, PROMPT, 3)])
    p = np.exp(lp)
    assert abs(p.sum() - 1) < 1e-9
    names = [s for s, _ in seqs]
    probs = {}
    for trip in itertools.permutations(range(len(names)), K):
        pr, rest = 1.0, 1.0
        for i in trip:
            pr *= p[i] / rest
            rest -= p[i]
        probs[tuple(names[i] for i in trip)] = pr
    return names, p, probs


def draw(model, params, seed, **kw):
    from jaxdec.search.stochastic import stochastic_beam_search
    g = stochastic_beam_search(model, params, [PROMPT] * N, k=K, max_new_tokens=3, seed=seed, batch_size=N // 4,
                               **kw)
    return g


def chi2_pvalue(counts, probs):
    keys = list(probs)
    exp = np.array([probs[k] for k in keys]) * sum(counts.values())
    obs = np.array([counts.get(k, 0) for k in keys], float)
    assert sum(counts.values()) == obs.sum(), "a sample fell outside the support"
    small = exp < 5
    exp_p = np.concatenate([exp[~small], [exp[small].sum()]])
    obs_p = np.concatenate([obs[~small], [obs[small].sum()]])
    if exp_p[-1] == 0:
        exp_p, obs_p = exp_p[:-1], obs_p[:-1]
    return stats.chisquare(obs_p, exp_p).pvalue, len(exp_p)


def ordered_counts(g):
    return collections.Counter(tuple(tuple(b["tokens"]) for b in beams) for beams in g.extras["beams"])


def test_stochastic_beam_is_sampling_without_replacement(toy):
    model, params = toy
    names, p, probs = exact_ordered(model, params)
    g = draw(model, params, seed=0)
    # every sample holds k distinct complete sequences, each with its exact log-probability
    for beams in g.extras["beams"][:200]:
        assert len({tuple(b["tokens"]) for b in beams}) == K
        for b in beams:
            assert abs(b["score"] - model.sequence_logprob(params, PROMPT, b["tokens"])) < 1e-5
        gs = [b["gumbel"] for b in beams]
        assert gs == sorted(gs, reverse=True)
    counts = ordered_counts(g)
    pval, bins = chi2_pvalue(counts, probs)
    # inclusion probabilities (reported)
    incl = collections.Counter(s for beams in g.extras["beams"] for s in {tuple(b["tokens"]) for b in beams})
    pi = {s: sum(v for t, v in probs.items() if s in t) for s in names}
    z = max(abs(incl[s] / N - pi[s]) / np.sqrt(pi[s] * (1 - pi[s]) / N) for s in names)
    print(f"SBS ordered-triple chi2: p={pval:.3g} over {bins} bins; max inclusion-probability z = {z:.2f}")
    assert pval > ALPHA


def test_negative_control_unconditioned_gumbel_is_rejected(toy):
    model, params = toy
    _, _, probs = exact_ordered(model, params)
    pval, bins = chi2_pvalue(ordered_counts(draw(model, params, seed=1, exact=False)), probs)
    print(f"negative control (independent per-step Gumbel): p={pval:.3g}")
    assert pval < ALPHA


def test_negative_control_temperature_is_rejected(toy):
    model, params = toy
    _, _, probs = exact_ordered(model, params)
    g = draw(model, params, seed=2, temperature=1.1)
    pval, _ = chi2_pvalue(ordered_counts(g), probs)
    print(f"negative control (temperature 1.1 vs the T=1 law): p={pval:.3g}")
    assert pval < ALPHA
    # ... while the same draws do follow the temperature-1.1 law
    _, _, probs_t = exact_ordered(model, params, temperature=1.1)
    assert chi2_pvalue(ordered_counts(g), probs_t)[0] > ALPHA
