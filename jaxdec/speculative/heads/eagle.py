"""An EAGLE-style feature-level autoregressive draft head (Li et al. 2024, EAGLE-1/2/3).

One decoder layer (a 1-layer `LlamaModel` with its own KV cache) runs over the target's features:
the input at position t is ``fc([f_t ; embed(x_{t+1})])`` where ``embed`` is the target's own (shared,
frozen) token embedding and ``f_t`` the target's feature at t: its final-norm hidden state
(``feature_layers=()``, EAGLE-1), or, as EAGLE-3 fuses a low, a middle and a high layer,
``fuse · [rms(h_a) ; rms(h_b) ; ...]`` over the residual streams after the layers named in
``feature_layers`` (``-1``: the final-norm hidden state; each stream scaled to unit RMS first, since the
raw residual stream of late layers is orders of magnitude larger than early ones). The layer's output
``o_t`` scores ``x_{t+2}`` through the target's LM head restricted to a reduced draft vocabulary
(EAGLE-3's d2t map: ``draft_vocab`` rows, shared and frozen) and is fed back as the feature of the next
draft position (EAGLE-3 feeds the draft's own output back in place of the fused feature the same way).
Drafts are chains of ``num_tokens``: greedy verification (lossless for greedy decoding), or
``sample=True``: each token drawn from the draft's processed distribution over the draft vocabulary (the
other tokens get probability 0) and verified by speculative sampling (lossless for sampling).

EAGLE-2's dynamic draft tree (``tree_topk > 0``, greedy verification): depth 1 takes the ``tree_topk``
best draft tokens; each further depth (up to ``num_tokens``) expands the ``tree_topk`` nodes of the
depth before with the best cumulative draft log-probability (one draft-layer call over those nodes,
each attending to the committed draft cache and its own ancestors through an explicit mask), each
giving ``tree_topk`` children; then all candidates are reranked by cumulative log-probability and the
best ``tree_nodes`` form the tree (prefix-closed: a child never scores above its parent, and ties keep
the parent). The tree differs per row and per step.

SpecDec++'s learned stop (``stop_head``, chains only; `jaxdec.speculative.heads.acceptance`): an
acceptance head reads the layer's output ``o`` that scores each draft token and the chain (a
`lax.while_loop` through `jaxdec.speculative.drafters.autoregressive_chain`, so the draft calls a row
declines are not run) ends once the predicted probability that some of its tokens is rejected would
pass the threshold; tokens past the stop are marked invalid and never accepted. The draft distribution
is untouched (lossless greedy, exact sampling); without a stop head the drafter is the unrolled chain
below, unchanged. `draft_id` names a head's weights, so an acceptance head records which EAGLE head it
was trained for and is refused on another.

Not yet here: the training-time test's EAGLE-3 attention masks (train/eagle.py's ``--ttt-steps`` feeds
the head its own features over the whole sequence, an approximation).

Params: ``{"fc": [E, 2E], "final_norm": [E], "layers": the 1-layer stack}`` plus ``"fuse": [E, kE]``
with k feature layers; the drafter's params are ``{"heads": those, "target": target params, "d2t":
[Vd], "head_w": LM-head rows}`` (`jaxdec.speculative.methods.eagle` builds them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.speculative.heads.medusa import split_draft_params
from jaxdec.speculative.tree import Draft, TreeSpec

KIND = "eagle"


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    hidden: int  # the target's E
    draft_vocab: int  # rows of the shared LM head the draft scores (d2t)
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate: int = 1536
    rope_theta: float = 100000.0
    max_position: int = 8192
    num_tokens: int = 4  # chain length drafted per step
    # target features fused (EAGLE-3): residual stream after that many layers, -1 = the final-norm hidden
    # state; () = the final-norm hidden state alone, unfused (EAGLE-1)
    feature_layers: tuple = ()
    # EAGLE-2 dynamic tree: 0 = a chain of num_tokens; else expand this many nodes per depth (num_tokens
    # depths) and keep the best tree_nodes candidates
    tree_topk: int = 0
    tree_nodes: int = 0

    def __post_init__(self):
        fl = self.feature_layers
        if not isinstance(fl, (tuple, list)) or any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
                                                     or i < -1 for i in fl) or len(set(fl)) != len(fl):
            raise ValueError(f"EagleConfig.feature_layers must be distinct layer counts >= 0 or -1 (the final-norm "
                             f"hidden state), got {fl!r}")
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in fl))
        for name in ("hidden", "draft_vocab", "num_heads", "num_kv_heads", "head_dim", "intermediate",
                     "max_position", "num_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"EagleConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("tree_topk", "tree_nodes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"EagleConfig.{name} must be an integer >= 0, got {v!r}")
        if self.tree_topk:
            cands = self.num_candidates
            if not 1 <= self.tree_nodes <= cands or self.tree_topk > self.draft_vocab:
                raise ValueError(f"EagleConfig: a dynamic tree (tree_topk={self.tree_topk}) needs 1 <= tree_nodes <= "
                                 f"{cands} candidates and tree_topk <= draft_vocab, got tree_nodes={self.tree_nodes}")
        elif self.tree_nodes:
            raise ValueError("EagleConfig.tree_nodes needs tree_topk > 0 (a dynamic tree)")

    @property
    def num_candidates(self) -> int:
        """Candidate nodes a dynamic tree ranks: topk at depth 1, topk**2 at each deeper depth."""
        return self.tree_topk + (self.num_tokens - 1) * self.tree_topk ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        for name, empty in (("feature_layers", []), ("tree_topk", 0), ("tree_nodes", 0)):
            if d[name] == empty:  # files of the first head keep their old metadata
                del d[name]
        return d

    @property
    def model_layers(self) -> Optional[tuple]:
        """The target's ``hidden_layers`` the drafter needs (None: the final hidden state is enough)."""
        fl = tuple(i for i in self.feature_layers if i >= 0)
        return fl or None

    @classmethod
    def from_dict(cls, d: dict) -> "EagleConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or not {"hidden", "draft_vocab"} <= set(d):
            raise ValueError(f"eagle config must be a dict with keys among {sorted(names)}, got {d!r}")
        return cls(**d)

    def layer_model(self, attention: str = "xla"):
        """The draft layer as a 1-layer `LlamaModel` (vocabulary = the draft vocabulary); training uses
        ``attention="reference"`` (differentiable)."""
        from jaxdec.models.config import LlamaConfig
        from jaxdec.models.llama import LlamaModel
        return LlamaModel(LlamaConfig(vocab_size=self.draft_vocab, hidden_size=self.hidden,
                                      intermediate_size=self.intermediate, num_layers=1, num_heads=self.num_heads,
                                      num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                      rope_theta=self.rope_theta, tie_embeddings=False,
                                      max_position=self.max_position), prefill_chunk=None).with_attention(attention)


