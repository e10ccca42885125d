"""Context-aware decoding (Shi et al., 2023; "CAD"): contrast the model with and without a context.

Each prompt is two rows of the batch: the prompt *with* its context (row 2i) and *without* it (row 2i+1).
At every step both rows are run and the next token is chosen from

    softmax( (1 + alpha) * logits(y | context, x) - alpha * logits(y | x) )

(greedy argmax, or sampling at ``temperature``); the same token is appended to both rows, so they stay
in lock step. ``alpha = 0`` is plain decoding of the with-context prompt. alpha and temperature are
traced per-row inputs (new values do not recompile).

The contrast is a logits processor of the "penalty" stage (`ContextContrast`), so the chain runs min_new
suppression and the user's masks on each row first, then the user's penalties, then the contrast, then
the user's warpers (which see the contrasted logits on both rows of a pair).

Host entry: `context_aware_generate(model, params, with_context, without_context, alpha=0.5, ...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.core.generate import Generation, generate
from jaxdec.core.keys import token_keys
from jaxdec.core.logits import BANNED, check_processors, run_processors, step_context, with_sampling
from jaxdec.core.steps import decode_call, emit_tokens, initial_state, prefill


def contrast_logits(with_ctx, without_ctx, alpha):
    """(1 + alpha) * with_ctx - alpha * without_ctx; alpha [B] (one per row of ``with_ctx [B, ...]``) or
    scalar."""
    a = jnp.reshape(jnp.asarray(alpha, jnp.float32), (-1,) + (1,) * (jnp.ndim(with_ctx) - 1))
    return (1.0 + a) * with_ctx - a * without_ctx


@struct.dataclass
class CADInputs:
    """Per-row inputs (traced): ``alpha [B]`` float32 contrast weight, ``temperature [B]`` float32."""

    alpha: jax.Array
    temperature: jax.Array


@struct.dataclass
class CADState:
    """`ContextAware`'s method state; B = 2 * pairs rows (row 2i with context, 2i+1 without).

    alpha:       [B] float32 contrast strength (both rows of a pair hold the pair's value).
    temperature: [B] float32 sampling temperature (<= 0: greedy).
    """

    alpha: jax.Array
    temperature: jax.Array


@dataclasses.dataclass(frozen=True)
class ContextContrast:
    """CAD's contrast as a "penalty" processor: each (with-context, without-context) row pair of
    ``logits [B,T,V]`` becomes ``(1 + a) * with - a * without`` (``a = ctx.method.alpha[::2]``), written
    to both rows of the pair; a token at -inf on either row (min_new suppression, a user's mask) stays
    at -inf (the arithmetic would give NaN, which argmax picks). Needs `CADState` in ``ctx.method``."""

    stage = "penalty"
    host = False

    def __call__(self, logits, ctx):
        b2, t, v = logits.shape
        pairs = logits.reshape(b2 // 2, 2, t, v)
        comb = contrast_logits(pairs[:, 0], pairs[:, 1], ctx.method.alpha[::2])
        # a token banned on either row (min_new, a user's mask) stays banned: -inf arithmetic gives NaN
        banned = (pairs[:, 0] == BANNED) | (pairs[:, 1] == BANNED)
        return jnp.repeat(jnp.where(banned, BANNED, comb), 2, axis=0)


CONTRAST = ContextContrast()


@dataclasses.dataclass(frozen=True)
class ContextAware:
    """Rows come in (with-context, without-context) pairs; ``inputs.method`` (a `CADInputs`) holds per-row ``alpha``
    and ``temperature`` (temperature <= 0 means greedy). processors: the user's logits processors,
    run in stage order with min_new suppression and the contrast (`ContextContrast`, "penalty")."""

    processors: tuple = ()

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        method = CADState(alpha=inputs.method.alpha.astype(jnp.float32),
                          temperature=inputs.method.temperature.astype(jnp.float32))
        state = initial_state(prompts, cache, inputs, method, {"model_calls": jnp.ones((), jnp.int32)})
        return self._emit(state, logits)

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._emit(state, logits)

    def _emit(self, state, logits):
        chain = with_sampling(self.processors, False) + (CONTRAST,)
        x = run_processors(chain, logits.astype(jnp.float32), step_context(state, method=state.method))
        comb = x[::2]
        temp = state.method.temperature[::2]
        greedy = jnp.argmax(comb, axis=-1)
        keys = token_keys(state.keys[::2], state.num_new[::2])
        safe_t = jnp.where(temp > 0, temp, 1.0)[:, None]
        sampled = jax.vmap(jax.random.categorical)(keys, comb / safe_t)
        tok = jnp.where(temp > 0, sampled, greedy).astype(jnp.int32)
        return emit_tokens(state, jnp.repeat(tok, 2))


def context_aware_generate(model, params, with_context: Sequence, without_context: Sequence, *,
                           alpha: float = 0.5, temperature: float = 0.0, max_new_tokens: int = 64,
                           min_new_tokens: int = 0, seed: int = 0, stop_ids=None, batch_size: Optional[int] = None,
                           tokenizer=None, debug: bool = False, callback=None, processors=None,
                           constraint=None) -> Generation:
    """CAD over prompt pairs. batch_size counts pairs. Returns one output per pair (the tokens shared by
    both rows); ``stats`` as `generate`'s. processors: logits processors (`jaxdec.core.logits`); they see
    both rows of every pair, the warpers after the contrast. constraint: a `jaxdec.constrained`
    constraint (or one per pair; needs ``tokenizer=``) masks the with-context row, and the contrast keeps
    what either row bans; ``constraint_ok`` per pair."""
    processors = check_processors(processors, "context_aware_generate")
    if len(with_context) != len(without_context):
        raise ValueError(f"{len(with_context)} prompts with context but {len(without_context)} without")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    rows = [r for pair in zip(with_context, without_context) for r in pair]
    bs = None if batch_size is None else 2 * int(batch_size)

    def extra(inputs, chunk):
        n = inputs.batch
        return inputs.replace(method=CADInputs(alpha=jnp.full((n,), alpha, jnp.float32),
                                               temperature=jnp.full((n,), temperature, jnp.float32)))

    g = generate(model, params, rows, decoder=ContextAware(processors=processors), max_new_tokens=max_new_tokens,
                 min_new_tokens=min_new_tokens, seed=seed, stop_ids=stop_ids, batch_size=bs, tokenizer=tokenizer,
                 debug=debug, callback=callback, inputs_fn=extra, constraint=_pair_rows(constraint, len(with_context)))
    return Generation(prompt_ids=g.prompt_ids[::2], tokens=g.tokens[::2], finish_reason=g.finish_reason[::2],
                      stats=g.stats, text=None if g.text is None else g.text[::2],
                      extras={"prompt_ids_without_context": g.prompt_ids[1::2]},
                      constraint_ok=None if g.constraint_ok is None else g.constraint_ok[::2])


def _pair_rows(constraint, pairs: int):
    """A constraint for every pair (or a list, one per pair) as generate's per-row list: the with-context
    row holds it, the without-context row none (one matcher per pair)."""
    if constraint is None:
        return None
    per = list(constraint) if isinstance(constraint, (list, tuple)) else [constraint] * pairs
    if len(per) != pairs:
        raise ValueError(f"constraint: a list of constraints needs one entry per prompt pair ({pairs}), got {len(per)}")
    return [c for x in per for c in (x, None)]
