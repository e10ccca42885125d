"""The one driver: `init` then `step` until `done`, in `lax.while_loop` under `jit`.

A decoder is a frozen (hashable) dataclass of static configuration with three pure methods::

    init(model, params, prompts[B,P], prompt_lens[B], cache, inputs) -> DecodeState
    step(model, params, state) -> DecodeState
    done(state) -> bool[]            # default `all(state.done)`

`inputs` is a dict of traced per-row arrays (max_new, min_new, keys, stop_ids, sampling parameters ...).
A new method is a new `step`, not a new loop. `debug=True` runs the very same `init`/`step` functions in
a Python loop (each jitted on its own, or not at all with `trace=False`) and calls `callback(state)`
after every step: streaming and debugging use the code that production runs. Inside a `phase_times()`
block the driver runs `init` and the loop as two compiled programs and records each one's wall time
(prefill vs decode, for benchmarks).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import time

import jax

from jaxdec.core.protocols import hook, is_done

# how many times each jitted entry point was traced (tests assert "same shapes do not recompile")
TRACE_COUNTS: collections.Counter = collections.Counter()


def count_trace(name: str) -> None:
    TRACE_COUNTS[name] += 1


def _done(decoder, state):
    return is_done(decoder, state)


def make_cache(model, batch: int, cache_size: int, prefix_size=None, prefix_groups: int = 1):
    """``model.init_cache(batch, cache_size)``; with ``prefix_size`` a shared-prefix cache (Hydragen:
    ``cache_size`` suffix slots per row plus ``prefix_groups`` prefixes of ``prefix_size`` slots, one
    per group of ``batch // prefix_groups`` contiguous rows, that `prefill` fills)."""
    # the barrier hides the all-zero initial cache from XLA: otherwise it constant-folds the prefill's
    # attention over the empty cache (seconds of compile time per shape for a large batch x cache)
    cache = jax.lax.optimization_barrier(model.init_cache(batch, cache_size))
    if prefix_size is None:
        return cache
    from jaxdec.cache.kv import with_prefix_buffer
    count_trace("shared_prefix")
    return with_prefix_buffer(cache, prefix_size, prefix_groups)


def _cache_for(decoder, model, batch, cache_size, prefix_size, prefix_groups):
    """The model's cache, or None for a decoder that declares ``needs_cache = False`` (it keeps whatever
    context it needs in its own state, e.g. a diffusion canvas)."""
    if not hook(decoder, "needs_cache"):
        return None
    return make_cache(model, batch, cache_size, prefix_size, prefix_groups)


@functools.partial(jax.jit, static_argnames=("decoder", "model", "cache_size", "prefix_size", "prefix_groups"))
def run_jit(decoder, model, params, prompts, prompt_lens, inputs, cache_size: int, prefix_size=None,
            prefix_groups: int = 1):
    count_trace(f"run:{type(decoder).__name__}")
    cache = _cache_for(decoder, model, prompts.shape[0], cache_size, prefix_size, prefix_groups)
    state = decoder.init(model, params, prompts, prompt_lens, cache, inputs)
    return decode_loop(decoder, model, params, state)


def decode_loop(decoder, model, params, state):
    """`step` until `done`: the one decode loop (traced inside `run_jit`, and alone by `_loop_jit`)."""
    return jax.lax.while_loop(lambda s: ~_done(decoder, s), lambda s: decoder.step(model, params, s), state)


@functools.partial(jax.jit, static_argnames=("decoder", "model", "cache_size", "prefix_size", "prefix_groups"))
def _init_jit(decoder, model, params, prompts, prompt_lens, inputs, cache_size: int, prefix_size=None,
              prefix_groups: int = 1):
    count_trace(f"init:{type(decoder).__name__}")
    return decoder.init(model, params, prompts, prompt_lens,
                        _cache_for(decoder, model, prompts.shape[0], cache_size, prefix_size, prefix_groups), inputs)


@functools.partial(jax.jit, static_argnames=("decoder", "model"))
def _step_jit(decoder, model, params, state):
    count_trace(f"step:{type(decoder).__name__}")
    return decoder.step(model, params, state)


@functools.partial(jax.jit, static_argnames=("decoder", "model"))
def _loop_jit(decoder, model, params, state):
    count_trace(f"loop:{type(decoder).__name__}")
    return decode_loop(decoder, model, params, state)


_PHASES: list = []  # the open `phase_times()` blocks' lists (innermost last)


@contextlib.contextmanager
def phase_times():
    """Within the block the driver runs each batch's decoder ``init`` (the prompt's prefill) and its loop as
    two compiled programs, waits for each, and appends ``(prefill_s, decode_s)`` to the yielded list, one pair
    per batch. The same init and step, so the same tokens; only the one jit boundary between them differs
    from the fused program. For benchmarks that time the decode phase apart from a long prompt's prefill
    (first calls include compilation). Not thread-safe: one block at a time per process."""
    times: list = []
    _PHASES.append(times)
    try:
        yield times
    finally:
        _PHASES.remove(times)


def timing_phases() -> bool:
    return bool(_PHASES)


def run_phases(decoder, model, params, prompts, prompt_lens, inputs, cache_size: int, prefix_size=None,
               prefix_groups: int = 1):
    """`run_jit` as init then loop, timed into the innermost open `phase_times()` list."""
    t0 = time.perf_counter()
    state = jax.block_until_ready(_init_jit(decoder, model, params, prompts, prompt_lens, inputs, cache_size,
                                            prefix_size, prefix_groups))
    t1 = time.perf_counter()
    state = jax.block_until_ready(_loop_jit(decoder, model, params, state))
    _PHASES[-1].append((t1 - t0, time.perf_counter() - t1))
    return state


def run_debug(decoder, model, params, prompts, prompt_lens, inputs, cache_size: int, callback=None,
              trace: bool = True, max_steps: int | None = None, prefix_size=None, prefix_groups: int = 1):
    """Same init/step as `run_jit`, driven from Python; `callback(state)` after init and every step."""
    if trace:
        state = _init_jit(decoder, model, params, prompts, prompt_lens, inputs, cache_size, prefix_size,
                          prefix_groups)
        step = functools.partial(_step_jit, decoder, model)
    else:
        state = decoder.init(model, params, prompts, prompt_lens,
                             _cache_for(decoder, model, prompts.shape[0], cache_size, prefix_size, prefix_groups), inputs)
        step = functools.partial(decoder.step, model)
    if callback is not None:
        callback(state)
    n = 0
    while not bool(_done(decoder, state)):
        state = step(params, state)
        n += 1
        if callback is not None:
            callback(state)
        if max_steps is not None and n >= max_steps:
            break
    return state
