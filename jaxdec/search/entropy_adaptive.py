"""Entropy-adaptive decoding (EAD, 2025): switch between a small and a large model on rolling entropy.

The small model is the large one truncated to its first ``small_layers`` layers (an early exit through
the traced ``layers`` mask, so both share weights and one compiled program). After each token the
entropy of the distribution that produced it enters a rolling window; when the window's mean exceeds
``threshold`` the next step uses the large model, otherwise the small one.

KV consistency. A small step writes valid keys/values only for the layers it runs (the skipped layers
get zeros). Those positions are therefore *pending*: the next large step rolls the cache back to the
first pending position and runs the pending tokens plus the new one as one block through all layers
(a block of ``sync + 1`` tokens, padded), which rewrites them correctly and yields the large model's
next-token logits; on a memory-bound decode a short block costs about as much as one token. At most
``sync`` small steps run in a row: then a large step is forced. Every large step therefore sees
exactly the full model's cache, and every small step the small model's (its layers' KV are always
valid), so each token equals what that model would produce on the whole sequence.

The mode is chosen per batch: if any live row asks for the large model (or must sync), all rows take
a large step (a row never gets a worse model than it asked for). Greedy choice; threshold is a traced
per-row input. threshold = -inf: always the large model (greedy decoding); +inf: small steps with a
forced large step every ``sync + 1`` tokens.

Host entry: `entropy_adaptive_generate(model, params, prompts, small_layers=..., threshold=...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.cache.kv import rollback
from jaxdec.core.generate import Generation, generate
from jaxdec.core.steps import emit_tokens, initial_state, prefill, suppress_stops


def entropy_of(logits):
    lp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(lp > -jnp.inf, jnp.exp(lp) * lp, 0.0), axis=-1)


@struct.dataclass
class EADInputs:
    """Per-row inputs (traced): ``threshold [B]`` float32 entropy above which the large model runs."""

    threshold: jax.Array


@struct.dataclass
class EADState:
    """`EntropyAdaptive`'s method state; B rows, P prompt width, C output capacity, W = window.

    threshold:  [B] float32 rolling mean entropy above which the next step takes the large model.
    hist:       [B, P + C + sync + 1] int32 each row's prompt then its output (large steps re-run the
                pending tail from it).
    hlen:       [B] int32 valid entries of ``hist``.
    pending:    [B] int32 positions written by small steps since the last large step.
    ents:       [B, W] float32 the last W steps' entropies, newest last.
    n_ent:      [B] int32 valid entries of ``ents`` (at most W).
    large_next: [B] bool the row asks for the large model next.
    """

    threshold: jax.Array
    hist: jax.Array
    hlen: jax.Array
    pending: jax.Array
    ents: jax.Array
    n_ent: jax.Array
    large_next: jax.Array


@dataclasses.dataclass(frozen=True)
class EntropyAdaptive:
    small_layers: int = 8
    window: int = 4
    sync: int = 8

    def __post_init__(self):
        if self.small_layers < 0 or self.window < 1 or self.sync < 0:
            raise ValueError(f"bad EAD config small_layers={self.small_layers} window={self.window} sync={self.sync}")

    @property
    def cache_headroom(self) -> int:  # a large step writes a block of sync + 1 positions
        return self.sync + 1

    def small_mask(self, model):
        return jnp.arange(model.num_layers) < self.small_layers

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        if self.small_layers > model.num_layers:
            raise ValueError(f"small_layers ({self.small_layers}) exceeds the model's {model.num_layers} layers")
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)  # the prompt: large model
        b, p = prompts.shape
        cap = inputs.out_buffer.shape[1]
        method = EADState(threshold=inputs.method.threshold.astype(jnp.float32),
                          hist=jnp.zeros((b, p + cap + self.sync + 1), jnp.int32).at[:, :p].set(prompts),
                          hlen=prompt_lens.astype(jnp.int32), pending=jnp.zeros((b,), jnp.int32),
                          ents=jnp.zeros((b, self.window), jnp.float32), n_ent=jnp.zeros((b,), jnp.int32),
                          large_next=jnp.zeros((b,), bool))
        stats = {"model_calls": jnp.ones((), jnp.int32), "large_steps": jnp.zeros((), jnp.int32),
                 "small_steps": jnp.zeros((), jnp.int32)}
        state = initial_state(prompts, cache, inputs, method, stats)
        return self._emit(state, logits)

    def step(self, model, params, state):
        m = state.method
        live = ~state.done
        cache = state.cache
        length = cache.lengths
        w = self.sync + 1
        large = jnp.any(live & (m.large_next | (m.pending >= self.sync)))

        def large_step(_):
            start = length - m.pending
            idx = start[:, None] + jnp.arange(w)[None, :]
            block = jnp.take_along_axis(m.hist, jnp.clip(idx, 0, m.hist.shape[1] - 1), axis=1)
            out = model(params, block, idx.astype(jnp.int32), rollback(cache, start),
                        logits_at=m.pending[:, None])
            return out.logits[:, 0], rollback(out.cache, length + 1), jnp.zeros_like(m.pending)

        def small_step(_):
            out = model(params, state.last[:, None], length[:, None], cache, layers=self.small_mask(model))
            return out.logits[:, 0], out.cache, m.pending + 1

        logits, new_cache, pending = jax.lax.cond(large, large_step, small_step, None)
        new_cache = rollback(new_cache, jnp.where(live, new_cache.lengths, length))
        method = m.replace(pending=jnp.where(live, pending, m.pending))
        st = state.stats
        stats = {**st, "model_calls": st["model_calls"] + 1,
                 "large_steps": st["large_steps"] + large.astype(jnp.int32),
                 "small_steps": st["small_steps"] + (~large).astype(jnp.int32)}
        state = state.replace(cache=new_cache, step=state.step + 1, method=method, stats=stats)
        return self._emit(state, logits)

    def _emit(self, state, logits):
        m = state.method
        logits = suppress_stops(logits.astype(jnp.float32), state)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        live = ~state.done
        ent = entropy_of(logits)
        ents = jnp.where(live[:, None], jnp.concatenate([m.ents[:, 1:], ent[:, None]], axis=1), m.ents)
        n_ent = jnp.minimum(m.n_ent + live.astype(jnp.int32), self.window)
        valid = jnp.arange(self.window)[None, :] >= (self.window - n_ent)[:, None]
        mean = jnp.sum(jnp.where(valid, ents, 0.0), axis=1) / jnp.maximum(n_ent, 1)
        b = jnp.arange(state.batch)
        hist = m.hist.at[b, m.hlen].set(jnp.where(live, tok, m.hist[b, m.hlen]))
        method = m.replace(ents=ents, n_ent=n_ent, large_next=mean > m.threshold, hist=hist,
                           hlen=m.hlen + live.astype(jnp.int32))
        return emit_tokens(state.replace(method=method), tok)

    def summarize(self, state):
        large = int(np.asarray(state.stats["large_steps"]))
        small = int(np.asarray(state.stats["small_steps"]))
        return {"large_steps": large, "small_steps": small,
                "large_fraction": large / max(1, large + small)}


def entropy_adaptive_generate(model, params, prompts, *, small_layers: int, threshold: float = 2.0,
                              window: int = 4, sync: int = 8, max_new_tokens: int = 64, min_new_tokens: int = 0,
                              stop_ids=None, batch_size: Optional[int] = None, tokenizer=None, debug: bool = False,
                              callback=None) -> Generation:
    """Greedy EAD; ``stats["large_fraction"]`` is the share of decode steps that ran the large model."""
    if np.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    dec = EntropyAdaptive(small_layers=int(small_layers), window=int(window), sync=int(sync))

    def extra(inputs, chunk):
        return inputs.replace(method=EADInputs(threshold=jnp.full((inputs.batch,), threshold, jnp.float32)))

    return generate(model, params, prompts, decoder=dec, max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens, stop_ids=stop_ids, batch_size=batch_size, tokenizer=tokenizer,
                    debug=debug, callback=callback, inputs_fn=extra)
