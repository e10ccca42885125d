"""Static-shaped draft trees.

A draft of N nodes is verified as a block of ``T = N + 1`` tokens: block index 0 is the *root* (the
row's last emitted token, not yet in the cache) and draft node ``i`` sits at block index ``i + 1``.
``parents[i]`` is the block index of node ``i``'s parent (``0`` = the root) and is always smaller than
``i + 1``, so nodes are topologically ordered. A chain is the tree whose node ``i`` has parent ``i``.

* `TreeSpec`: a static (hashable) tree template: parents, the rank of each node among its siblings
  (which top-k candidate it takes) and derived depths; built as a chain, from per-depth widths, or
  best-first from per-rank acceptance probabilities (`TreeSpec.from_rank_probs`, the Sequoia/PPD-style
  "expected accepted length" tree).
* `Draft`: what a drafter proposes for a batch: node tokens ``[B,N]``, parents ``[B,N]`` (block
  indices; static templates are broadcast), a validity flag ``[B,N]`` (invalid nodes are never
  accepted, so a drafter can propose fewer than N tokens), the draft probability of each node token
  ``[B,N]`` and, for sampling verifiers that need them, the draft distributions ``q [B,N,V]`` each
  node token was drawn from.
* `ancestor_mask`, `block_depths`: the tree attention mask ``[B,T,T]`` (ancestor-or-self) and depths
  ``[B,T]`` computed in-graph from parents, so per-row trees cost nothing extra.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Draft:
    tokens: jax.Array  # [B,N] int32
    parents: jax.Array  # [B,N] int32 block indices (0 = root)
    valid: jax.Array  # [B,N] bool
    probs: Optional[jax.Array] = None  # [B,N] draft probability of each node token (None: deterministic)
    q: Optional[jax.Array] = None  # [B,N,V] draft distribution each node token was drawn from
    calls: Optional[jax.Array] = None  # [] draft model calls made (None: the drafter's static count)

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """A static tree template. ``parents[i]``: block index of node i's parent (0 = root, < i + 1);
    ``ranks[i]``: which candidate (0 = best) of its parent node i takes."""

    parents: tuple
    ranks: tuple

    def __post_init__(self):
        if len(self.parents) == 0:
            raise ValueError("a draft tree needs at least one node (draft length 0 is not allowed)")
        if len(self.parents) != len(self.ranks):
            raise ValueError("parents and ranks must have the same length")
        for i, p in enumerate(self.parents):
            if not 0 <= p <= i:
                raise ValueError(f"node {i}: parent block index {p} must be in [0, {i}] (topological order)")
        seen = set()
        for p, r in zip(self.parents, self.ranks):
            if (p, r) in seen:
                raise ValueError(f"two children of block node {p} take the same rank {r}")
            seen.add((p, r))

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def depths(self) -> tuple:
        """Depth of every block index (root 0)."""
        d = [0]
        for p in self.parents:
            d.append(d[p] + 1)
        return tuple(d)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def max_branching(self) -> int:
        counts = np.bincount(np.asarray(self.parents), minlength=self.num_nodes + 1)
        return int(counts.max())

    def parents_array(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(jnp.asarray(self.parents, jnp.int32), (batch, self.num_nodes))

    @classmethod
    def chain(cls, n: int) -> "TreeSpec":
        if n < 1:
            raise ValueError(f"draft length must be >= 1, got {n}")
        return cls(tuple(range(n)), (0,) * n)

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> "TreeSpec":
        """Every node at depth d (1-based) has ``widths[d]`` children (``widths[0]`` children of the root).
        E.g. ``(4, 2, 1)`` = 4 + 8 + 8 nodes."""
        parents, ranks, level = [], [], [0]
        for w in widths:
            nxt = []
            for p in level:
                for r in range(w):
                    parents.append(p)
                    ranks.append(r)
                    nxt.append(len(parents))
            level = nxt
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def from_rank_probs(cls, n: int, rank_probs: Sequence[float], max_depth: int = 16,
                        depth_decay: float = 1.0) -> "TreeSpec":
        """Best-first tree of ``n`` nodes maximizing the expected accepted length when the candidate of
        rank r is accepted with probability ``rank_probs[r]`` (times ``depth_decay`` per level): a node's
        value is the product along its path, so greedily taking the n most valuable nodes gives a valid
        tree (a child is never worth more than its parent)."""
        if n < 1:
            raise ValueError(f"tree size must be >= 1, got {n}")
        probs = [float(p) for p in rank_probs]
        if not probs or any(not 0 < p <= 1 for p in probs):
            raise ValueError("rank_probs must be a non-empty list of probabilities in (0, 1]")
        heap = [(-probs[0], (0,))]
        chosen = []
        counter = 0
        while heap and len(chosen) < n:
            negv, path = heapq.heappop(heap)
            chosen.append((path, -negv))
            v = -negv
            # next sibling (same parent, next rank) and first child
            if path[-1] + 1 < len(probs):
                sib = path[:-1] + (path[-1] + 1,)
                sv = v / probs[path[-1]] * probs[path[-1] + 1]
                heapq.heappush(heap, (-sv, sib))
            if len(path) < max_depth:
                heapq.heappush(heap, (-(v * probs[0] * depth_decay), path + (0,)))
            counter += 1
        # order by depth then by value so parents come first
        chosen.sort(key=lambda pv: (len(pv[0]), -pv[1], pv[0]))
        index = {(): 0}
        parents, ranks = [], []
        for i, (path, _) in enumerate(chosen):
            parents.append(index[path[:-1]])
            ranks.append(path[-1])
            index[path] = i + 1
        return cls(tuple(parents), tuple(ranks))

    def expected_accepted(self, rank_probs: Sequence[float]) -> float:
        """1 + sum of node values under the independent per-rank acceptance model (τ prediction)."""
        val = [1.0]
        for p, r in zip(self.parents, self.ranks):
            val.append(val[p] * (rank_probs[r] if r < len(rank_probs) else 0.0))
        return float(sum(val))


def ancestor_mask(parents: jax.Array) -> jax.Array:
    """Tree attention mask ``[B,T,T]`` (T = N+1): ``m[b,i,j]`` iff block j is an ancestor of i or i itself."""
    b, n = parents.shape
    t = n + 1
    full = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), parents.astype(jnp.int32)], axis=1)  # root -> 0
    direct = jax.nn.one_hot(full, t, dtype=jnp.float32)  # [B,T,T] i -> parent(i)
    direct = direct.at[:, 0, 0].set(0.0)
    reach = jnp.eye(t, dtype=jnp.float32)[None] + direct
    # transitive closure by squaring: paths of length up to 2^k
    steps = max(1, int(np.ceil(np.log2(max(t, 2)))))
    for _ in range(steps):
        reach = jnp.minimum(jnp.einsum("bij,bjk->bik", reach, reach), 1.0)
    return reach > 0


def block_depths(parents: jax.Array, max_depth: int) -> jax.Array:
    """Depth ``[B,T]`` of every block index (root 0), for trees no deeper than ``max_depth``."""
    b, n = parents.shape
    full = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), parents.astype(jnp.int32)], axis=1)
    depth = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.ones((b, n), jnp.int32)], axis=1)
    for _ in range(max_depth - 1):
        depth = jnp.where(jnp.arange(n + 1)[None] == 0, 0, jnp.take_along_axis(depth, full, axis=1) + 1)
    return depth
