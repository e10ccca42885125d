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
