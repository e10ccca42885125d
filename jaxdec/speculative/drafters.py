"""Drafters: static configuration (frozen dataclasses) with three pure functions.

    init(model, params, prompts, prompt_lens, state, inputs) -> dstate       (a flax.struct dataclass,
                                                                               kept in state.method.draft)
    propose(model, params, state, keys) -> (Draft, dstate, cache)
    update(model, params, state, dstate, info: VerifyInfo) -> dstate

and the static attributes ``num_nodes`` (N), ``max_depth``, ``max_children``, ``is_chain`` and
``draft_calls_per_step``. The engine keeps the row's context in ``state.method.hist [B, H]`` (prompt,
then every emitted token; ``hist_len [B]`` valid entries, the last one is ``state.last``).

Model-free drafters here:

* `PromptLookupDrafter` (prompt lookup decoding / n-gram copy; ``source="prompt"`` is input-guided
  aggressive decoding): match the context's last n tokens (n = max_ngram .. min_ngram) against an
  earlier occurrence and propose what followed it.
* `TokenRecyclingDrafter` (Luo et al., Token Recycling): an adjacency matrix ``[V, k]`` of the
  target's top-k next tokens, refreshed from every verify call; a static tree is filled by BFS.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.speculative.tree import Draft, TreeSpec


@struct.dataclass
class DrafterCarry:
    """Drafter state carried into a run from an earlier batch or run (hot start), ``inputs.carry``.
    Each field is None unless given; a drafter's `export` names the fields it fills.

    recycling_adj: [V, k] int32 Token Recycling's shared adjacency matrix.
    ngram_tables:  dict of the ADED/STAND n-gram tables (`NGRAM_TABLES`).
    skip_layers:   [L] bool layers a layer-skip drafter skips (overrides its static ``skip`` without
                   recompiling).
    """

    recycling_adj: Any = None
    ngram_tables: Any = None
    skip_layers: Any = None

    @classmethod
    def create(cls, carry) -> "DrafterCarry":
        """From a dict (e.g. a previous result's ``stats["carry"]``); an unknown name is a clear error."""
        if carry is None or isinstance(carry, cls):
            return carry
        if not isinstance(carry, dict):
            raise TypeError(f"carry must be a dict or a DrafterCarry, got {type(carry).__name__}")
        unknown = set(carry) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"carry has unknown entries {sorted(unknown)}: expected some of "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**carry)


def carried(inputs, name: str):
    """Field ``name`` of ``inputs.carry`` (a `DrafterCarry`), or None."""
    carry = getattr(inputs, "carry", None)
    return None if carry is None else getattr(carry, name)


def _tree_levels(tree: TreeSpec):
    """Static per-depth index arrays: (node indices (0-based), parent block indices, ranks)."""
    depths = np.asarray(tree.depths[1:])
    out = []
    for d in range(1, tree.max_depth + 1):
        idx = np.nonzero(depths == d)[0]
        out.append((idx, np.asarray(tree.parents)[idx], np.asarray(tree.ranks)[idx]))
    return out


# ----------------------------------------------------------------------------------------------------
# Prompt lookup / n-gram copy
# ----------------------------------------------------------------------------------------------------

def ngram_lookup(hist, hist_len, num_tokens: int, max_ngram: int, min_ngram: int, limit=None):
    """For each row find the most recent earlier occurrence of the context's last n tokens (longest n
    first) and return the ``num_tokens`` tokens that follow it, continued periodically past the end of
    the context (a match at shift s predicts ``hist[L - s + (i mod s)]``). ``limit [B]``: matches must
    end before this index (e.g. the prompt length for copying from the input only).
    Returns (tokens [B,k], found [B], matched n [B])."""
    b, h = hist.shape
    L = hist_len.astype(jnp.int32)
    j = jnp.arange(h)[None, :]
    found = jnp.zeros((b,), bool)
    shift = jnp.ones((b,), jnp.int32)
    used_n = jnp.zeros((b,), jnp.int32)
    pad = jnp.full((b, max_ngram), -1, hist.dtype)
    hp = jnp.concatenate([hist, pad], axis=1)
    for n in range(max_ngram, min_ngram - 1, -1):
        suf = jnp.take_along_axis(hist, jnp.clip(L[:, None] - n + jnp.arange(n)[None], 0, h - 1), axis=1)
        m = (j + n < L[:, None]) & (L[:, None] > n)
        if limit is not None:
            m = m & (j + n <= limit[:, None])
        for t in range(n):
            m = m & (hp[:, t:t + h] == suf[:, t:t + 1])
        any_m = jnp.any(m, axis=1)
        last_j = (h - 1) - jnp.argmax(m[:, ::-1], axis=1)
        s = (L - n) - last_j
        new = ~found & any_m
        shift = jnp.where(new, s, shift)
        used_n = jnp.where(new, n, used_n)
        found = found | any_m
    shift = jnp.maximum(shift, 1)
    i = jnp.arange(num_tokens)[None, :]
    src = L[:, None] - shift[:, None] + (i % shift[:, None])
    toks = jnp.take_along_axis(hist, jnp.clip(src, 0, h - 1), axis=1)
    return toks.astype(jnp.int32), found, used_n


@struct.dataclass
class PromptLookupState:
    """`PromptLookupDrafter`'s state: none (it reads the context from ``state.method.hist``)."""


