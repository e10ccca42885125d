"""Hidden-transfer drafting (Wu et al. 2024, "Parallel Decoding via Hidden Transfer for Lossless Large
Language Model Acceleration").

The idea of the paper: at an intermediate layer ``t`` of the target, the residual stream of the context is
*transferred* (a learned linear map) into pseudo hidden states of the next ``k`` positions; those pseudo
states then run through the target's own remaining layers ``[t, L)`` (attending to the real context's keys
and values, causally to each other) and its final norm and LM head, so each future position gets the
semantic refinement of the upper layers before its token is predicted. Only the transfer is trained (the
target is frozen); the draft is verified by the target (tree attention), so decoding is lossless.

This module's form (the paper's transfer is a linear map per future offset of the context's layer-t
states; the details below are this module's choices):

* The anchor is the last committed position ``n`` (the accepted node whose logits gave the pending token
  ``x_{n+1}`` = ``state.last``). Its residual after ``t`` layers, ``h = h^t_n``, comes for free from the
  verify call (``target_hidden_layers = (t,)``, `VerifyInfo.layer_hidden`).
* Pseudo state of position ``n + i`` (i = 1..k): ``p_i = h + rms(h) * (W_i [nrm(h) ; nrm(e)] + b_i)``, with
  ``e`` the target's input embedding of the known pending token ``x_{n+1}`` (``nrm`` = RMS normalisation
  without a weight, ``rms(h)`` the scalar RMS of ``h``: the learned correction is relative to the residual's
  scale, which grows with depth). Feeding ``e`` is this module's addition: position ``n+1``'s token is
  already known when drafting, and without it the first pseudo state would have to guess it. ``W_i``
  starts at zero (plus tiny noise), i.e. an untrained transfer copies ``h`` to every future position.
* Pseudo position ``n + i`` predicts the token at ``n + i + 1``: the k pseudo states draft
  ``x_{n+2} .. x_{n+k+1}``, i.e. the k tokens after the pending one.
* The draft call: ``model(target params, None, positions n+1 .. n+k, cache, hidden_in=p,
  layer_range=(t, L))`` on the engine's cache (the committed real positions ``0..n``); the cache it returns
  is discarded (the verify call writes the real entries). Cost per step: one partial forward of
  ``(L - t) / L`` of the target over k positions (``draft_cost``).
* Draft: the chain of each position's argmax, or a Medusa-style static tree (``tree``: node at depth d
  with sibling rank r takes the r-th best token of pseudo position d); ``sample=True`` (a chain): each
  token drawn from its position's processed distribution and the drafts carry those ``q`` (lossless
  speculative sampling).

Params: ``{"w": [k, E, 2E], "b": [k, E]}``; the drafter's params are ``with_draft_params(target, {"heads":
those, "target": target params})`` (`build` makes them).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.speculative.heads.medusa import split_draft_params
from jaxdec.speculative.tree import Draft, TreeSpec

KIND = "hidden_transfer"


@dataclasses.dataclass(frozen=True)
class HiddenTransferConfig:
    hidden: int  # the target's E
    num_layers: int  # the target's L
    layer: int  # t: the transfer acts on the residual after t layers (1 <= t < L); layers [t, L) refine it
    num_tokens: int = 4  # k pseudo positions = tokens drafted per step
    rms_eps: float = 1e-6

    def __post_init__(self):
        for name in ("hidden", "num_layers", "layer", "num_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"HiddenTransferConfig.{name} must be an integer >= 1, got {v!r}")
        if not self.layer < self.num_layers:
            raise ValueError(f"HiddenTransferConfig.layer must be in [1, num_layers={self.num_layers}), got "
                             f"{self.layer!r}")
        v = self.rms_eps
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not v > 0:
            raise ValueError(f"HiddenTransferConfig.rms_eps must be a number > 0, got {v!r}")

    @property
    def draft_cost(self) -> float:
        """The draft's target compute per step, in target forwards per position: (L - t) / L."""
        return (self.num_layers - self.layer) / self.num_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HiddenTransferConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        need = {"hidden", "num_layers", "layer"}
        if not isinstance(d, dict) or set(d) - names or not need <= set(d):
            raise ValueError(f"hidden_transfer config must be a dict with keys among {sorted(names)} "
                             f"({', '.join(sorted(need))} required), got {d!r}")
        return cls(**d)


def param_shapes(config: HiddenTransferConfig) -> dict:
    k, e = config.num_tokens, config.hidden
    return {"w": (k, e, 2 * e), "b": (k, e)}


def init_params(config: HiddenTransferConfig, seed: int = 0, noise: float = 1e-3) -> dict:
    """Fresh transfer: ``W`` at (nearly) zero, so every pseudo state starts as a copy of ``h``."""
    k, e = config.num_tokens, config.hidden
    w = jax.random.normal(jax.random.key(seed), (k, e, 2 * e), jnp.float32) * (noise / np.sqrt(2 * e))
    return {"w": w, "b": jnp.zeros((k, e), jnp.float32)}


