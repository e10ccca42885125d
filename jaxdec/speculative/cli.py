"""`jaxdec generate --method speculative`: registered with the spine's CLI (`jaxdec.cli` imports this
module as a plugin).

    add_arguments(parser)                       # --drafter and per-drafter flags
    decoder, params = build(args, model, params)  # a SpeculativeDecoder and the params to pass

Greedy verification by default (exactly the greedy tokens); ``--spec-sampling`` verifies by speculative
sampling with the sampling flags (--temperature, --top-k, ...), lossless for sampling.

Drafters: pld | iad | recycling | aded | stand | swift | del | draft-model | pearl | medusa | eagle | clover |
s2d | rapid.
``iad`` is input-guided aggressive decoding (`jaxdec.speculative.aggressive`). ``--spec-config F.json``
loads a tree chosen by `jaxdec.speculative.calibrate` (saved with `save_config`). ``pearl`` runs
`jaxdec.speculative.pearl.PearlDecoder` (PEARL's pre-verify / post-verify schedule) with a draft model
(``--draft-layers N``: the target's first N layers, or ``--draft-model``) and a window of
``--draft-tokens`` (default 4); its ``stats`` add the phase counts and the parallel-time model.
``medusa`` drafts with trained Medusa-1 heads, ``eagle`` with the EAGLE-style head, ``clover`` with
Clover heads, ``s2d`` with the small draft model distilled from the target (S2D: ``--draft-depth D`` picks
one of its nested exits; default the deepest): the files shipped for the model, or ``--heads PATH`` (a
file written by ``python -m train.medusa`` / ``train.eagle`` / ``train.clover`` / ``train.distill_draft``;
refused when trained for another target). ``--stop-head [PATH]`` (``draft-model``, ``eagle``, ``clover``):
SpecDec++'s learned acceptance head stops each draft (the shipped head, trained on the target's first 15
layers, when no PATH is given; with ``eagle`` / ``clover`` a head trained for those heads by
``train.specdec_pp --drafter eagle|clover``; ``--stop-threshold`` sets its threshold).
``--verify-buckets auto|off|1,2,4,8``: the verify call sized to the drafted nodes (`SpeculativeDecoder`'s
``verify_buckets``: the smallest listed block length >= 1 + the last valid node, the full block added);
on (``auto``) by default with ``--stop-head``, off otherwise; not for ``pearl`` / ``rapid``.
``rapid`` is RAPID (`jaxdec.speculative.rapid`): each prompt is a long text whose last paragraph (after
its last blank line) is the question; the draft is the same model reading the ``--rapid-chunks`` chunks
(``--rapid-chunk-chars`` characters, cut at line ends) of the text before it that BM25 ranks best for the
question, then the question; the target verifies with the whole prompt (exactly the greedy tokens, or
the target distribution with ``--spec-sampling``). ``--rapid-augment BETA`` verifies against RAPID's
retrieval-augmented target instead (LOSSY: not the greedy tokens; greedy verification only), with
``--rapid-alpha``. The shipped long prompts: jaxdec/data/prompts/rapid_heldout.jsonl.
``lud`` takes ``--lud-cut P`` (keep unit token j while P(unit length >= j) >= P) and ``--lud-lossy``: the
paper's unverified acceptance of the kept unit (LOSSY: not the greedy tokens; the stats say ``lossless:
false``).
"""
from __future__ import annotations

import argparse

DRAFTERS = ("pld", "iad", "recycling", "aded", "stand", "swift", "del", "draft-model", "pearl", "medusa", "eagle",
            "clover", "s2d", "hidden-transfer", "ppd", "lud", "longspec", "rapid")
# trained drafters -> the kind of their heads file (shipped as <kind>-<model>.safetensors) and its script
HEAD_KINDS = {"medusa": ("medusa", "train.medusa"), "eagle": ("eagle", "train.eagle"),
              "clover": ("clover", "train.clover"), "s2d": ("draft_lm", "train.distill_draft"),
              "hidden-transfer": ("hidden_transfer", "train.hidden_transfer"), "ppd": ("ppd", "train.ppd"),
              "lud": ("lud", "train.lexical_units"), "longspec": ("longspec", "train.longspec")}