@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter:
    """Chain of ``num_tokens`` copied from the most recent earlier occurrence of the last n-gram.
    source: "context" (prompt and generated text: prompt lookup decoding) or "prompt" (input-guided
    aggressive decoding: copy from the input only)."""

    num_tokens: int = 8
    max_ngram: int = 3
    min_ngram: int = 1
    source: str = "context"

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"draft length (num_tokens) must be >= 1, got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if self.source not in ("context", "prompt"):
            raise ValueError("source must be 'context' or 'prompt'")

    num_nodes = property(lambda self: self.num_tokens)
    max_depth = property(lambda self: self.num_tokens)
    max_children = 1
    is_chain = True
    draft_calls_per_step = 0

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        return PromptLookupState()

    def propose(self, model, params, state, keys):
        m = state.method
        limit = m.prompt_len if self.source == "prompt" else None
        toks, found, _ = ngram_lookup(m.hist, m.hist_len, self.num_tokens, self.max_ngram, self.min_ngram,
                                      limit)
        b = toks.shape[0]
        parents = TreeSpec.chain(self.num_tokens).parents_array(b)
        valid = jnp.broadcast_to(found[:, None], toks.shape)
        return Draft(toks, parents, valid), m.draft, state.cache

    def update(self, model, params, state, dstate, info):
        return dstate


# ----------------------------------------------------------------------------------------------------
# Token Recycling
# ----------------------------------------------------------------------------------------------------

DEFAULT_RECYCLING_RANK_PROBS = (0.45, 0.17, 0.09, 0.06, 0.04, 0.03, 0.025, 0.02)


def default_recycling_tree(n: int = 24, max_depth: int = 8) -> TreeSpec:
    return TreeSpec.from_rank_probs(n, DEFAULT_RECYCLING_RANK_PROBS, max_depth=max_depth)


@struct.dataclass
class RecyclingState:
    """`TokenRecyclingDrafter`'s state.

    adj: [V, k] int32 (shared) or [B, V, k] (per row) the target's top-k tokens after each token, -1 unknown.
    """

    adj: jax.Array


@dataclasses.dataclass(frozen=True)
class TokenRecyclingDrafter:
    """Adjacency matrix ``adj[t] =`` the target's top-k tokens after token t (-1: unknown), refreshed
    after every verify call from the logits at every block node; the draft tree is filled breadth-first:
    node i takes ``adj[token(parent(i)), rank(i)]``.

    shared=True: one ``[V, k]`` matrix for the batch (the paper's design; rows see each other's
    updates, which changes τ but never the tokens); False: one per row ``[B, V, k]``. A warm matrix can
    be passed as ``inputs.carry.recycling_adj`` (a `DrafterCarry`; hot start).

    seed_from_prompt: before the first verify call, give every prompt token whose row is still empty
    its successor in the prompt as the rank-0 candidate (a cheap warm start; an addition to the
    paper, which starts from an empty or hot matrix). Verify calls overwrite these rows as usual."""

    tree: TreeSpec = dataclasses.field(default_factory=default_recycling_tree)
    k: int = 8
    shared: bool = True
    seed_from_prompt: bool = True

    def __post_init__(self):
        if max(self.tree.ranks) >= self.k:
            raise ValueError(f"tree uses candidate rank {max(self.tree.ranks)} but only k={self.k} are stored")

    num_nodes = property(lambda self: self.tree.num_nodes)
    max_depth = property(lambda self: self.tree.max_depth)
    max_children = property(lambda self: self.tree.max_branching)
    is_chain = property(lambda self: self.tree.parents == tuple(range(self.tree.num_nodes)))
    draft_calls_per_step = 0

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        v = model.vocab_size
        b = prompts.shape[0]
        adj = carried(inputs, "recycling_adj")
        if adj is None:
            adj = jnp.full((v, self.k), -1, jnp.int32)
        adj = jnp.asarray(adj, jnp.int32)
        if adj.shape != (v, self.k):
            raise ValueError(f"recycling_adj must have shape {(v, self.k)}, got {adj.shape}")
        if self.seed_from_prompt:
            p = prompts.shape[1]
            # successor pairs of the prompt, then (last prompt token -> first generated token)
            cur = jnp.concatenate([prompts[:, :-1], jnp.take_along_axis(prompts, (prompt_lens - 1)[:, None], 1)], 1)
            nxt = jnp.concatenate([prompts[:, 1:], state.last[:, None]], 1).astype(jnp.int32)
            use = jnp.concatenate([jnp.arange(p - 1)[None] < (prompt_lens - 1)[:, None],
                                   jnp.ones((b, 1), bool)], 1)
            use = use & (adj[cur, 0] < 0)

            def seed(a, c, n, u):
                keep = _dedupe_last(c, u, v)
                return a.at[jnp.where(keep, c, v), 0].set(n, mode="drop")

            if self.shared:
                adj = seed(adj, cur.reshape(-1), nxt.reshape(-1), use.reshape(-1))
            else:
                adj = jax.vmap(seed, in_axes=(None, 0, 0, 0))(adj, cur, nxt, use)
        elif not self.shared:
            adj = jnp.broadcast_to(adj, (b, v, self.k))
        return RecyclingState(adj=adj)

    def export(self, dstate):
        """State to carry into the next run (hot start): `DrafterCarry.recycling_adj`."""
        return {"recycling_adj": dstate.adj} if self.shared else {}

    def propose(self, model, params, state, keys):
        adj = state.method.draft.adj
        b = state.batch
        n = self.tree.num_nodes
        toks = jnp.zeros((b, n + 1), jnp.int32).at[:, 0].set(state.last)
        ok = jnp.zeros((b, n + 1), bool).at[:, 0].set(True)
        for idx, par, rk in _tree_levels(self.tree):
            ptok = toks[:, par]  # [B,n_d]
            rkb = jnp.broadcast_to(jnp.asarray(rk), ptok.shape)
            if self.shared:
                cand = adj[ptok, rkb]
            else:
                cand = jax.vmap(lambda a, pt, r: a[pt, r])(adj, ptok, rkb)
            good = ok[:, par] & (cand >= 0)
            toks = toks.at[:, idx + 1].set(jnp.where(good, cand, 0))
            ok = ok.at[:, idx + 1].set(good)
        parents = self.tree.parents_array(b)
        return Draft(toks[:, 1:], parents, ok[:, 1:]), state.method.draft, state.cache

    def update(self, model, params, state, dstate, info):
        adj = dstate.adj
        v = adj.shape[-2]
        _, top = jax.lax.top_k(info.logits, self.k)  # [B,T,k]
        top = top.astype(jnp.int32)
        use = info.node_valid & info.live[:, None]
        tok = info.block
        if self.shared:
            b, t = tok.shape
            ft, fu, ftop = tok.reshape(-1), use.reshape(-1), top.reshape(b * t, self.k)
            idx = jnp.where(_dedupe_last(ft, fu, v), ft, v)
            adj = adj.at[idx].set(ftop, mode="drop")
        else:
            t = tok.shape[1]
            later = jnp.triu(jnp.ones((t, t), bool), 1)

            def one(a, tk, u, tp):
                dup = jnp.any(later & (tk[:, None] == tk[None, :]) & u[None, :], axis=1)
                return a.at[jnp.where(u & ~dup, tk, v)].set(tp, mode="drop")

            adj = jax.vmap(one)(adj, tok, use, top)
        return dstate.replace(adj=adj)


