"""Choosing layers for self-speculation (SWIFT-style skip sets, DEL-style exit layers).

Both score a candidate by its *teacher-forced match rate*: one forward pass of the model with the
candidate layer mask over tokens the target already produced (prompt + greedy continuation), counting
how often its argmax equals the full model's argmax at the same positions. A match rate a with a chain
of k drafts gives an expected τ = (1 - a^(k+1)) / (1 - a) under independent acceptances.

* `swift_search`: random search over skip sets of a given size, then local swaps (SWIFT optimizes the
  skip set on the fly against already generated tokens with random search plus Bayesian optimization;
  here the search runs between decoding runs, on the host, and its result is a static config).
* `del_choose`: the exit layer E (layers >= E switched off) and draft length k that maximize the
  predicted speedup τ(a_E, k) / (c(k+1) + k·E/L) with the measured cost curve (DEL chooses exit layer
  and draft length from running per-layer acceptance; here from the same teacher-forced estimates).
The chosen mask feeds `LayerSkipDrafter(skip=...)` (or `DrafterCarry.skip_layers` without recompiling).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import bucket


def _forward_fn(model):
    @jax.jit
    def fwd(params, ids, layers):
        b, t = ids.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        out = model(params, ids, pos, model.init_cache(b, t), layers=layers)
        return jnp.argmax(out.logits, axis=-1)
    return fwd


class MatchScorer:
    """Teacher-forced argmax agreement of layer masks with the full model on fixed sequences."""

    def __init__(self, model, params, seqs: Sequence[Sequence[int]], starts: Sequence[int]):
        self.model, self.params = model, params
        t = bucket(max(len(s) for s in seqs))
        ids = np.zeros((len(seqs), t), np.int32)
        valid = np.zeros((len(seqs), t), bool)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            ids[i, :len(s)] = s
            valid[i, max(st - 1, 0):len(s) - 1] = True  # positions predicting generated tokens
        self.ids, self.valid = jnp.asarray(ids), valid
        self.fwd = _forward_fn(model)
        self.full = np.asarray(self.fwd(params, self.ids, jnp.ones((model.num_layers,), bool)))
        self.cache = {}

    def rate(self, layers_on) -> float:
        key = tuple(bool(x) for x in layers_on)
        if key not in self.cache:
            pred = np.asarray(self.fwd(self.params, self.ids, jnp.asarray(key)))
            self.cache[key] = float((pred == self.full)[self.valid].mean())
        return self.cache[key]


def expected_tau(a: float, k: int) -> float:
    a = min(max(a, 0.0), 1.0 - 1e-9)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def swift_search(scorer: MatchScorer, n_skip: int, n_random: int = 12, n_swaps: int = 12, keep_first: int = 2,
                 keep_last: int = 2, seed: int = 0) -> dict:
    """Find ``n_skip`` layers to skip with the highest match rate. Returns {"skip", "match_rate", "tried"}."""
    n = scorer.model.num_layers
    pool = list(range(keep_first, n - keep_last))
    if n_skip > len(pool):
        raise ValueError(f"cannot skip {n_skip} layers: only {len(pool)} are eligible")
    rng = np.random.default_rng(seed)

    def mask(skip):
        m = np.ones((n,), bool)
        m[list(skip)] = False
        return m

    # start from a contiguous block in the upper-middle layers (a common good prior), then random sets
    start = max(keep_first, (n - n_skip) // 2)
    cands = [tuple(range(start, start + n_skip))]
    cands += [tuple(sorted(rng.choice(pool, n_skip, replace=False).tolist())) for _ in range(n_random)]
    scored = [(scorer.rate(mask(c)), c) for c in cands]
    best_rate, best = max(scored)
    for _ in range(n_swaps):
        out_l = int(rng.choice(best))
        in_l = int(rng.choice([p for p in pool if p not in best]))
        c = tuple(sorted([x for x in best if x != out_l] + [in_l]))
        r = scorer.rate(mask(c))
        if r > best_rate:
            best_rate, best = r, c
    return {"skip": best, "match_rate": best_rate, "tried": len(scorer.cache)}


def del_choose(scorer: MatchScorer, curve: dict, exits: Sequence[int], max_k: int = 6) -> dict:
    """Exit layer and draft length maximizing predicted speedup. Returns the table and the choice."""
    from jaxdec.speculative.calibrate import relative_cost
    n = scorer.model.num_layers
    table = []
    for e in exits:
        m = np.arange(n) < e
        a = scorer.rate(m)
        for k in range(1, max_k + 1):
            tau = expected_tau(a, k)
            cost = relative_cost(curve, k + 1) + k * e / n
            table.append({"exit": int(e), "k": k, "match_rate": a, "tau": tau, "speedup": tau / cost})
    best = max(table, key=lambda r: r["speedup"])
    return {"exit": best["exit"], "k": best["k"], "skip": tuple(range(best["exit"], n)), "predicted": best,
            "table": table}
