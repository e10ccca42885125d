"""Drafters: static configuration (frozen dataclasses) with three pure functions.

    init(model, params, prompts, prompt_lens, state, inputs) -> dstate       (a pytree, kept in
                                                                               state.method["draft"])
    propose(model, params, state, keys) -> (Draft, dstate, cache)
    update(model, params, state, dstate, info: VerifyInfo) -> dstate

and the static attributes ``num_nodes`` (N), ``max_depth``, ``max_children``, ``is_chain`` and
``draft_calls_per_step``. The engine keeps the row's context in ``state.method["hist"] [B, H]`` (prompt,
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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.speculative.tree import Draft, TreeSpec


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
        return {}

    def propose(self, model, params, state, keys):
        m = state.method
        limit = m["prompt_len"] if self.source == "prompt" else None
        toks, found, _ = ngram_lookup(m["hist"], m["hist_len"], self.num_tokens, self.max_ngram, self.min_ngram,
                                      limit)
        b = toks.shape[0]
        parents = TreeSpec.chain(self.num_tokens).parents_array(b)
        valid = jnp.broadcast_to(found[:, None], toks.shape)
        return Draft(toks, parents, valid), m["draft"], state.cache

    def update(self, model, params, state, dstate, info):
        return dstate


# ----------------------------------------------------------------------------------------------------
# Token Recycling
# ----------------------------------------------------------------------------------------------------

DEFAULT_RECYCLING_RANK_PROBS = (0.45, 0.17, 0.09, 0.06, 0.04, 0.03, 0.025, 0.02)


def default_recycling_tree(n: int = 24, max_depth: int = 8) -> TreeSpec:
    return TreeSpec.from_rank_probs(n, DEFAULT_RECYCLING_RANK_PROBS, max_depth=max_depth)


@dataclasses.dataclass(frozen=True)
class TokenRecyclingDrafter:
    """Adjacency matrix ``adj[t] =`` the target's top-k tokens after token t (-1: unknown), refreshed
    after every verify call from the logits at every block node; the draft tree is filled breadth-first:
    node i takes ``adj[token(parent(i)), rank(i)]``.

    shared=True: one ``[V, k]`` matrix for the batch (the paper's design; rows see each other's
    updates, which changes τ but never the tokens); False: one per row ``[B, V, k]``. A warm matrix can
    be passed as ``inputs["recycling_adj"]`` (hot start)."""

    tree: TreeSpec = dataclasses.field(default_factory=default_recycling_tree)
    k: int = 8
    shared: bool = True

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
        adj = inputs.get("recycling_adj") if isinstance(inputs, dict) else None
        if adj is None:
            adj = jnp.full((v, self.k), -1, jnp.int32)
        adj = jnp.asarray(adj, jnp.int32)
        if adj.shape != (v, self.k):
            raise ValueError(f"recycling_adj must have shape {(v, self.k)}, got {adj.shape}")
        if not self.shared:
            adj = jnp.broadcast_to(adj, (b, v, self.k))
        return {"adj": adj}

    def propose(self, model, params, state, keys):
        adj = state.method["draft"]["adj"]
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
        return Draft(toks[:, 1:], parents, ok[:, 1:]), state.method["draft"], state.cache

    def update(self, model, params, state, dstate, info):
        adj = dstate["adj"]
        v = adj.shape[-2]
        _, top = jax.lax.top_k(info.logits, self.k)  # [B,T,k]
        top = top.astype(jnp.int32)
        use = info.node_valid & info.live[:, None]
        tok = info.block
        if self.shared:
            b, t = tok.shape
            ft, fu, ftop = tok.reshape(-1), use.reshape(-1), top.reshape(b * t, self.k)
            later = jnp.triu(jnp.ones((b * t, b * t), bool), 1)  # later[i, j]: j comes after i
            dup = jnp.any(later & (ft[:, None] == ft[None, :]) & fu[None, :], axis=1)
            idx = jnp.where(fu & ~dup, ft, v)
            adj = adj.at[idx].set(ftop, mode="drop")
        else:
            t = tok.shape[1]
            later = jnp.triu(jnp.ones((t, t), bool), 1)

            def one(a, tk, u, tp):
                dup = jnp.any(later & (tk[:, None] == tk[None, :]) & u[None, :], axis=1)
                return a.at[jnp.where(u & ~dup, tk, v)].set(tp, mode="drop")

            adj = jax.vmap(one)(adj, tok, use, top)
        return {**dstate, "adj": adj}


# ----------------------------------------------------------------------------------------------------
# Model drafters: a separate draft model, or the target itself with layers switched off
# ----------------------------------------------------------------------------------------------------

def draft_distribution(logits, state, sample: bool):
    """Draft logits [B,V] -> (token [B] drawn or argmax, q [B,V] or None). When sampling, the row's
    sampling parameters are applied to the draft logits too; rows with temperature 0 draw greedily."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    from jaxdec.core.processors import process
    sp = state.method["sampling"]
    proc = process(logits, sp)
    greedy_row = jnp.asarray(sp.temperature, jnp.float32) <= 0
    am = jnp.argmax(proc, axis=-1)
    q = jnp.where(greedy_row[:, None], jax.nn.one_hot(am, logits.shape[-1], dtype=jnp.float32),
                  jax.nn.softmax(proc, axis=-1))
    return am.astype(jnp.int32), q


