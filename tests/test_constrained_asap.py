"""Grammar-aligned sampling (ASAp, issue #18 item 5) on toy grammars whose conditional distribution is
enumerated exactly: the proposal's KL to ``P(s | s in G)`` falls with the number of samples and gets below
EPS, plain masked sampling (GCD) stays biased (negative control), late samples pass a chi-square test at
α = 1e-4 while ASAp without the EFG update is rejected (negative control); the llguidance regex and Lark
engines give the same sampler as a pure-Python automaton; bad input raises errors naming the argument."""
from __future__ import annotations

import itertools
import math
import re
import zlib

import numpy as np
import pytest

from jaxdec.constrained import ConstraintError, lark, regex
from jaxdec.constrained.asap import ASApSampler, DFAMatcher, asap_sample
from tests.stat_checks import pooled_chisquare_p

ALPHA = 1e-4
EPS = 5e-3          # KL(P* || q) bound after 1000 ASAp samples
GCD_BIAS = 0.1      # GCD's KL stays above this at every N
V, EOS, L = 3, 2, 6  # tokens "0", "1", EOS; strings of at most 6 tokens


def toy_model(salt: int = 7, bias=(0.0, 1.0, -0.5)):
    """An explicit categorical per prefix (seeded by the prefix): log-probs over {0, 1, EOS}."""
    def fn(prefix):
        rng = np.random.default_rng(zlib.crc32(bytes([salt] + [int(t) for t in prefix])))
        lg = rng.normal(0.0, 1.0, V) + np.asarray(bias)
        return lg - np.log(np.exp(lg).sum())
    return fn


def parity_dfa():
    """Binary strings with an even number of 1s."""
    return DFAMatcher({0: {0: 0, 1: 1}, 1: {0: 1, 1: 0}}, 0, {0}, V, EOS)


def exact_conditional(model_fn, in_grammar, max_len=L, alphabet=(0, 1)):
    """P(s | s in G, |s| <= max_len) by enumeration, and Z = P(G)."""
    out = {}
    for n in range(max_len + 1):
        for s in itertools.product(alphabet, repeat=n):
            if in_grammar(s):
                lp = sum(model_fn(s[:k])[s[k]] for k in range(n)) + model_fn(s)[EOS]
                out[s] = math.exp(lp)
    z = sum(out.values())
    return {k: v / z for k, v in out.items()}, z


def kl(p: dict, q: dict) -> float:
    """KL(p || q/sum q): q is the proposal over complete strings, renormalized for its dead-end mass
    (dead-end attempts are retried, so the returned samples follow q / sum q)."""
    zq = sum(q.values())
    return sum(pi * math.log(pi / (q.get(s, 0.0) / zq)) if q.get(s, 0.0) > 0 else math.inf
               for s, pi in p.items() if pi > 0)


def kl_curve(model_fn, matcher, mode, seed=1, ns=(10, 100, 1000)):
    """(total samples so far, the sampler) after each N of ``ns``; one trie throughout."""
    res, done = None, 0
    for n in ns:
        res = asap_sample(model_fn, matcher, n - done, L, seed=seed + n, mode=mode,
                          sampler=None if res is None else res.sampler)
        done = n
        yield n, res.sampler


def test_asap_kl_falls_below_eps_and_gcd_stays_biased():
    model = toy_model()
    target, z = exact_conditional(model, lambda s: sum(s) % 2 == 0)
    assert len(target) == 64
    curves = {}
    for mode in ("asap", "gcd"):
        curves[mode] = [(n, kl(target, s.proposal_distribution()), s.efg_root())
                        for n, s in kl_curve(model, parity_dfa(), mode)]
    print("\nKL(P* || q) by samples:", {m: [(n, round(k, 5)) for n, k, _ in c] for m, c in curves.items()},
          "Z =", round(z, 4), "ASAp's estimate:", round(curves["asap"][-1][2], 4))
    a = [k for _, k, _ in curves["asap"]]
    assert a[0] > a[1] > a[2], a
    assert a[2] < EPS, a
    g = [k for _, k, _ in curves["gcd"]]
    assert min(g) > GCD_BIAS, g
    assert max(g) - min(g) < 1e-12  # GCD's proposal never changes
    assert abs(curves["asap"][-1][2] - z) < 0.02 and curves["gcd"][-1][2] == 1.0


