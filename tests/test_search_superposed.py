"""Superposed decoding: defining properties against independent references.

* k = 1 without n-grams is greedy decoding (default model), and its score is the greedy sequence's
  log-probability;
* one selection step (k*m expansion, n-gram interpolation, finished drafts, superposition weights)
  equals a brute-force NumPy enumeration over sequences, with the n-gram read from plain dicts;
* the superposed input is the weighted sum of the drafts' embeddings: the model's logits on it equal
  the HF peer's logits on ``inputs_embeds`` built from the peer's own embedding table (negative control:
  other weights give other logits);
* n-gram weight 0 changes nothing; weight 1 picks, at every step, a token the n-gram model ranks first;
* drafts are distinct and sorted; new traced settings do not recompile; bad input raises ValueError
  naming the argument.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdec.core.steps import initial_state
from jaxdec.search.superposed import (NGramModel, Superposed, default_ngram, draft_weights, expand_and_prune,
                                      forward_embeds, lookup, superpose, superposed_generate, superposed_inputs)
from jaxdec.core.state import DecodeInputs

N_NEW = 16


# ------------------------------------------------------------------ NumPy references
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_step(drafts, logits, prompt, k, m, temperature, stop, ngram=None, alpha=0.0, lambdas=(), penalty=200.0):
    """drafts: list of (tokens tuple, score, finished), best first. Brute force over every candidate."""
    lp = np_log_softmax(np.asarray(logits) / temperature)
    top = np.argsort(-lp, kind="stable")[:m]
    cands = []
    for toks, s, fin in drafts:
        if fin:
            cands.append((toks, s, True))
            continue
        hist = list(prompt) + list(toks)
        for c in top:
            inc = lp[c]
            if ngram is not None and alpha > 0:
                p = sum(lam * (ngram.prob(n, hist[len(hist) - (n - 1):], c) if len(hist) >= n - 1 else 0.0)
                        for lam, n in zip(lambdas, ngram.orders))
                inc = (1 - alpha) * lp[c] + (alpha * np.log(p) if p > 0 else -penalty)
            cands.append((toks + (int(c),), s + inc, int(c) in stop))
    cands.sort(key=lambda x: -x[1])
    return cands[:k]


def np_weights(drafts):
    s = np.array([d[1] for d in drafts])
    alive = np.array([not d[2] for d in drafts])
    w = np.where(alive, np.exp(s - s[alive].max()), 0.0) if alive.any() else np.zeros_like(s)
    return w / max(w.sum(), 1e-30)


# ------------------------------------------------------------------ pure selection vs brute force
def test_expand_and_prune_equals_brute_force():
    rng = np.random.default_rng(0)
    b, k, m = 4, 3, 5
    scores = rng.normal(0, 2, (b, k)).astype(np.float32)
    fin = rng.random((b, k)) < 0.3
    inc = rng.normal(-2, 1, (b, k, m)).astype(np.float32)
    vals, src, j = jax.device_get(expand_and_prune(jnp.asarray(scores), jnp.asarray(fin), jnp.asarray(inc), k))
    for r in range(b):
        cands = []
        for i in range(k):
            if fin[r, i]:
                cands.append((float(scores[r, i]), i, 0))
            else:
                cands += [(float(scores[r, i] + inc[r, i, c]), i, c) for c in range(m)]
        cands.sort(key=lambda x: -x[0])
        assert [(i, c) for _, i, c in cands[:k]] == list(zip(src[r].tolist(), j[r].tolist()))
        np.testing.assert_allclose(vals[r], [v for v, _, _ in cands[:k]], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("use_ngram", [False, True])
def test_decoder_steps_equal_brute_force(use_ngram):
    """Three selection steps of the decoder on random logits (the stop id gets a boosted logit so that
    drafts finish) equal the NumPy enumeration: tokens, scores, finished flags, superposition weights."""
    rng = np.random.default_rng(1 + use_ngram)
    v, k, m, b, cap, stop = 12, 3, 4, 2, 8, (0,)
    prompts = np.array([[5, 6, 7, 8], [3, 9, 1, 2]], np.int32)
    plens = np.array([4, 3], np.int32)  # row 1's prompt is [3, 9, 1]
    ngram, lambdas, alpha, orders = None, (), 0.0, ()
    if use_ngram:
        corpus = [rng.integers(1, v, 60).tolist() for _ in range(3)]
        ngram = NGramModel.from_token_ids(corpus, orders=(2, 3))
        lambdas, alpha, orders = (0.3, 0.7), 0.4, ngram.orders
    dec = Superposed(num_drafts=k, num_candidates=m, orders=orders)
    inputs = DecodeInputs(out_buffer=jnp.zeros((b, cap), jnp.int32), max_new=jnp.full((b,), cap, jnp.int32),
                          min_new=jnp.zeros((b,), jnp.int32), keys=jnp.zeros((b, 2), jnp.uint32),
                          stop_ids=jnp.asarray(stop, jnp.int32),
                          method=superposed_inputs(b, 0.7, alpha, lambdas if use_ngram else None, 3.0,
                                                   ngram.tables() if use_ngram else ()))
    method = dec.initial_method(jnp.asarray(prompts), jnp.asarray(plens), inputs)
    state = initial_state(jnp.asarray(prompts), None, inputs, method, {"model_calls": jnp.zeros((), jnp.int32)})
    ref = [[((), 0.0, False)] for _ in range(b)]
    advance = jax.jit(dec._advance)
    for step in range(3):
        logits = rng.normal(0, 2, (b, v)).astype(np.float32)
        logits[:, 0] += 1.5 * step  # make the stop id likely later on
        state = advance(state, jnp.asarray(logits))
        md = vars(jax.device_get(state.method))
        for r in range(b):
            ref[r] = np_step(ref[r], logits[r], prompts[r, :plens[r]].tolist(), k, m, 0.7, stop, ngram, alpha,
                             lambdas, 3.0)
            got = [(tuple(md["drafts"][r, i, :md["dlen"][r, i]].tolist()), md["scores"][r, i], md["fin"][r, i])
                   for i in range(k)]
            assert [g[0] for g in got] == [x[0] for x in ref[r]], (step, r)
            assert [bool(g[2]) for g in got] == [x[2] for x in ref[r]], (step, r)
            np.testing.assert_allclose([g[1] for g in got], [x[1] for x in ref[r]], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(md["weights"][r], np_weights(ref[r]), rtol=1e-5, atol=1e-6)
    assert any(x[2] for r in ref for x in r), "no draft finished: the finished-draft path never ran"
    if use_ngram:
        assert np.asarray(state.method.scores).min() > -1e8


def test_ngram_table_lookup_equals_dict():
    rng = np.random.default_rng(3)
    corpus = [rng.integers(0, 30, 400).tolist(), rng.integers(0, 30, 100).tolist()]
    ng = NGramModel.from_token_ids(corpus, orders=(1, 2, 3))
    for table, n in zip(ng.tables(), ng.orders):
        items = [(c, t) for c, nx in ng.counts[n].items() for t in nx]
        unseen = [(tuple(rng.integers(0, 40, n - 1).tolist()), int(rng.integers(0, 40))) for _ in range(200)]
        qs = items + unseen
        ctx = jnp.asarray(np.array([c for c, _ in qs], np.int32).reshape(len(qs), n - 1))
        got = np.asarray(lookup(table, n, ctx, jnp.asarray([t for _, t in qs], jnp.int32)))
        want = np.array([ng.prob(n, c, t) for c, t in qs])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        assert (want[:len(items)] > 0).all()


# ------------------------------------------------------------------ default model
def test_k1_is_greedy_and_score_is_its_logprob(model_f32, chat_prompt_ids):
    from jaxdec import generate, score
    model, params = model_f32
    prompts = chat_prompt_ids[:3]
    g = superposed_generate(model, params, prompts, num_drafts=1, max_new_tokens=N_NEW)
    greedy = generate(model, params, prompts, max_new_tokens=N_NEW).tokens
    assert g.tokens == greedy
    lps = score(model, params, prompts, greedy)
    np.testing.assert_allclose(g.extras["scores"], [float(np.sum(lp)) for lp in lps], rtol=1e-4, atol=1e-3)
    assert g.stats["row_calls_per_draft"] <= N_NEW


def test_k1_is_greedy_with_quantized_weights(model_q, chat_prompt_ids):
    """The embedding-input path with a block-quantized (tied) embedding table as the LM head."""
    from jaxdec import generate
    model, params = model_q
    prompts = chat_prompt_ids[:1]
    g = superposed_generate(model, params, prompts, num_drafts=1, max_new_tokens=8)
    assert g.tokens == generate(model, params, prompts, max_new_tokens=8).tokens


def test_superposed_input_is_weighted_sum_of_embeddings(model_f32, chat_prompt_ids):
    """Our forward on the superposed vector equals the HF peer on inputs_embeds made from its own table."""
    import torch
    import peer
    from jaxdec.core.steps import prefill
    model, params = model_f32
    prompt = chat_prompt_ids[0]
    toks = np.array([[28, 198, 1010]], np.int32)
    scores = jnp.asarray([[-0.5, -1.2, -2.0]], jnp.float32)
    w = draft_weights(scores, jnp.zeros((1, 3), bool))
    w_np = np.exp([-0.5, -1.2, -2.0]) / np.exp([-0.5, -1.2, -2.0]).sum()
    np.testing.assert_allclose(np.asarray(w)[0], w_np, rtol=1e-6)
    emb = superpose(model, params, jnp.asarray(toks), w)
    table = np.asarray(params["embed"], np.float32)
    np.testing.assert_allclose(np.asarray(emb)[0], (w_np[:, None] * table[toks[0]]).sum(0), rtol=1e-5, atol=1e-6)

    @jax.jit
    def _ours(params, e):
        p = len(prompt)
        cache = model.init_cache(1, 64)
        _, cache, _ = prefill(model, params, jnp.asarray([prompt], jnp.int32), jnp.asarray([p], jnp.int32), cache)
        return forward_embeds(model, params, e[:, None, :], jnp.asarray([[p]], jnp.int32), cache).logits[0, 0]

    def ours(e):
        return np.asarray(_ours(params, e))

    hf = peer.peer_model()
    with torch.no_grad():
        hf_table = hf.get_input_embeddings().weight
        sup = (torch.tensor(w_np, dtype=torch.float32)[:, None] * hf_table[torch.tensor(toks[0].tolist())]).sum(0)
        x = torch.cat([hf_table[torch.tensor(prompt)], sup[None]], 0)[None]
        ref = hf(inputs_embeds=x).logits[0, -1].numpy()
    got = ours(emb)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # negative control: uniform weights are a different input, and the comparison sees it
    other = ours(superpose(model, params, jnp.asarray(toks), jnp.full((1, 3), 1 / 3, jnp.float32)))
    assert np.abs(other - ref).max() > 100 * 1e-4 * np.abs(ref).max()


@pytest.fixture(scope="module")
def tok(gguf_path):
    from jaxdec.models.tokenizer import Tokenizer
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def k3_runs(model_f32, chat_prompt_ids, tok):
    from jaxdec.core import loop
    model, params = model_f32
    prompts = chat_prompt_ids[:2]
    plain = superposed_generate(model, params, prompts, num_drafts=3, max_new_tokens=N_NEW)
    ng = default_ngram(tok)
    zero = superposed_generate(model, params, prompts, num_drafts=3, max_new_tokens=N_NEW, ngram=ng, ngram_alpha=0.0)
    before = loop.TRACE_COUNTS["run:Superposed"]
    half = superposed_generate(model, params, prompts, num_drafts=3, max_new_tokens=N_NEW, ngram=ng,
                               ngram_alpha=0.5, temperature=0.8)
    traces = loop.TRACE_COUNTS["run:Superposed"] - before
    return prompts, plain, zero, half, traces


def test_drafts_distinct_sorted_and_cheap(k3_runs):
    prompts, plain, zero, half, traces = k3_runs
    for g in (plain, half):
        for beams in g.extras["beams"]:
            assert len(beams) == 3
            assert len({tuple(b["tokens"]) for b in beams}) == 3
            s = [b["score"] for b in beams]
            assert s == sorted(s, reverse=True)
            assert all(len(b["tokens"]) >= 1 for b in beams)
    # one single-row call per step for all k drafts: (steps + 1) / k per draft
    assert plain.stats["row_calls_per_draft"] <= (N_NEW + 1) / 3
    assert traces == 0, "a new alpha / temperature recompiled the decoder"


def test_ngram_weight_zero_changes_nothing_and_nonzero_does(k3_runs):
    prompts, plain, zero, half, _ = k3_runs
    assert zero.extras["beams"] == plain.extras["beams"]
    assert half.extras["beams"] != plain.extras["beams"]


def test_ngram_weight_one_follows_the_ngram_model(model_f32, tok):
    """alpha = 1 over the whole vocabulary (k = 1): every token maximises p_ng given its context."""
    model, params = model_f32
    text = ("The cat sat on the mat. The dog sat on the log. The cat saw the dog and the dog saw the cat. "
            "A bird sat on the fence and sang.")
    ng = NGramModel.from_texts([text], tok, orders=(2, 3))
    lambdas = (0.4, 0.6)
    prompt = tok.encode("The dog")
    g = superposed_generate(model, params, [prompt], num_drafts=1, num_candidates=model.vocab_size, ngram=ng,
                            ngram_alpha=1.0, ngram_weights=lambdas, max_new_tokens=12, stop_ids=())
    out = g.tokens[0]
    hist = list(prompt)
    vocab = sorted({t for c in ng.counts[2] for t in ng.counts[2][c]})
    for t in out:
        p = {c: sum(lam * ng.prob(n, hist[len(hist) - (n - 1):], c) for lam, n in zip(lambdas, ng.orders))
             for c in vocab}
        best = max(p.values())
        assert best > 0, "the reference walk left the corpus; choose another prompt"
        assert p.get(t, 0.0) == pytest.approx(best, abs=1e-6), (tok.decode(hist), t)
        hist.append(t)
    greedy = superposed_generate(model, params, [prompt], num_drafts=1, max_new_tokens=12, stop_ids=()).tokens[0]
    assert out != greedy  # the n-gram really steered the decoder


def test_bad_input_errors(model_f32):
    model, params = model_f32
    p = [[1, 2, 3]]
    ng = NGramModel.from_token_ids([[1, 2, 3, 4]], orders=(2, 3))
    cases = [
        (dict(num_drafts=0), "num_drafts"),
        (dict(num_drafts=2.5), "num_drafts"),
        (dict(num_drafts=3, num_candidates=2), "num_candidates"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(ngram=ng, ngram_alpha=1.5), "ngram_alpha"),
        (dict(ngram=ng, ngram_alpha=0.5, ngram_weights=(0.5, 0.4)), "ngram_weights"),
        (dict(ngram=ng, ngram_alpha=0.5, ngram_weights=(1.0,)), "ngram_weights"),
        (dict(ngram=ng, ngram_alpha=0.5, ngram_weights=(1.2, -0.2)), "ngram_weights"),
        (dict(ngram=ng, ngram_alpha=0.5, ngram_penalty=-1.0), "ngram_penalty"),
        (dict(ngram_alpha=0.5), "ngram"),
        (dict(ngram_weights=(1.0,)), "ngram_weights"),
        (dict(ngram={"not": "a model"}), "ngram"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            superposed_generate(model, params, p, **kw)
    with pytest.raises(ValueError, match="orders"):
        NGramModel.from_token_ids([[1, 2]], orders=(0,))
    with pytest.raises(ValueError, match="empty"):
        NGramModel.from_token_ids([], orders=(2,))


# ------------------------------------------------------------------ CLI
def _cli(tmp_path, *extra):
    import json
    from jaxdec.cli import main
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--prompt", "What is 2+2?", "--chat", "--max-new-tokens", "6", "--quiet",
               "--out", str(out), "--method", "superposed", *extra])
    return rc, ([json.loads(line) for line in out.read_text().splitlines()] if rc == 0 else None)


def test_cli_superposed(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "2 + 2 = 4. The answer is 4."}\n{"prompt": "What is 2+2? It is 4."}\n')
    rc, rows = _cli(tmp_path, "--num-drafts", "2", "--ngram-alpha", "0.3", "--ngram-corpus", str(corpus),
                    "--ngram-orders", "2,3", "--ngram-weights", "0.5,0.5")
    assert rc == 0 and len(rows) == 1
    r = rows[0]
    assert len(r["beams"]) == 2 and r["tokens"] == r["beams"][0]["tokens"]
    assert len({tuple(b["tokens"]) for b in r["beams"]}) == 2
    assert r["beams"][0]["score"] >= r["beams"][1]["score"]
    rc, _ = _cli(tmp_path, "--ngram-alpha", "0.3", "--ngram-weights", "0.5,0.2")
    assert rc == 2
    assert "ngram_weights" in capsys.readouterr().err
