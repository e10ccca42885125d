"""Exact-Extract: the most probable span of a given context, found exactly (not by greedy decoding).

For extractive QA the answer is a span ``c[i:j]`` of the context tokens; its probability as the model's
answer is ``p(c[i:j] + [end] | prompt)``. Every span starting at ``i`` shares the prefix computation
``c[i], c[i+1], ...``, so one model call per start (all starts batched as rows, on top of the prompt's
KV computed once) yields, for every position, the log-probability of the next context token and of
the end token; cumulative sums then score all O(n * max_span) spans at once:

    S(i, L) = log p(c_i | prompt) + sum_{m<L-1} log p(c_{i+m+1} | prompt, c_i..c_{i+m})
              + log p(end | prompt, c_i..c_{i+L-1})

`exact_extract` returns the argmax span (and the ``top`` best). Starts are processed in chunks of
``rows_per_call`` to bound memory.

Exact-Extract is not a decoder: it is a **host-level search** over a fixed candidate set, not a
token-by-token loop. There is nothing to ``step``: one prefill of the prompt and one teacher-forced block
call per chunk of starts score every span, and the argmax is taken on the host. Its model computations are
jitted functions built on the pieces the decoders use: the driver's prompt check, the one
`jaxdec.core.steps.prefill` every decoder's ``init`` calls (`_prompt`), `jaxdec.search.common.expand_cache`
(the prompt's KV copied to one row per start, as the multi-hypothesis decoders do) and the model's forward
(`_span_tables`). It does not go through `jaxdec.core.driver.run`, so `debug=`/streaming and the driver's
batching do not apply to it.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import bucket
from jaxdec.core.driver import _check_prompts
from jaxdec.core.steps import prefill
from jaxdec.search.common import expand_cache


@functools.partial(jax.jit, static_argnames=("model", "size"))
def _prompt(model, params, ids, length, size: int):
    cache = model.init_cache(1, size)
    logits, cache, _ = prefill(model, params, ids, length, cache)
    return jax.nn.log_softmax(logits[0].astype(jnp.float32)), cache


@functools.partial(jax.jit, static_argnames=("model",))
def _span_tables(model, params, cache, blocks, end_id):
    """blocks [R, L]: context from each start. Returns (next-token logp [R, L], end logp [R, L])."""
    r, l = blocks.shape
    c = expand_cache(cache, r)
    pos = c.lengths[:, None] + jnp.arange(l, dtype=jnp.int32)[None, :]
    out = model(params, blocks, pos, c)
    lp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)  # [R, L, V]
    nxt = jnp.take_along_axis(lp[:, :-1], blocks[:, 1:, None], axis=-1)[..., 0]
    nxt = jnp.concatenate([nxt, jnp.zeros((r, 1), jnp.float32)], axis=1)
    return nxt, lp[:, :, end_id]


def span_scores(model, params, prompt_ids, context_ids, *, end_id: Optional[int] = None,
                max_span: Optional[int] = None, rows_per_call: int = 16) -> np.ndarray:
    """[n, max_span] array: entry (i, L-1) = S(i, L) for spans inside the context, -inf elsewhere."""
    prompt = _check_prompts([prompt_ids], model.vocab_size)[0]
    ctx = _check_prompts([context_ids], model.vocab_size)[0]
    n = len(ctx)
    ms = n if max_span is None else max(1, min(int(max_span), n))
    end = int(model.eos_ids[0] if end_id is None else end_id)
    lb = bucket(ms, 8)
    size = bucket(len(prompt) + lb)
    ids = np.zeros((1, bucket(len(prompt))), np.int32)
    ids[0, :len(prompt)] = prompt
    first, cache = _prompt(model, params, jnp.asarray(ids), jnp.asarray([len(prompt)], jnp.int32), size)
    first = np.asarray(first, np.float64)
    out = np.full((n, ms), -np.inf)
    ctx_arr = np.asarray(ctx + [0] * lb, np.int32)
    for s0 in range(0, n, rows_per_call):
        starts = np.arange(s0, s0 + rows_per_call)
        blocks = np.stack([ctx_arr[min(s, n - 1):min(s, n - 1) + lb] for s in starts]).astype(np.int32)
        nxt, endlp = _span_tables(model, params, cache, jnp.asarray(blocks), jnp.int32(end))
        nxt, endlp = np.asarray(nxt, np.float64), np.asarray(endlp, np.float64)
        for r, i in enumerate(starts):
            if i >= n:
                break
            lmax = min(ms, n - i)
            cum = first[ctx[i]] + np.concatenate([[0.0], np.cumsum(nxt[r, :lmax - 1])])
            out[i, :lmax] = cum + endlp[r, :lmax]
    return out


def exact_extract(model, params, prompt_ids, context_ids, *, end_id: Optional[int] = None,
                  max_span: Optional[int] = None, top: int = 1, rows_per_call: int = 16) -> dict:
    """The most probable span: {"start", "end" (exclusive), "tokens", "score", "top": [(start, end, score)]}."""
    table = span_scores(model, params, prompt_ids, context_ids, end_id=end_id, max_span=max_span,
                        rows_per_call=rows_per_call)
    flat = np.argsort(-table, axis=None, kind="stable")[:max(1, top)]
    best = []
    for f in flat:
        i, l = divmod(int(f), table.shape[1])
        if np.isfinite(table[i, l]):
            best.append((i, i + l + 1, float(table[i, l])))
    i, j, s = best[0]
    return {"start": i, "end": j, "tokens": list(context_ids[i:j]), "score": s, "top": best}
