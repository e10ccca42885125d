"""Speculative sampling is lossless: statistical tests per DESIGN's conventions.

* Verifier level (controlled distributions): draft x ~ q, verify against p; the emitted token follows p
  for chains (Leviathan/Chen residual resampling) and for trees (recursive rejection over i.i.d. or
  without-replacement siblings); the acceptance rate equals sum_x min(p, q) within its confidence
  interval; a verifier without residual resampling is rejected.
* Engine level (`TrigramModel`: a context-dependent toy LM behind the real model interface, whose
  exact conditionals are known): the whole `SpeculativeDecoder` loop with a separate draft model
  produces the target's joint distribution of the first speculative token and of two tokens.
* Real model over a restricted vocabulary: p and q are the default model's and its layer-truncated
  copy's next-token distributions restricted to a few tokens.

Every test uses a fixed seed, α = 1e-4, pools bins with expected count < 5 and shows that the same test
rejects a negative control.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdec.core import loop
from jaxdec.core.processors import SamplingParams
from jaxdec.speculative import SpeculativeDecoder, sampling_verify_chain, sampling_verify_tree
from jaxdec.speculative.drafters import DraftModelDrafter, LayerSkipDrafter, PromptLookupDrafter
from jaxdec.speculative.engine import with_draft_params
from jaxdec.testing.toy_speculative import TrigramModel, exact_joint, next_probs, random_table
from jaxdec.speculative.tree import TreeSpec, ancestor_mask, block_depths
from jaxdec.core.state import DecodeInputs
from stat_checks import pooled_chisquare_p  # noqa: E402

ALPHA = 1e-4
Z = scipy.stats.norm.isf(ALPHA / 2)


def _dist(rng, v, sharp):
    z = rng.standard_normal(v) * sharp
    p = np.exp(z - z.max())
    return p / p.sum()


# ------------------------------------------------------------------------------------------------
# Verifier level: controlled distributions
# ------------------------------------------------------------------------------------------------
V = 8
N_DRAWS = 200_000


def _chain_first_token(p, q, seed, residual=True):
    """Draw a 1-token draft x ~ q per row, verify against p; returns (emitted first tokens, accepted)."""
    key = jax.random.PRNGKey(seed)
    kd, kv = jax.random.split(key)
    b = N_DRAWS
    x = jax.random.categorical(kd, jnp.log(jnp.asarray(q, jnp.float32)), shape=(b,)).astype(jnp.int32)
    block = jnp.stack([jnp.zeros((b,), jnp.int32), x], axis=1)
    pb = jnp.broadcast_to(jnp.asarray(np.stack([p, np.full(V, 1.0 / V)]), jnp.float32), (b, 2, V))
    qb = jnp.broadcast_to(jnp.asarray(q, jnp.float32)[None, None], (b, 1, V))
    keys = jax.random.split(kv, b)
    verdict = jax.jit(sampling_verify_chain, static_argnames="residual")(
        keys, block, jnp.ones((b, 1), bool), pb, qb, residual=residual)
    return np.asarray(verdict.out[:, 0]), np.asarray(verdict.n_acc)


def test_chain_first_token_follows_target_and_acceptance_rate():
    rng = np.random.default_rng(0)
    p, q = _dist(rng, V, 1.5), _dist(rng, V, 1.5)
    toks, n_acc = _chain_first_token(p, q, seed=1)
    counts = np.bincount(toks, minlength=V)
    assert pooled_chisquare_p(counts, p) > ALPHA
    # acceptance rate = sum min(p, q), within its normal-approximation interval
    alpha = np.minimum(p, q).sum()
    rate = n_acc.mean()
    se = np.sqrt(alpha * (1 - alpha) / len(n_acc))
    assert abs(rate - alpha) < Z * se, (rate, alpha)
    # negative control: without residual resampling the output is biased towards q
    bad, _ = _chain_first_token(p, q, seed=2, residual=False)
    assert pooled_chisquare_p(np.bincount(bad, minlength=V), p) < ALPHA
    # and the acceptance-rate check rejects a wrong claim (the rate is not sum min(p, q) of another q)
    q2 = _dist(np.random.default_rng(5), V, 1.5)
    assert abs(rate - np.minimum(p, q2).sum()) > Z * se


def _chain_two_tokens(p1, p2, q1, q2, seed, residual=True):
    """Two-token chain x1 ~ q1, x2 ~ q2(.|x1), verified against p1, p2(.|x1), then a second round when
    the first token was corrected (the next step's draft from q2(.|y1) verified against p2(.|y1)).
    Returns the emitted (y1, y2)."""
    b = N_DRAWS
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    lq1 = jnp.log(jnp.asarray(q1, jnp.float32))
    lq2 = jnp.log(jnp.asarray(q2, jnp.float32))
    x1 = jax.random.categorical(ks[0], lq1, shape=(b,)).astype(jnp.int32)
    x2 = jax.random.categorical(ks[1], lq2[x1]).astype(jnp.int32)
    block = jnp.stack([jnp.zeros((b,), jnp.int32), x1, x2], axis=1)
    P2 = jnp.asarray(p2, jnp.float32)
    Q2 = jnp.asarray(q2, jnp.float32)
    pb = jnp.stack([jnp.broadcast_to(jnp.asarray(p1, jnp.float32), (b, V)), P2[x1], jnp.full((b, V), 1.0 / V)], 1)
    qb = jnp.stack([jnp.broadcast_to(jnp.asarray(q1, jnp.float32), (b, V)), Q2[x1]], 1)
    ver = jax.jit(sampling_verify_chain, static_argnames="residual")
    v1 = ver(jax.random.split(ks[2], b), block, jnp.ones((b, 2), bool), pb, qb, residual=residual)
    y1 = v1.out[:, 0]
    # second round for rows that emitted only one token
    z = jax.random.categorical(ks[3], lq2[y1]).astype(jnp.int32)
    block2 = jnp.stack([y1, z], axis=1)
    pb2 = jnp.stack([P2[y1], jnp.full((b, V), 1.0 / V)], 1)
    v2 = ver(jax.random.split(ks[4], b), block2, jnp.ones((b, 1), bool), pb2, Q2[y1][:, None], residual=residual)
    y2 = jnp.where(v1.n_acc >= 1, v1.out[:, 1], v2.out[:, 0])
    return np.asarray(y1), np.asarray(y2)


def test_chain_two_token_joint_follows_target():
    rng = np.random.default_rng(3)
    p1, q1 = _dist(rng, V, 1.5), _dist(rng, V, 1.5)
    p2 = np.stack([_dist(rng, V, 1.5) for _ in range(V)])
    q2 = np.stack([_dist(rng, V, 1.5) for _ in range(V)])
    joint = p1[:, None] * p2
    y1, y2 = _chain_two_tokens(p1, p2, q1, q2, seed=4)
    counts = np.bincount(y1 * V + y2, minlength=V * V)
    assert pooled_chisquare_p(counts, joint) > ALPHA
    b1, b2 = _chain_two_tokens(p1, p2, q1, q2, seed=5, residual=False)
    assert pooled_chisquare_p(np.bincount(b1 * V + b2, minlength=V * V), joint) < ALPHA


@pytest.mark.parametrize("mode", ["iid", "without_replacement", "deterministic"])
def test_tree_first_token_follows_target(mode):
    """Root with 3 sibling drafts (each with one child): the emitted first token follows p."""
    rng = np.random.default_rng(7)
    p, q = _dist(rng, V, 1.5), _dist(rng, V, 1.5)
    b = N_DRAWS
    tree = TreeSpec.from_widths((3, 1))
    parents = tree.parents_array(b)
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    lq = jnp.log(jnp.asarray(q, jnp.float32))
    if mode == "iid":
        sib = jax.random.categorical(ks[0], lq, shape=(b, 3))
    else:  # Gumbel-top-k: three distinct tokens, a draw without replacement from q
        g = jax.random.gumbel(ks[0], (b, V)) + lq
        sib = jax.lax.top_k(g, 3)[1]
    kids = jax.random.categorical(ks[1], lq, shape=(b, 3))
    toks = jnp.concatenate([sib, kids], axis=1).astype(jnp.int32)  # nodes 0-2 siblings, 3-5 their children
    block = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), toks], axis=1)
    pb = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (b, 7, V))
    qb = None if mode == "deterministic" else jnp.broadcast_to(jnp.asarray(q, jnp.float32), (b, 6, V))
    anc = ancestor_mask(parents)
    depth = block_depths(parents, tree.max_depth)

    def run(qarg, wor, residual=True):
        f = jax.jit(lambda k, bl, a, d, pp, qq: sampling_verify_tree(
            k, bl, parents, jnp.ones((b, 6), bool), pp, qq, a, d, tree.max_depth, tree.max_branching, wor,
            residual))
        return np.asarray(f(jax.random.split(ks[2], b), block, anc, depth, pb, qarg).out[:, 0])

    wor = mode == "without_replacement"
    out = run(qb, wor)
    assert pooled_chisquare_p(np.bincount(out, minlength=V), p) > ALPHA
    # negative controls: treat distinct (without-replacement) siblings as i.i.d., or i.i.d. as distinct;
    # deterministic drafts (q one-hot): no residual resampling after a rejected draft
    bad = run(qb, not wor) if mode != "deterministic" else run(qb, wor, residual=False)
    assert pooled_chisquare_p(np.bincount(bad, minlength=V), p) < ALPHA


# ------------------------------------------------------------------------------------------------
# Engine level: the whole SpeculativeDecoder loop on a context-dependent toy model
# ------------------------------------------------------------------------------------------------
TV = 5
ROWS = 200_000


def _toy_setup():
    tab = random_table(21, TV, 1.2)
    dtab = tab + random_table(22, TV, 1.2)  # a clearly different draft model
    return TrigramModel(TV), tab, dtab


def _run_toy(decoder, model, params, max_new, seed, temperature=1.0, **sampling):
    prompt = np.array([[3, 1]], np.int32)
    prompts = jnp.asarray(np.repeat(prompt, ROWS, 0))
    lens = jnp.full((ROWS,), prompt.shape[1], jnp.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(seed), ROWS)).astype(jnp.uint32)
    inputs = DecodeInputs(max_new=jnp.full((ROWS,), max_new, jnp.int32), min_new=jnp.zeros((ROWS,), jnp.int32),
                          keys=keys, stop_ids=jnp.zeros((0,), jnp.int32), out_buffer=jnp.zeros((ROWS, 4), jnp.int32),
                          sampling=SamplingParams.create(ROWS, temperature=temperature, **sampling))
    size = prompt.shape[1] + 4 + decoder.cache_headroom + 1
    state = loop.run_jit(decoder, model, params, prompts, lens, inputs, size)
    return np.asarray(state.tokens), decoder.summarize(state)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_joint_distribution_draft_model(temperature):
    model, tab, dtab = _toy_setup()
    params = with_draft_params({"table": jnp.asarray(tab)}, {"table": jnp.asarray(dtab)})
    dec = SpeculativeDecoder(DraftModelDrafter(model, num_tokens=2, sample=True), verifier="sampling")
    toks, stats = _run_toy(dec, model, params, 3, seed=31, temperature=temperature)
    joint = exact_joint(tab, (3, 1), 3, temperature)
    # first speculative token (token 2, jointly with the plainly sampled token 1)
    c2 = np.bincount(toks[:, 0] * TV + toks[:, 1], minlength=TV * TV)
    assert pooled_chisquare_p(c2, joint.sum(axis=2)) > ALPHA
    # two speculative tokens jointly (tokens 2 and 3, with token 1)
    c3 = np.bincount((toks[:, 0] * TV + toks[:, 1]) * TV + toks[:, 2], minlength=TV ** 3)
    assert pooled_chisquare_p(c3, joint) > ALPHA
    assert stats["tau"] > 1.2  # the draft model is accepted often enough that both paths are exercised
    # negative control: the same run without residual resampling is rejected
    bad = SpeculativeDecoder(DraftModelDrafter(model, num_tokens=2, sample=True), verifier="sampling", residual=False)
    btoks, _ = _run_toy(bad, model, params, 3, seed=32, temperature=temperature)
    cb = np.bincount((btoks[:, 0] * TV + btoks[:, 1]) * TV + btoks[:, 2], minlength=TV ** 3)
    assert pooled_chisquare_p(cb, joint) < ALPHA


def test_engine_acceptance_rate_matches_sum_min():
    """One speculative step (max_new=2): P(first draft token accepted) = E_t1[sum_x min(p, q)]."""
    model, tab, dtab = _toy_setup()
    params = with_draft_params({"table": jnp.asarray(tab)}, {"table": jnp.asarray(dtab)})
    dec = SpeculativeDecoder(DraftModelDrafter(model, num_tokens=1, sample=True), verifier="sampling")
    _, stats = _run_toy(dec, model, params, 2, seed=41)
    p1 = next_probs(tab, 3, 1)
    alpha = sum(p1[t] * np.minimum(next_probs(tab, 1, t), next_probs(dtab, 1, t)).sum() for t in range(TV))
    raw = stats["raw"]
    assert raw["pos_offered"][0] == ROWS
    rate = raw["pos_accepted"][0] / raw["pos_offered"][0]
    se = np.sqrt(alpha * (1 - alpha) / ROWS)
    assert abs(rate - alpha) < Z * se, (rate, alpha)
    # the interval is tight enough to tell this from the acceptance of a greedy (argmax) match
    alpha_wrong = sum(p1[t] * next_probs(tab, 1, t)[np.argmax(next_probs(dtab, 1, t))] for t in range(TV))
    assert abs(rate - alpha_wrong) > Z * se


def test_engine_joint_deterministic_drafter_and_layer_skip():
    """Sampling verification of a deterministic drafter (PLD, q one-hot) and of layer-skip drafts
    (the toy's 'skipped' model uses another table) also gives the target's joint distribution."""
    model, tab, dtab = _toy_setup()
    joint = exact_joint(tab, (3, 1), 3, 1.0)
    ptab = {"table": jnp.asarray(tab), "table_skip": jnp.asarray(dtab)}
    for i, drafter in enumerate([PromptLookupDrafter(num_tokens=2, max_ngram=1),
                                 LayerSkipDrafter(skip=(0,), num_tokens=2, sample=True)]):
        dec = SpeculativeDecoder(drafter, verifier="sampling")
        toks, stats = _run_toy(dec, model, ptab, 3, seed=51 + i)
        c3 = np.bincount((toks[:, 0] * TV + toks[:, 1]) * TV + toks[:, 2], minlength=TV ** 3)
        assert pooled_chisquare_p(c3, joint) > ALPHA, type(drafter).__name__
        assert stats["tau"] > 1.05, (type(drafter).__name__, stats["tau"])
        # negative control: the same drafter without residual resampling is rejected
        bad = SpeculativeDecoder(drafter, verifier="sampling", residual=False)
        btoks, _ = _run_toy(bad, model, ptab, 3, seed=53 + i)
        cb = np.bincount((btoks[:, 0] * TV + btoks[:, 1]) * TV + btoks[:, 2], minlength=TV ** 3)
        assert pooled_chisquare_p(cb, joint) < ALPHA, type(drafter).__name__


def _np_top_k_top_p_joint(table, prompt, n, temperature, top_k, top_p):
    """Independent NumPy reference (float64): the exact joint of n tokens when each conditional
    softmax(table[prev, tok] / temperature) keeps its top_k largest entries, then the smallest set of
    largest ones whose mass reaches top_p (HF's rule: drop the ascending-cumulative mass <= 1 - top_p),
    renormalized."""
    v = table.shape[-1]

    def cond(prev, tok):
        z = table[prev, tok].astype(np.float64) / temperature
        keep = z >= np.sort(z)[-top_k]
        z = np.where(keep, z, -np.inf)
        pr = np.exp(z - z.max())
        pr /= pr.sum()
        order = np.argsort(z, kind="stable")
        cum = np.cumsum(pr[order])
        assert np.min(np.abs(cum[:-1] - (1 - top_p))) > 1e-4  # no cut within rounding of the threshold
        drop = cum <= 1 - top_p
        drop[-1] = False
        pr[order[drop]] = 0.0
        return pr / pr.sum()

    joint = np.zeros((v,) * n)
    for idx in np.ndindex(*joint.shape):
        seq, pr = list(prompt), 1.0
        for t in idx:
            pr *= cond(seq[-2], seq[-1])[t]
            seq.append(t)
        joint[idx] = pr
    return joint


def test_engine_joint_top_k_top_p_draft_model():
    """Top-k and top-p through the speculative engine (the draft model samples from its own unfiltered
    distribution, the verifier from the target's filtered one): the joint of three tokens equals the
    NumPy reference's, with both the accept and the reject path taken; without residual resampling
    (the correction drawn from the filtered target instead of the residual) it is rejected."""
    model, tab, dtab = _toy_setup()
    setting = dict(temperature=0.8, top_k=3, top_p=0.8)
    joint = _np_top_k_top_p_joint(tab, (3, 1), 3, **setting)
    assert 6 <= (joint > 0).sum() < TV ** 3 // 2
    params = with_draft_params({"table": jnp.asarray(tab)}, {"table": jnp.asarray(dtab)})
    for residual, seed in ((True, 81), (False, 82)):
        dec = SpeculativeDecoder(DraftModelDrafter(model, num_tokens=2, sample=True), verifier="sampling",
                                 residual=residual)
        toks, stats = _run_toy(dec, model, params, 3, seed=seed, **setting)
        c3 = np.bincount((toks[:, 0] * TV + toks[:, 1]) * TV + toks[:, 2], minlength=TV ** 3)
        if residual:
            assert c3[(joint == 0).ravel()].sum() == 0  # never a token top-k / top-p removed
            assert pooled_chisquare_p(c3, joint) > ALPHA
            raw = stats["raw"]
            assert stats["tau"] > 1.1 and raw["pos_offered"][0] > raw["pos_accepted"][0] > 0
        else:
            assert pooled_chisquare_p(c3, joint) < ALPHA


def test_engine_joint_stand_gumbel_tree():
    """STAND-style drafts: siblings are a Gumbel-top-k sample without replacement from the n-gram
    table's stored distribution (top-2 of the target's, renormalized, so q != p), verified by recursive
    rejection sampling without replacement: the joint of three tokens is the target's. Negative
    controls: the i.i.d. sibling rule, and no residual resampling."""
    from jaxdec.speculative.drafters import NGramDrafter
    model, tab, _ = _toy_setup()
    joint = exact_joint(tab, (3, 1), 3, 1.0)
    params = {"table": jnp.asarray(tab)}
    drafter = NGramDrafter(TreeSpec.from_widths((2, 1)), k=2, hash_size=64, mode="gumbel")
    dec = SpeculativeDecoder(drafter, verifier="sampling", tree_sampling="without_replacement")
    toks, stats = _run_toy(dec, model, params, 3, seed=61)
    c3 = np.bincount((toks[:, 0] * TV + toks[:, 1]) * TV + toks[:, 2], minlength=TV ** 3)
    assert pooled_chisquare_p(c3, joint) > ALPHA
    assert stats["tau"] > 1.2 and stats["side_branch_accepts"] > 0
    for bad in [SpeculativeDecoder(drafter, verifier="sampling", tree_sampling="iid"),
                SpeculativeDecoder(drafter, verifier="sampling", tree_sampling="without_replacement", residual=False)]:
        btoks, _ = _run_toy(bad, model, params, 3, seed=62)
        cb = np.bincount((btoks[:, 0] * TV + btoks[:, 1]) * TV + btoks[:, 2], minlength=TV ** 3)
        assert pooled_chisquare_p(cb, joint) < ALPHA


def test_real_model_restricted_vocabulary(model_f32):
    """p and q from the real model (target) and its layer-truncated copy (draft), restricted to the 8
    tokens the target likes most after a chat prompt: the verifier's first-token and two-token joint
    distributions equal the target's, and the no-residual verifier is rejected."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import peer
    from jaxdec.speculative.drafters import truncated_draft
    model, params = model_f32
    dm, dp = truncated_draft(model, params, 20)
    tok = peer.peer_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def next_logits(m, p, seqs):
        t = max(len(s) for s in seqs)
        arr = np.zeros((len(seqs), t), np.int32)
        for i, s in enumerate(seqs):
            arr[i, :len(s)] = s
        at = jnp.asarray([[len(s) - 1] for s in seqs], jnp.int32)
        out = m(p, jnp.asarray(arr), jnp.broadcast_to(jnp.arange(t), arr.shape), m.init_cache(len(seqs), t),
                logits_at=at)
        return np.asarray(out.logits[:, 0], np.float64)

    first = next_logits(model, params, [ids])[0]
    vocab = np.argsort(-first)[:V]

    def restrict(lg):
        z = lg[..., vocab]
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    seqs = [ids] + [ids + [int(t)] for t in vocab]
    p_all = restrict(next_logits(model, params, seqs))
    q_all = restrict(next_logits(dm, dp, seqs))
    p1, p2, q1, q2 = p_all[0], p_all[1:], q_all[0], q_all[1:]
    assert np.abs(p1 - q1).sum() > 0.05  # the draft really differs from the target
    y1, y2 = _chain_two_tokens(p1, p2, q1, q2, seed=71)
    assert pooled_chisquare_p(np.bincount(y1, minlength=V), p1) > ALPHA
    joint = p1[:, None] * p2
    assert pooled_chisquare_p(np.bincount(y1 * V + y2, minlength=V * V), joint) > ALPHA
    b1, b2 = _chain_two_tokens(p1, p2, q1, q2, seed=72, residual=False)
    assert pooled_chisquare_p(np.bincount(b1 * V + b2, minlength=V * V), joint) < ALPHA
