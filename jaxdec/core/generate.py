"""Host-side entry points: `generate` (any decoder through the shared driver) and `score`."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import bucket
from jaxdec.core import driver
from jaxdec.core.logits import check_processors, ensure_accepts
from jaxdec.core.driver import (_check_prompts, _positive_int, batch_inputs, pad_batch, prefix_groups,  # noqa: F401
                                row_keys, shared_prefix_sizes, use_shared_prefix)
from jaxdec.core.protocols import hook
from jaxdec.core.steps import with_prefill_chunk
from jaxdec.core.state import FINISH_NAMES
from jaxdec.sharding import to_host

METHODS = ("greedy", "sample")
# constrained decoding registers its `prepare` here on import (jaxdec.constrained depends on core, never the
# reverse): prepare(decoder, constraint, ...) -> None or a prepared run (decoder, inputs_fn, session, ok())
CONSTRAINTS: list = []


@dataclasses.dataclass
class Generation:
    """What `generate` returns; lists are per output row (prompt-major, then sample index)."""

    prompt_ids: list
    tokens: list  # new tokens, up to and including the stop token
    finish_reason: list
    stats: dict
    text: Optional[list] = None
    extras: dict = dataclasses.field(default_factory=dict)
    constraint_ok: Optional[list] = None  # per row with constraint=: the grammar engine accepts the output


def generate(model, params, prompts, *, method: str = "greedy", decoder=None, max_new_tokens: int = 64,
             min_new_tokens: int = 0, sampling=None, n: int = 1, seed: int = 0, stop_ids=None,
             stop_strings: Sequence[str] = (), tokenizer=None, batch_size: Optional[int] = None,
             cache_size: Optional[int] = None, capacity: Optional[int] = None, debug: bool = False,
             callback=None, progress=None, inputs_fn=None, mesh=None, prefill_chunk: Optional[int] = 512,
             shared_prefix: Optional[bool] = None, processors=None, carry=None, hot_start: bool = False,
             constraint=None, longest_prompt: Optional[int] = None) -> Generation:
    """Decode every prompt (token-id lists) with `method` ("greedy" | "sample") or an explicit decoder.

    sampling: a `SamplingParams` (per output row) or a dict of its fields (scalars or per-row lists).
    n: samples per prompt (rows prompt-major). stop_ids: default `model.eos_ids`.
    batch_size: rows per compiled batch (the last batch is padded with inert rows, so it reuses the
    same compiled program). cache_size/capacity: override the bucketed cache and output sizes.
    debug: run the same step functions in a Python loop, calling `callback(state)` after each step.
    inputs_fn(inputs, rows) -> inputs: lets a decoder add its own per-row inputs.
    mesh: a `jaxdec.sharding.make_mesh` mesh: params and rows are placed with its partition rules and
    the compiled loop runs SPMD over its devices (batch_size must be a multiple of the data axis).
    prefill_chunk: prompts longer than this enter in chunks of this many tokens through one compiled
    chunk program (`jaxdec.core.steps.prefill`); None prefills the whole prompt block in one call.
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
    carry: what the first batch starts from (``inputs.carry``; a speculative decoder takes a `DrafterCarry` or
    the dict of a previous result's ``stats["carry"]``). hot_start: every later batch starts from the
    decoder's ``carry(state)`` of the batch before (the Token Recycling paper runs its matrix across queries;
    tokens never change, only τ). Statistics are summed over all batches.
    With several batches the driver runs prompts of similar length together (longest first, when that
    lowers the work; not with per-row ``inputs_fn``, ``carry`` or ``hot_start``); outputs keep the input
    order. longest_prompt: size the prompt bucket and cache for a prompt of this many tokens (a caller
    that splits one prompt list over several calls passes the list's longest: one compiled program).
    constraint: a `jaxdec.constrained` constraint (json_schema, regex, lark, choices) for every row, or a
    list with one per prompt (None: that prompt unconstrained); needs ``tokenizer=``. Greedy, sampling and
    `SpeculativeDecoder` with a chain drafter honour it (others refuse by name); ``constraint_ok`` per row.
    """
    from jaxdec.core.token import TokenDecoder
    from jaxdec.core.stopping import StopStringChecker

    prompts = _check_prompts(prompts, model.vocab_size)
    needs = hook(decoder, "required_inputs") if decoder is not None else ()
    if needs and inputs_fn is None:
        raise ValueError(f"decoder={type(decoder).__name__}(...) needs per-row inputs {list(needs)} that generate() "
                         f"does not build: call its entry point instead ({hook(decoder, 'entry_point') or 'see its docs'})")
    n = _positive_int("n", n)
    rows = [p for p in prompts for _ in range(n)]
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
    cons = None
    if constraint is not None:
        if not CONSTRAINTS:
            raise ValueError("constraint=: build constraints with jaxdec.constrained (json_schema, regex, lark, "
                             "choices); importing jaxdec.constrained enables constraint=")
        cons = CONSTRAINTS[0](decoder, constraint, n_prompts=len(prompts), samples=n, expand=1, tokenizer=tokenizer,
                              model=model, inputs_fn=inputs_fn, who="generate")
    if cons is not None:
        decoder, inputs_fn = cons.decoder, cons.inputs_fn

    model = with_prefill_chunk(model, prefill_chunk)
    with (cons.running() if cons is not None else contextlib.nullcontext()):
        run = driver.run(decoder, model, params, rows, samples_per_prompt=n, max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, stop_ids=stop_ids, seed=seed, batch_size=batch_size,
                         cache_size=cache_size, capacity=capacity, sampling=sp, debug=debug, callback=callback,
                         progress=progress, inputs_fn=inputs_fn, mesh=mesh, shared_prefix=shared_prefix,
                         carry=_carry_input(decoder, carry), hot_start=hot_start, longest_prompt=longest_prompt,
                         sort_by_length=True)
    finalize = hook(decoder, "finalize")
    all_tokens, finishes = [], []
    per_batch = []
    for state, real in run.results:
        tk, nn, fr = (state.tokens, state.num_new, state.finish) if finalize is None else finalize(state)
        per_batch.append(tuple(to_host(a) for a in (tk, nn, fr)))  # process_allgather across hosts
    for bi, r in run.positions():  # input order (the driver may have batched the rows by length)
        tk, nn, fr = per_batch[bi]
        all_tokens.append(tk[r, :nn[r]].tolist())
        finishes.append(FINISH_NAMES[int(fr[r])])
    last_state = run.results[-1][0]
    secs = run.seconds
    new = sum(len(t) for t in all_tokens)
    out_stats = {"model_calls": run.model_calls, "loop_steps": run.loop_steps, "new_tokens": new, "seconds": secs,
                 "tokens_per_second": new / secs if secs > 0 else float("nan"),
                 "cache_size": run.cache_size, "prompt_bucket": run.prompt_bucket, "batch_size": run.batch_size,
                 "shared_prefix": run.shared_prefix, "prefix_groups": run.prefix_groups}
    extra_stats = hook(decoder, "summarize")
    if extra_stats is not None:
        out_stats.update(extra_stats(_summed_stats(run.results)))
    text = None
    if tokenizer is not None:
        from jaxdec.core.stopping import truncate_at_stop
        text = [tokenizer.decode(t, skip_special_tokens=True) for t in all_tokens]
        if stop_strings:
            text = [truncate_at_stop(s, stop_strings) if f == "stop_string" else s for s, f in zip(text, finishes)]
    extras = {"token_sharding": last_state.tokens.sharding, "cache_sharding": getattr(last_state.cache, "k", None)}
    if extras["cache_sharding"] is not None:
        extras["cache_sharding"] = extras["cache_sharding"].sharding
    ok = None
    if cons is not None:
        ok = cons.ok(all_tokens, [i // n for i in range(len(all_tokens))])
        out_stats["constraint_mask_calls"] = len(cons.session.mask_seconds)
        extras["constraint_session"] = cons.session
    return Generation(prompt_ids=rows, tokens=all_tokens, finish_reason=finishes, stats=out_stats, text=text,
                      extras=extras, constraint_ok=ok)


def _carry_input(decoder, carry):
    """``carry`` as the decoder takes it (its ``carry_type.create``, e.g. `DrafterCarry` from a dict)."""
    if carry is None:
        return None
    make = getattr(hook(decoder, "carry_type"), "create", None)
    return make(carry) if make is not None else carry


def _summed_stats(results):
    """The last batch's final state with ``stats`` summed over every batch (filler rows count in no
    statistic), which a decoder's ``summarize`` turns into host statistics."""
    last = results[-1][0]
    if len(results) == 1 or last.stats is None:
        return last
    summed = jax.tree.map(lambda *xs: sum(np.asarray(x) for x in xs), *[s.stats for s, _ in results])
    return last.replace(stats=summed)