def test_proposal_probabilities_are_the_sampling_probabilities():
    model = toy_model(salt=3)
    # GCD: the proposal is fixed, so every returned log q equals proposal_logprob of the sample
    res = asap_sample(model, parity_dfa(), 50, L, seed=5, mode="gcd")
    for s, lq in zip(res.samples, res.log_q):
        assert sum(s) % 2 == 0 and len(s) <= L
        assert lq == pytest.approx(res.sampler.proposal_logprob(s), abs=1e-12)
    # ASAp: each attempt's log q is the proposal just before it was drawn (a dead-end attempt has none)
    sampler = asap_sample(model, parity_dfa(), 20, L, seed=6).sampler
    rng, checked = np.random.default_rng(100), 0
    for _ in range(30):
        dist = sampler.proposal_distribution()
        s, lq = sampler.sample_once(rng)
        if lq is not None:
            assert lq == pytest.approx(math.log(dist[tuple(s)]), abs=1e-12)
            checked += 1
    assert checked >= 20
    assert sampler.proposal_logprob([1]) == -math.inf  # odd number of 1s: outside the grammar
    # log_p is the model's own sequence log-probability (importance weights log_p - log_q)
    for s, lp in zip(res.samples, res.log_p):
        want = sum(model(tuple(s[:k]))[s[k]] for k in range(len(s))) + model(tuple(s))[EOS]
        assert lp == pytest.approx(want, abs=1e-9)
    # a jax PRNG key works in place of seed (typed and raw keys), deterministically
    import jax
    k1 = asap_sample(model, parity_dfa(), 30, L, jax.random.key(3)).samples
    assert k1 == asap_sample(model, parity_dfa(), 30, L, jax.random.key(3)).samples
    assert asap_sample(model, parity_dfa(), 30, L, jax.random.PRNGKey(3)).samples == k1
    assert sum(sampler.proposal_distribution().values()) <= 1 + 1e-12


def test_late_samples_pass_chisquare_and_no_update_is_rejected():
    model = toy_model()
    target, _ = exact_conditional(model, lambda s: sum(s) % 2 == 0)
    keys = sorted(target)
    probs = np.array([target[k] for k in keys])
    pvals = {}
    for name, kw in (("asap", {}), ("asap_no_update", {"update": False}), ("asap_renormalized_update", None)):
        if kw is None:  # second control: the update uses the mask-renormalized child probabilities
            sampler = RenormalizedUpdate(model, parity_dfa(), L, EOS)
            sampler.sample(3000, np.random.default_rng(11))
        else:
            sampler = asap_sample(model, parity_dfa(), 3000, L, seed=11, **kw).sampler
        late = asap_sample(None, None, 10000, None, seed=12, sampler=sampler)
        counts = np.zeros(len(keys))
        idx = {k: i for i, k in enumerate(keys)}
        for s in late.samples:
            counts[idx[tuple(s)]] += 1
        pvals[name] = pooled_chisquare_p(counts, probs)
    print("\nchi-square p (10k late samples after 3000 warm-up):", pvals)
    assert pvals["asap"] > ALPHA, pvals
    assert pvals["asap_no_update"] < ALPHA, pvals
    assert pvals["asap_renormalized_update"] < ALPHA, pvals


class RenormalizedUpdate(ASApSampler):
    """A plausible bug: the EFG update sums the children's estimates under the probabilities renormalized
    over the allowed tokens, forgetting the mass the mask removes (this is GCD with restarts)."""

    def _update(self, path):
        for node, i in reversed(path):
            t = int(node.ids[i])
            if t != self.eos:
                ch = node.children[t]
                node.c[i] = float((ch.p / ch.p.sum()) @ ch.c) if ch.p.sum() > 0 else 0.0


# ---------------------------------------------------------------------------------------------------
# the real engines on a toy vocabulary
# ---------------------------------------------------------------------------------------------------

