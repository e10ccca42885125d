"""Test-time search and exact extraction: A* vs brute force, first-finish vs best-of-N under the same keys,
the reranking hook, Exact-Extract vs brute force (toy model and the default model)."""
from __future__ import annotations

import numpy as np
import pytest

EOS = 0


@pytest.fixture(scope="module")
def toy():
    from jaxdec.testing.toy_search import TableModel
    model = TableModel(vocab_size=4, eos_ids=(EOS,))
    return model, model.init_params(21, scale=1.0)


def test_astar_zero_heuristic_finds_brute_force_most_probable_sequence(toy):
    from jaxdec.search.testtime import astar_decode
    model, params = toy
    prompts = [[1, 2], [3], [2, 3, 1], [1]]
    g = astar_decode(model, params, prompts, max_new_tokens=5)
    for i, p in enumerate(prompts):
        seqs = model.enumerate_sequences(params, p, 5)
        best, best_lp = max(seqs, key=lambda s: s[1])
        second = sorted(l for _, l in seqs)[-2]
        assert best_lp - second > 1e-6  # a unique optimum, so the comparison is meaningful
        assert tuple(g.tokens[i]) == best, (i, g.tokens[i], best)
        assert abs(g.extras["scores"][i] - best_lp) < 1e-5
        # A* expands far fewer nodes than the full tree holds
        assert g.extras["expansions"][i] < sum(4 ** d for d in range(5))
    # and the optimum is not simply greedy's answer on every prompt (else the test proves little)
    from jaxdec import generate
    assert generate(model, params, prompts, max_new_tokens=5).tokens != g.tokens


def test_astar_pluggable_cost_and_heuristic(toy):
    """A step cost that forbids a token steers the search; an admissible heuristic keeps the optimum."""
    from jaxdec.search.testtime import astar_decode
    model, params = toy
    p = [1, 2]
    banned = 3

    def cost(prefix, lp):
        c = -lp.copy()
        c[banned] = np.inf
        return c

    g = astar_decode(model, params, [p], max_new_tokens=4, step_cost=cost)
    seqs = [(s, l) for s, l in model.enumerate_sequences(params, p, 4) if banned not in s]
    assert tuple(g.tokens[0]) == max(seqs, key=lambda s: s[1])[0]
    # admissible heuristic: 0.1 x (a lower bound on the remaining cost, here 0 at complete nodes)
    h = lambda prompt, prefix: 0.0 if (prefix and (prefix[-1] == EOS or len(prefix) >= 4)) else 1e-3
    g2 = astar_decode(model, params, [p], max_new_tokens=4, heuristic=h)
    g0 = astar_decode(model, params, [p], max_new_tokens=4)
    assert g2.tokens == g0.tokens


def test_first_finish_is_shortest_of_best_of_n_samples(toy):
    from jaxdec.search.testtime import best_of_n, first_finish, shortest_finished
    model, params = toy
    prompts = [[1, 2], [3], [2, 3, 1], [1], [3, 3]]
    n = 6
    for seed in range(3):
        bon = best_of_n(model, params, prompts, n=n, seed=seed, max_new_tokens=12)
        ffs = first_finish(model, params, prompts, n=n, seed=seed, max_new_tokens=12)
        for i in range(len(prompts)):
            samples, reasons = bon.extras["samples"][i], bon.extras["finish_reasons"][i]
            assert ffs.tokens[i] == samples[shortest_finished(samples, reasons)]
            for part, full in zip(ffs.extras["partial_samples"][i], samples):  # same keys: prefixes
                assert full[:len(part)] == part
        assert ffs.stats["model_calls"] <= bon.stats["model_calls"]
    assert ffs.stats["model_calls"] < bon.stats["model_calls"]


def test_best_of_n_reranking_hook(toy):
    from jaxdec.search.testtime import best_of_n
    model, params = toy
    prompts = [[1, 2], [3]]
    longest = best_of_n(model, params, prompts, n=5, seed=1, max_new_tokens=10,
                        scorer=lambda p, cands: [len(c) for c in cands])
    for i in range(2):
        lens = [len(s) for s in longest.extras["samples"][i]]
        assert len(longest.tokens[i]) == max(lens)
    default = best_of_n(model, params, prompts, n=5, seed=1, max_new_tokens=10)
    for i, p in enumerate(prompts):
        means = [model.sequence_logprob(params, p, s) / len(s) for s in default.extras["samples"][i]]
        assert default.tokens[i] == default.extras["samples"][i][int(np.argmax(means))]


def brute_force_spans(lp_of, ctx, max_span):
    best = None
    for i in range(len(ctx)):
        for j in range(i + 1, min(len(ctx), i + max_span) + 1):
            s = lp_of(ctx[i:j])
            if best is None or s > best[2]:
                best = (i, j, s)
    return best


def test_exact_extract_toy_brute_force(toy):
    from jaxdec.search.extract import exact_extract
    model, params = toy
    prompt = [1, 3]
    ctx = [2, 1, 3, 3, 2, 1, 1, 2, 3]
    for ms in (None, 3):
        r = exact_extract(model, params, prompt, ctx, max_span=ms, rows_per_call=4)
        i, j, s = brute_force_spans(lambda span: model.sequence_logprob(params, prompt, span + [EOS]), ctx,
                                    ms or len(ctx))
        assert (r["start"], r["end"]) == (i, j)
        assert abs(r["score"] - s) < 1e-5


def test_exact_extract_default_model_brute_force(model_f32):
    """All spans of a short context scored one by one with teacher forcing (jaxdec.score)."""
    from jaxdec import score
    from jaxdec.search.extract import span_scores
    import peer
    model, params = model_f32
    tok = peer.peer_tokenizer()
    context = "The tower was finished in 1889."
    text = f"Context: {context}\nQuestion: When was the tower finished?\nAnswer:"
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    table = span_scores(model, params, prompt, ctx)
    spans = [(i, j) for i in range(len(ctx)) for j in range(i + 1, len(ctx) + 1)]
    lps = score(model, params, [prompt] * len(spans), [ctx[i:j] + [2] for i, j in spans])
    brute = np.array([float(np.sum(lp)) for lp in lps])
    ours = np.array([table[i, j - i - 1] for i, j in spans])
    assert np.max(np.abs(ours - brute)) < 1e-3 * max(1.0, np.max(np.abs(brute)) / 10)
    k_o, k_b = int(np.argmax(ours)), int(np.argmax(brute))
    assert k_o == k_b or abs(brute[k_o] - brute[k_b]) < 1e-4
    print("exact-extract answer:", repr(tok.decode(ctx[spans[k_o][0]:spans[k_o][1]])), f"score {ours[k_o]:.3f}")
