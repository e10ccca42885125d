"""PPD: parallel prompt decoding (Chen et al. 2024, "Hardware-Aware Parallel Prompt Decoding for
Memory-Efficient Acceleration of LLM Inference"; official code: github.com/hmarkc/parallel-prompt-decoding).

The only trained weights are ``k x e`` prompt-token embeddings (``params = {"prompt": [k, e, E]}``): ``k``
future positions, ``e`` ensemble tokens each. They enter the frozen target through its ``embeds=`` input,
appended after the last committed token ``x_t`` (at position ``L``): prompt token ``(i, j)`` sits at position
``L + 1 + i`` and its output guesses the token at ``L + 2 + i``, i.e. ``i + 2`` tokens after ``x_t``, without
knowing the ``i + 1`` tokens in between.

* **Ensemble attention**: ensemble token ``(i, j)`` sees the context, ``x_t`` and the ensemble tokens
  ``(i', j)`` of the earlier positions ``i' < i`` in the same stream ``j`` (and itself); the ``e`` streams
  never see each other, and the guess for position ``i`` is the average of the ``e`` outputs' logits.
* **Dynamic sparse tree, hardware-aware**: the guesses (top ranks per depth) fill a Medusa-style
  static tree: node at depth ``d`` with rank ``r`` takes the ``r``-th best token of depth ``d``'s guess.
  `dynamic_tree` grows the tree greedily by path probability (per-depth, per-rank acceptance rates, measured
  on held-out data at training time and stored in the heads file) and picks the size whose predicted tokens
  per unit time, ``(1 + E[accepted]) / (c(N + 1) + draft_cost)``, is best on the measured cost curve ``c``
  (`jaxdec.speculative.calibrate.measure_cost_curve`).

This module's drafter (first slice) makes its own target call per step over ``[x_t, prompt tokens]`` on the
committed cache (the keys/values it writes are thrown away): the output at ``x_t`` is the target's own next
token (depth 1 of the draft, always accepted), the prompt tokens' averaged outputs are the guesses for depths
2 .. k + 1. The paper's method rides the prompt tokens in the verify call itself (their outputs at the
accepted node become the next step's guesses), which saves that extra call; the trained embeddings are the
same for both (prompt ``i`` sits ``i + 1`` after the last visible token and guesses the one after it).
Greedy verification gives exactly the greedy tokens whatever the prompt embeddings are.

Sampling (``build(..., sampling=True)``, either layout, a chain only): depth d's token is drawn from guess d's
distribution after the row's sampling processors (`jaxdec.speculative.drafters.draft_distribution`) and the
draft carries those ``q``, so the engine's speculative-sampling verifier (residual resampling) is lossless for
sampling. The guesses depend on the committed tokens only (the inline layout's prompts at the accepted node see
its ancestors and itself, never the bonus token drawn after it), so drawing from them is a valid proposal.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.speculative.heads.medusa import split_draft_params
from jaxdec.speculative.tree import Draft, TreeSpec

KIND = "ppd"


@dataclasses.dataclass(frozen=True)
class PPDConfig:
    hidden: int  # the target's E
    num_tokens: int = 3  # k prompt positions (guesses for depths 2 .. k + 1)
    ensemble: int = 2  # e ensemble tokens per position (their logits averaged)

    def __post_init__(self):
        for name in ("hidden", "num_tokens", "ensemble"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"PPDConfig.{name} must be an integer >= 1, got {v!r}")

    @property
    def num_prompt(self) -> int:
        return self.num_tokens * self.ensemble

    @property
    def depths(self) -> int:
        """Guesses per step: the target's own next token then the k prompt positions."""
        return self.num_tokens + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PPDConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or "hidden" not in d:
            raise ValueError(f"ppd config must be a dict with keys among {sorted(names)} (hidden required), got {d!r}")
        return cls(**d)


def param_shapes(config: PPDConfig) -> dict:
    return {"prompt": (config.num_tokens, config.ensemble, config.hidden)}


