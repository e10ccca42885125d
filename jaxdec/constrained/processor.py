"""The constraint mask as a logits processor, and the host session that keeps one matcher per row.

`ConstraintMask` sits in the "mask" stage (before every penalty and warper, so truncation can never leave
a row without an allowed token). Each step it asks the host, through ONE ordered ``io_callback``, for an
int32 bitmask ``[B, T, ceil(V/32)]`` of all rows and block positions (T > 1: the nodes of a speculative
draft; a chain is masked with its tokens consumed in turn, a tree node by node along each node's path,
depth first, and the matcher rolled back), and unpacks it on device. Before filling, the callback
advances each row's matcher by the tokens committed since the last step (rows of token and speculative
decoders only grow); for beam search and stochastic beam search `ForkingConstraintMask` adds a
``post_commit`` hook that forks matchers on a beam reorder (``parent_rows``) and advances them. Rows
without a constraint get an all-ones mask.

The processor object is static configuration that compares equal across runs (only the vocabulary size),
so constrained runs share one compiled program; the matchers live in the active `Session`, set by
`generate` / `beam_search` for the duration of a run. If a matcher is ever out of step with its row's
committed tokens (``ctx.num_new``), it is rebuilt from the row's buffer, so the mask always follows the
tokens actually committed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxdec.constrained.engines import words
from jaxdec.core.logits import BANNED

# the active session: callbacks run on XLA's threads, so this is process-wide (one constrained run at a time)
_ACTIVE: list = [None]


def _active() -> "Session":
    s = _ACTIVE[0]
    if s is None:
        raise RuntimeError("ConstraintMask ran outside a constrained run: pass constraint= to generate() or "
                           "beam_search() instead of adding the processor yourself")
    return s


class Session:
    """Matchers of the rows of the running batch.

    units: per unit (prompt row of the driver) ``(engine, compiled)`` or None (unconstrained).
    expand: state rows per unit (beam search: num_beams).
    """

    def __init__(self, units: Sequence, expand: int = 1, enabled: bool = True):
        self.units = list(units)
        self.expand = int(expand)
        self.enabled = enabled  # False: masks are all ones (negative control), matchers still advance
        self.next_unit = 0
        self.rows: list = []
        self.matchers: list = []
        self.consumed: np.ndarray = np.zeros((0,), np.int64)
        self.mask_seconds: list = []  # host time of each mask callback
        self.resyncs = 0
        self.forced_tokens = 0  # tokens offered by ForcedTokensDrafter
        self.tree_masks = 0  # row blocks masked node by node (draft trees)

    # --- batches -----------------------------------------------------------------------------------
    def begin_batch(self, batch_rows: int) -> None:
        start = self.next_unit
        n_units = batch_rows // self.expand
        self.rows = [self.units[start + r // self.expand] if start + r // self.expand < len(self.units) else None
                     for r in range(batch_rows)]
        self.next_unit = start + n_units
        self.matchers = [None if u is None else u[0].matcher(u[1]) for u in self.rows]
        self.consumed = np.zeros((batch_rows,), np.int64)

    def _sync(self, b: int, tokens: np.ndarray, num_new: int) -> None:
        """Bring row b's matcher to the row's ``num_new`` committed tokens: advance it by the tokens
        committed since (rows only grow, except after a beam reorder, which `commit` handles), or rebuild
        it from the row's buffer when it is ahead."""
        have = int(self.consumed[b])
        if have == num_new:
            return
        m = self.matchers[b]
        if have > num_new or m is None:
            eng, comp = self.rows[b]
            m, have = eng.matcher(comp), 0
            self.resyncs += 1
        for t in tokens[b, have:num_new]:
            if not m.consume(int(t)):
                break
        self.matchers[b] = m
        self.consumed[b] = num_new

    # --- the two callbacks -------------------------------------------------------------------------
    def masks(self, w: int, tokens, num_new, parents, block, done) -> np.ndarray:
        t0 = time.perf_counter()
        b_, t_ = block.shape
        out = np.full((b_ * t_, w), -1, np.int32)
        if self.enabled:
            by_engine: dict = {}
            chain = np.arange(t_) - 1
            for b in range(min(b_, len(self.matchers))):
                m = self.matchers[b]
                if m is None or done[b]:
                    continue
                self._sync(b, tokens, int(num_new[b]))
                m = self.matchers[b]
                work = by_engine.setdefault(self.rows[b][0], ([], [], []))
                if t_ == 1:
                    work[0].append((m, b))
                elif np.array_equal(parents[b], chain):  # a chain draft: block[1:] in turn
                    work[1].append((m, b * t_, block[b, 1:]))
                else:  # a draft tree: each node masked by the matcher state along its path
                    work[2].append((m, b * t_, block[b], parents[b]))
                    self.tree_masks += 1
            for eng, (single, drafts, trees) in by_engine.items():
                eng.fill_batch(single, out)
                eng.fill_batch_draft(drafts, out)
                eng.fill_batch_tree(trees, out)
        self.mask_seconds.append(time.perf_counter() - t0)
        return out.reshape(b_, t_, w)

    def forced(self, tokens, num_new, done, n: int) -> np.ndarray:
        """[B, 1 + n]: per row the number of grammar-forced next tokens (at most n), then the tokens."""
        b_ = tokens.shape[0]
        out = np.zeros((b_, n + 1), np.int32)
        for b in range(min(b_, len(self.matchers))):
            if self.matchers[b] is None or done[b]:
                continue
            self._sync(b, tokens, int(num_new[b]))
            ff = [int(t) for t in self.matchers[b].forced()][:n]
            out[b, 0] = len(ff)
            out[b, 1:1 + len(ff)] = ff
            self.forced_tokens += len(ff)
        return out

    def commit(self, tokens, counts, parent_rows) -> None:
        n = len(self.matchers)
        if n == 0:
            return
        par = np.asarray(parent_rows)[:n]
        if not np.array_equal(par, np.arange(n)):
            used: set = set()
            new, cons = [], np.zeros_like(self.consumed)
            for b in range(n):
                p = int(par[b])
                m = self.matchers[p]
                if m is not None and p in used:
                    m = m.copy()
                used.add(p)
                new.append(m)
                cons[b] = self.consumed[p]
            # rows given their parent's original object must not share it with a later copy source
            self.matchers, self.consumed = new, cons
        for b in range(n):
            c = int(counts[b])
            m = self.matchers[b]
            if c <= 0 or m is None:
                continue
            for t in tokens[b, :c]:
                if not m.consume(int(t)):
                    break
            self.consumed[b] += c


