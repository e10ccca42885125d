"""Masked-diffusion samplers: each one jitted `lax.while_loop` over (canvas, mask, step, method state).

A sampler sees the model only through ``logits_fn(aux, canvas [B,T]) -> logits [B,T,V]`` (``aux``: a
pytree of arrays passed through, e.g. the params), so every rule is testable on hand-made logits.
A row of the canvas is ``prompt (P_i) | generation window (G_i, starts as [MASK]) | [PAD]``; rows have
their own P_i and G_i. Each step makes one model call for the whole batch, predicts ``x0 = argmax``
at every position ([MASK] and [PAD] are never predicted) and commits some still-masked positions of the
row's current block to their ``x0``; the loop ends when no row has a masked position.

Schedules (``SamplerConfig.name``):

* ``one-per-step``: the top-1-probability position of the current block, one token per call (the
  baseline every parallel schedule is compared with; FreeDave reproduces it exactly).
* ``llada-low-confidence`` / ``llada-random`` (LLaDA): a fixed number of tokens per step, the
  highest-probability (or uniformly random) masked positions; ``steps`` per row, a block of length
  ``b`` gets ``ceil(steps * b / G)`` of them and commits ``ceil(masked left in block / steps left)``
  per step (LLaDA's linear schedule, remainder first).
* ``dream-maskgit-plus`` / ``dream-topk-margin`` / ``dream-entropy`` (Dream's orders): the same
  schedule ordered by top-1 probability, top-1 minus top-2 probability, or negative entropy.
* ``fast-dllm-threshold`` (Fast-dLLM): every masked position of the block whose top-1 probability is
  ``> threshold``, and always the top one. ``fast-dllm-factor``: the n most confident where the i-th
  (1-based, descending) has probability ``>= 1 - factor / (i + 1)`` for every i <= n (n >= 1).
* ``freedave`` (Free Draft-and-Verification): drafts the next ``drafts`` one-per-step commits from the
  current logits (block order, then confidence), scores all drafts in ONE batched call, and keeps the
  longest prefix the one-per-step rule would have chosen on the drafts' own logits: its tokens equal
  ``one-per-step``'s exactly, in fewer calls (the accepted draft's logits start the next round).
* ``localleap`` (LocalLeap): anchors are masked positions with probability ``>= threshold``; positions
  within ``radius`` of an anchor are committed at the relaxed ``relaxed_threshold``; the top one always.
* ``credit`` (CreditDecoding): a per-position, per-token credit ``C <- credit_decay * C + p * onehot(x0)``
  accumulated over steps; the threshold rule runs on ``logits + credit_weight * log(1 + C_prev)``
  (the history before this step, so step 1 equals ``fast-dllm-threshold``).
* ``adablock`` (AdaBlock-dLLM): when a block is finished the next one starts at the first masked
  position and ends at the first position in the following ``block_length`` whose prediction is a
  delimiter (``delimiters``) with probability ``>= delimiter_threshold`` (inclusive), else after
  ``block_length``; inside it the threshold rule.
* ``ccd`` (coherent contextual decoding): a position is committed when its argmax has stayed the same
  for the last ``ccd_window`` steps and the geometric mean of its probability over them is
  ``>= threshold``; the top one always (the budget adapts to how many predictions agree).
* ``learn2pd`` (Learn2PD, `jaxdec.diffusion.learn2pd`): a learned filter's probability that the current
  prediction is already final, ``>= threshold``, commits (the top one always); ``filter_params`` are passed
  to `sample`; with ``eot`` (End-of-Text Prediction, needs ``eos_id``) a row's masked positions after its
  first committed [EOS] become [EOS] in the same call.
* ``remask`` (secondary remasking, Discrete Diffusion VLA): the low-confidence schedule, and a token
  committed at an earlier step whose probability under the current logits fell below
  ``remask_threshold`` goes back to [MASK] (once per position, so the loop ends).

Caches (``cache``, Fast-dLLM; fixed blocks only): ``"prefix"``: when a row enters a new block one full
call also returns every position's keys/values (``logits_fn.full``); the block's later steps recompute only
each row's current block (``logits_fn.block``), attending to the cached keys/values of the positions
before it; ``"dual"``: also to the cached keys/values after the block. Approximate (the cache is as of the
block's first step); stats add ``full_calls`` and ``block_calls``.

``sample(...)`` returns ``(tokens [B, max G] numpy, stats)``; stats: ``model_calls`` (per row),
``batch_calls``, ``committed_per_call`` (per row, one count per call), ``tokens_per_call``,
``commit_step [B, max G]`` (the call at which each position was last committed) and, for FreeDave,
``forward_rows`` (rows scored: drafts x calls). ``temperature`` 0 (default) is greedy: ties go to the lowest
position and the lowest token id. ``temperature > 0`` samples every position's x0 from
``softmax(logits / temperature)`` (Gumbel-max, a key per row and call: ``fold_in(fold_in(key(seed),
call), row)``); the confidence used for ordering and thresholds stays the unscaled probability of the
sampled token (LLaDA's convention). FreeDave is greedy-exact and refuses a temperature.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.diffusion import learn2pd as L2

FIXED = ("one-per-step", "llada-low-confidence", "llada-random", "dream-maskgit-plus", "dream-topk-margin",
         "dream-entropy", "remask")
SAMPLERS = FIXED[:-1] + ("fast-dllm-threshold", "fast-dllm-factor", "freedave", "localleap", "credit",
                         "adablock", "ccd", "remask", "learn2pd")
_ORDER = {"one-per-step": "prob", "llada-low-confidence": "prob", "llada-random": "random",
          "dream-maskgit-plus": "prob", "dream-topk-margin": "margin", "dream-entropy": "entropy", "remask": "prob"}
NEG = -1e30
CACHES = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler settings (hashable: the jit cache key)."""

    name: str = "one-per-step"
    steps: Optional[int] = None  # fixed-count schedules: steps per row (None: one token per step)
    block_length: Optional[int] = None  # semi-autoregressive blocks (None: the whole window is one block)
    threshold: float = 0.9  # threshold / localleap anchors / credit / adablock / ccd
    factor: float = 1.0  # fast-dllm-factor
    relaxed_threshold: float = 0.5  # localleap: threshold near an anchor
    radius: int = 2  # localleap
    drafts: int = 4  # freedave: drafts per round (K)
    credit_decay: float = 0.7  # credit: beta
    credit_weight: float = 1.0  # credit: alpha
    delimiters: tuple = ()  # adablock: token ids that may end a block
    delimiter_threshold: float = 0.5  # adablock
    ccd_window: int = 2  # ccd: steps the argmax must agree over
    remask_threshold: float = 0.1  # remask
    mask_id: int = 1
    pad_id: int = 0
    verify: bool = True  # freedave: False accepts every draft unchecked (a deliberately broken verifier)
    cache: str = "none"  # Fast-dLLM's "prefix" or "dual" cache (needs block_length and a logits_fn with .full/.block)
    temperature: float = 0.0  # 0: greedy; > 0: x0 sampled from softmax(logits / temperature) per position
    eot: bool = True  # learn2pd: End-of-Text Prediction
    eos_id: Optional[int] = None  # learn2pd with eot: the [EOS] id

    def validate(self, gen_lens=()) -> None:
        """Raise ValueError naming the setting of a bad value (``gen_lens``: each row's window)."""
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.name!r}")
        for n in ("threshold", "relaxed_threshold", "delimiter_threshold"):
            v = getattr(self, n)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 < v <= 1.0):
                raise ValueError(f"{n} must be in (0, 1], got {v!r}")
        for n in ("credit_decay", "remask_threshold"):
            v = getattr(self, n)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"{n} must be in [0, 1), got {v!r}")
        for n, v in (("factor", self.factor), ("credit_weight", self.credit_weight)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{n} must be a finite number > 0, got {v!r}")
        for n, lo in (("radius", 0), ("drafts", 1), ("ccd_window", 1)):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{n} must be an integer >= {lo}, got {v!r}")
        for n in ("steps", "block_length"):
            v = getattr(self, n)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{n} must be None or an integer >= 1, got {v!r}")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.cache != "none" and (self.block_length is None or self.name in ("freedave", "adablock")):
            raise ValueError(f"cache={self.cache!r} needs fixed blocks: a block_length, and a sampler other than "
                             f"freedave and adablock (got {self.name}, block_length={self.block_length})")
        t = self.temperature
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
        if self.name == "freedave" and t > 0:
            raise ValueError(f"temperature must be 0 for sampler freedave (it reproduces greedy one-per-step "
                             f"exactly), got {t!r}")
        if self.name == "learn2pd" and self.eot and self.eos_id is None:
            raise ValueError("sampler learn2pd with eot=True needs eos_id (the [EOS] token id)")
        if self.name == "adablock" and self.block_length is None:
            raise ValueError("sampler adablock needs block_length (the longest block)")
        for i, g in enumerate(gen_lens):
            if g < 1:
                raise ValueError(f"generation length must be >= 1, got {g} (row {i})")
            if self.block_length is not None and self.name != "adablock" and g % self.block_length:
                raise ValueError(f"block_length {self.block_length} must divide the generation length, but row "
                                 f"{i} has generation length {g}")


@struct.dataclass
class DiffusionState:
    canvas: jax.Array  # [B,T] int32
    masked: jax.Array  # [B,T] bool: generation positions still to fill
    step: jax.Array  # [] int32 loop iterations (= batch model calls)
    calls: jax.Array  # [B] int32 model calls while the row had masked positions
    commits: jax.Array  # [B,S] int32 tokens committed per call
    commit_step: jax.Array  # [B,T] int32 call index of each position's commit (-1: none)
    cur_blk: jax.Array  # [B] int32 current block (fixed blocks) or block end (adablock)
    bstep: jax.Array  # [B] int32 steps taken in the current block
    key: jax.Array
    extra: object  # per-method state
    kv: object = None  # cache != "none": the keys/values of the last full call
    last: object = None  # cache != "none": [B,T,V] logits of the last call (block rows refreshed)
    full_calls: object = None  # cache != "none": [] int32 full calls made


# ---------------------------------------------------------------------------------------- helpers
def rank_desc(score, valid):
    """Rank ``[B,T]`` of each valid position by descending score (ties: lower position first);
    invalid positions rank T."""
    t = score.shape[1]
    s = jnp.where(valid, score, -jnp.inf)
    order = jnp.argsort(-s, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1)
    return jnp.where(valid, rank, t)


def _layout(plen, glen, t):
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    gen = (pos >= plen[:, None]) & (pos < (plen + glen)[:, None])
    return pos, gen, pos - plen[:, None]


def _block_ids(cfg, rel, glen):
    bl = cfg.block_length if cfg.block_length is not None and cfg.name != "adablock" else None
    return jnp.zeros_like(rel) if bl is None else rel // bl


def _steps_per_block(cfg, glen):
    bl = glen if cfg.block_length is None or cfg.name == "adablock" else jnp.full_like(glen, cfg.block_length)
    if cfg.steps is None or cfg.name == "one-per-step":
        return bl
    return jnp.clip(-(-(cfg.steps * bl) // glen), 1, bl)


def predict(cfg, logits):
    """log-probabilities (``[MASK]``/``[PAD]`` excluded), x0 and its probability."""
    logits = logits.astype(jnp.float32).at[..., jnp.asarray([cfg.mask_id, cfg.pad_id])].set(NEG)
    logp = jax.nn.log_softmax(logits, axis=-1)
    x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    p0 = jnp.exp(jnp.max(logp, axis=-1))
    return logp, x0, p0


def pick_one(cfg, logits, masked, blk):
    """The one-per-step rule: (position, token) per row = the most probable masked position of the first
    block that still has masked positions (ties: lowest position), and its argmax token."""
    _, x0, p0 = predict(cfg, logits)
    cur = jnp.min(jnp.where(masked, blk, jnp.iinfo(jnp.int32).max), axis=1)
    cand = masked & (blk == cur[:, None])
    pos = jnp.argmax(jnp.where(cand, p0, -1.0), axis=1).astype(jnp.int32)
    return pos, jnp.take_along_axis(x0, pos[:, None], axis=1)[:, 0]


def sample_x0(cfg, logp, key):
    """``temperature > 0``: x0 ``[B,T]`` drawn from ``softmax(logp / temperature)`` at every position
    (Gumbel-max; row r's noise from ``fold_in(key, r)``) and its unscaled probability."""
    b = logp.shape[0]
    g = jax.vmap(lambda r: jax.random.gumbel(jax.random.fold_in(key, r), logp.shape[1:]))(jnp.arange(b))
    x0 = jnp.argmax(logp / cfg.temperature + g, axis=-1).astype(jnp.int32)
    return x0, jnp.exp(jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0])


def _order_score(order, logp, p0, key):
    if order == "prob":
        return p0
    if order == "random":
        return jax.random.uniform(key, p0.shape)
    p = jnp.exp(logp)
    if order == "margin":
        top2 = jax.lax.top_k(p, 2)[0]
        return top2[..., 0] - top2[..., 1]
    return jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)  # entropy: higher = more certain


def _near(anchor, radius):
    """[B,T] bool: within ``radius`` positions of an anchor."""
    out = anchor
    t = anchor.shape[1]
    for d in range(1, radius + 1):
        pad = jnp.zeros((anchor.shape[0], min(d, t)), bool)
        out = out | jnp.concatenate([anchor[:, d:], pad], 1)[:, :t] | jnp.concatenate([pad, anchor[:, :-d]], 1)[:, :t]
    return out


# ---------------------------------------------------------------------------------------- the loop
def _init_extra(cfg, b, t, v):
    if cfg.name == "credit":
        return jnp.zeros((b, t, v), jnp.float32)
    if cfg.name == "ccd":
        return (jnp.full((b, t), -1, jnp.int32), jnp.zeros((b, t), jnp.int32),
                jnp.zeros((b, t, cfg.ccd_window), jnp.float32))
    if cfg.name == "remask":
        return jnp.zeros((b, t), bool)
    return jnp.zeros((), jnp.int32)


def _select(cfg, st, logits, gen, pos, blk, sblk, key):
    """One step's (commit [B,T] bool, x0 [B,T], remask [B,T] bool, new cur_blk, new bstep, new extra)."""
    name = cfg.name
    extra = st.extra
    masked = st.masked
    if name == "credit":  # fuse the history, then add this step's evidence to it
        _, raw_x0, raw_p0 = predict(cfg, logits)
        logits = logits.astype(jnp.float32) + cfg.credit_weight * jnp.log1p(extra)
        upd = jax.nn.one_hot(raw_x0, extra.shape[-1], dtype=jnp.float32) * raw_p0[..., None]
        extra = jnp.where(masked[..., None], cfg.credit_decay * extra + upd, 0.0)
    logp, x0, p0 = predict(cfg, logits)
    if cfg.temperature > 0:
        x0, p0 = sample_x0(cfg, logp, key)
    big = jnp.iinfo(jnp.int32).max
    if name == "adablock":
        end = st.cur_blk  # exclusive end of the current block (0 before the first)
        need = ~jnp.any(masked & (pos < end[:, None]), axis=1)
        start = jnp.min(jnp.where(masked, pos, big), axis=1)
        win = masked & (pos >= start[:, None]) & (pos < start[:, None] + cfg.block_length)
        isdel = jnp.zeros_like(masked)
        for d in cfg.delimiters:
            isdel = isdel | (x0 == d)
        hit = win & isdel & (p0 >= cfg.delimiter_threshold)
        first = jnp.min(jnp.where(hit, pos, big), axis=1)
        new_end = jnp.where(first < big, first + 1, start + cfg.block_length)
        end = jnp.where(need, new_end, end)
        in_block = masked & (pos < end[:, None])
        cur_blk, bstep = end, st.bstep
    else:
        cur = jnp.min(jnp.where(masked, blk, big), axis=1)
        in_block = masked & (blk == cur[:, None])
        bstep = jnp.where(cur != st.cur_blk, 0, st.bstep)
        cur_blk = cur
    rank_p = rank_desc(p0, in_block)
    top1 = in_block & (rank_p == 0)
    remask = jnp.zeros_like(masked)
    if name in FIXED:
        score = _order_score(_ORDER[name], logp, p0, key)
        rank = rank_desc(score, in_block)
        rem = jnp.sum(in_block, axis=1)
        left = jnp.maximum(sblk - bstep, 1)
        k = jnp.ones_like(rem) if name == "one-per-step" else -(-rem // left)
        commit = in_block & (rank < k[:, None])
        if name == "remask":
            own = jnp.take_along_axis(logp, st.canvas[..., None], axis=-1)[..., 0]
            old = gen & ~masked & ~extra & (blk == cur_blk[:, None])
            remask = old & (jnp.exp(own) < cfg.remask_threshold)
            extra = extra | remask
    elif name in ("fast-dllm-threshold", "credit", "adablock"):
        commit = in_block & (p0 > cfg.threshold) | top1
    elif name == "fast-dllm-factor":
        ok = (p0 >= 1.0 - cfg.factor / (rank_p + 2.0)) | (rank_p == 0)
        fail = jnp.min(jnp.where(in_block & ~ok, rank_p, big), axis=1)
        commit = in_block & (rank_p < fail[:, None])
    elif name == "localleap":
        anchor = in_block & (p0 >= cfg.threshold)
        commit = anchor | (in_block & _near(anchor, cfg.radius) & (p0 >= cfg.relaxed_threshold)) | top1
    elif name == "ccd":
        prev, stable, hist = extra
        stable = jnp.where(x0 == prev, stable + 1, 1)
        hist = jnp.concatenate([hist[..., 1:], jnp.log(jnp.maximum(p0, 1e-30))[..., None]], axis=-1)
        w = cfg.ccd_window
        agree = (stable >= w) & (jnp.exp(jnp.mean(hist, axis=-1)) >= cfg.threshold)
        commit = in_block & agree | top1
        extra = (x0, stable, hist)
    elif name == "learn2pd":  # extra: the filter's params (carried unchanged)
        ready = jax.nn.sigmoid(L2.apply_filter(extra, L2.features(logp, x0, p0, masked, gen, cfg.eos_id)))
        commit = in_block & (ready >= cfg.threshold) | top1
        if cfg.eot:  # End-of-Text Prediction: nothing after a committed [EOS] is left to decode
            fill = L2.eot_fill(masked & ~commit, gen, jnp.where(commit, x0, st.canvas), cfg.eos_id)
            commit = commit | fill
            x0 = jnp.where(fill, cfg.eos_id, x0)
    else:  # pragma: no cover
        raise ValueError(name)
    return commit, x0, remask, cur_blk, bstep, extra


def _run(cfg: SamplerConfig, logits_fn: Callable, aux, canvas, plen, glen, key, filt=None):
    b, t = canvas.shape
    s_max = 2 * t + 2
    pos, gen, rel = _layout(plen, glen, t)
    blk = _block_ids(cfg, rel, glen)
    sblk = _steps_per_block(cfg, glen)
    canvas = jnp.where(gen, cfg.mask_id, canvas).astype(jnp.int32)
    v = jax.eval_shape(lambda a, c: logits_fn(a, c), aux, canvas).shape[-1]
    cached = cfg.cache != "none"
    big = jnp.iinfo(jnp.int32).max
    kv0 = last0 = nfull0 = None
    if cached:
        shapes = jax.eval_shape(logits_fn.full, aux, canvas)
        kv0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes[1])
        last0, nfull0 = jnp.zeros((b, t, v), jnp.float32), jnp.zeros((), jnp.int32)
    st = DiffusionState(canvas=canvas, masked=gen, step=jnp.zeros((), jnp.int32), calls=jnp.zeros((b,), jnp.int32),
                        commits=jnp.zeros((b, s_max), jnp.int32), commit_step=jnp.full((b, t), -1, jnp.int32),
                        cur_blk=jnp.full((b,), -1 if cfg.name != "adablock" else 0, jnp.int32),
                        bstep=jnp.zeros((b,), jnp.int32), key=key,
                        extra=filt if cfg.name == "learn2pd" else _init_extra(cfg, b, t, v),
                        kv=kv0, last=last0, full_calls=nfull0)

    def model_call(st):
        """Logits of this step: one plain call, or (caches) a full call when a row enters a new block and
        otherwise the rows' current blocks only, against the cached keys/values."""
        if not cached:
            return logits_fn(aux, st.canvas), {}
        bl = cfg.block_length
        active = jnp.any(st.masked, axis=1)
        cur = jnp.min(jnp.where(st.masked, blk, big), axis=1)
        need = jnp.any(active & (cur != st.cur_blk))
        start = jnp.clip(plen + jnp.where(active, cur, 0) * bl, 0, t - bl)

        def full(_):
            lg, kv = logits_fn.full(aux, st.canvas)
            return lg.astype(jnp.float32), kv

        def part(_):
            lb = logits_fn.block(aux, st.canvas, st.kv, start, bl, cfg.cache == "dual").astype(jnp.float32)
            idx = start[:, None] + jnp.arange(bl)[None]
            return st.last.at[jnp.arange(b)[:, None], idx].set(lb), st.kv

        lg, kv = jax.lax.cond(need, full, part, None)
        return lg, {"kv": kv, "last": lg, "full_calls": st.full_calls + need.astype(jnp.int32)}

    def cond(st):
        return jnp.any(st.masked) & (st.step < s_max)

    def body(st):
        active = jnp.any(st.masked, axis=1)
        logits, upd = model_call(st)
        commit, x0, remask, cur_blk, bstep, extra = _select(cfg, st, logits, gen, pos, blk, sblk,
                                                           jax.random.fold_in(st.key, st.step))
        commit = commit & st.masked
        canvas = jnp.where(commit, x0, st.canvas)
        canvas = jnp.where(remask, cfg.mask_id, canvas)
        masked = (st.masked & ~commit) | remask
        n = jnp.sum(commit, axis=1).astype(jnp.int32)
        return st.replace(canvas=canvas, masked=masked, step=st.step + 1, calls=st.calls + active,
                          commits=jax.lax.dynamic_update_slice(st.commits, n[:, None], (0, st.step)),
                          commit_step=jnp.where(commit, st.step, jnp.where(remask, -1, st.commit_step)),
                          cur_blk=cur_blk, bstep=bstep + 1, extra=extra, **upd)

    return jax.lax.while_loop(cond, body, st)


# ---------------------------------------------------------------------------------------- FreeDave
@struct.dataclass
class FreeDaveState:
    canvas: jax.Array
    masked: jax.Array
    logits: jax.Array  # [B,T,V] logits of the current canvas (from the previous call)
    step: jax.Array
    calls: jax.Array
    commits: jax.Array
    commit_step: jax.Array


def _run_freedave(cfg: SamplerConfig, logits_fn: Callable, aux, canvas, plen, glen, key, filt=None):
    b, t = canvas.shape
    k = cfg.drafts
    s_max = t + 2
    pos, gen, rel = _layout(plen, glen, t)
    blk = _block_ids(cfg, rel, glen)
    canvas = jnp.where(gen, cfg.mask_id, canvas).astype(jnp.int32)
    logits0 = logits_fn(aux, canvas).astype(jnp.float32)
    st = FreeDaveState(canvas=canvas, masked=gen, logits=logits0, step=jnp.ones((), jnp.int32),
                       calls=jnp.ones((b,), jnp.int32), commits=jnp.zeros((b, s_max), jnp.int32),
                       commit_step=jnp.full((b, t), -1, jnp.int32))
    def cond(st):
        return jnp.any(st.masked) & (st.step < s_max)

    def body(st):
        active = jnp.any(st.masked, axis=1)
        rem = jnp.sum(st.masked, axis=1)
        _, x0, p0 = predict(cfg, st.logits)
        # draft order if the logits did not change: block by block, most probable first
        key_ = jnp.where(st.masked, blk.astype(jnp.float32) * 4.0 - p0, jnp.inf)
        order = jnp.argsort(key_, axis=1, stable=True)[:, :k]  # [B,K] draft positions
        dtok = jnp.take_along_axis(x0, order, axis=1)
        j = jnp.arange(k)
        take = j[None, :, None] >= j[None, None, :]  # draft i holds drafts 0..i  [1,K,K]
        take = take & (j[None, None, :] < rem[:, None, None])  # [B,K,K]
        hit = jax.nn.one_hot(order, t, dtype=bool)  # [B,K,T]
        put = jnp.any(take[..., None] & hit[:, None], axis=2)  # [B,K(draft),T]
        d_canvas = jnp.where(put, dtok_canvas(dtok, order, t)[:, None], st.canvas[:, None])
        d_masked = st.masked[:, None] & ~put
        d_logits = logits_fn(aux, d_canvas.reshape(b * k, t)).astype(jnp.float32).reshape(b, k, t, -1)
        # verify: on draft i's logits the one-per-step rule must choose draft i+1
        npos, ntok = pick_one(cfg, d_logits.reshape(b * k, t, -1), d_masked.reshape(b * k, t),
                              jnp.repeat(blk, k, axis=0))
        npos, ntok = npos.reshape(b, k), ntok.reshape(b, k)
        match = (npos[:, :-1] == order[:, 1:]) & (ntok[:, :-1] == dtok[:, 1:])
        if not cfg.verify:
            match = jnp.ones_like(match)
        acc = 1 + jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)
        acc = jnp.minimum(acc, jnp.maximum(rem, 1))  # drafts accepted
        sel = acc - 1
        canvas = jnp.take_along_axis(d_canvas, sel[:, None, None], axis=1)[:, 0]
        masked = jnp.take_along_axis(d_masked, sel[:, None, None], axis=1)[:, 0]
        logits = jnp.take_along_axis(d_logits, sel[:, None, None, None], axis=1)[:, 0]
        canvas = jnp.where(active[:, None], canvas, st.canvas)
        masked = jnp.where(active[:, None], masked, st.masked)
        logits = jnp.where(active[:, None, None], logits, st.logits)
        newly = st.masked & ~masked
        n = jnp.sum(newly, axis=1).astype(jnp.int32)
        return st.replace(canvas=canvas, masked=masked, logits=logits, step=st.step + 1, calls=st.calls + active,
                          commits=jax.lax.dynamic_update_slice(st.commits, n[:, None], (0, st.step)),
                          commit_step=jnp.where(newly, st.step, st.commit_step))

    del key, filt  # greedy: no randomness, no filter
    return jax.lax.while_loop(cond, body, st)


