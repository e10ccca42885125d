"""Per-step PRNG keys, derived in one place.

Every output row carries its own key (`jaxdec.core.generate.row_keys`: ``fold_in(fold_in(PRNGKey(seed),
prompt), sample)``), and each step derives its randomness from that key and the row's progress
(``num_new``, the tokens it has emitted) only, so a row's draws never depend on its batch neighbours or on
how many loop steps other rows needed.

* `token_keys`: the key that draws output token number ``num_new`` (token-by-token sampling, CAD, the
  first token of speculative decoding).
* `stream_keys`: a step's key for one of several independent streams (speculative decoding: stream 1
  drafts, stream 2 verifies).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_keys(keys, num_new) -> jax.Array:
    """Raw ``uint32 [B, 2]`` keys -> per-row keys ``fold_in(key_b, num_new_b)`` (raw, ``[B, 2]``)."""
    return jax.vmap(jax.random.fold_in)(keys, num_new)


def stream_keys(keys, num_new, stream: int) -> jax.Array:
    """Raw ``uint32 [B, 2]`` keys -> typed keys ``fold_in(fold_in(key_b, num_new_b), stream)`` ``[B]``."""
    typed = jax.random.wrap_key_data(jnp.asarray(keys).astype(jnp.uint32))
    return jax.vmap(lambda k, t: jax.random.fold_in(jax.random.fold_in(k, t), stream))(typed, num_new)
