"""Logits processors: the one seam through which a decoder turns raw model logits into the scores it picks
tokens from.

A processor is any hashable object (a frozen dataclass is the usual form; decoders hold processors as
static configuration) with::

    stage: str            # "mask" (hard masks: grammar, banned ids, min_new stop suppression),
                          # "penalty" (repetition, CAD, momentum ...) or "warp" (temperature, top-k ...)
    host: bool            # False: a pure jnp function, traced into the step
                          # True:  runs in Python on numpy arrays, through ONE ordered io_callback per
                          #        step for all host processors of a stage, batched over rows
    __call__(logits [B,T,V], ctx: ProcessorContext) -> logits [B,T,V]
    post_commit(ctx, tokens [B,K], counts [B], parent_rows [B]) -> None      # optional, host only

Processors see the logits of a block of T positions per row: T = 1 for token-by-token and beam steps,
T = draft nodes + 1 for a speculative verify block. ``ctx.depth[b, t]`` says which token the logits at
block position t choose (token number ``ctx.num_new[b] + ctx.depth[b, t]`` of the row's output), and
``ctx.parents[b, t]`` is the block position of its parent (-1: the block's root, whose prefix is the
row's committed output), so one processor serves plain steps, beam steps and every node of a draft tree.
The prefix that node t continues is the committed output followed by ``ctx.block`` along the ancestors
of t (``ctx.block[b, 0]`` is the last committed token).

Order: `run_processors` applies processors by stage ("mask", then "penalty", then "warp"), keeping the
given order inside a stage; a stage's host processors run first, together, in one callback. Decoders
place their own processors (min_new suppression, repetition penalty, sampling warpers) in the same
chain. Beam search and stochastic beam search apply the chain to log-probabilities, as HF's beam search
applies its processors to ``log_softmax(logits)``; every other decoder applies it to raw logits.

``post_commit`` runs after the decoder has committed tokens (all processors' hooks in one ordered
callback): ``tokens[b, :counts[b]]`` were appended to row b (K per row in speculative decoding), and
``parent_rows[b]`` is the row whose output row b continues (the identity except after a beam reorder).
A stateful host processor (a grammar matcher) advances, forks or rolls back there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import io_callback

STAGES = ("mask", "penalty", "warp")
# token bans may use -inf (a banned token must have probability exactly 0); attention masks cannot
from jaxdec.masks import BANNED_LOGIT as BANNED  # noqa: E402


@runtime_checkable
class LogitsProcessor(Protocol):
    stage: str
    host: bool

    def __call__(self, logits, ctx: "ProcessorContext"): ...


@struct.dataclass
class ProcessorContext:
    """What a processor may read (all arrays traced; host processors get them as numpy arrays).

    tokens:   [B, N] int32 each row's committed output buffer (valid up to ``num_new``).
    num_new:  [B] int32 committed tokens per row before this block.
    depth:    [B, T] int32 the logits at block position t choose output token ``num_new + depth``.
    parents:  [B, T] int32 block position of each position's parent, -1 for the root.
    block:    [B, T] int32 the block's input tokens (position 0: the last committed token).
    done:     [B] bool rows that have finished (their logits are ignored).
    min_new:  [B] int32 per-row min_new_tokens.
    stop_ids: [n] int32 ids that end a row.
    sampling: the rows' `SamplingParams` (sampling decoders only), else None.
    seen:     [B, V] bool tokens seen by each row (repetition penalty), else None.
    method:   the decoder's own per-row parameters that its built-in processors read (CAD's alpha ...),
              else None. Host processors do not receive it.
    """

    tokens: jax.Array
    num_new: jax.Array
    depth: jax.Array
    parents: jax.Array
    block: jax.Array
    done: jax.Array
    min_new: jax.Array
    stop_ids: jax.Array
    sampling: Any = None
    seen: Any = None
    method: Any = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


def step_context(state, block=None, depth=None, parents=None, sampling=None, seen=None,
                 method=None) -> ProcessorContext:
    """The context of a decode state; without ``depth`` a one-position block (a plain step)."""
    b = state.tokens.shape[0]
    if depth is None:
        depth = jnp.zeros((b, 1), jnp.int32)
        parents = jnp.full((b, 1), -1, jnp.int32)
        block = state.last[:, None]
    return ProcessorContext(tokens=state.tokens, num_new=state.num_new, depth=depth, parents=parents,
                            block=block, done=state.done, min_new=state.min_new, stop_ids=state.stop_ids,
                            sampling=sampling, seen=seen, method=method)


def check_processors(processors, who: str) -> tuple:
    """Validate a user's processors (a sequence of objects with ``stage``, ``host`` and ``__call__``);
    returns them as a tuple (hashable static configuration). Raises naming ``who`` and the member."""
    if processors is None:
        return ()
    if callable(processors) and not isinstance(processors, (list, tuple)):
        processors = (processors,)
    out = []
    for i, p in enumerate(processors):
        for member in ("stage", "host"):
            if not hasattr(p, member):
                raise TypeError(f"{who}: processors[{i}] ({type(p).__name__}) has no '{member}' attribute; a "
                                f"logits processor needs stage in {STAGES}, host (bool) and __call__(logits, ctx)")
        if p.stage not in STAGES:
            raise ValueError(f"{who}: processors[{i}].stage must be one of {STAGES}, got {p.stage!r}")
        if not callable(p):
            raise TypeError(f"{who}: processors[{i}] ({type(p).__name__}) is not callable")
        if getattr(p, "post_commit", None) is not None and not p.host:
            raise ValueError(f"{who}: processors[{i}] ({type(p).__name__}) has post_commit but host=False; "
                             "post_commit hooks run on the host (keep device state in the decode state)")
        try:
            hash(p)
        except TypeError:
            raise TypeError(f"{who}: processors[{i}] ({type(p).__name__}) is not hashable; processors are static "
                            "configuration (use a frozen dataclass)") from None
        out.append(p)
    return tuple(out)


HOST_SKIP = ("sampling", "seen", "method")  # pytrees host processors do not receive


def _host_arrays(ctx: ProcessorContext) -> dict:
    """The context's arrays that travel to the host."""
    return {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.name not in HOST_SKIP}


