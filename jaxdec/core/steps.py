"""Building blocks shared by decoders: prefill, one cached decode call, state creation, stop handling."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import KVCache, rollback, set_prefix, swap_heads_slots
from jaxdec.core.logits import MIN_NEW, step_context
from jaxdec.core.state import DecodeState, STOP_STRING, emit


PREFILL_CHUNK = 512  # default prompt tokens per prefill chunk (`LlamaModel.prefill_chunk`)


def prefill_chunk_of(model):
    """The model's prefill chunk (``model.prefill_chunk``; None: one-shot prefill)."""
    c = getattr(model, "prefill_chunk", None)
    return None if c is None else int(c)


def with_prefill_chunk(model, chunk):
    """``model`` prefilling in chunks of ``chunk`` tokens (None: one call); a model without chunked
    prefill (no ``with_prefill_chunk``) is returned as it is. ``chunk`` must be None or an integer >= 1."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"prefill_chunk must be None (one-shot prefill) or an integer >= 1, got {chunk!r}")
    setter = getattr(model, "with_prefill_chunk", None)
    return model if setter is None else setter(chunk)


def prefill(model, params, prompts, prompt_lens, cache, chunk="model"):
    """Run the right-padded prompts; returns (logits at each row's last prompt token [B,V], cache, hidden [B,E]).

    The one prefill every decoder's ``init`` calls. The cache holds keys/values for the whole padded
    block, but each row's length is set to its real prompt length, so the padding is invisible and later
    writes overwrite it.

    Chunked prefill: with ``chunk`` C (default: ``model.prefill_chunk``, 512 for `LlamaModel`; None
    turns it off) and a prompt block longer than C, the prompts enter in chunks of C tokens through ONE
    compiled chunk program (a `lax.fori_loop` whose trip count is ``ceil(max(prompt_lens) / C)``, set at
    run time; all rows of a ragged batch together). Chunk i writes positions ``i*C .. i*C+C-1`` of every
    row and attends causally to itself and to the ``i*C`` entries written before it (the model's
    blockwise attention reads only those), so the largest score block is ``[C, key chunk]``, never
    ``[T, S]``. Writes past the cache's end (padding of the last chunk) are dropped. Only a plain
    `KVCache` is chunked; other caches get the one-shot prefill.

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
        # the prefix buffers [L,G,P,KVH,D] are a batch-G ordinary cache once head-major ([L,G,KVH,P,D])
        one = KVCache(swap_heads_slots(cache.prefix_k), swap_heads_slots(cache.prefix_v), jnp.zeros((g,), jnp.int32))
        logits, one, hidden = prefill(model, params, prompts[::r], prompt_lens[::r], one, chunk)
        cache = set_prefix(cache, swap_heads_slots(one.k), swap_heads_slots(one.v), one.lengths)
        return jnp.repeat(logits, r, axis=0), cache, jnp.repeat(hidden, r, axis=0)
    if chunk == "model":
        chunk = prefill_chunk_of(model)
    if chunk is not None and p > chunk and type(cache) is KVCache:
        return _chunked_prefill(model, params, prompts, prompt_lens, cache, int(chunk))
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    last = (prompt_lens - 1)[:, None].astype(jnp.int32)
    out = model(params, prompts, positions, cache, logits_at=last)
    cache = rollback(out.cache, prompt_lens)
    hidden = jnp.take_along_axis(out.hidden, last[:, :, None], axis=1)[:, 0]
    return out.logits[:, 0], cache, hidden


def _chunked_prefill(model, params, prompts, prompt_lens, cache, c: int):
    """`prefill` in chunks of ``c`` tokens (see there)."""
    if c < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {c}")
    b, p = prompts.shape
    n_static = -(-p // c)
    toks = jnp.pad(prompts, ((0, 0), (0, n_static * c - p)))
    lens = jnp.asarray(prompt_lens, jnp.int32)
    last = lens - 1  # [B] position of each row's last prompt token
    n = jnp.minimum((jnp.max(lens) + c - 1) // c, n_static)  # chunks past every row's prompt are skipped
    base = cache.lengths
    ar = jnp.arange(c, dtype=jnp.int32)

    def body(i, carry):
        cache, logits, hidden = carry
        start = i * c
        blk = jax.lax.dynamic_slice_in_dim(toks, start, c, axis=1)
        pos = jnp.broadcast_to(start + ar, (b, c))
        cache = rollback(cache, base + start)  # every row writes this chunk at `start`
        at = jnp.clip(last - start, 0, c - 1)[:, None]
        out = model(params, blk, pos, cache, logits_at=at)
        mine = (last // c) == i  # rows whose last prompt token is in this chunk
        lg = jnp.where(mine[:, None], out.logits[:, 0].astype(logits.dtype), logits)
        hd = jnp.take_along_axis(out.hidden, at[:, :, None], axis=1)[:, 0]
        hd = jnp.where(mine[:, None], hd.astype(hidden.dtype), hidden)
        return out.cache, lg, hd

    # shapes of the carried logits / hidden: one abstract evaluation of a chunk (no compute)
    probe = jax.eval_shape(lambda cch: model(params, toks[:, :c], jnp.broadcast_to(ar, (b, c)), cch,
                                             logits_at=jnp.zeros((b, 1), jnp.int32)), cache)
    logits0 = jnp.zeros((b,) + probe.logits.shape[2:], probe.logits.dtype)
    hidden0 = jnp.zeros((b,) + probe.hidden.shape[2:], probe.hidden.dtype)
    cache, logits, hidden = jax.lax.fori_loop(0, n, body, (cache, logits0, hidden0))
    return logits, rollback(cache, lens), hidden


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
    # the output buffer is the driver's zero-filled `out_buffer` itself (not a fresh constant), so it keeps
    # the placement the driver gave it: split over the data axis of a mesh, like every per-row input
    return DecodeState(
        tokens=inputs.out_buffer, num_new=jnp.zeros((b,), jnp.int32),
        done=inputs.max_new <= 0, finish=jnp.where(inputs.max_new <= 0, 2, 0).astype(jnp.int32),
        last=jnp.zeros((b,), jnp.int32), keys=inputs.keys, cache=cache,
        max_new=inputs.max_new, min_new=inputs.min_new, stop_ids=inputs.stop_ids, step=jnp.zeros((), jnp.int32),
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
