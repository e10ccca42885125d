"""CLI methods of the search package, registered with `jaxdec.cli` (imported by its plugin loader).

`jaxdec generate --method beam|diverse-beam|conditional-beam|stochastic-beam|momentum|adadec|best-of-n|
first-finish|astar|entropy-adaptive|superposed|pgtd|asap ...` writes the spine's JSONL rows; ``tokens`` is the best (or chosen) sequence and,
for the multi-sequence methods, ``beams`` lists every returned sequence as ``{"tokens", "score"}``
(score: the length-normalised beam score for beam methods, the log-probability for stochastic beam
and A*, the reranker's score for best-of-N, the draft's running (n-gram-interpolated) log-score for
superposed).
"""
from __future__ import annotations

import math

from jaxdec.cli import (SAMPLING, BadInput, check_float, check_int, chunk_constraints, read_jsonl_strings,
                        register_method, register_papers)

_EARLY = {"true": True, "false": False, "never": "never"}


def add_search_args(g):
    s = g.add_argument_group("search methods (beam, diverse-beam, conditional-beam, stochastic-beam, momentum, "
                             "adadec, entropy-adaptive, best-of-n, first-finish, astar)")
    s.add_argument("--num-beams", type=int, default=4, help="beams (beam methods) or k (stochastic-beam)")
    s.add_argument("--num-return-sequences", type=int, default=None)
    s.add_argument("--length-penalty", type=float, default=1.0)
    s.add_argument("--early-stopping", default="false", choices=sorted(_EARLY))
    s.add_argument("--num-beam-groups", type=int, default=2, help="diverse-beam: groups")
    s.add_argument("--diversity-penalty", type=float, default=0.5, help="diverse-beam: Hamming diversity lambda")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="beam: ban repeated n-grams (conditional-beam defaults to 3)")
    s.add_argument("--momentum-alpha", type=float, default=0.2, help="momentum: resistance per loop depth")
    s.add_argument("--momentum-ngram", type=int, default=4)
    s.add_argument("--momentum-top-k", type=int, default=8)
    s.add_argument("--adadec-threshold", type=float, default=1.5, help="adadec: entropy threshold (nats)")
    s.add_argument("--adadec-k", type=int, default=3)
    s.add_argument("--adadec-lookahead", type=int, default=5)
    s.add_argument("--ead-small-layers", type=int, default=20, help="entropy-adaptive: layers of the small model")
    s.add_argument("--ead-threshold", type=float, default=2.0, help="entropy-adaptive: rolling-entropy threshold")
    s.add_argument("--astar-max-children", type=int, default=8)
    s.add_argument("--astar-max-expansions", type=int, default=2000)


def validate_search_args(args):
    """Value checks of the search flags (run before the model loads, whatever the method)."""
    for dest in ("num_beams", "num_beam_groups", "momentum_ngram", "momentum_top_k", "adadec_k",
                 "astar_max_children", "astar_max_expansions"):
        check_int(args, dest, 1)
    check_int(args, "num_return_sequences", 1, args.num_beams, allow_none=True)
    check_int(args, "no_repeat_ngram_size", 0)
    check_int(args, "adadec_lookahead", 0)
    check_int(args, "ead_small_layers", 0)
    check_float(args, "length_penalty", lambda v: True, "a finite number")
    check_float(args, "diversity_penalty", lambda v: v >= 0, "a finite number >= 0")
    check_float(args, "momentum_alpha", lambda v: v >= 0, "a finite number >= 0")
    check_float(args, "adadec_threshold", lambda v: True, "a finite number (nats)")
    check_float(args, "ead_threshold", lambda v: True, "a finite number (nats)")


def _check_diverse(args):
    if args.num_beams % args.num_beam_groups:
        raise BadInput(f"--num-beam-groups ({args.num_beam_groups}) must divide --num-beams ({args.num_beams})")


def _check_temperature_positive(args):
    if args.temperature <= 0:
        raise BadInput(f"--temperature must be > 0 with --method {args.method}, got {args.temperature:g}")


_LEN = ("min_new_tokens", "batch_size")
_BEAM = _LEN + ("num_beams", "num_return_sequences", "length_penalty", "early_stopping", "no_repeat_ngram_size")


