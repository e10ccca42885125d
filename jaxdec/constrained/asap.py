"""Grammar-aligned sampling: ASAp (Adaptive Sampling with Approximate expected futures, Park et al. 2024,
"Grammar-Aligned Decoding").

Grammar-constrained decoding (GCD: mask the tokens the grammar refuses, renormalize, sample) does not sample
the model's distribution conditioned on the grammar, ``P(s | s in G) = P(s) 1[s in G] / Z``: it
renormalizes locally, as if every allowed prefix had the same chance of ending in the grammar. The exact
conditional samples token ``t`` after prefix ``w`` with weight ``P(t | w) c(w t)``, where the *expected
future grammaticality* ``c(w) = sum_{s in G, s = w u} P(u | w)`` is the model's probability that a
continuation of ``w`` completes a string of ``G``. ASAp keeps a trie of the prefixes it has sampled; each
node stores the model's next-token probabilities over the tokens the grammar allows there and an estimate
``ĉ`` of ``c`` for each allowed child (1 until the child is explored: the GCD assumption, an upper bound;
EOS after an accepting prefix is exactly 1). Token ``t`` is drawn with probability
``P(t | w) ĉ(w t) / sum_t' P(t' | w) ĉ(w t')``. After each complete sample the estimates along the sampled
path are updated bottom-up with the paper's rule

    ĉ(w) <- sum_{t allowed after w} P(t | w) ĉ(w t)

(the children's mass), so a dead end (a prefix with no allowed token, e.g. at ``max_len`` before the grammar
accepts) gets 0 and its ancestors lose its mass. Plain masked sampling is ``ĉ ≡ 1`` (``mode="gcd"``). Once
every prefix with positive mass has been sampled through after its whole subtree was explored, the
estimates are exact and the proposal equals ``P(s | s in G, |s| <= max_len)``; in between the proposal probability of each sample is returned so that it
can be importance-weighted.

    from jaxdec.constrained import regex
    from jaxdec.constrained.asap import asap_sample
    res = asap_sample(model_fn, regex("(yes|no)"), n_samples=100, max_len=4, seed=0, tokenizer=tok)
    res.samples, res.log_q          # token lists (EOS not included) and log proposal probabilities
    res.sampler.proposal_distribution()   # {tokens: proposal probability} over the whole (finite) language

``model_fn(prefix: tuple[int, ...]) -> [V]`` next-token log-probabilities (logits are normalized with a
log-softmax) for the tokens after ``prefix``: a toy categorical in tests, or a jitted one-step score
function of a real model (`kv_score_fn`: the prompt prefilled once, each call runs only the tokens after
the prefix its KV cache holds; `score_fn`: the whole prompt + buffer per call). The grammar is a `Constraint` (compiled by the llguidance or outlines
engine for ``tokenizer``) or any `jaxdec.constrained.engines.Matcher` in its start state (`DFAMatcher` is a
pure-Python one for tiny vocabularies). Everything runs on the host, one sample at a time; the model is
called once per new trie node.

CLI: ``jaxdec generate --method asap --regex RE --asap-samples N [--asap-warmup W]`` (registered in
`jaxdec.search.cli`; any constraint flag or per-row prompts-file field) runs `grammar_aligned_generate`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import numpy as np

from jaxdec.constrained.engines import ConstraintError, Matcher, eos_only, mask_to_ids, words

MODES = ("asap", "gcd")


# ---------------------------------------------------------------------------------------------------
# a pure-Python grammar adapter (tiny vocabularies, tests)
# ---------------------------------------------------------------------------------------------------

class DFAMatcher(Matcher):
    """A deterministic automaton over token ids behind the `Matcher` interface.

    ``transitions``: {state: {token: next_state}} (a missing entry refuses the token); ``accepting``: the
    states where the string may end (EOS allowed). ``eos`` is the EOS token id, ``vocab_size`` the size of
    the masks. The matcher is a stack of states, so rollback and copy are list operations.
    """

    def __init__(self, transitions: dict, start, accepting, vocab_size: int, eos: int, _stack=None):
        if not isinstance(transitions, dict):
            raise TypeError(f"transitions: expected a dict {{state: {{token: next_state}}}}, got "
                            f"{type(transitions).__name__}")
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
        if not isinstance(eos, (int, np.integer)) or not 0 <= eos < vocab_size:
            raise ValueError(f"eos: expected a token id in [0, {vocab_size}), got {eos!r}")
        for s, row in transitions.items():
            for t in row:
                if not 0 <= int(t) < vocab_size or int(t) == eos:
                    raise ValueError(f"transitions: state {s!r} has token {t!r}, outside [0, {vocab_size}) or EOS")
        self.transitions, self.start, self.accept = transitions, start, frozenset(accepting)
        self.vocab_size, self.eos = int(vocab_size), int(eos)
        self.stack = _stack if _stack is not None else [start]

    def _ids(self):
        top = self.stack[-1]
        if isinstance(top, _Stop):
            return [self.eos]
        ids = sorted(int(t) for t in self.transitions.get(top, {}))
        if top in self.accept:
            ids.append(self.eos)
        return ids

    def fill(self, out):
        top = self.stack[-1]
        if isinstance(top, _Stop):
            out[...] = eos_only(self.vocab_size, self.eos)
            return
        bits = np.zeros((words(self.vocab_size) * 32,), np.uint8)
        bits[self._ids()] = 1
        out[...] = np.packbits(bits, bitorder="little").view(np.int32)

    def consume(self, token):
        top, token = self.stack[-1], int(token)
        if isinstance(top, _Stop):
            self.stack.append(_Stop("error"))
            return False
        if token == self.eos:
            ok = top in self.accept
            self.stack.append(_Stop("eos" if ok else "error"))
            return ok
        nxt = self.transitions.get(top, {}).get(token)
        self.stack.append(_Stop("error") if nxt is None else nxt)
        return nxt is not None

    def rollback(self, n):
        if n:
            del self.stack[-int(n):]

    def copy(self):
        return DFAMatcher(self.transitions, self.start, self.accept, self.vocab_size, self.eos, list(self.stack))

    def accepting(self):
        top = self.stack[-1]
        return (isinstance(top, _Stop) and top.kind == "eos") or (not isinstance(top, _Stop) and top in self.accept)

    def stopped(self):
        top = self.stack[-1]
        return isinstance(top, _Stop) or self._ids() == [self.eos]

    def error(self):
        top = self.stack[-1]
        return isinstance(top, _Stop) and top.kind == "error"


@dataclasses.dataclass(frozen=True)
class _Stop:
    kind: str  # "eos" | "error"


# ---------------------------------------------------------------------------------------------------
# the trie
# ---------------------------------------------------------------------------------------------------

class _Node:
    """One sampled prefix: the allowed next tokens ``ids``, their model probabilities ``p`` (normalized over
    the whole vocabulary, not over ``ids``), the estimates ``c`` of the children's expected future
    grammaticality (aligned with ``ids``), and the explored children."""

    __slots__ = ("ids", "p", "c", "pos", "children")

    def __init__(self, ids: np.ndarray, p: np.ndarray):
        self.ids, self.p = ids, p
        self.c = np.ones(len(ids), np.float64)
        self.pos = {int(t): i for i, t in enumerate(ids)}
        self.children: dict = {}

    def efg(self) -> float:
        return float(self.p @ self.c)


class ASApSampler:
    """ASAp (``mode="asap"``) or plain masked sampling (``mode="gcd"``: estimates stay 1) over one grammar.

    ``matcher`` is a `Matcher` in its start state (it is moved along each sample and rolled back; keep it
    for this sampler alone). ``max_len``: the most tokens before EOS; at depth ``max_len`` only EOS is allowed
    (and only where the grammar accepts). ``update=False`` keeps ``mode="asap"``'s trie but never updates
    the estimates (a broken variant, equal in distribution to GCD: the tests' negative control).
    """

    def __init__(self, model_fn: Callable, matcher: Matcher, max_len: int, eos: int, *, mode: str = "asap",
                 update: bool = True):
        if not callable(model_fn):
            raise TypeError(f"model_fn: expected a callable prefix -> next-token log-probs, got "
                            f"{type(model_fn).__name__}")
        if not isinstance(matcher, Matcher):
            raise TypeError(f"constraint_or_matcher: expected a Constraint or a jaxdec.constrained Matcher, got "
                            f"{type(matcher).__name__}")
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
            raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.model_fn, self.matcher, self.max_len, self.eos = model_fn, matcher, int(max_len), int(eos)
        self.mode, self.update = mode, bool(update) and mode == "asap"
        self.vocab_size: Optional[int] = None
        self.model_calls = 0
        self.samples_drawn = 0
        self.dead_ends = 0
        self.root = self._expand(())

    # -- nodes ------------------------------------------------------------------------------------------
    def _logprobs(self, prefix: tuple) -> np.ndarray:
        out = np.asarray(self.model_fn(prefix), np.float64)
        self.model_calls += 1
        if out.ndim != 1 or out.size < 2:
            raise ValueError(f"model_fn: expected a 1-D array of next-token log-probs [V], got shape {out.shape}")
        if self.vocab_size is None:
            self.vocab_size = int(out.size)
            if not 0 <= self.eos < self.vocab_size:
                raise ValueError(f"eos: {self.eos} is outside model_fn's vocabulary [0, {self.vocab_size})")
        elif out.size != self.vocab_size:
            raise ValueError(f"model_fn: returned {out.size} log-probs after {len(prefix)} tokens, "
                             f"{self.vocab_size} before")
        if np.isnan(out).any() or np.isposinf(out).any():
            raise ValueError(f"model_fn: returned NaN or +inf log-probs after prefix {list(prefix)[:16]}")
        m = out.max()
        if not np.isfinite(m):
            raise ValueError("model_fn: every log-prob is -inf")
        return out - (m + np.log(np.exp(out - m).sum()))

    def _expand(self, prefix: tuple) -> _Node:
        """A new node for ``prefix``; the matcher stands after ``prefix``."""
        logp = self._logprobs(prefix)
        if len(prefix) >= self.max_len:  # only EOS, and only where the grammar accepts
            ids = np.asarray([self.eos] if self.matcher.accepting() else [], np.int64)
        else:
            mask = np.zeros((words(self.vocab_size),), np.int32)
            self.matcher.fill(mask)
            ids = mask_to_ids(mask, self.vocab_size).astype(np.int64)
        p = np.exp(logp[ids]) if len(ids) else np.zeros((0,), np.float64)
        keep = p > 0  # a token the model never emits carries no mass either way
        return _Node(ids[keep], p[keep])

    # -- sampling ---------------------------------------------------------------------------------------
    def _weights(self, node: _Node) -> np.ndarray:
        return node.p * node.c if self.mode == "asap" else node.p.copy()

    def sample_once(self, rng: np.random.Generator):
        """One attempt: (tokens, log proposal probability) or (tokens, None) at a dead end. The estimates
        along the path are updated either way (ASAp)."""
        node, path, tokens, logq = self.root, [], [], 0.0
        consumed = 0
        try:
            while True:
                w = self._weights(node)
                tot = w.sum()
                if not tot > 0:  # dead end: no allowed token (or every allowed child known dead): ĉ = 0
                    result = (tokens, None)
                    break
                i = int(rng.choice(len(w), p=w / tot))
                logq += math.log(w[i] / tot)
                t = int(node.ids[i])
                path.append((node, i))
                if t == self.eos:
                    result = (tokens, logq)
                    break
                tokens.append(t)
                child = node.children.get(t)
                if not self.matcher.consume(t):
                    raise ConstraintError(f"constraint_or_matcher: the matcher refused token {t} that its own "
                                          f"mask allowed after {tokens[:-1][:16]}")
                consumed += 1
                if child is None:
                    child = node.children[t] = self._expand(tuple(tokens))
                node = child
        finally:
            self.matcher.rollback(consumed)
        if self.update:
            self._update(path)
        return result

    def _update(self, path) -> None:
        """The paper's rule bottom-up along the sampled path: the estimate of a child is the mass its own
        children carry, ``sum_t P(t | w) ĉ(w t)``; EOS stays 1, a dead end is 0."""
        for node, i in reversed(path):
            t = int(node.ids[i])
            if t == self.eos:
                continue
            child = node.children[t]
            node.c[i] = child.efg()

    def sample(self, n: int, rng: np.random.Generator, max_attempts: Optional[int] = None):
        """``n`` complete samples: ([tokens], [log q]); dead-end attempts are retried (and counted in
        ``dead_ends``). Raises when the language (within ``max_len``) turns out to be empty."""
        samples, logq = [], []
        limit = max_attempts if max_attempts is not None else max(1000, 100 * n)
        attempts = 0
        while len(samples) < n:
            if attempts >= limit:
                raise RuntimeError(f"n_samples: only {len(samples)} of {n} samples completed in {attempts} "
                                   f"attempts ({self.dead_ends} dead ends); raise max_len")
            attempts += 1
            if self.update and not self.root.efg() > 0:
                raise ConstraintError(f"constraint_or_matcher: the grammar accepts no string of at most "
                                      f"{self.max_len} tokens the model can produce (every prefix is a dead end)")
            toks, lq = self.sample_once(rng)
            self.samples_drawn += 1
            if lq is None:
                self.dead_ends += 1
                continue
            samples.append(toks)
            logq.append(lq)
        return samples, np.asarray(logq, np.float64)

    # -- the current proposal ---------------------------------------------------------------------------
    def efg_root(self) -> float:
        """The current estimate of the grammar's probability under the model, ``ĉ(root)`` (exact once the
        trie is complete)."""
        return self.root.efg()

    def proposal_logprob(self, tokens: Sequence[int]) -> float:
        """log q(tokens + EOS) under the current estimates (``-inf`` outside the grammar). Expands the trie
        along ``tokens`` where it is not yet (model calls, no estimate changes)."""
        node, logq, consumed = self.root, 0.0, 0
        tokens = [int(t) for t in tokens]
        try:
            for k in range(len(tokens) + 1):
                t = tokens[k] if k < len(tokens) else self.eos
                i = node.pos.get(t)
                w = self._weights(node)
                tot = w.sum()
                if i is None or not tot > 0 or w[i] <= 0:
                    return -math.inf
                logq += math.log(w[i] / tot)
                if t == self.eos:
                    return logq
                if not self.matcher.consume(t):
                    return -math.inf
                consumed += 1
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = self._expand(tuple(tokens[:k + 1]))
                node = child
            return logq
        finally:
            self.matcher.rollback(consumed)

    def model_logprob(self, tokens: Sequence[int]) -> float:
        """log P(tokens + EOS) under the model (unconstrained), read from the trie (``-inf`` outside the
        grammar). With the proposal's log q this gives importance weights P(s) / q(s)."""
        lq = self.proposal_logprob(tokens)  # expands the path
        if lq == -math.inf:
            return -math.inf
        node, lp = self.root, 0.0
        for t in [int(t) for t in tokens] + [self.eos]:
            lp += math.log(node.p[node.pos[t]])
            if t != self.eos:
                node = node.children[t]
        return lp

    def proposal_distribution(self, limit: int = 100_000) -> dict:
        """{tokens (tuple, EOS not included): q} for every complete string the proposal can reach, by exact
        enumeration of the (finite, at most ``max_len`` tokens) language. The values sum to 1 minus the
        proposal's current dead-end mass. Expands the trie where needed (model calls, no estimate changes);
        raises ValueError when more than ``limit`` strings would be listed."""
        out: dict = {}

        def walk(node, prefix, logq):
            w = self._weights(node)
            tot = w.sum()
            if not tot > 0:
                return
            for i, t in enumerate(node.ids.tolist()):
                if w[i] <= 0:
                    continue
                lq = logq + math.log(w[i] / tot)
                if t == self.eos:
                    out[prefix] = math.exp(lq)
                    if len(out) > limit:
                        raise ValueError(f"limit: the language has more than {limit} strings")
                    continue
                if not self.matcher.consume(t):
                    raise ConstraintError(f"constraint_or_matcher: the matcher refused token {t} that its own "
                                          "mask allowed")
                try:
                    child = node.children.get(t)
                    if child is None:
                        child = node.children[t] = self._expand(prefix + (t,))
                    walk(child, prefix + (t,), lq)
                finally:
                    self.matcher.rollback(1)

        walk(self.root, (), 0.0)
        return out

    def trie_size(self) -> int:
        n, todo = 0, [self.root]
        while todo:
            node = todo.pop()
            n += 1
            todo.extend(node.children.values())
        return n


