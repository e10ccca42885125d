"""Stop strings: a host-side check called from inside the loop through `jax.pure_callback`.

Text is the host's business (tokenization is not a function of token ids alone), so the loop hands the
host each row's last `window` tokens and gets back a bool per row. Only decoders given stop strings
pay for the callback.
"""
from __future__ import annotations

import numpy as np


def as_stop_strings(stop_strings) -> tuple:
    """Validate ``stop_strings``: a sequence of non-empty str. A plain str is taken as ONE stop string
    (``stop_strings="answer"`` stops at "answer", not at its first letter)."""
    if stop_strings is None:
        return ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    if isinstance(stop_strings, (bytes, bytearray)):
        raise TypeError(f"stop_strings must be str (or a sequence of str), got {type(stop_strings).__name__}")
    try:
        stop_strings = tuple(stop_strings)
    except TypeError:
        raise TypeError(f"stop_strings must be a str or a sequence of str, got {type(stop_strings).__name__}") from None
    for i, s in enumerate(stop_strings):
        if not isinstance(s, str):
            raise TypeError(f"stop_strings[{i}] must be a str, got {type(s).__name__} {s!r}")
        if s == "":
            raise ValueError(f"stop_strings[{i}] is empty: stop strings must be non-empty")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"stop_strings[{i}] is not valid Unicode text (lone surrogate): {s!r}") from None
    return stop_strings


class StopStringChecker:
    """Callable `(tail_tokens[B, W] (-1 = none), num_new[B]) -> bool[B]`; hashable by identity."""

    def __init__(self, tokenizer, stop_strings):
        stop_strings = as_stop_strings(stop_strings)
        if not stop_strings:
            raise ValueError("stop_strings is empty: give at least one stop string")
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (pass tokenizer=...)")
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        # a stop string of n characters spans at most 4n byte-level tokens, plus one for a partial char
        self.window = 4 * max(len(s) for s in stop_strings) + 2

    def __call__(self, tail, num_new):
        tail = np.asarray(tail)
        out = np.zeros(tail.shape[0], bool)
        for r in range(tail.shape[0]):
            ids = [int(t) for t in tail[r] if t >= 0]
            if ids:
                text = self.tokenizer.decode(ids)
                out[r] = any(s in text for s in self.stop_strings)
        return out


def truncate_at_stop(text: str, stop_strings) -> str:
    """Text up to and including the first stop string (what `finish_reason == 'stop_string'` returns)."""
    stop_strings = as_stop_strings(stop_strings)
    best = None
    for s in stop_strings:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return text if best is None else text[:best]
