"""Mask and sentinel values, one named constant per meaning (this module imports nothing).

Three different values because three different things need them:

* `ATTENTION_MASK_VALUE` (-1e30, finite): the score given to keys a query may not see. Attention needs a
  finite value: a row with every key masked would be softmax over all -inf, i.e. exp(-inf - -inf) = NaN,
  which then spreads through the layer; with a finite value such a row stays finite (and kernels that
  track an online max start it here). Any row with one visible key still gives masked keys exactly 0
  probability (exp(-1e30 - m) underflows to 0 for any real score m).
* `BANNED_LOGIT` (-inf): a token that may not be chosen (bans, top-k / top-p / min-p filters, constraint
  masks). Logits can use -inf: a processed row always keeps at least one finite token, so softmax gives
  the banned ones probability exactly 0 and argmax or Gumbel-max never picks them.
* `IMPOSSIBLE_LOGPROB` (-inf): the log-probability of an event that cannot happen, e.g. a dead hypothesis
  in stochastic beam search (Gumbel-top-k): it must compare below every real perturbed score, and
  ``x > IMPOSSIBLE_LOGPROB`` is the test for "still alive".
* `EMPTY_BEAM_SCORE` (-1e9, finite): the score of an empty beam slot (HF's value). Beam scores are summed
  and sorted; a finite value keeps sums ordered and never makes NaN (-inf + inf) where they are
  combined with other scores or penalties.

Python floats on purpose: they are weakly typed, so ``jnp.where(m, x, BANNED_LOGIT)`` keeps x's dtype.
"""

ATTENTION_MASK_VALUE = -1e30
BANNED_LOGIT = float("-inf")
IMPOSSIBLE_LOGPROB = float("-inf")
EMPTY_BEAM_SCORE = -1.0e9

__all__ = ["ATTENTION_MASK_VALUE", "BANNED_LOGIT", "IMPOSSIBLE_LOGPROB", "EMPTY_BEAM_SCORE"]
