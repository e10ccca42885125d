"""Host-side entry points: `generate` (any decoder through the shared driver) and `score`."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import bucket
from jaxdec.core import loop
from jaxdec.core.logits import check_processors, ensure_accepts
from jaxdec.core.protocols import check_decoder, check_model, hook
from jaxdec.core.state import FINISH_NAMES

METHODS = ("greedy", "sample")


@dataclasses.dataclass
class Generation:
    """What `generate` returns; lists are per output row (prompt-major, then sample index)."""

    prompt_ids: list
    tokens: list  # new tokens, up to and including the stop token
    finish_reason: list
    stats: dict
    text: Optional[list] = None
    extras: dict = dataclasses.field(default_factory=dict)


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
    ks = [jax.random.fold_in(jax.random.fold_in(base, i), j) for i in range(n_prompts) for j in range(n)]
    return np.stack([np.asarray(k) for k in ks]).astype(np.uint32)


def pad_batch(rows: list, length: int, pad_id: int) -> tuple:
    arr = np.full((len(rows), length), pad_id, np.int32)
    lens = np.zeros((len(rows),), np.int32)
    for r, p in enumerate(rows):
        arr[r, :len(p)] = p
        lens[r] = len(p)
    return arr, lens


def batch_inputs(bs: int, max_new: int, min_new: int, keys, stop, cap: int, sampling=None) -> dict:
    """The driver's per-row inputs for a compiled batch of ``bs`` rows whose first ``len(keys)`` rows are
    real: ``max_new`` (0 for the inert filler rows, which repeat the first row's key and sampling
    parameters), ``min_new``, ``keys [bs, 2]``, ``stop_ids``, the output buffer ``[bs, cap]`` and, with
    ``sampling`` (a `SamplingParams` of the real rows), the rows' sampling parameters."""
    real = len(keys)
    mx = np.array([max_new] * real + [0] * (bs - real), np.int32)
    kb = np.concatenate([keys, np.repeat(keys[:1], bs - real, 0)])
    inputs = {"max_new": jnp.asarray(mx), "min_new": jnp.full((bs,), min_new, jnp.int32),
              "keys": jnp.asarray(kb), "stop_ids": jnp.asarray(np.array(stop, np.int32)),
              "out_buffer": jnp.zeros((bs, cap), jnp.int32)}
    if sampling is not None:
        inputs["sampling"] = jax.tree.map(
            lambda a: jnp.asarray(np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1], bs - real, 0)])),
            sampling)
    return inputs


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


