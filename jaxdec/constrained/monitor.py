"""Monitors (monitor-guided decoding, Agrawal et al. 2023, "Guiding Language Models of Code with Global
Context using Monitors"): a user object watches each row's output and, at trigger points, restricts the next
tokens to what a static analysis allows.

A `Monitor` has three hooks::

    pre(text) -> state | None       # after every committed token (and before the first): the row's output text
                                    # so far; a state when the monitor triggers here, else None (dormant)
    maskgen(state) -> allowed       # bool [V] or token ids the next token may be (None: no restriction)
    update(state, token) -> state | None   # a token was committed while active; None: dormant again

`MonitorProcessor(monitor)` runs them as a host logits processor ("mask" stage, one ordered host callback
per step for every row, rows batched), with any decoder that takes ``processors=``: every block node of a
speculative draft gets the state along its path (monitored speculative decoding equals monitored greedy),
and a row whose committed tokens are not an extension of what it held at the last call (a new run, a
reordered beam) is replayed from its start. States must be immutable values (they are replayed along
draft paths), so nothing needs resetting between runs.

`JediMonitor(context, tokenizer)`: after ``name.`` (an identifier, ``)`` or ``]`` then a dot, in the code or
inside one token such as ``.bal``) the next identifier must be one that `jedi` completes there over
``context + output`` (the code the user passes, typically the prompt's code), spelled over as many tokens
as the model likes; a token that ends the identifier is allowed only once the identifier is complete.
Where jedi finds no completion the monitor stays dormant (no restriction).

    mon = MonitorProcessor(JediMonitor(code, m.tokenizer))
    g = jaxdec.generate(m.model, m.params, [m.tokenizer.encode(code)], processors=[mon], tokenizer=m.tokenizer)
    mon.stats()   # triggers, host seconds per step
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import NamedTuple, Optional

import numpy as np

from jaxdec.core.logits import BANNED


class Monitor:
    """The three hooks (see the module docstring); subclass and override."""

    def pre(self, text: str):
        return None

    def maskgen(self, state):
        return None

    def update(self, state, token: int):
        return None


@dataclasses.dataclass(frozen=True, eq=False)
class MonitorProcessor:
    """A `Monitor` as a host logits processor. Compares by identity (static configuration: reuse one
    object across calls to reuse the compiled program). ``decode(ids) -> str`` defaults to the monitor's
    ``tokenizer.decode``."""

    monitor: Monitor
    stage = "mask"
    host = True
    _rows: dict = dataclasses.field(default_factory=dict, repr=False)
    _log: dict = dataclasses.field(default_factory=lambda: {"seconds": [], "triggers": 0, "masked": 0}, repr=False)

    def __post_init__(self):
        name = type(self.monitor).__name__
        for hook in ("pre", "maskgen", "update"):
            if not callable(getattr(self.monitor, hook, None)):
                raise TypeError(f"MonitorProcessor: monitor ({name}) needs a callable {hook}(); see jaxdec.constrained."
                                "monitor.Monitor")
        if not callable(getattr(getattr(self.monitor, "tokenizer", None), "decode", None)):
            raise TypeError(f"MonitorProcessor: monitor ({name}) needs a tokenizer attribute with decode(ids) to "
                            "read the rows' text")

    def _text(self, ids) -> str:
        return self.monitor.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    def _after(self, state, ids: list):
        """The state after the last of ``ids`` (the row's output so far) was committed."""
        if state is not None:
            state = self.monitor.update(state, int(ids[-1]))
        if state is None:
            state = self.monitor.pre(self._text(ids))
            self._log["triggers"] += state is not None
        return state

    def _row_state(self, b: int, toks: np.ndarray):
        """Row b's state after its committed tokens ``toks``: advanced from the last call's when the row
        grew from what it held then, else (a new run, a reordered beam) replayed from the start."""
        ids = [int(t) for t in toks]
        rec = self._rows.get(b)
        if rec is None or len(rec[0]) > len(ids) or ids[:len(rec[0])] != rec[0]:
            rec = ([], self.monitor.pre(self._text([])))
            self._log["triggers"] += rec[1] is not None
        have, state = len(rec[0]), rec[1]
        for i in range(have, len(ids)):
            state = self._after(state, ids[:i + 1])
        self._rows[b] = (ids, state)
        return state, ids

    def _apply(self, row_logits: np.ndarray, state) -> None:
        allowed = self.monitor.maskgen(state) if state is not None else None
        if allowed is None:
            return
        allowed = np.asarray(allowed)
        keep = allowed if allowed.dtype == bool else np.isin(np.arange(row_logits.shape[-1]), allowed)
        if not keep.any():  # nothing the analysis allows fits the vocabulary: leave the row free
            return
        row_logits[~keep[:row_logits.shape[-1]]] = BANNED
        self._log["masked"] += 1

    def __call__(self, logits, ctx):
        t0 = time.perf_counter()
        x = np.array(logits, np.float32)
        b_, t_, _ = x.shape
        for b in range(b_):
            if ctx.done[b]:
                continue
            state, ids = self._row_state(b, ctx.tokens[b, :int(ctx.num_new[b])])
            self._apply(x[b, 0], state)
            if t_ > 1:  # a speculative block: each node's state along its path from the root
                node = {0: state}
                for t in range(1, t_):
                    p = int(ctx.parents[b, t])
                    if not 0 <= p < t or p not in node:
                        continue
                    path, j = [], t
                    while j > 0:
                        path.append(int(ctx.block[b, j]))
                        j = int(ctx.parents[b, j])
                    node[t] = self._after(node[p], ids + path[::-1])
                    self._apply(x[b, t], node[t])
        self._log["seconds"].append(time.perf_counter() - t0)
        return x

    def stats(self) -> dict:
        s = np.asarray(self._log["seconds"] or [0.0])
        return {"monitor_calls": len(self._log["seconds"]), "monitor_triggers": self._log["triggers"],
                "monitor_masked_rows": self._log["masked"], "monitor_seconds_mean": float(s.mean()),
                "monitor_seconds_p99": float(np.percentile(s, 99))}


# -------------------------------------------------------------------------------------------- jedi
_IDENT = re.compile(r"[A-Za-z0-9_]*")
_TRIGGER = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|\)|\])\.([A-Za-z0-9_]*)$")  # `obj.` + what follows of a name


