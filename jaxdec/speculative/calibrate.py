"""Hardware-aware draft budgets: measure what a target call over T tokens costs on this device, then
choose the draft tree that maximizes predicted tokens per unit of time.

    curve = measure_cost_curve(model, params)                 # {T: seconds}, relative costs too
    cfg = calibrate(model, params, rank_probs=...)             # a JSON-able dict
    tree = tree_from_config(cfg)                               # TreeSpec for TokenRecyclingDrafter(tree)

Decoding takes the saved config, so runs and tests stay deterministic; only `calibrate` measures.
The prediction for a tree of N nodes is τ(N) / c(N + 1) where τ is `TreeSpec.expected_accepted` under
per-rank acceptance probabilities (measured from a run's ``stats["rank_acceptance"]`` or given) and
c(T) is the measured call cost relative to T = 1 (draft cost is added for drafters that run a model).
"""
from __future__ import annotations

import json
import platform
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.speculative.tree import TreeSpec, ancestor_mask

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def measure_cost_curve(model, params, sizes: Sequence[int] = DEFAULT_SIZES, batch: int = 1, context: int = 128,
                       reps: int = 7) -> dict:
    """Seconds of one model call over T new tokens (tree mask, cache holding ``context`` tokens) for each
    T in ``sizes``: ``reps`` interleaved runs, the minimum kept (``seconds_median`` too); returns
    ``{"seconds": {T: s}, "relative": {T: s / s(1)}, ...}``."""
    sizes = sorted(set(int(s) for s in sizes) | {1})
    size = context + max(sizes) + 1

    @jax.jit
    def call(p, toks, cache, mask):
        t = toks.shape[1]
        pos = cache.lengths[:, None] + jnp.arange(t)[None]
        out = model(p, toks, pos, cache, mask=mask)
        # the updated cache is returned too: in a decode loop the block's keys/values are written, and
        # returning only the logits let XLA drop that write (15-20 % optimistic at T = 1-5, batch 1)
        return out.logits, out.cache

    cache = model.init_cache(batch, size)
    cache = cache.replace(lengths=jnp.full((batch,), context, jnp.int32))
    args = {}
    for t in sizes:
        toks = jnp.ones((batch, t), jnp.int32)
        mask = ancestor_mask(jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (batch, t - 1))) if t > 1 else None
        jax.block_until_ready(call(params, toks, cache, mask))  # compile
        args[t] = (toks, mask)
    runs = {t: [] for t in sizes}
    for _ in range(reps):  # interleaved, so load changes hit every size alike
        for t in sizes:
            t0 = time.perf_counter()
            jax.block_until_ready(call(params, args[t][0], cache, args[t][1]))
            runs[t].append(time.perf_counter() - t0)
    # the minimum is the least disturbed by other processes on a shared machine
    secs = {t: float(np.min(runs[t])) for t in sizes}
    median = {t: float(np.median(runs[t])) for t in sizes}
    return {"seconds": secs, "seconds_median": median, "relative": {t: secs[t] / secs[1] for t in sizes},
            "batch": batch, "context": context, "reps": reps,
            "device": str(jax.devices()[0]), "machine": platform.machine()}


def relative_cost(curve: dict, t: int) -> float:
    """Interpolated relative cost of a call over ``t`` tokens."""
    rel = {int(k): float(v) for k, v in curve["relative"].items()}
    xs = sorted(rel)
    return float(np.interp(t, xs, [rel[x] for x in xs]))


def choose_tree(curve: dict, rank_probs: Sequence[float], sizes: Sequence[int] = (2, 4, 6, 8, 12, 16, 24, 32, 48, 63),
                max_depth: int = 8, draft_cost: float = 0.0) -> tuple:
    """The tree size whose predicted speedup τ(N) / (c(N+1) + draft_cost) is largest. Returns
    (TreeSpec, predicted speedup, table of (N, τ, cost, speedup))."""
    table = []
    best = None
    for n in sizes:
        tree = TreeSpec.from_rank_probs(int(n), rank_probs, max_depth=max_depth)
        tau = tree.expected_accepted(rank_probs)
        cost = relative_cost(curve, n + 1) + draft_cost
        table.append((int(n), tau, cost, tau / cost))
        if best is None or tau / cost > best[1]:
            best = (tree, tau / cost)
    return best[0], best[1], table