# ----------------------------------------------------------------------------------------------------
# Model drafters: a separate draft model, or the target itself with layers switched off
# ----------------------------------------------------------------------------------------------------

def draft_distribution(logits, state, sample: bool):
    """Draft logits [B,V] -> (token [B] drawn or argmax, q [B,V] or None). When sampling, the row's
    sampling parameters are applied to the draft logits too; rows with temperature 0 draw greedily."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    from jaxdec.core.processors import process
    sp = state.method.sampling
    proc = process(logits, sp)
    greedy_row = jnp.asarray(sp.temperature, jnp.float32) <= 0
    am = jnp.argmax(proc, axis=-1)
    q = jnp.where(greedy_row[:, None], jax.nn.one_hot(am, logits.shape[-1], dtype=jnp.float32),
                  jax.nn.softmax(proc, axis=-1))
    return am.astype(jnp.int32), q


def _draw_rows(keys, q):
    logq = jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)), -jnp.inf)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logq).astype(jnp.int32)


def sampled_chain(spec: TreeSpec, logits, state, keys) -> Draft:
    """A chain of ``spec.num_nodes`` tokens drawn independently from per-position scores ``logits [B, >= N, V]``
    (node i from position i, after the rows' sampling processors: `draft_distribution`), one key per node split
    from each row's draft key ``keys [B]`` -> `Draft` with the ``q [B,N,V]`` each token was drawn from (for
    speculative sampling). Medusa heads, hidden transfer and PPD draft their sampled chains this way."""
    n = spec.num_nodes
    b = logits.shape[0]
    ks = jax.vmap(lambda kk: jax.random.split(kk, n))(keys)  # [B,N]
    toks, qs = [], []
    for i in range(n):
        _, q = draft_distribution(logits[:, i], state, True)
        toks.append(_draw_rows(ks[:, i], q))
        qs.append(q)
    toks = jnp.stack(toks, axis=1)
    return Draft(toks, spec.parents_array(b), jnp.ones(toks.shape, bool), None, jnp.stack(qs, axis=1))


def autoregressive_chain(step, carry, first_logits, state, keys, k: int, sample: bool, stop_threshold,
                         stop=None, stop_params=None, first_feat=None, d2t=None, vocab_size: Optional[int] = None):
    """Draft up to ``k`` tokens one call at a time. ``step(carry, x [B]) -> (carry, logits [B,V])`` feeds one
    token. SpecDec++'s stop rule with the draft's own confidence as the acceptance predictor: a row stops
    drafting once the predicted probability that some token of its draft is rejected,
    ``1 - prod_i max q_i``, exceeds ``stop_threshold``; the loop (a `while_loop`) ends when every row has
    stopped, so the skipped draft calls really are not run. Returns (Draft, carry, calls made).

    stop: a learned stop (e.g. `jaxdec.speculative.heads.acceptance.AcceptanceStop`) instead of the
    confidence: ``step`` then returns ``(carry, logits, feat [B,E])`` (the draft state that produced those
    logits), ``first_feat`` is the state behind ``first_logits``, and before token i is proposed the loop
    calls ``stop.advance(stop_params, feat_i, surv, alive, i) -> (surv, proposed [B], go_on [B])``: a row
    proposes token i only where ``proposed`` and takes part in the next draft call only where ``go_on``
    (the loop ends when no row goes on). The draft tokens and q are unchanged.

    d2t: ``[Vd]`` target token ids when ``step`` scores a reduced draft vocabulary (EAGLE-3's map): a
    greedy token is ``d2t[argmax]``; a sampled one is drawn from the distribution over the target's
    ``vocab_size`` tokens that gives every token outside ``d2t`` probability 0 (q is over the target's
    vocabulary, as the speculative-sampling verifier reads it)."""
    if stop is not None and stop_threshold is not None:
        raise ValueError("give stop_threshold (confidence stop) or stop (a learned stop head), not both")
    if stop is not None and first_feat is None:
        raise ValueError("a learned stop needs first_feat (the draft state behind first_logits)")
    b, v = first_logits.shape
    if d2t is not None:
        if sample and vocab_size is None:
            raise ValueError("autoregressive_chain: d2t with sample=True needs vocab_size (the target's vocabulary)")
        v = vocab_size if sample else v
    toks = jnp.zeros((b, k), jnp.int32)
    valid = jnp.zeros((b, k), bool)
    qbuf = jnp.zeros((b, k, v), jnp.float32) if sample else jnp.zeros((b, k, 1), jnp.float32)
    ks = jax.vmap(lambda kk: jax.random.split(kk, k))(keys)

    def body(s):
        i, logits, carry, toks, valid, qbuf, alive, surv, calls = s[:9]
        if d2t is None:
            am, q = draft_distribution(logits, state, sample)
        elif sample:  # the draft vocabulary's scores in the target's vocabulary, -inf elsewhere
            full = jnp.full((b, v), -jnp.inf, jnp.float32).at[:, d2t].set(logits.astype(jnp.float32))
            am, q = draft_distribution(full, state, True)
        else:
            am, q = d2t[jnp.argmax(logits, axis=-1)].astype(jnp.int32), None
        x = _draw_rows(jnp.take(ks, i, axis=1), q) if sample else am
        toks = toks.at[:, i].set(x)
        if stop is not None:  # learned stop: decide on token i from the state that scored it
            surv, take, alive = stop.advance(stop_params, s[9], surv, alive, i)
            valid = valid.at[:, i].set(take)
        else:
            valid = valid.at[:, i].set(alive)
        if sample:
            qbuf = qbuf.at[:, i].set(q)
        if stop_threshold is not None:
            conf = jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
            surv = surv * conf
            alive = alive & (1.0 - surv <= stop_threshold)
        more = (i + 1 < k) & jnp.any(alive)
        if stop is not None:
            carry, logits, feat = jax.lax.cond(more, lambda c: step(c, x), lambda c: (c, logits, s[9]), carry)
            return i + 1, logits, carry, toks, valid, qbuf, alive, surv, calls + more.astype(jnp.int32), feat
        carry, logits = jax.lax.cond(more, lambda c: step(c, x), lambda c: (c, logits), carry)
        return i + 1, logits, carry, toks, valid, qbuf, alive, surv, calls + more.astype(jnp.int32)

    def cond(s):
        return (s[0] < k) & jnp.any(s[6])

    init = (jnp.zeros((), jnp.int32), first_logits, carry, toks, valid, qbuf, jnp.ones((b,), bool),
            jnp.ones((b,), jnp.float32), jnp.zeros((), jnp.int32))
    if stop is not None:
        init = init + (first_feat.astype(jnp.float32),)
    _, _, carry, toks, valid, qbuf, _, _, calls = jax.lax.while_loop(cond, body, init)[:9]
    draft = Draft(toks, TreeSpec.chain(k).parents_array(b), valid, None, qbuf if sample else None, calls + 1)
    return draft, carry


@struct.dataclass
class DraftModelState:
    """`DraftModelDrafter`'s state; B rows.

    cache:   the draft model's KV cache (``[B, ...]``), holding the context up to ``l0``.
    pend:    [B, 2] int32 tokens to feed before the next proposal (the first ``npend`` are valid).
    npend:   [B] int32 1 or 2.
    l0:      [B] int32 draft cache length at the start of the last proposal.
    drafted: [B] int32 valid draft tokens of the last proposal.
    """

    cache: Any
    pend: jax.Array
    npend: jax.Array
    l0: jax.Array
    drafted: jax.Array


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
    """A separate draft model (same vocabulary) with its own KV cache drafts a chain of ``num_tokens``.

    Pass ``params = with_draft_params(target_params, draft_params)`` to `generate`. sample=False drafts
    greedily (for the greedy verifier); sample=True draws from the draft's distribution under the row's
    sampling parameters and returns q for speculative sampling. The draft cache is kept in step with the
    target: at most two tokens (the last accepted draft token after a full accept, then the bonus) are
    fed at the start of the next proposal. stop_threshold: SpecDec++-style adaptive draft length (see
    `autoregressive_chain`); None drafts all ``num_tokens``.

    stop_head: SpecDec++'s learned stop instead (an object with ``advance``, e.g.
    `jaxdec.speculative.heads.acceptance.AcceptanceStop`) reading the draft model's final-norm hidden
    state at each draft position; its params travel with the draft's:
    ``with_draft_params(target, {"model": draft params, "stop": head params})``. None (the default)
    leaves every output and the params layout as they were.

    siblings: w > 1 drafts a tree instead of the chain, at no extra draft call: the greedy chain, and at every
    depth the draft's next w - 1 best tokens as leaves beside the chain's node (greedy drafts only; no stop
    rule). 1 (the default) is the chain."""

    draft_model: object
    num_tokens: int = 4
    sample: bool = False
    stop_threshold: Optional[float] = None
    stop_head: Any = None
    siblings: int = 1

    own_params = True
    extra_headroom = 1

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"draft length (num_tokens) must be >= 1, got {self.num_tokens}")
        if self.stop_threshold is not None and not 0.0 <= self.stop_threshold < 1.0:
            raise ValueError("stop_threshold must be in [0, 1)")
        if self.stop_head is not None:
            if self.stop_threshold is not None:
                raise ValueError("give stop_threshold (confidence stop) or stop_head (learned stop), not both")
            if not callable(getattr(self.stop_head, "advance", None)):
                raise TypeError(f"stop_head must have an advance(params, feat, surv, alive, index) method, got "
                                f"{type(self.stop_head).__name__}")
        w = self.siblings
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
            raise ValueError(f"siblings must be an integer >= 1, got {w!r}")
        if w > 1 and (self.sample or self.stop_threshold is not None or self.stop_head is not None):
            raise ValueError("siblings > 1 (a tree of the draft's runner-up tokens) drafts greedily without a stop "
                             "rule: sample, stop_threshold and stop_head must be off")

    is_chain = property(lambda self: self.siblings == 1)
    max_children = property(lambda self: self.siblings)

    @property
    def spec(self) -> TreeSpec:
        """Node order: per depth d = 1 .. num_tokens, the chain's node (rank 0) then its w - 1 siblings."""
        w, parents, ranks = self.siblings, [], []
        for d in range(self.num_tokens):
            for r in range(w):
                parents.append(0 if d == 0 else (d - 1) * w + 1)  # block index of the chain node one depth up
                ranks.append(r)
        return TreeSpec(tuple(parents), tuple(ranks))

    num_nodes = property(lambda self: self.num_tokens * self.siblings)
    max_depth = property(lambda self: self.num_tokens)
    draft_calls_per_step = property(lambda self: self.num_tokens)

    def _params(self, dparams):
        """(draft model params, stop head params or None)."""
        if self.stop_head is None:
            return dparams, None
        if not (isinstance(dparams, dict) and set(dparams) == {"model", "stop"}):
            raise ValueError("DraftModelDrafter with a stop_head needs params=with_draft_params(target, "
                             "{'model': draft params, 'stop': stop head params}) "
                             "(jaxdec.speculative.heads.acceptance.build makes them)")
        return dparams["model"], dparams["stop"]

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        from jaxdec.core.steps import prefill
        dparams, _ = self._params(dparams)
        if self.draft_model.vocab_size != model.vocab_size:
            raise ValueError(f"draft model vocabulary ({self.draft_model.vocab_size}) differs from the target's "
                             f"({model.vocab_size}): a draft model must share the target's tokenizer")
        b = prompts.shape[0]
        dcache = self.draft_model.init_cache(b, state.cache.size)
        _, dcache, _ = prefill(self.draft_model, dparams, prompts, prompt_lens, dcache)
        pend = jnp.stack([state.last, jnp.zeros_like(state.last)], axis=1)
        return DraftModelState(cache=dcache, pend=pend, npend=jnp.ones((b,), jnp.int32), l0=dcache.lengths,
                               drafted=jnp.full((b,), self.num_tokens, jnp.int32))

    def propose(self, model, dparams, state, keys):
        from jaxdec.cache.kv import rollback
        ds = state.method.draft
        dm = self.draft_model
        dparams, sparams = self._params(dparams)
        dc = ds.cache
        l0 = dc.lengths
        pos = l0[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
        out = dm(dparams, ds.pend, pos, dc, logits_at=(ds.npend - 1)[:, None])
        dc = rollback(out.cache, l0 + ds.npend)

        if self.siblings > 1:
            draft, dc = self._sibling_tree(dm, dparams, dc, out.logits[:, 0])
        elif self.stop_head is None:
            def step(c, x):
                o = dm(dparams, x[:, None], c.lengths[:, None], c)
                return o.cache, o.logits[:, 0]

            draft, dc = autoregressive_chain(step, dc, out.logits[:, 0], state, keys, self.num_tokens, self.sample,
                                              self.stop_threshold)
        else:
            def step(c, x):
                o = dm(dparams, x[:, None], c.lengths[:, None], c)
                return o.cache, o.logits[:, 0], o.hidden[:, 0]

            feat0 = jnp.take_along_axis(out.hidden, (ds.npend - 1)[:, None, None], axis=1)[:, 0]
            draft, dc = autoregressive_chain(step, dc, out.logits[:, 0], state, keys, self.num_tokens, self.sample,
                                              None, self.stop_head, sparams, feat0)
        drafted = jnp.sum(draft.valid, axis=1).astype(jnp.int32)  # (a sibling tree's update does not read it)
        return draft, ds.replace(cache=dc, l0=l0, drafted=drafted), state.cache

    def _sibling_tree(self, dm, dparams, dc, logits0):
        """The greedy chain fed through the draft (num_tokens - 1 calls after the pending tokens') and each
        depth's top ``siblings`` tokens -> (Draft in `spec`'s order, the draft cache holding the chain)."""
        w, k = self.siblings, self.num_tokens

        def body(carry, _):
            c, lg = carry
            top = jax.lax.top_k(lg.astype(jnp.float32), w)[1].astype(jnp.int32)  # [B,w]
            o = dm(dparams, top[:, :1], c.lengths[:, None], c)
            return (o.cache, o.logits[:, 0]), top

        (dc, last), tops = jax.lax.scan(body, (dc, logits0), None, length=k - 1)  # tops [k-1,B,w]
        tops = jnp.concatenate([tops, jax.lax.top_k(last.astype(jnp.float32), w)[1].astype(jnp.int32)[None]], axis=0)
        toks = jnp.swapaxes(tops, 0, 1).reshape(tops.shape[1], k * w)  # [B, k*w]: depth-major, rank-minor
        b = toks.shape[0]
        return Draft(toks, self.spec.parents_array(b), jnp.ones(toks.shape, bool)), dc

    def update(self, model, dparams, state, dstate, info):
        from jaxdec.cache.kv import rollback
        if self.siblings > 1:
            return self._tree_update(dstate, state, info)
        m = dstate.drafted  # valid drafted tokens this step (all k without a stop rule)
        a = info.n_acc
        full = a >= m
        bonus = jnp.take_along_axis(info.out, a[:, None], axis=1)[:, 0]
        last_draft = jnp.take_along_axis(info.block, m[:, None], axis=1)[:, 0]
        pend = jnp.where(full[:, None], jnp.stack([last_draft, bonus], 1), jnp.stack([bonus, bonus], 1))
        npend = jnp.where(full, 2, 1).astype(jnp.int32)
        length = jnp.where(full, info.start + m, info.start + 1 + a)
        running = info.live & ~state.done
        dc = dstate.cache
        dc = rollback(dc, jnp.where(running, length, dstate.l0))
        return dstate.replace(cache=dc, pend=jnp.where(running[:, None], pend, dstate.pend),
                              npend=jnp.where(running, npend, dstate.npend))

    def _tree_update(self, dstate, state, info):
        """After a sibling tree's verify: the draft cache keeps the accepted path's tokens it was fed (the
        chain's nodes); an accepted sibling, or the chain's last node (never fed), is pending with the bonus."""
        from jaxdec.cache.kv import rollback
        a = info.n_acc
        node = jnp.take_along_axis(info.path, a[:, None], axis=1)[:, 0]  # block index of the last accepted node
        tok = jnp.take_along_axis(info.block, node[:, None], axis=1)[:, 0]
        bonus = jnp.take_along_axis(info.out, a[:, None], axis=1)[:, 0]
        unfed = (a > 0) & (((node - 1) % self.siblings != 0) | (a >= self.num_tokens))
        pend = jnp.where(unfed[:, None], jnp.stack([tok, bonus], 1), jnp.stack([bonus, bonus], 1))
        npend = jnp.where(unfed, 2, 1).astype(jnp.int32)
        length = jnp.where(unfed, info.start + a, info.start + 1 + a)
        running = info.live & ~state.done
        dc = rollback(dstate.cache, jnp.where(running, length, dstate.l0))
        return dstate.replace(cache=dc, pend=jnp.where(running[:, None], pend, dstate.pend),
                              npend=jnp.where(running, npend, dstate.npend))


def truncated_draft(model, params, num_layers: int):
    """A separate draft model made of the target's first ``num_layers`` layers (same embeddings and head):
    returns (draft_model, draft_params). Stands in for a trained small model in tests. Goes through the
    model protocol's optional ``truncate`` (see `jaxdec.models.interface`)."""
    from jaxdec.models.interface import require
    n = model.num_layers
    if not isinstance(num_layers, (int, np.integer)) or not 1 <= num_layers <= n:
        raise ValueError(f"num_layers must be an integer in [1, {n}], got {num_layers!r}")
    return require(model, "truncate", "truncated_draft")(params, int(num_layers))


@struct.dataclass
class LayerSkipState:
    """`LayerSkipDrafter`'s state.

    layers: [L] bool the layers the draft runs (False: switched off).
    """

    layers: jax.Array


@dataclasses.dataclass(frozen=True)
class LayerSkipDrafter:
    """Self-speculation: the target itself with some layers switched off drafts a chain of ``num_tokens``
    through the target's own cache (the verify call then overwrites those positions).

    skip: layers switched off (static default). The layer mask lives in the drafter state as a traced
    ``[L]`` array (``inputs.carry.skip_layers``, a `DrafterCarry` field, overrides it per run without recompiling), so adaptive
    schemes (SWIFT's search, DEL's exit choice) change it between runs or steps for free."""

    skip: tuple = ()
    num_tokens: int = 4
    sample: bool = False
    stop_threshold: Optional[float] = None

    max_children = 1
    is_chain = True

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"draft length (num_tokens) must be >= 1, got {self.num_tokens}")
        if self.stop_threshold is not None and not 0.0 <= self.stop_threshold < 1.0:
            raise ValueError("stop_threshold must be in [0, 1)")

    num_nodes = property(lambda self: self.num_tokens)
    max_depth = property(lambda self: self.num_tokens)
    draft_calls_per_step = property(lambda self: self.num_tokens)

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        n = model.num_layers
        if any(not 0 <= i < n for i in self.skip):
            raise ValueError(f"skip layers must be in [0, {n})")
        layers = np.ones((n,), bool)
        layers[list(self.skip)] = False
        lay = carried(inputs, "skip_layers")
        lay = jnp.asarray(layers) if lay is None else ~jnp.asarray(lay, bool)
        return LayerSkipState(layers=lay)

    def propose(self, model, params, state, keys):
        from jaxdec.cache.kv import rollback
        ds = state.method.draft
        l0 = state.cache.lengths
        layers = ds.layers

        def step(c, x):
            o = model(params, x[:, None], c.lengths[:, None], c, layers=layers)
            return o.cache, o.logits[:, 0]

        cache, first = step(state.cache, state.last)
        draft, cache = autoregressive_chain(step, cache, first, state, keys, self.num_tokens, self.sample,
                                             self.stop_threshold)
        return draft, ds, rollback(cache, l0)

    def update(self, model, params, state, dstate, info):
        return dstate


