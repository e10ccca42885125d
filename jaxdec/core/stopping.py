"""Stop strings: a host-side check called from inside the loop through `jax.pure_callback`.

Text is the host's business (tokenization is not a function of token ids alone), so the loop hands the
host each row's last `window` tokens and gets back a bool per row. Only decoders given stop strings
pay for the callback.
"""
from __future__ import annotations

import numpy as np


class StopStringChecker:
    """Callable `(tail_tokens[B, W] (-1 = none), num_new[B]) -> bool[B]`; hashable by identity."""

    def __init__(self, tokenizer, stop_strings):
        stop_strings = tuple(stop_strings)
        if not stop_strings or any((not isinstance(s, str)) or s == "" for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
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
    best = None
    for s in stop_strings:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return text if best is None else text[:best]
