"""The one host driver: validation, bucketing, cache sizing, keys, batching and the compiled loop for every
method. `jaxdec.generate` (token decoders, speculative decoding, CAD, first-finish ...) and the search
entry points (`jaxdec.search.common.run_grouped`: beam search, stochastic beam, ...) both call `run`;
each then assembles its own outputs from the final states.

Units and rows: the driver batches *units*, one prompt each. A unit is one state row for decoders that
see each row's prompt (``expand=1``: `generate`, where n samples of a prompt are n units), or ``expand``
state rows for decoders that prefill a prompt once and expand it into hypotheses themselves (beam search).
A compiled batch holds ``batch_size`` units; the last is padded with inert units (``max_new = 0``,
the first unit's prompt and key) so every batch reuses one program. Row keys are `row_keys(seed,
prompts, rows per prompt)`, prompt-major, so a row's randomness never depends on its batch.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import bucket, need_size
from jaxdec.core import loop
from jaxdec.core.protocols import check_decoder, check_model, hook
from jaxdec.core.state import DecodeInputs


def _check_prompts(prompts, vocab_size: int) -> list:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise TypeError(f"prompts[{i}] is a {type(p).__name__}: give token ids (e.g. tokenizer.encode(text))")
        if not isinstance(p, list):
            a = np.asarray(p)
            if a.size and a.dtype.kind not in "iu":  # floats are refused, never floored
                raise TypeError(f"prompts[{i}] holds {a.dtype} values: token ids must be integers")
            p = list(a.reshape(-1))
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = next((t for t in p if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer))), None)
        if bad is not None:
            raise TypeError(f"prompts[{i}] holds a non-integer token id {bad!r} ({type(bad).__name__}): token ids "
                            f"must be integers")
        if any(t < 0 or t >= vocab_size for t in p):
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")
        out.append([int(t) for t in p])
    return out


def _positive_int(name, v, allow_zero=False):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {v!r}")
    return int(v)


def row_keys(seed: int, n_prompts: int, n: int) -> np.ndarray:
    """Key of output row (prompt i, sample j) = fold_in(fold_in(PRNGKey(seed), i), j): a row's
    randomness never depends on which other rows share its batch."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
    if not -2 ** 63 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must be a 64-bit signed integer (-2**63 <= seed < 2**63), got {seed}")
    base = jax.random.PRNGKey(int(seed))
    per = jax.vmap(lambda i: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(base, i), j))(
        jnp.arange(n, dtype=jnp.uint32)))(jnp.arange(n_prompts, dtype=jnp.uint32))  # one call, any count
    return np.asarray(per).reshape(n_prompts * n, -1).astype(np.uint32)


def pad_batch(rows: list, length: int, pad_id: int) -> tuple:
    arr = np.full((len(rows), length), pad_id, np.int32)
    lens = np.zeros((len(rows),), np.int32)
    for r, p in enumerate(rows):
        arr[r, :len(p)] = p
        lens[r] = len(p)
    return arr, lens


def batch_inputs(bs: int, max_new: int, min_new: int, keys, stop, cap: int, sampling=None) -> DecodeInputs:
    """The driver's `DecodeInputs` for a compiled batch of ``bs`` rows whose first ``len(keys)`` rows are
    real: ``max_new`` (0 for the inert filler rows, which repeat the first row's key and sampling
    parameters), ``min_new``, ``keys [bs, 2]``, ``stop_ids``, the output buffer ``[bs, cap]`` and, with
    ``sampling`` (a `SamplingParams` of the real rows), the rows' sampling parameters."""
    real = len(keys)
    mx = np.array([max_new] * real + [0] * (bs - real), np.int32)
    kb = np.concatenate([keys, np.repeat(keys[:1], bs - real, 0)])
    sp = None
    if sampling is not None:
        sp = jax.tree.map(
            lambda a: jnp.asarray(np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1], bs - real, 0)])),
            sampling)
    return DecodeInputs(max_new=jnp.asarray(mx), min_new=jnp.full((bs,), min_new, jnp.int32), keys=jnp.asarray(kb),
                        stop_ids=jnp.asarray(np.array(stop, np.int32)), out_buffer=jnp.zeros((bs, cap), jnp.int32),
                        sampling=sp)


