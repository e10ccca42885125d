"""Superposed Decoding (Shen et al., 2024): k drafts from one forward pass per step.

Each prompt owns ONE batch row. The k drafts are kept in the decoder state (tokens, lengths, running
scores) and the model sees a single input vector per step, the *superposition* of the drafts' most
recent token embeddings

    e = sum_i  w_i * E[last token of draft i],      w_i = p_i / sum_j p_j

where ``p_i = exp(score_i)`` is draft i's running probability (finished drafts take no part). The
model's next-token distribution for that superposed row is shared by all drafts. Its top ``m`` tokens
(``num_candidates``, default k) are joined to each of the k drafts: the k*m (k^2 by default)
candidates are scored with the drafts' running log-scores and the best k are kept:

    cand(i, c) = score_i + log p(c)                              (no n-gram interpolation)
    cand(i, c) = score_i + (1-a) log p(c) + a log p_ng(c | draft i)   (a = ngram_alpha > 0)

``p(c)`` is the softmax of logits / temperature. The n-gram probability interpolates several orders,
``p_ng(c | d) = sum_n lambda_n * count(ctx_n(d), c) / count(ctx_n(d))`` over the draft's own last
n-1 tokens (prompt included); a context never seen counts 0. Where ``p_ng(c | d) = 0`` the term
``a log p_ng`` is replaced by ``-ngram_penalty`` (default 200), so inside one draft every supported
candidate beats every unsupported one, and a draft with no support at all loses ``ngram_penalty``
against drafts that have some. These are the facts of the official code (RAIVNLab/SuperposedDecoding:
`Superpose.forward`, `superposition_matrix`, `ngram_probs`) in our words, with two choices of ours:

* the official code renormalises the top-m probabilities before taking logs; that adds the same
  constant to every candidate of a step, so the ranking is unchanged and we keep the plain
  log-probabilities (scores are then log-probabilities under the superposed distribution);
* a draft that emits a stop id is *finished*: it keeps its score and its slot as long as it ranks in
  the top k (its one "stay" candidate competes with the k*m extensions), and it stops feeding the
  superposition. The official code keeps separate alive/finished sets of size k instead.

The first step expands only draft 0 (the others start at -1e9, as beam search does), so the k drafts
begin with the k most likely first tokens; every kept candidate is a distinct (draft, token) pair, so
drafts stay distinct. With k = 1 and no n-gram the method is greedy decoding token for token.

Model input by embeddings: the model protocol's optional ``model.embed(params, ids)`` gives the
drafts' token embeddings and the call's ``embeds=[B,T,E]`` input runs the model on the superposed
vectors (`jaxdec.models.interface`); a model without ``embed`` is refused with a TypeError naming it.

The n-gram model is built on the host (`NGramModel.from_token_ids` / `from_texts`; `default_ngram`
uses the text files shipped in ``jaxdec/data``) and looked up on device: per order, the (context,
next) pairs sit in a table sorted by a 32-bit hash, found by binary search and checked token by token.

Host entry: `superposed_generate(model, params, prompts, num_drafts=3, ...)` -> `Generation` whose
``tokens`` are each prompt's best draft and ``extras["beams"]`` all k drafts ``{"tokens", "score",
"finished"}`` best first.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.cache.kv import rollback
from jaxdec.core.generate import Generation
from jaxdec.core.state import EOS, LENGTH
from jaxdec.core.steps import initial_state, prefill, suppress_stops
from jaxdec.models.interface import require
from jaxdec.search.common import NEG, isin, run_grouped

VOID = 2.0 * NEG  # score of a candidate that does not exist (below any real or "not yet started" draft)
HASH_WINDOW = 4  # how many equal hash keys one lookup inspects (the build refuses more)
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


# ---------------------------------------------------------------- model input by embeddings
def token_embeddings(model, params, tokens):
    """tokens [...] int -> the model's input embeddings [..., E] (float32)."""
    return require(model, "embed", "superposed decoding")(params, tokens).astype(jnp.float32)


