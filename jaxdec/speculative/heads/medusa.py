"""Medusa-1 draft heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads"): K heads on the target's final-norm hidden state ``h_t``; head k (0-based)
predicts the token ``k + 2`` positions ahead (the target's own LM head predicts ``t + 1``).

Each head is ``num_layers`` residual blocks ``x + SiLU(W x + b)`` (W initialised to zero, so an untrained
head repeats the target's next-token prediction) followed by the target's own LM head, shared and
frozen (the paper trains a copy per head; sharing keeps an artefact at K x (E^2 + E) floats, 5.3 MB for
four heads on SmolLM2-135M, and lets one matmul read the LM head once for all K heads).

* `MedusaConfig`, `MedusaHeads` (flax.linen): the module; `init_params`, `head_logits`.
* `MedusaDrafter`: the `Drafter`. After each verify call it keeps the target's hidden state at the
  last accepted node (the one whose logits gave the bonus token ``state.last``); `propose` runs the
  heads on it and fills a static tree: node i at depth d with sibling rank r takes the r-th best token
  of head d - 1 (Medusa's Cartesian-product trees; the default tree is the chain of each head's top-1).
  Params: ``with_draft_params(target_params, {"heads": head params, "target": target_params})``
  (`jaxdec.speculative.methods.medusa` builds it; with a reduced draft vocabulary it adds ``"d2t"`` and
  ``"head_w"``, the LM-head rows of those tokens, so a draft step reads Vd rows, not all V). Greedy
  verification (lossless for greedy decoding), or ``sample=True`` with a chain: each head's token is
  drawn from its distribution under the rows' sampling parameters and the drafts carry those ``q``,
  so the sampling verifier is lossless for sampling.
* `load_medusa`: a heads file (`jaxdec.speculative.heads.artefact`) checked against the target.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.speculative.tree import Draft, TreeSpec

KIND = "medusa"


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    hidden: int  # the target's hidden size E
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    draft_vocab: int = 0  # > 0: the heads score only these many target tokens (``d2t``); 0: the whole vocabulary

    def __post_init__(self):
        for name in ("hidden", "num_heads", "num_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"MedusaConfig.{name} must be an integer >= 1, got {v!r}")
        v = self.draft_vocab
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"MedusaConfig.draft_vocab must be an integer >= 0 (0: full vocabulary), got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MedusaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or "hidden" not in d:
            raise ValueError(f"medusa config must be a dict with keys {sorted(names)}, got {d!r}")
        return cls(**d)


class MedusaHeads(nn.Module):
    """``h [..., E] -> [K, ..., E]``: each head's residual blocks (before the shared LM head)."""

    config: MedusaConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        w = self.param("w", nn.initializers.zeros, (c.num_heads, c.num_layers, c.hidden, c.hidden))
        b = self.param("b", nn.initializers.zeros, (c.num_heads, c.num_layers, c.hidden))
        x = jnp.broadcast_to(h.astype(jnp.float32), (c.num_heads,) + h.shape)
        for layer in range(c.num_layers):
            y = jnp.einsum("k...i,koi->k...o", x, w[:, layer]) + b[:, layer].reshape(
                (c.num_heads,) + (1,) * (h.ndim - 1) + (c.hidden,))
            x = x + jax.nn.silu(y)
        return x


def init_params(config: MedusaConfig, seed: int = 0) -> dict:
    """Zero-initialised head params ``{"w": [K,L,E,E], "b": [K,L,E]}`` (untrained heads repeat the
    target's next-token prediction)."""
    return MedusaHeads(config).init(jax.random.key(seed), jnp.zeros((1, config.hidden)))["params"]


def lm_head(model, target_params):
    """The target's LM head weight ``[V, E]`` (float or `QTensor`): ``lm_head`` or the tied ``embed``."""
    if not isinstance(target_params, dict) or not ({"lm_head", "embed"} & set(target_params)):
        raise TypeError(f"{type(model).__name__}: Medusa heads share the target's LM head and need params with "
                        "'lm_head' or a tied 'embed' (the Llama layout, jaxdec/models/llama.py)")
    return target_params["lm_head"] if "lm_head" in target_params else target_params["embed"]


