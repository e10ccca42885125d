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
from jaxdec.masks import BANNED_LOGIT


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
class MomentumInputs:
    """Per-row inputs (traced): ``alpha [B]`` float32 strength of the revisit penalty."""

    alpha: jax.Array


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
class MomentumPenalty:
    """The momentum penalty as a logits processor: it reads the softmax of the scores the processors
    before it produced, keeps the ``top_k`` most probable tokens, scores each ``p(v) - R(depth + 1)`` where
    choosing v revisits an n-gram node (``p(v)`` elsewhere), and gives every other token -inf; the
    decoder takes the argmax. ``ctx.method`` is the row's `MomentumState` (text so far, loop depth, alpha).
    Placed last in the chain (after the warpers: it needs the final distribution)."""

    top_k: int = 8
    ngram: int = 2
    include_prompt: bool = False
    resistance: Callable = linear_resistance
    stage = "warp"
    host = False

    def visits(self, m, cand):
        """[B, k] bool: appending ``cand [B, k]`` revisits a node of the row's graph."""
        start = jnp.zeros_like(m.plen) if self.include_prompt else m.plen
        vis = revisits(m.hist, m.hlen, start, cand, self.ngram)
        if not self.include_prompt:  # with the prompt excluded, a node needs its whole n-gram generated
            vis = vis & (m.hlen - m.plen >= self.ngram - 1)[:, None]
        return vis

    def __call__(self, logits, ctx):
        if logits.shape[1] != 1:
            raise ValueError(f"MomentumPenalty scores one position per row (a token-by-token step), got a block "
                             f"of {logits.shape[1]}")
        m = ctx.method
        x = logits[:, 0]
        p_top, cand = jax.lax.top_k(jax.nn.softmax(x, axis=-1), self.top_k)
        pen = self.resistance(m.depth + 1, m.alpha)[:, None]
        score = p_top - jnp.where(self.visits(m, cand), pen, 0.0)
        score = jnp.where(p_top > 0, score, BANNED_LOGIT)  # a banned candidate (fewer than top_k allowed) stays banned
        out = jnp.full_like(x, BANNED_LOGIT).at[jnp.arange(x.shape[0])[:, None], cand].set(score.astype(x.dtype))
        return out[:, None]


@dataclasses.dataclass(frozen=True)
class Momentum:
    """top_k candidates, n-gram nodes of size `ngram`; include_prompt: the prompt's n-grams are part of
    the graph. ``inputs.method.alpha`` per row (traced).

    processors: the user's logits processors, run after min_new suppression in stage order on the raw
    logits; `MomentumPenalty` comes last in the same chain (it reads the final distribution) and the
    decoder takes the argmax of what it returns."""

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
        cap = inputs.out_buffer.shape[1]
        hist = jnp.zeros((b, p + cap), jnp.int32).at[:, :p].set(prompts)
        method = MomentumState(alpha=inputs.method.alpha.astype(jnp.float32), hist=hist,
                               hlen=prompt_lens.astype(jnp.int32), plen=prompt_lens.astype(jnp.int32),
                               depth=jnp.zeros((b,), jnp.int32), revisits=jnp.zeros((b,), jnp.int32))
        state = initial_state(prompts, cache, inputs, method, {"model_calls": jnp.ones((), jnp.int32)})
        return self._emit(state, logits)

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._emit(state, logits)

    @property
    def penalty(self) -> MomentumPenalty:
        return MomentumPenalty(self.top_k, self.ngram, self.include_prompt, self.resistance)

    def _emit(self, state, logits):
        m = state.method
        chain = with_sampling(self.processors, False) + (self.penalty,)
        x = run_processors(chain, logits.astype(jnp.float32), step_context(state, method=m))
        tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
        chose_visit = self.penalty.visits(m, tok[:, None])[:, 0]
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
                      callback=None, processors=None, constraint=None) -> Generation:
    """processors: logits processors (`jaxdec.core.logits`) applied to the raw logits before the
    softmax that the momentum penalty reads. constraint: a `jaxdec.constrained` constraint (or one per
    prompt; needs ``tokenizer=``), the first of those processors; ``constraint_ok`` per row."""
    processors = check_processors(processors, "momentum_generate")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha (resistance) must be finite and >= 0, got {alpha!r}")
    dec = Momentum(top_k=int(top_k), ngram=int(ngram), include_prompt=bool(include_prompt), resistance=resistance,
                   processors=processors)

    def extra(inputs, chunk):
        return inputs.replace(method=MomentumInputs(alpha=jnp.full((inputs.batch,), alpha, jnp.float32)))

    return generate(model, params, prompts, decoder=dec, max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens, stop_ids=stop_ids, batch_size=batch_size, tokenizer=tokenizer,
                    debug=debug, callback=callback, inputs_fn=extra, constraint=constraint)
