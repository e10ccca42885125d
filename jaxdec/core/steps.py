"""Building blocks shared by decoders: prefill, one cached decode call, state creation, stop handling."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.cache.kv import KVCache, rollback, set_prefix
from jaxdec.core.logits import MIN_NEW, step_context
from jaxdec.core.state import DecodeState, STOP_STRING, emit


def prefill(model, params, prompts, prompt_lens, cache):
    """Run the right-padded prompts; returns (logits at each row's last prompt token [B,V], cache, hidden [B,E]).

    The cache holds keys/values for the whole padded block, but each row's length is set to its real
    prompt length, so the padding is invisible and later writes overwrite it.

    Shared-prefix cache (``cache.prefix_k`` set, built by the drivers when rows continue the same
    prompt): the cache has G prefix groups of ``R = B // G`` contiguous rows; the first row's prompt of
    each group is run ONCE (batch G) into the prefix buffers, which become the groups' prefixes
    (suffixes empty, lengths = the group's prompt length); logits and hidden are repeated to the R rows
    of each group. Callers guarantee that the rows of a group hold the same prompt.
    """
    b, p = prompts.shape
    if isinstance(cache, KVCache) and cache.prefix_k is not None:
        if p > cache.prefix_size:
            raise ValueError(f"prompt block ({p}) longer than the shared-prefix buffer ({cache.prefix_size})")
        g = cache.prefix_groups
        r = b // g
        # the prefix buffers [L,G,P,KVH,D] are exactly a batch-G ordinary cache
        one = KVCache(cache.prefix_k, cache.prefix_v, jnp.zeros((g,), jnp.int32))
        logits, one, hidden = prefill(model, params, prompts[::r], prompt_lens[::r], one)
        cache = set_prefix(cache, one.k, one.v, one.lengths)
        return jnp.repeat(logits, r, axis=0), cache, jnp.repeat(hidden, r, axis=0)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    last = (prompt_lens - 1)[:, None].astype(jnp.int32)
    out = model(params, prompts, positions, cache, logits_at=last)
    cache = rollback(out.cache, prompt_lens)
    hidden = jnp.take_along_axis(out.hidden, last[:, :, None], axis=1)[:, 0]
    return out.logits[:, 0], cache, hidden


def decode_call(model, params, state: DecodeState, layers=None):
    """Feed each row's `last` token at its own position; rows already done do not advance their cache."""
    cache = state.cache
    old = cache.lengths
    out = model(params, state.last[:, None], old[:, None], cache, layers=layers)
    cache = rollback(out.cache, jnp.where(state.done, old, out.cache.lengths))
    return out.logits[:, 0], cache, out.hidden[:, 0]


def suppress_stops(logits, state: DecodeState):
    """min_new_tokens on one position per row (``logits [B,V]``): `jaxdec.core.logits.MinNewTokens`."""
    return MIN_NEW(logits[:, None], step_context(state))[:, 0]


def initial_state(prompts, cache, inputs, method=None, stats=None) -> DecodeState:
    b = prompts.shape[0]
    return DecodeState(
        tokens=jnp.zeros_like(inputs["out_buffer"]), num_new=jnp.zeros((b,), jnp.int32),
        done=inputs["max_new"] <= 0, finish=jnp.where(inputs["max_new"] <= 0, 2, 0).astype(jnp.int32),
        last=jnp.zeros((b,), jnp.int32), keys=inputs["keys"], cache=cache,
        max_new=inputs["max_new"], min_new=inputs["min_new"], stop_ids=inputs["stop_ids"], step=jnp.zeros((), jnp.int32),
        method=method, stats=stats)


def apply_stop_strings(state: DecodeState, checker, window: int) -> DecodeState:
    """Host callback: rows whose recent text contains a stop string finish with reason 'stop_string'."""
    if checker is None:
        return state
    b = state.batch
    idx = state.num_new[:, None] - window + jnp.arange(window)[None, :]
    tail = jnp.where(idx >= 0, jnp.take_along_axis(state.tokens, jnp.maximum(idx, 0), axis=1), -1)
    hit = jax.pure_callback(checker, jax.ShapeDtypeStruct((b,), jnp.bool_), tail, state.num_new)
    hit = hit & (state.finish == 0) & (state.num_new > 0)
    return state.replace(done=state.done | hit, finish=jnp.where(hit, STOP_STRING, state.finish))


def emit_tokens(state, tokens, checker=None, window: int = 0):
    state = emit(state, tokens)
    return apply_stop_strings(state, checker, window)
