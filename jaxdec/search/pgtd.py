"""PG-TD (Zhang et al. 2023, "Planning with Large Language Models for Code Generation"): Monte-Carlo
tree search over tokens whose rollouts are complete programs scored on public test cases.

A **host-level search** (like `jaxdec.search.testtime.astar_decode`): the tree's shape depends on the
rewards, so it lives in Python; every model computation is compiled:

* selection by P-UCB, ``Q(s,a) + beta(s) * P(a|s) * sqrt(log N(s)) / (1 + N(s,a))`` with
  ``beta(s) = log((N(s) + c_base + 1) / c_base) + c``, Q the best reward seen below (s, a);
* expansion: the model's top-k next tokens at the node with their probabilities as priors;
* evaluation: a rollout completes the node's prefix with the compiled greedy decoder
  (`jaxdec.generate`, one compiled program per prompt whatever the prefix length) and the program is
  scored by ``reward(tokens) -> [0, 1]`` (for code: the fraction of public tests passed,
  `doctest_reward`); the best reward is backed up along the path;
* information sharing (the paper's caches): the **sequence cache** maps every prefix of a rollout's
  greedy part to that rollout, so selecting a node that lies on an earlier rollout reuses it with no
  decoder call; the **tree cache** stores the top-k of every position of a rollout (one teacher-forced
  forward over the finished sequence), so expanding a node on an earlier rollout needs no model call;
  rewards are cached per program.

`pgtd_search` returns the best program found (highest reward, first found on ties) and statistics:
``rollouts`` (iterations), ``decoder_calls`` (compiled greedy runs), ``forward_calls`` (teacher-forced
forwards), ``cache_hits`` (rollouts answered by the sequence cache), ``tree_hits`` (expansions
answered by the tree cache), ``reward_calls`` (programs run).

For HumanEval the public tests are the docstring examples, parsed with `doctest` (`public_tests`);
`doctest_reward` runs prompt + completion in a fresh interpreter (``subprocess``, never a process
forked from JAX) with a timeout. This is not a security sandbox: run it only on our own generations.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import bucket


# ----------------------------------------------------------------------------------------------------
# Public tests (doctest examples) and their reward
# ----------------------------------------------------------------------------------------------------

def public_tests(prompt_text: str) -> list:
    """The docstring examples of a prompt as doctest ``[(source, want), ...]``: the ``>>>`` examples with
    their expected output, then the written-out ones (`example_tests`: ``f(3) == 4``, ``f(3) => 4`` ...).
    No example: ValueError (PG-TD has nothing to score programs with)."""
    import doctest
    examples = doctest.DocTestParser().get_examples(prompt_text)
    tests = [(e.source, _without_docstring_end(e.want)) for e in examples]
    tests = [(src, want) for src, want in tests if want.strip()]
    seen = {src for src, _ in tests}
    tests += [t for t in example_tests(prompt_text) if t[0] not in seen]
    if not tests:
        raise ValueError("PG-TD needs public tests: the prompt has no doctest examples (a '>>> call' line followed "
                         "by its expected output); pass reward= to score programs another way")
    return tests


_EXAMPLE = re.compile(r"^\s*(?:>>>\s*)?(?:for\s+)?(?P<call>[A-Za-z_]\w*\(.*\))\s*"
                      r"(?:==>|=>|==|->|→|➞|=)\s*(?P<value>.+?)\s*$")


def example_tests(prompt_text: str) -> list:
    """Examples written out in the prompt's text (as most HumanEval problems from 100 on give them):
    lines ``name(args) == value`` (or ``=``, ``=>``, ``==>``, ``->``, an arrow; a leading ``>>>`` or ``for``
    allowed) where ``name`` is a function the prompt defines and the arguments and the value are Python
    literals. Each becomes the doctest ``[("(call) == (value)", "True\n")]``; anything else is skipped."""
    import ast
    names = set(re.findall(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", prompt_text, re.M))
    out, seen = [], set()
    for line in prompt_text.splitlines():
        m = _EXAMPLE.match(line)
        if not m:
            continue
        call, value = m.group("call"), m.group("value").rstrip(".,;")
        try:
            node = ast.parse(call, mode="eval").body
            ast.literal_eval(value)
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names
                    and not node.keywords):
                continue
            for a in node.args:
                ast.literal_eval(a)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            continue
        src = f"({call}) == ({value})\n"
        if src not in seen:
            seen.add(src)
            out.append((src, "True\n"))
    return out


def _without_docstring_end(want: str) -> str:
    """An example's expected output without the docstring's closing quotes (in a HumanEval prompt the
    last example's output runs on to the closing line, which doctest reads as part of it)."""
    lines = []
    for line in want.splitlines():
        body = line.rstrip()
        for q in ('"""', "'''"):
            if body.endswith(q):
                body = body[:-3].rstrip()
        if body.strip():
            lines.append(body)
    return "".join(ln + "\n" for ln in lines)


_CHILD = r"""
import doctest, json, sys
req = json.load(sys.stdin)
g = {"__name__": "__pgtd__"}
try:
    exec(compile(req["program"], "<program>", "exec"), g)
except BaseException:
    print(json.dumps({"passed": 0}))
    sys.exit(0)
runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
passed = 0
for src, want in req["tests"]:
    t = doctest.DocTest([doctest.Example(src, want)], g, "public", None, 0, None)
    try:
        r = runner.run(t, out=lambda s: None, clear_globs=False)
        passed += r.failed == 0
    except BaseException:
        pass
print(json.dumps({"passed": passed}))
"""


def run_public_tests(program: str, tests: Sequence, timeout: float = 5.0) -> float:
    """Fraction of ``tests`` (doctest ``(source, want)`` pairs) that ``program`` passes, run in a fresh
    interpreter with a wall-clock ``timeout`` (a timeout or a crash scores 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=json.dumps(
            {"program": program, "tests": [list(t) for t in tests]}), capture_output=True, text=True,
            timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return 0.0
    try:
        passed = json.loads(proc.stdout.strip().splitlines()[-1])["passed"]
    except (ValueError, IndexError, KeyError):
        return 0.0
    return passed / len(tests)


HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert")


def truncate_program(text: str, stops: Sequence[str] = HUMANEVAL_STOP) -> str:
    """``text`` up to the first stop sequence (the end of the function body for a completion)."""
    cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
    return text[:cut]


def doctest_reward(prompt_text: str, decode: Callable[[list], str], timeout: float = 5.0,
                   tests: Optional[Sequence] = None) -> Callable[[list], float]:
    """reward(completion tokens) for a code-completion prompt: the fraction of its public tests
    (`public_tests` unless ``tests`` is given) passed by ``prompt_text + truncated completion``."""
    tests = public_tests(prompt_text) if tests is None else list(tests)
    if not tests:
        raise ValueError("PG-TD needs public tests: tests= is empty")

    def reward(tokens):
        return run_public_tests(prompt_text + truncate_program(decode(list(tokens))), tests, timeout)
    return reward


# ----------------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Node:
    """A tree node: the generated tokens so far (``prefix``), its prior P(a|s) under the model, its
    children (None until expanded), visit count, the best reward seen below it and whether its subtree
    is exhausted (selection skips exhausted children: a finished program is never re-scored)."""

    prefix: tuple
    prior: float = 1.0
    children: Optional[list] = None
    visits: int = 0
    best: float = 0.0
    done: bool = False  # nothing left to explore below (terminal, or every child done)


@functools.partial(jax.jit, static_argnames=("model", "k"))
def _topk_along(model, params, ids, k: int):
    """Teacher-forced forward over ``ids [1, T]``: top-k tokens and probabilities after every position."""
    t = ids.shape[1]
    out = model(params, ids, jnp.arange(t, dtype=jnp.int32)[None], model.init_cache(1, t))
    probs = jax.nn.softmax(out.logits[0].astype(jnp.float32), axis=-1)
    p, tok = jax.lax.top_k(probs, k)
    return tok, p


def _greedy(model, params, ids, max_new_tokens: int, capacity: int, longest: int, kw: dict) -> list:
    """The compiled greedy decoder's continuation of ``ids`` (one compiled program for every prefix of a
    search: the prompt bucket, cache and output capacity are fixed by ``longest`` and ``capacity``)."""
    from jaxdec.core.generate import generate
    g = generate(model, params, [ids], method="greedy", max_new_tokens=max_new_tokens, capacity=capacity,
                 longest_prompt=longest, **kw)
    return list(g.tokens[0])


class PGTD:
    """One PG-TD search for one prompt (see the module docstring). ``cache=False`` turns the tree and
    sequence caches off (every rollout runs the decoder, every expansion a forward): the control that
    shows what the caches save."""

    def __init__(self, model, params, prompt, reward: Callable[[list], float], *, top_k: int = 3,
                 max_new_tokens: int = 128, c_base: float = 10.0, c: float = 4.0, stop_ids=None, cache: bool = True,
                 generate_kw: Optional[dict] = None):
        if reward is None:
            raise ValueError("PG-TD needs public tests: pass reward= (e.g. doctest_reward(prompt_text, decode))")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.model, self.params, self.prompt = model, params, [int(t) for t in prompt]
        if not self.prompt:
            raise ValueError("prompt is empty")
        self.reward_fn, self.k, self.max_new = reward, top_k, max_new_tokens
        self.c_base, self.c = float(c_base), float(c)
        self.stop = set(model.eos_ids if stop_ids is None else stop_ids)
        self.kw = dict(generate_kw or {})
        if stop_ids is not None:
            self.kw["stop_ids"] = tuple(stop_ids)
        self.use_cache = cache
        self.capacity = bucket(max_new_tokens, 16)
        self.longest = len(self.prompt) + max_new_tokens
        self.seq_cache: dict = {}  # prefix -> completed sequence through it
        self.tree_cache: dict = {}  # prefix -> [(token, prob)] top-k
        self.rewards: dict = {}  # completed sequence -> reward
        self.stats = {"rollouts": 0, "decoder_calls": 0, "forward_calls": 0, "cache_hits": 0, "tree_hits": 0,
                      "reward_calls": 0}
        self.best_seq, self.best_reward = None, -1.0
        self.root = Node(())

    # -- model pieces --------------------------------------------------------------------------
    def _fill_tree_cache(self, seq: tuple, upto: int):
        """Top-k after prompt + seq[:i] for i in 0..upto (one teacher-forced forward)."""
        ids = self.prompt + list(seq[:upto])
        arr = np.zeros((1, bucket(len(ids))), np.int32)
        arr[0, :len(ids)] = ids
        tok, p = _topk_along(self.model, self.params, jnp.asarray(arr), self.k)
        self.stats["forward_calls"] += 1
        tok, p = np.asarray(tok), np.asarray(p, np.float64)
        n = len(self.prompt)
        for i in range(upto + 1):
            row = n - 1 + i
            self.tree_cache.setdefault(tuple(seq[:i]), [(int(a), float(b)) for a, b in zip(tok[row], p[row])])

    def _topk(self, prefix: tuple) -> list:
        if self.use_cache and prefix in self.tree_cache:
            self.stats["tree_hits"] += 1
            return self.tree_cache[prefix]
        if not self.use_cache:
            self.tree_cache.clear()
        self._fill_tree_cache(prefix, len(prefix))
        return self.tree_cache[prefix]

    def _terminal(self, prefix: tuple) -> bool:
        return len(prefix) >= self.max_new or (len(prefix) > 0 and prefix[-1] in self.stop)

    def _rollout(self, prefix: tuple) -> tuple:
        if self._terminal(prefix):
            return prefix
        if self.use_cache and prefix in self.seq_cache:
            self.stats["cache_hits"] += 1
            return self.seq_cache[prefix]
        cont = _greedy(self.model, self.params, self.prompt + list(prefix), self.max_new - len(prefix), self.capacity,
                       self.longest, self.kw)
        self.stats["decoder_calls"] += 1
        seq = prefix + tuple(int(t) for t in cont)
        if self.use_cache:
            for i in range(len(prefix), len(seq) + 1):
                self.seq_cache.setdefault(seq[:i], seq)
            self._fill_tree_cache(seq, max(len(seq) - 1, 0))
        return seq

    def _reward(self, seq: tuple) -> float:
        if seq not in self.rewards:
            r = float(self.reward_fn(list(seq)))
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"reward must be in [0, 1], got {r}")
            self.rewards[seq] = r
            self.stats["reward_calls"] += 1
        return self.rewards[seq]

    # -- the search ---------------------------------------------------------------------------
    def _select(self, node: Node) -> Node:
        beta = math.log((node.visits + self.c_base + 1) / self.c_base) + self.c
        explore = math.sqrt(math.log(max(node.visits, 1)))

        def score(ch):
            return (ch.best + beta * ch.prior * explore / (1 + ch.visits), ch.prior)
        return max((ch for ch in node.children if not ch.done), key=score)

    def iterate(self):
        """One selection -> rollout -> expansion -> backup (the root must not be exhausted). The leaf is
        expanded after its rollout (the children do not depend on the order) so that, with the caches, the
        rollout's teacher-forced forward already holds the leaf's top-k."""
        node, path = self.root, [self.root]
        while node.children and not self._terminal(node.prefix):
            node = self._select(node)
            path.append(node)
        seq = self._rollout(node.prefix)  # first: its forward fills the tree cache the expansion reads
        if node.children is None and not self._terminal(node.prefix):
            node.children = [Node(node.prefix + (t,), p) for t, p in self._topk(node.prefix)]
        r = self._reward(seq)
        self.stats["rollouts"] += 1
        if r > self.best_reward:
            self.best_seq, self.best_reward = seq, r
        for n in reversed(path):
            n.visits += 1
            n.best = max(n.best, r)
            n.done = self._terminal(n.prefix) or (n.children is not None and all(ch.done for ch in n.children))
        return r

    def run(self, rollouts: int, stop_at: Optional[float] = 1.0, max_decoder_calls: Optional[int] = None):
        """Up to ``rollouts`` iterations; stops early once a rollout scores ``stop_at`` or the tree is
        exhausted, or (``max_decoder_calls``) before an iteration once the compiled greedy decoder has run
        that many times (rollouts the sequence cache answers are free). Returns (best sequence, its reward)."""
        if isinstance(rollouts, bool) or not isinstance(rollouts, int) or rollouts < 1:
            raise ValueError(f"rollouts must be an integer >= 1, got {rollouts!r}")
        if max_decoder_calls is not None and (isinstance(max_decoder_calls, bool) or
                                              not isinstance(max_decoder_calls, int) or max_decoder_calls < 1):
            raise ValueError(f"max_decoder_calls must be an integer >= 1, got {max_decoder_calls!r}")
        for _ in range(rollouts):
            if self.root.done:
                break
            if max_decoder_calls is not None and self.stats["decoder_calls"] >= max_decoder_calls:
                break
            r = self.iterate()
            if stop_at is not None and r >= stop_at:
                break
        return list(self.best_seq), self.best_reward


def pgtd_search(model, params, prompts, rewards, *, rollouts: int = 16, top_k: int = 3, max_new_tokens: int = 128,
                c_base: float = 10.0, c: float = 4.0, stop_ids=None, stop_at: Optional[float] = 1.0,
                cache: bool = True, generate_kw: Optional[dict] = None):
    """PG-TD for each prompt (token ids) with its ``rewards[i](tokens) -> [0, 1]``; returns a
    `Generation`: the best program per prompt, ``extras["rewards"]`` their rewards on the public tests
    and ``stats`` the searches' summed counters (``model_calls`` = decoder calls + forwards).
    stop_at: end a search once a rollout scores this (None: spend every rollout)."""
    from jaxdec.core.generate import Generation
    prompts = [list(p) for p in prompts]
    if rewards is None or len(rewards) != len(prompts) or any(r is None for r in rewards):
        raise ValueError("PG-TD needs public tests: pass one reward function per prompt (e.g. doctest_reward)")
    tokens, got, reasons, total = [], [], [], {}
    for p, rw in zip(prompts, rewards):
        s = PGTD(model, params, p, rw, top_k=top_k, max_new_tokens=max_new_tokens, c_base=c_base, c=c,
                 stop_ids=stop_ids, cache=cache, generate_kw=generate_kw)
        seq, r = s.run(rollouts, stop_at)
        tokens.append(seq)
        got.append(r)
        reasons.append("eos" if seq and seq[-1] in s.stop else "length")
        for k, v in s.stats.items():
            total[k] = total.get(k, 0) + v
    total["model_calls"] = total["decoder_calls"] + total["forward_calls"]
    total["new_tokens"] = sum(len(t) for t in tokens)
    return Generation(prompt_ids=prompts, tokens=tokens, finish_reason=reasons, stats=total,
                      extras={"rewards": got})
