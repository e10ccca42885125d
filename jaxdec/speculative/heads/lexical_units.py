"""Lexical-unit decoding (Sun et al. 2024, "Decoding at the Speed of Thought: Harnessing Parallel Decoding of
Lexical Units for LLMs", LREC-COLING 2024) as a verified drafter on a frozen target.

The paper's observation: a pre-trained LM predicts some runs of contiguous tokens with high confidence (a
*lexical unit*); such a run can be decoded in parallel. Its labels are data-driven: on the model's own
generations, a token belongs to the current unit while the model's probability of it passes a threshold
``alpha``; the paper fine-tunes the LM itself to emit a whole unit in one step and accepts it without a
verification pass.

Our adaptation (the target stays frozen; decoding stays lossless):

* A small head on the target's final-norm hidden state ``h_t`` (Medusa-style: ``max_unit`` residual blocks
  ``x + SiLU(W x + b)`` zero-initialised, then the target's own frozen LM head, optionally only the rows
  ``d2t`` of a reduced draft vocabulary) predicts the tokens ``x_{t+2} .. x_{t+1+k}`` that follow the
  target's own next token ``x_{t+1}``, and a *unit-end* classifier ``softmax(W_len h_t + b_len)`` over
  ``0 .. k``: how many of those tokens belong to the lexical unit (the label: the longest run from
  ``x_{t+2}`` on whose target probabilities all pass ``alpha``, see ``train/lexical_units.py``).
* `LexicalUnitDrafter` proposes the predicted unit: the chain of the k heads' top-1 tokens cut at the
  predicted unit end ``m`` (the largest j with ``P(unit length >= j) >= cut``; nodes past it are
  invalid, so they are never accepted). The engine verifies it against the target (greedy verification):
  the output is exactly the greedy output, and τ measures how much of the unit was accepted.
* With ``tree=`` (a `TreeSpec`, as Medusa's): alternative units. A node at depth d with sibling rank r
  takes head d - 1's r-th best token, so the tree holds several candidate units sharing prefixes, and the
  same unit-end cut applies per depth (nodes deeper than the predicted unit are invalid). This extension is
  ours (the paper decodes one unit); the chain is the default.
* ``lossy=True``: the paper's unverified acceptance. Every drafted unit token is accepted as it is (the
  drafter's `target_logits` hook makes each kept unit token the verifier's choice at its parent), and the
  target's own token follows the unit. Tokens per model call = 1 + the kept unit length, whatever the target
  would have said: NOT the greedy output (named lossy everywhere). The verify call still runs over the unit,
  as the paper's next step does, to write its keys and values and give the next hidden state.

Params: ``{"w": [K,L,E,E], "b": [K,L,E], "len_w": [E,K+1], "len_b": [K+1]}`` (K = ``max_unit``); the
drafter's params are ``{"heads": those, "target": target params}`` plus ``"d2t"``/``"head_w"`` with a draft
vocabulary (`build` makes them).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.speculative.heads.medusa import (MedusaConfig, head_logits as _medusa_logits, ranked_tree_tokens,
                                             split_draft_params)
from jaxdec.speculative.tree import Draft, TreeSpec

KIND = "lud"


@dataclasses.dataclass(frozen=True)
class LUDConfig:
    hidden: int  # the target's hidden size E
    max_unit: int = 4  # k: tokens a unit may hold after the target's own next token (heads)
    num_layers: int = 1  # residual blocks per token head
    draft_vocab: int = 0  # > 0: the token heads score only these many target tokens (d2t); 0: all
    alpha: float = 0.9  # the labelling threshold the heads were trained with (metadata; labels are made in train/)
    cut: float = 0.5  # the drafter keeps unit token j while P(unit length >= j) >= cut

    def __post_init__(self):
        for name in ("hidden", "max_unit", "num_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"LUDConfig.{name} must be an integer >= 1, got {v!r}")
        v = self.draft_vocab
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"LUDConfig.draft_vocab must be an integer >= 0 (0: full vocabulary), got {v!r}")
        for name in ("alpha", "cut"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 < v < 1.0:
                raise ValueError(f"LUDConfig.{name} must be a number in (0, 1), got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LUDConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or "hidden" not in d:
            raise ValueError(f"lud config must be a dict with keys among {sorted(names)} (hidden required), got {d!r}")
        return cls(**d)

    @property
    def token_config(self) -> MedusaConfig:
        """The token heads are Medusa heads (one per unit position)."""
        return MedusaConfig(hidden=self.hidden, num_heads=self.max_unit, num_layers=self.num_layers,
                            draft_vocab=self.draft_vocab)


def param_shapes(config: LUDConfig) -> dict:
    k, l, e = config.max_unit, config.num_layers, config.hidden
    return {"w": (k, l, e, e), "b": (k, l, e), "len_w": (e, k + 1), "len_b": (k + 1,)}


def init_params(config: LUDConfig, seed: int = 0) -> dict:
    """Zero token heads (an untrained head repeats the target's next-token prediction) and a small random
    unit-end classifier (``seed``)."""
    shapes = param_shapes(config)
    out = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    out["len_w"] = 0.01 * jax.random.normal(jax.random.key(seed), shapes["len_w"], jnp.float32)
    return out


def check_params(config: LUDConfig, hp, where: str = "lud heads") -> None:
    want = param_shapes(config)
    if not isinstance(hp, dict) or set(want) - set(hp):
        raise ValueError(f"{where}: params must be a dict with {sorted(want)}, got "
                         f"{sorted(hp) if isinstance(hp, dict) else type(hp).__name__}")
    for k, s in want.items():
        if tuple(np.shape(hp[k])) != s:
            raise ValueError(f"{where}: {k} has shape {tuple(np.shape(hp[k]))}, the config needs {s}")


def token_logits(config: LUDConfig, hp, model, target_params, hidden, head_w=None):
    """``hidden [..., E]`` -> ``[K, ..., V or Vd]``: token head j (0-based) scores ``x_{t+2+j}``."""
    return _medusa_logits(config.token_config, {"w": hp["w"], "b": hp["b"]}, model, target_params, hidden, head_w)


def length_logits(config: LUDConfig, hp, hidden):
    """``hidden [..., E]`` -> ``[..., K+1]``: logits of the unit length (tokens after the next one) 0 .. K."""
    return hidden.astype(jnp.float32) @ hp["len_w"] + hp["len_b"]


def predicted_length(config: LUDConfig, len_logits, cut: Optional[float] = None):
    """``[..., K+1]`` -> ``[...]`` int32: the largest j with ``P(length >= j) >= cut`` (0 when none)."""
    cut = config.cut if cut is None else cut
    p = jax.nn.softmax(len_logits.astype(jnp.float32), axis=-1)
    at_least = jnp.flip(jnp.cumsum(jnp.flip(p, -1), -1), -1)[..., 1:]  # [..., K]: P(L >= j), j = 1..K
    return jnp.sum(at_least >= cut, axis=-1).astype(jnp.int32)  # non-increasing in j, so a count is the cut


# --------------------------------------------------------------------------------------------------
# drafter
# --------------------------------------------------------------------------------------------------

@struct.dataclass
class LUDState:
    """hidden: [B,E] the target's final-norm hidden state whose next token is ``state.last``."""

    hidden: jax.Array


@dataclasses.dataclass(frozen=True)
class LexicalUnitDrafter:
    """Drafts the predicted lexical unit: a chain of ``max_unit`` tokens (or the static ``tree`` of
    alternative units) whose nodes past the predicted unit end are invalid (never accepted). The unit-end
    probability is ``dparams["cut"]`` (a traced scalar, so decoders with other cuts share one compilation),
    else the config's."""

    config: LUDConfig
    tree: Optional[TreeSpec] = None
    lossy: bool = False  # accept the kept unit tokens unverified (the paper's decoding; not lossless)

    own_params = True
    draft_calls_per_step = 0  # the head is not a model call (its cost shows in wall time)

    def __post_init__(self):
        if not isinstance(self.config, LUDConfig):
            raise TypeError(f"LexicalUnitDrafter.config must be an LUDConfig, got {type(self.config).__name__}")
        if self.tree is not None:
            if not isinstance(self.tree, TreeSpec):
                raise TypeError(f"LexicalUnitDrafter.tree must be a TreeSpec or None, got {type(self.tree).__name__}")
            if self.tree.max_depth > self.config.max_unit:
                raise ValueError(f"lud tree depth {self.tree.max_depth} exceeds the heads' max_unit "
                                 f"{self.config.max_unit} (a node at depth d uses token head d - 1)")
        if self.lossy and not self.is_chain:
            raise ValueError("lud: lossy=True accepts one unit unverified, so it needs the chain (tree=None)")

    @property
    def spec(self) -> TreeSpec:
        return self.tree if self.tree is not None else TreeSpec.chain(self.config.max_unit)

    num_nodes = property(lambda self: self.spec.num_nodes)
    max_depth = property(lambda self: self.spec.max_depth)
    max_children = property(lambda self: self.spec.max_branching)
    is_chain = property(lambda self: self.spec.parents == tuple(range(self.spec.num_nodes)))

    @staticmethod
    def _split(dparams):
        return split_draft_params(dparams, "LexicalUnitDrafter", ("heads", "target"),
                                  "jaxdec.speculative.heads.lexical_units.build")

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        from jaxdec.cache.kv import rollback
        hp, tp = self._split(dparams)
        last = jnp.take_along_axis(prompts, (prompt_lens - 1)[:, None], axis=1).astype(jnp.int32)
        pos = (prompt_lens - 1)[:, None].astype(jnp.int32)
        out = model(tp, last, pos, rollback(state.cache, prompt_lens - 1))  # the cache written here is dropped
        if out.hidden.shape[-1] != self.config.hidden:
            raise ValueError(f"lud heads were built for hidden size {self.config.hidden}, the target's is "
                             f"{out.hidden.shape[-1]}")
        return LUDState(hidden=out.hidden[:, 0].astype(jnp.float32))

    def propose(self, model, dparams, state, keys):
        hp, tp = self._split(dparams)
        ds = state.method.draft
        spec = self.spec
        logits = token_logits(self.config, hp, model, tp, ds.hidden, dparams.get("head_w"))  # [K,B,V|Vd]
        toks = ranked_tree_tokens(spec, logits, dparams.get("d2t") if self.config.draft_vocab else None)  # [B,N]
        m = predicted_length(self.config, length_logits(self.config, hp, ds.hidden), dparams.get("cut"))  # [B]
        depth = jnp.asarray(spec.depths[1:], jnp.int32)  # node depth 1.. (the unit's token index + 1)
        valid = depth[None, :] <= m[:, None]
        return Draft(toks, spec.parents_array(toks.shape[0]), valid), ds, state.cache

    def target_logits(self, logits, draft, dstate):
        """Lossless: the target's logits. lossy: at block index i (the parent of chain node i) every kept
        unit token ``draft.tokens[:, i]`` is raised above the row's largest logit, so greedy verification
        takes the whole kept unit; the bonus after it is the target's own choice."""
        if not self.lossy:
            return logits
        b = draft.tokens.shape[0]
        n = min(draft.tokens.shape[1], logits.shape[1])  # a verify bucket may hold fewer positions (no kept node past it)
        x = logits.astype(jnp.float32)
        at = x[:, :n]  # [B,n,V]: block positions 0 .. n-1, the parents of chain nodes 0 .. n-1
        top = jnp.max(at, axis=-1)  # [B,n]
        forced = at.at[jnp.arange(b)[:, None], jnp.arange(n)[None, :], draft.tokens[:, :n]].set(top + 1e4)
        at = jnp.where(draft.valid[:, :n, None], forced, at)
        return jnp.concatenate([at, x[:, n:]], axis=1).astype(logits.dtype)

    def update(self, model, dparams, state, dstate, info):
        node = jnp.take_along_axis(info.path, info.n_acc[:, None], axis=1)  # [B,1] block index of the last accepted
        h = jnp.take_along_axis(info.hidden, node[:, :, None], axis=1)[:, 0].astype(jnp.float32)
        keep = info.live & (info.cnt > 0)
        return dstate.replace(hidden=jnp.where(keep[:, None], h, dstate.hidden))


# --------------------------------------------------------------------------------------------------
# loading and the constructor
# --------------------------------------------------------------------------------------------------

def load_lud(path: str, fingerprint: Optional[str]):
    """(LUDConfig, head params as jax arrays, metadata, d2t or None) from a heads file, refused with
    `HeadsMismatch` when it was trained for another target (``fingerprint=None`` skips the check)."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    d2t = params.pop("d2t", None)
    try:
        config = LUDConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad lud config in its metadata ({e})") from None
    check_params(config, params, f"heads file {str(path)!r} (corrupt file)")
    if set(params) != set(param_shapes(config)):
        raise ValueError(f"heads file {str(path)!r}: unexpected tensors {sorted(set(params) - set(param_shapes(config)))} "
                         f"(corrupt file)")
    if (d2t is None) != (config.draft_vocab == 0) or (d2t is not None and np.shape(d2t) != (config.draft_vocab,)):
        raise ValueError(f"heads file {str(path)!r}: its d2t map {None if d2t is None else np.shape(d2t)} does not "
                         f"match draft_vocab={config.draft_vocab} (corrupt file)")
    return config, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, meta, d2t


def build(model, params, heads, target=None, cut: Optional[float] = None, tree: Optional[TreeSpec] = None,
          lossy: bool = False):
    """-> (decoder, params): lexical-unit drafting for the target, greedy verification (lossless).

    heads: a heads file written by ``train/lexical_units.py`` (checked against the target: `HeadsMismatch`
    when it was trained for another one) or an in-memory ``(LUDConfig, head params, d2t or None)`` triple
    (no check). target: the target's model file or folder (``m.path``), or a fingerprint string; None: the
    params are fingerprinted (`params_fingerprint`). cut: the unit-end probability (None: the config's).
    tree: a static `TreeSpec` of alternative units (None: the chain of the heads' top-1 tokens). lossy: the
    paper's unverified acceptance of the kept unit (chain only; NOT the greedy output)."""
    from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    from jaxdec.speculative.heads.medusa import draft_head
    if isinstance(heads, tuple) and len(heads) == 3 and isinstance(heads[0], LUDConfig):
        config, hp, d2t = heads
        check_params(config, hp)
    elif isinstance(heads, (str, os.PathLike)):
        fp = expected_fingerprint(model, params, target)
        config, hp, _, d2t = load_lud(heads, fp)
    else:
        raise TypeError(f"heads must be a heads file path or an (LUDConfig, params, d2t) triple, got "
                        f"{type(heads).__name__}")
    if cut is not None and (isinstance(cut, bool) or not isinstance(cut, (int, float)) or not 0.0 < cut < 1.0):
        raise ValueError(f"lud: cut must be a number in (0, 1), got {cut!r}")
    if not isinstance(lossy, (bool, np.bool_)):
        raise ValueError(f"lud: lossy must be True or False, got {lossy!r}")
    dparams = {"heads": hp, "target": params, "cut": jnp.float32(config.cut if cut is None else cut)}
    if config.draft_vocab:
        d2t = None if d2t is None else np.asarray(d2t)
        if (d2t is None or d2t.shape != (config.draft_vocab,) or not np.issubdtype(d2t.dtype, np.integer)
                or d2t.min() < 0 or d2t.max() >= model.vocab_size):
            raise ValueError(f"lud: d2t must be {config.draft_vocab} token ids in [0, {model.vocab_size})")
        dparams["d2t"] = d2t.astype(np.int32)
        dparams["head_w"] = draft_head(model, params, d2t)
    elif d2t is not None:
        raise ValueError("lud: d2t must be None when the config's draft_vocab is 0")
    return SpeculativeDecoder(LexicalUnitDrafter(config, tree, bool(lossy)), "greedy"), with_draft_params(params, dparams)
