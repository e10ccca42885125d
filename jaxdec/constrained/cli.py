"""CLI side of constrained decoding: ``--json-schema FILE``, ``--regex RE``, ``--grammar FILE.lark``,
``--choices a,b,c`` (all rows), ``--constraint-engine``, ``--forced-tokens`` (speculative: the tokens the
grammar forces are drafted first), and per-row ``json_schema | regex | grammar | choices`` fields in
``--prompts-file`` lines. Every check that needs no tokenizer runs before the model
loads (file reading, JSON, the schema against its meta-schema, regex/grammar syntax through llguidance's
tokenizer-free validation); errors name the flag or the prompts-file line."""
from __future__ import annotations

import json
import os

FLAGS = ("json_schema", "regex", "grammar", "choices")
DESTS = FLAGS + ("constraint_engine", "forced_tokens")
# the CLI methods that pass a constraint on (jaxdec.cli's token methods and jaxdec.search.cli's)
METHODS = ("greedy", "sample", "beam", "diverse-beam", "conditional-beam", "speculative", "stochastic-beam",
           "momentum", "best-of-n", "first-finish", "asap")
# why the other CLI methods refuse a constraint (named in their error)
REFUSED = {
    "adadec": "its lookahead rollouts and rerank run outside the logits-processor chain, so no mask reaches them",
    "entropy-adaptive": "its small and large steps take the argmax of their own logits with no logits-processor "
                        "chain, so no mask reaches them",
    "astar": "it is a host-level best-first search whose children are ranked by its own step cost, outside the "
             "mask seam",
    "superposed": "its k drafts come from one superposed model call and an n-gram rerank with no per-draft "
                  "grammar state",
    "pgtd": "its programs are scored by running the prompt's doctests; tree expansions and greedy rollouts run "
            "outside the mask seam",
    "diffusion": "masked-diffusion sampling fills positions in any order, so a left-to-right grammar mask does "
                 "not apply",
}
# the CLI methods that sample the model conditioned on the constraint and need one on every row
NEEDS_CONSTRAINT = ("asap",)
CONSTRAINT_FLAGS = "--json-schema, --regex, --grammar or --choices, or per-row fields in --prompts-file"
# --method speculative drafters whose decoder has no constraint mask (PEARL runs its own pre/post-verify loop)
UNCONSTRAINED_DRAFTERS = ("pearl",)
CHAIN_DRAFTERS = ("pld", "iad", "swift", "del", "draft-model")  # --forced-tokens wraps these (ForcedTokensDrafter)
ROW_FIELDS = ("json_schema", "regex", "grammar", "choices")


def add_arguments(g) -> None:
    g.add_argument("--json-schema", metavar="FILE", help="constrain every row to JSON valid under this schema file")
    g.add_argument("--regex", metavar="RE", help="constrain every row to strings matching RE")
    g.add_argument("--grammar", metavar="FILE.lark", help="constrain every row to this Lark grammar")
    g.add_argument("--choices", metavar="A,B,C", help="constrain every row to one of these comma-separated strings")
    g.add_argument("--constraint-engine", default="llguidance", choices=["llguidance", "outlines"],
                   help="grammar engine (outlines: regular languages only)")
    g.add_argument("--forced-tokens", action="store_true",
                   help="--method speculative with a constraint: draft the tokens the grammar forces (one verify "
                        "call for them) before the drafter's own draft (chain drafters)")


def _bad(msg):
    """A ConstraintError (a ValueError) carrying the CLI message; `jaxdec.cli` turns it into its one
    ``jaxdec: error:`` line (this module does not import jaxdec.cli)."""
    from jaxdec.constrained.engines import ConstraintError
    return ConstraintError(msg)


