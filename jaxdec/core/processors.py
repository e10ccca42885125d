"""Logits processors: pure, composable, static-shaped functions ``(logits[B, V], ...) -> logits[B, V]``.

Every sampling parameter is a per-row array ``[B]`` (traced), so new values never recompile and no
shape depends on ``k``; removed entries are set to ``-inf``. ``process`` applies the whole chain in
the order of Hugging Face's ``GenerationMixin._get_logits_processor`` (transformers 5.24,
``generation/utils.py``), restricted to the processors we implement:

    1. repetition penalty   (``RepetitionPenaltyLogitsProcessor``; applied in greedy *and* sampling mode)
    --- the following warpers are only used for sampling rows (HF: ``if do_sample``) ---
    2. temperature          (``TemperatureLogitsWarper``)
    3. top-k                (``TopKLogitsWarper``)
    4. top-p                (``TopPLogitsWarper``)
    5. min-p                (``MinPLogitsWarper``; HF: "applied after temperature scaling")
    6. typical-p            (``TypicalLogitsWarper``)

Rows whose temperature is 0 are greedy: they get the repetition penalty only (exactly what HF's
``do_sample=False`` path feeds to ``argmax``) and ``sampling.sample`` takes their argmax.

Semantics (HF's, with ``min_tokens_to_keep = 1``, the value HF uses outside beam search):

* repetition penalty ``r``: for every token seen in the prompt or the output so far, a logit ``< 0``
  is multiplied by ``r``, otherwise (``>= 0``) divided by ``r``; applied once per token however often
  it occurred. ``r = 1`` is a no-op.
* temperature ``t > 0``: ``logits / t`` (rows with ``t = 0`` are left unchanged, see above).
* top-k ``k`` (``0`` = off, ``k >= V`` keeps everything): keep every token whose logit is ``>=`` the
  k-th largest logit, so **all tokens tied with the k-th value are kept** (more than k may survive).
* top-p ``p`` (``1`` = off): sort ascending, ``cum = cumsum(softmax)``; remove the tokens with
  ``cum <= 1 - p``, but never the last (largest) one. Tie rule: tokens with equal logits are ordered by
  index (a stable ascending sort), so if the cut falls inside a group of tied tokens, the lower indices
  are removed first. This equals HF whenever torch's sort orders the ties stably (``torch.sort`` on
  CPU is stable for rows of <= 16 entries and arbitrary beyond that, so HF itself has no fixed rule
  there); it never changes which logit *values* survive except inside such a split tie group.
* min-p ``m`` (``0`` = off): with ``probs = softmax(logits)``, remove tokens with
  ``probs < m * max(probs)``; the most probable token is always kept.
* typical-p ``τ`` (``1`` = off): ``H`` = entropy of ``softmax(logits)``, score ``|−log p_i − H|``;
  sort scores ascending, ``cum`` = cumsum of the probabilities in that order,
  ``last = min(#{cum < τ}, V − 1)``; remove tokens whose score is ``>`` the score at ``last``
  (so ties at the threshold score are kept).

All arithmetic that decides a mask is float32, in the same order of operations as HF, so thresholds
compare the same float32 quantities (``1 − p``, ``m · p_max``, ``τ``). Temperature and penalty
divisions are true IEEE divisions (XLA would otherwise turn ``x / t`` into ``x * (1/t)``, 1 ulp off),
so those values are bit-identical to torch's. Softmax/cumsum roundings still differ from torch's in
the last bits, so a token whose cumulative mass or probability sits within ~1e-6 of a cut can fall
on the other side; ties between equal logits are always resolved identically.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdec.masks import BANNED_LOGIT as NEG_INF  # filtered tokens (-inf)

__all__ = [
    "SamplingParams", "process", "repetition_penalty", "temperature", "top_k", "top_p", "min_p",
    "typical_p", "warp", "seen_mask_from_tokens", "update_seen_mask",
]


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------

def _host_param(name: str, value, batch: int, dtype, ok, expected: str) -> np.ndarray:
    """Broadcast a scalar or per-row sequence to `[batch]`, validating on the host."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged lists and other junk
        raise ValueError(f"{name} must be a number or a sequence of {batch} numbers, got {value!r}") from e
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be a number or a sequence of {batch} numbers, got {value!r}")
    if arr.ndim == 0:
        arr = np.full((batch,), arr)
    elif arr.ndim != 1 or arr.shape[0] != batch:
        raise ValueError(f"{name} must be a scalar or have length batch={batch}, got shape {arr.shape}")
    f = arr.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} must be finite and {expected}, got {arr.tolist()}")
    if np.issubdtype(dtype, np.integer) and not np.all(f == np.round(f)):
        raise ValueError(f"{name} must be an integer {expected}, got {arr.tolist()}")
    bad = ~ok(f)
    if np.any(bad):
        raise ValueError(f"{name} must be {expected}, got {f[bad].tolist()} (rows {np.nonzero(bad)[0].tolist()})")
    return f.astype(dtype)