def _rows(g, loaded, beams=None):
    per = {k: g.stats.get(k) for k in ("model_calls", "new_tokens", "seconds", "tokens_per_second")}
    text = g.text if g.text is not None else [loaded.tokenizer.decode(t) for t in g.tokens]
    out = []
    for i, (p, t, x, f) in enumerate(zip(g.prompt_ids, g.tokens, text, g.finish_reason)):
        row = {"prompt_ids": p, "tokens": t, "text": x, "finish_reason": f, "stats": per}
        if beams is not None:
            row["beams"] = [{"tokens": b["tokens"], "score": b["score"],
                             **({"constraint_ok": b["constraint_ok"]} if "constraint_ok" in b else {})}
                            for b in beams[i]]
        out.append(row)
    return out, g.stats


def _constrained_rows(g, loaded, beams=None):
    """`_rows` with ``"constraint_ok"`` per row when the run was constrained."""
    from jaxdec.cli import with_constraint_ok
    rows, stats = _rows(g, loaded, beams)
    return with_constraint_ok(rows, g), stats


def _check_positive(args, *names):
    for n in names:
        v = getattr(args, n)
        if v is None or v < 1:
            raise BadInput(f"--{n.replace('_', '-')} must be >= 1, got {v}")


def _beam(args, loaded, ids, progress, groups=1, diversity=0.0, ngram=None):
    from jaxdec.search.beam import beam_search
    _check_positive(args, "num_beams")
    g = beam_search(loaded.model, loaded.params, ids, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.min_new_tokens, length_penalty=args.length_penalty,
                    early_stopping=_EARLY[args.early_stopping], num_return_sequences=args.num_return_sequences,
                    num_beam_groups=groups, diversity_penalty=diversity,
                    no_repeat_ngram_size=args.no_repeat_ngram_size if ngram is None else ngram,
                    batch_size=args.batch_size, tokenizer=loaded.tokenizer, mesh=getattr(args, "_mesh", None),
                    **_constraint_kwargs(args, ids))
    return _constrained_rows(g, loaded, g.extras["beams"])


def _constraint_kwargs(args, ids) -> dict:
    """``constraint=`` for the methods that honour one (beam, diverse-beam, conditional-beam, stochastic-beam,
    momentum, best-of-n, first-finish) when the CLI was given one; the other methods refuse it in
    `jaxdec.constrained.cli` before the model loads, saying why."""
    cons = chunk_constraints(args, len(ids))
    return {} if cons is None else {"constraint": cons}


# --mesh DATAxMODEL: rows (prompts x --num-beams) split over the data axis; `beam_search` runs one SPMD program
# (its beam reorder is a gather XLA partitions, so a prompt's beams may span data shards)
def _check_beam(args):
    import os
    if args.coordinator is not None or os.environ.get("JAXDEC_COORDINATOR"):
        raise BadInput("--method beam runs on one process's devices: --coordinator (a multi-process run) is not "
                       "supported yet (its hypotheses are read without a cross-process gather); use --mesh alone")


@register_method("beam", add_search_args, uses=_BEAM + ("mesh",), chunked=True, validate=validate_search_args,
                 rows_per_prompt="num_beams", check=_check_beam)
def beam_method(args, loaded, ids, progress):
    return _beam(args, loaded, ids, progress)


@register_method("diverse-beam", uses=_BEAM + ("num_beam_groups", "diversity_penalty"), check=_check_diverse,
                 chunked=True)
def diverse_beam_method(args, loaded, ids, progress):
    return _beam(args, loaded, ids, progress, groups=args.num_beam_groups, diversity=args.diversity_penalty)


@register_method("conditional-beam", uses=_BEAM, chunked=True)
def conditional_beam_method(args, loaded, ids, progress):
    return _beam(args, loaded, ids, progress, ngram=args.no_repeat_ngram_size or 3)


@register_method("stochastic-beam", uses=_LEN + ("num_beams", "temperature", "seed"),
                 check=_check_temperature_positive)
def stochastic_beam_method(args, loaded, ids, progress):
    from jaxdec.search.stochastic import stochastic_beam_search
    _check_positive(args, "num_beams")
    g = stochastic_beam_search(loaded.model, loaded.params, ids, k=args.num_beams, max_new_tokens=args.max_new_tokens,
                               min_new_tokens=args.min_new_tokens, temperature=args.temperature, seed=args.seed,
                               batch_size=args.batch_size, tokenizer=loaded.tokenizer, **_constraint_kwargs(args, ids))
    return _constrained_rows(g, loaded, g.extras["beams"])