def draft_head(model, target_params, d2t=None):
    """The weight the heads' logits use: the target's LM head, or only its rows ``d2t [Vd]`` (a reduced
    draft vocabulary, EAGLE-3's d2t map; a `QTensor` head stays quantized, only the rows are gathered)."""
    w = lm_head(model, target_params)
    if d2t is None:
        return w
    from jaxdec.quant import PackedQ8, QTensor, pack_q8, unpack_q8
    ids = jnp.asarray(d2t, jnp.int32)
    packed = isinstance(w, PackedQ8)  # int8 activations (activations="q8"): gather rows, then repack them
    if packed:
        w = unpack_q8(w)
    if isinstance(w, QTensor):
        rows = QTensor(jnp.take(w.codes, ids, axis=0), jnp.take(w.scale, ids, axis=0),
                       None if w.offset is None else jnp.take(w.offset, ids, axis=0), w.kind)
        return pack_q8(rows) if packed else rows
    return jnp.take(w, ids, axis=0)


def head_logits(config: MedusaConfig, head_params, model, target_params, hidden, head_w=None):
    """``hidden [..., E]`` (final-norm) -> logits ``[K, ..., V]`` of the K heads (one matmul with the
    LM head, or with ``head_w`` = `draft_head` rows: ``[K, ..., Vd]`` over the draft vocabulary)."""
    from jaxdec.quant import matmul
    x = MedusaHeads(config).apply({"params": head_params}, hidden)
    return matmul(x, lm_head(model, target_params) if head_w is None else head_w)


# --------------------------------------------------------------------------------------------------
# drafter
# --------------------------------------------------------------------------------------------------

def ranked_tree_tokens(spec: TreeSpec, logits, d2t=None):
    """Per-head scores ``[K,B,V or Vd]`` -> the static tree's tokens ``[B,N]``: node i at depth d with sibling
    rank r takes the r-th best token of head d - 1 (``d2t``: draft ids -> target ids)."""
    top = jax.lax.top_k(logits, max(spec.ranks) + 1)[1].astype(jnp.int32)  # [K,B,r]
    if d2t is not None:
        top = jnp.asarray(d2t, jnp.int32)[top]
    depth = np.asarray(spec.depths[1:]) - 1  # head of each node
    return top[depth, :, np.asarray(spec.ranks)].T


@struct.dataclass
class MedusaState:
    """hidden: [B,E] the target's final-norm hidden state whose next token is ``state.last``."""

    hidden: jax.Array


def _check_tree(tree: TreeSpec, num_heads: int) -> None:
    if tree.max_depth > num_heads:
        raise ValueError(f"medusa tree depth {tree.max_depth} exceeds the {num_heads} heads (node depth d uses "
                         f"head d)")


def split_draft_params(dparams, who: str, keys: tuple, builder: str) -> tuple:
    """The drafter's part of ``params = with_draft_params(target, {...})``: its ``keys`` in order, or a
    ValueError naming the drafter, the keys it needs and the constructor that builds them."""
    if not (isinstance(dparams, dict) and set(keys) <= set(dparams)):
        raise ValueError(f"{who} needs params=with_draft_params(target, {{{', '.join(repr(k) for k in keys)}}}) "
                         f"({builder} builds them)")
    return tuple(dparams[k] for k in keys)


