"""DecodeState: the pytree every decoder's `step` maps to a new DecodeState."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

# finish_reason codes (per row)
RUNNING, EOS, LENGTH, STOP_STRING = 0, 1, 2, 3
FINISH_NAMES = {RUNNING: "running", EOS: "eos", LENGTH: "length", STOP_STRING: "stop_string"}


@struct.dataclass
class DecodeState:
    """State of a batch of B rows being decoded.

    tokens:     [B, N] int32 buffer of new tokens (N = static output capacity), pad after `num_new`.
    num_new:    [B] int32 new tokens written so far (EOS included).
    done:       [B] bool.
    finish:     [B] int32 finish reason code (see FINISH_NAMES).
    last:       [B] int32 the token fed to the model next.
    keys:       [B, 2] uint32 per-row PRNG keys (a row's randomness depends on its own key only).
    cache:      the model's KV cache (per-row lengths).
    max_new:    [B] int32 per-row max_new_tokens (traced: changing it does not recompile).
    min_new:    [B] int32 per-row min_new_tokens.
    stop_ids:   [n] int32 ids that end a row (EOS and user stop ids; may be empty).
    step:       [] int32 loop iterations so far.
    method:     decoder-specific pytree (sampling params, seen-token masks, draft tables, beams ...).
    stats:      dict of counters (model_calls, tokens per call, acceptance ...).
    """

    tokens: jax.Array
    num_new: jax.Array
    done: jax.Array
    finish: jax.Array
    last: jax.Array
    keys: jax.Array
    cache: Any
    max_new: jax.Array
    min_new: jax.Array
    stop_ids: jax.Array
    step: jax.Array
    method: Any = None
    stats: Any = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]


@struct.dataclass
class DecodeInputs:
    """The driver's per-row inputs of one compiled batch of B rows, traced (new values never recompile).

    max_new:    [B] int32 per-row max_new_tokens (0: an inert filler row that emits nothing).
    min_new:    [B] int32 per-row min_new_tokens.
    keys:       [B, 2] uint32 per-row PRNG keys (`jaxdec.core.driver.row_keys`).
    stop_ids:   [n] int32 ids that end a row.
    out_buffer: [B, N] int32 zeros: the output buffer (N = static capacity; decoders read its shape).
    sampling:   a `SamplingParams` with one entry per row, or None (greedy decoders).
    method:     the decoder's own per-row inputs, a flax.struct of its module (`BeamInputs`, `CADInputs`,
                ...), set by its entry point through ``inputs_fn``; None for decoders without any.
    carry:      state carried from a previous batch or run (hot start; speculative drafters read a
                `DrafterCarry`), or None.
    """

    max_new: jax.Array
    min_new: jax.Array
    keys: jax.Array
    stop_ids: jax.Array
    out_buffer: jax.Array
    sampling: Any = None
    method: Any = None
    carry: Any = None

    @property
    def batch(self) -> int:
        return self.max_new.shape[0]

    @property
    def capacity(self) -> int:
        return self.out_buffer.shape[1]


def emit(state: DecodeState, new_tokens: jax.Array) -> DecodeState:
    """Append one token per row (rows already done are untouched) and update done/finish.

    A row stops on a stop id (EOS) or when it reaches `max_new` (stop ids are suppressed before
    `min_new` by `suppress_stops`, so they cannot be chosen early).
    """
    live = ~state.done
    pos = jnp.minimum(state.num_new, state.capacity - 1)
    # an elementwise select, not `tokens.at[arange(B), pos].set(...)`: on a mesh GSPMD cannot tell that row
    # index from the data-axis split and lowers that gather/scatter to collective-permutes and all-gathers
    # that do not depend on the model call. XLA:CPU's 8 simulated devices then ran them and the layer loop's
    # all-reduces in different orders and deadlocked (issue 20, sampling at 2x4). Same tokens.
    col = jnp.arange(state.capacity, dtype=pos.dtype)[None, :]
    tokens = jnp.where((col == pos[:, None]) & live[:, None], new_tokens[:, None].astype(state.tokens.dtype),
                       state.tokens)
    num_new = state.num_new + live.astype(jnp.int32)
    stop_ids = state.stop_ids
    is_stop = jnp.any(new_tokens[:, None] == stop_ids[None, :], axis=-1) if stop_ids.size else jnp.zeros_like(live)
    hit_eos = live & is_stop
    hit_len = live & ~hit_eos & (num_new >= state.max_new)
    finish = jnp.where(hit_eos, EOS, jnp.where(hit_len, LENGTH, state.finish))
    return state.replace(tokens=tokens, num_new=num_new, done=state.done | hit_eos | hit_len, finish=finish,
                         last=jnp.where(live, new_tokens, state.last))
