"""Shared machinery of the multi-row search decoders (beam, diverse beam, stochastic beam, ...).

Every prompt owns ``R`` consecutive rows of the batch (row ``b * R + j`` is hypothesis ``j`` of prompt
``b``). The prompt is prefilled once (one row per prompt) and its KV cache is copied to the R rows
(`expand_rows`): that shared-prompt work is why beam search here costs less than running R
independent prompts. Hypotheses are reordered by gathering rows (`reorder_cache`); only the generated
part of a row's cache (positions ``[start, start + window)``, where ``start`` is the prompt length) is
moved, because the prompt part is identical across one prompt's rows.

Shared prefix (Hydragen): when the decoder opts in (``shared_prefix_ok = True``) and R > 1,
`run_grouped` gives the decoder a shared-prefix `KVCache` with one prefix group per prompt of the
batch: each prompt is prefilled once into a single prefix copy, each row's cache holds only its
generated suffix (``bucket(capacity)`` slots), attention is `hydragen_attend` (each prompt's R rows
batched against its prefix), and reordering beams (always within a prompt) gathers suffix rows only.

`run_grouped` is the host entry shared by these decoders: it pads and batches prompts, builds the
per-row inputs (R rows per prompt) and runs a decoder through the shared driver (`loop.run_jit`, or
`loop.run_debug`).
"""
from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import KVCache, bucket, read_rows, write_rows
from jaxdec.core import loop
from jaxdec.core.protocols import hook
from jaxdec.core.generate import _check_prompts, _positive_int, pad_batch, shared_prefix_sizes, use_shared_prefix

NEG = -1.0e9  # HF's "impossible" score for beams (kept finite so that sums stay ordered)


def expand_rows(tree, r: int, axis: int = 0):
    """Repeat every row ``r`` times along ``axis`` (prompt b -> rows b*r .. b*r+r-1)."""
    return jax.tree.map(lambda x: jnp.repeat(x, r, axis=axis), tree)


def expand_cache(cache, r: int):
    """Copy each prompt's cache to its ``r`` hypothesis rows."""
    if isinstance(cache, KVCache):  # a shared prefix stays one copy: only the suffix rows repeat
        return cache.replace(k=jnp.repeat(cache.k, r, axis=1), v=jnp.repeat(cache.v, r, axis=1),
                             lengths=jnp.repeat(cache.lengths, r, axis=0))
    if hasattr(cache, "repeat_rows"):
        return cache.repeat_rows(r)
    raise TypeError(f"don't know how to copy rows of a {type(cache).__name__} cache (give it repeat_rows/take_rows)")


def _window_take(buf, idx, start, window: int):
    """buf [L,B,S,...]: row b's positions [start[b], start[b]+window) <- those of row idx[b] (start
    clamped so the window fits, as ``dynamic_slice`` would)."""
    start = jnp.clip(start, 0, buf.shape[2] - window)
    win = jnp.take(read_rows(buf, start, window), idx, axis=1)
    return write_rows(buf, win, start)


def reorder_cache(cache, idx, start=None, window: Optional[int] = None):
    """Rows of the cache <- rows ``idx`` (a gather along the batch axis).

    With ``start``/``window`` only the positions ``[start, start + window)`` of each row are moved;
    callers guarantee that ``idx[b]`` and ``b`` share everything before ``start[b]`` (same prompt) and
    that ``start[b] == start[idx[b]]``. A window that would run past the cache is clamped by
    `dynamic_slice` to end at the cache's last position, which still covers ``[start, S)``.
    """
    if isinstance(cache, KVCache):
        # shared-prefix cache: k/v hold only the suffixes, so a reorder gathers suffix rows only
        lengths = jnp.take(cache.lengths, idx, axis=0)
        if window is None or window >= cache.size:
            return cache.replace(k=jnp.take(cache.k, idx, axis=1), v=jnp.take(cache.v, idx, axis=1),
                                 lengths=lengths)
        s0 = cache.to_slot(start)
        return cache.replace(k=_window_take(cache.k, idx, s0, window), v=_window_take(cache.v, idx, s0, window),
                             lengths=lengths)
    if hasattr(cache, "take_rows"):
        return cache.take_rows(idx, start, window)
    raise TypeError(f"don't know how to reorder rows of a {type(cache).__name__} cache (give it take_rows)")


def per_prompt(x, r: int):
    """[B*r, ...] -> [B, r, ...]"""
    return x.reshape((x.shape[0] // r, r) + x.shape[1:])


def flat(x):
    """[B, r, ...] -> [B*r, ...]"""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def global_rows(local_idx):
    """local_idx [B, r] (index within a prompt's rows) -> flat global row indices [B*r]."""
    b, r = local_idx.shape
    return flat(local_idx + (jnp.arange(b) * r)[:, None]).astype(jnp.int32)


def isin(tokens, ids):
    """tokens [...] int, ids [n] -> bool [...] (False everywhere when n == 0)."""
    if ids.size == 0:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == ids, axis=-1)


def row_keys(seed: int, n_prompts: int, n: int) -> np.ndarray:
    """The same keys as `jaxdec.core.generate.row_keys` (row (i, j) = fold_in(fold_in(PRNGKey(seed), i), j)),
    computed in one vectorised call (thousands of prompts in statistical tests)."""
    base = jax.random.PRNGKey(seed)
    per = jax.vmap(lambda i: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(base, i), j))(
        jnp.arange(n, dtype=jnp.uint32)))(jnp.arange(n_prompts, dtype=jnp.uint32))
    return np.asarray(per).reshape(n_prompts * n, -1).astype(np.uint32)


