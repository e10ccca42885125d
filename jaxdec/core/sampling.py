"""Drawing tokens from processed logits, one PRNG key per row.

``sample`` runs ``processors.process`` (HF's processor order) and then, per row:
* temperature 0: ``argmax`` of the (repetition-penalized) logits, lowest index on ties;
* otherwise: ``jax.random.categorical`` (Gumbel-max) on the processed logits with **that row's own
  key**, vmapped over rows, so a row's draw never depends on its batch neighbours.

Keys are typed PRNG keys ``[B]`` or raw ``uint32[B, 2]`` (threefry) key data.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxdec.core.processors import SamplingParams, process

__all__ = ["sample", "sample_processed", "as_row_keys", "row_keys", "log_probs", "token_logprobs",
           "entropy"]


def as_row_keys(keys) -> jax.Array:
    """Typed key array ``[B]`` from typed keys or raw ``uint32[B, 2]`` key data."""
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if keys.ndim != 1:
            raise ValueError(f"expected one key per row, got key array of shape {keys.shape}")
        return keys
    if keys.ndim != 2 or keys.shape[-1] != 2:
        raise ValueError(f"raw keys must be uint32[B, 2], got shape {keys.shape}")
    return jax.random.wrap_key_data(keys.astype(jnp.uint32))


def row_keys(key, row_ids, step) -> jax.Array:
    """Per-row key for decode step ``step``: ``fold_in(fold_in(key, row_id), step)``. Depends only on
    the row's id and the step, never on the batch it is in."""
    key = key if jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(
        jnp.asarray(key, jnp.uint32))
    row_ids = jnp.asarray(row_ids, jnp.int32)
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), row_ids.shape)
    return jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(key, r), s))(row_ids, step)


def sample_processed(keys, processed, greedy) -> jax.Array:
    """Draw from already processed logits ``[B, V]``: argmax where ``greedy [B]``, else categorical
    with the row's key. Returns int32 ``[B]``."""
    keys = as_row_keys(keys)
    processed = jnp.asarray(processed, jnp.float32)
    greedy = jnp.asarray(greedy, bool)
    argmax = jnp.argmax(processed, axis=-1).astype(jnp.int32)

    def draw(x):
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)

    drawn = lax.cond(jnp.all(greedy), lambda x: argmax, draw, processed)
    return jnp.where(greedy, argmax, drawn)


def sample(keys, logits, params: SamplingParams, seen_mask: Optional[jax.Array] = None) -> jax.Array:
    """Next token per row: int32 ``[B]``.

    keys: ``[B]`` typed keys or ``uint32[B, 2]``; logits ``[B, V]``; params: per-row
    ``SamplingParams``; seen_mask: bool ``[B, V]`` (or token history ``[B, T]``) for the repetition
    penalty. Rows with temperature 0 are greedy (argmax, lowest index on ties)."""
    x = process(logits, params, seen_mask)
    greedy = jnp.asarray(params.temperature) <= 0
    return sample_processed(keys, x, greedy)


def log_probs(logits) -> jax.Array:
    """float32 ``log_softmax`` over the vocabulary (``-inf`` stays ``-inf``)."""
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def token_logprobs(logits, tokens) -> jax.Array:
    """``log softmax(logits)[b, tokens[b]]`` for ``logits [B, V]``, ``tokens [B]`` (or ``[..., V]`` with
    ``tokens [...]``). Pass processed logits for the log-probability under the sampling distribution."""
    lp = log_probs(logits)
    return jnp.take_along_axis(lp, jnp.asarray(tokens, jnp.int32)[..., None], axis=-1)[..., 0]


def entropy(logits) -> jax.Array:
    """Entropy (nats) of ``softmax(logits)`` per row; masked (``-inf``) entries contribute 0."""
    lp = log_probs(logits)
    p = jnp.exp(lp)
    return -jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1)