def toy_tokenizer(pieces):
    """A jaxdec Tokenizer over a few single-byte tokens plus "<eos>" (last id), byte-level BPE with no
    merges, so llguidance can export it."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from jaxdec.models.tokenizer import Tokenizer
    vocab = {p: i for i, p in enumerate(pieces)}
    vocab["<eos>"] = len(pieces)
    bk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bk.decoder = decoders.ByteLevel()
    bk.add_special_tokens([tokenizers.AddedToken("<eos>", special=True)])
    return Tokenizer(bk, eos_ids=[len(pieces)])


def test_engine_regexes_give_the_same_sampler_as_the_automaton():
    tok = toy_tokenizer(["0", "1"])
    model = toy_model(salt=9)
    a = asap_sample(model, regex("0*(10*10*)*"), 300, L, seed=4, tokenizer=tok)
    b = asap_sample(model, parity_dfa(), 300, L, seed=4)
    assert a.samples == b.samples
    np.testing.assert_allclose(a.log_q, b.log_q, rtol=0, atol=1e-12)
    qa, qb = a.sampler.proposal_distribution(), b.sampler.proposal_distribution()
    assert qa.keys() == qb.keys() and max(abs(qa[k] - qb[k]) for k in qa) < 1e-12
    # the outlines engine too (outlines-core's Index alone refused "1" at the start of 0*(10*10*)*, a token
    # into a non-final state after an accepting prefix; the engine's sentinel index keeps it)
    c = asap_sample(model, regex("0*(10*10*)*", engine="outlines"), 300, L, seed=4, tokenizer=tok)
    assert c.samples == b.samples
    np.testing.assert_allclose(c.log_q, b.log_q, rtol=0, atol=1e-12)


def balanced(s):
    depth = 0
    for t in s:
        depth += 1 if t == 0 else -1
        if depth < 0:
            return False
    return depth == 0


def test_lark_cfg_balanced_parentheses_kl_falls():
    """A context-free language (balanced parentheses) through llguidance's Lark front end."""
    tok = toy_tokenizer(["(", ")"])
    model = toy_model(salt=21, bias=(0.8, 0.0, -0.3))
    grammar = lark('start: x\nx: "" | "(" x ")" x\n')
    target, _ = exact_conditional(model, balanced, max_len=8)
    sampler, ks = None, []
    for n_total, n in ((10, 10), (100, 90), (1000, 900)):
        r = asap_sample(model, grammar, n, 8, seed=n_total, tokenizer=tok, sampler=sampler)
        sampler = r.sampler
        assert all(balanced(s) for s in r.samples)
        ks.append(kl(target, sampler.proposal_distribution()))
    gcd = asap_sample(model, grammar, 10, 8, seed=1, tokenizer=tok, mode="gcd").sampler
    k_gcd = kl(target, gcd.proposal_distribution())
    print("\nbalanced parentheses KL(P* || q) at 10/100/1000:", [round(k, 5) for k in ks], "GCD:", round(k_gcd, 4))
    assert ks[0] > ks[1] > ks[2] and ks[2] < EPS, ks
    assert k_gcd > GCD_BIAS


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    model = toy_model()
    with pytest.raises(TypeError, match="model_fn"):
        asap_sample(42, parity_dfa(), 1, L)
    with pytest.raises(ValueError, match="n_samples"):
        asap_sample(model, parity_dfa(), 0, L)
    with pytest.raises(ValueError, match="max_len"):
        asap_sample(model, parity_dfa(), 1, 0)
    with pytest.raises(ValueError, match="mode"):
        asap_sample(model, parity_dfa(), 1, L, mode="beam")
    with pytest.raises(TypeError, match="constraint_or_matcher"):
        asap_sample(model, "0*", 1, L)
    with pytest.raises(ValueError, match="tokenizer"):
        asap_sample(model, regex("0*"), 1, L)
    with pytest.raises(ValueError, match="seed"):
        asap_sample(model, parity_dfa(), 1, L, seed=-1)
    with pytest.raises(ValueError, match="model_fn"):
        asap_sample(lambda p: np.zeros((2, 3)), parity_dfa(), 1, L)
    with pytest.raises(ValueError, match="model_fn"):
        asap_sample(lambda p: np.full(V, np.nan), parity_dfa(), 1, L)
    with pytest.raises(TypeError, match="sampler"):
        asap_sample(model, parity_dfa(), 1, L, sampler=object())
    with pytest.raises(ValueError, match="eos"):
        DFAMatcher({0: {}}, 0, {0}, V, 5)
    # a language with no string of at most max_len tokens: exactly three 1s within 2 tokens
    three = DFAMatcher({0: {1: 1}, 1: {1: 2}, 2: {1: 3}}, 0, {3}, V, EOS)
    with pytest.raises(ConstraintError, match="constraint_or_matcher"):
        asap_sample(model, three, 1, 2)
    with pytest.raises(TypeError, match="model_fn"):
        ASApSampler(None, parity_dfa(), L, EOS)