def forward_embeds(model, params, embeds, positions, cache):
    """The model's forward on input vectors ``embeds [B,T,E]`` instead of token ids."""
    require(model, "embed", "superposed decoding")
    return model(params, None, positions, cache, embeds=embeds)


def superpose(model, params, tokens, weights):
    """tokens [B,k], weights [B,k] -> sum_i weights[:, i] * E[tokens[:, i]]  [B,E]."""
    rows = token_embeddings(model, params, tokens)
    return jnp.sum(weights[..., None].astype(jnp.float32) * rows, axis=1)


def draft_weights(scores, finished):
    """Superposition weights: running probabilities of the unfinished drafts, normalised per row."""
    alive = ~finished
    top = jnp.max(jnp.where(alive, scores, VOID), axis=-1, keepdims=True)
    w = jnp.where(alive, jnp.exp(scores - top), 0.0)
    return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)


# ---------------------------------------------------------------- k*m expansion and pruning
def expand_and_prune(scores, finished, increments, k: int):
    """scores [B,k0] running draft scores, finished [B,k0] bool, increments [B,k0,m] the score each of
    the m candidate tokens adds to each draft -> (new scores [B,k], source draft [B,k], candidate
    index [B,k]), best first. A finished draft offers one candidate (index 0) that keeps its score."""
    b, k0, m = increments.shape
    cand = scores[:, :, None] + increments
    stay = jnp.where(jnp.arange(m)[None, None, :] == 0, scores[:, :, None], VOID)
    cand = jnp.where(finished[:, :, None], stay, cand)
    vals, idx = jax.lax.top_k(cand.reshape(b, k0 * m), k)
    return vals, (idx // m).astype(jnp.int32), (idx % m).astype(jnp.int32)


# ---------------------------------------------------------------- n-gram model
_PRIME = 16777619
_BASIS = 2166136261


def _hash(xp, ctx, nxt, order: int):
    """32-bit hash of (order, ctx [..., n-1], nxt [...]); the same numbers in NumPy and JAX."""
    u = np.uint32 if xp is np else jnp.uint32
    h = xp.full(nxt.shape, (_BASIS ^ order) & 0xFFFFFFFF, dtype=u)
    cols = [ctx[..., c] for c in range(ctx.shape[-1])] + [nxt]
    for x in cols:
        h = (h ^ x.astype(u)) * u(_PRIME)
    h = h ^ (h >> u(16))
    h = h * u(0x85EBCA6B)
    h = h ^ (h >> u(13))
    h = h * u(0xC2B2AE35)
    return h ^ (h >> u(16))


class NGramModel:
    """Count-based n-gram model over token ids, built on the host.

    ``orders``: the n of each n-gram table (2 = bigram: one token of context). ``prob(order, ctx,
    token)`` is ``count(ctx + token) / count(ctx followed by anything)`` (0 for an unseen context).
    """

    def __init__(self, counts: dict, orders: Sequence[int]):
        self.orders = tuple(int(n) for n in orders)
        self.counts = counts  # order -> {ctx tuple: Counter(next -> count)}
        self._tables = None

    @classmethod
    def from_token_ids(cls, sequences, orders: Sequence[int] = (2, 3, 4)) -> "NGramModel":
        orders = tuple(orders)
        if not orders or any((not isinstance(n, (int, np.integer))) or n < 1 for n in orders) or \
                len(set(orders)) != len(orders):
            raise ValueError(f"ngram orders must be distinct integers >= 1, got {orders!r}")
        counts = {int(n): collections.defaultdict(collections.Counter) for n in orders}
        total = 0
        for seq in sequences:
            s = [int(t) for t in seq]
            if any(t < 0 for t in s):
                raise ValueError("ngram corpus token ids must be >= 0")
            total += len(s)
            for n in orders:
                for i in range(len(s) - n + 1):
                    counts[n][tuple(s[i:i + n - 1])][s[i + n - 1]] += 1
        if total == 0:
            raise ValueError("ngram corpus is empty")
        return cls({n: dict(c) for n, c in counts.items()}, orders)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, orders: Sequence[int] = (2, 3, 4)) -> "NGramModel":
        return cls.from_token_ids([tokenizer.encode(t) for t in texts if t], orders)

    def prob(self, order: int, ctx, token: int) -> float:
        nxt = self.counts[order].get(tuple(int(t) for t in ctx))
        if not nxt:
            return 0.0
        return nxt.get(int(token), 0) / sum(nxt.values())

    def num_entries(self, order: int) -> int:
        return sum(len(c) for c in self.counts[order].values())

    def tables(self):
        """Device tables, one dict per order: keys [E] uint32 sorted, ctx [E, n-1], nxt [E], prob [E]."""
        if self._tables is None:
            out = []
            for n in self.orders:
                ctx, nxt, prob = [], [], []
                for c, nx in self.counts[n].items():
                    tot = sum(nx.values())
                    for t, cnt in nx.items():
                        ctx.append(c)
                        nxt.append(t)
                        prob.append(cnt / tot)
                ctx.append((-1,) * (n - 1))  # sentinel: keeps every table non-empty, never matches
                nxt.append(-1)
                prob.append(0.0)
                ctx = np.asarray(ctx, np.int32).reshape(len(nxt), n - 1)
                nxt = np.asarray(nxt, np.int32)
                keys = _hash(np, ctx, nxt, n)
                order = np.argsort(keys, kind="stable")
                keys = keys[order]
                _, runs = np.unique(keys, return_counts=True)
                if runs.max() > HASH_WINDOW:
                    raise ValueError(f"ngram table of order {n}: {runs.max()} entries share one hash key "
                                     f"(> {HASH_WINDOW}); the corpus is too large for 32-bit keys")
                out.append({"keys": jnp.asarray(keys), "ctx": jnp.asarray(ctx[order]),
                            "nxt": jnp.asarray(nxt[order]), "prob": jnp.asarray(np.asarray(prob, np.float32)[order])})
            self._tables = tuple(out)
        return self._tables


