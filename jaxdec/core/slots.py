"""Prefill and insert: new requests join a running batch in chosen slots (decode slots, as a serving engine
keeps them), through the same compiled `init` and `step` the driver runs.

    prefix = prefill(decoder, model, params, prompts, like=state, max_new_tokens=32)  # new rows, own cache
    state = insert(decoder, state, prefix, slots=[5, 2, 7])                          # rows 5, 2, 7 replaced
    state = step(decoder, model, params, state)                                      # one decode step

`prefill` is the decoder's `init` on the new rows alone (their cache entries, first logits and first
token, per-row method state) in a cache of the running batch's size; `insert` writes those rows into the
running state at ``slots``. A prompt may also be prefilled in pieces across calls (chunked prefill spread
over decode steps, as a serving engine interleaves it): ``cache = empty_cache(model, 1, like=state)``, then
``prefix = prefill(..., [piece], cache=cache, prompt_bucket=C)`` for each piece of at most C tokens, passing
``cache=prefix.cache`` on; the last piece's ``prefix`` is the request's row, as one `prefill` of the whole prompt
would give it (the model's chunked prefill does the same per chunk). `generate` is exactly ``init`` of all rows
then ``step`` until done, so an inserted row decodes exactly as it would in a batch of its own. A decoder
with method state that is not per-row (a leaf without a leading batch axis) defines its own
``insert(state, prefix, slots)``; the generic one refuses such state by the leaf's path. Shared-prefix
(Hydragen) caches are not insertable.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import KVCache, bucket, rollback
from jaxdec.core import loop
from jaxdec.core.driver import _check_prompts, _positive_int, batch_inputs, pad_batch, row_keys
from jaxdec.core.protocols import check_decoder, hook
from jaxdec.core.state import DecodeState


def insert_rows(state: DecodeState, prefix: DecodeState, slots) -> DecodeState:
    """Generic insert: every per-row field, cache row and method-state row of ``prefix`` (n rows) replaces
    row ``slots[i]`` of ``state``; the running state's step counter and stop ids stay, counters add up."""
    b, n = state.batch, prefix.batch
    if prefix.capacity != state.capacity:
        raise ValueError(f"prefix output capacity {prefix.capacity} != the running state's {state.capacity}")
    c, pc = state.cache, prefix.cache
    if getattr(c, "prefix_k", None) is not None or getattr(pc, "prefix_k", None) is not None:
        raise ValueError("insert does not support shared-prefix (Hydragen) caches")
    if pc.k.shape[2:] != c.k.shape[2:] or pc.k.shape[0] != c.k.shape[0]:
        raise ValueError(f"prefix cache {pc.k.shape} does not match the running cache {c.k.shape} "
                         "(prefill with like=state)")
    slots = jnp.asarray(slots, jnp.int32)

    def put(path, a, p):
        a, p = jnp.asarray(a), jnp.asarray(p)
        if a.ndim == 0 or a.shape[0] != b or p.shape[0] != n or a.shape[1:] != p.shape[1:]:
            raise ValueError(f"method state leaf {jax.tree_util.keystr(path)} (shapes {a.shape} and {p.shape}) "
                             f"has no leading batch axis: give the decoder its own insert(state, prefix, slots)")
        return a.at[slots].set(p)

    rows = {f: getattr(state, f).at[slots].set(getattr(prefix, f))
            for f in ("tokens", "num_new", "done", "finish", "last", "keys", "max_new", "min_new")}
    cache = c.replace(k=c.k.at[:, slots].set(pc.k), v=c.v.at[:, slots].set(pc.v),
                      lengths=c.lengths.at[slots].set(pc.lengths))
    method = jax.tree_util.tree_map_with_path(put, state.method, prefix.method)
    stats = jax.tree.map(lambda a, p: a + p, state.stats, prefix.stats)
    return state.replace(cache=cache, method=method, stats=stats, **rows)


@functools.partial(jax.jit, static_argnames=("decoder",))
def _insert_jit(decoder, state, prefix, slots):
    loop.count_trace(f"insert:{type(decoder).__name__}")
    own = hook(decoder, "insert")
    return insert_rows(state, prefix, slots) if own is None else own(state, prefix, slots)


