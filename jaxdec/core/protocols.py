"""The protocols every pluggable piece follows, each declared once with every hook and its default.

* `Decoder`: a frozen dataclass of static configuration run by the driver (`jaxdec.core.loop`).
* `Drafter`: what `jaxdec.speculative.SpeculativeDecoder` drafts with.
* `jaxdec.models.interface.DecoderModel`: the model call (declared beside the model code).
* `jaxdec.core.logits.LogitsProcessor`: the logits seam.

Optional hooks have one default each, here (`DECODER_HOOKS`, `DRAFTER_HOOKS`); code reads them with
`hook(obj, name)`, never with a `getattr` default of its own, so a default cannot drift between call
sites. `check_decoder` / `check_drafter` run when an object is first used (host side, before any trace)
and name the member an object lacks, instead of a KeyError or AttributeError inside a trace.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class Decoder(Protocol):
    """``init(model, params, prompts[B,P], prompt_lens[B], cache, inputs) -> DecodeState`` and
    ``step(model, params, state) -> DecodeState`` (required); optional hooks in `DECODER_HOOKS`."""

    def init(self, model, params, prompts, prompt_lens, cache, inputs): ...

    def step(self, model, params, state): ...


@runtime_checkable
class Drafter(Protocol):
    """``num_nodes``, ``max_depth`` (ints), ``is_chain`` (bool), ``init(model, params, prompts,
    prompt_lens, state, inputs) -> drafter state``, ``propose(model, params, state, keys) -> (Draft,
    drafter state, cache)`` and ``update(model, params, state, drafter_state, VerifyInfo) -> drafter
    state`` (required); optional hooks in `DRAFTER_HOOKS`."""

    num_nodes: int
    max_depth: int
    is_chain: bool

    def init(self, model, params, prompts, prompt_lens, state, inputs): ...

    def propose(self, model, params, state, keys): ...

    def update(self, model, params, state, dstate, info): ...


# name -> (default, what it means)
DECODER_HOOKS = {
    "done": (None, "done(state) -> bool[]: stop the loop (default: every row done)"),
    "cache_headroom": (0, "cache slots needed beyond prompt + max_new_tokens (verify blocks, drafts)"),
    "shared_prefix_ok": (False, "rows sharing a prompt may decode against one Hydragen prefix"),
    "summarize": (None, "summarize(state) -> dict of host statistics merged into Generation.stats (for a run of "
                        "several batches, `state` is the last batch's with `stats` summed over all batches)"),
    "carry": (None, "carry(state) -> what the next batch starts from (`inputs.carry`; hot start across batches, "
                    "generate(hot_start=True)), or None"),
    "processors": ((), "the user's logits processors (a decoder that has this field honours them)"),
    "carry_type": (None, "the type of `inputs.carry` (its `create(x)` converts what a user passes as carry=)"),
    "required_inputs": ((), "names of the per-row inputs (`inputs.method`) the decoder needs beyond the driver's "
                            "(its entry point adds them through inputs_fn)"),
    "entry_point": (None, "the function that builds those inputs, named in the error generate() raises"),
    "insert": (None, "insert(state, prefix, slots) -> state: new rows into a running batch (default: "
                     "jaxdec.core.slots.insert_rows, for per-row method state)"),
    "needs_cache": (True, "False: the driver passes cache=None to init (the decoder keeps its own context)"),
    "finalize": (None, "finalize(state) -> (tokens [B,N], lengths [B], finish [B]): the output rows (default: "
                       "the left-to-right buffer state.tokens[:, :num_new])"),
}
DRAFTER_HOOKS = {
    "own_params": (False, "the drafter has its own weights: params = with_draft_params(target, draft)"),
    "max_children": (1, "most children of a node (sibling ranks counted in the statistics)"),
    "extra_headroom": (0, "cache slots the drafter needs beyond the verify block"),
    "export": (None, "export(drafter state) -> pytree a later run can start from (hot start)"),
    "draft_calls_per_step": (0, "draft model calls per step when a Draft does not count them"),
    "target_logits": (None, "target_logits(logits [B,T,V], draft, drafter state) -> the logits the verifier reads "
                            "(a drafter that redefines the target distribution: lossy, named so)"),
    "target_hidden_layers": (None, "layer counts whose residual stream the verify call returns in "
                                   "VerifyInfo.layer_hidden (EAGLE-3's fused features, hidden transfer)"),
    "extra_inputs": (None, "extra_inputs(model, dparams, state, draft, drafter state, pos, anc) -> (embeds [B,S,E], "
                           "positions [B,S], mask rows [B,S,T+S]) appended to the verify call, their logits in "
                           "VerifyInfo.extra_logits, their keys/values never cached (PPD's prompt tokens)"),
}
MODEL_HOOKS = {
    "supports_shared_prefix": (False, "the model accepts a shared-prefix KVCache (Hydragen)"),
    "pad_id": (0, "the id right-padded prompts are filled with (never attended: lengths hide it)"),
    "max_position": (None, "the model's context length (prompt + new tokens beyond it are refused)"),
}
_TABLES = (DECODER_HOOKS, DRAFTER_HOOKS, MODEL_HOOKS)


def hook(obj, name: str) -> Any:
    """``obj.name`` or the hook's declared default."""
    for table in _TABLES:
        if name in table:
            return getattr(obj, name, table[name][0])
    raise KeyError(f"{name!r} is not a declared hook (see jaxdec.core.protocols)")


def _missing(obj, members) -> list:
    return [m for m in members if not hasattr(obj, m)]


def check_decoder(decoder) -> None:
    """Raise a TypeError naming what ``decoder`` lacks (it must be hashable: it is a jit static argument)."""
    miss = [m for m in ("init", "step") if not callable(getattr(decoder, m, None))]
    if miss:
        raise TypeError(f"decoder {type(decoder).__name__} lacks {', '.join(miss)}: a decoder needs "
                        "init(model, params, prompts, prompt_lens, cache, inputs) and step(model, params, state)")
    try:
        hash(decoder)
    except TypeError:
        raise TypeError(f"decoder {type(decoder).__name__} is not hashable: decoders are static configuration "
                        "(use @dataclasses.dataclass(frozen=True))") from None


def check_drafter(drafter) -> None:
    """Raise a TypeError naming what ``drafter`` lacks."""
    miss = _missing(drafter, ("num_nodes", "max_depth", "is_chain"))
    miss += [m for m in ("init", "propose", "update") if not callable(getattr(drafter, m, None))]
    if miss:
        raise TypeError(f"drafter {type(drafter).__name__} lacks {', '.join(miss)} (see jaxdec.core.protocols."
                        "Drafter)")


def check_model(model) -> None:
    """Raise a TypeError naming what ``model`` lacks of the `DecoderModel` protocol."""
    miss = _missing(model, ("vocab_size", "num_layers", "eos_ids"))
    miss += [m for m in ("init_cache",) if not callable(getattr(model, m, None))]
    if not callable(model):
        miss.append("__call__")
    if miss:
        raise TypeError(f"model {type(model).__name__} lacks {', '.join(miss)} (see jaxdec.models.interface."
                        "DecoderModel)")


def is_done(decoder, state) -> jax.Array:
    """The loop's stop condition: the decoder's ``done`` hook, or every row done."""
    import jax.numpy as jnp
    fn = hook(decoder, "done")
    return jnp.all(state.done) if fn is None else fn(state)