def init_params(config: EagleConfig, seed: int = 0) -> dict:
    """Random draft-layer weights (scaled like a fresh transformer layer) and an ``fc`` that starts as
    ``f_t + embed(x_{t+1})``."""
    e, h, kv, d, f = config.hidden, config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate
    ks = jax.random.split(jax.random.key(seed), 7)
    n = lambda k, *s: jax.random.normal(k, (1,) + s, jnp.float32) * (1.0 / np.sqrt(s[-1]))  # noqa: E731
    fc = jnp.concatenate([jnp.eye(e), jnp.eye(e)], axis=1)
    extra = {}
    if config.feature_layers:  # starts as the last named feature alone (the final hidden state when it is -1)
        k = len(config.feature_layers)
        extra["fuse"] = jnp.concatenate([jnp.zeros((e, (k - 1) * e), jnp.float32), jnp.eye(e)], axis=1)
    return {**extra, "fc": fc, "final_norm": jnp.ones((e,), jnp.float32),
            "layers": {"attn_norm": jnp.ones((1, e), jnp.float32), "wq": n(ks[0], h * d, e), "wk": n(ks[1], kv * d, e),
                       "wv": n(ks[2], kv * d, e), "wo": n(ks[3], e, h * d) * 0.1, "mlp_norm": jnp.ones((1, e), jnp.float32),
                       "w_gate": n(ks[4], f, e), "w_up": n(ks[5], f, e), "w_down": n(ks[6], e, f) * 0.1}}


