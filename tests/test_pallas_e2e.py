"""End to end on the default model: greedy with the Pallas tree-attention kernel (interpret mode on CPU)
gives the XLA path's tokens, on a ragged batch of chat prompts (>= 20 prompts in the `slow` acceptance tier)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neartie import assert_sequences_match


def _teacher_forced_logits(model, params, prompt, cont):
    """Logits that chose each token of ``cont`` after ``prompt`` (one XLA forward, no cache reuse)."""
    ids = list(prompt) + list(cont)
    cache = model.init_cache(1, len(ids))
    toks = jnp.asarray([ids], jnp.int32)
    pos = jnp.arange(len(ids), dtype=jnp.int32)[None]
    logits = model(params, toks, pos, cache).logits[0]
    return np.asarray(logits[len(prompt) - 1: len(ids) - 1])


@pytest.mark.parametrize("n_prompts,new", [(8, 12), pytest.param(20, 32, marks=pytest.mark.slow)])  # CI / acceptance
def test_default_model_pallas_greedy_equals_xla(model_f32, chat_prompt_ids, n_prompts, new):
    from jaxdec import generate
    model, params = model_f32
    pallas = model.with_attention("pallas")
    prompts = chat_prompt_ids[:n_prompts]
    assert len({len(p) for p in prompts}) > 1  # ragged
    jaxpr = str(jax.make_jaxpr(lambda p, t, q, c: pallas(p, t, q, c).logits)(
        params, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), model.init_cache(1, 8)))
    assert "pallas_call" in jaxpr  # the kernel is what runs, not the XLA attention
    ref = generate(model, params, prompts, max_new_tokens=new)
    ours = generate(pallas, params, prompts, max_new_tokens=new)
    # reference logits are only needed where a row differs (the helper reads them at the divergence)
    pairs = [(f"prompt {i}", o, r, [] if o == r else _teacher_forced_logits(model, params, prompts[i], r))
             for i, (o, r) in enumerate(zip(ours.tokens, ref.tokens))]
    # the kernel differs from the XLA attention only in float32 summation order (~1e-5 on logits)
    assert_sequences_match(pairs, max_dlogit=1e-4)
    assert ours.finish_reason == ref.finish_reason