@flax.struct.dataclass
class SamplingParams:
    """Per-row sampling parameters, each an array of shape ``[B]`` (a pytree: all fields are traced).

    temperature        float32, ``>= 0``; 0 = greedy for that row.
    top_k              int32,   ``>= 0``; 0 = off.
    top_p              float32, in ``(0, 1]``; 1 = off.
    min_p              float32, in ``[0, 1]``; 0 = off.
    typical_p          float32, in ``(0, 1]``; 1 = off.
    repetition_penalty float32, ``> 0``; 1 = off (needs a seen-token mask, see ``process``).

    Build it with ``SamplingParams.create`` (host-side validation); the raw constructor does not check.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    typical_p: jax.Array
    repetition_penalty: jax.Array

    @classmethod
    def create(cls, batch: int, temperature: Union[float, Sequence[float]] = 1.0,
               top_k: Union[int, Sequence[int]] = 0, top_p: Union[float, Sequence[float]] = 1.0,
               min_p: Union[float, Sequence[float]] = 0.0, typical_p: Union[float, Sequence[float]] = 1.0,
               repetition_penalty: Union[float, Sequence[float]] = 1.0) -> "SamplingParams":
        """Scalars apply to every row; sequences give one value per row. Raises ``ValueError`` naming
        the offending argument and its allowed range."""
        if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        batch = int(batch)
        f32, i32 = np.float32, np.int32
        return cls(
            temperature=jnp.asarray(_host_param("temperature", temperature, batch, f32, lambda v: v >= 0,
                                                ">= 0 (0 = greedy)")),
            top_k=jnp.asarray(_host_param("top_k", top_k, batch, i32, lambda v: (v >= 0) & (v < 2**31),
                                          ">= 0 (0 = off)")),
            top_p=jnp.asarray(_host_param("top_p", top_p, batch, f32, lambda v: (v > 0) & (v <= 1),
                                          "in (0, 1] (1 = off)")),
            min_p=jnp.asarray(_host_param("min_p", min_p, batch, f32, lambda v: (v >= 0) & (v <= 1),
                                          "in [0, 1] (0 = off)")),
            typical_p=jnp.asarray(_host_param("typical_p", typical_p, batch, f32, lambda v: (v > 0) & (v <= 1),
                                              "in (0, 1] (1 = off)")),
            repetition_penalty=jnp.asarray(_host_param("repetition_penalty", repetition_penalty, batch, f32,
                                                       lambda v: v > 0, "> 0 (1 = off)")),
        )

    @property
    def batch_size(self) -> int:
        return int(self.temperature.shape[0])


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _rows(value, batch: int, dtype) -> jax.Array:
    """A scalar or `[B]` parameter as a `[B, 1]` column of `dtype`."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))[:, None]


def _f32(logits) -> jax.Array:
    return jnp.asarray(logits).astype(jnp.float32)


def _canon_zero(x):
    """-0.0 -> +0.0, so the sort's total order agrees with `==` on ties at zero."""
    return jnp.where(x == 0, jnp.zeros_like(x), x)


def _exact_div(x, col):
    """``x / col`` with IEEE division, as torch computes it. XLA rewrites a division by a broadcast
    into a multiplication by the reciprocal (1 ulp off, which can merge or split ties before top-k);
    the barrier hides the broadcast from that rewrite."""
    return x / lax.optimization_barrier(jnp.broadcast_to(col, x.shape))


def _sort_ascending(x):
    """Stable ascending sort of each row: (sorted values, original indices). Ties keep index order."""
    idx = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    vals, order = lax.sort((_canon_zero(x), idx), dimension=x.ndim - 1, num_keys=1, is_stable=True)
    return vals, order


def _take_col(a, col):
    """a[b, col[b]] for a `[B, V]` array and a `[B]` column index, as `[B, 1]`."""
    return jnp.take_along_axis(a, col[:, None], axis=-1)


