"""`Constraint` front ends: JSON schema, regex, Lark grammar, a list of choices.

A `Constraint` is a plain description (kind, source, engine); engines compile it once per tokenizer and
cache the result. Invalid input raises `ConstraintError` (a ValueError) naming what is wrong, when the
constraint is built (schema shape, empty choices) or when it is compiled for a tokenizer (regex syntax,
grammar errors, a language with no string).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from jaxdec.constrained.engines import ENGINES, ConstraintError

KINDS = ("json_schema", "regex", "lark", "choices")


@dataclasses.dataclass(frozen=True)
class Constraint:
    """kind: one of KINDS. source: the schema (a dict, kept as canonical JSON text), the regex, the Lark
    text or a tuple of choice strings. engine: "llguidance" (every kind) or "outlines" (regular
    languages: regex, choices, json_schema through outlines-core's regex)."""

    kind: str
    text: Any
    engine: str = "llguidance"
    who: str = dataclasses.field(default="constraint", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConstraintError(f"{self.who}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.engine not in ENGINES:
            raise ConstraintError(f"{self.who}: engine must be one of {ENGINES}, got {self.engine!r}")

    @property
    def source(self):
        return json.loads(self.text) if self.kind == "json_schema" else self.text

    def key(self):
        return (self.kind, self.text)

    def named(self, who: str) -> "Constraint":
        return dataclasses.replace(self, who=who)

    def with_engine(self, engine: str) -> "Constraint":
        return dataclasses.replace(self, engine=engine)


def json_schema(schema, engine: str = "llguidance") -> Constraint:
    """A JSON schema (a dict, or its JSON text). The schema itself is checked against its JSON-Schema
    meta-schema (``jsonschema``) so a malformed schema fails here, naming the offending keyword."""
    who = "json_schema"
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ConstraintError(f"{who}: not valid JSON text: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(f"{who}: a JSON schema must be an object (dict), got {type(schema).__name__}")
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is a dependency
        jsonschema = None
    if jsonschema is not None:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            path = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise ConstraintError(f"{who}: invalid JSON schema at {path}: {e.message}") from None
    return Constraint("json_schema", json.dumps(schema, sort_keys=True), engine, who)


def regex(pattern: str, engine: str = "llguidance") -> Constraint:
    """A regular expression the whole output must match (Rust/llguidance syntax; ``\\d`` admits Unicode
    digits, so write ``[0-9]`` for ASCII digits)."""
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError(f"regex: give a non-empty pattern string, got {pattern!r}")
    return Constraint("regex", pattern, engine, "regex")


def lark(grammar: str, engine: str = "llguidance") -> Constraint:
    """A Lark context-free grammar (llguidance's Lark dialect; the start rule is ``start``)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise ConstraintError(f"grammar: give non-empty Lark grammar text, got {grammar!r}")
    if engine != "llguidance":
        raise ConstraintError(f"grammar: Lark grammars need engine='llguidance' (the {engine} engine handles "
                              "regular languages only)")
    return Constraint("lark", grammar, engine, "grammar")


def choices(options: Sequence[str], engine: str = "llguidance") -> Constraint:
    """Exactly one of the given strings."""
    if isinstance(options, str):
        options = [o.strip() for o in options.split(",")]
    opts = tuple(options) if options is not None else ()
    if not opts:
        raise ConstraintError("choices: give at least one choice string")
    for i, o in enumerate(opts):
        if not isinstance(o, str) or not o:
            raise ConstraintError(f"choices: choice {i} must be a non-empty string, got {o!r}")
    return Constraint("choices", opts, engine, "choices")


def as_constraint(c, who: str = "constraint") -> Constraint:
    """A `Constraint`, or a dict ``{"json_schema": ...} | {"regex": ...} | {"grammar": ...} |
    {"choices": [...]}`` (optionally with "engine")."""
    if isinstance(c, Constraint):
        return c if who == "constraint" else c.named(f"{who} ({c.who})")
    if isinstance(c, dict):
        engine = c.get("engine", "llguidance")
        keys = [k for k in ("json_schema", "regex", "grammar", "lark", "choices") if k in c]
        extra = set(c) - {"json_schema", "regex", "grammar", "lark", "choices", "engine"}
        if len(keys) != 1 or extra:
            raise ConstraintError(f"{who}: give exactly one of json_schema, regex, grammar, choices (and optionally "
                                  f"engine), got keys {sorted(c)}")
        k = keys[0]
        make = {"json_schema": json_schema, "regex": regex, "grammar": lark, "lark": lark, "choices": choices}[k]
        made = make(c[k], engine=engine)
        return made if who == "constraint" else made.named(f"{who} ({made.who})")
    raise TypeError(f"{who}: expected a jaxdec.constrained.Constraint (json_schema(...), regex(...), lark(...), "
                    f"choices(...)) or None, got {type(c).__name__}")