@dataclasses.dataclass(frozen=True)
class MedusaDrafter:
    """Drafts with Medusa heads (see the module docstring); ``tree`` defaults to the chain of all heads."""

    config: MedusaConfig
    tree: Optional[TreeSpec] = None
    sample: bool = False  # draw the chain's tokens (sampling verification) instead of top-ranked ones

    own_params = True
    draft_calls_per_step = 0  # the heads are not model calls (their cost shows in wall time)

    def __post_init__(self):
        if not isinstance(self.config, MedusaConfig):
            raise TypeError(f"MedusaDrafter.config must be a MedusaConfig, got {type(self.config).__name__}")
        if self.tree is not None:
            _check_tree(self.tree, self.config.num_heads)
        if self.sample and not self.is_chain:
            raise ValueError("MedusaDrafter: sample=True drafts a chain only (tree=None or a chain)")

    @property
    def spec(self) -> TreeSpec:
        return self.tree if self.tree is not None else TreeSpec.chain(self.config.num_heads)

    num_nodes = property(lambda self: self.spec.num_nodes)
    max_depth = property(lambda self: self.spec.max_depth)
    max_children = property(lambda self: self.spec.max_branching)
    is_chain = property(lambda self: self.spec.parents == tuple(range(self.spec.num_nodes)))

    @staticmethod
    def _split(dparams):
        return split_draft_params(dparams, "MedusaDrafter", ("heads", "target"), "jaxdec.speculative.methods.medusa")

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        from jaxdec.cache.kv import rollback
        hp, tp = self._split(dparams)
        if hp["w"].shape[-1] != self.config.hidden:
            raise ValueError("medusa head params do not match the config's hidden size")
        # the hidden state at the last prompt token: re-run that token on the prompt's cache (the
        # cache written here is thrown away; the engine keeps its own)
        last = jnp.take_along_axis(prompts, (prompt_lens - 1)[:, None], axis=1).astype(jnp.int32)
        pos = (prompt_lens - 1)[:, None].astype(jnp.int32)
        out = model(tp, last, pos, rollback(state.cache, prompt_lens - 1))
        if out.hidden.shape[-1] != self.config.hidden:
            raise ValueError(f"medusa heads were built for hidden size {self.config.hidden}, the target's is "
                             f"{out.hidden.shape[-1]}")
        return MedusaState(hidden=out.hidden[:, 0].astype(jnp.float32))

    def propose(self, model, dparams, state, keys):
        hp, tp = self._split(dparams)
        ds = state.method.draft
        spec = self.spec
        logits = head_logits(self.config, hp, model, tp, ds.hidden, dparams.get("head_w"))  # [K,B,V or Vd]
        if self.sample:
            return self._sampled(model, dparams, state, keys, logits), ds, state.cache
        toks = ranked_tree_tokens(spec, logits, dparams.get("d2t") if self.config.draft_vocab else None)
        b = toks.shape[0]
        valid = jnp.ones(toks.shape, bool)
        return Draft(toks, spec.parents_array(b), valid), ds, state.cache

    def _sampled(self, model, dparams, state, keys, logits):
        """Chain of the K heads' tokens, each drawn from its head's processed distribution ``q``."""
        from jaxdec.speculative.drafters import sampled_chain
        k, b = logits.shape[:2]
        if self.config.draft_vocab:  # scores over the draft vocabulary -> the full vocabulary (others -inf)
            full = jnp.full((k, b, model.vocab_size), -jnp.inf, jnp.float32)
            logits = full.at[:, :, jnp.asarray(dparams["d2t"], jnp.int32)].set(logits.astype(jnp.float32))
        return sampled_chain(self.spec, jnp.swapaxes(logits, 0, 1), state, keys)

    def update(self, model, dparams, state, dstate, info):
        node = jnp.take_along_axis(info.path, info.n_acc[:, None], axis=1)  # [B,1] block index of the last accepted
        h = jnp.take_along_axis(info.hidden, node[:, :, None], axis=1)[:, 0].astype(jnp.float32)
        keep = info.live & (info.cnt > 0)
        return dstate.replace(hidden=jnp.where(keep[:, None], h, dstate.hidden))


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------

def load_medusa(path: str, fingerprint: Optional[str]):
    """(MedusaConfig, head params as jax arrays, metadata, d2t or None) from a heads file, refused with
    `HeadsMismatch` when it was trained for another target (``fingerprint=None`` skips the check)."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    d2t = params.pop("d2t", None)
    try:
        config = MedusaConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad medusa config in its metadata ({e})") from None
    want = {"w": (config.num_heads, config.num_layers, config.hidden, config.hidden),
            "b": (config.num_heads, config.num_layers, config.hidden)}
    got = {k: tuple(np.shape(v)) for k, v in params.items()}
    if got != want:
        raise ValueError(f"heads file {str(path)!r}: tensors {got} do not match its config {want} (corrupt file)")
    if (d2t is None) != (config.draft_vocab == 0) or (d2t is not None and np.shape(d2t) != (config.draft_vocab,)):
        raise ValueError(f"heads file {str(path)!r}: its d2t map {None if d2t is None else np.shape(d2t)} does not "
                         f"match draft_vocab={config.draft_vocab} (corrupt file)")
    return config, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, meta, d2t


def tree_from_meta(meta: dict) -> Optional[TreeSpec]:
    t = meta.get("tree")
    if not t:
        return None
    return TreeSpec(tuple(int(x) for x in t["parents"]), tuple(int(x) for x in t["ranks"]))