@register_method("momentum", uses=_LEN + ("momentum_alpha", "momentum_ngram", "momentum_top_k"), chunked=True)
def momentum_method(args, loaded, ids, progress):
    from jaxdec.search.momentum import momentum_generate
    _check_positive(args, "momentum_ngram", "momentum_top_k")
    g = momentum_generate(loaded.model, loaded.params, ids, alpha=args.momentum_alpha, ngram=args.momentum_ngram,
                          top_k=args.momentum_top_k, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.min_new_tokens, batch_size=args.batch_size, tokenizer=loaded.tokenizer,
                          **_constraint_kwargs(args, ids))
    return _constrained_rows(g, loaded)


@register_method("adadec", uses=_LEN + ("adadec_threshold", "adadec_k", "adadec_lookahead"), chunked=True)
def adadec_method(args, loaded, ids, progress):
    from jaxdec.search.adadec import adadec_generate
    _check_positive(args, "adadec_k")
    g = adadec_generate(loaded.model, loaded.params, ids, threshold=args.adadec_threshold, k=args.adadec_k,
                        lookahead=args.adadec_lookahead, max_new_tokens=args.max_new_tokens,
                        min_new_tokens=args.min_new_tokens, batch_size=args.batch_size, tokenizer=loaded.tokenizer)
    return _rows(g, loaded)


@register_method("entropy-adaptive", uses=_LEN + ("ead_small_layers", "ead_threshold"), chunked=True)
def entropy_adaptive_method(args, loaded, ids, progress):
    from jaxdec.search.entropy_adaptive import entropy_adaptive_generate
    if not 0 <= args.ead_small_layers <= loaded.model.num_layers:
        raise BadInput(f"--ead-small-layers must be in [0, {loaded.model.num_layers}], got {args.ead_small_layers}")
    g = entropy_adaptive_generate(loaded.model, loaded.params, ids, small_layers=args.ead_small_layers,
                                  threshold=args.ead_threshold, max_new_tokens=args.max_new_tokens,
                                  min_new_tokens=args.min_new_tokens, batch_size=args.batch_size,
                                  tokenizer=loaded.tokenizer)
    return _rows(g, loaded)


def _sampling(args):
    from jaxdec.cli import _sampling_from_args
    return _sampling_from_args(args)


@register_method("best-of-n", uses=("n", "seed", "batch_size") + SAMPLING)
def best_of_n_method(args, loaded, ids, progress):
    from jaxdec.search.testtime import best_of_n
    g = best_of_n(loaded.model, loaded.params, ids, n=args.n, sampling=_sampling(args), seed=args.seed,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, tokenizer=loaded.tokenizer,
                  **_constraint_kwargs(args, ids))
    ranked = g.extras["ranked"]
    if "samples_ok" in g.extras:  # each ranked sample with its own acceptance (equal tokens, equal acceptance)
        ranked = [[{**r, "constraint_ok": ok[s.index(r["tokens"])]} for r in rk]
                  for rk, s, ok in zip(ranked, g.extras["samples"], g.extras["samples_ok"])]
    return _constrained_rows(g, loaded, ranked)


@register_method("first-finish", uses=("n", "seed", "batch_size") + SAMPLING)
def first_finish_method(args, loaded, ids, progress):
    from jaxdec.search.testtime import first_finish
    cons = _constraint_kwargs(args, ids)
    g = first_finish(loaded.model, loaded.params, ids, n=args.n, sampling=_sampling(args), seed=args.seed,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, tokenizer=loaded.tokenizer,
                     **cons)
    return _constrained_rows(g, loaded) if cons else _rows(g, loaded)


@register_method("astar", uses=("astar_max_children", "astar_max_expansions"))
def astar_method(args, loaded, ids, progress):
    from jaxdec.search.testtime import astar_decode
    _check_positive(args, "astar_max_children", "astar_max_expansions")
    try:
        g = astar_decode(loaded.model, loaded.params, ids, max_new_tokens=args.max_new_tokens,
                         max_children=args.astar_max_children, max_expansions=args.astar_max_expansions)
    except RuntimeError as e:
        raise BadInput(str(e)) from None
    beams = [[{"tokens": t, "score": s}] for t, s in zip(g.tokens, g.extras["scores"])]
    g.stats.setdefault("new_tokens", sum(len(t) for t in g.tokens))
    return _rows(g, loaded, beams)