class _Active(NamedTuple):
    names: frozenset  # the identifiers jedi completes at the trigger
    partial: str  # what the model has written of the identifier so far


class JediMonitor(Monitor):
    """Identifiers after ``obj.`` restricted to jedi's completions over ``context + output``.

    context: the code the output continues (usually the prompt's text). tokenizer: gives each token's
    text (``id_bytes`` or ``decode``) and decodes the rows. private: keep names starting with ``_``
    (jedi lists dunders of every object; by default they are dropped unless the model has typed ``_``)."""

    def __init__(self, context: str, tokenizer, vocab_size: Optional[int] = None, private: bool = False):
        try:
            import jedi
        except ImportError as e:  # pragma: no cover - jedi is a test dependency
            raise ImportError("JediMonitor needs the jedi package (pip install jedi)") from e
        if not isinstance(context, str):
            raise TypeError(f"JediMonitor: context must be the code text (str), got {type(context).__name__}")
        self.jedi = jedi
        self.context, self.tokenizer, self.private = context, tokenizer, bool(private)
        v = int(vocab_size or tokenizer.vocab_size)
        self.vocab_size = v
        pure: dict = {}  # identifier text -> ids of tokens that are exactly that text
        ends: dict = {}  # identifier-prefix text -> ids of tokens that start with it and then end it
        for i in range(v):
            s = self._token_text(i)
            lead = _IDENT.match(s).group(0)
            (pure if s and lead == s else ends).setdefault(lead, []).append(i)
        self.pure = {k: np.asarray(ids, np.int64) for k, ids in pure.items()}
        self.ends = {k: np.asarray(ids, np.int64) for k, ids in ends.items()}
        self.is_pure = np.zeros((v,), bool)
        for ids in self.pure.values():
            self.is_pure[ids] = True
        self._completions: dict = {}
        self.jedi_seconds: list = []

    def _token_text(self, i: int) -> str:
        special = set(getattr(self.tokenizer, "special_ids", ()) or ())
        if i in special:
            return ""
        if hasattr(self.tokenizer, "id_bytes"):
            return self.tokenizer.id_bytes(i).decode("utf-8", errors="replace")
        return self.tokenizer.decode([i])

    def completions(self, source: str) -> frozenset:
        """The attribute names jedi completes at the end of ``source`` (cached)."""
        got = self._completions.get(source)
        if got is None:
            t0 = time.perf_counter()
            lines = source.split("\n")
            try:
                found = self.jedi.Script(source).complete(len(lines), len(lines[-1]))
                got = frozenset(c.name for c in found if c.name.isidentifier())
            except Exception:  # noqa: BLE001 - code jedi cannot analyse: no restriction
                got = frozenset()
            self.jedi_seconds.append(time.perf_counter() - t0)
            self._completions[source] = got
        return got

    def pre(self, text):
        src = self.context + text
        hit = _TRIGGER.search(src)
        if hit is None:
            return None
        partial = hit.group(1)  # a token may carry the dot and the name's first characters (".bal")
        names = self.completions(src[:len(src) - len(partial)])
        if not (self.private or partial.startswith("_")):
            names = frozenset(n for n in names if not n.startswith("_")) or names
        names = frozenset(n for n in names if n.startswith(partial))
        return _Active(names, partial) if names else None  # none fits what is written: nothing to guide

    def update(self, state, token):
        if not self.is_pure[int(token)]:
            return None  # the token ended the identifier
        return state._replace(partial=state.partial + self._token_text(int(token)))

    def maskgen(self, state):
        keep = np.zeros((self.vocab_size,), bool)
        p = state.partial
        for name in state.names:
            if not name.startswith(p):
                continue
            rest = name[len(p):]
            for k in range(1, len(rest) + 1):  # tokens that continue the identifier
                ids = self.pure.get(rest[:k])
                if ids is not None:
                    keep[ids] = True
            ids = self.ends.get(rest)  # tokens that finish it and go on with other characters
            if ids is not None:
                keep[ids] = True
        return keep
