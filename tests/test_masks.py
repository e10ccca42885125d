"""jaxdec.masks: each constant does what its meaning needs, and the modules that mask use them (not a
local copy that could drift)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import masks


def test_attention_mask_value_keeps_fully_masked_rows_finite():
    scores = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.1, 0.2]], jnp.float32)
    visible = jnp.array([[True, False, True], [False, False, False]])
    p = jax.nn.softmax(jnp.where(visible, scores, masks.ATTENTION_MASK_VALUE), axis=-1)
    assert np.isfinite(np.asarray(p)).all()
    assert float(p[0, 1]) == 0.0  # a row with visible keys gives masked keys exactly 0
    # the reason it is finite: -inf makes the fully masked row NaN
    p_inf = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    assert np.isnan(np.asarray(p_inf)[1]).all()
    assert math.isfinite(masks.ATTENTION_MASK_VALUE)


def test_banned_logit_gives_probability_exactly_zero():
    logits = jnp.array([3.0, 50.0, -2.0], jnp.float32)
    banned = jnp.where(jnp.array([False, True, False]), masks.BANNED_LOGIT, logits)
    p = jax.nn.softmax(banned)
    assert float(p[1]) == 0.0 and int(jnp.argmax(banned)) == 0
    assert banned.dtype == jnp.float32  # a weakly typed Python float keeps the logits' dtype
    assert masks.IMPOSSIBLE_LOGPROB == -math.inf and not (masks.IMPOSSIBLE_LOGPROB > masks.IMPOSSIBLE_LOGPROB)


def test_empty_beam_score_is_finite_and_stays_ordered():
    s = jnp.float32(masks.EMPTY_BEAM_SCORE)
    # sums with real log-probabilities stay finite and below any real beam's score
    assert np.isfinite(float(s + jnp.float32(-50.0))) and float(s + jnp.float32(-50.0)) < -50.0 * 100
    assert not np.isnan(float(s - s))  # -inf - -inf would be NaN


def test_modules_use_the_shared_constants():
    from jaxdec.attention import reference
    from jaxdec.core import logits, processors
    from jaxdec.search import common, stochastic
    assert reference.NEG is masks.ATTENTION_MASK_VALUE
    assert logits.BANNED is masks.BANNED_LOGIT and processors.NEG_INF is masks.BANNED_LOGIT
    assert common.NEG is masks.EMPTY_BEAM_SCORE
    assert stochastic.NEG_INF is masks.IMPOSSIBLE_LOGPROB
    import pallas_kernels.tree_attention as ta
    assert not hasattr(ta, "NEG")  # the kernel reads masks.ATTENTION_MASK_VALUE inside its functions
    m, l = ta.init_state(2, 4)[1:]
    assert float(m[0, 0]) == np.float32(masks.ATTENTION_MASK_VALUE) and float(l[0, 0]) == 0.0
