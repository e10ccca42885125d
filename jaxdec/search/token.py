"""Token-by-token decoders: greedy and sampling (temperature, top-k, top-p, min-p, typical-p,
repetition penalty) in one `TokenDecoder` run by the shared driver."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdec.core.steps import decode_call, emit_tokens, initial_state, prefill, suppress_stops


def row_keys_for_step(keys, num_new):
    """Per-row key for the token at index `num_new`: depends on the row's own key and position only."""
    return jax.vmap(jax.random.fold_in)(keys, num_new)


@dataclasses.dataclass(frozen=True)
class TokenDecoder:
    """greedy=True: argmax. Otherwise sample with per-row `SamplingParams` from `inputs["sampling"]`.

    repetition_penalty: track the tokens each row has seen (prompt and output) for HF's repetition
    penalty (static switch because the `[B, V]` mask costs memory). stop_checker/stop_window: host
    callback for stop strings (see `jaxdec.core.stopping`).
    """

    greedy: bool = True
    repetition_penalty: bool = False
    stop_checker: Any = None
    stop_window: int = 0
    shared_prefix_ok = True  # rows sharing a prompt may decode against one Hydragen prefix

    def pick(self, logits, state):
        logits = suppress_stops(logits, state)
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        from jaxdec.core import sampling as sampling_lib
        m = state.method
        keys = row_keys_for_step(state.keys, state.num_new)
        return sampling_lib.sample(keys, logits, m["sampling"], m.get("seen"))

    def _mark_seen(self, state, tokens):
        if not self.repetition_penalty:
            return state
        m = dict(state.method)
        b = jnp.arange(tokens.shape[0])
        m["seen"] = m["seen"].at[b, tokens].set(m["seen"][b, tokens] | ~state.done)
        return state.replace(method=m)

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        method = {}
        if not self.greedy:
            method["sampling"] = inputs["sampling"]
        if self.repetition_penalty:
            b, p = prompts.shape
            valid = jnp.arange(p)[None, :] < prompt_lens[:, None]
            seen = jnp.zeros((b, model.vocab_size), bool)
            method["seen"] = seen.at[jnp.arange(b)[:, None], prompts].max(valid)
        state = initial_state(prompts, cache, inputs, method, {"model_calls": jnp.ones((), jnp.int32)})
        tok = self.pick(logits, state)
        state = self._mark_seen(state, tok)
        return emit_tokens(state, tok, self.stop_checker, self.stop_window)

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        tok = self.pick(logits, state)
        state = self._mark_seen(state, tok)
        return emit_tokens(state, tok, self.stop_checker, self.stop_window)