def target_embed(model, target_params, ids):
    """The target's input embeddings of ``ids`` (``model.embed``, else the ``embed`` table)."""
    fn = getattr(model, "embed", None)
    if fn is not None:
        return fn(target_params, ids)
    from jaxdec.quant import embed_lookup
    return embed_lookup(target_params["embed"], ids).astype(jnp.float32)


def target_features(config: EagleConfig, hp, hidden, layer_hidden=None):
    """The head's feature of each position ``[..., E]`` from the target's final-norm ``hidden [..., E]``
    and, with ``feature_layers``, its ``layer_hidden [k', ..., E]`` of ``config.model_layers``."""
    if not config.feature_layers:
        return hidden.astype(jnp.float32)
    order = config.model_layers or ()
    parts = []
    for i in config.feature_layers:
        x = hidden if i < 0 else layer_hidden[order.index(i)]
        x = x.astype(jnp.float32)
        parts.append(x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6))
    return jnp.einsum("...i,oi->...o", jnp.concatenate(parts, axis=-1), hp["fuse"])


def target_call(config: EagleConfig, model, target_params, tokens, positions, cache):
    """The target over ``tokens`` -> ``(hidden, layer_hidden)``, what `target_features` reads."""
    out = model(target_params, tokens, positions, cache, hidden_layers=config.model_layers)
    return out.hidden, out.layer_hidden


def draft_inputs(hp, model, target_params, feats, next_ids):
    """``fc([f ; embed(x_next)])``: ``feats [..., E]``, ``next_ids [...]`` -> ``[..., E]``."""
    x = jnp.concatenate([feats.astype(jnp.float32), target_embed(model, target_params, next_ids)], axis=-1)
    return jnp.einsum("...i,oi->...o", x, hp["fc"])


def layer_params(hp, head_w):
    return {"final_norm": hp["final_norm"], "layers": hp["layers"], "lm_head": head_w}


# --------------------------------------------------------------------------------------------------
# drafter
# --------------------------------------------------------------------------------------------------

@struct.dataclass
class EagleState:
    """cache: the draft layer's KV cache (committed positions: one per target position but the last).
    pend_f [B,P,E], pend_x [B,P], npend [B]: (target feature, next token) pairs not yet in ``cache``
    (P = max depth + 1), the first ``npend`` valid."""

    cache: object
    pend_f: jax.Array
    pend_x: jax.Array
    npend: jax.Array


