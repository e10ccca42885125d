"""Verifiers: given the target's output over a draft block, choose the accepted path and the next token.

Every verifier returns a `Verdict`:

* ``path [B, D+1]``: block indices of the accepted path, root first (entries past ``n_acc`` are 0);
* ``n_acc [B]``: accepted draft tokens (0 .. D);
* ``out [B, D+1]``: the tokens to emit, ``n_acc + 1`` of them: the accepted draft tokens, then the
  target's own token at the end of the path (the bonus token, or the correction after a rejection).

Verifiers:

* `greedy_verify` (trees): a node is accepted iff its parent is accepted and its token equals the
  target's (greedy) choice at the parent; the deepest accepted node wins (lowest block index on ties).
  Lossless for greedy decoding: the emitted tokens are exactly what greedy decoding would emit.
* `sampling_verify_chain` (chains): speculative sampling (Leviathan et al. 2023; Chen et al. 2023):
  accept draft token x with probability min(1, p(x)/q(x)); at the first rejection draw from the
  residual norm(max(p - q, 0)); after a full accept draw the bonus from p. Lossless for sampling: the
  emitted tokens follow the target distribution p exactly. A deterministic drafter (``q=None``) has
  q = one-hot(x). ``residual=False`` draws the correction from p instead of the residual: a *lossy*
  variant kept only as the negative control of the statistical tests.
* `sampling_verify_tree` (trees): recursive rejection sampling over siblings (SpecInfer's multi-round
  rule; with ``without_replacement=True`` the RSD rule for siblings drawn without replacement, where q
  is renormalized after each rejected sibling). Lossless for sampling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Verdict:
    path: jax.Array  # [B, D+1]
    n_acc: jax.Array  # [B]
    out: jax.Array  # [B, D+1]


def _full_parents(parents):
    b = parents.shape[0]
    return jnp.concatenate([jnp.zeros((b, 1), jnp.int32), parents.astype(jnp.int32)], axis=1)


def path_of(best, anc, depth, max_depth: int):
    """Block indices ``[B, D+1]`` of the path root -> best (ancestors of best ordered by depth)."""
    onpath = jnp.take_along_axis(anc, best[:, None, None], axis=1)[:, 0]  # [B,T]
    d = jnp.arange(max_depth + 1)
    sel = onpath[:, None, :] & (depth[:, None, :] == d[None, :, None])  # [B,D+1,T]
    return jnp.argmax(sel, axis=-1).astype(jnp.int32)


def assemble(block, path, n_acc, final_tok):
    """Tokens to emit: path tokens 1..n_acc then ``final_tok``."""
    ptok = jnp.take_along_axis(block, path, axis=1)  # [B,D+1]
    shifted = jnp.concatenate([ptok[:, 1:], jnp.zeros_like(ptok[:, :1])], axis=1)
    i = jnp.arange(path.shape[1])[None]
    return jnp.where(i < n_acc[:, None], shifted, jnp.where(i == n_acc[:, None], final_tok[:, None], 0)).astype(jnp.int32)


def greedy_verify(block, parents, valid, target, anc, depth, max_depth: int) -> Verdict:
    """block [B,T] tokens (root first); parents/valid [B,N]; target [B,T] the target's choice after each
    block node; anc [B,T,T] ancestor mask; depth [B,T]."""
    full = _full_parents(parents)
    b, t = block.shape
    parent_choice = jnp.take_along_axis(target, full[:, 1:], axis=1)  # [B,N]
    match = jnp.concatenate([jnp.ones((b, 1), bool), valid & (block[:, 1:] == parent_choice)], axis=1)
    acc = match
    for _ in range(max_depth):
        acc = match & jnp.take_along_axis(acc, full, axis=1)
        acc = acc.at[:, 0].set(True)
    score = jnp.where(acc, depth, -1)
    best = jnp.argmax(score, axis=1).astype(jnp.int32)
    n_acc = jnp.take_along_axis(depth, best[:, None], axis=1)[:, 0]
    path = path_of(best, anc, depth, max_depth)
    final = jnp.take_along_axis(target, best[:, None], axis=1)[:, 0]
    return Verdict(path, n_acc, assemble(block, path, n_acc, final))


def _residual(p, q):
    r = jnp.maximum(p - q, 0.0)
    s = r.sum(-1, keepdims=True)
    return jnp.where(s > 0, r / jnp.where(s > 0, s, 1.0), p)


def _draw(keys, probs):
    logits = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits).astype(jnp.int32)


def sampling_verify_chain(keys, block, valid, p, q=None, residual: bool = True) -> Verdict:
    """keys [B] typed keys; block [B,T] (T = N+1, a chain); valid [B,N]; p [B,T,V] target probabilities
    after each block node; q [B,N,V] draft distributions (None: deterministic drafts, q = one-hot)."""
    b, t = block.shape
    n = t - 1
    v = p.shape[-1]
    x = block[:, 1:]
    px = jnp.take_along_axis(p[:, :n], x[..., None], axis=-1)[..., 0]
    qx = jnp.ones_like(px) if q is None else jnp.take_along_axis(q, x[..., None], axis=-1)[..., 0]
    k_u, k_r = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(k_u)
    accept = valid & (u * qx < px)
    n_acc = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    p_r = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]  # [B,V]
    idx = jnp.minimum(n_acc, n - 1)
    rejected = (n_acc < n) & jnp.take_along_axis(valid, idx[:, None], axis=1)[:, 0]
    if q is None:
        q_r = jax.nn.one_hot(jnp.take_along_axis(x, idx[:, None], axis=1)[:, 0], v, dtype=p.dtype)
    else:
        q_r = jnp.take_along_axis(q, idx[:, None, None], axis=1)[:, 0]
    dist = jnp.where(rejected[:, None], _residual(p_r, q_r) if residual else p_r, p_r)
    final = _draw(k_r, dist)
    path = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    path = jnp.where(path <= n_acc[:, None], path, 0)
    return Verdict(path, n_acc, assemble(block, path, n_acc, final))


def sampling_verify_tree(keys, block, parents, valid, p, q, anc, depth, max_depth: int, max_children: int,
                         without_replacement: bool = False, residual: bool = True) -> Verdict:
    """Recursive rejection sampling down a tree. Siblings of a node must be drafted from the same draft
    distribution ``q`` (i.i.d., or without replacement when ``without_replacement``); ``q [B,N,V]`` is
    the distribution node i was drawn from (None: deterministic nodes, one-hot q). At the current node
    the children are tried in block order: child x is accepted with probability min(1, p(x)/q(x)); on
    rejection p <- norm(max(p - q, 0)) (and, without replacement, q <- q with x removed, renormalized).
    When every child is rejected (or there are none) the final token is drawn from the current p."""
    b, t = block.shape
    n = t - 1
    v = p.shape[-1]
    full = _full_parents(parents)
    is_child_slot = jnp.arange(1, t)[None, :]  # block indices of nodes
    cur = jnp.zeros((b,), jnp.int32)
    done = jnp.zeros((b,), bool)
    p_cur = p[:, 0]
    final_p = p_cur
    keys = jax.vmap(lambda k: jax.random.split(k, max_depth * max_children + 1))(keys)  # [B,S]
    slot = 0
    for _d in range(max_depth):
        # children of `cur` in block order: rank them
        is_child = (full[:, 1:] == cur[:, None]) & valid & (is_child_slot > cur[:, None])  # [B,N]
        order = jnp.cumsum(is_child, axis=1) - 1
        q_level = None
        accepted_any = jnp.zeros((b,), bool)
        nxt = cur
        for c in range(max_children):
            sel = is_child & (order == c)
            has = jnp.any(sel, axis=1) & ~done & ~accepted_any
            node = jnp.argmax(sel, axis=1)  # node index (0-based)
            x = jnp.take_along_axis(block[:, 1:], node[:, None], axis=1)[:, 0]
            if q is None:
                qn = jax.nn.one_hot(x, v, dtype=p.dtype)
            elif without_replacement and q_level is not None:
                qn = q_level
            else:
                qn = jnp.take_along_axis(q, node[:, None, None], axis=1)[:, 0]
            px = jnp.take_along_axis(p_cur, x[:, None], axis=1)[:, 0]
            qx = jnp.take_along_axis(qn, x[:, None], axis=1)[:, 0]
            u = jax.vmap(lambda k: jax.random.uniform(k))(keys[:, slot])
            slot += 1
            acc = has & (u * qx < px)
            rej = has & ~acc
            if residual:
                p_cur = jnp.where(rej[:, None], _residual(p_cur, qn), p_cur)
            if without_replacement and q is not None:
                q_rm = qn * (1.0 - jax.nn.one_hot(x, v, dtype=qn.dtype))
                s = q_rm.sum(-1, keepdims=True)
                q_level = jnp.where(s > 0, q_rm / jnp.where(s > 0, s, 1.0), qn)
            nxt = jnp.where(acc, node + 1, nxt)
            accepted_any = accepted_any | acc
        final_p = jnp.where((~done & ~accepted_any)[:, None], p_cur, final_p)
        done = done | ~accepted_any
        cur = jnp.where(done, cur, nxt).astype(jnp.int32)
        p_cur = jnp.where(done[:, None], p_cur, jnp.take_along_axis(p, cur[:, None, None], axis=1)[:, 0])
    final_p = jnp.where(done[:, None], final_p, p_cur)
    final = _draw(keys[:, -1], final_p)
    n_acc = jnp.take_along_axis(depth, cur[:, None], axis=1)[:, 0]
    path = path_of(cur, anc, depth, max_depth)
    return Verdict(path, n_acc, assemble(block, path, n_acc, final))
