"""Forced tokens as a drafter: where a row's grammar allows exactly one continuation (llguidance's
``compute_ff_tokens``), those tokens are the draft, so they enter in one verify call instead of one call
each; rows with nothing forced take the inner chain drafter's draft (prompt lookup by default).

Use it through speculative decoding with a constraint::

    from jaxdec.speculative import SpeculativeDecoder, PromptLookupDrafter
    dec = SpeculativeDecoder(ForcedTokensDrafter(PromptLookupDrafter(8)))
    g = jaxdec.generate(m.model, m.params, ids, decoder=dec, tokenizer=m.tokenizer, constraint=json_schema(s))

Verification is the engine's own (greedy: the output equals constrained greedy): a forced token that is a
tokenization the model would not choose is rejected like any other draft token. The forced tokens come
from the active constraint session through one ordered host callback per step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxdec.constrained.processor import _active


@dataclasses.dataclass(frozen=True)
class ForcedTokensDrafter:
    """A chain drafter: forced grammar tokens first, else ``inner``'s chain draft (same length)."""

    inner: Any  # a chain drafter, e.g. PromptLookupDrafter(8) (jaxdec.constrained imports no method family)

    def __post_init__(self):
        if not getattr(self.inner, "is_chain", False):
            raise ValueError(f"ForcedTokensDrafter: inner must be a chain drafter, {type(self.inner).__name__} "
                             "drafts a tree")

    num_nodes = property(lambda self: self.inner.num_nodes)
    max_depth = property(lambda self: self.inner.max_depth)
    max_children = 1
    is_chain = True
    needs_constraint = True

    def __getattr__(self, name):  # optional drafter hooks (headroom, own params, ...) are the inner's
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        return self.inner.init(model, params, prompts, prompt_lens, state, inputs)

    def propose(self, model, params, state, keys):
        d, dstate, cache = self.inner.propose(model, params, state, keys)
        b, n = d.tokens.shape

        def host(tokens, num_new, done):
            return _active().forced(np.asarray(tokens), np.asarray(num_new), np.asarray(done), n)

        ff = io_callback(host, jax.ShapeDtypeStruct((b, n + 1), jnp.int32), state.tokens, state.num_new,
                         state.done, ordered=True)
        count, toks = ff[:, 0], ff[:, 1:]
        use = count > 0
        tokens = jnp.where(use[:, None], toks, d.tokens).astype(jnp.int32)
        valid = jnp.where(use[:, None], jnp.arange(n)[None, :] < count[:, None], d.valid)
        # a sampling inner drafter keeps its distributions on its own rows; forced tokens are deterministic
        probs = None if d.probs is None else jnp.where(use[:, None], 1.0, d.probs)
        q = None
        if d.q is not None:
            q = jnp.where(use[:, None, None], jax.nn.one_hot(tokens, d.q.shape[-1], dtype=d.q.dtype), d.q)
        return dataclasses.replace(d, tokens=tokens, valid=valid, probs=probs, q=q), dstate, cache

    def update(self, model, params, state, dstate, info):
        return self.inner.update(model, params, state, dstate, info)