# ----------------------------------------------------------------------------------------------------
# N-gram tables of the target's own distributions (ADED-style tri-grams, STAND-style stochastic drafts)
# ----------------------------------------------------------------------------------------------------

def _pair_hash(a, b, size: int):
    a = a.astype(jnp.uint32)
    b = b.astype(jnp.uint32)
    h = (a * jnp.uint32(2654435761)) ^ (b * jnp.uint32(40503) + jnp.uint32(0x9E3779B9))
    h = h ^ (h >> 15)
    return (h % jnp.uint32(size)).astype(jnp.int32)


def _merge_rows(old_tok, old_p, new_tok, new_p, decay: float, k: int):
    """Merge stored candidates with a new top-k: score = decay * old + (1 - decay) * new; keep the top k."""
    have = old_tok >= 0
    old_p = jnp.where(have, old_p * decay, -1.0)
    match = (new_tok[..., :, None] == old_tok[..., None, :]) & have[..., None, :]  # [M,kn,ko]
    old_p = old_p + (1.0 - decay) * jnp.sum(jnp.where(match, new_p[..., :, None], 0.0), axis=-2)
    fresh = ~jnp.any(match, axis=-1) & (new_tok >= 0)
    cand_tok = jnp.concatenate([old_tok, new_tok], axis=-1)
    cand_p = jnp.concatenate([old_p, jnp.where(fresh, (1.0 - decay) * new_p, -1.0)], axis=-1)
    top_p, pos = jax.lax.top_k(cand_p, k)
    top_tok = jnp.take_along_axis(cand_tok, pos, axis=-1)
    return jnp.where(top_p > 0, top_tok, -1), jnp.where(top_p > 0, top_p, 0.0)


