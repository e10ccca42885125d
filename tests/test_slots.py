"""Prefill and insert (`jaxdec.core.slots`): new requests join a running batch of 8 rows in chosen slots;
each inserted row decodes exactly as `generate()` of that request alone, the other rows are unaffected,
and a second insert of the same shape does not retrace."""
from __future__ import annotations

import numpy as np
import pytest

import jaxdec
from jaxdec.core import loop, slots
from jaxdec.core.token import TokenDecoder

NEW = 12


def _alone(model, params, ids, **kw):
    return jaxdec.generate(model, params, [ids], max_new_tokens=NEW, **kw).tokens[0]


def _tokens(state):
    nn, tk = np.asarray(state.num_new), np.asarray(state.tokens)
    return [tk[r, :nn[r]].tolist() for r in range(tk.shape[0])]


def test_insert_into_running_batch(model_q, chat_prompt_ids):
    model, params = model_q
    dec = TokenDecoder()
    first, later, last = chat_prompt_ids[:8], chat_prompt_ids[8:11], chat_prompt_ids[11:14]
    state = slots.start(dec, model, params, first, cache_size=256, capacity=16, max_new_tokens=NEW)
    for _ in range(3):
        state = slots.step(dec, model, params, state)
    p1 = slots.prefill(dec, model, params, later, like=state, max_new_tokens=NEW)
    state = slots.insert(dec, state, p1, [5, 2, 7])
    n_insert = loop.TRACE_COUNTS["insert:TokenDecoder"]
    for _ in range(2):
        state = slots.step(dec, model, params, state)
    p2 = slots.prefill(dec, model, params, last, like=state, max_new_tokens=NEW)
    state = slots.insert(dec, state, p2, [0, 1, 3])
    assert loop.TRACE_COUNTS["insert:TokenDecoder"] == n_insert  # the second insert reused the program
    while not bool(np.all(np.asarray(state.done))):
        state = slots.step(dec, model, params, state)
    got = _tokens(state)
    owner = {5: later[0], 2: later[1], 7: later[2], 0: last[0], 1: last[1], 3: last[2], 4: first[4], 6: first[6]}
    for row, ids in owner.items():
        assert got[row] == _alone(model, params, ids), f"row {row}"
    # negative control: the rows really were replaced (an untouched row 5 would hold the first prompt's tokens)
    assert got[5] != _alone(model, params, first[5])


def test_insert_sampling_rows_keep_their_keys(model_q, chat_prompt_ids):
    """Sampling: an inserted row draws with its own key, so it equals generate() of its prompt with that key."""
    model, params = model_q
    from jaxdec.core.generate import row_keys
    from jaxdec.core.processors import SamplingParams
    dec = TokenDecoder(greedy=False)
    sp = lambda n: SamplingParams.create(n, temperature=0.9, top_k=40)  # noqa: E731
    state = slots.start(dec, model, params, chat_prompt_ids[:4], cache_size=256, capacity=16,
                        max_new_tokens=NEW, sampling=sp(4), seed=1)
    state = slots.step(dec, model, params, state)
    ids = chat_prompt_ids[9]
    keys = row_keys(5, 1, 1)
    state = slots.insert(dec, state, slots.prefill(dec, model, params, [ids], like=state, max_new_tokens=NEW,
                                                   keys=keys, sampling=sp(1)), [2])
    while not bool(np.all(np.asarray(state.done))):
        state = slots.step(dec, model, params, state)
    ref = jaxdec.generate(model, params, [ids], method="sample", seed=5, max_new_tokens=NEW,
                          sampling=dict(temperature=0.9, top_k=40)).tokens[0]
    assert _tokens(state)[2] == ref


def test_insert_refuses_bad_slots_and_mismatched_prefix(model_q, chat_prompt_ids):
    model, params = model_q
    dec = TokenDecoder()
    state = slots.start(dec, model, params, chat_prompt_ids[:2], cache_size=256, capacity=16, max_new_tokens=4)
    p = slots.prefill(dec, model, params, chat_prompt_ids[2:3], like=state, max_new_tokens=4)
    with pytest.raises(ValueError, match="distinct rows"):
        slots.insert(dec, state, slots.prefill(dec, model, params, chat_prompt_ids[2:4], like=state,
                                               max_new_tokens=4), [1, 1])
    with pytest.raises(ValueError, match="1 prefix rows"):
        slots.insert(dec, state, p, [0, 1])
    other = slots.prefill(dec, model, params, chat_prompt_ids[2:3], cache_size=320, capacity=16, max_new_tokens=4)
    with pytest.raises(ValueError, match="does not match the running cache"):
        slots.insert(dec, state, other, [0])