# ---------------------------------------------------------------------------------------------------
# the real default model (slow)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_model_yes_no():
    """SmolLM2 with llguidance's regex (yes|no): every sample is "yes" or "no"; the proposal over the language
    sums to 1 and, after the trie holds every prefix, equals the model's conditional (computed here from
    the model's own sequence probabilities)."""
    import jaxdec
    from jaxdec.constrained.asap import score_fn
    m = jaxdec.load()
    ids = m.tokenizer.chat_ids("Is the sky blue? Answer yes or no.")
    fn = score_fn(m.model, m.params, ids, max_len=4)
    res = asap_sample(fn, regex("(yes|no)"), 50, 4, seed=0, tokenizer=m.tokenizer, vocab_size=m.model.vocab_size)
    texts = [m.tokenizer.decode(s) for s in res.samples]
    assert set(texts) <= {"yes", "no"}, texts
    dist = res.sampler.proposal_distribution()
    assert {m.tokenizer.decode(s) for s in dist} <= {"yes", "no"}
    eos = m.tokenizer.eos_id
    seq = {s: math.exp(sum(fn(s[:k])[s[k]] for k in range(len(s))) + fn(s)[eos]) for s in dist}
    z = sum(seq.values())
    by_text = lambda d: {t: round(sum(v for k, v in d.items() if m.tokenizer.decode(k) == t), 4) for t in ("yes", "no")}
    gcd = asap_sample(fn, regex("(yes|no)"), 1, 4, seed=0, tokenizer=m.tokenizer, vocab_size=m.model.vocab_size,
                      mode="gcd").sampler.proposal_distribution()
    target = {k: v / z for k, v in seq.items()}
    print(f"\nSmolLM2 (yes|no), {len(dist)} token strings: ASAp q after 50 samples {by_text(dist)} "
          f"KL {kl(target, dist):.5f}; GCD q {by_text(gcd)} KL {kl(target, gcd):.5f}; P* {by_text(target)}; "
          f"samples {dict((t, texts.count(t)) for t in sorted(set(texts)))}")
    assert abs(sum(dist.values()) - 1) < 1e-6
    assert kl(target, dist) < kl(target, gcd)


def test_grammar_aligned_generate_on_the_real_model(model_q):
    """`grammar_aligned_generate` through the compiled model (CI size): two prompts (one text) with their
    own constraints, rows prompt-major; every row is in its grammar and ends with EOS; each row's log_p is the
    model's log-probability of its tokens (EOS included) recomputed from teacher-forced logits; warm-up
    samples grow the trie without being returned; bad arguments name themselves."""
    import jax
    from tests.selfref import step_logits
    from tests import peer
    from jaxdec.constrained import choices, grammar_aligned_generate
    from jaxdec.models.tokenizer import Tokenizer
    model, params = model_q
    tok = Tokenizer.from_gguf(peer.default_gguf_path())
    q = tok.chat_ids("Is the sky blue? Answer yes or no, or with a number.")
    prompts = [q, list(q)]  # one prompt length: one compiled forward
    cons = [choices(["yes", "no"]), regex("[1-9][0-9]")]
    g = grammar_aligned_generate(model, params, prompts, cons, n=3, max_new_tokens=3, tokenizer=tok, seed=0,
                                 warmup=2)
    assert len(g.tokens) == 6 and g.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert g.constraint_ok == [True] * 6 and g.finish_reason == ["eos"] * 6
    eos = model.eos_ids[0]
    for i, (p, t, text) in enumerate(zip(g.prompt_ids, g.tokens, g.text)):
        assert t[-1] == eos and eos not in t[:-1], t
        assert text in ("yes", "no") if i < 3 else re.fullmatch("[1-9][0-9]", text), (i, text)
        lp = np.asarray(jax.nn.log_softmax(step_logits(model, params, p, t), axis=-1))
        ref = float(lp[np.arange(len(t)), t].sum())
        assert abs(g.extras["log_p"][i] - ref) < 2e-2, (i, g.extras["log_p"][i], ref)
        assert g.extras["log_q"][i] <= 1e-9
    assert all(s.samples_drawn - s.dead_ends == 5 for s in g.extras["samplers"])  # 2 warm-up + 3 returned per prompt
    with pytest.raises(ValueError, match=r"constraint: a list of constraints needs one entry per prompt \(2\)"):
        grammar_aligned_generate(model, params, prompts, cons[:1], tokenizer=tok)
    with pytest.raises(TypeError, match=r"constraint\[0\]: expected a jaxdec.constrained Constraint"):
        grammar_aligned_generate(model, params, prompts[:1], "yes|no", tokenizer=tok)
    with pytest.raises(ValueError, match=r"tokenizer: grammar_aligned_generate needs the tokenizer"):
        grammar_aligned_generate(model, params, prompts, cons)