def _dedupe_last(keys, use, size: int):
    """use & (no later used entry with the same key in [0, size)): keep only the last update of each key
    (a deterministic scatter-max of positions, O(M))."""
    ids = jnp.arange(keys.shape[0], dtype=jnp.int32)
    last = jnp.full((size,), -1, jnp.int32).at[jnp.where(use, keys, size)].max(ids, mode="drop")
    return use & (last[jnp.clip(keys, 0, size - 1)] == ids)


NGRAM_TABLES = ("bi_tok", "bi_p", "tri_tok", "tri_p", "tri_tag")  # what `NGramDrafter.export` carries


@struct.dataclass
class NGramState:
    """`NGramDrafter`'s state (tables shared by the batch); H = hash_size.

    bi_tok:  [V, k] int32 candidates after each token (-1: none), bi_p [V, k] float32 their scores.
    tri_tok: [H, k] int32 candidates after each hashed token pair, tri_p [H, k] float32 their scores.
    tri_tag: [H, 2] int32 the pair stored in each bucket (-1: empty), so collisions read as misses.
    pre:     [B] int32 the token before each row's last token.
    """

    bi_tok: jax.Array
    bi_p: jax.Array
    tri_tok: jax.Array
    tri_p: jax.Array
    tri_tag: jax.Array
    pre: jax.Array


