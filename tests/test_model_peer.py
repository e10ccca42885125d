"""Acceptance: the default model's logits and greedy tokens equal the peer's (transformers on the same GGUF)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peer
from neartie import assert_sequences_match

PROMPT_TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Explain, in a few sentences, why the sky looks blue during the day but red at sunset.",
    "Once upon a time, in a small village at the edge of a very large forest, there lived an old "
    "clockmaker who had spent his whole life building clocks that never told the right time. "
    "One winter morning a stranger knocked on his door and asked",
]


def _ids(text):
    return peer.peer_tokenizer()(text, add_special_tokens=False)["input_ids"]


def _decode_logits_through_cache(model, params, ids, cont):
    """Prefill `ids`, then feed `cont` one token at a time through the cache; logits of each step."""
    step = jax.jit(model.__call__)
    cache = model.init_cache(1, 128)
    t = len(ids)
    out = step(params, jnp.asarray([ids]), jnp.arange(t)[None], cache)
    prompt_logits = np.asarray(out.logits[0])
    cache = out.cache
    steps = []
    for i, tok in enumerate(cont):
        out = step(params, jnp.asarray([[tok]]), jnp.asarray([[t + i]]), cache)
        cache = out.cache
        steps.append(np.asarray(out.logits[0, 0]))
    return prompt_logits, np.stack(steps)


@pytest.fixture(scope="module")
def peer_logit_refs():
    """The peer's 16-token greedy continuation and full-sequence logits of each prompt text: run once and
    shared by the f32 and q parametrizations."""
    refs = []
    for text in PROMPT_TEXTS:
        ids = _ids(text)
        cont, _ = peer.peer_greedy(ids, 16, eos_id=None)
        refs.append((text, ids, cont, peer.peer_logits(ids + cont[:-1])))  # logits [len(ids)+15, V]
    return refs


@pytest.fixture(scope="module")
def logit_deltas(model_f32, model_q, peer_logit_refs):
    """weights -> per prompt text: (our logits, the peer's), at every prompt position and 15 cached decode
    steps; computed once per weights, whichever test asks first (so no tolerance depends on test order)."""
    memo = {}

    def get(weights):
        if weights not in memo:
            model, params = model_f32 if weights == "f32" else model_q
            rows = []
            for text, ids, cont, ref in peer_logit_refs:
                ours_prompt, ours_steps = _decode_logits_through_cache(model, params, ids, cont[:-1])
                assert len(ours_steps) >= 15
                rows.append((text, np.concatenate([ours_prompt, ours_steps], axis=0), ref))
            memo[weights] = rows
        return memo[weights]
    return get


def _worst_dlogit(rows) -> float:
    return max(float(np.abs(ours - ref).max()) for _, ours, ref in rows)


@pytest.mark.parametrize("weights", ["f32", "q"])
def test_logits_match_peer_prompt_and_cached_decode(weights, logit_deltas):
    rows = logit_deltas(weights)
    for text, ours, ref in rows:
        assert ours.shape == ref.shape
        # the prompt's last position + 15 decode steps = 16 cached next-token predictions
        for pos in range(ref.shape[0]):
            bound = 1e-4 * np.abs(ref[pos]).max()
            d = np.abs(ours[pos] - ref[pos]).max()
            assert d <= bound, f"{weights} {text[:20]!r} position {pos}: max|dlogit| {d:.3g} > {bound:.3g}"
    print(f"{weights}: max |dlogit| vs peer = {_worst_dlogit(rows):.3g}")


@pytest.mark.parametrize("n", [8, pytest.param(20, marks=pytest.mark.slow)])  # CI / acceptance tier
@pytest.mark.parametrize("weights", ["f32", "q"])
def test_greedy_equals_peer_on_chat_prompts(weights, n, model_f32, model_q, chat_prompt_ids, peer_greedy_refs,
                                            logit_deltas):
    from jaxdec.core.generate import generate
    model, params = model_f32 if weights == "f32" else model_q
    refs = peer_greedy_refs(n)
    prompts = chat_prompt_ids[:n]
    assert len(prompts) == len(refs) == n
    g = generate(model, params, prompts, max_new_tokens=48, batch_size=len(prompts))
    max_d = _worst_dlogit(logit_deltas(weights))  # this weights' measured |dlogit|, whatever ran before
    pairs = [(f"{weights} prompt {i}", ours, ref, ref_logits)
             for i, (ours, (ref, ref_logits)) in enumerate(zip(g.tokens, refs))]
    assert_sequences_match(pairs, max_d)
    for ours, fr in zip(g.tokens, g.finish_reason):
        assert fr in ("eos", "length")
        assert (fr == "eos") == (ours[-1] == 2)


def test_score_equals_peer_log_probs(model_f32):
    from jaxdec.core.generate import score
    model, params = model_f32
    rows = [(_ids(PROMPT_TEXTS[1]), _ids(" It was a sunny day.")), (_ids(PROMPT_TEXTS[2]), _ids("    if n < 2:\n        return n"))]
    got = score(model, params, [p for p, _ in rows], [c for _, c in rows])
    for (p, c), lp in zip(rows, got):
        ref = peer.peer_logits(p + c)
        ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
        want = np.array([ref[len(p) - 1 + i, t] for i, t in enumerate(c)])
        assert lp.shape == (len(c),)
        np.testing.assert_allclose(lp, want, atol=2e-3, rtol=0)