def dtok_canvas(dtok, order, t):
    """[B,T] canvas holding draft token ``dtok[b,i]`` at position ``order[b,i]`` (other slots 0)."""
    hit = jax.nn.one_hot(order, t, dtype=jnp.int32)  # [B,K,T]
    return jnp.sum(hit * dtok[..., None], axis=1)


# ---------------------------------------------------------------------------------------- host entry
def compiled(cfg: SamplerConfig, logits_fn: Callable):
    """The jitted ``(aux, canvas, plen, glen, key) -> final state`` of ``cfg`` with ``logits_fn``
    (settings a schedule does not read are reset first, so equal programs compile once)."""
    base = SamplerConfig(mask_id=cfg.mask_id, pad_id=cfg.pad_id)
    used = {"name", "steps", "block_length", "mask_id", "pad_id", "cache", "temperature", *_READS.get(cfg.name, ())}
    if cfg.name == "dream-maskgit-plus":  # the same rule as llada-low-confidence
        cfg = dataclasses.replace(cfg, name="llada-low-confidence")
    norm = dataclasses.replace(cfg, **{f.name: getattr(base, f.name) for f in dataclasses.fields(cfg)
                                       if f.name not in used})
    return _compiled(norm, logits_fn)


# the settings each schedule reads besides name/steps/block_length/ids/cache
_READS = {"fast-dllm-threshold": ("threshold",), "fast-dllm-factor": ("factor",), "freedave": ("drafts", "verify"),
          "localleap": ("threshold", "relaxed_threshold", "radius"),
          "credit": ("threshold", "credit_decay", "credit_weight"),
          "adablock": ("threshold", "delimiters", "delimiter_threshold"), "ccd": ("threshold", "ccd_window"),
          "remask": ("remask_threshold",), "learn2pd": ("threshold", "eot", "eos_id")}


