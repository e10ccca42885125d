"""Grammar engines behind one interface: a compiled constraint gives per-row `Matcher`s that fill int32
token bitmasks (bit ``v % 32`` of word ``v // 32`` set = token v allowed), consume tokens, roll back and
copy themselves (beam forks).

Two engines:
* `LLGuidanceEngine` (``llguidance``): JSON schema, regex, Lark CFG, choices; batched mask fill on its own
  thread pool (``fill_next_token_bitmask_par``) and draft masks (``..._with_draft_tokens``).
* `OutlinesEngine` (``outlines-core``): regular languages (regex, choices, JSON schema through
  outlines-core's schema-to-regex); the matcher is a stack of DFA states of an ``Index``.

Both take our `jaxdec.models.tokenizer.Tokenizer` (byte-level BPE); EOS is the tokenizer's (model's)
first EOS id. A matcher that has consumed EOS is *stopped*; a matcher that consumed a token its grammar
does not allow is in *error* and allows only EOS (the row ends, ``constraint_ok`` is False).
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Optional, Sequence

import numpy as np

ENGINES = ("llguidance", "outlines")


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (invalid schema, regex, grammar; a language with no string)."""


def one_line(msg: str) -> str:
    """An engine's multi-line message as one line (CLI errors are one line)."""
    return " ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def words(vocab_size: int) -> int:
    return (int(vocab_size) + 31) // 32