HEAD_LABELS = {"medusa": "Medusa heads", "eagle": "EAGLE heads", "clover": "Clover heads",
               "s2d": "S2D draft models", "hidden-transfer": "hidden-transfer heads",
               "ppd": "PPD prompt tokens", "lud": "lexical-unit heads", "longspec": "LongSpec draft heads"}
# trained drafters verified greedily only (no draft distribution for speculative sampling yet)
GREEDY_ONLY = ("lud", "longspec")


def _no_heads_message(args) -> str:
    d = args.drafter
    return (f"--drafter {d}: no {HEAD_LABELS[d]} are shipped for --model {args.model!r}; pass "
            f"--heads PATH (a file written by python -m {HEAD_KINDS[d][1]})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding (--method speculative)")
    g.add_argument("--drafter", choices=DRAFTERS, default="pld")
    g.add_argument("--spec-sampling", action="store_true",
                   help="verify by speculative sampling with the sampling flags (default: greedy verification)")
    g.add_argument("--draft-tokens", type=int, default=None,
                   help="chain length (pld, iad, swift, del, draft-model); pearl: the window gamma")
    g.add_argument("--max-ngram", type=int, default=3,
                   help="pld: longest n-gram to match; iad: longest generated suffix re-aligned with the input")
    g.add_argument("--copy-from", choices=("context", "prompt"), default="context",
                   help="pld: copy from the whole context or from the input only (aggressive decoding)")
    g.add_argument("--tree-size", type=int, default=None, help="recycling/aded/stand: draft tree nodes")
    g.add_argument("--spec-config", default=None, help="JSON from jaxdec.speculative.calibrate (tree)")
    g.add_argument("--skip-layers", type=int, nargs="*", default=None, help="swift: layers to skip")
    g.add_argument("--exit-layer", type=int, default=None, help="del: layers >= this are skipped when drafting")
    g.add_argument("--draft-model", default=None,
                   help="draft-model/pearl: a model name/path sharing the tokenizer, or 'truncate:N' (first N layers)")
    g.add_argument("--draft-layers", type=int, default=None,
                   help="draft-model/pearl: the draft is the target's first N layers (= --draft-model truncate:N)")
    g.add_argument("--heads", default=None,
                   help="medusa/eagle/clover/s2d/hidden-transfer/ppd/lud/longspec: a heads file from python -m "
                        "train.medusa / train.eagle / train.clover / train.distill_draft / train.hidden_transfer / "
                        "train.ppd / train.lexical_units / train.longspec (default: the file shipped for the model)")
    g.add_argument("--draft-depth", type=int, default=None,
                   help="s2d: the nested exit (draft layers) to draft with (default: the deepest)")
    g.add_argument("--stop-head", nargs="?", const="shipped", default=None,
                   help="draft-model/eagle/clover: stop drafts by SpecDec++'s learned acceptance head (a file from "
                        "python -m train.specdec_pp [--drafter eagle|clover], trained for that draft; no value: the "
                        "shipped head)")
    g.add_argument("--stop-threshold", type=float, default=None,
                   help="draft-model/eagle/clover with --stop-head: stop once P(some draft token is rejected) would exceed "
                        "this (default 0.7)")
    g.add_argument("--verify-buckets", default=None, metavar="auto|off|B1,B2,...",
                   help="size the verify call to what the drafter proposed: 'auto' (powers of two, then the full "
                        "block), 'off', or ascending block lengths (the full block is added); default auto with "
                        "--stop-head, else off")
    g.add_argument("--lud-cut", type=float, default=None,
                   help="lud: keep unit token j while P(unit length >= j) >= this, in (0, 1) (default: the heads' cut)")
    g.add_argument("--lud-lossy", action="store_true",
                   help="lud: accept the kept unit unverified, the paper's decoding (LOSSY: not the greedy tokens)")
    g.add_argument("--rapid-chunks", type=int, default=4,
                   help="rapid: chunks of the prompt (before its question paragraph) the draft reads, best by BM25")
    g.add_argument("--rapid-chunk-chars", type=int, default=800, help="rapid: characters per chunk (cut at line ends)")
    g.add_argument("--rapid-augment", type=float, default=None,
                   help="rapid: beta of RAPID's retrieval-augmented target (LOSSY; default: exact greedy verification)")
    g.add_argument("--rapid-alpha", type=float, default=0.1,
                   help="rapid: with --rapid-augment, draft tokens with q >= alpha * max q are augmented")