def generate(model, params, prompts, *, method: str = "greedy", decoder=None, max_new_tokens: int = 64,
             min_new_tokens: int = 0, sampling=None, n: int = 1, seed: int = 0, stop_ids=None,
             stop_strings: Sequence[str] = (), tokenizer=None, batch_size: Optional[int] = None,
             cache_size: Optional[int] = None, capacity: Optional[int] = None, debug: bool = False,
             callback=None, progress=None, inputs_fn=None, mesh=None,
             shared_prefix: Optional[bool] = None, processors=None) -> Generation:
    """Decode every prompt (token-id lists) with `method` ("greedy" | "sample") or an explicit decoder.

    sampling: a `SamplingParams` (per output row) or a dict of its fields (scalars or per-row lists).
    n: samples per prompt (rows prompt-major). stop_ids: default `model.eos_ids`.
    batch_size: rows per compiled batch (the last batch is padded with inert rows, so it reuses the
    same compiled program). cache_size/capacity: override the bucketed cache and output sizes.
    debug: run the same step functions in a Python loop, calling `callback(state)` after each step.
    inputs_fn(inputs, rows) -> inputs: lets a decoder add its own per-row inputs.
    mesh: a `jaxdec.sharding.make_mesh` mesh: params and rows are placed with its partition rules and
    the compiled loop runs SPMD over its devices (batch_size must be a multiple of the data axis).
    shared_prefix: None (auto), True or False. Auto uses Hydragen shared-prefix attention when rows
    share prompts (n > 1: n>1 sampling, best-of-N, first-finish) and the compiled batches group by
    prompt (every batch holds one prompt, or batch_size is a multiple of n, as by default), the
    decoder supports it (greedy/sampling `TokenDecoder`, `FirstFinish`) and no mesh is given: each
    prompt of a batch is prefilled once (batch = number of prompts) into one prefix copy per prompt,
    each row's cache holds only its new tokens, and every layer attends with `hydragen_attend` (each
    group of n rows batched against its prompt). Batches that mix prompts at other boundaries use the
    ordinary cache. ``stats["shared_prefix"]`` / ``stats["prefix_groups"]`` say which path ran.
    processors: logits processors (`jaxdec.core.logits`: hard masks, penalties, warpers) applied at every
    step after min_new suppression; with ``decoder=`` they are added to the decoder's own (a decoder
    without a ``processors`` field refuses them by name).
    """
    from jaxdec.core.token import TokenDecoder
    from jaxdec.core.stopping import StopStringChecker

    prompts = _check_prompts(prompts, model.vocab_size)
    needs = hook(decoder, "required_inputs") if decoder is not None else ()
    if needs and inputs_fn is None:
        raise ValueError(f"decoder={type(decoder).__name__}(...) needs per-row inputs {list(needs)} that generate() "
                         f"does not build: call its entry point instead ({hook(decoder, 'entry_point') or 'see its docs'})")
    max_new = _positive_int("max_new_tokens", max_new_tokens)
    min_new = _positive_int("min_new_tokens", min_new_tokens, allow_zero=True)
    n = _positive_int("n", n)
    rows = [p for p in prompts for _ in range(n)]
    bs = len(rows) if batch_size is None else _positive_int("batch_size", batch_size)
    bs = min(bs, len(rows))
    stop = tuple(model.eos_ids) if stop_ids is None else tuple(int(s) for s in stop_ids)
    checker = StopStringChecker(tokenizer, stop_strings) if stop_strings else None
    sp = None
    if method == "sample" or sampling is not None:
        from jaxdec.core.processors import SamplingParams
        sp = sampling if isinstance(sampling, SamplingParams) else SamplingParams.create(len(rows), **(sampling or {}))
    if decoder is None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (or pass decoder=...), got {method!r}")
        rep = sp is not None and bool(np.any(np.asarray(sp.repetition_penalty) != 1.0))
        decoder = TokenDecoder(greedy=(method == "greedy"), repetition_penalty=rep, stop_checker=checker,
                               stop_window=checker.window if checker else 0,
                               processors=check_processors(processors, "generate"))
    else:
        decoder = ensure_accepts(decoder, processors, "generate")

    pmax = max(len(p) for p in rows)
    p_bucket = bucket(pmax)
    cap = capacity or bucket(max_new, 16)
    if cap < max_new:
        raise ValueError(f"capacity ({cap}) is smaller than max_new_tokens ({max_new})")
    check_model(model)
    check_decoder(decoder)
    extra = int(hook(decoder, "cache_headroom"))
    groups = prefix_groups(rows, bs, n)
    shared = use_shared_prefix(shared_prefix, model, decoder, groups, bs // max(groups, 1), mesh)
    prefix_size = None
    if shared:
        prefix_size, size = shared_prefix_sizes(p_bucket, cap, extra, cache_size)
    else:
        size = cache_size or bucket(p_bucket + cap + extra)
    needed = pmax + max_new + extra
    if needed > size + (prefix_size or 0) or p_bucket > size + (prefix_size or 0):
        raise ValueError(f"prompt too long for the cache: longest prompt ({pmax} tokens) + max_new_tokens "
                         f"({max_new}) needs {needed} positions, cache_size is {size}")
    max_pos = hook(model, "max_position")
    if max_pos is not None and needed > max_pos:
        raise ValueError(f"prompt + max_new_tokens = {needed} exceeds the model's context ({max_pos})")
    keys = row_keys(seed, len(prompts), n)
    if mesh is not None:
        from jaxdec import sharding
        if bs % mesh.shape[sharding.DATA]:
            raise ValueError(f"batch_size ({bs}) must be a multiple of the mesh's data axis ({mesh.shape[sharding.DATA]})")
        params = sharding.shard_params(params, mesh)
        if dataclasses.is_dataclass(model) and getattr(model, "matmul_impl", "xla") is None:
            model = dataclasses.replace(model, matmul_impl="xla")  # shardable dots, not custom calls

    finalize = hook(decoder, "finalize")
    all_tokens, finishes, calls, steps = [], [], 0, 0
    t0 = time.perf_counter()
    batches = range(0, len(rows), bs)
    if progress is not None:
        batches = progress(batches)
    for start in batches:
        chunk = rows[start:start + bs]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (bs - real)  # inert filler rows keep shapes static
        toks, lens = pad_batch(chunk, p_bucket, int(hook(model, "pad_id")))
        sl = None if sp is None else jax.tree.map(lambda a: np.asarray(a)[start:start + real], sp)
        inputs = batch_inputs(bs, max_new, min_new, keys[start:start + real], stop, cap, sl)
        if inputs_fn is not None:
            inputs = inputs_fn(inputs, chunk)
        toks, lens = jnp.asarray(toks), jnp.asarray(lens)
        if mesh is not None:
            toks, lens, inputs = sharding.shard_rows((toks, lens, inputs), mesh)
            inputs["stop_ids"] = jax.device_put(inputs["stop_ids"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        if debug:
            state = loop.run_debug(decoder, model, params, toks, lens, inputs, size,
                                   callback=callback, prefix_size=prefix_size, prefix_groups=max(groups, 1))
        else:
            state = loop.run_jit(decoder, model, params, toks, lens, inputs, size, prefix_size=prefix_size,
                                 prefix_groups=max(groups, 1))
        tk, nn, fr = (state.tokens, state.num_new, state.finish) if finalize is None else finalize(state)
        tk, nn, fr = np.asarray(tk), np.asarray(nn), np.asarray(fr)
        for r in range(real):
            all_tokens.append(tk[r, :nn[r]].tolist())
            finishes.append(FINISH_NAMES[int(fr[r])])
        stats = state.stats or {}
        calls += int(stats.get("model_calls", 0))
        steps += int(state.step) + 1
        last_state = state
    secs = time.perf_counter() - t0
    new = sum(len(t) for t in all_tokens)
    out_stats = {"model_calls": calls, "loop_steps": steps, "new_tokens": new, "seconds": secs,
                 "tokens_per_second": new / secs if secs > 0 else float("nan"),
                 "cache_size": size, "prompt_bucket": p_bucket, "batch_size": bs,
                 "shared_prefix": shared, "prefix_groups": groups if shared else 0}
    extra_stats = hook(decoder, "summarize")
    if extra_stats is not None:
        out_stats.update(extra_stats(last_state))
    text = None
    if tokenizer is not None:
        from jaxdec.core.stopping import truncate_at_stop
        text = [tokenizer.decode(t, skip_special_tokens=True) for t in all_tokens]
        if stop_strings:
            text = [truncate_at_stop(s, stop_strings) if f == "stop_string" else s for s, f in zip(text, finishes)]
    extras = {"token_sharding": last_state.tokens.sharding, "cache_sharding": getattr(last_state.cache, "k", None)}
    if extras["cache_sharding"] is not None:
        extras["cache_sharding"] = extras["cache_sharding"].sharding
    return Generation(prompt_ids=rows, tokens=all_tokens, finish_reason=finishes, stats=out_stats, text=text,
                      extras=extras)


def _score_jit_impl(model, params, ids, positions, logits_at, targets, cache_size):
    cache = model.init_cache(ids.shape[0], cache_size)
    out = model(params, ids, positions, cache, logits_at=logits_at)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]


_score_jit = jax.jit(_score_jit_impl, static_argnames=("model", "cache_size"))


def score(model, params, prompt_ids, continuation_ids) -> list:
    """Teacher-forced log-probabilities of each continuation token given its prompt.

    prompt_ids, continuation_ids: lists (one per row) of token-id lists. Returns a list of float32
    arrays, one per row, `logp[i] = log p(cont[i] | prompt + cont[:i])`.
    """
    prompts = _check_prompts(prompt_ids, model.vocab_size)
    conts = _check_prompts(continuation_ids, model.vocab_size)
    if len(prompts) != len(conts):
        raise ValueError(f"prompt_ids has {len(prompts)} rows but continuation_ids has {len(conts)}")
    full = [p + c for p, c in zip(prompts, conts)]
    t = bucket(max(len(f) for f in full))
    cmax = bucket(max(len(c) for c in conts), 16)
    ids, _ = pad_batch(full, t, 0)
    b = len(full)
    logits_at = np.zeros((b, cmax), np.int32)
    targets = np.zeros((b, cmax), np.int32)
    for r, (p, c) in enumerate(zip(prompts, conts)):
        logits_at[r, :len(c)] = np.arange(len(p) - 1, len(p) - 1 + len(c))
        targets[r, :len(c)] = c
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    lp = np.asarray(_score_jit(model, params, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(logits_at),
                               jnp.asarray(targets), t))
    return [lp[r, :len(c)] for r, c in enumerate(conts)]