def eos_only(vocab_size: int, eos: int) -> np.ndarray:
    m = np.zeros((words(vocab_size),), np.int32)
    m.view(np.uint32)[eos // 32] |= np.uint32(1) << np.uint32(eos % 32)
    return m


def mask_to_ids(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The allowed token ids of one int32 bitmask row."""
    bits = np.unpackbits(np.ascontiguousarray(mask).view(np.uint8), bitorder="little")[:vocab_size]
    return np.nonzero(bits)[0]


class Matcher:
    """One row's grammar state. Engines subclass it."""

    def fill(self, out: np.ndarray) -> None:
        """Write the next-token bitmask into ``out [W]`` int32."""
        raise NotImplementedError

    def consume(self, token: int) -> bool:
        raise NotImplementedError

    def try_consume(self, token: int) -> bool:
        """Consume ``token`` only if the grammar allows it now (a refused token leaves the matcher as it was,
        not in error: drafts are probed with this)."""
        raise NotImplementedError

    def rollback(self, n: int) -> None:
        raise NotImplementedError

    def copy(self) -> "Matcher":
        raise NotImplementedError

    def accepting(self) -> bool:
        """The tokens so far form a complete string of the language (EOS allowed now), or EOS was consumed
        after one."""
        raise NotImplementedError

    def stopped(self) -> bool:
        """Nothing but EOS may follow (EOS consumed, or the language has no longer string)."""
        raise NotImplementedError

    def error(self) -> bool:
        raise NotImplementedError

    def forced(self) -> list:
        """Tokens the grammar forces next (empty when the engine does not say)."""
        return []

    def fill_draft(self, draft: Sequence[int], out: np.ndarray) -> None:
        """Masks for the current position and after each prefix of ``draft``: ``out[0]`` now, ``out[i]``
        after ``draft[:i]``; positions after a draft token the grammar refuses are left as they are.
        The matcher ends where it started."""
        self.fill(out[0])
        done = 0
        for i, t in enumerate(draft):
            if self.stopped() or not self.try_consume(int(t)):
                break
            done += 1
            self.fill(out[i + 1])
        self.rollback(done)

    def fill_tree(self, block: Sequence[int], parents: Sequence[int], out: np.ndarray) -> None:
        """Per-node masks of a draft tree: ``block [T]`` (``block[0]`` the last committed token, already
        consumed), ``parents [T]`` each node's block parent (``parents[0] = -1``); ``out[t]`` gets the mask
        after the tokens on the path root -> t (``out[0]``: now). Nodes are visited depth first, so the
        matcher consumes and rolls back along shared prefixes; a node whose path holds a token the grammar
        refuses keeps its row of ``out`` (its token can never be accepted). The matcher ends where it
        started."""
        t_ = len(block)
        self.fill(out[0])

        def path(j):  # block indices root -> j (root excluded), None for a malformed parent chain
            walk = []
            while 0 < j < t_ and len(walk) < t_:
                walk.append(j)
                j = int(parents[j])
            return tuple(walk[::-1]) if j == 0 else None

        nodes = [(path(j), j) for j in range(1, t_)]
        cur: list = []  # block indices consumed along the current path
        for p, j in sorted(n for n in nodes if n[0] is not None):
            k = 0
            while k < min(len(cur), len(p)) and cur[k] == p[k]:
                k += 1
            self.rollback(len(cur) - k)
            del cur[k:]
            for i in p[k:]:
                if self.stopped() or not self.try_consume(int(block[i])):
                    break
                cur.append(i)
            if len(cur) == len(p):
                self.fill(out[j])
        self.rollback(len(cur))


class Engine:
    """compile(constraint) -> an opaque compiled grammar (cached by the constraint); matcher(compiled)."""

    name = "engine"

    def __init__(self, tokenizer, vocab_size: Optional[int] = None, eos: Optional[int] = None):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size or tokenizer.vocab_size)
        ids = tuple(getattr(tokenizer, "eos_ids", ()) or ())
        self.eos = int(eos if eos is not None else (ids[0] if ids else tokenizer.eos_id))
        self._cache: dict = {}
        self._lock = threading.Lock()

    def compile(self, constraint):
        key = constraint.key()
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._compile(constraint)
            return self._cache[key]

    def _compile(self, constraint):
        raise NotImplementedError

    def matcher(self, compiled) -> Matcher:
        raise NotImplementedError

    def fill_batch(self, items: list, out: np.ndarray) -> None:
        """``items``: [(matcher, row)] -> ``out[row] `` (``out [R, W]``) for each."""
        for m, r in items:
            m.fill(out[r])

    def fill_batch_draft(self, items: list, out: np.ndarray) -> None:
        """``items``: [(matcher, row, draft tokens)] -> masks at ``out[row + i]`` for i = 0..len(draft)."""
        for m, r, d in items:
            m.fill_draft(d, out[r:r + len(d) + 1])

    def fill_batch_tree(self, items: list, out: np.ndarray) -> None:
        """``items``: [(matcher, row, block [T], parents [T])] -> node masks at ``out[row + t]``."""
        for m, r, blk, par in items:
            m.fill_tree(blk, par, out[r:r + len(blk)])

    def check_language(self, compiled, who: str) -> None:
        """Raise when the language has no string at all (no first token and not accepting)."""
        m = self.matcher(compiled)
        out = np.zeros((words(self.vocab_size),), np.int32)
        m.fill(out)
        if m.error() or (not m.accepting() and not np.any(out)):
            raise ConstraintError(f"{who}: the grammar accepts no string (no token is allowed at the start)")
        if not m.accepting():
            ids = mask_to_ids(out, self.vocab_size)
            if len(ids) == 1 and int(ids[0]) == self.eos:
                raise ConstraintError(f"{who}: the grammar accepts no string (only EOS is allowed at the start, "
                                      "and the empty string is not in the language)")


# ---------------------------------------------------------------------------------------------------
# llguidance
# ---------------------------------------------------------------------------------------------------

class _LLMatcher(Matcher):
    __slots__ = ("m", "eng")

    def __init__(self, m, eng):
        self.m, self.eng = m, eng

    def fill(self, out):
        import llguidance.numpy as lln
        lln.fill_next_token_bitmask(self.m, out[None] if out.ndim == 1 else out, 0)

    def consume(self, token):
        return bool(self.m.consume_token(int(token)))

    def try_consume(self, token):
        return self.m.try_consume_tokens([int(token)]) == 1

    def rollback(self, n):
        if n:
            self.m.rollback(int(n))

    def copy(self):
        return _LLMatcher(self.m.deep_copy(), self.eng)

    def accepting(self):
        return bool(self.m.is_accepting()) and not self.m.is_error()

    def stopped(self):
        return bool(self.m.is_stopped())

    def error(self):
        return bool(self.m.is_error())

    def forced(self):
        return list(self.m.compute_ff_tokens())


class LLGuidanceEngine(Engine):
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size=None, eos=None, threads: Optional[int] = None):
        super().__init__(tokenizer, vocab_size, eos)
        import llguidance
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise ConstraintError(f"tokenizer: engine llguidance needs a tokenizer with a Hugging Face `tokenizers` "
                                  f"backend (exported as tokenizer JSON), got {type(tokenizer).__name__} without one")
        try:
            self.lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos)
        except Exception as e:  # noqa: BLE001 - the engine's own message says why
            raise ConstraintError(f"tokenizer: engine llguidance cannot use this tokenizer "
                                  f"({type(tokenizer).__name__}): {one_line(str(e))}") from None
        self.executor = llguidance.LLExecutor(threads)

    @staticmethod
    def grammar(constraint) -> str:
        """The llguidance grammar text of a constraint (no tokenizer needed)."""
        from llguidance import LLMatcher
        kind, src = constraint.kind, constraint.source
        if kind == "json_schema":
            try:
                # whitespace is not flexible: compact JSON keeps strings short and the model on track
                return LLMatcher.grammar_from_json_schema(src, defaults={"whitespace_flexible": False})
            except ValueError as e:
                raise ConstraintError(f"{constraint.who}: invalid JSON schema: {e}") from None
        if kind == "regex":
            return LLMatcher.grammar_from_regex(src)
        if kind == "choices":
            return LLMatcher.grammar_from_regex(choices_regex(src))
        if kind == "lark":
            return LLMatcher.grammar_from_lark(src)
        raise ConstraintError(f"llguidance: unknown constraint kind {kind!r}")

    def _compile(self, constraint):
        from llguidance import LLMatcher
        g = self.grammar(constraint)
        err = LLMatcher.validate_grammar(g, self.lltok)
        if err:
            what = {"json_schema": "JSON schema", "regex": "regex", "lark": "Lark grammar",
                    "choices": "choices"}[constraint.kind]
            raise ConstraintError(f"{constraint.who}: invalid {what}: {one_line(err)}")
        self.check_language(g, constraint.who)
        if constraint.kind == "lark":
            from jaxdec.constrained.lark_check import unproductive_start
            stuck = unproductive_start(constraint.text)
            if stuck:
                raise ConstraintError(f"{constraint.who}: the grammar accepts no string (rules {', '.join(stuck)} "
                                      "never finish: each of their derivations needs another copy of one of them)")
        return g

    def matcher(self, compiled):
        from llguidance import LLMatcher
        return _LLMatcher(LLMatcher(self.lltok, compiled, log_level=0), self)

    def fill_batch(self, items, out):
        import llguidance.numpy as lln
        if items:
            lln.fill_next_token_bitmask_par(self.executor, [(m.m, r) for m, r in items], out)

    def fill_batch_draft(self, items, out):
        import llguidance.numpy as lln
        if items:
            lln.fill_next_token_bitmask_par_with_draft_tokens(
                self.executor, [(m.m, r, [int(t) for t in d]) for m, r, d in items], out)