def init_params(config: PPDConfig, seed: int = 0, scale: float = 0.02) -> dict:
    """Fresh prompt embeddings: normal with standard deviation ``scale`` (the trainer passes the target's
    embedding-table scale)."""
    return {"prompt": jax.random.normal(jax.random.key(seed), param_shapes(config)["prompt"], jnp.float32) * scale}


def check_params(config: PPDConfig, params, where: str = "ppd params") -> None:
    """ValueError naming the tensor whose shape does not match the config (or a missing/extra one)."""
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a dict of arrays, got {type(params).__name__}")
    want = param_shapes(config)
    if set(params) != set(want):
        raise ValueError(f"{where}: params has keys {sorted(params)}, expected {sorted(want)}")
    for k, s in want.items():
        if tuple(np.shape(params[k])) != s:
            raise ValueError(f"{where}: {k} has shape {tuple(np.shape(params[k]))}, the config needs {s}")


# --------------------------------------------------------------------------------------------------
# layout: positions and the ensemble attention mask
# --------------------------------------------------------------------------------------------------

def prompt_layout(config: PPDConfig):
    """(position index ``i`` [k*e], stream ``j`` [k*e]) of the flattened prompt tokens (``(i, j) -> i*e + j``)."""
    i = np.repeat(np.arange(config.num_tokens), config.ensemble)
    j = np.tile(np.arange(config.ensemble), config.num_tokens)
    return i, j


def ensemble_mask(config: PPDConfig) -> np.ndarray:
    """``[1 + k*e, 1 + k*e]`` bool block mask of ``[x_t, prompt tokens]``: ``x_t`` sees itself; prompt
    ``(i, j)`` sees ``x_t`` and the prompts ``(i', j)`` with ``i' <= i`` (its own stream only)."""
    i, j = prompt_layout(config)
    n = config.num_prompt
    m = np.zeros((n + 1, n + 1), bool)
    m[:, 0] = True
    m[1:, 1:] = (j[:, None] == j[None, :]) & (i[None, :] <= i[:, None])
    return m


def average_ensemble(config: PPDConfig, logits):
    """``[..., k*e, V]`` prompt-token logits -> ``[..., k, V]`` (the mean over each position's ensemble)."""
    sh = logits.shape
    return jnp.mean(logits.astype(jnp.float32).reshape(sh[:-2] + (config.num_tokens, config.ensemble, sh[-1])),
                    axis=-2)


def target_embed(model, target_params, ids):
    fn = getattr(model, "embed", None)
    if fn is None:
        raise TypeError(f"{type(model).__name__}: PPD needs a target with embed() and embeds= input "
                        "(jaxdec.models.interface)")
    return fn(target_params, ids).astype(jnp.float32)


def _check_sample(who: str, sample, is_chain: bool) -> None:
    if not isinstance(sample, (bool, np.bool_)):
        raise TypeError(f"{who}.sample must be a bool, got {type(sample).__name__}")
    if sample and not is_chain:
        raise ValueError(f"{who}: sample=True drafts a chain only (tree=None or a chain)")


def guess_logits(config: PPDConfig, hp, model, target_params, last, cache):
    """One target call over ``[last, prompt tokens]`` on ``cache`` (its writes discarded) -> logits
    ``[B, k+1, V]``: the target's own next token's, then each prompt position's ensemble average."""
    b = last.shape[0]
    n = config.num_prompt
    i, _ = prompt_layout(config)
    x = jnp.concatenate([target_embed(model, target_params, last.astype(jnp.int32))[:, None],
                         jnp.broadcast_to(hp["prompt"].astype(jnp.float32).reshape(1, n, -1),
                                          (b, n, config.hidden))], axis=1)
    rel = jnp.asarray(np.concatenate([[0], 1 + i]), jnp.int32)
    pos = cache.lengths[:, None].astype(jnp.int32) + rel[None]
    mask = jnp.broadcast_to(jnp.asarray(ensemble_mask(config)), (b, n + 1, n + 1))
    kw = {"write_cache": False} if getattr(model, "supports_deferred_kv_write", False) else {}
    out = model(target_params, None, pos, cache, mask=mask, embeds=x, **kw)
    lg = out.logits.astype(jnp.float32)
    return jnp.concatenate([lg[:, :1], average_ensemble(config, lg[:, 1:])], axis=1)


