"""Self-consistency helpers (jaxdec against itself, e.g. batched vs alone): teacher-forced step logits."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache import bucket


def step_logits(model, params, prompt, tokens) -> np.ndarray:
    """Logits that predicted each of `tokens` after `prompt` ([len(tokens), V]), one uncached forward."""
    ids = list(prompt) + list(tokens)
    t = bucket(len(ids))
    arr = np.zeros((1, t), np.int32)
    arr[0, :len(ids)] = ids
    at = np.arange(len(prompt) - 1, len(ids) - 1, dtype=np.int32)[None]
    out = _jitted(model)(params, jnp.asarray(arr), jnp.arange(t)[None], model.init_cache(1, t), logits_at=jnp.asarray(at))
    return np.asarray(out.logits[0])


@functools.lru_cache(maxsize=None)
def _jitted(model):
    return jax.jit(model.__call__)


def teacher_logits(model, params, prompts, conts) -> list:
    """`step_logits` for each (prompt, continuation) pair: the reference step logits the near-tie
    helper reads."""
    return [step_logits(model, params, p, c) for p, c in zip(prompts, conts)]


def block_vs_step_dlogit(model, params, prompt, t: int) -> float:
    """Measured max |dlogit| between one t-token block through the cache (as a verify call computes it)
    and t one-token decode calls (as plain greedy computes it), after ``prompt``."""
    ids = jnp.asarray([prompt], jnp.int32)
    n = ids.shape[1]
    follow = jnp.asarray([[(37 * i + 11) % 2000 + 100 for i in range(t)]], jnp.int32)

    @jax.jit
    def both(p):
        cache = model(p, ids, jnp.arange(n)[None], model.init_cache(1, bucket(n + t + 1))).cache
        blk = model(p, follow, n + jnp.arange(t)[None], cache).logits[0]
        step, c = [], cache
        for i in range(t):
            o = model(p, follow[:, i:i + 1], jnp.full((1, 1), n + i), c)
            c = o.cache
            step.append(o.logits[0, 0])
        return blk, jnp.stack(step)

    a, b = both(params)
    return float(jnp.max(jnp.abs(a - b)))


class LazyStepLogits:
    """`step_logits(model, params, prompt, tokens)` computed on first use: the near-tie helper reads a
    sequence's reference logits only where the compared tokens differ, so most are never needed."""

    def __init__(self, model, params, prompt, tokens):
        self._args = (model, params, list(prompt), list(tokens))
        self._value = None

    def __len__(self):
        return len(self._args[3])

    def __getitem__(self, i):
        if self._value is None:
            self._value = step_logits(*self._args)
        return self._value[i]


def lazy_teacher_logits(model, params, prompts, conts) -> list:
    """`teacher_logits`, each sequence's logits computed only if the near-tie helper asks for them."""
    return [LazyStepLogits(model, params, p, c) for p, c in zip(prompts, conts)]


def lazy_block_vs_step_dlogit(model, params, prompt, t: int):
    """`block_vs_step_dlogit` as a memoized callable (the near-tie helper calls it only at a divergence)."""
    memo = []

    def get() -> float:
        if not memo:
            memo.append(block_vs_step_dlogit(model, params, prompt, t))
        return memo[0]
    return get