def test_prefill_fillers_and_per_row_seeds():
    """`prefill(fillers=k)` appends k inert rows (the first row's prompt and key, max_new 0) and leaves the real
    rows as they are; ``seed=[...]`` gives row i `generate`'s key of seed i for one prompt (the engine's
    per-request seeds). Negative controls: without them the shapes and keys differ; bad values are refused."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
    from tiny_llama import tiny_llama, tiny_prompts

    from jaxdec.core.generate import row_keys
    model, params = tiny_llama()
    dec = TokenDecoder()
    ps = tiny_prompts(3)
    kw = dict(cache_size=96, capacity=8, max_new_tokens=[3, 5, 4], seed=[7, 2, 7])
    plain = slots.prefill(dec, model, params, ps, **kw)
    padded = slots.prefill(dec, model, params, ps, fillers=2, **kw)
    assert plain.batch == 3 and padded.batch == 5
    assert np.asarray(padded.max_new).tolist() == [3, 5, 4, 0, 0]
    want = np.concatenate([row_keys(s, 1, 1) for s in (7, 2, 7)])
    assert np.array_equal(np.asarray(plain.keys), want) and np.array_equal(np.asarray(padded.keys)[:3], want)
    assert np.array_equal(np.asarray(padded.keys)[3:], np.repeat(want[:1], 2, 0))
    assert np.array_equal(np.asarray(plain.keys)[0], np.asarray(plain.keys)[2])  # equal seeds, equal keys
    assert not np.array_equal(np.asarray(slots.prefill(dec, model, params, ps, cache_size=96, capacity=8,
                                                       max_new_tokens=3, seed=7).keys)[1:], want[1:])
    for f in ("tokens", "num_new", "last"):
        assert np.array_equal(np.asarray(getattr(padded, f))[:3], np.asarray(getattr(plain, f))), f
    assert np.array_equal(np.asarray(padded.cache.lengths), [len(p) for p in ps] + [len(ps[0])] * 2)
    with pytest.raises(ValueError, match="fillers must be an integer >= 0"):
        slots.prefill(dec, model, params, ps, fillers=-1, **kw)
    with pytest.raises(ValueError, match="one seed per prompt"):
        slots.prefill(dec, model, params, ps, cache_size=96, capacity=8, max_new_tokens=3, seed=[1, 2])
    with pytest.raises(ValueError, match=r"keys: expected uint32 \[3, 2\]"):
        slots.prefill(dec, model, params, ps, cache_size=96, capacity=8, max_new_tokens=3, keys=row_keys(0, 2, 1))


def test_cache_free_decoder_with_finalize_runs_through_the_driver(model_q):
    """A decoder that needs no KV cache (``needs_cache = False``) and writes its output canvas out of order
    (right to left, as a diffusion sampler may) returns its rows through ``finalize``."""
    import dataclasses

    import jax.numpy as jnp
    from flax import struct

    from jaxdec.core.state import LENGTH
    from jaxdec.core.steps import initial_state

    @struct.dataclass
    class Canvas:
        canvas: object  # [B, N] int32
        filled: object  # [B] int32 positions written so far
        source: object  # [B, P] int32 the prompts
        lens: object  # [B] int32

    @dataclasses.dataclass(frozen=True)
    class ReverseFill:  # toy: output j is the prompt's (len-1-j)-th token, written from the right
        needs_cache = False

        def init(self, model, params, prompts, prompt_lens, cache, inputs):
            assert cache is None
            b, n = inputs.out_buffer.shape
            m = Canvas(jnp.full((b, n), -1, jnp.int32), jnp.zeros((b,), jnp.int32), prompts, prompt_lens)
            return initial_state(prompts, cache, inputs, m, {"model_calls": jnp.zeros((), jnp.int32)})

        def step(self, model, params, state):
            m = state.method
            j = state.max_new - 1 - m.filled  # next position, right to left
            tok = jnp.take_along_axis(m.source, (m.lens - 1 - j)[:, None], axis=1)[:, 0]
            live = m.filled < state.max_new
            canvas = m.canvas.at[jnp.arange(state.batch), jnp.maximum(j, 0)].set(
                jnp.where(live, tok, m.canvas[jnp.arange(state.batch), jnp.maximum(j, 0)]))
            return state.replace(method=m.replace(canvas=canvas, filled=m.filled + live), step=state.step + 1)

        def done(self, state):
            return jnp.all(state.method.filled >= state.max_new)

        def finalize(self, state):
            return state.method.canvas, state.max_new, jnp.full_like(state.max_new, LENGTH)

    model, params = model_q
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    g = jaxdec.generate(model, params, prompts, decoder=ReverseFill(), max_new_tokens=3)
    assert g.tokens == [[9, 8, 7], [13, 12, 11]]
    assert g.finish_reason == ["length", "length"] and g.stats["model_calls"] == 0