# per drafter, the drafter flags it uses (a flag another drafter uses, given a non-default value, is an error)
DRAFTER_FLAGS = {
    "pld": ("draft_tokens", "max_ngram", "copy_from"),
    "iad": ("draft_tokens", "max_ngram"),
    "recycling": ("tree_size", "spec_config"), "aded": ("tree_size", "spec_config"),
    "stand": ("tree_size", "spec_config"),
    "swift": ("draft_tokens", "skip_layers"), "del": ("draft_tokens", "exit_layer"),
    "draft-model": ("draft_tokens", "draft_model", "draft_layers", "stop_head", "stop_threshold"),
    "pearl": ("draft_tokens", "draft_model", "draft_layers"),
    "medusa": ("heads",), "eagle": ("heads", "stop_head", "stop_threshold"), "clover": ("heads", "stop_head", "stop_threshold"),
    "s2d": ("heads", "draft_tokens", "draft_depth"),
    "hidden-transfer": ("heads",), "ppd": ("heads",), "lud": ("heads", "lud_cut", "lud_lossy"), "longspec": ("heads", "draft_tokens"),
    "rapid": ("draft_tokens", "rapid_chunks", "rapid_chunk_chars", "rapid_augment", "rapid_alpha"),
}
_DEFAULTS = {"draft_tokens": None, "max_ngram": 3, "copy_from": "context", "tree_size": None, "spec_config": None,
             "skip_layers": None, "exit_layer": None, "draft_model": None, "draft_layers": None,
             "heads": None, "draft_depth": None, "stop_head": None, "stop_threshold": None, "rapid_chunks": 4, "rapid_chunk_chars": 800, "rapid_augment": None, "rapid_alpha": 0.1,
             "lud_cut": None, "lud_lossy": False}


def validate_args(args):
    """Value checks of the speculative flags that need no model (run before it loads, whatever the method);
    raises `jaxdec.cli.BadInput`."""
    import os
    from jaxdec.cli import BadInput, check_int, check_model_path
    check_int(args, "draft_tokens", 1, allow_none=True)
    check_int(args, "max_ngram", 1)
    check_int(args, "tree_size", 1, allow_none=True)
    check_int(args, "exit_layer", 1, allow_none=True)
    check_int(args, "draft_layers", 1, allow_none=True)
    check_int(args, "draft_depth", 1, allow_none=True)
    check_int(args, "rapid_chunks", 1)
    check_int(args, "rapid_chunk_chars", 1)
    from jaxdec.cli import check_float
    check_float(args, "rapid_augment", lambda v: v >= 0, "a finite number >= 0",
                allow_none=True)
    check_float(args, "rapid_alpha", lambda v: 0 <= v <= 1, "in [0, 1]")
    check_float(args, "lud_cut", lambda v: 0 < v < 1, "in (0, 1)", allow_none=True)
    check_float(args, "stop_threshold", lambda v: 0 < v < 1, "in (0, 1)", allow_none=True)
    if args.stop_head not in (None, "shipped") and not os.path.isfile(args.stop_head):
        raise BadInput(f"--stop-head: no such file {args.stop_head!r}")
    if getattr(args, "verify_buckets", None) is not None:
        parse_verify_buckets(args.verify_buckets)
    if args.skip_layers is not None and any(x < 0 for x in args.skip_layers):
        raise BadInput(f"--skip-layers: expected layer indices >= 0, got {args.skip_layers}")
    if args.spec_config is not None and not os.path.isfile(args.spec_config):
        raise BadInput(f"--spec-config: no such file {args.spec_config!r}")
    if args.draft_layers is not None and args.draft_model:
        raise BadInput("give --draft-layers or --draft-model, not both")
    if args.heads is not None:
        if os.path.isdir(args.heads):
            raise BadInput(f"--heads: {args.heads!r} is a folder, expected a heads file (.safetensors) written by "
                           f"python -m train.medusa")
        if not os.path.isfile(args.heads):
            raise BadInput(f"--heads: no such file {args.heads!r}")
    dm = args.draft_model
    if dm is not None:
        if dm.startswith("truncate:"):
            n = dm.split(":", 1)[1]
            if not n.isdigit() or int(n) < 1:
                raise BadInput(f"--draft-model: expected 'truncate:N' with an integer N >= 1, got {dm!r}")
        else:
            check_model_path(dm, "--draft-model")


