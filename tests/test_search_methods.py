"""Defining properties of the guided decoders (CAD, momentum, AdaDec), exactly on a tiny table model
against NumPy transcriptions of each method, and on the default model against greedy decoding."""
from __future__ import annotations

import numpy as np
import pytest

V = 7
EOS = 0


@pytest.fixture(scope="module")
def toy():
    from jaxdec.testing.toy_search import TableModel
    model = TableModel(vocab_size=V, eos_ids=(EOS,))
    params = model.init_params(5, scale=1.2)
    params = {**params, "A": params["A"].at[:, EOS].add(-1.0)}
    return model, params


def np_greedy(model, params, prompt, max_new):
    seq, out = list(prompt), []
    for _ in range(max_new):
        t = int(np.argmax(model.next_logprobs(params, seq)))
        out.append(t)
        seq.append(t)
        if t == EOS:
            break
    return out


TOY_PROMPTS = [[1, 2, 3], [4], [5, 6], [2, 2, 1, 3]]


# ------------------------------------------------------------------ CAD
def np_cad(model, params, ctx, plain, alpha, max_new, ban=(), min_new=0):
    out = []
    for _ in range(max_new):
        a = model.next_logprobs(params, list(ctx) + out)
        b = model.next_logprobs(params, list(plain) + out)
        c = (1 + alpha) * a - alpha * b
        c[list(ban) + ([EOS] if len(out) < min_new else [])] = -np.inf
        t = int(np.argmax(c))
        out.append(t)
        if t == EOS:
            break
    return out


def test_cad_toy_matches_reference_and_alpha_zero_is_greedy(toy):
    from jaxdec.search.cad import context_aware_generate
    model, params = toy
    ctx = [[3, 1, 2, 3], [5, 4], [6, 6, 5, 6], [1, 2, 2, 1, 3]]
    plain = [[3], [4], [6], [3]]
    for alpha in (0.0, 0.5, 2.0):
        g = context_aware_generate(model, params, ctx, plain, alpha=alpha, max_new_tokens=10)
        for i in range(len(ctx)):
            assert g.tokens[i] == np_cad(model, params, ctx[i], plain[i], alpha, 10), (alpha, i)
            if alpha == 0.0:
                assert g.tokens[i] == np_greedy(model, params, ctx[i], 10)
    # the contrast must matter somewhere, or the test above proves little
    g2 = context_aware_generate(model, params, ctx, plain, alpha=2.0, max_new_tokens=10)
    g0 = context_aware_generate(model, params, ctx, plain, alpha=0.0, max_new_tokens=10)
    assert g2.tokens != g0.tokens


def test_cad_honours_processors_and_min_new(toy):
    """A user's mask and min_new suppression reach CAD's choice: banned ids (-inf on both rows of a pair)
    are never emitted, and no row stops before min_new tokens; tokens equal the masked reference."""
    from jaxdec.core.logits import BanTokens
    from jaxdec.search.cad import context_aware_generate
    model, params = toy
    ctx = [[3, 1, 2, 3], [5, 4], [6, 6, 5, 6], [1, 2, 2, 1, 3]]
    plain = [[3], [4], [6], [3]]
    base = context_aware_generate(model, params, ctx, plain, alpha=0.5, max_new_tokens=10)
    assert any(2 in row for row in base.tokens) and any(len(row) < 6 for row in base.tokens)
    g = context_aware_generate(model, params, ctx, plain, alpha=0.5, max_new_tokens=10, min_new_tokens=6,
                               processors=[BanTokens((2,))])
    for i in range(len(ctx)):
        assert 2 not in g.tokens[i] and (len(g.tokens[i]) >= 6 or g.tokens[i][-1] != EOS), g.tokens[i]
        assert g.tokens[i] == np_cad(model, params, ctx[i], plain[i], 0.5, 10, ban=(2,), min_new=6), i


# ------------------------------------------------------------------ momentum decoding
def np_momentum(model, params, prompt, alpha, n, k, max_new):
    gen, depth = [], 0
    for _ in range(max_new):
        lp = model.next_logprobs(params, list(prompt) + gen)
        p = np.exp(lp)
        cands = np.argsort(-p, kind="stable")[:k]
        best, best_s, best_vis = None, -np.inf, False
        for v in cands:
            vis = False
            if len(gen) >= n - 1:
                pat = tuple(gen[len(gen) - (n - 1):] + [int(v)]) if n > 1 else (int(v),)
                vis = any(tuple(gen[s:s + n]) == pat for s in range(len(gen) - n + 1))
            s = p[v] - (alpha * (depth + 1) if vis else 0.0)
            if s > best_s:
                best, best_s, best_vis = int(v), s, vis
        gen.append(best)
        depth = depth + 1 if best_vis else 0
        if best == EOS:
            break
    return gen


