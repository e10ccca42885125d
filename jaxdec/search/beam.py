"""Beam search (HF-exact) and diverse beam search (groups + Hamming diversity), one `step` each.

Scoring follows transformers 5's vectorised `_beam_search` step for step:

* running beams carry cumulative log-probabilities (log-softmax of the logits, then processors such as
  min_new_tokens' EOS suppression); the first beam of each group starts at 0, the others at -1e9;
* each step keeps the top ``K = max(2, 1 + n_stop_ids) * beams`` candidates over beams x vocabulary;
  candidates ending in a stop id (or reaching max_new_tokens) cannot keep running: the best ``beams``
  of the others become the next running beams;
* a candidate that ends is offered to the finished set only if it ranks among the first ``beams`` of
  the K, with score ``logp_sum / n_new_tokens ** length_penalty``; the finished set keeps the best
  ``beams`` hypotheses seen so far;
* ``early_stopping=True`` stops a prompt once its finished set is full; ``False`` stops when the best
  running beam, normalised at the current length, cannot beat the worst finished one; ``"never"`` does
  the same but with ``length_penalty > 0`` normalises at max length (the best it could ever get).

Diverse beam search (Vijayakumar et al., 2016) splits the beams into G groups of ``beams / G``; within a
step the groups choose in order and group g's log-probabilities are lowered by
``diversity_penalty * (number of times each token was just chosen by groups < g)`` (Hamming
diversity, as HF's `HammingDiversityLogitsProcessor`; the penalty enters the cumulative score). Each
group otherwise runs plain beam search with its own finished set and stopping rule, so with
``diversity_penalty = 0`` every group returns exactly what beam search with ``beams / G`` beams returns.
A prompt stops when all its groups are done.

Conditional beam search ("Making the most of your model"): a pluggable ``constraint`` predicate bans
degenerate continuations inside the search, so every beam is conditioned on the output not being
degenerate; `NoRepeatNGram` (HF's ``no_repeat_ngram_size``) bans repeated n-grams, ``min_new_tokens=1``
bans the empty output.

Host entry: `beam_search(model, params, prompts, num_beams=4, ...)` -> `Generation` whose ``tokens`` is
each prompt's best hypothesis and ``extras["beams"]`` lists every returned hypothesis as
``{"tokens", "score"}`` (best first).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.core.generate import Generation
from jaxdec.core.logits import check_processors, post_commit, run_processors, step_context, with_sampling
from jaxdec.core.steps import decode_call, initial_state, prefill
from jaxdec.masks import BANNED_LOGIT
from jaxdec.search.common import (NEG, expand_cache, flat, global_rows, isin, per_prompt, reorder_cache,
                                  run_grouped)

def hamming_penalty(chosen, vocab_size: int, penalty):
    """chosen [B, m] tokens picked so far this step by earlier groups; penalty scalar or [B] ->
    [B, V] amount to subtract (penalty x how often each token was chosen)."""
    b = chosen.shape[0]
    counts = jnp.zeros((b, vocab_size), jnp.float32)
    counts = counts.at[jnp.arange(b)[:, None], chosen].add(1.0)
    return jnp.reshape(jnp.asarray(penalty, jnp.float32), (-1, 1)) * counts


@dataclasses.dataclass(frozen=True)
class NoRepeatNGram:
    """Constraint: ban any token that would repeat an n-gram of the prompt + generated text (HF's
    ``no_repeat_ngram_size``). With it, beam search is conditioned on non-degenerate (repetition-free)
    output; add ``min_new_tokens=1`` to also exclude the empty output."""

    n: int = 3

    def __call__(self, hist, hlen, vocab_size: int):
        r, h = hist.shape
        n = self.n
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        s = jnp.arange(h)
        if n == 1:
            hit = s[None, :] < hlen[:, None]
            last = hist
        else:
            win = jnp.take(hist, jnp.clip(s[:, None] + jnp.arange(n)[None, :], 0, h - 1), axis=1)  # [R,H,n]
            pidx = jnp.clip(hlen[:, None] - (n - 1) + jnp.arange(n - 1)[None, :], 0, h - 1)
            pattern = jnp.take_along_axis(hist, pidx, axis=1)
            hit = jnp.all(win[:, :, :n - 1] == pattern[:, None, :], axis=-1)
            hit = hit & (s[None, :] + n <= hlen[:, None]) & (hlen[:, None] >= n - 1)
            last = win[:, :, n - 1]
        banned = jnp.zeros((r, vocab_size), bool)
        return banned.at[jnp.arange(r)[:, None], last].max(hit)


def _normalizer(n, length_penalty: float):
    return jnp.power(n.astype(jnp.float32), jnp.float32(length_penalty))


ES_CODES = {False: 0, True: 1, "never": 2}


def early_stopping_code(es) -> int:
    if es is True or es is False or (isinstance(es, str) and es == "never"):
        return ES_CODES[es]
    raise ValueError(f"early_stopping must be True, False or 'never', got {es!r}")


@struct.dataclass
class BeamInputs:
    """Per-row inputs (traced; one value per prompt, repeated over its beams):
    ``length_penalty [B]`` float32, ``early_stopping [B]`` int32 (HF's True / False / "never" as 1 / 0 / 2),
    ``diversity_penalty [B]`` float32."""

    length_penalty: jax.Array
    early_stopping: jax.Array
    diversity_penalty: jax.Array


@struct.dataclass
class BeamState:
    """`BeamSearch`'s method state; B prompts of R = num_beams rows, C = output capacity.

    run_scores: [B, R] float32 running beams' summed log-probabilities (-1e9: empty).
    fin_tokens: [B, R, C] int32, fin_len [B, R], fin_scores [B, R] (length-normalised), fin_flag [B, R]:
                the finished hypotheses kept so far (per group of R / groups columns).
    unsat:      [B, groups] bool groups whose running beams can still improve their finished set.
    start:      [B * R] int32 cache length at the prompt's end (reorders move only what follows).
    lp, es, div: [B] length penalty, early stopping (0 False, 1 True, 2 "never"), diversity penalty.
    hist, hlen: [B * R, P + C] int32 prompt + output and its length, for ``constraint`` only.
    """

    run_scores: jax.Array
    fin_tokens: jax.Array
    fin_len: jax.Array
    fin_scores: jax.Array
    fin_flag: jax.Array
    unsat: jax.Array
    start: jax.Array
    lp: jax.Array
    es: jax.Array
    div: jax.Array
    hist: Optional[jax.Array] = None
    hlen: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """Beam search decoder over ``num_beams`` rows per prompt (see the module docstring).

    Static: the number of beams and of groups, and ``constraint`` (conditional beam search): a hashable
    callable ``constraint(history [R, H], history_len [R], vocab_size) -> banned [R, V]`` over each
    beam's prompt + generated tokens; banned continuations get log-probability -inf (as an HF logits
    processor would), so no returned hypothesis violates it. Traced per prompt (``inputs.method``, a `BeamInputs`, so new values
    do not recompile): ``length_penalty`` [rows] float, ``early_stopping`` [rows] int (0 False, 1 True,
    2 "never"), ``diversity_penalty`` [rows] float (used when num_groups > 1).
    """

    num_beams: int = 4
    num_groups: int = 1
    constraint: Any = None
    processors: tuple = ()  # the user's logits processors, applied to the log-probs (HF's beam order)
    shared_prefix_ok = True  # one prompt per batch may use a Hydragen shared-prefix cache
    required_inputs = ("beam",)
    entry_point = ("jaxdec.search.beam_search(..., num_beams=..., num_return_sequences=...); n does not apply "
                   "to beam search")

    def __post_init__(self):
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not isinstance(self.num_groups, int) or self.num_groups < 1 or self.num_beams % self.num_groups:
            raise ValueError(f"num_beam_groups ({self.num_groups!r}) must divide num_beams ({self.num_beams})")

    @property
    def group_size(self) -> int:
        return self.num_beams // self.num_groups

    # ---------------------------------------------------------------- decoder protocol
    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        nb, g = self.num_beams, self.group_size
        b = prompts.shape[0]
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        cache = expand_cache(cache, nb)  # the prompt was computed once; its KV is copied to the beams
        logits = jnp.repeat(logits, nb, axis=0)
        cap = inputs.out_buffer.shape[1]
        stop = inputs.stop_ids
        pad = stop[0] if stop.size else jnp.int32(0)
        first = (jnp.arange(nb) % g) == 0
        method = BeamState(
            run_scores=jnp.where(first, 0.0, NEG)[None, :].repeat(b, 0).astype(jnp.float32),
            fin_tokens=jnp.full((b, nb, cap), pad, jnp.int32),
            fin_len=jnp.zeros((b, nb), jnp.int32),
            fin_scores=jnp.full((b, nb), NEG, jnp.float32),
            fin_flag=jnp.zeros((b, nb), bool),
            unsat=jnp.ones((b, self.num_groups), bool),
            start=cache.lengths,
            lp=inputs.method.length_penalty[::nb].astype(jnp.float32),
            es=inputs.method.early_stopping[::nb].astype(jnp.int32),
            div=inputs.method.diversity_penalty[::nb].astype(jnp.float32))
        if self.constraint is not None:
            p = prompts.shape[1]
            hist = jnp.zeros((b, p + cap), jnp.int32).at[:, :p].set(prompts)
            method = method.replace(hist=jnp.repeat(hist, nb, axis=0),
                                    hlen=jnp.repeat(prompt_lens.astype(jnp.int32), nb, axis=0))
        state = initial_state(jnp.zeros((b * nb, 1), jnp.int32), cache, inputs, method,
                              {"model_calls": jnp.ones((), jnp.int32)})
        return self._advance(state, logits)

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._advance(state, logits)

    # ---------------------------------------------------------------- one beam step
    def _group_update(self, lp, run_scores, tokens, fin, unsat, t, n, max_new, stop, lpen, es):
        """One group's step. lp [B,g,V] processed log-probs; run_scores [B,g]; tokens [B,g,cap];
        fin: dict of this group's finished set; unsat [B]. Returns new running (src [B,g] local, tok,
        scores), new finished set, unsat, group_done [B]."""
        bsz, g, v = lp.shape
        k = max(2, 1 + int(stop.size)) * g
        acc = (lp + run_scores[:, :, None]).reshape(bsz, g * v)
        vals, idx = jax.lax.top_k(acc, k)
        src = idx // v
        tok = (idx % v).astype(jnp.int32)
        hits = isin(tok, stop) | (n >= max_new)[:, None]
        # running beams for the next step: the best g candidates that did not end
        rvals = vals + hits.astype(jnp.float32) * NEG
        r_scores, r_i = jax.lax.top_k(rvals, g)
        r_src = jnp.take_along_axis(src, r_i, axis=1)
        r_tok = jnp.take_along_axis(tok, r_i, axis=1)
        # finished set: ended candidates among the first g of the K, normalised by length
        es_true = es == 1
        cand = vals / _normalizer(n, lpen)[:, None]
        full = jnp.all(fin["flag"], axis=1, keepdims=True) & es_true[:, None]
        cand = cand + full.astype(jnp.float32) * NEG
        cand = cand + (~unsat)[:, None].astype(jnp.float32) * NEG
        just = hits & (jnp.arange(k) < g)[None, :]
        cand = cand + (~just).astype(jnp.float32) * NEG
        cand_tok = jnp.take_along_axis(tokens, src[:, :, None], axis=1)  # [B,K,cap]
        cap = tokens.shape[-1]
        at_t = jnp.arange(cap)[None, None, :] == t[:, None, None]
        cand_tok = jnp.where(at_t, tok[:, :, None], cand_tok)
        m_scores = jnp.concatenate([fin["scores"], cand], axis=1)
        m_tok = jnp.concatenate([fin["tokens"], cand_tok], axis=1)
        m_len = jnp.concatenate([fin["len"], jnp.broadcast_to(n[:, None], (bsz, k))], axis=1)
        m_flag = jnp.concatenate([fin["flag"], just], axis=1)
        f_scores, f_i = jax.lax.top_k(m_scores, g)
        new_fin = {"scores": f_scores,
                   "tokens": jnp.take_along_axis(m_tok, f_i[:, :, None], axis=1),
                   "len": jnp.take_along_axis(m_len, f_i, axis=1),
                   "flag": jnp.take_along_axis(m_flag, f_i, axis=1)}
        # can the running beams still improve the finished set? (HF's early-stop heuristic)
        best_len = jnp.where((es == 2) & (lpen > 0.0), max_new, n)
        best = r_scores[:, 0] / _normalizer(best_len, lpen)
        worst = jnp.where(new_fin["flag"], jnp.min(f_scores, axis=1, keepdims=True), NEG)
        unsat = unsat & jnp.any(best[:, None] > worst, axis=1)
        open_beam = ~(jnp.all(new_fin["flag"], axis=1) & es_true)
        done = ~(unsat & open_beam & ~jnp.all(hits, axis=1))
        return (r_src, r_tok, r_scores), new_fin, unsat, done

    def _advance(self, state, logits):
        nb, g, ng = self.num_beams, self.group_size, self.num_groups
        m = state.method
        bsz = state.batch // nb
        v = logits.shape[-1]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        ctx = step_context(state)
        lp = run_processors(with_sampling(self.processors, False), lp, ctx)  # HF: processors see log-probs
        if self.constraint is not None:
            lp = jnp.where(self.constraint(m.hist, m.hlen, v), BANNED_LOGIT, lp)
        lp = per_prompt(lp, nb)
        tokens = per_prompt(state.tokens, nb)
        t = per_prompt(state.num_new, nb)[:, 0]
        n = t + 1
        max_new = per_prompt(state.max_new, nb)[:, 0]
        live = ~per_prompt(state.done, nb)[:, 0]
        stop = state.stop_ids

        srcs, toks, scores, fins, unsats, dones = [], [], [], [], [], []
        for gi in range(ng):
            sl = slice(gi * g, (gi + 1) * g)
            lpg = lp[:, sl]
            if gi > 0:
                lpg = lpg - hamming_penalty(jnp.concatenate(toks, axis=1), v, m.div)[:, None, :]
            fin = {"scores": m.fin_scores[:, sl], "tokens": m.fin_tokens[:, sl], "len": m.fin_len[:, sl],
                   "flag": m.fin_flag[:, sl]}
            (r_src, r_tok, r_sc), fin, u, d = self._group_update(
                lpg, m.run_scores[:, sl], tokens[:, sl], fin, m.unsat[:, gi], t, n, max_new, stop,
                m.lp, m.es)
            srcs.append(r_src + gi * g)
            toks.append(r_tok)
            scores.append(r_sc)
            fins.append(fin)
            unsats.append(u)
            dones.append(d)

        src = jnp.concatenate(srcs, axis=1)
        src = jnp.where(live[:, None], src, jnp.arange(nb)[None, :])  # finished prompts stay as they are
        new_tok = jnp.concatenate(toks, axis=1)
        lw = live[:, None]

        def keep(new, old):
            mask = live.reshape((bsz,) + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        method = m.replace(
            run_scores=keep(jnp.concatenate(scores, axis=1), m.run_scores),
            fin_scores=keep(jnp.concatenate([f["scores"] for f in fins], axis=1), m.fin_scores),
            fin_tokens=keep(jnp.concatenate([f["tokens"] for f in fins], axis=1), m.fin_tokens),
            fin_len=keep(jnp.concatenate([f["len"] for f in fins], axis=1), m.fin_len),
            fin_flag=keep(jnp.concatenate([f["flag"] for f in fins], axis=1), m.fin_flag),
            unsat=keep(jnp.stack(unsats, axis=1), m.unsat))
        prompt_done = ~live | jnp.all(jnp.stack(dones, axis=1), axis=1)

        rows = global_rows(src)
        tok_rows = jnp.take(state.tokens, rows, axis=0)
        cap = state.capacity
        at_t = jnp.arange(cap)[None, :] == flat(jnp.broadcast_to(t[:, None], (bsz, nb)))[:, None]
        live_rows = flat(jnp.broadcast_to(lw, (bsz, nb)))
        tok_rows = jnp.where(at_t & live_rows[:, None], flat(new_tok)[:, None], tok_rows)
        cache = reorder_cache(state.cache, rows, m.start, cap)
        if self.constraint is not None:
            hist = jnp.take(m.hist, rows, axis=0)
            hlen = jnp.take(m.hlen, rows, axis=0)
            r = jnp.arange(hist.shape[0])
            at = jnp.minimum(hlen, hist.shape[1] - 1)
            method = method.replace(hist=hist.at[r, at].set(jnp.where(live_rows, flat(new_tok), hist[r, at])),
                                    hlen=hlen + live_rows.astype(jnp.int32))
        done_rows = flat(jnp.broadcast_to(prompt_done[:, None], (bsz, nb)))
        post_commit(self.processors, ctx, flat(new_tok)[:, None], live_rows.astype(jnp.int32), rows)
        return state.replace(
            tokens=tok_rows, num_new=state.num_new + live_rows.astype(jnp.int32),
            last=jnp.where(live_rows, flat(new_tok), state.last), cache=cache, done=done_rows,
            finish=jnp.where(done_rows, 1, 0).astype(jnp.int32), method=method)

    def summarize(self, state):
        return {}


def _collect(prompts, results, nb: int, num_return: int, stop_ids, group_size: int):
    beams_out, best, finish = [], [], []
    stop = set(int(s) for s in stop_ids)
    for state, real in results:
        m = jax.tree.map(np.asarray, state.method)
        for b in range(real):
            order = np.argsort(-m.fin_scores[b], kind="stable")[:num_return]
            hyps = []
            for j in order:
                ln = int(m.fin_len[b, j])
                hyps.append({"tokens": m.fin_tokens[b, j, :ln].tolist(), "score": float(m.fin_scores[b, j]),
                             "finished": bool(m.fin_flag[b, j]), "group": int(j) // group_size})
            beams_out.append(hyps)
            best.append(hyps[0]["tokens"])
            finish.append("eos" if hyps[0]["tokens"] and hyps[0]["tokens"][-1] in stop else "length")
    return beams_out, best, finish


def beam_search(model, params, prompts, *, num_beams: int = 4, max_new_tokens: int = 64, min_new_tokens: int = 0,
                length_penalty: float = 1.0, early_stopping: Any = False,
                num_return_sequences: Optional[int] = None, num_beam_groups: int = 1,
                diversity_penalty: float = 0.0, no_repeat_ngram_size: int = 0, constraint: Any = None,
                stop_ids=None, batch_size: Optional[int] = None,
                cache_size: Optional[int] = None, tokenizer=None, debug: bool = False, callback=None,
                shared_prefix: Optional[bool] = None, processors=None, mesh=None) -> Generation:
    """Beam search (or diverse beam search with ``num_beam_groups > 1``) over token-id prompts.

    Matches HF ``generate(num_beams=..., do_sample=False, length_penalty=..., early_stopping=...)``.
    Conditional beam search: ``no_repeat_ngram_size=n`` (HF's option) or any ``constraint`` predicate
    (see `BeamSearch`) removes degenerate continuations from the search. A grammar constraint
    (`jaxdec.constrained`: json_schema, regex, lark, choices; one, or a list with one per prompt) masks
    every beam with its own matcher, forked when beams are reordered (needs ``tokenizer=``);
    ``constraint_ok`` per prompt, and per hypothesis in ``extras["beams"]``.
    batch_size counts prompts per compiled batch (each holds batch_size * num_beams rows). Returns a
    `Generation`: ``tokens[i]`` is prompt i's best hypothesis (up to and including EOS), ``extras["beams"]
    [i]`` its ``num_return_sequences`` (default num_beams) hypotheses ``{"tokens", "score",
    "finished", "group"}`` best first (across groups for diverse beam search); ``extras["scores"][i]`` the best score (HF's ``sequences_scores``).
    shared_prefix: None (auto), True or False. Auto uses Hydragen shared-prefix attention whenever
    num_beams > 1: each prompt is prefilled once into one prefix copy, the beams' caches hold only
    their generated tokens (beam reordering gathers those only) and every layer attends with
    `hydragen_attend` (each prompt's beams batched against its prefix). ``stats["shared_prefix"]``.
    mesh: a `jaxdec.sharding.make_mesh` mesh: SPMD over its devices (batch_size * num_beams rows must
    divide by its data axis; the shared-prefix cache is not used on a mesh).
    """
    grammar = None
    if _is_grammar(constraint):  # a jaxdec.constrained constraint (or one per prompt): the grammar mask
        grammar, constraint = constraint, None
    if no_repeat_ngram_size and constraint is not None:
        raise ValueError("give either no_repeat_ngram_size or constraint, not both")
    if no_repeat_ngram_size:
        constraint = NoRepeatNGram(int(no_repeat_ngram_size))
    dec = BeamSearch(num_beams=int(num_beams), num_groups=int(num_beam_groups), constraint=constraint,
                     processors=check_processors(processors, "beam_search"))
    es = early_stopping_code(early_stopping)
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty!r}")
    if not (np.isfinite(diversity_penalty) and diversity_penalty >= 0):
        raise ValueError(f"diversity_penalty must be finite and >= 0, got {diversity_penalty!r}")

    def extra(inputs, chunk):
        rows = inputs.batch
        return inputs.replace(method=BeamInputs(length_penalty=jnp.full((rows,), length_penalty, jnp.float32),
                                                early_stopping=jnp.full((rows,), es, jnp.int32),
                                                diversity_penalty=jnp.full((rows,), diversity_penalty, jnp.float32)))

    nr = num_beams if num_return_sequences is None else int(num_return_sequences)
    if not 1 <= nr <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams], got {num_return_sequences!r}")
    stop = tuple(model.eos_ids) if stop_ids is None else tuple(int(s) for s in stop_ids)
    cons = None
    if grammar is not None:
        from jaxdec.constrained.api import prepare
        from jaxdec.core.driver import _check_prompts
        n_prompts = len(_check_prompts(prompts, model.vocab_size))
        cons = prepare(dec, grammar, n_prompts=n_prompts, samples=1, expand=int(num_beams), tokenizer=tokenizer,
                       model=model, inputs_fn=extra, who="beam_search")
    if cons is not None:
        dec, extra = cons.decoder, cons.inputs_fn
    with (cons.running() if cons is not None else contextlib.nullcontext()):
        prompts, results, stats = run_grouped(dec, model, params, prompts, num_beams, max_new_tokens=max_new_tokens,
                                              min_new_tokens=min_new_tokens, stop_ids=stop, batch_size=batch_size,
                                              cache_size=cache_size, debug=debug, callback=callback,
                                              extra_inputs=extra, shared_prefix=shared_prefix, mesh=mesh)
    beams, best, finish = _collect(prompts, results, num_beams, nr, stop, dec.group_size)
    new = sum(len(t) for t in best)
    stats.update({"new_tokens": new, "tokens_per_second": new / stats["seconds"] if stats["seconds"] > 0 else
                  float("nan"), "num_beams": num_beams})
    text = [tokenizer.decode(t) for t in best] if tokenizer is not None else None
    ok = None
    if cons is not None:
        ok = cons.ok(best, range(len(best)))
        for i, hyps in enumerate(beams):
            for h, hok in zip(hyps, cons.ok([h["tokens"] for h in hyps], [i] * len(hyps))):
                h["constraint_ok"] = hok
    return Generation(prompt_ids=prompts, tokens=best, finish_reason=finish, stats=stats, text=text,
                      extras={"beams": beams, "scores": [b[0]["score"] for b in beams]}, constraint_ok=ok)


def _is_grammar(constraint) -> bool:
    """A `jaxdec.constrained` constraint, its dict form, or a list of them (None entries allowed)."""
    if constraint is None:
        return False
    from jaxdec.constrained.constraint import Constraint
    if isinstance(constraint, (Constraint, dict)):
        return True
    return isinstance(constraint, (list, tuple)) and all(c is None or isinstance(c, (Constraint, dict))
                                                         for c in constraint)