def check_args(args):
    """--method speculative: what the chosen drafter and verifier cannot honour (before the model loads)."""
    from jaxdec.cli import SAMPLING, BadInput
    if args.stop:
        raise BadInput("--stop (stop strings) is not supported with --method speculative; use EOS / max tokens")
    if args.spec_sampling:
        if args.repetition_penalty != 1.0:
            raise BadInput("--repetition-penalty is not supported by the speculative sampling verifier")
    else:
        defaults = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                    "repetition_penalty": 1.0, "seed": 0}
        for dest in (*SAMPLING, "seed"):
            if getattr(args, dest) != defaults[dest]:
                raise BadInput(f"--{dest.replace('_', '-')} needs --spec-sampling with --method speculative "
                               f"(greedy verification uses no sampling parameters)")
    for dest, default in _DEFAULTS.items():
        if dest not in DRAFTER_FLAGS[args.drafter] and getattr(args, dest) != default:
            users = sorted(d for d, f in DRAFTER_FLAGS.items() if dest in f)
            raise BadInput(f"--{dest.replace('_', '-')} is not used by --drafter {args.drafter} "
                           f"(it applies to --drafter {', '.join(users)})")
    _check_mesh(args)
    if getattr(args, "verify_buckets", None) is not None and args.drafter in ("pearl", "rapid"):
        raise BadInput(f"--verify-buckets is not supported by --drafter {args.drafter} (it runs its own verify "
                       f"schedule)")
    if args.drafter in GREEDY_ONLY and args.spec_sampling:
        raise BadInput(f"--spec-sampling: --drafter {args.drafter} is verified greedily only (drop --spec-sampling)")
    if args.drafter in HEAD_KINDS:
        if args.heads is None and _shipped(args) is None:
            raise BadInput(_no_heads_message(args))
        _check_heads(args, args.heads or _shipped(args))
    if args.stop_threshold is not None and args.stop_head is None:
        raise BadInput("--stop-threshold is used only with --stop-head")
    if args.stop_head is not None:
        from jaxdec.speculative.heads.acceptance import check_file_for_drafter
        path = _stop_head_path(args)
        heads = args.drafter in ("eagle", "clover")
        if path is None:
            raise BadInput(f"--stop-head: no SpecDec++ acceptance head {_STOP_FOR.get(args.drafter, '')}is shipped for "
                           f"--model {args.model!r}; pass --stop-head PATH (a file written by python -m "
                           f"train.specdec_pp{f' --drafter {args.drafter}' if heads else ''})")
        _check_heads(args, path, "specdec_pp", "--stop-head")
        try:  # trained for this drafter (an EAGLE or Clover heads file's record names which heads)
            check_file_for_drafter(path, args.drafter if heads else "draft-model",
                                   (args.heads or _shipped(args)) if heads else None)
        except (OSError, ValueError) as e:
            raise BadInput(f"--stop-head: {e}") from None
    if args.drafter == "rapid":
        if args.rapid_augment is not None and args.spec_sampling:
            raise BadInput("--rapid-augment (the retrieval-augmented target) works with greedy verification only: "
                           "drop --spec-sampling")
        if args.rapid_alpha != 0.1 and args.rapid_augment is None:
            raise BadInput("--rapid-alpha is used only with --rapid-augment")
        for dest in ("json_schema", "regex", "grammar", "choices"):
            if getattr(args, dest, None) is not None:
                raise BadInput(f"--{dest.replace('_', '-')}: --drafter rapid cannot honour constraints (its draft "
                               f"model runs on its own retrieved prompt)")


# drafters whose decoder runs on the target's own params (the tree `jaxdec.sharding` places): --mesh works;
# the others carry a second model or trained heads in their params, which the partition rules do not cover
MESH_DRAFTERS = ("pld", "iad", "recycling", "aded", "stand", "swift", "del")


def _check_mesh(args):
    from jaxdec.cli import BadInput
    if getattr(args, "mesh", None) is not None and args.drafter not in MESH_DRAFTERS:
        raise BadInput(f"--mesh is not supported by --drafter {args.drafter} (its draft model or heads are params "
                       f"jaxdec.sharding does not place); --mesh works with --drafter {', '.join(MESH_DRAFTERS)}")