@dataclasses.dataclass(frozen=True)
class EagleDrafter:
    """stop_head: SpecDec++'s learned stop (an object with ``advance``, e.g.
    `jaxdec.speculative.heads.acceptance.AcceptanceStop`) reading the layer's output feature that scores
    each draft token; its params ride in the drafter's params under ``"stop"``
    (`jaxdec.speculative.methods.eagle(..., stop_head=)` builds them). None (the default): every output and
    the compiled program are as before."""

    config: EagleConfig
    sample: bool = False  # draw the chain from the draft's distribution (sampling verification)
    stop_head: Any = None

    own_params = True
    extra_headroom = 0

    def __post_init__(self):
        if self.sample and self.config.tree_topk:
            raise ValueError("EagleDrafter: sample=True drafts a chain only (tree_topk=0)")
        if self.stop_head is not None:
            if self.config.tree_topk:
                raise ValueError("EagleDrafter: a stop_head (SpecDec++'s learned stop) stops a chain only "
                                 f"(tree_topk=0), got tree_topk={self.config.tree_topk}")
            if not callable(getattr(self.stop_head, "advance", None)):
                raise TypeError(f"EagleDrafter: stop_head must have an advance(params, feat, surv, alive, index) "
                                f"method, got {type(self.stop_head).__name__}")

    is_chain = property(lambda self: not self.config.tree_topk)
    max_children = property(lambda self: self.config.tree_topk or 1)
    num_nodes = property(lambda self: self.config.tree_nodes or self.config.num_tokens)
    # the target layers the verify call returns in `VerifyInfo.layer_hidden` (EAGLE-3 feature fusion)
    target_hidden_layers = property(lambda self: self.config.model_layers)
    max_depth = property(lambda self: self.config.num_tokens)
    draft_calls_per_step = property(lambda self: self.config.num_tokens)

    @staticmethod
    def _split(dparams):
        return split_draft_params(dparams, "EagleDrafter", ("heads", "target", "head_w", "d2t"), "jaxdec.speculative.methods.eagle")

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        from jaxdec.cache.kv import rollback
        hp, tp, head_w, _ = self._split(dparams)
        if self.stop_head is not None:
            split_draft_params(dparams, "EagleDrafter with a stop_head", ("stop",),
                               "jaxdec.speculative.methods.eagle(..., stop_head=)")
        b, p = prompts.shape
        c = self.config
        # target features of every prompt position (a second prefill; the engine's is not shared yet)
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        feats = target_features(c, hp, *target_call(c, model, tp, prompts, pos, model.init_cache(b, p)))  # [B,P,E]
        nxt = jnp.concatenate([prompts[:, 1:], jnp.zeros((b, 1), prompts.dtype)], axis=1).astype(jnp.int32)
        lm = c.layer_model()
        # a dynamic tree writes its expanded nodes past the committed positions, then rolls them back
        dcache = lm.init_cache(b, state.cache.size + (c.num_tokens - 1) * c.tree_topk)
        out = lm(layer_params(hp, head_w), None, pos, dcache, embeds=draft_inputs(hp, model, tp, feats, nxt))
        dcache = rollback(out.cache, prompt_lens - 1)  # positions 0 .. plen-2 committed
        slots = c.num_tokens + 1
        last_f = jnp.take_along_axis(feats, (prompt_lens - 1)[:, None, None], axis=1)  # [B,1,E]
        pend_f = jnp.zeros((b, slots, c.hidden), jnp.float32).at[:, :1].set(last_f)
        pend_x = jnp.zeros((b, slots), jnp.int32).at[:, 0].set(state.last)
        return EagleState(cache=dcache, pend_f=pend_f, pend_x=pend_x, npend=jnp.ones((b,), jnp.int32))

    def propose(self, model, dparams, state, keys):
        from jaxdec.cache.kv import rollback
        hp, tp, head_w, d2t = self._split(dparams)
        ds = state.method.draft
        c = self.config
        lm = c.layer_model()
        lp = layer_params(hp, head_w)
        l0 = ds.cache.lengths
        slots = ds.pend_x.shape[1]
        pos = l0[:, None] + jnp.arange(slots, dtype=jnp.int32)[None]
        out = lm(lp, None, pos, ds.cache, embeds=draft_inputs(hp, model, tp, ds.pend_f, ds.pend_x),
                 logits_at=(ds.npend - 1)[:, None])
        committed = l0 + ds.npend
        cache = rollback(out.cache, committed)
        o = jnp.take_along_axis(out.hidden, (ds.npend - 1)[:, None, None], axis=1)[:, 0]  # [B,E]
        d2t = jnp.asarray(d2t, jnp.int32)
        if c.tree_topk:
            draft = self._tree(lm, lp, hp, model, tp, d2t, cache, out.logits[:, 0], o)
            return draft, ds.replace(cache=cache), state.cache
        if self.stop_head is not None:
            sparams, = split_draft_params(dparams, "EagleDrafter with a stop_head", ("stop",),
                                          "jaxdec.speculative.methods.eagle(..., stop_head=)")
            return self._stopped_chain(lm, lp, hp, model, tp, d2t, cache, committed, out.logits[:, 0], o, ds,
                                       state, keys, sparams)
        kk = jax.vmap(lambda k: jax.random.split(k, c.num_tokens))(keys) if self.sample else None  # [B,K] keys
        qs = []

        def pick(logits, i):  # [B,Vd] draft-vocabulary scores -> target token ids [B]
            if not self.sample:
                return d2t[jnp.argmax(logits, axis=-1).astype(jnp.int32)]
            from jaxdec.speculative.drafters import _draw_rows, draft_distribution
            full = jnp.full((logits.shape[0], model.vocab_size), -jnp.inf, jnp.float32)
            full = full.at[:, d2t].set(logits.astype(jnp.float32))
            _, q = draft_distribution(full, state, True)
            qs.append(q)
            return _draw_rows(kk[:, i], q)

        toks = [pick(out.logits[:, 0], 0)]
        for i in range(1, c.num_tokens):
            step = lm(lp, None, cache.lengths[:, None], cache,
                      embeds=draft_inputs(hp, model, tp, o[:, None], toks[-1][:, None]))
            cache = step.cache
            o = step.hidden[:, 0]
            toks.append(pick(step.logits[:, 0], i))
        toks = jnp.stack(toks, axis=1)
        b = toks.shape[0]
        draft = Draft(toks, TreeSpec.chain(c.num_tokens).parents_array(b), jnp.ones(toks.shape, bool), None,
                      jnp.stack(qs, axis=1) if self.sample else None)
        return draft, ds.replace(cache=rollback(cache, committed)), state.cache

    def _stopped_chain(self, lm, lp, hp, model, tp, d2t, cache, committed, logits0, o0, ds, state, keys, sparams):
        """The chain under the learned stop: `autoregressive_chain`'s `while_loop` with a step that feeds the
        last output ``o`` and token into the layer; ``o`` of each position is what the stop head reads."""
        from jaxdec.cache.kv import rollback
        from jaxdec.speculative.drafters import autoregressive_chain

        def step(carry, x):
            dc, o = carry
            st = lm(lp, None, dc.lengths[:, None], dc, embeds=draft_inputs(hp, model, tp, o[:, None], x[:, None]))
            return (st.cache, st.hidden[:, 0]), st.logits[:, 0], st.hidden[:, 0]

        draft, (cache, _) = autoregressive_chain(step, (cache, o0.astype(jnp.float32)), logits0, state, keys,
                                                 self.config.num_tokens, self.sample, None, self.stop_head, sparams,
                                                 o0, d2t=d2t, vocab_size=model.vocab_size)
        return draft, ds.replace(cache=rollback(cache, committed)), state.cache

    def _tree(self, lm, lp, hp, model, tp, d2t, cache, logits0, o0):
        """EAGLE-2's dynamic tree from the root's draft scores ``logits0 [B,Vd]`` and draft output ``o0``;
        ``cache`` holds the committed draft positions (its expanded nodes are written past them and not
        kept: the caller keeps ``cache``)."""
        c = self.config
        k, n = c.tree_topk, c.tree_nodes
        b = logits0.shape[0]
        c0 = cache.lengths  # [B] committed draft positions = position of the depth-1 nodes
        size = cache.size
        ls, ids = jax.lax.top_k(jax.nn.log_softmax(logits0.astype(jnp.float32), axis=-1), k)  # [B,k]
        cand_tok, cand_score, cand_par = [ids], [ls], [jnp.full((b, k), -1, jnp.int32)]  # parent: candidate index
        front_tok, front_score, front_idx = ids, ls, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
        front_feat = jnp.broadcast_to(o0[:, None], (b, k, o0.shape[-1]))
        front_slots = jnp.zeros((b, k, 0), jnp.int32)  # cache slots of each front node's ancestors (excl. itself)
        offset = k
        for d in range(1, c.num_tokens):
            # run the front (depth d) nodes: each sees the committed cache, its ancestors' slots, itself
            here = cache.lengths[:, None] + jnp.arange(k, dtype=jnp.int32)[None]  # slots they are written to
            cols = jnp.arange(size + k, dtype=jnp.int32)[None, None]
            committed = cols < c0[:, None, None]
            anc = jnp.any(cols[..., None] == front_slots[:, :, None, :], axis=-1) if d > 1 else jnp.zeros_like(committed)
            own = cols == (size + jnp.arange(k, dtype=jnp.int32))[None, :, None]
            mask = committed | anc | own  # [B,k,S+k]
            pos = (c0 + d - 1)[:, None] + jnp.zeros((1, k), jnp.int32)
            step = lm(lp, None, pos, cache, embeds=draft_inputs(hp, model, tp, front_feat, d2t[front_tok]),
                      attention=mask)
            cache = step.cache
            cl, cid = jax.lax.top_k(jax.nn.log_softmax(step.logits.astype(jnp.float32), axis=-1), k)  # [B,k,k]
            score = (front_score[:, :, None] + cl).reshape(b, k * k)
            cand_tok.append(cid.reshape(b, k * k))
            cand_score.append(score)
            cand_par.append(jnp.repeat(front_idx, k, axis=1))
            # next front: the k best children by cumulative score
            best_s, best = jax.lax.top_k(score, k)
            pnode = best // k  # which front node is the parent
            front_tok = jnp.take_along_axis(cid.reshape(b, k * k), best, axis=1)
            front_score = best_s
            front_idx = offset + best
            front_feat = jnp.take_along_axis(step.hidden, pnode[:, :, None], axis=1)
            front_slots = jnp.concatenate([jnp.take_along_axis(front_slots, pnode[:, :, None], axis=1),
                                           jnp.take_along_axis(here, pnode, axis=1)[:, :, None]], axis=2)
            offset += k * k
        toks = jnp.concatenate(cand_tok, axis=1)  # [B,C] draft ids, candidates in depth order
        scores = jnp.concatenate(cand_score, axis=1)
        par = jnp.concatenate(cand_par, axis=1)
        cands = toks.shape[1]
        # rerank: the n best (ties to the earlier candidate, i.e. the parent); block order = candidate order
        _, keep = jax.lax.top_k(scores - 1e-6 * jnp.arange(cands, dtype=jnp.float32)[None] / cands, n)
        keep = jnp.sort(keep, axis=1)  # [B,n] ascending: parents before children
        kpar = jnp.take_along_axis(par, keep, axis=1)
        # block index of the parent: 1 + its rank among the kept (it is kept: prefix-closed), 0 at depth 1
        rank = jax.vmap(lambda kk, pp: jnp.searchsorted(kk, pp))(keep, jnp.maximum(kpar, 0)).astype(jnp.int32)
        parents = jnp.where(kpar < 0, 0, rank + 1)
        tokens = d2t[jnp.take_along_axis(toks, keep, axis=1)]
        return Draft(tokens, parents, jnp.ones((b, n), bool))

    def update(self, model, dparams, state, dstate, info):
        # the accepted path's target features, each with the token that followed it
        hp = dparams["heads"]
        feats = target_features(self.config, hp, info.hidden, info.layer_hidden)  # [B,T,E]
        feats = jnp.take_along_axis(feats, info.path[:, :, None], axis=1)  # [B,D+1,E]
        run = info.live & (info.cnt > 0)
        return dstate.replace(pend_f=jnp.where(run[:, None, None], feats, dstate.pend_f),
                              pend_x=jnp.where(run[:, None], info.out.astype(jnp.int32), dstate.pend_x),
                              npend=jnp.where(run, info.cnt, dstate.npend))


