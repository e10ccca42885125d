"""Test-time search: best-of-N with a reranking hook, first-finish search, A*-decoding.

* `best_of_n`: N samples per prompt (the shared sampling decoder, per-row keys), each scored by a
  pluggable ``scorer(prompt_ids, candidates) -> [float]`` (default: mean token log-probability,
  teacher-forced with `jaxdec.score`); the best is returned. `rerank` is the same hook on its own, for
  candidates from any decoder (beams, samples): RankGen-style rerankers plug in here.
* `first_finish` (First Finish Search, 2025): N samples per prompt decoded in parallel; a prompt stops
  as soon as one of its samples ends with a stop id, and that sample is returned. Because every row's
  randomness depends only on its own key, its samples are prefixes of best-of-N's samples under the
  same seed, and its answer is the shortest of them (ties: the lowest sample index) -- at the cost of
  only as many steps as that shortest sample needs.
* `astar_decode`: A* over partial sequences. Cost of a step = ``step_cost(prefix, logprobs)`` (default
  the negative log-probability), priority = cost so far + ``heuristic(prompt, prefix)`` (default 0);
  the first *complete* sequence popped (ending in a stop id, or max_new_tokens long) is returned. With a
  zero (or any admissible) heuristic and all children expanded it is the exact most probable complete
  sequence. The prompt's KV is computed once; each expansion runs the node's tokens on top of it.

`best_of_n` and `first_finish` are decoders run by the shared driver (`jaxdec.core.driver.run`, init/step
in the compiled loop). `astar_decode` is not a decoder: it is a **host-level search**. Its frontier is a
Python priority queue whose size and order depend on the scores (one node expanded per model call, any
prefix length), which is no fixed-shape per-row step; so the queue lives on the host, and every model
computation is a jitted function built on the pieces the decoders use: the driver's prompt check, the
one `jaxdec.core.steps.prefill` every decoder's ``init`` calls (`_prompt_state`, once per prompt) and the
model's forward over a node's tokens on top of that prompt cache (`_extend`, compiled once per length
bucket). It has no ``init``/``step``, so `debug=`/streaming, batching and the driver's statistics do not
apply to it.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import bucket
from jaxdec.core.driver import _check_prompts
from jaxdec.core.generate import Generation, generate, score
from jaxdec.core.logits import check_processors
from jaxdec.core.state import EOS
from jaxdec.core.steps import prefill
from jaxdec.search.token import TokenDecoder


# ------------------------------------------------------------------ scoring / reranking hook
def mean_logprob_scorer(model, params):
    """Default scorer: mean teacher-forced log-probability of each candidate (empty -> -inf)."""
    def scorer(prompt_ids, candidates):
        rows = [c for c in candidates if len(c)]
        if not rows:
            return [float("-inf")] * len(candidates)
        lps = iter(score(model, params, [prompt_ids] * len(rows), rows))
        return [float(np.mean(next(lps))) if len(c) else float("-inf") for c in candidates]
    return scorer


def rerank(prompts, candidates, scorer: Callable):
    """candidates[i]: list of token lists for prompt i. Returns (best per prompt, per-prompt list of
    {"tokens", "score"} sorted best first)."""
    best, ranked = [], []
    for p, cands in zip(prompts, candidates):
        sc = [float(s) for s in scorer(p, cands)]
        order = sorted(range(len(cands)), key=lambda j: (-sc[j], j))
        ranked.append([{"tokens": cands[j], "score": sc[j]} for j in order])
        best.append(cands[order[0]])
    return best, ranked


def best_of_n(model, params, prompts, *, n: int = 4, sampling=None, seed: int = 0, max_new_tokens: int = 64,
              scorer: Optional[Callable] = None, batch_size: Optional[int] = None, tokenizer=None,
              processors=None, constraint=None) -> Generation:
    """N samples per prompt, reranked by ``scorer`` (default mean log-probability); ``processors``: logits
    processors every sample is drawn with (`jaxdec.core.logits`). constraint: a `jaxdec.constrained`
    constraint (or one per prompt; needs ``tokenizer=``) every sample is drawn under; ``constraint_ok``
    per prompt (the chosen sample) and ``extras["samples_ok"]``."""
    g = generate(model, params, prompts, method="sample", sampling=sampling or {}, n=n, seed=seed,
                 max_new_tokens=max_new_tokens, batch_size=batch_size, processors=processors,
                 tokenizer=tokenizer if constraint is not None else None, constraint=constraint)
    prompts = _check_prompts(prompts, model.vocab_size)
    samples = [g.tokens[i * n:(i + 1) * n] for i in range(len(prompts))]
    reasons = [g.finish_reason[i * n:(i + 1) * n] for i in range(len(prompts))]
    best, ranked = rerank(prompts, samples, scorer or mean_logprob_scorer(model, params))
    fin = []
    for i, b in enumerate(best):
        fin.append(reasons[i][samples[i].index(b)])
    text = [tokenizer.decode(t) for t in best] if tokenizer is not None else None
    extras = {"samples": samples, "finish_reasons": reasons, "ranked": ranked}
    ok = None
    if g.constraint_ok is not None:
        extras["samples_ok"] = [g.constraint_ok[i * n:(i + 1) * n] for i in range(len(prompts))]
        ok = [extras["samples_ok"][i][samples[i].index(b)] for i, b in enumerate(best)]
    return Generation(prompt_ids=prompts, tokens=best, finish_reason=fin, stats=g.stats, text=text,
                      extras=extras, constraint_ok=ok)


# ------------------------------------------------------------------ first-finish search
@dataclasses.dataclass(frozen=True)
class FirstFinish:
    """Wraps a token decoder: rows come in groups of n (one prompt); a group stops when one row ends
    with a stop id."""

    n: int = 4
    inner: Any = TokenDecoder(greedy=False)
    shared_prefix_ok = True  # the inner TokenDecoder's cache handling (Hydragen prefix allowed)

    def _group(self, state):
        ended = (state.finish == EOS).reshape(-1, self.n)
        stop = jnp.repeat(jnp.any(ended, axis=1), self.n)
        return state.replace(done=state.done | stop)

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        return self._group(self.inner.init(model, params, prompts, prompt_lens, cache, inputs))

    def step(self, model, params, state):
        return self._group(self.inner.step(model, params, state))


def shortest_finished(samples, reasons) -> int:
    """Index of the first-finishing sample: fewest tokens among those ended by a stop id (ties: lowest
    index); 0 when none ended."""
    ended = [j for j, r in enumerate(reasons) if r == "eos"]
    if not ended:
        return 0
    return min(ended, key=lambda j: (len(samples[j]), j))


def first_finish(model, params, prompts, *, n: int = 4, sampling=None, seed: int = 0, max_new_tokens: int = 64,
                 batch_size: Optional[int] = None, tokenizer=None, processors=None, constraint=None) -> Generation:
    """First Finish Search. batch_size counts prompts (each has n rows); ``processors``: logits processors
    every sample is drawn with. ``constraint``: `generate`'s (one for all prompts or one per prompt; needs
    ``tokenizer``): it masks the inner token decoder, so a group stops when one of its samples ends by EOS,
    which the grammar allows only where it accepts; ``constraint_ok`` is that of each chosen sample."""
    prompts = _check_prompts(prompts, model.vocab_size)
    bs = n * (len(prompts) if batch_size is None else int(batch_size))
    dec = FirstFinish(n=n, inner=TokenDecoder(greedy=False, processors=check_processors(processors, "first_finish")))
    extra = {} if constraint is None else {"constraint": constraint, "tokenizer": tokenizer}
    g = generate(model, params, prompts, decoder=dec, sampling=sampling or {}, n=n, seed=seed,
                 max_new_tokens=max_new_tokens, batch_size=bs, **extra)
    best, fin, samples, ok = [], [], [], []
    for i in range(len(prompts)):
        toks, rs = g.tokens[i * n:(i + 1) * n], g.finish_reason[i * n:(i + 1) * n]
        j = shortest_finished(toks, rs)
        best.append(toks[j])
        fin.append(rs[j])
        samples.append(toks)
        if constraint is not None:
            ok.append(g.constraint_ok[i * n + j])
    text = [tokenizer.decode(t) for t in best] if tokenizer is not None else None
    return Generation(prompt_ids=prompts, tokens=best, finish_reason=fin, stats=g.stats, text=text,
                      extras={"partial_samples": samples}, **({"constraint_ok": ok} if constraint is not None else {}))


# ------------------------------------------------------------------ A*-decoding
@functools.partial(jax.jit, static_argnames=("model", "size"))
def _prompt_state(model, params, ids, length, size: int):
    cache = model.init_cache(1, size)
    logits, cache, _ = prefill(model, params, ids, length, cache)
    return jax.nn.log_softmax(logits[0].astype(jnp.float32)), cache


@functools.partial(jax.jit, static_argnames=("model",))
def _extend(model, params, cache, block, m):
    """log p(. | prompt + block[:m]) with block [1, T] run on top of the prompt cache (discarded)."""
    t = block.shape[1]
    pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    out = model(params, block, pos, cache, logits_at=(m - 1)[None, None])
    return jax.nn.log_softmax(out.logits[0, 0].astype(jnp.float32))


def astar_decode(model, params, prompts, *, max_new_tokens: int = 16, heuristic: Optional[Callable] = None,
                 step_cost: Optional[Callable] = None, max_children: Optional[int] = None,
                 max_expansions: int = 100_000, stop_ids=None) -> Generation:
    """A* search for each prompt; ``extras["scores"]`` are the found sequences' log-probabilities and
    ``extras["expansions"]`` the model calls each search made (1 per expanded node).

    heuristic(prompt_ids, prefix) -> float estimates the remaining cost; step_cost(prefix, logprobs[V])
    -> costs[V] (default ``-logprobs``; keep costs >= 0 for optimality). max_children expands only the
    cheapest children of each node (None: all, exact)."""
    prompts = _check_prompts(prompts, model.vocab_size)
    stop = set(model.eos_ids if stop_ids is None else stop_ids)
    h = heuristic or (lambda p, prefix: 0.0)
    cost_fn = step_cost or (lambda prefix, lp: -lp)
    out_tokens, scores, expansions, reasons = [], [], [], []
    for p in prompts:
        size = bucket(len(p) + max_new_tokens + 8)
        ids = np.zeros((1, bucket(len(p))), np.int32)
        ids[0, :len(p)] = p
        root_lp, cache = _prompt_state(model, params, jnp.asarray(ids), jnp.asarray([len(p)], jnp.int32), size)
        tick = itertools.count()
        heap = [(h(p, ()), next(tick), (), 0.0, 0.0)]  # (f, tie, prefix, g, logprob)
        n_exp = 0
        found = None
        while heap:
            f, _, prefix, g, lp_sum = heapq.heappop(heap)
            if prefix and (prefix[-1] in stop or len(prefix) >= max_new_tokens):
                found = (prefix, lp_sum)
                break
            if n_exp >= max_expansions:
                break
            if prefix:
                blk = np.zeros((1, bucket(len(prefix), 8)), np.int32)
                blk[0, :len(prefix)] = prefix
                lp = np.asarray(_extend(model, params, cache, jnp.asarray(blk), jnp.int32(len(prefix))), np.float64)
            else:
                lp = np.asarray(root_lp, np.float64)
            n_exp += 1
            costs = np.asarray(cost_fn(prefix, lp), np.float64)
            kids = np.argsort(costs, kind="stable")
            if max_children is not None:
                kids = kids[:max_children]
            for c in kids:
                if not np.isfinite(costs[c]):
                    continue
                nxt = prefix + (int(c),)
                g2 = g + float(costs[c])
                heapq.heappush(heap, (g2 + float(h(p, nxt)), next(tick), nxt, g2, lp_sum + float(lp[c])))
        if found is None:
            raise RuntimeError(f"A* found no complete sequence within {max_expansions} expansions")
        out_tokens.append(list(found[0]))
        scores.append(found[1])
        expansions.append(n_exp)
        reasons.append("eos" if found[0][-1] in stop else "length")
    return Generation(prompt_ids=prompts, tokens=out_tokens, finish_reason=reasons,
                      stats={"model_calls": int(sum(expansions) + len(prompts))},
                      extras={"scores": scores, "expansions": expansions})
