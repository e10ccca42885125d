"""Drawing tokens from processed logits, one PRNG key per row.

``sample`` runs ``processors.process`` (HF's processor order) and then, per row:
* temperature 0: ``argmax`` of the (repetition-penalized) logits, lowest index on ties;
* otherwise: ``jax.random.categorical`` (Gumbel-max) on the processed logits with **that row's own
  key**, vmapped over rows, so a row's draw never depends on its batch neighbours.

When every sampling row keeps at most DRAW_CANDIDATES[-1] tokens (top-k / top-p / min-p leave a few dozen),
the Gumbel noise is computed only at the kept tokens (``gumbel_at``: JAX's own threefry counter, bits and
float conversion at those indices) instead of at all V: **the same tokens** as ``jax.random.categorical``
over the whole row, bit for bit (tested), at a tenth of its cost at V = 49152. Rows that keep more take the
full draw (a ``lax.cond``), and so does everything when JAX's key implementation or Gumbel mode is not the
one this reproduces (threefry2x32, partitionable, low-range Gumbel; checked at trace time).

Keys are typed PRNG keys ``[B]`` or raw ``uint32[B, 2]`` (threefry) key data.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxdec.core import reduce as reduce_lib
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


# Kept-set sizes (powers of two) for which the draw looks only at the kept tokens; tried in order.
DRAW_CANDIDATES = (128, 1024)


def gumbel_reproducible(keys) -> bool:
    """Whether ``gumbel_at`` reproduces ``jax.random.gumbel`` for these keys (checked at trace time)."""
    try:
        impl = str(jax.random.key_impl(keys))
    except Exception:  # noqa: BLE001 - an unknown key type: take the full draw
        return False
    return (bool(jax.config.jax_threefry_partitionable) and not bool(jax.config.jax_high_dynamic_range_gumbel)
            and "threefry2x32" in impl)


def gumbel_at(key, idx) -> jax.Array:
    """float32 ``jax.random.gumbel(key, (V,))[idx]`` for one typed threefry key and int indices ``idx``
    (any V > max(idx)), computed at ``idx`` only: with partitionable threefry the bits of element i are
    ``threefry2x32(key, (0, i))`` folded by xor, then JAX's uniform in ``[tiny, 1)`` and ``-log(-log u)``
    (jax/_src/random: ``_threefry_random_bits_partitionable``, ``_uniform``, ``_gumbel`` mode "low")."""
    from jax.extend.random import threefry2x32_p
    kd = jax.random.key_data(key)
    b1, b2 = threefry2x32_p.bind(kd[0], kd[1], jnp.zeros(idx.shape, jnp.uint32), idx.astype(jnp.uint32))
    bits = b1 ^ b2
    fb = lax.shift_right_logical(bits, jnp.uint32(32 - 23)) | jnp.uint32(0x3F800000)
    floats = lax.bitcast_convert_type(fb, jnp.float32) - jnp.float32(1.0)
    tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
    u = lax.max(tiny, floats * (jnp.float32(1.0) - tiny) + tiny)
    return -jnp.log(-jnp.log(u))


def _draw_among(keys, x, kc: int):
    """``categorical`` per row when each row's finite entries are among its ``kc`` largest: the Gumbel
    noise at those only; ties of the perturbed values go to the lowest index, as ``argmax`` does."""
    vals, idx = lax.top_k(x, kc)

    def one(key, v, i):
        s = v + gumbel_at(key, i)
        return jnp.min(jnp.where(s == jnp.max(s), i, x.shape[-1]))

    return jax.vmap(one)(keys, vals, idx).astype(jnp.int32)


def sample_processed(keys, processed, greedy) -> jax.Array:
    """Draw from already processed logits ``[B, V]``: argmax where ``greedy [B]``, else categorical
    with the row's key (the same tokens whichever of the full or kept-token draws runs). Returns int32 ``[B]``."""
    keys = as_row_keys(keys)
    processed = jnp.asarray(processed, jnp.float32)
    greedy = jnp.asarray(greedy, bool)
    argmax = reduce_lib.argmax(processed)

    def draw(x):
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)

    tiers = [c for c in DRAW_CANDIDATES if c < processed.shape[-1]] if gumbel_reproducible(keys) else []
    kept = jnp.max(jnp.where(greedy, 0, jnp.sum(processed > -jnp.inf, axis=-1))) if tiers else None

    def drawn_from(i, x):
        if i == len(tiers):
            return draw(x)
        return lax.cond(kept <= tiers[i], lambda y: _draw_among(keys, y, tiers[i]), lambda y: drawn_from(i + 1, y), x)

    drawn = lax.cond(jnp.all(greedy), lambda x: argmax, lambda x: drawn_from(0, x), processed)
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