def _check_heads(args, path, kind=None, flag="--heads"):
    """A heads file that cannot be read, or was trained for another target than --model: BadInput
    before the model loads (the fingerprint reads the model file, not its weights)."""
    from jaxdec.cli import BadInput
    from jaxdec.models.registry import resolve
    from jaxdec.speculative.heads.artefact import read_heads, target_fingerprint
    try:
        _, meta = read_heads(path, kind or HEAD_KINDS[args.drafter][0])
    except (OSError, ValueError) as e:
        raise BadInput(f"{flag}: {e}") from None
    fp = target_fingerprint(resolve(args.model))
    if meta.get("fingerprint") != fp:
        raise BadInput(f"{flag}: {path!r} was trained for another target model or vocabulary "
                       f"({meta.get('target') or 'unnamed'}, fingerprint {str(meta.get('fingerprint'))[:19]}...), "
                       f"not --model {args.model!r} (fingerprint {fp[:19]}...)")


_STOP_FOR = {"eagle": "for the EAGLE head ", "clover": "for the Clover heads "}  # --stop-head's message per drafter


def _stop_head_path(args):
    """``--stop-head``'s file: the given path, or (no value) the head shipped for --model and the drafter."""
    from jaxdec.speculative.heads import shipped_heads
    from jaxdec.speculative.heads.acceptance import HEAD_DRAFTERS, KIND
    if args.stop_head != "shipped":
        return args.stop_head
    shipped = {name: kind for name, kind in HEAD_DRAFTERS.values()}
    return shipped_heads(shipped.get(args.drafter, KIND), args.model)


def _shipped(args):
    """The heads file shipped for ``--model`` (a known name), or None."""
    from jaxdec.speculative.heads import shipped_heads
    return shipped_heads(HEAD_KINDS[args.drafter][0], args.model)


def parse_verify_buckets(text: str):
    """``--verify-buckets`` -> `SpeculativeDecoder`'s ``verify_buckets``: "auto", () for "off", or a tuple of
    strictly ascending block lengths >= 1 (checked against the drafter's block size when it is built)."""
    from jaxdec.cli import BadInput
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    if t in ("off", "none"):
        return ()
    try:
        vals = tuple(int(x) for x in t.split(","))
    except ValueError:
        raise BadInput(f"--verify-buckets: expected 'auto', 'off' or comma-separated block lengths such as 1,2,4,8, "
                       f"got {text!r}") from None
    if min(vals) < 1:
        raise BadInput(f"--verify-buckets: block lengths must be >= 1, got {text!r}")
    if any(a >= b for a, b in zip(vals, vals[1:])):
        raise BadInput(f"--verify-buckets: block lengths must be strictly ascending, got {text!r}")
    return vals


def apply_verify_buckets(args, decoder):
    """The decoder with ``--verify-buckets`` (auto by default with ``--stop-head``: SpecDec++'s learned stop
    proposes fewer tokens than its maximum, and the verify call should cost only what it proposed)."""
    import dataclasses
    from jaxdec.speculative.engine import SpeculativeDecoder
    text = getattr(args, "verify_buckets", None)
    if text is None:
        if getattr(args, "stop_head", None) is None or not isinstance(decoder, SpeculativeDecoder):
            return decoder
        text = "auto"
    vb = parse_verify_buckets(text)
    if not isinstance(decoder, SpeculativeDecoder):
        raise ValueError(f"--verify-buckets is not supported by --drafter {getattr(args, 'drafter', '?')}")
    try:
        return dataclasses.replace(decoder, verify_buckets=vb)
    except ValueError as e:
        raise ValueError(f"--verify-buckets: {e}") from None


# model-free drafters the serving engine runs (`jaxdec serve` / `serve-bench --drafter`)
SERVE_DRAFTERS = ("pld", "iad", "recycling", "aded", "stand")