def _when_any(active, fn, x):
    """Run `fn(x)` only if some row needs it (a real branch at top level; a select under vmap)."""
    return lax.cond(jnp.any(active), fn, lambda y: y, x)


# --------------------------------------------------------------------------------------------------
# Repetition penalty and seen-token masks
# --------------------------------------------------------------------------------------------------

def seen_mask_from_tokens(tokens, vocab_size: int, valid=None) -> jax.Array:
    """bool `[B, V]`: which ids occur in each row of `tokens [B, T]`. Ids outside ``[0, V)`` (e.g. -1
    padding) and positions where ``valid [B, T]`` is False are ignored."""
    tokens = jnp.asarray(tokens, jnp.int32)
    ok = (tokens >= 0) & (tokens < vocab_size)
    if valid is not None:
        ok = ok & jnp.asarray(valid, bool)
    b = tokens.shape[0]
    # one extra column absorbs the ignored entries (static shapes, no dynamic filtering)
    safe = jnp.where(ok, tokens, vocab_size)
    mask = jnp.zeros((b, vocab_size + 1), bool).at[jnp.arange(b)[:, None], safe].set(True)
    return mask[:, :vocab_size]


def update_seen_mask(seen_mask, tokens, valid=None) -> jax.Array:
    """Mark the newly emitted ``tokens [B]`` as seen (rows where ``valid [B]`` is False are untouched)."""
    seen_mask = jnp.asarray(seen_mask, bool)
    tokens = jnp.asarray(tokens, jnp.int32)
    b = jnp.arange(tokens.shape[0])
    on = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    return seen_mask.at[b, tokens].set(seen_mask[b, tokens] | on)


def repetition_penalty(logits, seen, penalty) -> jax.Array:
    """HF's repetition penalty. `seen` is a bool mask ``[B, V]`` of tokens already in the prompt or
    output, or an int token history ``[B, T]`` (ids outside ``[0, V)`` are ignored, so pad with -1).
    Seen logits ``< 0`` are multiplied by ``penalty [B]``, the others divided by it."""
    x = _f32(logits)
    b, v = x.shape
    seen = jnp.asarray(seen)
    if seen.dtype != jnp.bool_:
        seen = seen_mask_from_tokens(seen, v)
    if seen.shape != x.shape:
        raise ValueError(f"seen mask shape {seen.shape} does not match logits {x.shape}")
    r = _rows(penalty, b, jnp.float32)
    penalized = jnp.where(x < 0, x * r, _exact_div(x, r))
    return jnp.where(seen, penalized, x)


# --------------------------------------------------------------------------------------------------
# Warpers
# --------------------------------------------------------------------------------------------------

def temperature(logits, t) -> jax.Array:
    """``logits / t`` per row; rows with ``t <= 0`` (greedy) are returned unchanged."""
    x = _f32(logits)
    t = _rows(t, x.shape[0], jnp.float32)
    return jnp.where(t > 0, _exact_div(x, jnp.where(t > 0, t, 1.0)), x)


def _top_k_threshold(vals, k):
    """Per-row k-th largest value from ascending `vals`; `-inf` (keep all) where k is off."""
    v = vals.shape[-1]
    on = (k > 0) & (k < v)
    col = jnp.where(on, v - jnp.clip(k, 1, v), 0)
    kth = _take_col(vals, col)
    return jnp.where(on[:, None], kth, NEG_INF)


def _top_p_remove(x, vals, order, p):
    """Removal mask of top-p for logits `x`, given `x`'s stable ascending sort (`vals`, `order`).

    The removed tokens are a prefix of length m of the ascending order; rebuilt without a scatter:
    a token is removed if it is below the prefix's last value, or tied with it at an index not above
    the last removed index (ties are in index order)."""
    v = x.shape[-1]
    probs = jax.nn.softmax(vals, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    rm_sorted = cum <= (1.0 - p[:, None])
    rm_sorted = rm_sorted & (lax.broadcasted_iota(jnp.int32, x.shape, 1) < v - 1)  # keep the top one
    m = jnp.sum(rm_sorted, axis=-1, dtype=jnp.int32)
    last = jnp.maximum(m - 1, 0)
    v_b = _take_col(vals, last)
    i_b = _take_col(order, last)
    idx = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    xc = _canon_zero(x)
    remove = (xc < v_b) | ((xc == v_b) & (idx <= i_b))
    return remove & ((m > 0) & (p < 1.0))[:, None]


def top_k(logits, k) -> jax.Array:
    """Keep the tokens whose logit is ``>=`` the k-th largest (ties with it all kept); ``k [B]`` int,
    0 or ``>= V`` = off."""
    x = _f32(logits)
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (x.shape[0],))
    return _top_k_top_p(x, k, jnp.ones((x.shape[0],), jnp.float32))