def _host_context(arrs: dict) -> ProcessorContext:
    return ProcessorContext(**{k: np.asarray(v) for k, v in arrs.items()})


def _host_call(procs: Sequence, logits, ctx: ProcessorContext):
    """All host processors of one stage in one ordered callback (batched over rows)."""

    def run(x, arrs):
        c = _host_context(arrs)
        x = np.asarray(x)
        for p in procs:
            x = np.asarray(p(x, c), np.float32)
        return x

    return io_callback(run, jax.ShapeDtypeStruct(logits.shape, jnp.float32), logits.astype(jnp.float32),
                       _host_arrays(ctx), ordered=True)


def run_processors(processors: Sequence, logits, ctx: ProcessorContext):
    """Apply ``processors`` to ``logits [B,T,V]`` (or ``[B,V]``, treated as T = 1) stage by stage."""
    if not processors:
        return logits
    flat = logits.ndim == 2
    x = logits[:, None] if flat else logits
    for stage in STAGES:
        procs = [p for p in processors if p.stage == stage]
        host = [p for p in procs if p.host]
        if host:
            x = _host_call(host, x, ctx)
        for p in procs:
            if not p.host:
                x = p(x, ctx)
    return x[:, 0] if flat else x


def post_commit(processors: Sequence, ctx: ProcessorContext, tokens, counts, parent_rows=None) -> None:
    """Run every processor's ``post_commit`` hook in one ordered host callback."""
    hooks = [p for p in processors if getattr(p, "post_commit", None) is not None]
    if not hooks:
        return
    b = tokens.shape[0]
    parent_rows = jnp.arange(b, dtype=jnp.int32) if parent_rows is None else parent_rows

    def run(arrs, tok, cnt, par):
        c = _host_context(arrs)
        for p in hooks:
            p.post_commit(c, np.asarray(tok), np.asarray(cnt), np.asarray(par))

    io_callback(run, None, _host_arrays(ctx), tokens.astype(jnp.int32), counts.astype(jnp.int32),
                parent_rows.astype(jnp.int32), ordered=True)