# ---------------------------------------------------------------------------------------------------
# outlines-core
# ---------------------------------------------------------------------------------------------------

_OC_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# outlines-core 0.2.14 builds its Index over regex-automata's DFA, whose match flag is delayed by one byte: a
# token whose walk ends in a live, non-accepting state is dropped when the text just before its last byte
# matched (the state carries the earlier match), e.g. "0" from the start of (00|11)*. We compile
# ``(R)SENTINEL`` instead: no real text before a token's last byte can match it (every match ends with the
# sentinel, which no real token can write: tokens holding its lead byte 0xF4 are left out of the
# vocabulary, i.e. the characters U+100000..U+10FFFF), so every live transition is kept; a fake token
# writes the sentinel, and a state accepts R when that token leads to an accepting state.
SENTINEL = "\U0010FFFF"
_SENTINEL_LEAD = SENTINEL.encode("utf-8")[:1]


class _OCCompiled:
    """An outlines-core Index of ``(R)SENTINEL`` with a mask cache and an acceptance cache per DFA state."""

    def __init__(self, index, vocab_size, eos, sentinel: int):
        self.index, self.vocab_size, self.eos, self.sentinel = index, vocab_size, eos, sentinel
        self.masks: dict = {}
        self.finals: dict = {}
        self.initial = index.get_initial_state()

    def is_final(self, state) -> bool:
        """Whether the text so far is in R (the sentinel leads to an accepting state of (R)SENTINEL)."""
        f = self.finals.get(state)
        if f is None:
            nxt = self.index.get_next_state(state, self.sentinel)
            f = self.finals[state] = nxt is not None and bool(self.index.is_final_state(nxt))
        return f

    def allowed(self, state) -> np.ndarray:
        """The real tokens allowed after ``state`` (EOS when R accepts the text so far)."""
        ids = np.asarray(self.index.get_allowed_tokens(state) or [], np.int64)
        ids = ids[(ids < self.vocab_size) & (ids != self.sentinel)]
        return np.append(ids, self.eos) if self.is_final(state) else ids

    def mask(self, state) -> np.ndarray:
        m = self.masks.get(state)
        if m is None:
            bits = np.zeros((words(self.vocab_size) * 32,), np.uint8)
            bits[self.allowed(state)] = 1
            m = np.packbits(bits, bitorder="little").view(np.int32)
            self.masks[state] = m
        return m