def test_momentum_toy_matches_reference_and_zero_resistance_is_greedy(toy):
    from jaxdec.search.momentum import momentum_generate
    model, params = toy
    # a table that loops: make EOS unlikely so greedy cycles
    loopy = {**params, "A": params["A"].at[:, EOS].add(-8.0)}
    differs = False
    for alpha, n in [(0.0, 2), (0.05, 2), (0.3, 2), (0.3, 3), (0.2, 1)]:
        g = momentum_generate(model, loopy, TOY_PROMPTS, alpha=alpha, ngram=n, top_k=4, max_new_tokens=14)
        for i, p in enumerate(TOY_PROMPTS):
            assert g.tokens[i] == np_momentum(model, loopy, p, alpha, n, 4, 14), (alpha, n, i)
            if alpha == 0.0:
                assert g.tokens[i] == np_greedy(model, loopy, p, 14)
            else:
                differs |= g.tokens[i] != np_greedy(model, loopy, p, 14)
    assert differs


# ------------------------------------------------------------------ AdaDec
def np_adadec(model, params, prompt, threshold, k, look, max_new):
    gen = []
    for _ in range(max_new):
        lp = model.next_logprobs(params, list(prompt) + gen)
        ent = -np.sum(np.exp(lp) * lp)
        tok = int(np.argmax(lp))
        if ent > threshold:
            best_s = -np.inf
            for c in np.argsort(-lp, kind="stable")[:k]:
                seq, tot, cnt, alive = list(prompt) + gen + [int(c)], lp[c], 1, int(c) != EOS
                for _ in range(look):
                    if not alive:
                        break
                    l2 = model.next_logprobs(params, seq)
                    nx = int(np.argmax(l2))
                    tot += l2[nx]
                    cnt += 1
                    seq.append(nx)
                    alive = nx != EOS
                if tot / cnt > best_s:
                    best_s, tok = tot / cnt, int(c)
        gen.append(tok)
        if tok == EOS:
            break
    return gen


def test_adadec_toy_matches_reference_and_infinite_threshold_is_greedy(toy):
    from jaxdec.search.adadec import adadec_generate
    model, params = toy
    differs = False
    for thr in (float("inf"), 1.2, -1.0):
        g = adadec_generate(model, params, TOY_PROMPTS, threshold=thr, k=3, lookahead=3, max_new_tokens=10)
        for i, p in enumerate(TOY_PROMPTS):
            assert g.tokens[i] == np_adadec(model, params, p, thr, 3, 3, 10), (thr, i)
            if thr == float("inf"):
                assert g.tokens[i] == np_greedy(model, params, p, 10)
            else:
                differs |= g.tokens[i] != np_greedy(model, params, p, 10)
        if thr == float("inf"):
            assert g.stats["adadec_triggers"] == 0
        if thr == -1.0:
            assert g.stats["adadec_triggers"] == sum(len(t) for t in g.tokens)
    assert differs


# ------------------------------------------------------------------ default model: degenerate settings are greedy
def test_guided_decoders_reduce_to_greedy_on_default_model(model_f32, chat_prompt_ids):
    from jaxdec import generate
    from jaxdec.search.adadec import adadec_generate
    from jaxdec.search.cad import context_aware_generate
    from jaxdec.search.momentum import momentum_generate
    model, params = model_f32
    prompts = chat_prompt_ids[:2]
    greedy = generate(model, params, prompts, max_new_tokens=16).tokens
    assert momentum_generate(model, params, prompts, alpha=0.0, max_new_tokens=16).tokens == greedy
    ada = adadec_generate(model, params, prompts, threshold=float("inf"), max_new_tokens=16)
    assert ada.tokens == greedy and ada.stats["adadec_triggers"] == 0
    # CAD: the "context" is a system note; alpha = 0 decodes the with-context prompt greedily
    plain = [p for p in prompts]
    ctx = [p[:3] + [28, 198] + p[3:] for p in prompts]  # insert a short extra line into the system turn
    cad = context_aware_generate(model, params, ctx, plain, alpha=0.0, max_new_tokens=16)
    assert cad.tokens == generate(model, params, ctx, max_new_tokens=16).tokens