def prefill(decoder, model, params, prompts: Sequence[Sequence[int]], *, like: Optional[DecodeState] = None,
            cache_size: Optional[int] = None, capacity: Optional[int] = None, max_new_tokens=64,
            min_new_tokens=0, keys=None, seed=0, stop_ids=None, sampling=None,
            prompt_bucket: Optional[int] = None, fillers: int = 0, cache=None) -> DecodeState:
    """Run the decoder's ``init`` on the new rows alone. ``like``: the running state whose cache size and
    output capacity the rows must share (or give ``cache_size`` and ``capacity``). ``max_new_tokens`` /
    ``min_new_tokens``: one value for every row or a list of one per row. ``keys``: ``uint32 [n, 2]`` row
    keys (default: `generate`'s keys of ``seed`` for these prompts; ``seed`` may also be a list of one seed per
    row: row i gets `generate`'s key of ``seed[i]`` for one prompt, as a request decoded alone). ``sampling``: a
    `SamplingParams` of the n rows (sampling decoders). ``fillers``: that many inert rows after the n rows (as
    the driver pads a compiled batch: the first row's prompt, key and sampling parameters, ``max_new`` 0), so
    a caller can compile (warm up) the program of n + fillers rows with one real row. Compiles once per
    (rows, prompt bucket) shape.

    ``cache``: continue a prefill spread over calls. The cache (n + fillers rows, the running cache's size: from
    `empty_cache` or an earlier piece's ``prefix.cache``; donated) already holds the first ``cache.lengths``
    positions of each row's prompt, and ``prompts`` are the next piece of each prompt, entered at those
    positions. The returned state is what `prefill` of the whole prompts would give (its first token is the
    whole prompt's) once the last piece is in; after an earlier piece, only its ``cache`` is meaningful. For
    decoders whose ``init`` reaches the model only through `jaxdec.core.steps.prefill` (`TokenDecoder`). The
    caller checks that each whole prompt plus ``max_new_tokens`` fits the cache (pieces are checked alone);
    compiles once per (rows, prompt bucket) shape, whatever the offsets."""
    check_decoder(decoder)
    rows = _check_prompts(prompts, model.vocab_size)
    max_new = _per_row("max_new_tokens", max_new_tokens, len(rows), allow_zero=False)
    min_new = _per_row("min_new_tokens", min_new_tokens, len(rows), allow_zero=True)
    if like is not None:
        cache_size, capacity = like.cache.size, like.capacity
    if cache_size is None or capacity is None:
        raise ValueError("prefill needs like=<running state> or both cache_size and capacity")
    if max(max_new) > capacity:
        raise ValueError(f"max_new_tokens ({max(max_new)}) exceeds the output capacity ({capacity})")
    p = prompt_bucket or bucket(max(len(r) for r in rows))
    need = max(len(r) + m for r, m in zip(rows, max_new)) + int(hook(decoder, "cache_headroom"))
    if p > cache_size or need > cache_size:
        raise ValueError(f"prompt + max_new_tokens needs {need} cache slots (prompt bucket {p}); the cache has "
                         f"{cache_size}")
    fill = _positive_int("fillers", fillers, allow_zero=True)
    if keys is None:
        if isinstance(seed, (list, tuple, np.ndarray)):
            if len(seed) != len(rows):
                raise ValueError(f"seed: expected one seed per prompt ({len(rows)}), got {len(seed)}")
            keys = np.concatenate([row_keys(s, 1, 1) for s in seed])
        else:
            keys = row_keys(seed, len(rows), 1)
    keys = np.asarray(keys, np.uint32)
    if keys.shape != (len(rows), 2):
        raise ValueError(f"keys: expected uint32 [{len(rows)}, 2] (one key per prompt), got shape {keys.shape}")
    stop = tuple(model.eos_ids) if stop_ids is None else tuple(int(s) for s in stop_ids)
    inputs = batch_inputs(len(rows) + fill, 1, 0, keys, stop, capacity, sampling)
    inputs = inputs.replace(max_new=jnp.asarray(max_new + [0] * fill, jnp.int32),
                            min_new=jnp.asarray(min_new + [0] * fill, jnp.int32))
    toks, lens = pad_batch(rows + [rows[0]] * fill, p, int(hook(model, "pad_id")))
    if cache is not None:
        _check_resume_cache(decoder, cache, len(rows) + fill, cache_size)
        return _continue_jit(decoder, model, params, jnp.asarray(toks), jnp.asarray(lens), inputs, cache)
    return loop._init_jit(decoder, model, params, jnp.asarray(toks), jnp.asarray(lens), inputs, cache_size)