def check_params(config: HiddenTransferConfig, params, where: str = "hidden_transfer params") -> None:
    """ValueError naming the first tensor that is missing or whose shape does not match the config."""
    want = param_shapes(config)
    if not isinstance(params, dict) or set(params) != set(want):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{where}: params must be a dict with keys {sorted(want)}, got {got}")
    for name, s in want.items():
        if tuple(np.shape(params[name])) != s:
            raise ValueError(f"{where}: {name} has shape {tuple(np.shape(params[name]))}, the config needs {s}")


def _nrm(x, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def transfer(config: HiddenTransferConfig, hp, h, emb):
    """``h [..., E]`` (the anchor's residual after ``layer`` layers), ``emb [..., E]`` (the embedding of the
    pending token) -> pseudo states ``[..., k, E]`` of the next k positions."""
    eps = config.rms_eps
    h = h.astype(jnp.float32)
    scale = jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)[..., None, :]  # [...,1,1]
    x = jnp.concatenate([_nrm(h, eps), _nrm(emb, eps)], axis=-1)  # [...,2E]
    delta = jnp.einsum("...i,koi->...ko", x, hp["w"]) + hp["b"]  # [...,k,E]
    return h[..., None, :] + scale * delta


def target_embed(model, target_params, ids):
    """The target's input embeddings of ``ids`` (``model.embed``, else its ``embed`` table) as float32."""
    fn = getattr(model, "embed", None)
    if fn is not None:
        return fn(target_params, ids).astype(jnp.float32)
    from jaxdec.quant import embed_lookup
    return embed_lookup(target_params["embed"], ids).astype(jnp.float32)


def pseudo_logits(config: HiddenTransferConfig, model, hp, tp, h, last, cache):
    """The draft call: pseudo states from ``h [B,E]`` and the pending tokens ``last [B]`` run through layers
    ``[layer, L)`` at positions ``cache.lengths + 0..k-1`` on ``cache`` (not kept) -> logits ``[B,k,V]``."""
    p = transfer(config, hp, h, target_embed(model, tp, last.astype(jnp.int32)))
    pos = cache.lengths[:, None].astype(jnp.int32) + jnp.arange(config.num_tokens, dtype=jnp.int32)[None]
    out = model(tp, None, pos, cache, hidden_in=p, layer_range=(config.layer, config.num_layers))
    return out.logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# drafter
# --------------------------------------------------------------------------------------------------

@struct.dataclass
class HiddenTransferState:
    """h: [B,E] the target's residual after ``layer`` layers at the last committed position (whose next
    token is ``state.last``)."""

    h: jax.Array


@dataclasses.dataclass(frozen=True)
class HiddenTransferDrafter:
    """Drafts with hidden transfer (see the module docstring); ``tree`` defaults to the chain of the k
    pseudo positions; ``sample``: a chain drawn from each position's distribution (sampling verifier)."""

    config: HiddenTransferConfig
    tree: Optional[TreeSpec] = None
    sample: bool = False

    own_params = True
    extra_headroom = 0
    draft_calls_per_step = 0  # a partial target call of draft_cost forwards (its cost shows in wall time)

    def __post_init__(self):
        if not isinstance(self.config, HiddenTransferConfig):
            raise TypeError(f"HiddenTransferDrafter.config must be a HiddenTransferConfig, got "
                            f"{type(self.config).__name__}")
        if self.tree is not None:
            if not isinstance(self.tree, TreeSpec):
                raise TypeError(f"HiddenTransferDrafter.tree must be a TreeSpec or None, got {type(self.tree).__name__}")
            if self.tree.max_depth > self.config.num_tokens:
                raise ValueError(f"HiddenTransferDrafter.tree has depth {self.tree.max_depth}, more than the "
                                 f"{self.config.num_tokens} pseudo positions (node depth d uses position d)")
        if self.sample and not self.is_chain:
            raise ValueError("HiddenTransferDrafter: sample=True drafts a chain only (tree=None or a chain)")

    @property
    def spec(self) -> TreeSpec:
        return self.tree if self.tree is not None else TreeSpec.chain(self.config.num_tokens)

    num_nodes = property(lambda self: self.spec.num_nodes)
    max_depth = property(lambda self: self.spec.max_depth)
    max_children = property(lambda self: self.spec.max_branching)
    is_chain = property(lambda self: self.spec.parents == tuple(range(self.spec.num_nodes)))
    # the verify call returns the residual after `layer` layers at every block node (VerifyInfo.layer_hidden)
    target_hidden_layers = property(lambda self: (self.config.layer,))

    @staticmethod
    def _split(dparams):
        return split_draft_params(dparams, "HiddenTransferDrafter", ("heads", "target"),
                                  "jaxdec.speculative.heads.hidden_transfer.build")

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        from jaxdec.cache.kv import rollback
        _, tp = self._split(dparams)
        c = self.config
        # the residual at the last prompt token: that token re-run on the prompt's cache (not kept)
        last = jnp.take_along_axis(prompts, (prompt_lens - 1)[:, None], axis=1).astype(jnp.int32)
        pos = (prompt_lens - 1)[:, None].astype(jnp.int32)
        out = model(tp, last, pos, rollback(state.cache, prompt_lens - 1), hidden_layers=(c.layer,))
        h = out.layer_hidden[0, :, 0]
        if h.shape[-1] != c.hidden:
            raise ValueError(f"the hidden-transfer drafter was built for hidden size {c.hidden}, the target's is "
                             f"{h.shape[-1]}")
        return HiddenTransferState(h=h.astype(jnp.float32))

    def propose(self, model, dparams, state, keys):
        hp, tp = self._split(dparams)
        ds = state.method.draft
        logits = pseudo_logits(self.config, model, hp, tp, ds.h, state.last, state.cache)  # [B,k,V]
        b = logits.shape[0]
        spec = self.spec
        if self.sample:  # a chain of the k pseudo positions (the sampling spec is the chain)
            from jaxdec.speculative.drafters import sampled_chain
            return sampled_chain(spec, logits, state, keys), ds, state.cache
        r = max(spec.ranks) + 1
        top = jax.lax.top_k(logits, r)[1].astype(jnp.int32)  # [B,k,r]
        depth = np.asarray(spec.depths[1:]) - 1  # pseudo position of each node
        toks = top[:, depth, np.asarray(spec.ranks)]  # [B,N]
        return Draft(toks, spec.parents_array(b), jnp.ones(toks.shape, bool)), ds, state.cache

    def update(self, model, dparams, state, dstate, info):
        node = jnp.take_along_axis(info.path, info.n_acc[:, None], axis=1)  # [B,1] the last accepted node
        h = jnp.take_along_axis(info.layer_hidden[0], node[:, :, None], axis=1)[:, 0].astype(jnp.float32)
        keep = info.live & (info.cnt > 0)
        return dstate.replace(h=jnp.where(keep[:, None], h, dstate.h))