def lookup(table, order: int, ctx, nxt):
    """p_order(nxt | ctx) from a device table; ctx [Q, n-1], nxt [Q] -> [Q] (0 where unseen)."""
    key = _hash(jnp, ctx, nxt, order)
    e = table["keys"].shape[0]
    pos = jnp.searchsorted(table["keys"], key, side="left")
    idx = jnp.clip(pos[:, None] + jnp.arange(HASH_WINDOW)[None, :], 0, e - 1)
    hit = (table["keys"][idx] == key[:, None]) & (table["nxt"][idx] == nxt[:, None])
    if order > 1:
        hit = hit & jnp.all(table["ctx"][idx] == ctx[:, None, :], axis=-1)
    # a table entry is unique per (ctx, nxt): a clipped index repeating the last entry must count once
    first = jnp.concatenate([jnp.ones_like(idx[:, :1], bool), idx[:, 1:] != idx[:, :-1]], axis=1)
    return jnp.sum(jnp.where(hit & first, table["prob"][idx], 0.0), axis=-1)


def ngram_probs(tables, orders, lambdas, ctx, cand):
    """Interpolated n-gram probability of each candidate for each draft.

    tables: `NGramModel.tables()`; lambdas [n_orders]; ctx [B,k,C] each draft's last C tokens (oldest
    first, -1 where the text is shorter); cand [B,m] -> [B,k,m]."""
    b, k, c = ctx.shape
    m = cand.shape[1]
    nxt = jnp.broadcast_to(cand[:, None, :], (b, k, m)).reshape(-1)
    out = jnp.zeros((b * k * m,), jnp.float32)
    for i, (table, n) in enumerate(zip(tables, orders)):
        q = jnp.broadcast_to(ctx[:, :, None, c - (n - 1):], (b, k, m, n - 1)).reshape(-1, n - 1)
        out = out + lambdas[i] * lookup(table, n, q, nxt)
    return out.reshape(b, k, m)


