"""A static check that a Lark grammar's start rule can finish: the rules that derive some finite string.

llguidance compiles a grammar such as ``start: a`` / ``a: "x" a`` without complaint (its first mask allows
"x"), yet the grammar accepts no string at all: every derivation needs one more ``a``. The engines' own
check (`Engine.check_language`) sees only an empty first mask, so this module adds the classic fixpoint:
a rule is *productive* when one of its alternatives needs only productive rules, terminals and optional
parts; the grammar accepts nothing when ``start`` is not productive.

It parses the subset of Lark that rules are written in (names, ``"strings"``, ``/regexes/``, groups ``( )``,
optional ``[ ]``, the modifiers ``? * +``, ``~ n`` / ``~ n..m``, llguidance's ``{n}`` / ``{n,m}``, aliases
``-> name``, ``?``/``!`` rule prefixes, ``.priority``, ``%`` directives and ``//`` comments). Anything it
does not recognise makes it answer "unknown" (None), never a false "empty": the engine stays the judge.
Terminals (upper-case names, imports, declarations) count as productive; a terminal that matches nothing
is the first-mask check's business.
"""
from __future__ import annotations

import re
from typing import Optional

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|//[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*"i?)
  | (?P<re>/(?:[^/\\\n]|\\.)+/[imslux]*)
  | (?P<arrow>->)
  | (?P<range>\.\.)
  | (?P<num>\d+)
  | (?P<name>[_A-Za-z][_A-Za-z0-9]*)
  | (?P<punct>[()\[\]|?*+~{},.])
""", re.X)
_DEF = re.compile(r"^[ \t]*[?!]?([_A-Za-z][_A-Za-z0-9]*)(?:\.-?\d+)?[ \t]*:(?!:)")


class _Unknown(Exception):
    """Syntax this checker does not model."""


def _tokens(text: str) -> list:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise _Unknown(text[pos:pos + 20])
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


class _Parser:
    """Expression trees: ("t",) a terminal, ("r", name) a rule, ("seq", [..]), ("alt", [..]) and ("opt",) for
    anything that may be left out (``[ ]``, ``?``, ``*``, zero repeats); ``+`` and ``{n,m}`` with n >= 1 keep
    the item as it is (one copy must finish)."""

    def __init__(self, toks):
        self.toks, self.i = toks, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self, value=None):
        tok = self.peek()
        if tok[0] is None or (value is not None and tok[1] != value):
            raise _Unknown(f"expected {value!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def alternatives(self, closer=None):
        alts = [self.sequence(closer)]
        while self.peek()[1] == "|":
            self.take("|")
            alts.append(self.sequence(closer))
        return ("alt", alts)

    def sequence(self, closer):
        items = []
        while True:
            kind, val = self.peek()
            if kind is None or val == "|" or (closer is not None and val == closer):
                break
            if kind == "arrow":  # an alias names the alternative: nothing to derive
                self.take()
                self.take()
                continue
            items.append(self.modified(self.atom()))
        return ("seq", items)

    def atom(self):
        kind, val = self.take()
        if kind in ("str", "re"):
            return ("t",)
        if kind == "name":
            return ("t",) if val.isupper() or val.startswith("_") and val[1:].isupper() else ("r", val)
        if val == "(":
            inner = self.alternatives(")")
            self.take(")")
            return inner
        if val == "[":
            self.alternatives("]")
            self.take("]")
            return ("opt",)
        raise _Unknown(val)

    def modified(self, item):
        while True:
            val = self.peek()[1]
            if val in ("?", "*"):
                self.take()
                item = ("opt",)
            elif val == "+":
                self.take()
            elif val == "~":
                self.take()
                low = int(self.take()[1])
                if self.peek()[0] == "range":
                    self.take()
                    self.take()
                item = ("opt",) if low == 0 else item
            elif val == "{":
                self.take()
                low = int(self.take()[1])
                if self.peek()[1] == ",":
                    self.take(",")
                    if self.peek()[0] == "num":
                        self.take()
                self.take("}")
                item = ("opt",) if low == 0 else item
            else:
                return item


def _productive(expr, known: set) -> bool:
    kind = expr[0]
    if kind in ("t", "opt"):
        return True
    if kind == "r":
        return expr[1] in known
    if kind == "seq":
        return all(_productive(e, known) for e in expr[1])
    return any(_productive(e, known) for e in expr[1])  # alt


def _rules(text: str) -> dict:
    """``{rule name: expression}`` for the lower-case rules of ``text`` (terminal definitions skipped)."""
    defs, cur = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("%"):
            if stripped.split()[0] not in ("%import", "%ignore", "%declare", "%override", "%extend"):
                raise _Unknown(stripped)
            cur = None
            continue
        m = _DEF.match(line)
        if m:
            cur = [m.group(1), line[m.end():]]
            defs.append(cur)
        elif stripped and not stripped.startswith("//"):
            if cur is None:
                raise _Unknown(stripped)
            cur[1] += "\n" + line
    rules = {}
    for name, body in defs:
        if name.isupper() or name.startswith("_") and name[1:].isupper():
            continue
        p = _Parser(_tokens(body))
        expr = p.alternatives()
        if p.peek()[0] is not None:
            raise _Unknown(p.peek()[1])
        rules[name] = ("alt", [expr, rules[name]]) if name in rules else expr
    return rules


def unproductive_start(text: str, start: str = "start") -> Optional[list]:
    """The rules that can never finish when ``start`` is among them (sorted names), ``[]`` when the grammar
    derives a finite string, None when the text uses syntax this checker does not model."""
    try:
        rules = _rules(text)
    except (_Unknown, ValueError):
        return None
    if start not in rules:
        return None
    for expr in rules.values():  # a reference to an undefined rule: leave it to the engine
        stack = [expr]
        while stack:
            e = stack.pop()
            if e[0] == "r" and e[1] not in rules:
                return None
            if e[0] in ("seq", "alt"):
                stack.extend(e[1])
    known: set = set()
    changed = True
    while changed:
        changed = False
        for name, expr in rules.items():
            if name not in known and _productive(expr, known):
                known.add(name)
                changed = True
    return [] if start in known else sorted(set(rules) - known)