def build_serve_decoder(name: str, sampling: bool, model_path=None):
    """The decode-slot engine's `SpeculativeDecoder` for a model-free drafter, with its ``jaxdec generate
    --method speculative --drafter NAME`` defaults (``sampling``: the speculative-sampling verifier)."""
    if name not in SERVE_DRAFTERS:
        raise ValueError(f"--drafter for serving must be one of {SERVE_DRAFTERS}, got {name!r}")
    ns = argparse.Namespace(**_DEFAULTS, drafter=name, spec_sampling=sampling, model=model_path)
    return build(ns, None, None)[0]


def build(args, model, params, model_path=None):
    """Returns (decoder, params to pass to generate), built with the named constructors of
    `jaxdec.speculative.methods` (with ``--verify-buckets`` applied). Raises ValueError on bad flags.
    ``model_path``: the target's file (trained heads are checked against its fingerprint)."""
    decoder, params = _build(args, model, params, model_path)
    return apply_verify_buckets(args, decoder), params


def _build(args, model, params, model_path=None):
    from jaxdec.speculative import methods as M
    from jaxdec.speculative.calibrate import load_config, tree_from_config

    sampling = bool(getattr(args, "spec_sampling", False))
    k = args.draft_tokens
    if k is not None and k < 1:
        raise ValueError("--draft-tokens must be >= 1")
    tree = tree_from_config(load_config(args.spec_config)) if args.spec_config else None
    size = args.tree_size if tree is None else None
    d = args.drafter
    if d == "pld":
        make = M.aggressive_decoding if args.copy_from == "prompt" else M.prompt_lookup
        return make(k or 8, args.max_ngram, sampling=sampling), params
    if d == "iad":
        return M.input_guided(k or 16, args.max_ngram, sampling=sampling), params
    if d == "recycling":
        return M.token_recycling(tree, size, sampling=sampling), params
    if d == "aded":
        return M.aded(tree, size, sampling=sampling), params
    if d == "stand":
        return M.stand(tree, size, sampling=sampling), params
    if d == "swift":
        return M.swift(model, args.skip_layers or None, k or 3, sampling=sampling), params
    if d == "del":
        if args.exit_layer is not None and not 1 <= args.exit_layer <= model.num_layers:
            raise ValueError(f"--exit-layer must be in [1, {model.num_layers}]")
        return M.dynamic_exit(model, args.exit_layer, k or 3, sampling=sampling), params
    if d in ("draft-model", "pearl"):
        layers = getattr(args, "draft_layers", None)
        if layers is not None and args.draft_model:
            raise ValueError("give --draft-layers or --draft-model, not both")
        if layers is not None and not 1 <= layers <= model.num_layers:
            raise ValueError(f"--draft-layers must be in [1, {model.num_layers}]")
        spec = args.draft_model
        draft = None
        if spec is not None and spec.startswith("truncate:"):
            layers = int(spec.split(":", 1)[1])
        elif spec is not None:
            from jaxdec.models.registry import load
            loaded = load(spec)
            draft = (loaded.model, loaded.params)
        if d == "pearl":
            return M.pearl(model, params, layers, draft, gamma=k or 4, sampling=sampling)
        stop = getattr(args, "stop_head", None)
        if stop is not None:
            path = _stop_head_path(args)
            if path is None:
                raise ValueError(f"--stop-head: no SpecDec++ acceptance head is shipped for --model {args.model!r}")
            try:
                return M.specdec_pp(model, params, layers, draft, num_tokens=k or 8, sampling=sampling,
                                    stop_head=path, target=model_path, stop_threshold=args.stop_threshold)
            except ValueError as e:
                raise ValueError(f"--stop-head: {e}") from None
        return M.draft_model(model, params, layers, draft, num_tokens=k or 3, sampling=sampling)
    if d in HEAD_KINDS:
        heads = args.heads or _shipped(args)
        if heads is None:
            raise ValueError(_no_heads_message(args))
        try:
            if d == "s2d":
                return M.draft_lm(model, params, heads, target=model_path, depth=args.draft_depth,
                                  num_tokens=k or 4, sampling=sampling)
            if d == "lud":
                return M.lud(model, params, heads, target=model_path, cut=args.lud_cut, lossy=args.lud_lossy)
            if d == "longspec":
                return M.longspec(model, params, heads, target=model_path, num_tokens=k)
            if d in GREEDY_ONLY:
                return getattr(M, d)(model, params, heads, target=model_path)
            if d in ("eagle", "clover") and getattr(args, "stop_head", None) is not None:
                return _heads_with_stop(args, model, params, heads, model_path, sampling)
            return getattr(M, d.replace("-", "_"))(model, params, heads, target=model_path, sampling=sampling)
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith("--stop-head: ") else f"--heads: {e}") from None
    if d == "rapid":
        raise ValueError("--drafter rapid drafts from each prompt's retrieved chunks: run it with jaxdec generate "
                         "(or jaxdec.speculative.rapid.rapid_generate), not through build()")
    raise ValueError(f"unknown drafter {d!r}; choose one of {DRAFTERS}")


