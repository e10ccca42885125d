"""Entropy-adaptive decoding: every token equals what the model it was assigned to (the large model, or
its first `small_layers` layers) predicts from the whole sequence, recomputed without a cache; the
thresholds' limits are greedy decoding with the large model."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

V, E, F, L, H, KVH, D = 64, 32, 64, 4, 4, 2, 8


@pytest.fixture(scope="module")
def tiny():
    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=KVH,
                      head_dim=D, rope_theta=10000.0, eos_ids=(0,), max_position=256)
    rng = np.random.default_rng(0)
    n = lambda *s, sc=0.3: jnp.asarray(rng.normal(0, sc, s), jnp.float32)
    params = {"embed": n(V, E, sc=1.0), "final_norm": jnp.ones((E,)),
              "layers": {"attn_norm": jnp.ones((L, E)), "wq": n(L, H * D, E), "wk": n(L, KVH * D, E),
                         "wv": n(L, KVH * D, E), "wo": n(L, E, H * D), "mlp_norm": jnp.ones((L, E)),
                         "w_gate": n(L, F, E), "w_up": n(L, F, E), "w_down": n(L, E, F)}}
    return LlamaModel(cfg), params


@jax.jit
def _forward(params, ids, last, layers):
    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    model = LlamaModel(LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=F, num_layers=L, num_heads=H,
                                   num_kv_heads=KVH, head_dim=D, rope_theta=10000.0, eos_ids=(0,), max_position=256))
    cache = model.init_cache(1, 64)
    out = model(params, ids, jnp.arange(64)[None], cache, layers=layers, logits_at=last[None, None])
    return out.logits[0, 0]


def full_forward_logits(model, params, seq, layers):
    """Uncached forward of the whole sequence (padded to 64; causal, so padding is invisible)."""
    ids = np.zeros((1, 64), np.int32)
    ids[0, :len(seq)] = seq
    mask = jnp.ones((L,), bool) if layers is None else jnp.asarray(layers)
    return np.asarray(_forward(params, jnp.asarray(ids), jnp.int32(len(seq) - 1), mask), np.float64)


def reference(model, params, prompt, small_layers, threshold, window, sync, max_new):
    small = np.arange(L) < small_layers
    seq, out, ents, pending, large_next, modes = list(prompt), [], [], 0, None, []
    for i in range(max_new):
        if i == 0:
            large = True
        else:
            large = large_next or pending >= sync
            modes.append(large)
        logits = full_forward_logits(model, params, seq, None if large else jnp.asarray(small))
        pending = 0 if large else pending + 1
        lp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        ents = (ents + [float(-np.sum(np.exp(lp) * lp))])[-window:]
        large_next = np.mean(ents) > threshold
        tok = int(np.argmax(logits))
        out.append(tok)
        seq.append(tok)
        if tok == 0:
            break
    return out, modes


def test_ead_tokens_equal_their_models_recomputed(tiny):
    from jaxdec.search.entropy_adaptive import entropy_adaptive_generate
    model, params = tiny
    prompts = [[5, 9, 13], [7], [22, 3, 3, 41, 8]]
    # a threshold in the middle of the observed entropies makes both modes occur
    ents = []
    for p in prompts:
        seq = list(p)
        for _ in range(6):
            lg = full_forward_logits(model, params, seq, None)
            lp = lg - np.log(np.sum(np.exp(lg - lg.max()))) - lg.max()
            ents.append(-np.sum(np.exp(lp) * lp))
            seq.append(int(np.argmax(lg)))
    thr = float(np.median(ents))
    saw = set()
    for p in prompts:
        want, modes = reference(model, params, p, 2, thr, 2, 3, 14)
        g = entropy_adaptive_generate(model, params, [p], small_layers=2, threshold=thr, window=2, sync=3,
                                      max_new_tokens=14)
        assert g.tokens[0] == want, (p, g.tokens[0], want, modes)
        assert g.stats["large_steps"] == sum(modes)
        saw |= set(modes)
    assert saw == {True, False}
    # limits: -inf is greedy with the large model
    from jaxdec import generate
    lo = entropy_adaptive_generate(model, params, prompts, small_layers=2, threshold=-np.inf, max_new_tokens=14)
    assert lo.tokens == generate(model, params, prompts, max_new_tokens=14).tokens
    assert lo.stats["small_steps"] == 0
    # +inf: small steps, with a forced large (catch-up) step after every `sync` small ones
    hi = entropy_adaptive_generate(model, params, prompts[:1], small_layers=2, threshold=np.inf, sync=3,
                                   max_new_tokens=14)
    want, modes = reference(model, params, prompts[0], 2, np.inf, 4, 3, 14)
    assert hi.tokens[0] == want and not all(modes) and any(modes)


def test_ead_default_model_large_limit_is_greedy(model_f32, chat_prompt_ids):
    from jaxdec import generate
    from jaxdec.search.entropy_adaptive import entropy_adaptive_generate
    model, params = model_f32
    prompts = chat_prompt_ids[:2]
    g = entropy_adaptive_generate(model, params, prompts, small_layers=20, threshold=-np.inf, max_new_tokens=12)
    assert g.tokens == generate(model, params, prompts, max_new_tokens=12).tokens
    mixed = entropy_adaptive_generate(model, params, prompts, small_layers=20, threshold=2.0, max_new_tokens=12)
    assert 0 < mixed.stats["large_fraction"] < 1
