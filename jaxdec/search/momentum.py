"""Momentum decoding (Lan et al., 2022): generation as graph exploration with resistance to revisiting.

The text generated so far is a graph whose nodes are its n-grams. At each step the top-k candidates
``v`` are scored by probability; a candidate that would *revisit* an existing node (the n-gram
ending in ``v`` already occurs in the text) pays a resistance that grows with the depth ``d`` of the
current loop (the number of consecutive revisiting steps so far, plus one):

    score(v) = p(v | x) - [v revisits] * R(d),    R(d) = alpha * d  (pluggable: `resistance`)

so the decoder greedily explores new nodes and may return to old ones only with decreasing momentum.
This is our reading of the paper's method (nodes = n-grams; linear resistance by default); with zero
resistance (alpha = 0) it is exactly greedy decoding. alpha is a traced per-row input.

Host entry: `momentum_generate(model, params, prompts, alpha=..., ngram=..., top_k=..., ...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.core.generate import Generation, generate
from jaxdec.core.logits import check_processors, run_processors, step_context, with_sampling
from jaxdec.core.steps import decode_call, emit_tokens, initial_state, prefill


def linear_resistance(depth, alpha):
    return alpha * depth.astype(jnp.float32)


def revisits(hist, hlen, start, cand, n: int):
    """hist [B,H] tokens (first hlen valid); cand [B,k]. True where the n-gram (last n-1 tokens of hist,
    cand) already occurs in hist at a window starting at or after ``start`` [B]."""
    b, h = hist.shape
    if n == 1:
        seen = (hist[:, None, :] == cand[:, :, None]) & (jnp.arange(h)[None, None, :] < hlen[:, None, None])
        seen = seen & (jnp.arange(h)[None, None, :] >= start[:, None, None])
        return jnp.any(seen, axis=-1)
    s = jnp.arange(h)  # window starts
    win = jnp.take(hist, jnp.clip(s[:, None] + jnp.arange(n)[None, :], 0, h - 1), axis=1)  # [B,H,n]
    pidx = jnp.clip(hlen[:, None] - (n - 1) + jnp.arange(n - 1)[None, :], 0, h - 1)
    pattern = jnp.take_along_axis(hist, pidx, axis=1)  # [B,n-1]
    prefix_ok = jnp.all(win[:, :, :n - 1] == pattern[:, None, :], axis=-1)  # [B,H]
    valid = (s[None, :] + n <= hlen[:, None]) & (s[None, :] >= start[:, None]) & (hlen[:, None] >= n - 1)
    hit = prefix_ok & valid
    return jnp.any(hit[:, None, :] & (win[:, None, :, n - 1] == cand[:, :, None]), axis=-1)


@struct.dataclass
class MomentumState:
    """`Momentum`'s method state; B rows, P prompt width, C output capacity.

    alpha:    [B] float32 resistance strength.
    hist:     [B, P + C] int32 each row's prompt then its output (the graph's text).
    hlen:     [B] int32 valid entries of ``hist``.
    plen:     [B] int32 prompt length.
    depth:    [B] int32 consecutive revisiting steps so far (the current loop's depth).
    revisits: [B] int32 tokens that revisited a node.
    """

    alpha: jax.Array
    hist: jax.Array
    hlen: jax.Array
    plen: jax.Array
    depth: jax.Array
    revisits: jax.Array


@dataclasses.dataclass(frozen=True)
class Momentum:
    """top_k candidates, n-gram nodes of size `ngram`; include_prompt: the prompt's n-grams are part of
    the graph. ``inputs["momentum"]["alpha"]`` per row (traced).

    processors: the user's logits processors, run after min_new suppression in stage order on the raw
    logits. The momentum penalty is not a processor: it acts on the probabilities of the top-k
    candidates (after the chain's softmax), so it stays inside the decoder."""

    top_k: int = 8
    ngram: int = 2
    include_prompt: bool = False
    resistance: Callable = linear_resistance
    processors: tuple = ()

    def __post_init__(self):
        if self.top_k < 1 or self.ngram < 1:
            raise ValueError(f"top_k and ngram must be >= 1, got {self.top_k}, {self.ngram}")

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        b, p = prompts.shape
        cap = inputs["out_buffer"].shape[1]
        hist = jnp.zeros((b, p + cap), jnp.int32).at[:, :p].set(prompts)
        method = MomentumState(alpha=inputs["momentum"]["alpha"].astype(jnp.float32), hist=hist,
                               hlen=prompt_lens.astype(jnp.int32), plen=prompt_lens.astype(jnp.int32),
                               depth=jnp.zeros((b,), jnp.int32), revisits=jnp.zeros((b,), jnp.int32))
        state = initial_state(prompts, cache, inputs, method, {"model_calls": jnp.ones((), jnp.int32)})
        return self._emit(state, logits)

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._emit(state, logits)

    def _emit(self, state, logits):
        m = state.method
        x = run_processors(with_sampling(self.processors, False), logits.astype(jnp.float32), step_context(state))
        probs = jax.nn.softmax(x, axis=-1)
        p_top, cand = jax.lax.top_k(probs, self.top_k)
        start = jnp.zeros_like(m.plen) if self.include_prompt else m.plen
        # with the prompt excluded, a node needs its whole n-gram inside the generated text
        vis = revisits(m.hist, m.hlen, start, cand, self.ngram)
        if not self.include_prompt:
            vis = vis & (m.hlen - m.plen >= self.ngram - 1)[:, None]
        pen = self.resistance(m.depth + 1, m.alpha)[:, None]
        score = p_top - jnp.where(vis, pen, 0.0)
        j = jnp.argmax(score, axis=-1)
        tok = jnp.take_along_axis(cand, j[:, None], axis=1)[:, 0].astype(jnp.int32)
        chose_visit = jnp.take_along_axis(vis, j[:, None], axis=1)[:, 0]
        live = ~state.done
        b = jnp.arange(state.batch)
        hist = m.hist.at[b, jnp.minimum(m.hlen, m.hist.shape[1] - 1)].set(
            jnp.where(live, tok, m.hist[b, jnp.minimum(m.hlen, m.hist.shape[1] - 1)]))
        method = m.replace(hist=hist, hlen=m.hlen + live.astype(jnp.int32),
                           depth=jnp.where(live, jnp.where(chose_visit, m.depth + 1, 0), m.depth),
                           revisits=m.revisits + (live & chose_visit).astype(jnp.int32))
        return emit_tokens(state.replace(method=method), tok)

    def summarize(self, state):
        return {"momentum_revisits": int(np.asarray(state.method.revisits).sum())}


def momentum_generate(model, params, prompts, *, alpha: float = 0.1, ngram: int = 2, top_k: int = 8,
                      include_prompt: bool = False, resistance: Callable = linear_resistance,
                      max_new_tokens: int = 64, min_new_tokens: int = 0, stop_ids=None,
                      batch_size: Optional[int] = None, tokenizer=None, debug: bool = False,
                      callback=None, processors=None) -> Generation:
    """processors: logits processors (`jaxdec.core.logits`) applied to the raw logits before the
    softmax that the momentum penalty reads."""
    processors = check_processors(processors, "momentum_generate")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha (resistance) must be finite and >= 0, got {alpha!r}")
    dec = Momentum(top_k=int(top_k), ngram=int(ngram), include_prompt=bool(include_prompt), resistance=resistance,
                   processors=processors)

    def extra(inputs, chunk):
        inputs["momentum"] = {"alpha": jnp.full((inputs["max_new"].shape[0],), alpha, jnp.float32)}
        return inputs

    return generate(model, params, prompts, decoder=dec, max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens, stop_ids=stop_ids, batch_size=batch_size, tokenizer=tokenizer,
                    debug=debug, callback=callback, inputs_fn=extra)
