"""The one small interface through which every decoder talks to a model.

A model is a hashable object (a frozen dataclass; it is a static argument of `jit`) with

    model(params, tokens[B,T], positions[B,T], cache, mask=None, layers=None, logits_at=None,
          return_layer_hidden=False) -> ModelOutput(logits, hidden, cache, layer_hidden, qk, residual)
    model.init_cache(batch, size) -> cache
    model.vocab_size, model.num_layers, model.eos_ids

That is all the plain decoders (greedy, sampling, search, the model-free drafters) need:

* One call serves prefill (T = padded prompt length), decoding (T = 1) and verification (T = draft size).
* The T new tokens' keys/values are appended at each row's ``cache.lengths`` and lengths advance by T;
  callers roll back or compact (``jaxdec.cache``) what they do not keep.
* ``mask [B,T,T]`` bool: which block tokens each block token may attend to (default causal); a tree
  mask makes one call verify a whole draft tree.
* ``layers [num_layers]`` bool (traced): layers switched off are skipped (identity); a new layer subset
  does not recompile (layer-skip self-speculation, early exit).
* ``logits_at [B,K]`` int: compute logits only at these block indices (prefill asks for K = 1).
* ``hidden [B,T,hidden]``: final-norm hidden states (what draft heads read); ``layer_hidden
  [num_layers+1,B,T,hidden]`` (embedding output then every layer's output) when asked for.

Optional members (`LlamaModel` has them all; a method that needs one says so by name when the model
lacks it, and the models that do not need them, like the test's tiny Flax decoder, leave them out):

* ``model.embed(params, ids[...]) -> [..., E]`` float32 input embeddings, and the keyword
  ``embeds=[B,T,E]`` in place of ``tokens`` (then ``tokens=None``): the model's forward on arbitrary
  input vectors (superposed decoding's weighted sums, learned prompt tokens mixed with token embeddings).
  ``model(params, None, pos, cache, embeds=model.embed(params, ids))`` equals the call on ``ids``.
* ``attention=`` "causal" (default), "bidirectional" (every block token sees the whole block; masked
  diffusion) or a bool array ``[B,T,S+T]`` over the S cache slots then the T block tokens.
* ``hidden_layers=(i, j, ...)`` (static): ``layer_hidden [k,B,T,E]``, the residual stream after i, j,
  ... layers (0 = embeddings), without materializing the other layers (EAGLE-3 fuses a low, a middle
  and a high layer).
* ``layer_range=(a, b)`` (static) with ``hidden_in [B,T,E]`` (the residual entering layer a; tokens or
  embeds when a = 0): runs layers a .. b-1 only and returns their output before the final norm in
  ``residual``. Keys/values of those layers are written at ``cache.lengths``, which advance only when b
  is the last layer, so ``[0, a)`` then ``[a, L)`` equals the full call (draft heads, hidden transfer,
  early exit, nested drafts).
* ``model.truncate(params, num_layers) -> (model, params)``: the first ``num_layers`` layers as a model
  of their own (same embeddings and head): the draft-model drafter's stand-in for a small model.
* ``attn_fn``/``attn_extra``: a per-layer attention function and its per-layer pytree (leading
  ``[num_layers]`` axis), for methods whose attention needs per-layer state (Double Sparsity);
  ``collect_qk=True`` fills ``qk = (q [L,B,T,H,D], k [L,B,T,KVH,D])`` (post-RoPE).
* ``supports_shared_prefix = True``: the model accepts a shared-prefix `KVCache` (``prefix_k`` set;
  Hydragen attention), which `generate` and the search drivers build automatically when every row of
  a batch continues the same prompt.

With none of the optional arguments, `LlamaModel` traces the very program it traced before they existed.
Params are plain pytrees, so jax.tree utilities, sharding and orbax work on them unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import jax

OPTIONAL_MODEL_MEMBERS = ("embed", "truncate", "supports_shared_prefix")


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B,T,V], or [B,K,V] with logits_at
    hidden: jax.Array  # [B,T,E] final-norm hidden states
    cache: Any
    layer_hidden: Optional[jax.Array] = None  # [L+1,B,T,E] (return_layer_hidden) or [k,B,T,E] (hidden_layers)
    qk: Optional[tuple] = None  # (q [L,B,T,H,D], k [L,B,T,KVH,D]) with collect_qk=True
    residual: Optional[jax.Array] = None  # [B,T,E] last run layer's output before the final norm (layer_range)
    kv: Optional[tuple] = None  # (k, v [L,B,T,KVH,D]) of the block, not yet written (write_cache=False)


class DecoderModel(Protocol):
    """What a decoder may call on a model. The required members are the first five; the rest are
    optional (see the module docstring) and a model without them simply cannot serve the methods that
    use them. Keyword arguments after ``*`` are optional to implement: callers pass them only when a
    method needs them."""

    vocab_size: int
    num_layers: int
    eos_ids: tuple

    def __call__(self, params, tokens: Optional[jax.Array], positions: jax.Array, cache,
                 mask: Optional[jax.Array] = None, layers: Optional[jax.Array] = None,
                 logits_at: Optional[jax.Array] = None, return_layer_hidden: bool = False,
                 attn_fn: Optional[Callable] = None, attn_extra: Any = None, collect_qk: bool = False, *,
                 embeds: Optional[jax.Array] = None, attention: Union[str, jax.Array] = "causal",
                 hidden_layers: Optional[tuple] = None, layer_range: Optional[tuple] = None,
                 hidden_in: Optional[jax.Array] = None) -> ModelOutput:
        """``tokens [B,T]`` int (or None with ``embeds``/``hidden_in [B,T,E]``); ``positions [B,T]``;
        ``cache`` (see `init_cache`); ``mask [B,T,T]`` block mask; ``layers [L]`` traced on/off;
        ``logits_at [B,K]``; ``return_layer_hidden``: ``layer_hidden [L+1,B,T,E]``; ``attn_fn``/
        ``attn_extra``/``collect_qk``: per-layer attention hook and q/k capture; ``embeds``: input
        vectors instead of tokens; ``attention``: "causal" | "bidirectional" | bool ``[B,T,S+T]``;
        ``hidden_layers``: ``layer_hidden [k,B,T,E]`` of chosen layer counts; ``layer_range=(a, b)``
        with ``hidden_in``: run layers a .. b-1 only (``residual`` out)."""
        ...

    def init_cache(self, batch: int, size: int): ...

    def embed(self, params, ids: jax.Array) -> jax.Array:
        """Optional: input embeddings ``[..., E]`` float32 of ``ids [...]``."""
        ...

    def truncate(self, params, num_layers: int) -> tuple:
        """Optional: ``(model, params)`` of the first ``num_layers`` layers."""
        ...

    # Optional attributes, read through `jaxdec.core.protocols.hook` with the defaults declared there:
    # ``pad_id`` (0), ``max_position`` (None: no context limit checked), ``supports_shared_prefix`` (False).


def require(model, member: str, purpose: str):
    """``getattr(model, member)``, or a TypeError naming the missing optional member and who needs it."""
    fn = getattr(model, member, None)
    if fn is None:
        raise TypeError(f"{type(model).__name__} has no `{member}`, which {purpose} needs "
                        f"(see jaxdec.models.interface.DecoderModel)")
    return fn
