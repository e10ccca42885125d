"""The shared near-tie helper of DESIGN.md's conventions.

A token sequence may differ from the reference only at a near tie: the first divergence is excused
where the reference's top-2 logit margin at that step is below max(1e-3, 10 x the measured max |dlogit|).
At most 10 % of the compared sequences may be excused, and each excused case is reported.
"""
from __future__ import annotations

import numpy as np


def first_divergence(a, b) -> int | None:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return None if len(a) == len(b) else n


def top2_margin(logits_row) -> float:
    top = np.sort(np.asarray(logits_row, np.float64))[-2:]
    return float(top[1] - top[0])


def compare(ours, ref, ref_step_logits, max_dlogit: float, label: str = ""):
    """Compare one sequence. Returns (ok, excused, message). `ref_step_logits[i]` are the reference's
    logits that chose `ref[i]` (read only at a divergence, so a lazy sequence works); `max_dlogit` is a
    float or a callable returning it (called only at a divergence)."""
    i = first_divergence(list(ours), list(ref))
    if i is None:
        return True, False, ""
    if i >= len(ref) or i >= len(ref_step_logits):
        return False, False, f"{label}: lengths differ at {i} (ours {len(ours)}, ref {len(ref)})"
    margin = top2_margin(ref_step_logits[i])
    if callable(max_dlogit):  # measured lazily: only a divergence needs it
        max_dlogit = max_dlogit()
    bound = max(1e-3, 10.0 * max_dlogit)
    msg = f"{label}: first divergence at step {i} (ours {ours[i]} vs ref {ref[i]}), ref top-2 margin {margin:.3g}, bound {bound:.3g}"
    return margin < bound, margin < bound, msg


def assert_sequences_match(pairs, max_dlogit: float, max_excused_frac: float = 0.10, report=print):
    """pairs: iterable of (label, ours, ref, ref_step_logits). Fails on any non-excused difference or
    when more than `max_excused_frac` of sequences needed excusing."""
    pairs = list(pairs)
    failures, excused = [], []
    for label, ours, ref, ref_logits in pairs:
        ok, exc, msg = compare(ours, ref, ref_logits, max_dlogit, label)
        if not ok:
            failures.append(msg)
        elif exc:
            excused.append(msg)
    for m in excused:
        report("near-tie excused: " + m)
    assert not failures, "token mismatches not excused by a near tie:\n" + "\n".join(failures)
    assert len(excused) <= max_excused_frac * len(pairs), (
        f"{len(excused)} of {len(pairs)} sequences needed a near-tie excuse (> {max_excused_frac:.0%})")
    return excused