def empty_cache(model, rows: int, *, like: Optional[DecodeState] = None, cache_size: Optional[int] = None):
    """An empty cache of ``rows`` rows (the running state's cache size with ``like``) for `prefill(..., cache=)`."""
    if like is not None:
        cache_size = like.cache.size
    if cache_size is None:
        raise ValueError("empty_cache needs like=<running state> or cache_size")
    return model.init_cache(_positive_int("rows", rows), _positive_int("cache_size", cache_size))


def _check_resume_cache(decoder, cache, rows: int, cache_size: int) -> None:
    if not hook(decoder, "needs_cache"):
        raise ValueError("cache: this decoder keeps no KV cache (needs_cache = False); it cannot continue a prefill")
    if type(cache) is not KVCache or cache.prefix_k is not None:
        raise ValueError(f"cache: a plain KVCache is needed to continue a prefill, got {type(cache).__name__}"
                         + (" with a shared prefix" if type(cache) is KVCache else ""))
    if cache.k.shape[1] != rows or cache.size != cache_size:
        raise ValueError(f"cache: expected {rows} rows of {cache_size} positions (the prompts' rows, the running "
                         f"cache's size), got {cache.k.shape[1]} rows of {cache.size}")


@dataclasses.dataclass(frozen=True)
class _Continue:
    """``model`` entering a block after what its cache already holds: every call's positions are shifted by each
    row's ``cache.lengths``, so `jaxdec.core.steps.prefill` of the next piece of a prompt (positions from 0)
    writes and attends as a chunk of the model's own chunked prefill does. One-shot inside (no nested chunks)."""

    model: Any
    prefill_chunk = None

    def __getattr__(self, name):
        if name == "model":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, params, tokens, positions, cache, *args, **kw):
        return self.model(params, tokens, positions + cache.lengths[:, None], cache, *args, **kw)


@functools.partial(jax.jit, static_argnames=("decoder", "model"), donate_argnames=("cache",))
def _continue_jit(decoder, model, params, prompts, prompt_lens, inputs, cache):
    loop.count_trace(f"init_continue:{type(decoder).__name__}")
    base = cache.lengths
    state = decoder.init(_Continue(model), params, prompts, prompt_lens, cache, inputs)
    # the prefill set each row's length to its piece's length; the row holds what came before too
    return state.replace(cache=rollback(state.cache, base + state.cache.lengths))


def _per_row(name: str, value, n: int, *, allow_zero: bool) -> list:
    """One checked int per row from an int or a list of ``n`` ints."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one value per prompt ({n}), got {len(value)}")
        return [_positive_int(f"{name}[]", v, allow_zero=allow_zero) for v in value]
    return [_positive_int(name, value, allow_zero=allow_zero)] * n


def insert(decoder, state: DecodeState, prefix: DecodeState, slots) -> DecodeState:
    """``state`` with ``prefix``'s rows in ``slots`` (distinct row indices of the running batch)."""
    slots = np.asarray(slots, np.int64).reshape(-1)
    if len(slots) != prefix.batch:
        raise ValueError(f"slots has {len(slots)} entries for {prefix.batch} prefix rows")
    if len(set(slots.tolist())) != len(slots) or slots.min() < 0 or slots.max() >= state.batch:
        raise ValueError(f"slots must be distinct rows in [0, {state.batch}), got {slots.tolist()}")
    return _insert_jit(decoder, state, prefix, jnp.asarray(slots, jnp.int32))


def step(decoder, model, params, state: DecodeState) -> DecodeState:
    """One decode step of the running batch (the driver's compiled step)."""
    return loop._step_jit(decoder, model, params, state)


def start(decoder, model, params, prompts, **kw) -> DecodeState:
    """A running batch from scratch: `prefill` of every row (``cache_size`` and ``capacity`` required)."""
    return prefill(decoder, model, params, prompts, **kw)