# --------------------------------------------------------------------------------------------------
# loading and the constructor
# --------------------------------------------------------------------------------------------------

def load_hidden_transfer(path: str, fingerprint: Optional[str]):
    """(HiddenTransferConfig, params as float32 jax arrays, metadata) from a heads file, refused with
    `HeadsMismatch` when it was trained for another target (``fingerprint=None`` skips the check)."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    try:
        config = HiddenTransferConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad hidden_transfer config in its metadata ({e})") from None
    check_params(config, params, f"heads file {str(path)!r} (corrupt file)")
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), meta


def build(model, params, heads, target=None, tree: Optional[TreeSpec] = None, sampling: bool = False):
    """-> (decoder, params): hidden-transfer drafting for the target (greedy verification; ``sampling=True``:
    a chain drawn from each pseudo position's distribution, verified by lossless speculative sampling).

    heads: a heads file written by ``train/hidden_transfer.py`` (checked against the target: `HeadsMismatch`
    when it was trained for another one) or an in-memory ``(HiddenTransferConfig, params)`` pair (no check).
    target: the target's model file or folder (``m.path``), or a fingerprint string; None: the params are
    fingerprinted (`params_fingerprint`). tree: a `TreeSpec` of depth <= num_tokens (default: the chain)."""
    from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    if isinstance(heads, tuple) and len(heads) == 2 and isinstance(heads[0], HiddenTransferConfig):
        config, hp = heads
        check_params(config, hp)
    elif isinstance(heads, (str, os.PathLike)):
        fp = expected_fingerprint(model, params, target)
        config, hp, _ = load_hidden_transfer(heads, fp)
    else:
        raise TypeError(f"heads must be a heads file path or a (HiddenTransferConfig, params) pair, got "
                        f"{type(heads).__name__}")
    mc = getattr(model, "config", None)
    if mc is None or not hasattr(mc, "num_layers") or not hasattr(mc, "hidden_size"):
        raise TypeError(f"hidden transfer needs a layered target (a LlamaModel with layer_range), got "
                        f"{type(model).__name__}")
    if (mc.num_layers, mc.hidden_size) != (config.num_layers, config.hidden):
        raise ValueError(f"heads: the transfer was built for {config.num_layers} layers of size {config.hidden}, the "
                         f"target has {mc.num_layers} of size {mc.hidden_size}")
    if sampling and tree is not None and tree.parents != tuple(range(tree.num_nodes)):
        raise ValueError("sampling=True drafts a chain: pass tree=None (or a chain)")
    drafter = HiddenTransferDrafter(config, tree, sample=bool(sampling))
    verifier = "sampling" if sampling else "greedy"
    return SpeculativeDecoder(drafter, verifier), with_draft_params(params, {"heads": hp, "target": params})