def default_corpus_texts() -> list:
    """The tiny default corpus: every text shipped in jaxdec/data (prompt files, tokenizer test texts)."""
    texts = []
    prompts = os.path.join(DATA_DIR, "prompts")
    for name in sorted(os.listdir(prompts)):
        if name.endswith(".jsonl"):
            with open(os.path.join(prompts, name)) as fh:
                texts += [json.loads(line)["prompt"] for line in fh if line.strip()]
    with open(os.path.join(DATA_DIR, "tokenizer_texts.json")) as fh:
        texts += [t for t in json.load(fh)["texts"] if t.strip()]
    return texts


@functools.lru_cache(maxsize=8)
def _default_ngram(tokenizer, orders):
    return NGramModel.from_texts(default_corpus_texts(), tokenizer, orders)


def default_ngram(tokenizer, orders: Sequence[int] = (2, 3, 4)) -> NGramModel:
    """An n-gram model of the repo's own data files (never downloaded), tokenized with ``tokenizer``."""
    return _default_ngram(tokenizer, tuple(int(n) for n in orders))


# ---------------------------------------------------------------- the decoder
@struct.dataclass
class SuperposedInputs:
    """Per-row inputs (traced; `superposed_inputs` builds them): temperature [B] float32, alpha [B] float32
    n-gram interpolation weight, lambdas [n_orders] float32 per-order weights, penalty [] float32 the
    no-support penalty, tables the n-gram tables (one dict per order, () without n-gram)."""

    temperature: jax.Array
    alpha: jax.Array
    lambdas: jax.Array
    penalty: jax.Array
    tables: Any = ()


@struct.dataclass
class SuperposedState:
    """`Superposed`'s method state; B rows (one per prompt), k = num_drafts, C output capacity,
    c = max(orders) - 1 n-gram context tokens.

    drafts:      [B, k, C] int32 each draft's tokens (valid up to ``dlen``).
    dlen:        [B, k] int32 draft lengths.
    scores:      [B, k] float32 running log-scores (-1e9: an empty slot).
    fin:         [B, k] bool drafts that emitted a stop id.
    ctx:         [B, k, c] int32 each draft's last c tokens (prompt included; -1 before the start).
    weights:     [B, k] float32 superposition weights (finished drafts 0).
    temperature: [B] float32; alpha: [B] float32 n-gram interpolation weight.
    lambdas:     [n_orders] float32 per-order n-gram weights; penalty: [] float32 the no-support penalty.
    tables:      the n-gram tables, one dict per order (`NGramModel.tables`), () without n-gram.
    """

    drafts: jax.Array
    dlen: jax.Array
    scores: jax.Array
    fin: jax.Array
    ctx: jax.Array
    weights: jax.Array
    temperature: jax.Array
    alpha: jax.Array
    lambdas: jax.Array
    penalty: jax.Array
    tables: Any = ()