# ---------------------------------------------------------------------------------------------------
# Built-in processors
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MinNewTokens:
    """HF's min_new_tokens rule: a row's stop ids get -inf while the token being chosen would be one of
    its first ``min_new`` (block positions count their depth)."""

    stage = "mask"
    host = False

    def __call__(self, logits, ctx):
        if ctx.stop_ids.size == 0:
            return logits
        v = logits.shape[-1]
        block = (ctx.num_new[:, None] + ctx.depth) < ctx.min_new[:, None]  # [B,T]
        hit = jnp.zeros((v,), bool).at[ctx.stop_ids].set(True)
        return jnp.where(block[..., None] & hit, BANNED, logits)


@dataclasses.dataclass(frozen=True)
class BanTokens:
    """Ids that are never emitted (a hard mask)."""

    ids: tuple
    stage = "mask"
    host = False

    def __post_init__(self):
        ids = tuple(int(i) for i in np.asarray(self.ids).reshape(-1))
        if not ids or min(ids) < 0:
            raise ValueError(f"BanTokens: ids must be a non-empty sequence of token ids >= 0, got {self.ids!r}")
        object.__setattr__(self, "ids", ids)

    def __call__(self, logits, ctx):
        hit = jnp.zeros((logits.shape[-1],), bool).at[jnp.asarray(self.ids, jnp.int32)].set(True)
        return jnp.where(hit, BANNED, logits)


@dataclasses.dataclass(frozen=True)
class RepetitionPenalty:
    """HF's repetition penalty from ``ctx.sampling.repetition_penalty`` over ``ctx.seen`` (decoders that
    track seen tokens put the mask in the context)."""

    stage = "penalty"
    host = False

    def __call__(self, logits, ctx):
        if ctx.seen is None or ctx.sampling is None:
            return logits
        from jaxdec.core.processors import repetition_penalty
        b, t, v = logits.shape
        seen = jnp.repeat(ctx.seen, t, axis=0)
        pen = jnp.repeat(jnp.asarray(ctx.sampling.repetition_penalty), t, axis=0)
        return repetition_penalty(logits.reshape(b * t, v), seen, pen).reshape(b, t, v)


@dataclasses.dataclass(frozen=True)
class SamplingWarpers:
    """Temperature, top-k, top-p, min-p and typical-p from ``ctx.sampling`` (HF's order; rows with
    temperature 0 are left as they are: greedy)."""

    stage = "warp"
    host = False

    def __call__(self, logits, ctx):
        if ctx.sampling is None:
            return logits
        from jaxdec.core.processors import warp
        b, t, v = logits.shape
        sp = jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a), t, axis=0), ctx.sampling)
        return warp(logits.reshape(b * t, v), sp).reshape(b, t, v)


MIN_NEW = MinNewTokens()


def with_sampling(processors: Sequence, sampling: bool, repetition: bool = False) -> tuple:
    """A decoder's full chain: its own processors (min_new suppression; when sampling, the repetition
    penalty and the sampling warpers), then the user's; `run_processors` orders them by stage, so a
    user's mask runs after min_new and before every penalty, a user's warper after the built-in ones."""
    chain = (MIN_NEW,)
    if repetition:
        chain += (RepetitionPenalty(),)
    if sampling:
        chain += (SamplingWarpers(),)
    return chain + tuple(processors)


def ensure_accepts(decoder, processors, who: Optional[str] = None):
    """``decoder`` with ``processors`` added to its own, or a ValueError naming the decoder when it has
    no processor seam."""
    processors = check_processors(processors, who or type(decoder).__name__)
    if not processors:
        return decoder
    if not (dataclasses.is_dataclass(decoder) and any(f.name == "processors" for f in dataclasses.fields(decoder))):
        raise ValueError(f"{type(decoder).__name__} does not accept logits processors (it has no 'processors' "
                         "field); drop processors= or use a decoder that honours them")
    return dataclasses.replace(decoder, processors=tuple(decoder.processors) + processors)
