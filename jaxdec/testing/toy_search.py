"""A tiny deterministic model obeying the decoder-model interface, for exact tests of search methods.

`TableModel` scores the next token from a table lookup: with the current token ``x_p`` at position
``p`` and the token before it ``x_{p-1}`` (read back from the KV cache, so cache handling matters),

    logits = A[x_p] + C[x_{p-1}] + D[p]          (C's last row stands for "no previous token")

Its KV cache stores token ids as keys, so reordering, copying and rolling back rows behave exactly as
for a real model. With a few tokens and positions every sequence probability can be enumerated, which
is what brute-force and without-replacement tests need (`sequence_logprob`, `enumerate_sequences`).
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import KVCache, append
from jaxdec.models.interface import ModelOutput


@dataclasses.dataclass(frozen=True)
class TableModel:
    vocab_size: int
    max_position: int = 64
    eos_ids: tuple = (0,)
    num_layers: int = 1

    def init_params(self, seed: int = 0, scale: float = 1.5, prev_scale: float = 1.0) -> dict:
        rng = np.random.default_rng(seed)
        v = self.vocab_size
        return {"A": jnp.asarray(rng.normal(0, scale, (v, v)), jnp.float32),
                "C": jnp.asarray(rng.normal(0, prev_scale, (v + 1, v)), jnp.float32),
                "D": jnp.asarray(rng.normal(0, 0.5, (self.max_position, v)), jnp.float32)}

    def init_cache(self, batch: int, size: int) -> KVCache:
        return KVCache.create(1, batch, size, 1, 1)

    def __call__(self, params, tokens, positions, cache, mask=None, layers=None, logits_at=None,
                 return_layer_hidden: bool = False) -> ModelOutput:
        b, t = tokens.shape
        v = self.vocab_size
        lengths = cache.lengths
        cached_prev = jnp.take_along_axis(cache.k[0, :, 0, :, 0], jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
        cached_prev = jnp.where(lengths > 0, cached_prev.astype(jnp.int32), v)
        prev = jnp.concatenate([cached_prev[:, None], tokens[:, :-1]], axis=1)
        pos = jnp.clip(positions, 0, self.max_position - 1)
        logits = params["A"][tokens] + params["C"][prev] + params["D"][pos]
        kv = tokens.astype(jnp.float32)[None, :, :, None, None]
        cache = append(cache, kv, kv)
        hidden = logits
        if logits_at is not None:
            logits = jnp.take_along_axis(logits, logits_at[:, :, None], axis=1)
        layer_hidden = jnp.stack([hidden, hidden]) if return_layer_hidden else None
        return ModelOutput(logits, hidden, cache, layer_hidden)

    # ---------------------------------------------------------------- exact references (NumPy)
    def next_logprobs(self, params, seq) -> np.ndarray:
        """log p(. | seq) for a full token sequence (prompt + continuation), in float64."""
        a, c, d = (np.asarray(params[k], np.float64) for k in ("A", "C", "D"))
        p = len(seq) - 1
        prev = seq[-2] if len(seq) >= 2 else self.vocab_size
        z = a[seq[-1]] + c[prev] + d[min(p, self.max_position - 1)]
        z = z - z.max()
        return z - np.log(np.exp(z).sum())

    def sequence_logprob(self, params, prompt, cont) -> float:
        seq = list(prompt)
        total = 0.0
        for tok in cont:
            total += float(self.next_logprobs(params, seq)[tok])
            seq.append(tok)
        return total

    def enumerate_sequences(self, params, prompt, max_new: int, stop_ids=None):
        """Every complete continuation (ends in a stop id, or reaches max_new) with its log-probability."""
        stop = set(self.eos_ids if stop_ids is None else stop_ids)
        out = []

        def rec(cont, lp, lps):
            if cont and (cont[-1] in stop or len(cont) == max_new):
                out.append((tuple(cont), lp))
                return
            nxt = self.next_logprobs(params, list(prompt) + cont)
            for tok in range(self.vocab_size):
                rec(cont + [tok], lp + float(nxt[tok]), lps)

        rec([], 0.0, None)
        return out


def all_continuations(vocab_size: int, length: int):
    return itertools.product(range(vocab_size), repeat=length)