def _heads_with_stop(args, model, params, heads, model_path, sampling):
    """``--drafter eagle|clover --stop-head``: the EAGLE or Clover chain stopped by SpecDec++'s head trained
    for those heads."""
    from jaxdec.speculative import methods as M
    from jaxdec.speculative.heads.acceptance import heads_module
    from jaxdec.speculative.heads.artefact import HeadsMismatch, expected_fingerprint
    d = args.drafter
    path = _stop_head_path(args)
    if path is None:
        raise ValueError(f"--stop-head: no SpecDec++ acceptance head {_STOP_FOR[d]}is shipped for --model {args.model!r}")
    hcfg, hp, _, d2t = heads_module(d)[1](heads, expected_fingerprint(model, params, model_path))  # --heads' errors first
    try:
        return getattr(M, d)(model, params, (hcfg, hp, d2t), sampling=sampling, stop_head=path, target=model_path,
                             stop_threshold=args.stop_threshold)
    except (ValueError, HeadsMismatch) as e:
        raise ValueError(f"--stop-head: {e}") from None


def _handler(args, loaded, prompt_ids, progress):
    """CLI method handler: per-row JSONL records whose ``stats`` carry τ, acceptance per draft position
    and target calls (counted over all batches)."""
    import jaxdec.cli as cli
    from jaxdec.speculative.run import generate_speculative

    if args.stop:
        raise ValueError("--stop (stop strings) is not supported with --method speculative; use EOS / max tokens")
    if args.spec_sampling and args.repetition_penalty != 1.0:
        raise ValueError("--repetition-penalty is not supported by the speculative sampling verifier")
    sampling = cli._sampling_from_args(args) if args.spec_sampling else None
    rows = [p for p in prompt_ids for _ in range(args.n)]
    bs = min(args.batch_size or len(rows), len(rows))
    if sampling is not None:
        from jaxdec.core.processors import SamplingParams
        sampling = SamplingParams.create(len(rows), **sampling)
    cons = cli.chunk_constraints(args, len(prompt_ids))  # --json-schema ... / prompts-file fields, per prompt
    extra = {}
    if args.drafter == "rapid":
        g, extra = _rapid(args, loaded, prompt_ids, rows, bs, sampling, cons)
    else:
        if args.drafter == "lud":
            extra = {"lossless": not args.lud_lossy}
        decoder, params = build(args, loaded.model, loaded.params, loaded.path)
        if cons is not None:
            from jaxdec.constrained.cli import speculative_decoder
            cons, decoder = [c for c in cons for _ in range(args.n)], speculative_decoder(args, decoder)
        g = generate_speculative(loaded.model, params, rows, decoder, max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.min_new_tokens, batch_size=bs, seed=args.seed,
                                 sampling=sampling, tokenizer=loaded.tokenizer, constraint=cons,
                                 mesh=getattr(args, "_mesh", None), **cli.stream_kwargs(args))
    out = [dict(prompt_ids=p, tokens=t, text=x, finish_reason=f)
           for p, t, x, f in zip(g.prompt_ids, g.tokens, g.text, g.finish_reason)]
    summ = g.stats
    stats = {k: summ[k] for k in ("model_calls", "new_tokens", "seconds", "tokens_per_second")}
    stats = {**stats, "drafter": args.drafter,
             **{k: summ[k] for k in ("tau", "acceptance_per_position", "target_calls", "draft_calls",
                                     "tokens_per_row_step")}, **extra}
    if "pearl" in summ:  # phase counts (pre-verify / post-verify) and the two-device time model
        stats["pearl"] = summ["pearl"]
        stats["pre_verify_steps"] = summ["pre_verify_steps"]
        stats["post_verify_steps"] = summ["post_verify_steps"]
    for r in out:
        r["stats"] = stats
    return cli.with_constraint_ok(out, g), stats


