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

from typing import Optional

import jax
import jax.numpy as jnp

from jaxdec.cache.kv import KVCache, read_rows, write_rows
from jaxdec.core import driver

from jaxdec.masks import EMPTY_BEAM_SCORE as NEG  # HF's finite empty-beam score (sums stay ordered)


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
    """A cache buffer [L,B,KVH,S,D]: row b's positions [start[b], start[b]+window) <- those of row idx[b]
    (start clamped so the window fits, as ``dynamic_slice`` would)."""
    start = jnp.clip(start, 0, buf.shape[3] - window)
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


def run_grouped(decoder, model, params, prompts, rows_per_prompt: int, *, max_new_tokens: int,
                min_new_tokens: int = 0, stop_ids=None, seed: int = 0, batch_size: Optional[int] = None,
                cache_size: Optional[int] = None, capacity: Optional[int] = None, debug: bool = False,
                callback=None, extra_inputs=None, shared_prefix: Optional[bool] = None, mesh=None):
    """Run `decoder` over prompts with ``rows_per_prompt`` rows each; yields nothing, returns
    ``(prompts, [(final_state, n_real_prompts), ...], stats)``.

    batch_size counts prompts per compiled batch (each batch has batch_size * rows_per_prompt rows);
    the last batch is padded with inert prompts (max_new = 0) so it reuses the compiled program.
    extra_inputs(inputs, chunk_prompts) -> inputs adds decoder-specific per-row inputs.
    shared_prefix: None (auto: a shared-prefix Hydragen cache, one prefix per prompt of the batch, when
    rows_per_prompt > 1 and the decoder opts in), True (force; error if impossible) or False (ordinary
    cache). ``stats["shared_prefix"]`` says which ran.
    mesh: a `jaxdec.sharding.make_mesh` mesh (rows split over its data axis; see `generate`).
    """
    run = driver.run(decoder, model, params, prompts, expand=rows_per_prompt, max_new_tokens=max_new_tokens,
                     min_new_tokens=min_new_tokens, stop_ids=stop_ids, seed=seed, batch_size=batch_size,
                     cache_size=cache_size, capacity=capacity, debug=debug, callback=callback,
                     inputs_fn=extra_inputs, shared_prefix=shared_prefix, mesh=mesh)
    stats = {"model_calls": run.model_calls, "loop_steps": run.loop_steps, "seconds": run.seconds,
             "cache_size": run.cache_size, "prompt_bucket": run.prompt_bucket, "batch_size": run.batch_size,
             "rows_per_prompt": int(rows_per_prompt), "capacity": run.capacity, "shared_prefix": run.shared_prefix}
    prompts, results = run.units, run.results
    return prompts, results, stats