# ---------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ASApResult:
    """samples: token lists (EOS not included); log_q: each sample's log proposal probability at the time
    it was drawn; log_p: its model log-probability; sampler: the `ASApSampler` (its trie persists: pass it
    back as ``sampler=`` to continue, read ``proposal_distribution()``); dead_ends: attempts that ended with
    no allowed token (retried)."""

    samples: list
    log_q: np.ndarray
    sampler: ASApSampler
    dead_ends: int
    log_p: np.ndarray = None  # each sample's model log-probability (EOS included): log weights log_p - log_q

    @property
    def proposal(self) -> np.ndarray:
        return np.exp(self.log_q)


def _rng(seed, key) -> np.random.Generator:
    if key is not None:
        if seed is not None:
            raise ValueError("seed/key: give one of seed= and key=, not both")
        try:
            import jax
            data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
            return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"key: expected a jax PRNG key, got {type(key).__name__} ({e})") from None
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _matcher_eos(m: Matcher):
    for get in (lambda: m.eos, lambda: m.eng.eos, lambda: m.c.eos):
        try:
            return int(get())
        except AttributeError:
            continue
    return None


def make_matcher(constraint_or_matcher, tokenizer=None, vocab_size: Optional[int] = None,
                 eos: Optional[int] = None):
    """(a fresh matcher, its EOS id) from a `Constraint` (compiled for ``tokenizer`` by its engine; the
    mask covers ``vocab_size`` ids) or a `Matcher` in its start state (copied)."""
    from jaxdec.constrained.constraint import Constraint, as_constraint
    from jaxdec.constrained.engines import get_engine
    if isinstance(constraint_or_matcher, Matcher):
        m = constraint_or_matcher.copy()
        e = eos if eos is not None else _matcher_eos(m)
        if e is None:
            raise ValueError("eos: the matcher does not say its EOS id; pass eos=")
        return m, int(e)
    if isinstance(constraint_or_matcher, (Constraint, dict)):
        c = as_constraint(constraint_or_matcher, "constraint_or_matcher")
        if tokenizer is None:
            raise ValueError("tokenizer: a Constraint needs the tokenizer to compile it for (or pass a Matcher)")
        eng = get_engine(c.engine, tokenizer, vocab_size, eos)
        return eng.matcher(eng.compile(c)), eng.eos
    raise TypeError(f"constraint_or_matcher: expected a jaxdec.constrained Constraint (regex(...), lark(...), "
                    f"json_schema(...), choices(...)) or a Matcher, got {type(constraint_or_matcher).__name__}")


