"""The statistics of DESIGN.md's conventions, shared by the distribution tests."""
from __future__ import annotations

import numpy as np
import scipy.stats


def pooled_chisquare_p(observed, probs):
    """Chi-square goodness-of-fit p-value. Bins whose expected count is below 5 (zero-probability bins
    included) are pooled into one bin, or folded into the smallest regular bin when the pool itself
    expects fewer than 5."""
    observed = np.asarray(observed, float).ravel()
    probs = np.asarray(probs, float).ravel()
    exp = probs * observed.sum()
    small = exp < 5
    obs_b, exp_b = list(observed[~small]), list(exp[~small])
    if small.any():
        o, e = observed[small].sum(), exp[small].sum()
        if e < 5:
            j = int(np.argmin(exp_b))
            obs_b[j] += o
            exp_b[j] += e
        else:
            obs_b.append(o)
            exp_b.append(e)
    assert len(obs_b) >= 3, "too few bins for a chi-square test"
    return scipy.stats.chisquare(np.array(obs_b), np.array(exp_b)).pvalue


def assert_speculative_joint(make_decoder, model, params, table, seeds, rows=100_000, alpha=1e-4, min_tau=1.05):
    """A sampling-verified speculative decoder on a `jaxdec.testing.toy_speculative` target: from the prompt
    (3, 1), the joint distribution of its first three tokens over ``rows`` rows equals the table's exact
    joint (pooled chi-square p > alpha), drafts were accepted (τ > min_tau: the speculative path ran), and
    the same decoder without residual resampling (``make_decoder(residual=False)``, the negative control)
    is rejected (p < alpha). -> the good run's stats."""
    import jax
    import jax.numpy as jnp

    from jaxdec.core import loop
    from jaxdec.core.processors import SamplingParams
    from jaxdec.core.state import DecodeInputs
    from jaxdec.testing.toy_speculative import exact_joint

    tv = model.vocab_size
    joint = exact_joint(table, (3, 1), 3, 1.0)

    def run(dec, seed):
        prompts = jnp.asarray(np.repeat(np.array([[3, 1]], np.int32), rows, 0))
        keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(seed), rows)).astype(jnp.uint32)
        inputs = DecodeInputs(max_new=jnp.full((rows,), 3, jnp.int32), min_new=jnp.zeros((rows,), jnp.int32),
                              keys=keys, stop_ids=jnp.zeros((0,), jnp.int32), out_buffer=jnp.zeros((rows, 4), jnp.int32),
                              sampling=SamplingParams.create(rows, temperature=1.0))
        st = loop.run_jit(dec, model, params, prompts, jnp.full((rows,), 2, jnp.int32), inputs,
                          2 + 4 + dec.cache_headroom + 1)
        t = np.asarray(st.tokens)
        return np.bincount((t[:, 0] * tv + t[:, 1]) * tv + t[:, 2], minlength=tv ** 3), dec.summarize(st)

    good, stats = run(make_decoder(residual=True), seeds[0])
    assert pooled_chisquare_p(good, joint) > alpha
    assert stats["tau"] > min_tau, stats
    bad, _ = run(make_decoder(residual=False), seeds[1])
    assert pooled_chisquare_p(bad, joint) < alpha
    return stats