def _read_file(path: str, flag: str) -> str:
    if os.path.isdir(path):
        raise _bad(f"{flag}: {path!r} is a folder, expected a file")
    if not os.path.isfile(path):
        raise _bad(f"{flag}: no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(f"{flag}: cannot read {path!r} as UTF-8 text ({e})") from None


def _syntax_check(c, flag: str) -> None:
    """Regex / Lark / schema errors that llguidance finds without a tokenizer."""
    from jaxdec.constrained.engines import ConstraintError, LLGuidanceEngine, one_line
    if c.engine != "llguidance":
        return
    from llguidance import LLMatcher
    try:
        g = LLGuidanceEngine.grammar(c)
    except ConstraintError as e:
        raise _bad(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
    err = LLMatcher.validate_grammar(g)
    if err:
        what = {"json_schema": "JSON schema", "regex": "regex", "lark": "Lark grammar", "choices": "choices"}[c.kind]
        raise _bad(f"{flag}: invalid {what}: {one_line(err)}")


def _make(kind: str, value, engine: str, flag: str, base: str = "."):
    from jaxdec.constrained import constraint as C
    from jaxdec.constrained.engines import ConstraintError
    try:
        if kind == "json_schema":
            if isinstance(value, str) and not value.lstrip().startswith("{"):
                value = _read_file(os.path.join(base, value), flag)
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise _bad(f"{flag}: the schema file is not valid JSON ({e})") from None
            c = C.json_schema(value, engine=engine)
        elif kind == "regex":
            if not isinstance(value, str) or not value:
                raise _bad(f"{flag}: expected a non-empty regex string, got {value!r}")
            c = C.regex(value, engine=engine)
        elif kind == "grammar":
            if not isinstance(value, str) or not value.strip():
                raise _bad(f"{flag}: expected Lark grammar text or a .lark file path, got {value!r}")
            if value.endswith(".lark") and "\n" not in value:
                value = _read_file(os.path.join(base, value), flag)
            c = C.lark(value, engine=engine)
        else:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",")]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise _bad(f"{flag}: expected non-empty choice strings (a,b,c or a JSON list), got {value!r}")
            c = C.choices(value, engine=engine)
    except ConstraintError as e:
        raise _bad(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
    _syntax_check(c, flag)
    return c.named(flag)


def read_constraints(args, n_prompts: int):
    """None (no constraint anywhere) or a list with one `Constraint | None` per prompt."""
    given = [f for f in FLAGS if getattr(args, f, None) is not None]
    engine = getattr(args, "constraint_engine", "llguidance")
    if len(given) > 1:
        raise _bad(f"give at most one of --json-schema, --regex, --grammar, --choices (got "
                   f"{', '.join('--' + f.replace('_', '-') for f in given)})")
    if engine == "outlines" and getattr(args, "grammar", None) is not None:
        raise _bad("--grammar: Lark grammars need --constraint-engine llguidance (outlines handles regular "
                   "languages only)")
    shared = None
    if given:
        f = given[0]
        flag = "--" + f.replace("_", "-")
        value = getattr(args, f)
        if f == "json_schema":
            text = _read_file(value, flag)
            try:
                value = json.loads(text)
            except ValueError as e:
                raise _bad(f"{flag}: {value!r} is not valid JSON ({e})") from None
            if not isinstance(value, dict):
                raise _bad(f"{flag}: a JSON schema must be a JSON object, got {type(value).__name__}")
        elif f == "grammar":
            value = _read_file(value, flag)
        shared = _make(f, value, engine, flag)
    per_row = _row_fields(args, n_prompts, engine)
    method = getattr(args, "method", "greedy")
    if method in NEEDS_CONSTRAINT and shared is None:
        if per_row is None:
            raise _bad(f"--method {method} needs a constraint ({CONSTRAINT_FLAGS}): it samples the model "
                       "conditioned on a grammar")
        missing = [i for i, r in enumerate(per_row) if r is None]
        if missing:
            raise _bad(f"--prompts-file line {_line_of(args, missing[0])}: --method {method} needs a constraint on "
                       "every row (a json_schema, regex, grammar or choices field, or one of --json-schema, --regex, "
                       "--grammar, --choices for the rows without one)")
    if shared is None and per_row is None:
        for dest, default, flag in (("constraint_engine", "llguidance", "--constraint-engine"),
                                    ("forced_tokens", False, "--forced-tokens")):
            if getattr(args, dest, default) != default:
                raise _bad(f"{flag} is set but no constraint is given (--json-schema, --regex, --grammar, "
                           "--choices or per-row fields in --prompts-file)")
        return None
    what = "--" + given[0].replace("_", "-") if given else "per-row constraint fields in --prompts-file"
    if method not in METHODS:
        why = f" ({REFUSED[method]})" if method in REFUSED else ""
        raise _bad(f"{what}: --method {method} cannot honour a constraint{why}; constrained decoding supports "
                   f"--method {', '.join(METHODS)}")
    drafter = getattr(args, "drafter", None)
    if method == "speculative" and drafter in UNCONSTRAINED_DRAFTERS:
        raise _bad(f"{what}: --drafter {drafter} cannot honour a constraint (its decoder has no constraint mask); "
                   "use another --drafter (e.g. pld, or recycling: every SpeculativeDecoder drafter, chain or tree)")
    if getattr(args, "forced_tokens", False) and (method != "speculative" or drafter not in CHAIN_DRAFTERS):
        raise _bad(f"--forced-tokens needs --method speculative with a chain drafter ({', '.join(CHAIN_DRAFTERS)}), "
                   f"got --method {method}" + (f" --drafter {drafter}" if method == "speculative" else ""))
    if per_row is None:
        return [shared] * n_prompts
    return [r if r is not None else shared for r in per_row]


def speculative_decoder(args, decoder):
    """``--forced-tokens``: the speculative decoder with its chain drafter behind `ForcedTokensDrafter`."""
    if not getattr(args, "forced_tokens", False):
        return decoder
    import dataclasses
    from jaxdec.constrained.forced import ForcedTokensDrafter
    return dataclasses.replace(decoder, drafter=ForcedTokensDrafter(decoder.drafter))


def _line_of(args, prompt_index: int) -> int:
    """The --prompts-file line number (1-based, blank lines counted) of the prompt at ``prompt_index``."""
    with open(args.prompts_file, "rb") as f:
        lines = f.read().split(b"\n")
    seen = -1
    for n, line in enumerate(lines, 1):
        if line.strip():
            seen += 1
            if seen == prompt_index:
                return n
    return prompt_index + 1  # pragma: no cover - the index comes from the same lines


def _row_fields(args, n_prompts: int, engine: str):
    path = getattr(args, "prompts_file", None)
    if not path or not os.path.isfile(path):
        return None
    base = os.path.dirname(os.path.abspath(path))
    out, any_ = [], False
    with open(path, "rb") as f:
        lines = [ln for ln in f.read().split(b"\n")]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = json.loads(line.decode("utf-8"))  # read_jsonl_strings checked the file already
        fields = [k for k in ROW_FIELDS if k in obj]
        if len(fields) > 1:
            raise _bad(f"--prompts-file line {n}: give at most one of {', '.join(ROW_FIELDS)}, got {', '.join(fields)}")
        if not fields:
            out.append(None)
            continue
        any_ = True
        k = fields[0]
        out.append(_make(k, obj[k], obj.get("engine", engine), f"--prompts-file line {n} ({k})", base))
    if not any_:
        return None
    if len(out) != n_prompts:  # pragma: no cover - the prompts were read from the same lines
        raise _bad(f"--prompts-file: {len(out)} lines with prompts, {n_prompts} prompts")
    return out