def prefix_groups(rows: list, bs: int, n: int) -> int:
    """How many shared-prefix groups each compiled batch of ``bs`` rows splits into: 1 when every
    batch holds one prompt, ``bs // n`` when batches are whole prompts of n consecutive rows each, 0
    when neither (filler rows repeat a batch's first row, as `generate` pads)."""
    batches = []
    for s in range(0, len(rows), bs):
        chunk = rows[s:s + bs]
        batches.append([tuple(r) for r in chunk + [chunk[0]] * (bs - len(chunk))])
    if all(len(set(b)) == 1 for b in batches):
        return 1
    if n > 1 and bs % n == 0 and all(len(set(b[i:i + n])) == 1 for b in batches for i in range(0, bs, n)):
        return bs // n
    return 0


def use_shared_prefix(shared_prefix, model, decoder, groups: int, rows_per_group: int, mesh=None) -> bool:
    """Decide whether a run uses a shared-prefix (Hydragen) cache.

    ``groups`` is the number of prefix groups per batch (0: the rows cannot be grouped by prompt).
    ``shared_prefix=None`` (auto) picks Hydragen when the rows group by prompt, a group has more than
    one row, the decoder opts in (``shared_prefix_ok``), the model accepts such a cache
    (``supports_shared_prefix``) and no mesh is given. ``True`` forces it (a ValueError names what
    prevents it); ``False`` forces the ordinary cache.
    """
    if shared_prefix is None:
        return bool(groups > 0 and rows_per_group > 1 and hook(decoder, "shared_prefix_ok")
                    and hook(model, "supports_shared_prefix") and mesh is None)
    if not isinstance(shared_prefix, (bool, np.bool_)):
        raise ValueError(f"shared_prefix must be None (auto), True or False, got {shared_prefix!r}")
    if not shared_prefix:
        return False
    why = None
    if groups <= 0:
        why = ("the rows of a batch do not group by prompt (give one prompt, or a batch_size that is a "
               "multiple of n)")
    elif not hook(model, "supports_shared_prefix"):
        why = f"the model ({type(model).__name__}) does not accept a shared-prefix cache"
    elif not hook(decoder, "shared_prefix_ok"):
        why = f"the decoder ({type(decoder).__name__}) does not support a shared-prefix cache"
    elif mesh is not None:
        why = "a mesh is given (sharded runs use the ordinary cache)"
    if why:
        raise ValueError(f"shared_prefix=True but {why}")
    return True


def shared_prefix_sizes(p_bucket: int, cap: int, extra: int, cache_size: Optional[int]) -> tuple:
    """(prefix slots, suffix slots) of a shared-prefix cache: the prompt bucket, and the new tokens
    (+ decoder headroom) bucketed by 16; a given ``cache_size`` counts both."""
    if cache_size is None:
        return p_bucket, bucket(cap + extra, 16)
    suffix = cache_size - p_bucket
    if suffix < cap + extra:
        raise ValueError(f"cache_size ({cache_size}) too small for a shared-prefix cache: prompt bucket "
                         f"{p_bucket} + {cap + extra} new-token slots")
    return p_bucket, suffix