@dataclasses.dataclass(frozen=True)
class Superposed:
    """Superposed decoding over one row per prompt.

    Static: ``num_drafts`` (k), ``num_candidates`` (m >= k top tokens joined to each draft), ``orders``
    (n-gram orders; empty: no n-gram). Traced (``inputs.method``, a `SuperposedInputs`): temperature [rows], alpha
    [rows], lambdas [n_orders], penalty [], tables (the n-gram tables)."""

    num_drafts: int = 3
    num_candidates: int = 3
    orders: tuple = ()

    def __post_init__(self):
        if not isinstance(self.num_drafts, int) or self.num_drafts < 1:
            raise ValueError(f"num_drafts must be an integer >= 1, got {self.num_drafts!r}")
        if not isinstance(self.num_candidates, int) or self.num_candidates < self.num_drafts:
            raise ValueError(f"num_candidates must be an integer >= num_drafts ({self.num_drafts}), "
                             f"got {self.num_candidates!r}")

    @property
    def context(self) -> int:
        return max(self.orders, default=1) - 1

    def initial_method(self, prompts, prompt_lens, inputs):
        """The decoder's state before the first selection: draft 0 empty with score 0, the others at -1e9."""
        k = self.num_drafts
        b, p = prompts.shape
        cap = inputs.out_buffer.shape[1]
        sp = inputs.method
        c = self.context
        idx = prompt_lens[:, None].astype(jnp.int32) - c + jnp.arange(c)[None, :]
        ctx = jnp.where(idx >= 0, jnp.take_along_axis(prompts, jnp.clip(idx, 0, p - 1), axis=1), -1)
        return SuperposedState(
            drafts=jnp.zeros((b, k, cap), jnp.int32),
            dlen=jnp.zeros((b, k), jnp.int32),
            scores=jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None, :].repeat(b, 0).astype(jnp.float32),
            fin=jnp.zeros((b, k), bool),
            ctx=jnp.broadcast_to(ctx[:, None, :], (b, k, c)).astype(jnp.int32),
            weights=jnp.zeros((b, k), jnp.float32),
            temperature=sp.temperature.astype(jnp.float32),
            alpha=sp.alpha.astype(jnp.float32),
            lambdas=sp.lambdas.astype(jnp.float32),
            penalty=jnp.asarray(sp.penalty, jnp.float32),
            tables=sp.tables,
        )

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        method = self.initial_method(prompts, prompt_lens, inputs)
        state = initial_state(prompts, cache, inputs, method, {"model_calls": jnp.ones((), jnp.int32)})
        return self._advance(state, logits)

    def step(self, model, params, state):
        m = state.method
        last = jnp.take_along_axis(m.drafts, jnp.maximum(m.dlen - 1, 0)[:, :, None], axis=2)[:, :, 0]
        emb = superpose(model, params, last, m.weights)
        cache = state.cache
        old = cache.lengths
        out = forward_embeds(model, params, emb[:, None, :], old[:, None], cache)
        cache = rollback(out.cache, jnp.where(state.done, old, out.cache.lengths))
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._advance(state, out.logits[:, 0])

    def _increments(self, state, logits):
        """Per-draft score increments of the m candidates: ([B,k,m], candidate tokens [B,m])."""
        m = state.method
        k = self.num_drafts
        lg = suppress_stops(logits.astype(jnp.float32), state)
        logp = jax.nn.log_softmax(lg / m.temperature[:, None], axis=-1)
        lp, cand = jax.lax.top_k(logp, self.num_candidates)
        inc = jnp.broadcast_to(lp[:, None, :], (lp.shape[0], k, lp.shape[1]))
        if self.orders:
            png = ngram_probs(m.tables, self.orders, m.lambdas, m.ctx, cand)
            a = m.alpha[:, None, None]
            ng = jnp.where(png > 0, a * jnp.log(jnp.maximum(png, 1e-30)), -m.penalty)
            inc = jnp.where(a > 0, (1.0 - a) * inc + ng, inc)
        return inc, cand

    def _advance(self, state, logits):
        m = state.method
        inc, cand = self._increments(state, logits)
        scores, src, j = expand_and_prune(m.scores, m.fin, inc, self.num_drafts)
        tok = jnp.take_along_axis(cand, j, axis=1)
        was_fin = jnp.take_along_axis(m.fin, src, axis=1)
        drafts = jnp.take_along_axis(m.drafts, src[:, :, None], axis=1)
        dlen = jnp.take_along_axis(m.dlen, src, axis=1)
        ctx = jnp.take_along_axis(m.ctx, src[:, :, None], axis=1)
        grow = ~was_fin
        cap = drafts.shape[-1]
        at = jnp.arange(cap)[None, None, :] == jnp.minimum(dlen, cap - 1)[:, :, None]
        drafts = jnp.where(at & grow[:, :, None], tok[:, :, None], drafts)
        dlen = dlen + grow.astype(jnp.int32)
        if self.context:
            ctx = jnp.where(grow[:, :, None], jnp.concatenate([ctx[:, :, 1:], tok[:, :, None]], axis=2), ctx)
        fin = was_fin | (grow & isin(tok, state.stop_ids))

        live = ~state.done
        num_new = state.num_new + live.astype(jnp.int32)

        def keep(new, old):
            return jnp.where(live.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        method = m.replace(drafts=keep(drafts, m.drafts), dlen=keep(dlen, m.dlen), scores=keep(scores, m.scores),
                           fin=keep(fin, m.fin), ctx=keep(ctx, m.ctx))
        method = method.replace(weights=draft_weights(method.scores, method.fin))
        all_fin = jnp.all(method.fin, axis=1)
        ended = live & (all_fin | (num_new >= state.max_new))
        finish = jnp.where(ended, jnp.where(all_fin, EOS, LENGTH), state.finish).astype(jnp.int32)
        return state.replace(num_new=num_new, done=state.done | ended, finish=finish, method=method)

    def summarize(self, state):
        return {}


# ---------------------------------------------------------------- host entry
def _check_args(num_drafts, num_candidates, temperature, ngram, ngram_alpha, ngram_weights, ngram_penalty,
                vocab_size):
    if not isinstance(num_drafts, (int, np.integer)) or isinstance(num_drafts, bool) or num_drafts < 1:
        raise ValueError(f"num_drafts must be an integer >= 1, got {num_drafts!r}")
    m = num_drafts if num_candidates is None else num_candidates
    if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or not num_drafts <= m <= vocab_size:
        raise ValueError(f"num_candidates must be an integer in [num_drafts, vocab_size] = [{num_drafts}, "
                         f"{vocab_size}], got {num_candidates!r}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if not (np.isfinite(ngram_alpha) and 0.0 <= ngram_alpha <= 1.0):
        raise ValueError(f"ngram_alpha must be in [0, 1], got {ngram_alpha!r}")
    if not (np.isfinite(ngram_penalty) and ngram_penalty >= 0):
        raise ValueError(f"ngram_penalty must be finite and >= 0, got {ngram_penalty!r}")
    if ngram is None:
        if ngram_weights is not None:
            raise ValueError("ngram_weights given without an ngram model (pass ngram=... or a tokenizer)")
        return int(num_drafts), int(m), None
    if not isinstance(ngram, NGramModel):
        raise ValueError(f"ngram must be an NGramModel, got {type(ngram).__name__}")
    n = len(ngram.orders)
    lam = np.full(n, 1.0 / n) if ngram_weights is None else np.asarray(ngram_weights, np.float64).reshape(-1)
    if lam.shape != (n,):
        raise ValueError(f"ngram_weights needs one weight per n-gram order {ngram.orders}, got {ngram_weights!r}")
    if not np.all(np.isfinite(lam)) or np.any(lam < 0) or abs(lam.sum() - 1.0) > 1e-6:
        raise ValueError(f"ngram_weights must be >= 0 and sum to 1, got {list(lam)} (sum {lam.sum():.6g})")
    return int(num_drafts), int(m), lam


def superposed_inputs(rows: int, temperature: float = 1.0, alpha: float = 0.0, lambdas=None,
                      penalty: float = 200.0, tables=()) -> "SuperposedInputs":
    """The decoder's traced settings (``inputs.method``) for ``rows`` rows."""
    return SuperposedInputs(temperature=jnp.full((rows,), temperature, jnp.float32),
                            alpha=jnp.full((rows,), alpha, jnp.float32),
                            lambdas=jnp.asarray(np.zeros(0) if lambdas is None else lambdas, jnp.float32),
                            penalty=jnp.asarray(penalty, jnp.float32), tables=tables)


def superposed_generate(model, params, prompts, *, num_drafts: int = 3, num_candidates: Optional[int] = None,
                        temperature: float = 1.0, ngram: Optional[NGramModel] = None, ngram_alpha: float = 0.0,
                        ngram_weights=None, ngram_penalty: float = 200.0, max_new_tokens: int = 32,
                        min_new_tokens: int = 0, stop_ids=None, batch_size: Optional[int] = None,
                        cache_size: Optional[int] = None, tokenizer=None, debug: bool = False,
                        callback=None) -> Generation:
    """Superposed decoding: ``num_drafts`` drafts per prompt for about the model calls of one.

    num_candidates: top tokens of the superposed distribution joined to each draft (default
    num_drafts, i.e. a k^2 expansion). temperature: of the next-token distribution (the paper's tuned
    setting uses a low one; scores and superposition weights follow it). ngram: an `NGramModel`; with
    ``ngram_alpha > 0`` and no ngram, `default_ngram(tokenizer)` is used. ngram_weights: one weight per
    order, summing to 1 (default uniform). ngram_penalty: replaces ``alpha * log p_ng`` where the
    n-gram gives a candidate probability 0.

    Returns a `Generation`: ``tokens[i]`` is prompt i's best draft, ``extras["beams"][i]`` its
    ``num_drafts`` drafts ``{"tokens", "score", "finished"}`` best first, ``extras["scores"][i]`` the
    best score; ``stats["model_calls"]`` counts calls of the (one-row-per-prompt) model.
    """
    require(model, "embed", "superposed decoding")  # refused by name before any tracing
    if ngram is None and ngram_alpha > 0:
        if tokenizer is None:
            raise ValueError("ngram_alpha > 0 needs an ngram model (ngram=...) or a tokenizer for the default one")
        ngram = default_ngram(tokenizer)
    k, m, lam = _check_args(num_drafts, num_candidates, temperature, ngram, ngram_alpha, ngram_weights,
                            ngram_penalty, model.vocab_size)
    dec = Superposed(num_drafts=k, num_candidates=m, orders=() if ngram is None else ngram.orders)
    tables = () if ngram is None else ngram.tables()

    def extra(inputs, chunk):
        return inputs.replace(method=superposed_inputs(inputs.batch, temperature, ngram_alpha, lam, ngram_penalty,
                                                       tables))

    stop = tuple(model.eos_ids) if stop_ids is None else tuple(int(s) for s in stop_ids)
    prompts, results, stats = run_grouped(dec, model, params, prompts, 1, max_new_tokens=max_new_tokens,
                                          min_new_tokens=min_new_tokens, stop_ids=stop, batch_size=batch_size,
                                          cache_size=cache_size, debug=debug, callback=callback,
                                          extra_inputs=extra)
    beams, best, finish = [], [], []
    row_calls = 0  # single-row forwards spent on real prompts: one row per prompt per call
    for state, real in results:
        row_calls += int(state.stats["model_calls"]) * real
        md = jax.tree.map(np.asarray, {x: getattr(state.method, x) for x in ("drafts", "dlen", "scores", "fin")})
        for b in range(real):
            order = np.argsort(-md["scores"][b], kind="stable")
            hyps = [{"tokens": md["drafts"][b, i, :int(md["dlen"][b, i])].tolist(),
                     "score": float(md["scores"][b, i]), "finished": bool(md["fin"][b, i])} for i in order]
            beams.append(hyps)
            best.append(hyps[0]["tokens"])
            finish.append("eos" if hyps[0]["finished"] else "length")
    new = sum(len(t) for t in best)
    stats.update({"new_tokens": new, "num_drafts": k, "num_candidates": m,
                  "row_calls_per_draft": row_calls / (k * len(prompts)),
                  "tokens_per_second": new / stats["seconds"] if stats["seconds"] > 0 else float("nan")})
    text = [tokenizer.decode(t) for t in best] if tokenizer is not None else None
    return Generation(prompt_ids=prompts, tokens=best, finish_reason=finish, stats=stats, text=text,
                      extras={"beams": beams, "scores": [b[0]["score"] for b in beams]})