def _rapid(args, loaded, prompt_ids, rows, bs, sampling, cons):
    """--drafter rapid: each prompt text's draft version (`jaxdec.speculative.rapid.draft_text`: BM25's
    best chunks of the text before the question paragraph, then the question), tokenized as the prompt
    was (``--chat`` or not), decoded by `rapid_generate`. Returns (Generation, extra stats)."""
    import jaxdec.cli as cli
    from jaxdec.speculative.rapid import draft_text, rapid_generate
    if cons is not None:
        raise ValueError("--drafter rapid cannot honour constraints (its draft model reads its own retrieved prompt)")
    offset = getattr(args, "_chunk", (0, len(prompt_ids)))[0]
    texts = cli._read_prompts(args)[offset:offset + len(prompt_ids)]
    tok = loaded.tokenizer
    drafts = []
    for i, text in enumerate(texts):
        try:
            d = draft_text(text, args.rapid_chunks, args.rapid_chunk_chars)
        except ValueError as e:
            raise ValueError(f"--drafter rapid, prompt {offset + i + 1}: {e}") from None
        drafts.append(tok.chat_ids(d) if args.chat else tok.encode(d))
    g = rapid_generate(loaded.model, loaded.params, rows, [d for d in drafts for _ in range(args.n)],
                       num_tokens=args.draft_tokens or 6, max_new_tokens=args.max_new_tokens,
                       min_new_tokens=args.min_new_tokens, batch_size=bs, sampling=sampling, seed=args.seed,
                       augment=args.rapid_augment, alpha=args.rapid_alpha, tokenizer=tok, **cli.stream_kwargs(args))
    extra = {"draft_prompt_tokens": [len(d) for d in drafts], "rapid_chunks": args.rapid_chunks,
             "rapid_chunk_chars": args.rapid_chunk_chars, "rapid_augment": args.rapid_augment,
             "lossless": args.rapid_augment is None}
    return g, extra


# --drafter -> the constructor in jaxdec.speculative.methods (its PAPERS entry is what `jaxdec methods` shows)
DRAFTER_METHODS = {"pld": "prompt_lookup", "iad": "input_guided", "recycling": "token_recycling", "aded": "aded",
                   "stand": "stand", "swift": "swift", "del": "dynamic_exit", "draft-model": "draft_model",
                   "pearl": "pearl", "medusa": "medusa", "eagle": "eagle", "clover": "clover", "s2d": "draft_lm",
                   "hidden-transfer": "hidden_transfer", "ppd": "ppd", "lud": "lud", "longspec": "longspec"}
RAPID_PAPER = ("Chen et al. 2025, Long-Context Inference with Retrieval-Augmented Speculative Decoding (RAPID)",
               "the same model drafts over BM25-retrieved chunks of the long prompt; the target verifies with it "
               "all (exact; --rapid-augment: the retrieval-augmented target, lossy)")

try:  # register with the spine's CLI when it is importable
    from jaxdec.cli import SAMPLING, register_method, register_papers, register_serve_drafters
    from jaxdec.speculative.methods import PAPERS as _PAPERS

    register_method("speculative", add_arguments, check=check_args, validate=validate_args,
                    uses=("drafter", "spec_sampling", *_DEFAULTS, "verify_buckets", "min_new_tokens", "batch_size", "n",
                          "seed", "stream", "forced_tokens", "mesh", *SAMPLING))(_handler)
    register_serve_drafters(SERVE_DRAFTERS, build_serve_decoder)
    register_papers({"speculative": ("Leviathan et al. 2023; Chen et al. 2023 (speculative sampling)",
                                     "draft -> one tree-masked target call -> verify; lossless")})
    register_papers({f"speculative --drafter {d}": _PAPERS[m] for d, m in DRAFTER_METHODS.items()})
    register_papers({"speculative --drafter rapid": RAPID_PAPER})
    register_papers({"speculative --drafter draft-model --stop-head": _PAPERS["specdec_pp"],
                     "speculative --drafter eagle --stop-head": _PAPERS["specdec_pp"],
                     "speculative --drafter clover --stop-head": _PAPERS["specdec_pp"]})
except ImportError:  # pragma: no cover
    pass