# --------------------------------------------------------------------------------------------------
# the hardware-aware dynamic sparse tree
# --------------------------------------------------------------------------------------------------

def grow_tree(n: int, rank_probs) -> TreeSpec:
    """The ``n``-node tree with the largest expected accepted length when depth ``d`` (1-based) accepts its
    rank-``r`` guess with probability ``rank_probs[d-1][r]`` independently (greedy on path probability,
    Medusa's/PPD's sparse-tree construction). Node at depth d, rank r takes depth d's r-th best token."""
    probs = [list(map(float, p)) for p in rank_probs]
    if n < 1:
        raise ValueError(f"tree size must be >= 1, got {n}")
    parents, ranks, depth, pprob = [], [], [0], [1.0]
    # candidates: (path probability, parent block index, rank)
    cand = {(0, 0): probs[0][0] if probs and probs[0] else 0.0}
    while len(parents) < n and cand:
        (par, r), p = max(cand.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        del cand[(par, r)]
        parents.append(par)
        ranks.append(r)
        node = len(parents)
        d = depth[par] + 1
        depth.append(d)
        pprob.append(p)
        if r + 1 < len(probs[d - 1]):
            cand[(par, r + 1)] = pprob[par] * probs[d - 1][r + 1]
        if d < len(probs):
            cand[(node, 0)] = p * probs[d][0]
    return TreeSpec(tuple(parents), tuple(ranks))


def expected_accepted(tree: TreeSpec, rank_probs) -> float:
    d = tree.depths
    pp = [1.0]
    for idx, (par, r) in enumerate(zip(tree.parents, tree.ranks)):
        pp.append(pp[par] * float(rank_probs[d[idx + 1] - 1][r]))
    return float(sum(pp[1:]))


def dynamic_tree(curve: dict, rank_probs, sizes: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
                 draft_tokens: int = 0, per_node: int = 0) -> tuple:
    """The tree size with the best predicted tokens per unit time on the measured cost curve:
    ``(1 + E[accepted](N)) / (c((N + 1) * (1 + per_node)) + c(draft_tokens))`` (``draft_tokens``: the size of
    the drafter's own call, 0 when the prompt tokens ride in the verify call; ``per_node``: prompt tokens
    attached to every block node in the verify call). Returns (TreeSpec, predicted speedup, table of
    (N, expected accepted, cost, speedup))."""
    from jaxdec.speculative.calibrate import relative_cost
    table, best = [], None
    for n in sizes:
        tree = grow_tree(int(n), rank_probs)
        acc = expected_accepted(tree, rank_probs)
        cost = (relative_cost(curve, (tree.num_nodes + 1) * (1 + per_node))
                + (relative_cost(curve, draft_tokens) if draft_tokens else 0.0))
        table.append((tree.num_nodes, acc, cost, (1.0 + acc) / cost))
        if best is None or (1.0 + acc) / cost > best[1]:
            best = (tree, (1.0 + acc) / cost)
    return best[0], best[1], table


# --------------------------------------------------------------------------------------------------
# drafter
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PPDDrafter:
    """Drafts with trained prompt tokens (see the module docstring) over ``tree`` (default: the chain of the
    k + 1 guesses; node depth d uses guess d: 1 = the target's own next token, d >= 2 = prompt position d-1)."""

    config: PPDConfig
    tree: Optional[TreeSpec] = None
    sample: bool = False  # draw the chain's tokens from the guesses' distributions (sampling verifier)

    own_params = True
    draft_calls_per_step = 1  # the drafter's own target call over [x_t, prompt tokens]

    def __post_init__(self):
        if not isinstance(self.config, PPDConfig):
            raise TypeError(f"PPDDrafter.config must be a PPDConfig, got {type(self.config).__name__}")
        if self.tree is not None:
            if not isinstance(self.tree, TreeSpec):
                raise TypeError(f"PPDDrafter.tree must be a TreeSpec, got {type(self.tree).__name__}")
            if self.tree.max_depth > self.config.depths:
                raise ValueError(f"ppd tree depth {self.tree.max_depth} exceeds the {self.config.depths} guesses "
                                 f"(num_tokens + 1)")
        _check_sample("PPDDrafter", self.sample, self.is_chain)

    @property
    def spec(self) -> TreeSpec:
        return self.tree if self.tree is not None else TreeSpec.chain(self.config.depths)

    num_nodes = property(lambda self: self.spec.num_nodes)
    max_depth = property(lambda self: self.spec.max_depth)
    max_children = property(lambda self: self.spec.max_branching)
    is_chain = property(lambda self: self.spec.parents == tuple(range(self.spec.num_nodes)))
    # the drafter's call writes 1 + k*e keys/values past the committed cache (then thrown away)
    extra_headroom = property(lambda self: max(0, self.config.num_prompt - self.spec.num_nodes))

    @staticmethod
    def _split(dparams):
        return split_draft_params(dparams, "PPDDrafter", ("prompt", "target"), "jaxdec.speculative.heads.ppd.build")

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        hp, _ = self._split(dparams)
        if hp.shape[-1] != self.config.hidden:
            raise ValueError(f"ppd prompt embeddings have size {hp.shape[-1]}, the config says {self.config.hidden}")
        return None

    def propose(self, model, dparams, state, keys):
        hp, tp = self._split(dparams)
        spec = self.spec
        logits = guess_logits(self.config, {"prompt": hp}, model, tp, state.last, state.cache)  # [B,k+1,V]
        if self.sample:
            from jaxdec.speculative.drafters import sampled_chain
            return sampled_chain(spec, logits, state, keys), state.method.draft, state.cache
        r = max(spec.ranks) + 1
        top = jax.lax.top_k(logits, r)[1].astype(jnp.int32)  # [B,k+1,r]
        depth = np.asarray(spec.depths[1:]) - 1
        toks = top[:, depth, np.asarray(spec.ranks)]  # [B,N]
        b = toks.shape[0]
        return Draft(toks, spec.parents_array(b), jnp.ones(toks.shape, bool)), state.method.draft, state.cache

    def update(self, model, dparams, state, dstate, info):
        return dstate


@struct.dataclass
class PPDState:
    """guess: [B, k, R] the top-R token ids guessed for depths 1 .. k after ``state.last`` (greedy);
    logits: [B, k, V] float32 the guesses' ensemble-averaged logits (``sample=True``; guess is then None)."""

    guess: Any = None
    logits: Any = None


@dataclasses.dataclass(frozen=True)
class PPDInlineDrafter:
    """The paper's layout (second slice): no call of its own. The ``k*e`` prompt tokens are attached to every
    node of the verify block through the engine's ``extra_inputs`` hook (positions node + 1 + i; each sees
    the node's ancestors, the node, and the earlier prompts of its own ensemble stream at the same node); the
    outputs of the prompts attached to the accepted node are the next step's guesses (prompt i sits at the
    bonus token's position + i and guesses depth i + 1 after it). ``tree``: depth d uses guess d (1 .. k)."""

    config: PPDConfig
    tree: Optional[TreeSpec] = None
    sample: bool = False  # draw the chain's tokens from the guesses' distributions (sampling verifier)

    own_params = True
    draft_calls_per_step = 0  # the prompt tokens ride in the verify call

    def __post_init__(self):
        if not isinstance(self.config, PPDConfig):
            raise TypeError(f"PPDInlineDrafter.config must be a PPDConfig, got {type(self.config).__name__}")
        if self.tree is not None:
            if not isinstance(self.tree, TreeSpec):
                raise TypeError(f"PPDInlineDrafter.tree must be a TreeSpec, got {type(self.tree).__name__}")
            if self.tree.max_depth > self.config.num_tokens:
                raise ValueError(f"ppd tree depth {self.tree.max_depth} exceeds the {self.config.num_tokens} prompt "
                                 f"positions (inline: num_tokens)")
        _check_sample("PPDInlineDrafter", self.sample, self.is_chain)

    @property
    def spec(self) -> TreeSpec:
        return self.tree if self.tree is not None else TreeSpec.chain(self.config.num_tokens)

    num_nodes = property(lambda self: self.spec.num_nodes)
    max_depth = property(lambda self: self.spec.max_depth)
    max_children = property(lambda self: self.spec.max_branching)
    is_chain = property(lambda self: self.spec.parents == tuple(range(self.spec.num_nodes)))
    extra_headroom = property(lambda self: (self.spec.num_nodes + 1) * self.config.num_prompt)

    @staticmethod
    def _split(dparams):
        return split_draft_params(dparams, "PPDInlineDrafter", ("prompt", "target"),
                                  "jaxdec.speculative.heads.ppd.build")

    def _ranks(self) -> int:
        return max(self.spec.ranks) + 1

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        hp, tp = self._split(dparams)
        if hp.shape[-1] != self.config.hidden:
            raise ValueError(f"ppd prompt embeddings have size {hp.shape[-1]}, the config says {self.config.hidden}")
        # the first step's guesses: one call over [first token, prompts] on the prompt's cache (writes discarded)
        lg = guess_logits(self.config, {"prompt": hp}, model, tp, state.last, state.cache)[:, :self.config.num_tokens]
        if self.sample:
            return PPDState(logits=lg)
        return PPDState(guess=jax.lax.top_k(lg, self._ranks())[1].astype(jnp.int32))

    def propose(self, model, dparams, state, keys):
        spec = self.spec
        ds = state.method.draft
        if self.sample:
            from jaxdec.speculative.drafters import sampled_chain
            return sampled_chain(spec, ds.logits, state, keys), ds, state.cache
        depth = np.asarray(spec.depths[1:]) - 1
        toks = ds.guess[:, depth, np.asarray(spec.ranks)]  # [B,N]
        b = toks.shape[0]
        return Draft(toks, spec.parents_array(b), jnp.ones(toks.shape, bool)), ds, state.cache

    def extra_inputs(self, model, dparams, state, draft, dstate, pos, anc):
        hp, _ = self._split(dparams)
        c = self.config
        n = c.num_prompt
        b, t = pos.shape
        ii, _ = prompt_layout(c)
        emb = jnp.broadcast_to(hp.astype(jnp.float32).reshape(1, 1, n, -1), (b, t, n, c.hidden)).reshape(b, t * n, -1)
        x_pos = (pos[:, :, None] + 1 + jnp.asarray(ii, pos.dtype)[None, None]).reshape(b, t * n)
        to_block = jnp.repeat(anc, n, axis=1)  # [B,T*n,T]: node m's prompts see m's ancestors and m
        own = np.kron(np.eye(t, dtype=bool), ensemble_mask(c)[1:, 1:])  # same node, same stream, earlier positions
        x_mask = jnp.concatenate([to_block, jnp.broadcast_to(jnp.asarray(own), (b, t * n, t * n))], axis=2)
        return emb, x_pos, x_mask

    def update(self, model, dparams, state, dstate, info):
        c = self.config
        n = c.num_prompt
        b, t = info.block.shape
        node = jnp.take_along_axis(info.path, info.n_acc[:, None], axis=1)[:, 0]  # [B] the accepted node
        lg = info.extra_logits.reshape(b, t, n, -1)
        lg = jnp.take_along_axis(lg, node[:, None, None, None], axis=1)[:, 0]  # [B,n,V]
        keep = info.live & (info.cnt > 0)
        if self.sample:
            return dstate.replace(logits=jnp.where(keep[:, None, None], average_ensemble(c, lg), dstate.logits))
        guess = jax.lax.top_k(average_ensemble(c, lg), self._ranks())[1].astype(jnp.int32)
        return dstate.replace(guess=jnp.where(keep[:, None, None], guess, dstate.guess))


# --------------------------------------------------------------------------------------------------
# loading and the constructor
# --------------------------------------------------------------------------------------------------

def load_ppd(path: str, fingerprint: Optional[str]):
    """(PPDConfig, params as float32 jax arrays, metadata) from a heads file, refused with `HeadsMismatch`
    when it was trained for another target (``fingerprint=None`` skips the check)."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    try:
        config = PPDConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad ppd config in its metadata ({e})") from None
    check_params(config, params, f"heads file {str(path)!r} (corrupt file)")
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), meta


def build(model, params, heads, target=None, tree=None, curve=None, rank_probs=None, inline: bool = True,
          sampling: bool = False):
    """-> (decoder, params): PPD prompt tokens drafting for the target, greedy verification (``sampling=True``:
    a chain drawn from the guesses' processed distributions, verified by lossless speculative sampling).

    heads: a heads file written by ``train/ppd.py`` (checked against the target: `HeadsMismatch` when it was
    trained for another one) or an in-memory ``(PPDConfig, params)`` pair (no check).
    target: the target's model file or folder (``m.path``), or a fingerprint string; None: the params are
    fingerprinted (`params_fingerprint`).
    tree: None (the chain of the k + 1 guesses), a `TreeSpec`, or "auto": the hardware-aware dynamic tree
    (`dynamic_tree`) from ``curve`` (a `measure_cost_curve` result; measured here when None) and
    ``rank_probs`` (per depth, per rank acceptance; default: the heads file's held-out measurement).
    inline: True (the paper's method, `PPDInlineDrafter`: the prompt tokens ride in the verify call through the
    engine's ``extra_inputs`` hook; needs a model with ``embed`` and deferred cache writes) or False (the
    first slice, `PPDDrafter`: an extra target call per step, whose output at the last token is depth 1).
    sampling: tree must be None or a chain (not "auto": the dynamic tree is a tree); either layout."""
    from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    meta = {}
    if not isinstance(sampling, (bool, np.bool_)):
        raise TypeError(f"sampling must be a bool, got {type(sampling).__name__}")
    if sampling and isinstance(tree, str):
        raise ValueError(f"sampling=True drafts a chain: pass tree=None (or a chain TreeSpec), not {tree!r}")
    if sampling and isinstance(tree, TreeSpec) and tree.parents != tuple(range(tree.num_nodes)):
        raise ValueError("sampling=True drafts a chain: pass tree=None (or a chain TreeSpec)")
    if isinstance(heads, tuple) and len(heads) == 2 and isinstance(heads[0], PPDConfig):
        config, hp = heads
        check_params(config, hp)
    elif isinstance(heads, (str, os.PathLike)):
        fp = expected_fingerprint(model, params, target)
        config, hp, meta = load_ppd(heads, fp)
    else:
        raise TypeError(f"heads must be a heads file path or a (PPDConfig, params) pair, got {type(heads).__name__}")
    if isinstance(tree, str):
        if tree != "auto":
            raise ValueError(f"tree must be None, a TreeSpec or 'auto', got {tree!r}")
        probs = rank_probs if rank_probs is not None else meta.get("rank_probs")
        if probs is None:
            raise ValueError("tree='auto' needs rank_probs (per depth, per rank acceptance) or a heads file that "
                             "stores them")
        if len(probs) != config.depths:
            raise ValueError(f"rank_probs must have {config.depths} rows (num_tokens + 1 depths), got {len(probs)}")
        if curve is None:
            from jaxdec.speculative.calibrate import measure_cost_curve
            curve = measure_cost_curve(model, params)
        if inline:  # depth d is prompt position d - 1's guess; every node carries k*e prompt tokens
            tree, _, _ = dynamic_tree(curve, list(probs)[1:], per_node=config.num_prompt)
        else:
            tree, _, _ = dynamic_tree(curve, probs, draft_tokens=1 + config.num_prompt)
    elif tree is not None and not isinstance(tree, TreeSpec):
        raise TypeError(f"tree must be None, a TreeSpec or 'auto', got {type(tree).__name__}")
    dparams = {"prompt": jnp.asarray(hp["prompt"], jnp.float32), "target": params}
    sampling = bool(sampling)
    drafter = PPDInlineDrafter(config, tree, sampling) if inline else PPDDrafter(config, tree, sampling)
    return (SpeculativeDecoder(drafter, "sampling" if sampling else "greedy"),
            with_draft_params(params, dparams))