def draft_id(config: EagleConfig, hp, d2t) -> str:
    """``"eagle:<sha256>"`` of a head's weights (float32, by name), its d2t map and the config fields that
    change what it computes (not the chain length or tree shape, which a caller may override): what an
    acceptance head trained for it records (`jaxdec.speculative.heads.acceptance.AcceptanceConfig.draft`).
    The same for the file and its loaded params."""
    from jaxdec.speculative.heads.artefact import weights_id
    shape = {k: v for k, v in config.to_dict().items() if k not in ("num_tokens", "tree_topk", "tree_nodes")}
    return weights_id(KIND, shape, hp, d2t)


def load_eagle(path: str, fingerprint: Optional[str]):
    """(EagleConfig, head params, metadata, d2t) from a heads file checked against the target."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    d2t = params.pop("d2t", None)
    try:
        config = EagleConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad eagle config in its metadata ({e})") from None
    if d2t is None or np.shape(d2t) != (config.draft_vocab,):
        raise ValueError(f"heads file {str(path)!r}: its d2t map does not match draft_vocab={config.draft_vocab}")
    k = len(config.feature_layers)
    if ("fuse" in params) != bool(k) or (k and np.shape(params["fuse"]) != (config.hidden, k * config.hidden)):
        raise ValueError(f"heads file {str(path)!r}: its fuse matrix does not match feature_layers="
                         f"{list(config.feature_layers)} (corrupt file)")
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), meta, d2t