@dataclasses.dataclass(frozen=True)
class NGramDrafter:
    """Draft trees from n-gram tables of the target's own next-token distributions, refreshed after
    every verify call from the logits at every block node (shared by the batch, like Token Recycling):

    * a tri-gram table keyed by the two previous tokens (hashed into ``hash_size`` buckets, tagged so
      collisions read as misses), backed off to a bi-gram table ``[V, k]`` keyed by the previous token;
    * each entry keeps k candidates with scores ``decay * old + (1 - decay) * p_new`` (adaptive update).

    mode="greedy": node of rank r takes the r-th best candidate (ADED-style tri-gram drafts, greedy
    verification; ADED's MCTS-based tree adjustment is not implemented: the tree is a static template).
    mode="gumbel": siblings are a Gumbel-top-k sample *without replacement* from the stored distribution,
    and the drafts carry q, so ``SpeculativeDecoder(..., verifier="sampling",
    tree_sampling="without_replacement")`` is lossless under sampling (STAND-style)."""

    tree: TreeSpec = dataclasses.field(default_factory=lambda: default_recycling_tree(24, 6))
    k: int = 8
    hash_size: int = 1 << 16
    decay: float = 0.5
    mode: str = "greedy"
    use_trigram: bool = True

    def __post_init__(self):
        if max(self.tree.ranks) >= self.k:
            raise ValueError(f"tree uses candidate rank {max(self.tree.ranks)} but only k={self.k} are stored")
        if self.mode not in ("greedy", "gumbel"):
            raise ValueError("mode must be 'greedy' or 'gumbel'")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError("decay must be in [0, 1)")

    num_nodes = property(lambda self: self.tree.num_nodes)
    max_depth = property(lambda self: self.tree.max_depth)
    max_children = property(lambda self: self.tree.max_branching)
    is_chain = property(lambda self: self.tree.parents == tuple(range(self.tree.num_nodes)))
    draft_calls_per_step = 0

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        v, k, h = model.vocab_size, self.k, self.hash_size
        hist = state.method.hist
        pre = jnp.take_along_axis(hist, (state.method.hist_len - 2)[:, None], axis=1)[:, 0]
        tables = {"bi_tok": jnp.full((v, k), -1, jnp.int32), "bi_p": jnp.zeros((v, k), jnp.float32),
                  "tri_tok": jnp.full((h, k), -1, jnp.int32), "tri_p": jnp.zeros((h, k), jnp.float32),
                  "tri_tag": jnp.full((h, 2), -1, jnp.int32)}
        warm = carried(inputs, "ngram_tables")
        if warm is not None:  # hot start from a previous run's `export`
            for name, a in tables.items():
                if tuple(warm[name].shape) != a.shape:
                    raise ValueError(f"ngram_tables[{name!r}] must have shape {a.shape}, got {warm[name].shape}")
            tables = {name: jnp.asarray(warm[name], a.dtype) for name, a in tables.items()}
        return NGramState(**tables, pre=pre.astype(jnp.int32))

    def export(self, dstate):
        """State to carry into the next run (hot start): `DrafterCarry.ngram_tables`."""
        return {"ngram_tables": {name: getattr(dstate, name) for name in NGRAM_TABLES}}

    def _lookup(self, ds, a, b):
        """Candidates after the pair (a, b): tri-gram if stored, else bi-gram. a, b: [...] int."""
        bt, bp = ds.bi_tok[b], ds.bi_p[b]
        if not self.use_trigram:
            return bt, bp
        hsh = _pair_hash(a, b, self.hash_size)
        tag = ds.tri_tag[hsh]
        hit = (tag[..., 0] == a) & (tag[..., 1] == b)
        tt, tp = ds.tri_tok[hsh], ds.tri_p[hsh]
        return jnp.where(hit[..., None], tt, bt), jnp.where(hit[..., None], tp, bp)

    def propose(self, model, params, state, keys):
        ds = state.method.draft
        b = state.batch
        n = self.tree.num_nodes
        v = model.vocab_size
        # extended token array: [pre, root, node_0 .. node_{N-1}]
        ext = jnp.zeros((b, n + 2), jnp.int32).at[:, 0].set(ds.pre).at[:, 1].set(state.last)
        ok = jnp.zeros((b, n + 2), bool).at[:, :2].set(True)
        par = np.asarray(self.tree.parents)
        full_par = np.concatenate([[-1], par])  # block index -> parent block index (root: -1 = pre)
        qrows = jnp.zeros((b, n, v), jnp.float32) if self.mode == "gumbel" else None
        if self.mode == "gumbel":
            noise = jax.vmap(lambda kk: jax.random.gumbel(kk, (n + 1, self.k)))(keys)  # per parent block node
        for idx, parb, rk in _tree_levels(self.tree):
            gpar = full_par[parb]  # grandparent block index (-1 = pre)
            a_tok = ext[:, gpar + 1]
            p_tok = ext[:, parb + 1]
            ctok, cp = self._lookup(ds, a_tok, p_tok)  # [B,n_d,k]
            if self.mode == "gumbel":
                z = jnp.where(ctok >= 0, jnp.log(jnp.maximum(cp, 1e-30)) + noise[:, parb], -jnp.inf)
                order = jnp.argsort(-z, axis=-1)
            else:
                order = jnp.broadcast_to(jnp.arange(self.k), ctok.shape)
            pick = jnp.take_along_axis(order, jnp.broadcast_to(jnp.asarray(rk)[None, :, None], (b, len(idx), 1)), -1)
            tok = jnp.take_along_axis(ctok, pick, axis=-1)[..., 0]
            good = ok[:, parb + 1] & (tok >= 0)
            ext = ext.at[:, idx + 2].set(jnp.where(good, tok, 0))
            ok = ok.at[:, idx + 2].set(good)
            if self.mode == "gumbel":
                norm = jnp.sum(jnp.where(ctok >= 0, cp, 0.0), axis=-1, keepdims=True)
                qv = jnp.where(ctok >= 0, cp, 0.0) / jnp.maximum(norm, 1e-30)
                dense = jax.vmap(jax.vmap(lambda t, q: jnp.zeros((v,), jnp.float32).at[jnp.maximum(t, 0)].add(
                    jnp.where(t >= 0, q, 0.0))))(ctok, qv)  # [B,n_d,V]
                qrows = qrows.at[:, idx].set(dense)
        parents = self.tree.parents_array(b)
        return Draft(ext[:, 2:], parents, ok[:, 2:], None, qrows), ds, state.cache

    def update(self, model, params, state, dstate, info):
        ds = dstate
        v = ds.bi_tok.shape[0]
        b, t = info.block.shape
        probs = jax.nn.softmax(info.logits.astype(jnp.float32), axis=-1)
        new_p, new_tok = jax.lax.top_k(probs, self.k)  # [B,T,k]
        new_tok = new_tok.astype(jnp.int32)
        use = (info.node_valid & info.live[:, None]).reshape(-1)
        cur = info.block  # [B,T] the token whose continuation the logits describe
        full = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.asarray(self.tree.parents_array(b))], axis=1)
        prev = jnp.take_along_axis(cur, full, axis=1).at[:, 0].set(ds.pre)  # token before each node
        cur, prev = cur.reshape(-1), prev.reshape(-1)
        nt, npb = new_tok.reshape(b * t, self.k), new_p.reshape(b * t, self.k)
        # bi-gram
        keep = _dedupe_last(cur, use, v)
        bt, bp = _merge_rows(ds.bi_tok[cur], ds.bi_p[cur], nt, npb, self.decay, self.k)
        bidx = jnp.where(keep, cur, v)
        out = ds.replace(bi_tok=ds.bi_tok.at[bidx].set(bt, mode="drop"), bi_p=ds.bi_p.at[bidx].set(bp, mode="drop"))
        if self.use_trigram:
            hsh = _pair_hash(prev, cur, self.hash_size)
            keep3 = _dedupe_last(hsh, use, self.hash_size)
            tag = ds.tri_tag[hsh]
            same = (tag[:, 0] == prev) & (tag[:, 1] == cur)
            ot = jnp.where(same[:, None], ds.tri_tok[hsh], -1)
            tt, tp = _merge_rows(ot, ds.tri_p[hsh], nt, npb, self.decay, self.k)
            tidx = jnp.where(keep3, hsh, self.hash_size)
            out = out.replace(tri_tok=ds.tri_tok.at[tidx].set(tt, mode="drop"),
                              tri_p=ds.tri_p.at[tidx].set(tp, mode="drop"),
                              tri_tag=ds.tri_tag.at[tidx].set(jnp.stack([prev, cur], axis=1), mode="drop"))
        # the token before the new `last`
        cnt = info.cnt
        before = jnp.take_along_axis(info.out, jnp.maximum(cnt - 2, 0)[:, None], axis=1)[:, 0]
        new_pre = jnp.where(cnt >= 2, before, info.block[:, 0])
        return out.replace(pre=jnp.where(info.live & (cnt > 0), new_pre, ds.pre))