def test_kv_reuse_same_samples_fewer_tokens(model_q):
    """KV reuse (`kv_score_fn`: the prompt prefilled once, each new trie node runs only the tokens after the
    prefix its cache holds, rolled back on a branch) gives the log-probs of the full-buffer `score_fn` at every
    prefix of an order that goes deeper, branches and comes back; a scorer whose cache does not hold the prefix
    it believes (a missing rollback) is caught (negative control). Through `grammar_aligned_generate` the same
    seed gives the same samples, the same model calls and far fewer model tokens; the full scorer's counter is
    exactly calls x (prompt + buffer) (the counter counts: the comparison can fail)."""
    from tests import peer
    from jaxdec.constrained import grammar_aligned_generate
    from jaxdec.constrained.asap import kv_score_fn, score_fn
    from jaxdec.models.tokenizer import Tokenizer
    model, params = model_q
    tok = Tokenizer.from_gguf(peer.default_gguf_path())
    q = tok.chat_ids("Invent a phone number.")
    full, kv = score_fn(model, params, q, 6), kv_score_fn(model, params, q, 6)
    order = [(), (33,), (33, 34), (33, 34, 35, 29), (33, 36), (37, 38, 39, 40, 41, 42), (33,), (33, 34, 35)]
    for pre in order:
        ref = full(pre)
        np.testing.assert_allclose(kv(pre), ref, rtol=0, atol=1e-4 * np.abs(ref).max(), err_msg=str(pre))
    stale = kv_score_fn(model, params, q, 6)
    stale((33, 34))
    stale.path = (33, 36)  # the cache holds (33, 34): the next call runs only its last token on top of it
    ref = full((33, 36, 35))
    assert np.abs(stale((33, 36, 35)) - ref).max() > 1e-2 * np.abs(ref).max()

    rx = regex("[0-9]{3}-[0-9]{2}")
    a = grammar_aligned_generate(model, params, [q], rx, n=4, max_new_tokens=8, tokenizer=tok, seed=3, warmup=2,
                                 kv_reuse=False)
    b = grammar_aligned_generate(model, params, [q], rx, n=4, max_new_tokens=8, tokenizer=tok, seed=3, warmup=2)
    assert b.stats["kv_reuse"] and not a.stats["kv_reuse"]
    assert b.tokens == a.tokens and b.constraint_ok == [True] * 4, (a.text, b.text)
    assert all(re.fullmatch("[0-9]{3}-[0-9]{2}", t) for t in b.text), b.text
    np.testing.assert_allclose(b.extras["log_q"], a.extras["log_q"], atol=1e-3)
    np.testing.assert_allclose(b.extras["log_p"], a.extras["log_p"], atol=1e-3)
    assert b.stats["model_calls"] == a.stats["model_calls"] > 8
    assert a.stats["model_tokens"] == a.stats["model_calls"] * (len(q) + 8)
    print(f"\nASAp model tokens: {a.stats['model_tokens']} without KV reuse, {b.stats['model_tokens']} with "
          f"({a.stats['model_calls']} trie nodes)")
    assert b.stats["model_tokens"] * 4 < a.stats["model_tokens"]
    c = grammar_aligned_generate(model, params, [q], rx, n=4, max_new_tokens=8, tokenizer=tok, seed=4, warmup=2)
    assert c.tokens != b.tokens  # another seed, other samples: equal samples above are not a constant
    with pytest.raises(TypeError, match="kv_reuse: expected a bool"):
        grammar_aligned_generate(model, params, [q], rx, tokenizer=tok, kv_reuse="yes")
