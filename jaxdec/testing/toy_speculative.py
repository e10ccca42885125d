"""A tiny context-dependent language model behind the real model interface, for exact and statistical tests.

`TrigramModel`: the logits after a token are ``table[prev, token]`` where ``prev`` is the token before it
*in the row's sequence*. The model stores token ids in its KV cache and finds ``prev`` through the
block mask (tree parent) or the cache (the committed token before the block), so a wrong tree mask,
wrong positions or a wrongly compacted cache change its output, exactly as they would for a
transformer, while a whole speculative run over 100k rows takes seconds. Exact next-token
distributions are available in closed form for the statistical tests.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import KVCache, append
from jaxdec.models.interface import ModelOutput

BOS_PREV = 0  # `prev` of the first token of a sequence


@dataclasses.dataclass(frozen=True)
class TrigramModel:
    vocab_size: int
    eos_ids: tuple = ()
    num_layers: int = 1

    def init_cache(self, batch: int, size: int):
        return KVCache.create(1, batch, size, 1, 1)

    def __call__(self, params, tokens, positions, cache, mask=None, layers=None, logits_at=None,
                 return_layer_hidden: bool = False, hidden_layers=None) -> ModelOutput:
        """``hidden_layers`` (static, counts in [0, 1]): ``layer_hidden [k,B,T,V]``, the one-hot of the
        token itself after 0 layers and of the token before it after 1 (what the table reads)."""
        b, t = tokens.shape
        if mask is None:
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        pred = mask & (positions[:, None, :] == positions[:, :, None] - 1)  # [B,T,T] j precedes i
        in_block = jnp.any(pred, axis=-1)
        prev_blk = jnp.sum(jnp.where(pred, tokens[:, None, :], 0), axis=-1)
        stored = cache.k[0, :, 0, :, 0]  # [B,S] token ids as floats (KVCache: [L,B,KVH,S,D])
        pidx = jnp.clip(positions - 1, 0, stored.shape[1] - 1)
        prev_cache = jnp.take_along_axis(stored, pidx, axis=1).astype(jnp.int32)
        prev = jnp.where(in_block, prev_blk, jnp.where(positions > 0, prev_cache, BOS_PREV))
        logits = params["table"][prev, tokens]  # [B,T,V]
        if layers is not None and "table_skip" in params:
            on = jnp.asarray(layers, bool)[0]
            logits = jnp.where(on, logits, params["table_skip"][prev, tokens])
        kv = tokens.astype(jnp.float32)[None, :, :, None, None]
        cache = append(cache, kv, kv)
        hidden = jax.nn.one_hot(tokens, self.vocab_size)
        layer_hidden = None
        if hidden_layers is not None:
            if not hidden_layers or any(i not in (0, 1) for i in hidden_layers):
                raise ValueError(f"hidden_layers must be layer counts in [0, 1], got {hidden_layers!r}")
            layer_hidden = jnp.stack([hidden if i == 0 else jax.nn.one_hot(prev, self.vocab_size)
                                      for i in hidden_layers])
        if logits_at is not None:
            logits = jnp.take_along_axis(logits, logits_at[:, :, None], axis=1)
        return ModelOutput(logits, hidden, cache, layer_hidden)


def random_table(seed: int, vocab: int, sharpness: float = 2.0) -> np.ndarray:
    """Random trigram logits ``[V, V, V]``."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((vocab, vocab, vocab)) * sharpness).astype(np.float32)


def peaked_trigram(vocab: int, n_prompts: int, seed: int = 0):
    """A toy target whose next token is almost always ``perm[token]`` (a random permutation, +4 logits over
    noise), the learnable pattern of the training tests, with ``n_prompts`` random prompts of 2-5 tokens.
    -> (TrigramModel, params, prompts)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(vocab)
    table = (rng.normal(size=(vocab, vocab, vocab)) * 0.3).astype(np.float32)
    table[:, np.arange(vocab), perm] += 4.0
    params = {"table": jnp.asarray(table), "embed": jnp.eye(vocab, dtype=jnp.float32)}
    prompts = [[int(x) for x in rng.integers(0, vocab, size=int(rng.integers(2, 6)))] for _ in range(n_prompts)]
    return TrigramModel(vocab), params, prompts


def next_probs(table: np.ndarray, prev: int, tok: int, temperature: float = 1.0) -> np.ndarray:
    z = table[prev, tok].astype(np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def exact_joint(table: np.ndarray, prompt, n: int, temperature: float = 1.0) -> np.ndarray:
    """Exact joint distribution ``[V] * n`` of the first n tokens the trigram table generates after
    ``prompt`` (at least two tokens), by enumerating every sequence: the reference the sampling tests
    compare empirical counts with."""
    v = table.shape[-1]
    probs = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, pr in probs.items():
            full = tuple(prompt) + seq
            d = next_probs(table, full[-2], full[-1], temperature)
            for t in range(v):
                nxt[seq + (t,)] = pr * d[t]
        probs = nxt
    arr = np.zeros((v,) * n)
    for seq, pr in probs.items():
        arr[seq] = pr
    return arr