@dataclasses.dataclass
class Run:
    """What `run` returns: the final state of each compiled batch with its number of real units, and the
    layout it chose."""

    units: list  # the validated prompt of each unit
    results: list  # [(final DecodeState, real units in that batch)]
    cache_size: int
    prompt_bucket: int
    capacity: int
    batch_size: int  # units per compiled batch
    shared_prefix: bool
    prefix_groups: int
    model_calls: int
    loop_steps: int
    seconds: float
    # order[i]: the unit (index into ``units``) that is the i-th row of the batches in ``results``, in
    # batch order (identity unless `run` sorted the units by length); see `positions`
    order: Optional[list] = None

    def positions(self) -> list:
        """(batch index into ``results``, row in that batch) of every unit, in the order of ``units``."""
        order = list(range(len(self.units))) if self.order is None else self.order
        pos = [None] * len(order)
        for i, u in enumerate(order):
            pos[u] = (i // self.batch_size, i % self.batch_size)
        return pos


def batch_cost(lengths: list, ub: int) -> int:
    """Work proxy of batches of ``ub`` consecutive rows: the sum of each batch's longest prompt (the
    chunked prefill's trip count and the blockwise attention's both follow a batch's longest row)."""
    return sum(max(lengths[s:s + ub]) for s in range(0, len(lengths), ub))


def length_order(units: list, ub: int, n: int) -> list:
    """Unit order that batches prompts of similar length together (longest first; the n units of a prompt
    stay together, so shared-prefix groups are kept), or the identity when that does not lower
    `batch_cost`."""
    ident = list(range(len(units)))
    if ub >= len(units):
        return ident
    prompts = sorted(range(len(units) // n), key=lambda i: -len(units[i * n]))  # stable: ties keep their order
    cand = [i * n + j for i in prompts for j in range(n)]
    lens = [len(u) for u in units]
    if batch_cost([lens[u] for u in cand], ub) < batch_cost(lens, ub):
        return cand
    return ident


def run(decoder, model, params, units, *, expand: int = 1, samples_per_prompt: int = 1, max_new_tokens: int,
        min_new_tokens: int = 0, stop_ids=None, seed: int = 0, batch_size: Optional[int] = None,
        cache_size: Optional[int] = None, capacity: Optional[int] = None, sampling=None, debug: bool = False,
        callback=None, progress=None, inputs_fn=None, mesh=None, shared_prefix: Optional[bool] = None,
        carry=None, hot_start: bool = False, longest_prompt: Optional[int] = None,
        sort_by_length: bool = False) -> Run:
    """Decode ``units`` (token-id prompts, validated here) with ``decoder``.

    expand: state rows per unit (the decoder expands a prompt into that many hypotheses).
    samples_per_prompt: consecutive units that repeat one prompt (`generate`'s n): keys are those of
    (prompt, sample) and shared-prefix groups follow them.
    sampling: a `SamplingParams` with one entry per state row (sliced per batch into ``inputs["sampling"]``).
    inputs_fn(inputs, chunk_units) -> inputs: the decoder's own per-row inputs (``inputs.replace(method=...)``).
    carry: ``inputs.carry`` of the first batch (e.g. a `DrafterCarry`). hot_start: each later batch starts
    from the decoder's ``carry(state)`` of the batch before (Token Recycling's matrix, n-gram tables).
    longest_prompt: size the prompt bucket and the cache as if the longest prompt had (at least) this many
    tokens: a caller that splits one prompt list over several calls (the CLI's ``--batch-size`` batches)
    passes the whole list's longest, so every call reuses one compiled program.
    sort_by_length: with several batches, run the units longest first when that lowers `batch_cost` (rows
    of similar length share a batch; a prompt's n samples stay together); ``Run.order`` records the
    order and ``Run.positions()`` maps each unit back to its batch row, so callers keep the input order.
    Not with ``inputs_fn``, ``carry`` or ``hot_start`` (their per-batch inputs follow the input order).
    """
    units = _check_prompts(units, model.vocab_size)
    r = _positive_int("rows_per_prompt", expand)
    n = _positive_int("n", samples_per_prompt)
    max_new = _positive_int("max_new_tokens", max_new_tokens)
    min_new = _positive_int("min_new_tokens", min_new_tokens, allow_zero=True)
    ub = len(units) if batch_size is None else _positive_int("batch_size", batch_size)
    ub = min(ub, len(units))
    stop = tuple(model.eos_ids) if stop_ids is None else tuple(int(s) for s in stop_ids)
    check_model(model)
    check_decoder(decoder)
    pmax = max(len(p) for p in units)
    if longest_prompt is not None:
        pmax = max(pmax, _positive_int("longest_prompt", longest_prompt))
    # sized by need: above 512 positions, multiples of the model's prefill chunk (None: powers of two)
    chunk = getattr(model, "prefill_chunk", None)
    p_bucket = need_size(pmax, chunk)
    cap = capacity or bucket(max_new, 16)
    if cap < max_new:
        raise ValueError(f"capacity ({cap}) is smaller than max_new_tokens ({max_new})")
    extra = int(hook(decoder, "cache_headroom"))
    if r > 1:  # one prefix group per prompt of the batch, r rows each
        groups, per_group = ub, r
    else:
        groups = prefix_groups(units, ub, n)
        per_group = ub // max(groups, 1)
    shared = use_shared_prefix(shared_prefix, model, decoder, groups, per_group, mesh)
    prefix_size = None
    if shared:
        prefix_size, size = shared_prefix_sizes(p_bucket, cap, extra, cache_size)
    else:
        size = cache_size or need_size(p_bucket + cap + extra, chunk)
    needed = pmax + max_new + extra
    if needed > size + (prefix_size or 0) or p_bucket > size + (prefix_size or 0):
        raise ValueError(f"prompt too long for the cache: longest prompt ({pmax} tokens) + max_new_tokens "
                         f"({max_new}) needs {needed} positions, cache_size is {size}")
    max_pos = hook(model, "max_position")
    if max_pos is not None and needed > max_pos:
        raise ValueError(f"prompt + max_new_tokens = {needed} exceeds the model's context ({max_pos})")
    keys = row_keys(seed, len(units) // n, n * r)
    if mesh is not None:
        from jaxdec import sharding
        if ub * r % mesh.shape[sharding.DATA]:
            raise ValueError(f"batch_size ({ub * r}) must be a multiple of the mesh's data axis "
                             f"({mesh.shape[sharding.DATA]})")
        params = sharding.shard_params(params, mesh, model)
        if dataclasses.is_dataclass(model) and getattr(model, "matmul_impl", "xla") is None:
            model = dataclasses.replace(model, matmul_impl="xla")  # shardable dots, not custom calls
        if getattr(model, "attention_impl", None) == "pallas" and hasattr(model, "attention_mesh"):
            model = dataclasses.replace(model, attention_mesh=mesh)  # the kernel per device under shard_map

    pad_id = int(hook(model, "pad_id"))
    order = list(range(len(units)))
    if sort_by_length and inputs_fn is None and carry is None and not hot_start:
        order = length_order(units, ub, n)
    batched = units
    if order != list(range(len(units))):
        batched = [units[u] for u in order]
        rows_of = np.asarray([u * r + j for u in order for j in range(r)])
        keys = keys[rows_of]
        if sampling is not None:
            sampling = jax.tree.map(lambda a: np.asarray(a)[rows_of] if np.ndim(a) and np.shape(a)[0] == len(rows_of)
                                    else a, sampling)
    results, calls, steps = [], 0, 0
    t0 = time.perf_counter()
    starts = range(0, len(units), ub)
    if progress is not None:
        starts = progress(starts)
    for start in starts:
        chunk = batched[start:start + ub]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (ub - real)  # inert filler units keep shapes static
        toks, lens = pad_batch(chunk, p_bucket, pad_id)
        sl = None if sampling is None else jax.tree.map(lambda a: np.asarray(a)[start * r:(start + real) * r],
                                                        sampling)
        inputs = batch_inputs(ub * r, max_new, min_new, keys[start * r:(start + real) * r], stop, cap, sl)
        if inputs_fn is not None:
            inputs = inputs_fn(inputs, chunk)
            if not isinstance(inputs, DecodeInputs):
                raise TypeError(f"inputs_fn must return a DecodeInputs (e.g. inputs.replace(method=...)), got "
                                f"{type(inputs).__name__}")
        if carry is not None:
            inputs = inputs.replace(carry=carry)
        toks, lens = jnp.asarray(toks), jnp.asarray(lens)
        if mesh is not None:
            toks, lens, inputs = sharding.shard_rows((toks, lens, inputs), mesh)
            inputs = inputs.replace(stop_ids=jax.device_put(
                inputs.stop_ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
        if debug:
            state = loop.run_debug(decoder, model, params, toks, lens, inputs, size, callback=callback,
                                   prefix_size=prefix_size, prefix_groups=max(groups, 1))
        else:
            compiled = loop.run_phases if loop.timing_phases() else loop.run_jit
            state = compiled(decoder, model, params, toks, lens, inputs, size, prefix_size=prefix_size,
                             prefix_groups=max(groups, 1))
        state = jax.block_until_ready(state)
        results.append((state, real))
        if hot_start and hook(decoder, "carry") is not None:
            carry = decoder.carry(state) or carry
        st = state.stats or {}
        calls += int(st.get("model_calls", 0))
        steps += int(state.step) + 1
    return Run(units=units, results=results, cache_size=size, prompt_bucket=p_bucket, capacity=cap, batch_size=ub,
               shared_prefix=shared, prefix_groups=groups if shared else 0, model_calls=calls, loop_steps=steps,
               seconds=time.perf_counter() - t0, order=order)