def run_grouped(decoder, model, params, prompts, rows_per_prompt: int, *, max_new_tokens: int,
                min_new_tokens: int = 0, stop_ids=None, seed: int = 0, batch_size: Optional[int] = None,
                cache_size: Optional[int] = None, capacity: Optional[int] = None, debug: bool = False,
                callback=None, extra_inputs=None, shared_prefix: Optional[bool] = None):
    """Run `decoder` over prompts with ``rows_per_prompt`` rows each; yields nothing, returns
    ``(prompts, [(final_state, n_real_prompts), ...], stats)``.

    batch_size counts prompts per compiled batch (each batch has batch_size * rows_per_prompt rows);
    the last batch is padded with inert prompts (max_new = 0) so it reuses the compiled program.
    extra_inputs(inputs, chunk_prompts) -> inputs adds decoder-specific per-row inputs.
    shared_prefix: None (auto: a shared-prefix Hydragen cache, one prefix per prompt of the batch, when
    rows_per_prompt > 1 and the decoder opts in), True (force; error if impossible) or False (ordinary
    cache). ``stats["shared_prefix"]`` says which ran.
    """
    prompts = _check_prompts(prompts, model.vocab_size)
    r = _positive_int("rows_per_prompt", rows_per_prompt)
    max_new = _positive_int("max_new_tokens", max_new_tokens)
    min_new = _positive_int("min_new_tokens", min_new_tokens, allow_zero=True)
    bp = len(prompts) if batch_size is None else _positive_int("batch_size", batch_size)
    bp = min(bp, len(prompts))
    stop = tuple(model.eos_ids) if stop_ids is None else tuple(int(s) for s in stop_ids)
    pmax = max(len(p) for p in prompts)
    p_bucket = bucket(pmax)
    cap = capacity or bucket(max_new, 16)
    if cap < max_new:
        raise ValueError(f"capacity ({cap}) is smaller than max_new_tokens ({max_new})")
    shared = use_shared_prefix(shared_prefix, model, decoder, bp, r)  # one prefix group per prompt
    prefix_size = None
    if shared:
        prefix_size, size = shared_prefix_sizes(p_bucket, cap, 0, cache_size)
    else:
        size = cache_size or bucket(p_bucket + cap)
    needed = pmax + max_new
    if needed > size + (prefix_size or 0) or p_bucket > size + (prefix_size or 0):
        raise ValueError(f"prompt too long for the cache: longest prompt ({pmax} tokens) + max_new_tokens "
                         f"({max_new}) needs {needed} positions, cache_size is {size}")
    max_pos = hook(model, "max_position")
    if max_pos is not None and needed > max_pos:
        raise ValueError(f"prompt + max_new_tokens = {needed} exceeds the model's context ({max_pos})")
    keys = row_keys(seed, len(prompts), r)
    pad_id = int(hook(model, "pad_id"))

    results = []
    calls = steps = 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), bp):
        chunk = prompts[start:start + bp]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (bp - real)
        toks, lens = pad_batch(chunk, p_bucket, pad_id)
        mx = np.repeat(np.array([max_new] * real + [0] * (bp - real), np.int32), r)
        kb = keys[start * r:(start + real) * r]
        kb = np.concatenate([kb, np.repeat(kb[:1], (bp - real) * r, 0)])
        inputs = {"max_new": jnp.asarray(mx), "min_new": jnp.full((bp * r,), min_new, jnp.int32),
                  "keys": jnp.asarray(kb), "stop_ids": jnp.asarray(np.array(stop, np.int32)),
                  "out_buffer": jnp.zeros((bp * r, cap), jnp.int32)}
        if extra_inputs is not None:
            inputs = extra_inputs(inputs, chunk)
        if debug:
            state = loop.run_debug(decoder, model, params, jnp.asarray(toks), jnp.asarray(lens), inputs, size,
                                   callback=callback, prefix_size=prefix_size, prefix_groups=bp)
        else:
            state = loop.run_jit(decoder, model, params, jnp.asarray(toks), jnp.asarray(lens), inputs, size,
                                 prefix_size=prefix_size, prefix_groups=bp)
        state = jax.block_until_ready(state)
        results.append((state, real))
        st = state.stats or {}
        calls += int(st.get("model_calls", 0))
        steps += int(state.step) + 1
    secs = time.perf_counter() - t0
    stats = {"model_calls": calls, "loop_steps": steps, "seconds": secs, "cache_size": size,
             "prompt_bucket": p_bucket, "batch_size": bp, "rows_per_prompt": r, "capacity": cap,
             "shared_prefix": shared}
    return prompts, results, stats
