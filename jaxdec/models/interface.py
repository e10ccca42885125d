"""The one small interface through which every decoder talks to a model.

A model is a hashable object (a frozen dataclass; it is a static argument of `jit`) with

    model(params, tokens[B,T], positions[B,T], cache, mask=None, layers=None, logits_at=None,
          return_layer_hidden=False) -> ModelOutput(logits, hidden, cache, layer_hidden, qk)
    model.init_cache(batch, size) -> cache
    model.vocab_size, model.num_layers, model.eos_ids

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

Optional (`LlamaModel` has them; drivers use them only where a model declares them):

* ``attn_fn``/``attn_extra``: a per-layer attention function and its per-layer pytree (leading
  ``[num_layers]`` axis), for methods whose attention needs per-layer state (Double Sparsity);
  ``collect_qk=True`` fills ``qk = (q [L,B,T,H,D], k [L,B,T,KVH,D])`` (post-RoPE).
* ``supports_shared_prefix = True``: the model accepts a shared-prefix `KVCache` (``prefix_k`` set;
  Hydragen attention), which `generate` and the search drivers build automatically when every row of
  a batch continues the same prompt.

Params are plain pytrees, so jax.tree utilities, sharding and orbax work on them unchanged.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol

import jax


class ModelOutput(NamedTuple):
    logits: jax.Array
    hidden: jax.Array
    cache: Any
    layer_hidden: Optional[jax.Array] = None
    qk: Optional[tuple] = None  # (q [L,B,T,H,D], k [L,B,T,KVH,D]) with collect_qk=True


class DecoderModel(Protocol):
    vocab_size: int
    num_layers: int
    eos_ids: tuple

    def __call__(self, params, tokens, positions, cache, mask=None, layers=None, logits_at=None,
                 return_layer_hidden: bool = False) -> ModelOutput: ...

    def init_cache(self, batch: int, size: int): ...
