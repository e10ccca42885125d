"""AdaDec (uncertainty-guided adaptive decoding): greedy, except where the model is unsure.

At each step the entropy H of the next-token distribution is compared with a threshold. Below it the
step is greedy. Above it the top-k candidates are re-ranked by a lookahead: each candidate is extended
greedily by L tokens (stopping at a stop id) and scored by the mean log-probability of the candidate
plus its lookahead tokens (``score="mean"``; ``"sum"`` ranks by their joint log-probability); the best
candidate is emitted. The lookahead runs on a copy of the KV cache (k rows per row) that is thrown
away, so only the chosen token enters the real cache. It runs under `lax.cond` only on steps where
some row triggers. An infinite threshold never triggers: AdaDec is then exactly greedy.

threshold is a traced per-row input (``inputs.method.threshold``); k, L and the score are static.
Host entry: `adadec_generate(model, params, prompts, threshold=..., k=3, lookahead=5, ...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.core.generate import Generation, generate
from jaxdec.core.steps import decode_call, emit_tokens, initial_state, prefill, suppress_stops
from jaxdec.search.common import expand_cache, isin


def entropy(logp):
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def lookahead_scores(model, params, cache, cand, cand_lp, stop_ids, steps: int, mode: str = "mean"):
    """Score candidates ``cand [B,k]`` (log-probs ``cand_lp``) by greedy lookahead of ``steps`` tokens.

    ``cache`` holds each row's context up to (not including) the candidate. Returns [B,k]."""
    b, k = cand.shape
    c = expand_cache(cache, k)
    last = cand.reshape(-1)
    alive = ~isin(last, stop_ids)
    total = cand_lp.reshape(-1)
    count = jnp.ones_like(total)

    def body(i, carry):
        c, last, alive, total, count = carry
        pos = c.lengths
        out = model(params, last[:, None], pos[:, None], c)
        lp = jax.nn.log_softmax(out.logits[:, 0].astype(jnp.float32), axis=-1)
        nxt = jnp.argmax(lp, axis=-1).astype(jnp.int32)
        best = jnp.max(lp, axis=-1)
        total = total + jnp.where(alive, best, 0.0)
        count = count + alive.astype(jnp.float32)
        alive = alive & ~isin(nxt, stop_ids)
        return out.cache, nxt, alive, total, count

    _, _, _, total, count = jax.lax.fori_loop(0, steps, body, (c, last, alive, total, count))
    score = total / count if mode == "mean" else total
    return score.reshape(b, k)


@struct.dataclass
class AdaDecInputs:
    """Per-row inputs (traced): ``threshold [B]`` float32 entropy above which a step looks ahead."""

    threshold: jax.Array


@struct.dataclass
class AdaDecState:
    """`AdaDec`'s method state; B rows.

    threshold: [B] float32 entropy (nats) above which a step re-ranks by lookahead.
    triggers:  [B] int32 steps that re-ranked.
    """

    threshold: jax.Array
    triggers: jax.Array


@dataclasses.dataclass(frozen=True)
class AdaDec:
    k: int = 3
    lookahead: int = 5
    score: str = "mean"

    def __post_init__(self):
        if self.k < 1 or self.lookahead < 0 or self.score not in ("mean", "sum"):
            raise ValueError(f"bad AdaDec config k={self.k} lookahead={self.lookahead} score={self.score!r}")

    @property
    def cache_headroom(self) -> int:  # the lookahead writes past the current length
        return self.lookahead + 1

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        method = AdaDecState(threshold=inputs.method.threshold.astype(jnp.float32),
                             triggers=jnp.zeros((prompts.shape[0],), jnp.int32))
        stats = {"model_calls": jnp.ones((), jnp.int32), "lookahead_calls": jnp.zeros((), jnp.int32)}
        state = initial_state(prompts, cache, inputs, method, stats)
        return self._emit(model, params, state, logits)

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._emit(model, params, state, logits)

    def _emit(self, model, params, state, logits):
        lp = jax.nn.log_softmax(suppress_stops(logits.astype(jnp.float32), state), axis=-1)
        greedy = jnp.argmax(lp, axis=-1).astype(jnp.int32)
        trig = (entropy(lp) > state.method.threshold) & ~state.done

        def rerank(_):
            cand_lp, cand = jax.lax.top_k(lp, self.k)
            sc = lookahead_scores(model, params, state.cache, cand.astype(jnp.int32), cand_lp, state.stop_ids,
                                  self.lookahead, self.score)
            best = jnp.take_along_axis(cand, jnp.argmax(sc, axis=-1)[:, None], axis=1)[:, 0].astype(jnp.int32)
            return jnp.where(trig, best, greedy)

        tok = jax.lax.cond(jnp.any(trig), rerank, lambda _: greedy, None)
        any_t = jnp.any(trig).astype(jnp.int32)
        method = state.method.replace(triggers=state.method.triggers + trig.astype(jnp.int32))
        stats = {**state.stats, "lookahead_calls": state.stats["lookahead_calls"] + any_t * self.lookahead}
        return emit_tokens(state.replace(method=method, stats=stats), tok)

    def summarize(self, state):
        return {"adadec_triggers": int(np.asarray(state.method.triggers).sum()),
                "lookahead_calls": int(np.asarray(state.stats["lookahead_calls"]))}


def adadec_generate(model, params, prompts, *, threshold: float = 1.5, k: int = 3, lookahead: int = 5,
                    score: str = "mean", max_new_tokens: int = 64, min_new_tokens: int = 0, stop_ids=None,
                    batch_size: Optional[int] = None, tokenizer=None, debug: bool = False,
                    callback=None) -> Generation:
    """threshold: entropy (nats) above which a step re-ranks its top-k by lookahead (inf = greedy)."""
    if np.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    dec = AdaDec(k=int(k), lookahead=int(lookahead), score=score)

    def extra(inputs, chunk):
        return inputs.replace(method=AdaDecInputs(threshold=jnp.full((inputs.batch,), threshold, jnp.float32)))

    return generate(model, params, prompts, decoder=dec, max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens, stop_ids=stop_ids, batch_size=batch_size, tokenizer=tokenizer,
                    debug=debug, callback=callback, inputs_fn=extra)