# ------------------------------------------------------------------ superposed decoding
def add_superposed_args(g):
    s = g.add_argument_group("superposed decoding (--method superposed; --temperature applies too)")
    s.add_argument("--num-drafts", type=int, default=3, help="superposed: k drafts per prompt")
    s.add_argument("--sp-candidates", type=int, default=None,
                   help="superposed: top tokens joined to each draft (default k: a k^2 expansion)")
    s.add_argument("--ngram-alpha", type=float, default=0.0,
                   help="superposed: n-gram interpolation weight in [0, 1] (0: off)")
    s.add_argument("--ngram-corpus", default=None,
                   help="superposed: n-gram corpus, a .txt file or a .jsonl of {\"text\"|\"prompt\": ...} "
                        "(default: the texts shipped in jaxdec/data)")
    s.add_argument("--ngram-orders", default="2,3,4", help="superposed: n-gram orders, comma-separated")
    s.add_argument("--ngram-weights", default=None,
                   help="superposed: one weight per order, comma-separated, summing to 1 (default uniform)")
    s.add_argument("--ngram-penalty", type=float, default=200.0,
                   help="superposed: score given instead of alpha*log p_ng where the n-gram has no support")


def _floats(flag, text, conv=float):
    try:
        out = tuple(conv(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = None
    if out is not None and all(math.isfinite(x) for x in out):
        return out
    else:
        raise BadInput(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def validate_superposed_args(args):
    """Value checks of the superposed flags (run before the model loads, whatever the method)."""
    import os
    check_int(args, "num_drafts", 1)
    check_int(args, "sp_candidates", args.num_drafts, allow_none=True)
    check_float(args, "ngram_alpha", lambda v: 0 <= v <= 1, "in [0, 1] (0: off)")
    check_float(args, "ngram_penalty", lambda v: v >= 0, "a finite number >= 0")
    if args.ngram_corpus is not None and not os.path.isfile(args.ngram_corpus):
        raise BadInput(f"--ngram-corpus: no such file {args.ngram_corpus!r}")
    orders = _floats("--ngram-orders", args.ngram_orders, int)
    if not orders or min(orders) < 1 or len(set(orders)) != len(orders):
        raise BadInput(f"--ngram-orders: expected distinct integers >= 1, comma-separated, got {args.ngram_orders!r}")
    if args.ngram_weights is not None:
        w = _floats("--ngram-weights", args.ngram_weights)
        if len(w) != len(orders) or min(w) < 0 or not math.isclose(sum(w), 1.0, abs_tol=1e-6):
            raise BadInput(f"--ngram-weights: expected {len(orders)} numbers >= 0 (one per --ngram-orders order, "
                           f"superposed_generate's ngram_weights) summing to 1, got {args.ngram_weights!r}")


def _check_superposed(args):
    if args.temperature <= 0:
        raise BadInput(f"--temperature must be > 0 with --method superposed, got {args.temperature:g}")


def _corpus_texts(path):
    import os
    if path.endswith(".jsonl"):
        return read_jsonl_strings(path, "--ngram-corpus", ("text", "prompt"),
                                  "an object with a \"text\" or \"prompt\" string")
    if not os.path.isfile(path):
        raise BadInput(f"--ngram-corpus: no such file {path!r}")
    with open(path, encoding="utf-8") as fh:
        return [fh.read()]


@register_method("superposed", add_superposed_args, validate=validate_superposed_args, check=_check_superposed,
                 chunked=True, uses=_LEN + ("num_drafts", "sp_candidates", "ngram_alpha", "ngram_corpus", "ngram_orders",
                                            "ngram_weights", "ngram_penalty", "temperature"))
def superposed_method(args, loaded, ids, progress):
    from jaxdec.search.superposed import NGramModel, default_corpus_texts, superposed_generate
    _check_positive(args, "num_drafts")
    ngram = None
    weights = None if args.ngram_weights is None else _floats("--ngram-weights", args.ngram_weights)
    if args.ngram_alpha > 0 or args.ngram_corpus is not None:
        orders = _floats("--ngram-orders", args.ngram_orders, int)
        texts = default_corpus_texts() if args.ngram_corpus is None else _corpus_texts(args.ngram_corpus)
        ngram = NGramModel.from_texts(texts, loaded.tokenizer, orders)
    g = superposed_generate(loaded.model, loaded.params, ids, num_drafts=args.num_drafts,
                            num_candidates=args.sp_candidates, temperature=args.temperature, ngram=ngram,
                            ngram_alpha=args.ngram_alpha, ngram_weights=weights, ngram_penalty=args.ngram_penalty,
                            max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                            batch_size=args.batch_size, tokenizer=loaded.tokenizer)
    return _rows(g, loaded, g.extras["beams"])


# ------------------------------------------------------------------ PG-TD
def add_pgtd_args(g):
    s = g.add_argument_group("PG-TD (--method pgtd): tree search over tokens scored on each prompt's doctest "
                             "examples (raw code-completion prompts: the program is prompt + completion)")
    s.add_argument("--pgtd-rollouts", type=int, default=16, help="pgtd: rollouts (greedy completions) per prompt")
    s.add_argument("--pgtd-top-k", type=int, default=3, help="pgtd: children per expanded node")
    s.add_argument("--pgtd-timeout", type=float, default=5.0, help="pgtd: seconds per program run")


def validate_pgtd_args(args):
    """Value checks of the PG-TD flags (run before the model loads, whatever the method)."""
    check_int(args, "pgtd_rollouts", 1)
    check_int(args, "pgtd_top_k", 1)
    check_float(args, "pgtd_timeout", lambda v: v > 0, "a number of seconds > 0")


@register_method("pgtd", add_pgtd_args, validate=validate_pgtd_args,
                 uses=("pgtd_rollouts", "pgtd_top_k", "pgtd_timeout"))
def pgtd_method(args, loaded, ids, progress):
    from jaxdec.search.pgtd import HUMANEVAL_STOP, doctest_reward, pgtd_search
    tok = loaded.tokenizer
    rewards = []
    for i, p in enumerate(ids):
        try:
            rewards.append(doctest_reward(tok.decode(p), tok.decode, args.pgtd_timeout))
        except ValueError as e:
            raise BadInput(f"--method pgtd, prompt {i}: {e}") from None
    g = pgtd_search(loaded.model, loaded.params, ids, rewards, rollouts=args.pgtd_rollouts, top_k=args.pgtd_top_k,
                    max_new_tokens=args.max_new_tokens,
                    generate_kw={"stop_strings": HUMANEVAL_STOP, "tokenizer": tok})  # rollouts end with the body
    g.stats["public_test_rewards"] = g.extras["rewards"]
    return _rows(g, loaded)


# ------------------------------------------------------------------ grammar-aligned sampling (ASAp)
# `jaxdec generate --method asap --regex RE --asap-samples N [--asap-warmup W]`: `grammar_aligned_generate`
# (jaxdec.constrained.asap) from the CLI. It is registered here, with the search methods, because a CLI module
# imports jaxdec.cli, and jaxdec.cli imports jaxdec.constrained (its constraint flags): a jaxdec.constrained
# module importing jaxdec.cli would make the two families import each other. The constraint comes from the
# usual flags or per-row prompts-file fields; `jaxdec.constrained.cli` refuses --method asap without one on
# every row. Each prompt gets --asap-samples rows (prompt-major), drawn in sequence from one trie whose
# expected-future-grammaticality estimates improve with each sample; --asap-warmup samples are drawn first and
# not returned. A row holds at most --max-new-tokens tokens, its EOS included (the grammar's strings have at
# most --max-new-tokens - 1 tokens), so the JSONL contract holds; rows add "constraint_ok" (true) and
# "asap": {"log_q", "log_p"} (proposal and model log-probability of the row, EOS included: exp(log_p - log_q)
# is its importance weight). --seed seeds the host sampler.


def add_asap_args(g) -> None:
    s = g.add_argument_group("grammar-aligned sampling (--method asap; needs a constraint flag)")
    s.add_argument("--asap-samples", type=int, default=4,
                   help="asap: output rows per prompt (samples of the grammar, drawn in sequence from one trie)")
    s.add_argument("--asap-warmup", type=int, default=0,
                   help="asap: samples drawn first to refine the trie's estimates, not returned")


def validate_asap_args(args) -> None:
    """Value checks of the ASAp flags (run before the model loads, whatever the method)."""
    check_int(args, "asap_samples", 1)
    check_int(args, "asap_warmup", 0)


def _check_asap(args) -> None:
    if args.max_new_tokens < 2:
        raise BadInput(f"--max-new-tokens must be >= 2 with --method asap (a row holds the grammar's string and "
                       f"its EOS), got {args.max_new_tokens}")


@register_method("asap", add_asap_args, validate=validate_asap_args, check=_check_asap,
                 uses=("asap_samples", "asap_warmup", "seed"))
def asap_method(args, loaded, ids, progress):
    from jaxdec.constrained.asap import grammar_aligned_generate
    cons = chunk_constraints(args, len(ids))
    if cons is None or any(c is None for c in cons):  # pragma: no cover - read_constraints refused it already
        raise BadInput("--method asap needs a constraint on every row")
    try:
        g = grammar_aligned_generate(loaded.model, loaded.params, ids, cons, n=args.asap_samples,
                                     max_new_tokens=args.max_new_tokens - 1, tokenizer=loaded.tokenizer,
                                     seed=args.seed & (2 ** 64 - 1), warmup=args.asap_warmup)
    except (ValueError, RuntimeError) as e:  # compile errors name their flag already; ASAp's own name its arguments
        raise BadInput(_asap_error(args, str(e))) from None
    per = {k: g.stats.get(k) for k in ("model_calls", "new_tokens", "seconds", "tokens_per_second", "model_tokens")}
    rows = []
    for p, t, x, f, ok, lq, lp in zip(g.prompt_ids, g.tokens, g.text, g.finish_reason, g.constraint_ok,
                                      g.extras["log_q"], g.extras["log_p"]):
        rows.append({"prompt_ids": p, "tokens": t, "text": x, "finish_reason": f, "stats": per,
                     "constraint_ok": ok, "asap": {"log_q": float(lq), "log_p": float(lp)}})
    return rows, dict(g.stats)


def _asap_error(args, msg: str) -> str:
    """ASAp's errors name its own arguments (``constraint_or_matcher``, ``n_samples``, ``max_len``); on the
    CLI they name the flag (or prompts-file line) the constraint came from, and ``--max-new-tokens``."""
    from jaxdec.cli import _flag_names
    head, _, rest = msg.partition(": ")
    if head in ("constraint_or_matcher", "n_samples"):
        cons = getattr(args, "_constraints", None) or [None]
        who = sorted({c.who for c in cons if c is not None}) or ["the constraint"]
        rest = rest.replace(" of at most ", " of at most --max-new-tokens - 1 = ").replace(
            "raise max_len", "raise --max-new-tokens")
        if head == "constraint_or_matcher" and "tokens the model can produce" in rest:
            rest += "; raise --max-new-tokens"
        return f"{', '.join(who)}: {rest}"
    return _flag_names(msg)


register_papers({
    "asap": ("Park et al. 2024, Grammar-Aligned Decoding (ASAp)",
             "samples the model conditioned on a grammar: a trie of sampled prefixes with expected-future-"
             "grammaticality estimates, the prompt's KV cache reused"),
    "beam": ("HF generate(num_beams) semantics", "beam search with length penalty and early stopping"),
    "diverse-beam": ("Vijayakumar et al. 2018, Diverse Beam Search", "beam groups with a Hamming diversity penalty"),
    "conditional-beam": ("conditional (non-degenerate) beam search; HF no_repeat_ngram_size",
                         "beams that never repeat an n-gram"),
    "stochastic-beam": ("Kool et al. 2019, Stochastic Beams and Where to Find Them",
                        "k samples without replacement (Gumbel-top-k)"),
    "momentum": ("Lan et al. 2022, Momentum Decoding", "penalises revisiting n-gram nodes of the output graph"),
    "adadec": ("AdaDec: entropy-triggered lookahead reranking", "top-k rerank by lookahead when entropy is high"),
    "entropy-adaptive": ("Entropy-adaptive decoding (EAD)", "a small model (first layers) unless entropy is high"),
    "best-of-n": ("best-of-N with a reranking hook", "N samples, the scorer's best"),
    "first-finish": ("First Finish Search", "N samples, the first to end"),
    "astar": ("A*-decoding with a heuristic", "best-first search over continuations"),
    "superposed": ("Shen et al. 2024, Superposed Decoding", "k drafts from one superposed model call per step"),
    "pgtd": ("Zhang et al. 2023, Planning with Large Language Models for Code Generation (PG-TD)",
             "MCTS over top-k tokens, greedy rollouts scored on public tests, tree and sequence caches"),
})