def top_p(logits, p) -> jax.Array:
    """Nucleus filtering, HF rule: remove ascending-cumulative probability ``<= 1 - p``, keep the top
    token; ties ordered by index (lower index removed first). ``p [B]``, 1 = off."""
    x = _f32(logits)
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (x.shape[0],))
    return _top_k_top_p(x, jnp.zeros((x.shape[0],), jnp.int32), p)


# Candidates the fast top-k/top-p path takes with `lax.top_k` (powers of two). The tiers are tried in order,
# each through a `lax.cond`: 128 candidates cost about a third of 1024 on CPU at batch 32 (and 1024 about a
# thirtieth of a stable sort of 49152 logits); a batch whose kept sets may reach beyond the last tier falls
# back to the full sort (`_top_k_top_p_sorted`).
CANDIDATE_TIERS = (128, 1024)
TOP_CANDIDATES = CANDIDATE_TIERS[-1]


def _top_k_top_p(x, k, p, candidates: Optional[int] = None):
    """top-k then top-p, as `_top_k_top_p_sorted` decides it, from the largest logits: the ``candidates``
    largest when given, else CANDIDATE_TIERS in turn (a tier runs only when the one before could not
    decide some row); the full sort decides when the last one cannot."""
    tiers = CANDIDATE_TIERS if candidates is None else (int(candidates),)

    def run(i, z):
        if i == len(tiers):
            return _top_k_top_p_sorted(z, k, p)
        fast, ok = _top_k_top_p_candidates(z, k, p, tiers[i])
        return lax.cond(jnp.all(ok), lambda y: fast, lambda y: run(i + 1, y), z)

    return run(0, x)


def _top_k_top_p_candidates(x, k, p, candidates: int):
    """(top-k then top-p from the ``candidates`` largest logits, ok [B]: whether that row's result is exact).

    Exact when every row's decision lies inside its candidates: top-k needs ``k <= K``; top-p needs the
    tokens strictly above the last candidate's value (a complete set: every tie group above it is inside)
    to hold at least mass p, so everything at or below that value is removed anyway. The kept tokens are
    then a suffix of the candidates in (value, index) order, rebuilt from the first kept one without a
    scatter. The cumulative masses are summed in another order than the full sort's cumsum, so a token
    whose cumulative mass lies within float rounding (~1e-7) of ``1 - p`` may fall on the other side of
    the cut (as between the full sort and HF's torch code). `_top_k_top_p` sends the whole batch to the
    next tier when some row is not ok."""
    b, v = x.shape
    kc = min(int(candidates), v)
    xc = _canon_zero(x)
    top_vals, top_idx = lax.top_k(xc, kc)  # descending; ties: lower index first
    k_on = (k > 0) & (k < v)
    kth = jnp.where(k_on, jnp.take_along_axis(top_vals, jnp.clip(k - 1, 0, kc - 1)[:, None], axis=1)[:, 0], NEG_INF)
    y = jnp.where(xc >= kth[:, None], xc, NEG_INF)  # top-k applied (ties with the k-th all kept)
    # candidates in ascending (value, index) order: the stable full sort's order restricted to them
    cv = jnp.where(top_vals >= kth[:, None], top_vals, NEG_INF)
    cv, ci = lax.sort((cv, top_idx), dimension=1, num_keys=2)
    last = cv[:, :1]  # the smallest candidate value (after top-k)
    above = cv > last  # strictly above it: complete tie groups, in the full order
    lse = jax.nn.logsumexp(y, axis=-1, keepdims=True)
    probs_v = jnp.exp(y - lse)
    low = jnp.sum(jnp.where(y <= last, probs_v, 0.0), axis=-1, keepdims=True)  # mass at or below `last`
    cum = low + jnp.cumsum(jnp.where(above, jnp.exp(cv - lse), 0.0), axis=-1)
    p_on = p < 1.0
    ok = (~k_on | (k <= kc)) & (~p_on | (low[:, 0] <= 1.0 - p))
    rm = (cum <= (1.0 - p)[:, None]) & above & p_on[:, None]
    rm = rm.at[:, -1].set(False)  # the top token always stays
    first = jnp.sum(~above | rm, axis=-1, dtype=jnp.int32)  # first kept candidate (ascending)
    v_k = jnp.where(p_on, _take_col(cv, jnp.minimum(first, kc - 1))[:, 0], NEG_INF)
    i_k = jnp.where(p_on, _take_col(ci, jnp.minimum(first, kc - 1))[:, 0], 0)
    idx = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    keep = (y > v_k[:, None]) | ((y == v_k[:, None]) & (idx >= i_k[:, None]))
    fast = jnp.where(keep, x, NEG_INF)
    fast = jnp.where(k_on[:, None] | p_on[:, None], jnp.where(y > NEG_INF, fast, NEG_INF), x)
    return fast, ok