class _OCMatcher(Matcher):
    """A stack of DFA states (so rollback and copy are list operations). After EOS the top is
    ``"eos"``; after a refused token it is ``"error"``."""

    __slots__ = ("c", "stack")

    def __init__(self, c: _OCCompiled, stack=None):
        self.c = c
        self.stack = stack if stack is not None else [c.initial]

    def fill(self, out):
        top = self.stack[-1]
        if isinstance(top, str):
            out[...] = eos_only(self.c.vocab_size, self.c.eos)
        else:
            out[...] = self.c.mask(top)

    def _next(self, top, token):
        """The state after ``token`` (None: refused); never the sentinel."""
        if token == self.c.sentinel:
            return None
        return self.c.index.get_next_state(top, token)

    def consume(self, token):
        top = self.stack[-1]
        token = int(token)
        if isinstance(top, str):
            self.stack.append("error")
            return False
        if token == self.c.eos:
            ok = self.c.is_final(top)
            self.stack.append("eos" if ok else "error")
            return ok
        nxt = self._next(top, token)
        self.stack.append("error" if nxt is None else nxt)
        return nxt is not None

    def try_consume(self, token):
        top, token = self.stack[-1], int(token)
        if isinstance(top, str):
            return False
        if token == self.c.eos:
            return self.c.is_final(top) and self.consume(token)
        return self._next(top, token) is not None and self.consume(token)

    def rollback(self, n):
        if n:
            del self.stack[-int(n):]

    def copy(self):
        return _OCMatcher(self.c, list(self.stack))

    def accepting(self):
        top = self.stack[-1]
        return top == "eos" or (not isinstance(top, str) and self.c.is_final(top))

    def stopped(self):
        top = self.stack[-1]
        if isinstance(top, str):
            return True
        ids = self.c.allowed(top)
        return len(ids) == 1 and int(ids[0]) == self.c.eos

    def error(self):
        return self.stack[-1] == "error"


class OutlinesEngine(Engine):
    name = "outlines"

    def __init__(self, tokenizer, vocab_size=None, eos=None):
        super().__init__(tokenizer, vocab_size, eos)
        import outlines_core
        self.oc = outlines_core
        if not (hasattr(tokenizer, "id_bytes") and getattr(tokenizer, "is_byte_level", False)):
            raise ConstraintError(f"tokenizer: engine outlines needs a byte-level BPE tokenizer with id_bytes(), got "
                                  f"{type(tokenizer).__name__}; use engine='llguidance'")
        n = min(self.vocab_size, tokenizer.vocab_size)
        self.sentinel = max(self.vocab_size, tokenizer.vocab_size)  # a fake id: never in a mask
        try:
            self.vocab = _OC_VOCABS[tokenizer][n, self.eos]
        except (KeyError, TypeError):
            special = set(getattr(tokenizer, "special_ids", ()) or ())
            table: dict = {}
            for i in range(n):
                b = tokenizer.id_bytes(i)
                if i in special or i == self.eos or _SENTINEL_LEAD in b:
                    continue
                table.setdefault(b, []).append(i)
            table[SENTINEL.encode("utf-8")] = [self.sentinel]
            self.vocab = outlines_core.Vocabulary(self.eos, table)
            try:
                _OC_VOCABS.setdefault(tokenizer, {})[n, self.eos] = self.vocab
            except TypeError:
                pass

    def regex(self, constraint) -> str:
        kind, src = constraint.kind, constraint.source
        if kind == "regex":
            return src
        if kind == "choices":
            return choices_regex(src)
        if kind == "json_schema":
            try:
                return self.oc.json_schema.build_regex_from_schema(json.dumps(src), r"[ ]?")
            except Exception as e:  # noqa: BLE001
                raise ConstraintError(f"{constraint.who}: outlines cannot turn this JSON schema into a regex: "
                                      f"{e}") from None
        raise ConstraintError(f"{constraint.who}: the outlines engine handles regular languages only (regex, "
                              f"choices, json_schema), not {kind!r}; use engine='llguidance'")

    def _compile(self, constraint):
        rx = self.regex(constraint)
        try:
            index = self.oc.Index("(" + rx + ")" + SENTINEL, self.vocab)
        except Exception as e:  # noqa: BLE001
            raise ConstraintError(f"{constraint.who}: invalid regex for outlines: {one_line(str(e))}") from None
        c = _OCCompiled(index, self.vocab_size, self.eos, self.sentinel)
        self.check_language(c, constraint.who)
        return c

    def matcher(self, compiled):
        return _OCMatcher(compiled)


def choices_regex(choices: Sequence[str]) -> str:
    """A regex matching exactly one of the literal strings."""
    special = set("\\.^$|?*+()[]{}")
    return "(" + "|".join("".join("\\" + ch if ch in special else ch for ch in c) for c in choices) + ")"


_ENGINES: dict = {}


def get_engine(name: str, tokenizer, vocab_size: Optional[int] = None, eos: Optional[int] = None) -> Engine:
    """One engine object per (name, tokenizer, vocab, eos): tokenizer export and compiled grammars are
    reused across calls."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
    key = (name, id(tokenizer), vocab_size, eos)
    eng = _ENGINES.get(key)
    if eng is None or eng.tokenizer is not tokenizer:
        eng = (LLGuidanceEngine if name == "llguidance" else OutlinesEngine)(tokenizer, vocab_size, eos)
        _ENGINES[key] = eng
    return eng