@functools.lru_cache(maxsize=64)
def _compiled(cfg: SamplerConfig, logits_fn: Callable):
    run = _run_freedave if cfg.name == "freedave" else _run
    return jax.jit(functools.partial(run, cfg, logits_fn))


def make_canvas(prompts, gen_lens, pad_id: int, length: Optional[int] = None):
    """``canvas [B,T]`` (prompts at the left, [PAD] elsewhere), ``plen [B]``, ``glen [B]``; T is the
    longest prompt + window rounded up to a multiple of 8 (fewer programs), or ``length``."""
    b = len(prompts)
    glen = np.asarray(gen_lens if np.ndim(gen_lens) else [gen_lens] * b, np.int32)
    plen = np.asarray([len(p) for p in prompts], np.int32)
    need = int(np.max(plen + glen))
    t = length if length is not None else -(-need // 8) * 8
    if t < need:
        raise ValueError(f"length {t} is shorter than the longest prompt + generation window ({need})")
    canvas = np.full((b, t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        canvas[i, :len(p)] = p
    return canvas, plen, glen


def sample(logits_fn: Callable, aux, prompts, gen_len, cfg: SamplerConfig, *, seed: int = 0,
           length: Optional[int] = None, filter_params=None):
    """Run sampler ``cfg`` on ``prompts`` (lists of ids) with generation windows ``gen_len`` (an int or
    one per row). ``filter_params``: the Learn2PD filter (sampler ``learn2pd`` only). Returns
    ``(tokens [B, max G] int32 numpy (the windows; [PAD] past a row's G), stats)``."""
    if not len(prompts):
        raise ValueError("prompts must hold at least one prompt")
    if (cfg.name == "learn2pd") != (filter_params is not None):
        raise ValueError("filter_params (a Learn2PD filter: jaxdec.diffusion.learn2pd.load_filter, trained by "
                         "python -m train.learn2pd_filter) are needed by sampler learn2pd and only by it; got "
                         f"sampler {cfg.name!r} with filter_params {'set' if filter_params is not None else 'None'}")
    canvas, plen, glen = make_canvas(prompts, gen_len, cfg.pad_id, length)
    cfg.validate([int(g) for g in glen])
    if cfg.cache != "none" and not (callable(getattr(logits_fn, "full", None))
                                    and callable(getattr(logits_fn, "block", None))):
        raise ValueError(f"cache={cfg.cache!r} needs a logits_fn with .full and .block (e.g. "
                         f"jaxdec.diffusion.model.logits_fn(model)), got {logits_fn!r}")
    st = compiled(cfg, logits_fn)(aux, jnp.asarray(canvas), jnp.asarray(plen), jnp.asarray(glen),
                                  jax.random.key(seed), filter_params)
    final = np.asarray(st.canvas)
    cstep = np.asarray(st.commit_step)
    calls = np.asarray(st.calls)
    commits = np.asarray(st.commits)
    if np.any(np.asarray(st.masked)):
        raise RuntimeError(f"sampler {cfg.name} stopped with masked positions left (step bound reached)")
    g_max = int(glen.max())
    toks = np.full((len(prompts), g_max), cfg.pad_id, np.int32)
    csteps = np.full((len(prompts), g_max), -1, np.int32)
    per_call = []
    for i in range(len(prompts)):
        toks[i, :glen[i]] = final[i, plen[i]:plen[i] + glen[i]]
        csteps[i, :glen[i]] = cstep[i, plen[i]:plen[i] + glen[i]]
        c = commits[i, :int(np.asarray(st.step))]
        per_call.append([int(x) for x in c[:calls[i]]])
    stats = {"sampler": cfg.name, "model_calls": [int(c) for c in calls], "batch_calls": int(np.asarray(st.step)),
             "committed_per_call": per_call,
             "tokens_per_call": [float(glen[i]) / max(int(calls[i]), 1) for i in range(len(prompts))],
             "commit_step": csteps}
    if cfg.name == "freedave":
        stats["forward_rows"] = 1 + (int(np.asarray(st.step)) - 1) * cfg.drafts
    if cfg.cache != "none":
        stats["full_calls"] = int(np.asarray(st.full_calls))
        stats["block_calls"] = stats["batch_calls"] - stats["full_calls"]
    return toks, stats