def calibrate(model, params, rank_probs: Sequence[float], sizes=None, max_depth: int = 8, batch: int = 1,
              context: int = 128, curve: Optional[dict] = None) -> dict:
    """Measure the cost curve (unless given) and pick a tree; returns a JSON-able config."""
    curve = curve or measure_cost_curve(model, params, batch=batch, context=context)
    tree, speed, table = choose_tree(curve, rank_probs, **({"sizes": sizes} if sizes else {}), max_depth=max_depth)
    return {"cost_curve": {"relative": {str(k): v for k, v in curve["relative"].items()},
                           "seconds": {str(k): v for k, v in curve["seconds"].items()},
                           "batch": curve.get("batch"), "context": curve.get("context"), "device": curve.get("device")},
            "rank_probs": [float(p) for p in rank_probs],
            "tree": {"parents": list(tree.parents), "ranks": list(tree.ranks)},
            "predicted_speedup": float(speed), "candidates": [list(r) for r in table]}


def tree_from_config(cfg: dict) -> TreeSpec:
    t = cfg["tree"] if "tree" in cfg else cfg
    return TreeSpec(tuple(int(p) for p in t["parents"]), tuple(int(r) for r in t["ranks"]))


def save_config(cfg: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)


def load_config(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def tree_from_paths(paths, n: int, max_rank: int = 8) -> tuple:
    """The draft tree of at most ``n`` nodes that accepts the most, measured on examples.

    paths: int ``[A, D]``, for each of A held-out positions the sibling rank at depth d (0-based) of
    the token the target went on to produce (Medusa: the rank of the true token x_{t+2+d} among head
    d's candidates; a value < 0 or >= ``max_rank`` is a miss). A node (a rank path
    r_0..r_d) is accepted at a position iff the position's path starts with it, so a tree's τ there is
    1 + the number of its nodes on that path, and the best tree of n nodes is the n most frequent
    path prefixes (prefix-closed: a prefix is at least as frequent as any extension; ties go to the
    shallower, then lower-ranked node). Returns (TreeSpec or None when no prefix was ever right,
    predicted τ on these positions)."""
    paths = np.asarray(paths)
    if paths.ndim != 2 or paths.shape[0] == 0 or paths.shape[1] == 0:
        raise ValueError(f"paths must be a non-empty [positions, depth] array, got shape {paths.shape}")
    if n < 1:
        raise ValueError(f"tree size must be >= 1, got {n}")
    counts: dict = {}
    for row in paths.tolist():
        pre = ()
        for r in row:
            if not 0 <= r < max_rank:
                break
            pre = pre + (int(r),)
            counts[pre] = counts.get(pre, 0) + 1
    chosen = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:n]
    if not chosen:
        return None, 1.0
    chosen.sort(key=lambda p: (len(p), -counts[p], p))  # parents before children
    index = {(): 0}
    parents, ranks = [], []
    for i, p in enumerate(chosen):
        parents.append(index[p[:-1]])
        ranks.append(p[-1])
        index[p] = i + 1
    tau = 1.0 + sum(counts[p] for p in chosen) / paths.shape[0]
    return TreeSpec(tuple(parents), tuple(ranks)), float(tau)


def choose_tree_from_paths(curve: dict, paths, sizes: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
                           draft_cost: float = 0.0, max_rank: int = 8) -> tuple:
    """`tree_from_paths` for each size, keeping the one with the largest predicted speedup
    τ(N) / (c(N + 1) + draft_cost) on the measured cost curve. Returns (TreeSpec, predicted speedup,
    table of (N, nodes, τ, cost, speedup))."""
    best, table = None, []
    for n in sizes:
        tree, tau = tree_from_paths(paths, int(n), max_rank)
        if tree is None:
            continue
        cost = relative_cost(curve, tree.num_nodes + 1) + draft_cost
        table.append((int(n), tree.num_nodes, tau, cost, tau / cost))
        if best is None or tau / cost > best[1]:
            best = (tree, tau / cost)
    if best is None:
        raise ValueError("choose_tree_from_paths: no draft position was ever right (every path misses at depth 0)")
    return best[0], best[1], table