def asap_sample(model_fn: Callable, constraint_or_matcher, n_samples: int, max_len: int, key=None, *,
                seed=None, tokenizer=None, vocab_size: Optional[int] = None, eos: Optional[int] = None,
                mode: str = "asap", update: bool = True, sampler: Optional[ASApSampler] = None) -> ASApResult:
    """``n_samples`` strings of the grammar drawn by ASAp (``mode="asap"``) or plain masked sampling
    (``mode="gcd"``), each with its proposal probability.

    model_fn: ``prefix tuple -> [V]`` next-token log-probs (or logits). constraint_or_matcher: a `Constraint`
    (needs ``tokenizer``; ``vocab_size`` defaults to the tokenizer's, set it to the model's V when they
    differ) or a `Matcher` in its start state. max_len: at most this many tokens before EOS. key (a jax PRNG
    key) or seed (an int or numpy Generator; default 0). sampler: continue an earlier run's trie (then
    constraint_or_matcher and max_len must be the same grammar and length; they are not re-read).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples: expected a positive int, got {n_samples!r}")
    rng = _rng(seed, key)
    if sampler is None:
        if not callable(model_fn):
            raise TypeError(f"model_fn: expected a callable prefix -> next-token log-probs, got "
                            f"{type(model_fn).__name__}")
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
            raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        m, e = make_matcher(constraint_or_matcher, tokenizer, vocab_size, eos)
        sampler = ASApSampler(model_fn, m, max_len, e, mode=mode, update=update)
    elif not isinstance(sampler, ASApSampler):
        raise TypeError(f"sampler: expected an ASApSampler (ASApResult.sampler), got {type(sampler).__name__}")
    before = sampler.dead_ends
    samples, logq = sampler.sample(int(n_samples), rng)
    logp = np.asarray([sampler.model_logprob(x) for x in samples], np.float64)
    return ASApResult(samples, logq, sampler, sampler.dead_ends - before, logp)


def _score_step(model, size: int):
    """The jitted ``(params, tokens [1, size], last) -> log-probs`` of `score_fn`, one per (model, size), so
    prompts of one length share a compilation."""
    import jax
    import jax.numpy as jnp
    key = (id(model), size)
    hit = _STEPS.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]

    @jax.jit
    def step(params, toks, last):
        cache = model.init_cache(1, size)
        pos = jnp.arange(size, dtype=jnp.int32)[None]
        out = model(params, toks, pos, cache, logits_at=jnp.reshape(last, (1, 1)))
        return jax.nn.log_softmax(out.logits[0, 0].astype(jnp.float32))

    _STEPS[key] = (model, step)
    return step


_STEPS: dict = {}


def _check_prompt(prompt_ids, max_len) -> list:
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids: give at least one token (a BOS or a chat prompt)")
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
    return prompt


class _FullScore:
    """`score_fn`'s model_fn: every call runs the whole right-padded buffer from an empty cache.
    ``calls``: forwards run; ``tokens_processed``: positions fed to the model (``size`` per call)."""

    def __init__(self, model, params, prompt, max_len):
        self.model, self.params, self.prompt, self.max_len = model, params, prompt, int(max_len)
        self.size = len(prompt) + self.max_len
        self.step = _score_step(model, self.size)
        self.calls = 0
        self.tokens_processed = 0

    def __call__(self, prefix):
        import jax.numpy as jnp
        ids = self.prompt + [int(t) for t in prefix]
        if len(ids) > self.size:
            raise ValueError(f"prefix: {len(prefix)} tokens, more than max_len={self.max_len}")
        buf = np.zeros((1, self.size), np.int32)
        buf[0, :len(ids)] = ids
        self.calls += 1
        self.tokens_processed += self.size
        return np.asarray(self.step(self.params, jnp.asarray(buf), jnp.int32(len(ids) - 1)))


def score_fn(model, params, prompt_ids: Sequence[int], max_len: int):
    """A ``model_fn`` for `asap_sample` over a jaxdec decoder model: ``prefix -> log_softmax(logits)`` of the
    token after ``prompt_ids + prefix``. One jitted forward over a fixed buffer of ``len(prompt_ids) + max_len``
    tokens (right-padded; the causal mask keeps padding out of the position read, ``logits_at``), so every
    prefix length shares one compilation. Results are cached per prefix on the trie, so each prefix is scored
    once; but each call runs the prompt again (no KV reuse: `kv_score_fn` is the one that reuses it).
    The returned callable counts ``calls`` and ``tokens_processed``."""
    return _FullScore(model, params, _check_prompt(prompt_ids, max_len), max_len)


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


@functools.lru_cache(maxsize=None)
def _kv_fns():
    """(prefill, extend) jitted once per process (the model is a static argument)."""
    import jax
    import jax.numpy as jnp
    from jaxdec.cache.kv import rollback
    from jaxdec.core.steps import prefill

    @functools.partial(jax.jit, static_argnames=("model", "size"))
    def kv_prefill(model, params, ids, length, size):
        cache = model.init_cache(1, size)
        logits, cache, _ = prefill(model, params, ids, length, cache)
        return jax.nn.log_softmax(logits[0].astype(jnp.float32)), cache

    @functools.partial(jax.jit, static_argnames=("model",))
    def kv_extend(model, params, cache, block, start, m):
        """Roll the cache back to ``start`` positions, run ``block [1, T]`` (its first ``m`` tokens real) on
        top and return log p(. | ... block[:m]) and the cache holding ``start + m`` positions."""
        cache = rollback(cache, jnp.reshape(start, (1,)))
        pos = start + jnp.arange(block.shape[1], dtype=jnp.int32)[None]
        out = model(params, block, pos, cache, logits_at=jnp.reshape(m - 1, (1, 1)))
        return (jax.nn.log_softmax(out.logits[0, 0].astype(jnp.float32)),
                rollback(out.cache, jnp.reshape(start + m, (1,))))

    return kv_prefill, kv_extend


class KVScore:
    """`kv_score_fn`'s model_fn: the prompt is prefilled ONCE into a KV cache; the cache then follows the
    last scored prefix. A call for ``prefix`` rolls the cache back to the longest prefix it shares with the
    last one (``jaxdec.cache.kv.rollback``: only the committed length moves; later writes overwrite the
    rest) and runs only the tokens after it, in a block padded to a power of two (one compilation per
    block width). ASAp's samples walk the trie depth-first, so a new node right below the last one costs
    one token instead of the whole prompt + buffer. ``calls``: model calls (the prefill included);
    ``tokens_processed``: positions fed to the model (padded prompt block + padded extension blocks)."""

    def __init__(self, model, params, prompt, max_len):
        import jax.numpy as jnp
        from jaxdec.cache.kv import bucket
        self.model, self.params, self.prompt, self.max_len = model, params, prompt, int(max_len)
        n = len(prompt)
        # the rolled-back start (< n + max_len) plus a padded block (< 2 x its real tokens) stay inside
        self.size = bucket(n + 2 * self.max_len)
        width = bucket(n)
        ids = np.zeros((1, width), np.int32)
        ids[0, :n] = prompt
        kv_prefill, self._extend = _kv_fns()
        root, self.cache = kv_prefill(model, params, jnp.asarray(ids), jnp.asarray([n], jnp.int32), self.size)
        self.root = np.asarray(root)
        self.path: tuple = ()  # the prefix (after the prompt) whose keys/values the cache holds
        self.calls = 1
        self.tokens_processed = width

    def __call__(self, prefix):
        import jax.numpy as jnp
        p = tuple(int(t) for t in prefix)
        if len(p) > self.max_len:
            raise ValueError(f"prefix: {len(p)} tokens, more than max_len={self.max_len}")
        if not p:
            return self.root
        keep = 0
        for a, b in zip(self.path, p[:-1]):  # at least the last token runs: its logits are the answer
            if a != b:
                break
            keep += 1
        m = len(p) - keep
        width = _pow2(m)
        blk = np.zeros((1, width), np.int32)
        blk[0, :m] = p[keep:]
        lp, self.cache = self._extend(self.model, self.params, self.cache, jnp.asarray(blk),
                                      jnp.int32(len(self.prompt) + keep), jnp.int32(m))
        self.path = p
        self.calls += 1
        self.tokens_processed += width
        return np.asarray(lp)


def kv_score_fn(model, params, prompt_ids: Sequence[int], max_len: int) -> KVScore:
    """`score_fn` with KV reuse (`KVScore`): same log-probs, the prompt runs once per sampler instead of once
    per trie node."""
    return KVScore(model, params, _check_prompt(prompt_ids, max_len), max_len)


def grammar_aligned_generate(model, params, prompts, constraint, *, n: int = 4, max_new_tokens: int = 16,
                             tokenizer=None, seed: int = 0, warmup: int = 0, mode: str = "asap",
                             kv_reuse: bool = True):
    """Grammar-aligned sampling (ASAp) on a jaxdec model, returned as a `Generation`: for each prompt (token-id
    lists), ``warmup`` samples refine the trie's expected-future-grammaticality estimates (not returned),
    then ``n`` samples follow, each a string of the grammar of at most ``max_new_tokens`` tokens. Rows are
    prompt-major (``n`` per prompt); ``tokens`` end with EOS, ``finish_reason`` is "eos", ``constraint_ok``
    True. constraint: one `Constraint` for all prompts or one per prompt (needs ``tokenizer``). The model is
    scored by `kv_score_fn` (``kv_reuse=True``: each prompt prefilled once, each new trie node runs only the
    tokens after the prefix the cache holds) or by `score_fn` (``kv_reuse=False``: one forward over prompt +
    buffer per new trie node); both give the same log-probs, so the same samples for a seed.
    stats: ``model_calls`` (new trie nodes, the prefill not counted), ``model_tokens`` (positions fed to
    the model, padding included).
    extras: ``log_q`` (each row's proposal log-probability when drawn), ``log_p`` (its model
    log-probability, EOS included: importance weights exp(log_p - log_q)), ``samplers`` (per prompt, to
    continue with `asap_sample(..., sampler=)`), ``dead_ends``. ``mode="gcd"``: plain masked sampling."""
    from jaxdec.constrained.constraint import Constraint
    from jaxdec.core.generate import Generation
    import time
    if tokenizer is None:
        raise ValueError("tokenizer: grammar_aligned_generate needs the tokenizer to compile the constraint for")
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    cons = list(constraint) if isinstance(constraint, (list, tuple)) else [constraint] * len(prompts)
    if len(cons) != len(prompts):
        raise ValueError(f"constraint: a list of constraints needs one entry per prompt ({len(prompts)}), "
                         f"got {len(cons)}")
    for i, c in enumerate(cons):
        if not isinstance(c, Constraint):
            raise TypeError(f"constraint[{i}]: expected a jaxdec.constrained Constraint, got {type(c).__name__}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"warmup: expected a non-negative int, got {warmup!r}")
    if not isinstance(kv_reuse, bool):
        raise TypeError(f"kv_reuse: expected a bool, got {type(kv_reuse).__name__}")
    make_fn = kv_score_fn if kv_reuse else score_fn
    eos_ids = tuple(getattr(model, "eos_ids", ()) or ())
    eos = eos_ids[0] if eos_ids else None
    rng = _rng(seed, None)
    t0 = time.perf_counter()
    tokens, logq, logp, samplers, dead, fed = [], [], [], [], 0, 0
    for p, c in zip(prompts, cons):
        fn = make_fn(model, params, p, max_new_tokens)
        sampler = None
        if warmup:
            r = asap_sample(fn, c, int(warmup), max_new_tokens, seed=rng, tokenizer=tokenizer,
                            vocab_size=int(model.vocab_size), eos=eos, mode=mode)
            sampler, dead = r.sampler, dead + r.dead_ends
        r = asap_sample(fn, c, n, max_new_tokens, seed=rng, tokenizer=tokenizer, vocab_size=int(model.vocab_size),
                        eos=eos, mode=mode, sampler=sampler)
        dead += r.dead_ends
        samplers.append(r.sampler)
        tokens += [list(x) + [r.sampler.eos] for x in r.samples]
        logq += list(r.log_q)
        logp += list(r.log_p)
        fed += fn.tokens_processed
    seconds = time.perf_counter() - t0
    rows = len(tokens)
    new = sum(len(t) for t in tokens)
    stats = {"seconds": seconds, "new_tokens": new, "tokens_per_second": new / seconds if seconds > 0 else float("nan"),
             "model_calls": sum(sm.model_calls for sm in samplers), "model_tokens": fed,
             "kv_reuse": kv_reuse}
    return Generation(prompt_ids=[list(p) for p in prompts for _ in range(n)], tokens=tokens,
                      finish_reason=["eos"] * rows, stats=stats,
                      text=[tokenizer.decode(t[:-1]) for t in tokens], constraint_ok=[True] * rows,
                      extras={"log_q": np.asarray(logq), "log_p": np.asarray(logp), "samplers": samplers,
                              "dead_ends": dead})