@contextlib.contextmanager
def activate(session: Session):
    prev = _ACTIVE[0]
    _ACTIVE[0] = session
    try:
        yield session
    finally:
        _ACTIVE[0] = prev


def _mask_host(w, tokens, num_new, parents, block, done):
    return _active().masks(int(w), np.asarray(tokens), np.asarray(num_new), np.asarray(parents),
                           np.asarray(block), np.asarray(done))


def unpack_bits(bits, v: int):
    """int32 bitmask ``[..., W]`` -> bool ``[..., v]`` (bit ``i % 32`` of word ``i // 32``)."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    allowed = jnp.right_shift(bits[..., None], shifts) & 1
    return allowed.reshape(bits.shape[:-1] + (bits.shape[-1] * 32,))[..., :v].astype(bool)


@dataclasses.dataclass(frozen=True)
class ConstraintMask:
    """The grammar mask of every constrained row (see the module docstring). Added by
    ``generate(constraint=...)`` / ``beam_search(constraint=...)``; not a user processor.

    Rows that only grow (token and speculative decoders) need no post-commit callback: each mask callback
    first advances a row's matcher by the tokens committed since the last one (``ctx.tokens``), so a step
    costs one host round trip. `ForkingConstraintMask` adds the post-commit hook for beam search."""

    vocab_size: int
    stage = "mask"
    host = False

    def __call__(self, logits, ctx):
        b, t, v = logits.shape
        w = words(v)

        def cb(tokens, num_new, parents, block, done):
            return _mask_host(w, tokens, num_new, parents, block, done)

        bits = io_callback(cb, jax.ShapeDtypeStruct((b, t, w), jnp.int32), ctx.tokens, ctx.num_new, ctx.parents,
                           ctx.block, ctx.done, ordered=True)
        return jnp.where(unpack_bits(bits, v), logits, BANNED)


@dataclasses.dataclass(frozen=True)
class ForkingConstraintMask(ConstraintMask):
    """`ConstraintMask` with the post-commit hook: matchers follow beam reorders (``parent_rows``), each
    surviving beam forking its parent's matcher."""

    def post_commit(self, ctx, tokens, counts, parent_rows):
        _active().commit(np.asarray(tokens), np.asarray(counts), np.asarray(parent_rows))