def _score_jit_impl(model, params, ids, positions, logits_at, targets, cache_size):
    cache = model.init_cache(ids.shape[0], cache_size)
    out = model(params, ids, positions, cache, logits_at=logits_at)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0], jnp.argmax(logp, -1), jnp.max(logp, -1)


_score_jit = jax.jit(_score_jit_impl, static_argnames=("model", "cache_size"))


def score(model, params, prompt_ids, continuation_ids, top: bool = False) -> list:
    """Teacher-forced log-probabilities of each continuation token given its prompt.

    prompt_ids, continuation_ids: lists (one per row) of token-id lists. Returns a list of float32
    arrays, one per row, `logp[i] = log p(cont[i] | prompt + cont[:i])`. top=True: each row is a triple
    (logp, top_ids, top_logp) with the most likely token at each of those positions and its log-probability
    (lm-eval's ``is_greedy``, OpenAI ``top_logprobs``), from the same forward.
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
    lp, best, best_lp = jax.device_get(_score_jit(model, params, jnp.asarray(ids), jnp.asarray(positions),
                                                  jnp.asarray(logits_at), jnp.asarray(targets), t))
    if top:
        return [(lp[r, :len(c)], best[r, :len(c)], best_lp[r, :len(c)]) for r, c in enumerate(conts)]
    return [lp[r, :len(c)] for r, c in enumerate(conts)]
