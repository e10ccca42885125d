"""PG-TD (`jaxdec.search.pgtd`): the tree search, its caches, the public-test reward, bad input.

* Toy model (`TrigramModel`) where the best program is known: the reward is the fraction of "tests"
  (one per position) a sequence passes against a target that takes the model's *second* choice at the
  first two steps and then its greedy continuation. Greedy scores below 1; PG-TD finds the target.
* Cache reuse, calls counted: the compiled greedy rollout is wrapped with a counter; with the caches on,
  rollouts that lie on an earlier rollout cost no decoder call (decoder calls + cache hits = the decoder
  calls without caches), expansions cost no forward, and the search is otherwise the same (same best
  sequence and reward).
* Public tests: doctest examples parsed from a HumanEval docstring, run in a fresh interpreter with a
  timeout (a correct program 1.0, a half-right one 0.5, a crash or an endless loop 0); a prompt
  without examples, or no reward, is a clear error.
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jaxdec import generate  # noqa: E402
from jaxdec.search import pgtd as P  # noqa: E402
from jaxdec.testing.toy_speculative import TrigramModel, random_table  # noqa: E402

V, L = 10, 6
PROMPT = [3, 4]


def toy(seed=7):
    tab = random_table(seed, V, 1.0)
    return TrigramModel(V, eos_ids=()), {"table": jnp.asarray(tab)}, tab


def ranked(tab, prev, cur):
    return list(np.argsort(-tab[prev, cur], kind="stable"))


def target_sequence(tab):
    """The model's second choice at the first two steps, then its greedy continuation (numpy, from the table)."""
    seq, prev, cur = [], PROMPT[0], PROMPT[1]
    for i in range(L):
        nxt = int(ranked(tab, prev, cur)[1 if i < 2 else 0])
        seq.append(nxt)
        prev, cur = cur, nxt
    return seq


def position_reward(target):
    def reward(tokens):
        return float(np.mean([i < len(tokens) and tokens[i] == t for i, t in enumerate(target)]))
    return reward


@pytest.mark.parametrize("seed", [7, 0, 3, 9])
def test_toy_search_finds_the_known_best_program(seed):
    model, params, tab = toy(seed)
    target = target_sequence(tab)
    reward = position_reward(target)
    greedy = generate(model, params, [PROMPT], method="greedy", max_new_tokens=L, stop_ids=()).tokens[0]
    assert reward(greedy) < 1.0 and reward(target) == 1.0
    g = P.pgtd_search(model, params, [PROMPT], [reward], rollouts=40, top_k=2, max_new_tokens=L, stop_ids=())
    assert g.tokens[0] == target and g.extras["rewards"] == [1.0], (g.tokens, target, g.stats)
    assert g.stats["rollouts"] < 40 and g.stats["model_calls"] == g.stats["decoder_calls"] + g.stats["forward_calls"]
    if seed != 7:
        return
    # the first rollout (from the root) is exactly the compiled greedy decoder's output
    s = P.PGTD(model, params, PROMPT, reward, top_k=2, max_new_tokens=L, stop_ids=())
    s.iterate()
    assert list(s.best_seq) == greedy
    # with one child per node the search can only ever find greedy (negative control)
    g1 = P.pgtd_search(model, params, [PROMPT], [reward], rollouts=40, top_k=1, max_new_tokens=L, stop_ids=())
    assert g1.tokens[0] == greedy and g1.extras["rewards"][0] < 1.0


def test_rollouts_reuse_cached_prefixes_calls_counted(monkeypatch):
    model, params, tab = toy()
    reward = position_reward(target_sequence(tab))
    calls = []
    real = P._greedy

    def counted(model, params, ids, *a, **k):
        calls.append(list(ids))
        return real(model, params, ids, *a, **k)

    monkeypatch.setattr(P, "_greedy", counted)
    runs = {}
    for cache in (True, False):
        calls.clear()
        s = P.PGTD(model, params, PROMPT, reward, top_k=2, max_new_tokens=L, stop_ids=(), cache=cache)
        s.run(12, stop_at=None)
        runs[cache] = (dict(s.stats), len(calls), list(s.best_seq), s.best_reward)
    st, n_calls, best, r = runs[True]
    st0, n_calls0, best0, r0 = runs[False]
    assert n_calls == st["decoder_calls"] and n_calls0 == st0["decoder_calls"]  # every decoder run is counted
    assert st["cache_hits"] > 0 and st0["cache_hits"] == 0
    assert st["decoder_calls"] < st0["decoder_calls"], (st, st0)
    # each rollout is a decoder call, a cache hit or a terminal node (nothing left to generate)
    assert st["decoder_calls"] + st["cache_hits"] <= st["rollouts"] == st0["rollouts"] == 12
    assert st0["decoder_calls"] == st["decoder_calls"] + st["cache_hits"]
    # the caches change the cost, not the search
    assert (best, r) == (best0, r0)
    # the tree cache answered every expansion (each costs one forward without it): with the caches the
    # only forwards are one per decoder call (the rollout's top-k along its sequence)
    assert st0["tree_hits"] == 0 and st["tree_hits"] == st0["forward_calls"] > 0
    assert st["forward_calls"] == st["decoder_calls"]


HE_PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''
RIGHT = ("    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
         "\n\ndef unrelated():\n    pass\n")


def test_public_tests_reward_in_a_fresh_interpreter():
    tests = P.public_tests(HE_PROMPT)
    assert [w.strip() for _, w in tests] == ["False", "True"]
    decode = "".join  # "tokens" are text pieces here
    reward = P.doctest_reward(HE_PROMPT, decode, timeout=5.0)
    assert reward([RIGHT]) == 1.0
    assert reward(["    return False\n"]) == 0.5
    assert reward(["    return (\n"]) == 0.0  # syntax error
    assert reward(["    raise SystemExit(3)\n"]) == 0.0
    assert P.run_public_tests(HE_PROMPT + "    while True:\n        pass\n", tests, timeout=1.0) == 0.0
    assert P.truncate_program(RIGHT) == RIGHT[:RIGHT.index("\ndef ")]


def test_bad_input():
    model, params, _ = toy()
    with pytest.raises(ValueError, match="PG-TD needs public tests: the prompt has no doctest examples"):
        P.public_tests("def f(x):\n    '''Return x.'''\n")
    with pytest.raises(ValueError, match="PG-TD needs public tests"):
        P.doctest_reward("def f(x):\n    pass\n", "".join)
    with pytest.raises(ValueError, match="PG-TD needs public tests"):
        P.pgtd_search(model, params, [PROMPT], None)
    with pytest.raises(ValueError, match="PG-TD needs public tests"):
        P.pgtd_search(model, params, [PROMPT, PROMPT], [lambda t: 0.0])
    with pytest.raises(ValueError, match="top_k must be"):
        P.PGTD(model, params, PROMPT, lambda t: 0.0, top_k=0)
    with pytest.raises(ValueError, match="rollouts must be"):
        P.PGTD(model, params, PROMPT, lambda t: 0.0).run(0)
    with pytest.raises(ValueError, match="reward must be in"):
        P.PGTD(model, params, PROMPT, lambda t: 2.0, max_new_tokens=3, stop_ids=()).run(1)


def test_cli_registration():
    from jaxdec import cli
    cli.build_parser()
    assert "pgtd" in cli.METHODS and "pgtd" in cli.PAPERS