def _draw_rows(keys, q):
    logq = jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)), -jnp.inf)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logq).astype(jnp.int32)


def _chain_draft(toks, qs, sample, b):
    toks = jnp.stack(toks, axis=1)
    k = toks.shape[1]
    q = jnp.stack(qs, axis=1) if sample else None
    return Draft(toks, TreeSpec.chain(k).parents_array(b), jnp.ones((b, k), bool), None, q)


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
    """A separate draft model (same vocabulary) with its own KV cache drafts a chain of ``num_tokens``.

    Pass ``params = with_draft_params(target_params, draft_params)`` to `generate`. sample=False drafts
    greedily (for the greedy verifier); sample=True draws from the draft's distribution under the row's
    sampling parameters and returns q for speculative sampling. The draft cache is kept in step with the
    target: at most two tokens (the last accepted draft token after a full accept, then the bonus) are
    fed at the start of the next proposal."""

    draft_model: object
    num_tokens: int = 4
    sample: bool = False

    own_params = True
    max_children = 1
    is_chain = True
    extra_headroom = 1

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"draft length (num_tokens) must be >= 1, got {self.num_tokens}")

    num_nodes = property(lambda self: self.num_tokens)
    max_depth = property(lambda self: self.num_tokens)
    draft_calls_per_step = property(lambda self: self.num_tokens)

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        from jaxdec.core.steps import prefill
        if self.draft_model.vocab_size != model.vocab_size:
            raise ValueError(f"draft model vocabulary ({self.draft_model.vocab_size}) differs from the target's "
                             f"({model.vocab_size}): a draft model must share the target's tokenizer")
        b = prompts.shape[0]
        dcache = self.draft_model.init_cache(b, state.cache.size)
        _, dcache, _ = prefill(self.draft_model, dparams, prompts, prompt_lens, dcache)
        pend = jnp.stack([state.last, jnp.zeros_like(state.last)], axis=1)
        return {"cache": dcache, "pend": pend, "npend": jnp.ones((b,), jnp.int32), "l0": dcache.lengths}

    def propose(self, model, dparams, state, keys):
        from jaxdec.cache.kv import rollback
        ds = state.method["draft"]
        dm = self.draft_model
        dc = ds["cache"]
        b = state.batch
        l0 = dc.lengths
        pos = l0[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
        out = dm(dparams, ds["pend"], pos, dc, logits_at=(ds["npend"] - 1)[:, None])
        dc = rollback(out.cache, l0 + ds["npend"])
        logits = out.logits[:, 0]
        toks, qs = [], []
        ks = jax.vmap(lambda k: jax.random.split(k, self.num_tokens))(keys)
        for i in range(self.num_tokens):
            am, q = draft_distribution(logits, state, self.sample)
            x = _draw_rows(ks[:, i], q) if self.sample else am
            toks.append(x)
            qs.append(q)
            if i < self.num_tokens - 1:
                out = dm(dparams, x[:, None], dc.lengths[:, None], dc)
                dc, logits = out.cache, out.logits[:, 0]
        return _chain_draft(toks, qs, self.sample, b), {**ds, "cache": dc, "l0": l0}, state.cache

    def update(self, model, dparams, state, dstate, info):
        from jaxdec.cache.kv import rollback
        k = self.num_tokens
        a = info.n_acc
        full = a >= k
        bonus = jnp.take_along_axis(info.out, a[:, None], axis=1)[:, 0]
        last_draft = info.block[:, k]
        pend = jnp.where(full[:, None], jnp.stack([last_draft, bonus], 1), jnp.stack([bonus, bonus], 1))
        npend = jnp.where(full, 2, 1).astype(jnp.int32)
        length = jnp.where(full, info.start + k, info.start + 1 + a)
        running = info.live & ~state.done
        dc = dstate["cache"]
        dc = rollback(dc, jnp.where(running, length, dstate["l0"]))
        return {**dstate, "cache": dc, "pend": jnp.where(running[:, None], pend, dstate["pend"]),
                "npend": jnp.where(running, npend, dstate["npend"])}


def truncated_draft(model, params, num_layers: int):
    """A separate draft model made of the target's first ``num_layers`` layers (same embeddings and head):
    returns (draft_model, draft_params). Stands in for a trained small model in tests."""
    cfg = model.config
    if not 1 <= num_layers <= cfg.num_layers:
        raise ValueError(f"num_layers must be in [1, {cfg.num_layers}]")
    dm = dataclasses.replace(model, config=dataclasses.replace(cfg, num_layers=num_layers))
    dp = dict(params)
    dp["layers"] = jax.tree.map(lambda a: a[:num_layers], params["layers"])
    return dm, dp


@dataclasses.dataclass(frozen=True)
class LayerSkipDrafter:
    """Self-speculation: the target itself with some layers switched off drafts a chain of ``num_tokens``
    through the target's own cache (the verify call then overwrites those positions).

    skip: layers switched off (static default). The layer mask lives in the drafter state as a traced
    ``[L]`` array (``inputs["skip_layers"]`` overrides it per run without recompiling), so adaptive
    schemes (SWIFT's search, DEL's exit choice) change it between runs or steps for free."""

    skip: tuple = ()
    num_tokens: int = 4
    sample: bool = False

    max_children = 1
    is_chain = True

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"draft length (num_tokens) must be >= 1, got {self.num_tokens}")

    num_nodes = property(lambda self: self.num_tokens)
    max_depth = property(lambda self: self.num_tokens)
    draft_calls_per_step = property(lambda self: self.num_tokens)

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        n = model.num_layers
        if any(not 0 <= i < n for i in self.skip):
            raise ValueError(f"skip layers must be in [0, {n})")
        layers = np.ones((n,), bool)
        layers[list(self.skip)] = False
        lay = inputs.get("skip_layers") if isinstance(inputs, dict) else None
        lay = jnp.asarray(layers) if lay is None else ~jnp.asarray(lay, bool)
        return {"layers": lay}

    def propose(self, model, params, state, keys):
        from jaxdec.cache.kv import rollback
        ds = state.method["draft"]
        cache = state.cache
        l0 = cache.lengths
        b = state.batch
        x = state.last
        toks, qs = [], []
        ks = jax.vmap(lambda k: jax.random.split(k, self.num_tokens))(keys)
        for i in range(self.num_tokens):
            out = model(params, x[:, None], (l0 + i)[:, None], cache, layers=ds["layers"])
            cache = out.cache
            am, q = draft_distribution(out.logits[:, 0], state, self.sample)
            x = _draw_rows(ks[:, i], q) if self.sample else am
            toks.append(x)
            qs.append(q)
        return _chain_draft(toks, qs, self.sample, b), ds, rollback(cache, l0)

    def update(self, model, params, state, dstate, info):
        return dstate
