"""Token-by-token decoders: greedy and sampling (temperature, top-k, top-p, min-p, typical-p,
repetition penalty) in one `TokenDecoder` run by the shared driver."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.core import reduce as reduce_lib
from jaxdec.core.keys import token_keys
from jaxdec.core.logits import post_commit, run_processors, step_context, with_sampling
from jaxdec.core.processors import SamplingParams
from jaxdec.core.steps import decode_call, emit_tokens, initial_state, prefill


row_keys_for_step = token_keys  # the name this module exported before `jaxdec.core.keys`


@struct.dataclass
class TokenState:
    """`TokenDecoder`'s method state.

    sampling: `SamplingParams` (fields [B]) of sampling rows, None when greedy.
    seen:     [B, V] bool tokens each row has seen (prompt and output), with the repetition penalty only.
    """

    sampling: Optional[SamplingParams] = None
    seen: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class TokenDecoder:
    """greedy=True: argmax. Otherwise sample with per-row `SamplingParams` from `inputs.sampling`.

    repetition_penalty: track the tokens each row has seen (prompt and output) for HF's repetition
    penalty (static switch because the `[B, V]` mask costs memory). stop_checker/stop_window: host
    callback for stop strings (see `jaxdec.core.stopping`). processors: the user's logits processors
    (`jaxdec.core.logits`), run after min_new suppression in stage order with the sampling warpers.
    """

    greedy: bool = True
    repetition_penalty: bool = False
    stop_checker: Any = None
    stop_window: int = 0
    processors: tuple = ()
    shared_prefix_ok = True  # rows sharing a prompt may decode against one Hydragen prefix

    def pick(self, logits, state):
        """(token [B], the context the processors saw)."""
        m = state.method
        sampling = None if self.greedy else m.sampling
        seen = None if self.greedy else m.seen
        ctx = step_context(state, sampling=sampling, seen=seen)
        x = run_processors(with_sampling(self.processors, not self.greedy, seen is not None), logits, ctx)
        if self.greedy:
            return reduce_lib.argmax(x), ctx
        from jaxdec.core import sampling as sampling_lib
        keys = token_keys(state.keys, state.num_new)
        return sampling_lib.sample_processed(keys, x, jnp.asarray(sampling.temperature) <= 0), ctx

    def _commit(self, state, tok, ctx):
        post_commit(self.processors, ctx, tok[:, None], (~state.done).astype(jnp.int32))
        state = self._mark_seen(state, tok)
        return emit_tokens(state, tok, self.stop_checker, self.stop_window)

    def _mark_seen(self, state, tokens):
        if not self.repetition_penalty:
            return state
        seen = state.method.seen
        b = jnp.arange(tokens.shape[0])
        seen = seen.at[b, tokens].set(seen[b, tokens] | ~state.done)
        return state.replace(method=state.method.replace(seen=seen))

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        method = TokenState(sampling=None if self.greedy else inputs.sampling)
        if self.repetition_penalty:
            b, p = prompts.shape
            valid = jnp.arange(p)[None, :] < prompt_lens[:, None]
            seen = jnp.zeros((b, model.vocab_size), bool)
            method = method.replace(seen=seen.at[jnp.arange(b)[:, None], prompts].max(valid))
        state = initial_state(prompts, cache, inputs, method, {"model_calls": jnp.ones((), jnp.int32)})
        return self._commit(state, *self.pick(logits, state))

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._commit(state, *self.pick(logits, state))