def _top_k_top_p_sorted(x, k, p):
    """top-k then top-p with a single sort of the whole vocabulary (the reference rule)."""
    vals, order = _sort_ascending(x)
    kth = _top_k_threshold(vals, k)
    x = jnp.where(x >= kth, x, NEG_INF)
    # the top-k survivors are a suffix of the ascending order, so masking `vals` keeps it sorted
    vals = jnp.where(vals >= kth, vals, NEG_INF)
    return jnp.where(_top_p_remove(x, vals, order, p), NEG_INF, x)


def min_p(logits, m) -> jax.Array:
    """Remove tokens with ``softmax < m * max(softmax)``; ``m [B]`` in [0, 1], 0 = off."""
    x = _f32(logits)
    m = _rows(m, x.shape[0], jnp.float32)
    probs = jax.nn.softmax(x, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    remove = (probs < m * top) & (probs < top)  # the most probable token always stays
    return jnp.where(remove, NEG_INF, x)


def typical_p(logits, mass) -> jax.Array:
    """Locally typical filtering (HF ``TypicalLogitsWarper``); ``mass [B]`` in (0, 1], 1 = off."""
    x = _f32(logits)
    b, v = x.shape
    mass = jnp.broadcast_to(jnp.asarray(mass, jnp.float32), (b,))
    logp = jax.nn.log_softmax(x, axis=-1)
    p = jnp.exp(logp)
    ent = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1, keepdims=True)  # HF: nansum
    score = jnp.abs(-logp - ent)
    s_sorted, x_sorted = lax.sort((score, x), dimension=1, num_keys=1, is_stable=True)
    cum = jnp.cumsum(jax.nn.softmax(x_sorted, axis=-1), axis=-1)
    last = jnp.minimum(jnp.sum(cum < mass[:, None], axis=-1, dtype=jnp.int32), v - 1)
    thr = _take_col(s_sorted, last)
    remove = (score > thr) & (mass < 1.0)[:, None]
    return jnp.where(remove, NEG_INF, x)


# --------------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------------

def process(logits, params: SamplingParams, seen_mask: Optional[jax.Array] = None) -> jax.Array:
    """Apply the whole chain in HF's order (module docstring) and return float32 logits ``[B, V]``.

    seen_mask: bool ``[B, V]`` (or int history ``[B, T]``) for the repetition penalty; without it the
    penalty is not applied. Greedy rows (temperature 0) get the repetition penalty only.
    Warpers no row uses are skipped at run time (``lax.cond``), so e.g. no sort runs without top-k/p.
    """
    x = _f32(logits)
    if seen_mask is not None:
        x = repetition_penalty(x, seen_mask, params.repetition_penalty)
    return warp(x, params)


def warp(logits, params: SamplingParams) -> jax.Array:
    """The warpers of `process` without the repetition penalty: temperature, top-k/top-p, min-p and
    typical-p on rows with temperature > 0 (greedy rows are returned unchanged)."""
    x = _f32(logits)
    b, v = x.shape
    t = jnp.broadcast_to(jnp.asarray(params.temperature, jnp.float32), (b,))
    sampling = t > 0
    k = jnp.where(sampling, jnp.asarray(params.top_k, jnp.int32), 0)
    p = jnp.where(sampling, jnp.asarray(params.top_p, jnp.float32), 1.0)
    mp = jnp.where(sampling, jnp.asarray(params.min_p, jnp.float32), 0.0)
    tp = jnp.where(sampling, jnp.asarray(params.typical_p, jnp.float32), 1.0)

    y = temperature(x, t)
    y = _when_any(((k > 0) & (k < v)) | (p < 1.0), lambda z: _top_k_top_p(z, k, p), y)
    y = _when_any(mp > 0, lambda z: min_p(z, mp), y)
    y = _when_any(tp < 1.0, lambda z: typical_p(z, tp), y)
    return y
