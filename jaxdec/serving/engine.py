"""A serving engine over fixed decode slots (prefill / insert / step, as `jaxdec.core.slots` defines them).

    eng = Engine(model, params, slots=4, cache_size=512, capacity=64)
    a = eng.submit(prompt_ids, max_new_tokens=32)                       # greedy
    b = eng.submit(other_ids, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=3, stop_ids=[13])
    results = eng.run_until_done()                                      # {request id: Result}

The engine keeps ``slots`` rows of one `DecodeState` on the device. Each `step`:
1. admits waiting requests into free slots, batched: the requests taken for the free slots (in arrival order,
   within ``prefill_budget`` padded prompt tokens per step when set) are prefilled together, one `init` per
   prompt bucket and power-of-two part of their count (no filler rows; compiled programs: at most
   log2(slots) + 1 row counts per prompt bucket), in a cache the size of the running batch's, and inserted
   at once (one compiled insert per row count, the running KV cache donated);
2. runs one compiled decode step over all slots (one program; the KV cache donated);
3. reads the new tokens of each busy slot on the host, applies the request's own stop ids and frees
   the slots whose requests finished.

Chunked prefill across decode steps (``prefill_chunk_tokens=C``, Sarathi-Serve's stall-free batching without
the fused kernel): an engine iteration (one `step`) prefills at most C padded prompt tokens, so a running request
never waits on a whole prompt's prefill. A prompt whose bucket exceeds C is prefilled in pieces of C tokens, one
piece per iteration, in a one-row cache of its own (`jaxdec.core.slots.prefill(..., cache=)`: one compiled
program for every piece of every request), ahead of a free slot; it is inserted into the first free slot once
its last piece is in (the first token comes with that piece, as `generate`'s prefill gives it). Shorter prompts
are admitted batched as above, within C padded tokens per iteration. One chunked prompt is in flight at a
time, in arrival order. ``iteration_log`` records each iteration's prefill (padded tokens, calls).

Every row decodes exactly as `jaxdec.generate` of its request alone (same keys: a request's ``seed``
gives generate's keys of ``seed`` for one prompt). Sampling parameters are per row and traced
(temperature 0 = greedy for that row), so new settings never recompile. Per-request ``stop_ids`` are
checked on the host after each step and add to the model's EOS ids, which end every row on the device.
`step` is meant for one thread; `submit` and `cancel` may be called from any thread.

Speculative decoding over the slots (``speculative=``): every step drafts, verifies with one target call and
emits a block per row; rows accept different numbers of tokens, and the host reads each row's new tokens (a
request's own stop id inside an accepted block ends it there).

    eng = Engine(model, params, slots=4, speculative=methods.prompt_lookup(sampling=True))  # sampling verifier
    eng = Engine(model, params, slots=4, speculative=SpeculativeDecoder(PromptLookupDrafter(), verifier="sampling"))

With ``verifier="sampling"`` temperature-0 requests get exactly their greedy tokens, sampled ones exactly what
``generate(decoder=that decoder, seed=...)`` of the request alone gives (lossless speculative sampling, per-row
parameters); with ``verifier="greedy"`` (cheaper: no softmax over the block) requests with ``temperature > 0``
are refused. A bare drafter is refused with the wrapping to use. The
drafter's method state is inserted per row: the context history (``SpecState.hist``) is fitted to the engine's
width (``cache_size``), leaves with a batch axis (found by comparing the state's shapes at two batch sizes, any
axis) replace the slot's row, and leaves without one are shared by the slots (Token Recycling's matrix, n-gram
tables: the running one stays and keeps learning across requests; this changes drafts, never greedy tokens, but
a sampled row may then differ from the same request decoded alone). With ``prefill_chunk_tokens`` the history of
a prompt prefilled in pieces is rebuilt from the whole prompt; a drafter's own ``init`` state sees only the last
piece (model-free drafters only: drafters that run a model are refused there). Refused with speculative:
constraints, and drafters with their own weights. ``tau`` (``stats()``): tokens per decode step per live row,
1.0 for plain decoding.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache.kv import bucket
from jaxdec.core import loop, slots as slots_lib
from jaxdec.core.driver import _check_prompts
from jaxdec.core.processors import SamplingParams
from jaxdec.core.protocols import check_drafter, hook
from jaxdec.core.state import EOS, LENGTH, STOP_STRING
from jaxdec.core.steps import with_prefill_chunk
from jaxdec.core.token import TokenDecoder


class RequestError(ValueError):
    """A request the engine refuses (names the field and what was expected)."""


@dataclasses.dataclass
class Request:
    id: str
    prompt: list
    max_new_tokens: int
    min_new_tokens: int
    stop_ids: tuple
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    on_tokens: Optional[Callable] = None  # on_tokens(request_id, new_token_ids, finish_reason or None)
    submitted: float = 0.0
    constraint: Optional[tuple] = None  # (grammar engine, compiled constraint) of jaxdec.constrained
    # filled while it runs
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclasses.dataclass
class Result:
    """A finished request: ``tokens`` are the new tokens, the stop token included (as `generate` returns
    them); ``finish_reason`` is "eos" (a model EOS id), "stop" (one of the request's ``stop_ids``),
    "length" (``max_new_tokens``) or "cancelled"."""

    id: str
    prompt_ids: list
    tokens: list
    finish_reason: str
    ttft: Optional[float]  # seconds from submit to the first token on the host
    seconds: float  # submit to finish
    constraint_ok: Optional[bool] = None  # with a constraint: the grammar accepts the tokens (as generate's)


_FINISH = {EOS: "eos", LENGTH: "length", STOP_STRING: "stop"}


def _int_field(name, v, lo, hi=None):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"{name} must be an integer {rng}, got {v!r}")
    return int(v)


def _float_field(name, v, ok, what):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) or not ok(float(v)):
        raise RequestError(f"{name} must be a number {what}, got {v!r}")
    return float(v)


@functools.partial(jax.jit, static_argnames=("decoder", "model"), donate_argnames=("cache",))
def _step(decoder, model, params, cache, rest):
    """One decode step over every slot; the KV cache is donated (only the cache: DESIGN's pitfall)."""
    loop.count_trace(f"engine_step:{type(decoder).__name__}")
    state = decoder.step(model, params, rest.replace(cache=cache))
    return state, (state.tokens, state.num_new, state.done, state.finish)


@functools.partial(jax.jit, static_argnames=("decoder", "axes"), donate_argnames=("cache",))
def _insert(decoder, cache, rest, prefix, slot, axes=None):
    loop.count_trace(f"engine_insert:{type(decoder).__name__}")
    state = rest.replace(cache=cache)
    if axes is not None:  # a speculative decoder: the engine fits its method state (module doc)
        return _insert_fitted(state, prefix, slot, axes)
    own = hook(decoder, "insert")
    state = slots_lib.insert_rows(state, prefix, slot) if own is None else own(state, prefix, slot)
    return state


def _fit_width(hist, width: int):
    """A ``[B, H]`` history cropped or zero-padded to ``width`` columns (entries past ``hist_len`` are unused)."""
    h = hist.shape[1]
    return hist[:, :width] if h >= width else jnp.pad(hist, ((0, 0), (0, width - h)))


def _insert_fitted(state, prefix, slots, axes):
    """`slots_lib.insert_rows` for method state the generic insert refuses: ``prefix``'s history fitted to the
    running width, each method leaf's rows replaced along its batch axis (``axes``: one per leaf, None for a
    leaf shared by the batch, which keeps the running value)."""
    pm = prefix.method
    if getattr(pm, "hist", None) is not None:
        pm = pm.replace(hist=_fit_width(pm.hist, state.method.hist.shape[1]))
    run, tdef = jax.tree_util.tree_flatten(state.method)
    new = jax.tree_util.tree_leaves(pm)
    if jax.tree_util.tree_structure(pm) != tdef or len(axes) != len(run):
        raise ValueError("speculative insert: the prefix's method state does not match the running state's")
    out = []
    for a, p, ax in zip(run, new, axes):
        if ax is None:
            out.append(a)
            continue
        a0, p0 = jnp.moveaxis(a, ax, 0), jnp.moveaxis(p, ax, 0)
        out.append(jnp.moveaxis(a0.at[slots].set(p0.astype(a0.dtype)), 0, ax))
    base = slots_lib.insert_rows(state.replace(method=None), prefix.replace(method=None), slots)
    return base.replace(method=jax.tree_util.tree_unflatten(tdef, out))


@jax.jit
def _prompt_hist(prefix, prompt, plen):
    """A speculative row prefilled in pieces: its history rebuilt from the whole prompt (``prompt [n, W]``,
    ``plen [n]``) and its first token, as one prefill of the whole prompt writes it."""
    m = prefix.method
    col = jnp.arange(prompt.shape[1])[None, :]
    hist = jnp.where(col < plen[:, None], prompt, 0)
    hist = jnp.where(col == plen[:, None], prefix.tokens[:, :1], hist).astype(m.hist.dtype)
    return prefix.replace(method=m.replace(hist=hist, hist_len=(plen + 1).astype(m.hist_len.dtype),
                                           prompt_len=plen.astype(m.prompt_len.dtype)))


@dataclasses.dataclass
class _Chunked:
    """A request whose prompt is being prefilled in pieces: its one-row cache, the prompt tokens already in, and
    (after the last piece) its row to insert."""

    req: Request
    cache: object
    done: int = 0
    prefix: object = None


class Engine:
    """Fixed decode slots over one model. ``slots``: rows decoded together; ``cache_size``: KV positions
    per slot (prompt + new tokens of one request must fit); ``capacity``: the largest ``max_new_tokens``
    a request may ask for (the output buffer's width). ``prefill_chunk`` as in `generate` (pieces of one prefill
    call). ``prefill_chunk_tokens``: at most this many padded prompt tokens prefilled per engine iteration, longer
    prompts in pieces across decode steps (see the module doc; None: a whole admission between two steps).
    ``prefill_budget``: padded prompt tokens of one batched admission. ``speculative``: a `SpeculativeDecoder` to
    decode the slots with (its sampling verifier serves every request; see the module doc); None: one token per
    step."""

    def __init__(self, model, params, *, slots: int = 4, cache_size: int = 1024, capacity: int = 256,
                 prefill_chunk: Optional[int] = 512, keep_results: bool = True, ignore_eos: bool = False,
                 prefill_budget: Optional[int] = None, tokenizer=None,
                 prefill_chunk_tokens: Optional[int] = None, speculative=None):
        self.slots = _int_field("slots", slots, 1)
        # padded prompt tokens prefilled between two decode steps (None: every free slot is filled at once)
        self.prefill_budget = None if prefill_budget is None else _int_field("prefill_budget", prefill_budget, 1)
        self.cache_size = _int_field("cache_size", cache_size, 2)
        # prompt tokens prefilled per engine iteration, long prompts in pieces across decode steps (None: whole)
        self.prefill_chunk_tokens = (None if prefill_chunk_tokens is None else
                                     _int_field("prefill_chunk_tokens", prefill_chunk_tokens, 1, self.cache_size))
        self.capacity = _int_field("capacity", capacity, 1)
        if self.capacity >= self.cache_size:
            raise ValueError(f"capacity ({capacity}) must be smaller than cache_size ({cache_size})")
        max_pos = hook(model, "max_position")
        if max_pos is not None and self.cache_size > max_pos:
            raise ValueError(f"cache_size ({cache_size}) exceeds the model's context ({max_pos})")
        self.model = with_prefill_chunk(model, prefill_chunk)
        self.params = params
        # per-row SamplingParams; temperature 0 rows are greedy
        self.decoder = TokenDecoder(greedy=False) if speculative is None else self._spec_decoder(speculative)
        self.speculative = speculative is not None
        if self.speculative and self.prefill_chunk_tokens is not None and \
                int(hook(self.decoder.drafter, "draft_calls_per_step") or 0) > 0:
            raise ValueError(f"prefill_chunk_tokens: drafter {type(self.decoder.drafter).__name__} runs a model, "
                             "whose state a prompt prefilled in pieces would miss; use a model-free drafter "
                             "(prompt lookup, token recycling, n-gram) or prefill_chunk_tokens=None")
        self.tokenizer = tokenizer  # needed for constraints (the grammar engines work on its vocabulary)
        self._cdecoder = self._csession = None  # the decoder with the constraint mask, and its slot matchers
        # ignore_eos (benchmarks: every request decodes exactly max_new_tokens): no stop id on the device
        self.eos_ids = () if ignore_eos else tuple(int(t) for t in model.eos_ids)
        self._axes = None  # speculative: each method-state leaf's batch axis (None: shared by the slots)
        self._state = self._empty_state()
        self._slot_req: list = [None] * self.slots  # request in each slot
        self._seen = [0] * self.slots  # tokens of that slot already read on the host
        self._waiting: collections.deque = collections.deque()
        self._requests: dict = {}  # id -> Request (running or waiting)
        self._results: dict = {}  # id -> Result
        self._cancel: set = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.steps = 0
        self._pf: Optional[_Chunked] = None  # the request being prefilled in pieces (chunked prefill)
        # per engine iteration (`step`): {"prefill_tokens": padded prompt tokens prefilled, "prefill_calls": n,
        # "decode": live slots of its decode step (0: no step ran)}; the last 4096 iterations
        self.iteration_log: collections.deque = collections.deque(maxlen=4096)
        self._it: dict = {}
        self.keep_results = keep_results  # False: finished requests are only reported through on_tokens
        # tau: tokens the decode steps gave live rows, and the rows they stepped (prefill tokens not counted)
        self.decode_tokens = self.row_steps = 0
        self._fresh = [False] * self.slots  # a slot whose first read includes its prefill token
        self._tau_stale = False  # `time_steps` ran steps the host did not count

    @staticmethod
    def _spec_decoder(spec):
        # a speculative decoder (`jaxdec.speculative.engine.SpeculativeDecoder`: its drafter and verifier), known by
        # its fields: serving does not import the speculative family (whose CLI imports the one serving is under)
        if not (hasattr(spec, "drafter") and getattr(spec, "verifier", None) in ("greedy", "sampling")):
            try:
                check_drafter(spec)
                what = "a drafter: wrap it as SpeculativeDecoder(drafter, verifier='sampling')"
            except TypeError:
                what = type(spec).__name__
            raise ValueError(f"speculative: expected a SpeculativeDecoder (jaxdec.speculative.engine), got {what}")
        if hook(spec.drafter, "own_params"):
            raise ValueError(f"speculative: drafter {type(spec.drafter).__name__} has its own weights (params "
                             "bundle); the engine runs drafters on the target's params only")
        return spec

    def _batch_axes(self, state) -> tuple:
        """Each method-state leaf's batch axis, from its shape at ``slots`` and ``slots + 1`` rows (an abstract
        prefill: traced, not run); None for leaves of the same shape (shared by the batch)."""
        n = self.slots
        sampling, keys = self._sampling([0.0] * (n + 1)), np.zeros((n + 1, 2), np.uint32)  # concrete, outside
        other = jax.eval_shape(lambda: slots_lib.start(
            self.decoder, self.model, self.params, [[self._pad]] * (n + 1), cache_size=self.cache_size,
            capacity=self.capacity, max_new_tokens=1, stop_ids=self.eos_ids, keys=keys, sampling=sampling).method)
        leaves, _ = jax.tree_util.tree_flatten_with_path(state.method)
        axes = []
        for (path, a), o in zip(leaves, jax.tree_util.tree_leaves(other)):
            if a.shape == o.shape:
                axes.append(None)
                continue
            diff = [i for i, (x, y) in enumerate(zip(a.shape, o.shape)) if x != y]
            if a.ndim != o.ndim or len(diff) != 1 or (a.shape[diff[0]], o.shape[diff[0]]) != (n, n + 1):
                raise ValueError(f"speculative: method state leaf {jax.tree_util.keystr(path)} (shape {a.shape} "
                                 f"for {n} rows, {o.shape} for {n + 1}) is neither per row nor shared")
            axes.append(diff[0])
        return tuple(axes)

    def _empty_state(self):
        pad = self._pad = int(hook(self.model, "pad_id"))
        state = slots_lib.start(self.decoder, self.model, self.params, [[pad]] * self.slots,
                                cache_size=self.cache_size, capacity=self.capacity, max_new_tokens=1,
                                stop_ids=self.eos_ids,
                                sampling=self._sampling([0.0] * self.slots))
        state = state.replace(done=jnp.ones_like(state.done))  # every slot starts free
        if self.speculative:
            if self._axes is None:
                self._axes = self._batch_axes(state)
            state = state.replace(method=state.method.replace(hist=_fit_width(state.method.hist, self.cache_size)))
        return state

    def _insert_prefix(self, prefix, slots) -> None:
        """``prefix``'s rows into ``slots`` of the running state (one compiled insert per row count)."""
        st = self._state
        self._state = _insert(self.decoder, st.cache, st.replace(cache=None), prefix, jnp.asarray(slots, jnp.int32),
                              axes=self._axes)

    # ---------------------------------------------------------------- requests
    def check(self, prompt_ids, max_new_tokens: int = 16, min_new_tokens: int = 0) -> list:
        """Validate a prompt against the slot size; returns the prompt as a list of ints (RequestError if
        it cannot run)."""
        try:
            prompt = _check_prompts([prompt_ids], self.model.vocab_size)[0]
        except (TypeError, ValueError) as e:
            raise RequestError(str(e).replace("prompts[0]", "prompt").replace("prompt 0", "prompt")) from None
        max_new = _int_field("max_new_tokens", max_new_tokens, 1)
        _int_field("min_new_tokens", min_new_tokens, 0, max_new)
        if max_new > self.capacity:
            raise RequestError(f"max_new_tokens ({max_new}) exceeds the engine's capacity ({self.capacity})")
        need = len(prompt) + max_new + int(hook(self.decoder, "cache_headroom"))
        block = bucket(len(prompt))  # the prompt block of its prefill (prompts in pieces: only their tokens)
        if self.prefill_chunk_tokens is not None and block > self.prefill_chunk_tokens:
            block = len(prompt)
        if block > self.cache_size or need > self.cache_size:
            raise RequestError(f"request too long for a slot: prompt ({len(prompt)} tokens) + max_new_tokens "
                               f"({max_new}) needs {need} positions, a slot holds {self.cache_size}")
        return prompt

    def submit(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 16, min_new_tokens: int = 0,
               stop_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0, seed: int = 0, request_id: Optional[str] = None,
               on_tokens: Optional[Callable] = None, constraint=None) -> str:
        """Queue a request; returns its id. ``on_tokens(id, new_tokens, finish_reason_or_None)`` is called from
        the stepping thread as tokens arrive (``finish_reason`` set on the last call). ``constraint``: a
        `jaxdec.constrained` constraint (json_schema, regex, lark, choices, or its dict form) for this request
        (the engine needs ``tokenizer=``); its tokens equal ``generate(..., constraint=...)`` of it alone."""
        prompt = self.check(prompt_ids, max_new_tokens, min_new_tokens)
        if constraint is not None and self.speculative:
            raise RequestError("constraint: not supported by a speculative engine (Engine(speculative=...)); "
                               "constrained requests need an engine without speculative")
        unit = None if constraint is None else self._compile_constraint(constraint)
        if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, (Sequence, np.ndarray)):
            raise RequestError(f"stop_ids must be a list of token ids, got {stop_ids!r}")
        stops = tuple(_int_field("stop_ids[]", t, 0, self.model.vocab_size - 1) for t in stop_ids)
        temperature = _float_field("temperature", temperature, lambda v: 0 <= v < float("inf"), ">= 0 (0 = greedy)")
        if temperature > 0 and self.speculative and self.decoder.verifier == "greedy":
            raise RequestError(f"temperature must be 0 on this engine: it verifies drafts greedily "
                               f"(SpeculativeDecoder(verifier='greedy')), got {temperature!r}; build it with "
                               f"verifier='sampling' to serve sampled requests")
        top_k = _int_field("top_k", top_k, 0)
        top_p = _float_field("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        min_p = _float_field("min_p", min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not -2**63 <= seed < 2**63:
            raise RequestError(f"seed must be a 64-bit integer, got {seed!r}")
        with self._lock:
            rid = f"req-{next(self._ids)}" if request_id is None else str(request_id)
            if rid in self._requests or rid in self._results:
                raise RequestError(f"request_id {rid!r} is already in use")
            req = Request(rid, prompt, int(max_new_tokens), int(min_new_tokens), stops, temperature, top_k, top_p,
                          min_p, int(seed), on_tokens, time.perf_counter(), unit)
            self._requests[rid] = req
            self._waiting.append(req)
        return rid

    def _compile_constraint(self, constraint) -> tuple:
        from jaxdec.constrained import api
        if self.tokenizer is None:
            raise RequestError("constraint: this engine has no tokenizer (Engine(..., tokenizer=...) enables "
                               "constraints)")
        try:
            return api.compile_rows([api.as_constraint(constraint)], self.tokenizer, self.model)[0]
        except (TypeError, ValueError) as e:  # ConstraintError is a ValueError
            msg = str(e)
            raise RequestError(msg if msg.startswith("constraint") else f"constraint: {msg}") from None

    def _constrained(self):
        """The decoder with the constraint mask first (compiled on the first constrained request) and the
        session holding one matcher per slot."""
        if self._cdecoder is None:
            from jaxdec.constrained.processor import ConstraintMask, Session
            self._cdecoder = dataclasses.replace(self.decoder, processors=(ConstraintMask(int(self.model.vocab_size)),)
                                                 + tuple(self.decoder.processors))
            self._csession = Session([None] * self.slots)
            self._csession.begin_batch(self.slots)
        return self._cdecoder, self._csession

    def cancel(self, request_id: str) -> None:
        """Stop a request (waiting or running); its slot is freed at the next `step`."""
        with self._lock:
            if request_id in self._requests:
                self._cancel.add(request_id)

    def result(self, request_id: str) -> Optional[Result]:
        return self._results.get(request_id)

    def pop_result(self, request_id: str) -> Optional[Result]:
        return self._results.pop(request_id, None)

    @property
    def busy(self) -> bool:
        """Requests waiting or running."""
        return bool(self._requests)

    @property
    def free_slots(self) -> int:
        return sum(r is None for r in self._slot_req)

    # ---------------------------------------------------------------- stepping
    def _sampling(self, temps, reqs=None):
        n = len(temps)
        if reqs is None:
            return SamplingParams.create(n, temperature=temps)
        return SamplingParams.create(n, temperature=temps, top_k=[r.top_k for r in reqs],
                                     top_p=[r.top_p for r in reqs], min_p=[r.min_p for r in reqs])

    def _finish(self, slot, req, reason):
        now = time.perf_counter()
        req.finish_reason, req.finished_time = reason, now
        ok = None
        if req.constraint is not None and reason != "cancelled":
            m = req.constraint[0].matcher(req.constraint[1])
            ok = bool(all(m.consume(int(t)) for t in req.tokens) and m.accepting())
        with self._lock:
            self._requests.pop(req.id, None)
            self._cancel.discard(req.id)
            if self.keep_results:
                self._results[req.id] = Result(
                    req.id, req.prompt, list(req.tokens), reason,
                    None if req.first_token_time is None else req.first_token_time - req.submitted, now - req.submitted,
                    ok)
        if slot is not None:
            self._slot_req[slot] = None
            self._set_matcher(slot, None)

    def _set_matcher(self, slot, unit):
        if self._csession is not None:
            sess = self._csession
            sess.rows[slot] = unit
            sess.matchers[slot] = None if unit is None else unit[0].matcher(unit[1])
            sess.consumed[slot] = 0  # the first mask callback advances it over the row's committed tokens

    @staticmethod
    def _row_counts(n: int) -> list:
        """``n`` rows as prefills of power-of-two row counts, largest first (the bits of n: 7 -> 4, 2, 1), so an
        engine compiles at most log2(slots) + 1 row counts per prompt bucket and never prefills a filler row."""
        return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]

    def _take(self, free: int, budget: Optional[int]) -> list:
        """Waiting requests for ``free`` slots, in arrival order, within ``budget`` padded prompt tokens (None: no
        limit; the first request is always taken). Cancelled ones are finished here."""
        take, spent = [], {}
        while len(take) < free:
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting[0]
                cancelled = req.id in self._cancel
                if not cancelled and take and budget is not None:
                    b = bucket(len(req.prompt))
                    rows = {**spent, b: spent.get(b, 0) + 1}
                    if sum(n * k for k, n in rows.items()) > budget:
                        break
                self._waiting.popleft()
            if cancelled:
                self._notify(req, [], "cancelled")
                self._finish(None, req, "cancelled")
                continue
            take.append(req)
            b = bucket(len(req.prompt))
            spent[b] = spent.get(b, 0) + 1
        return take

    def _admit(self):
        """Admission for one iteration: batched (below), or with ``prefill_chunk_tokens`` one prefill action of at
        most that many padded tokens: a piece of the chunked prompt in flight, else a new chunked prompt's first
        piece when the first waiting prompt's bucket exceeds it, else batched admission within it."""
        c = self.prefill_chunk_tokens
        if c is None:
            return self._admit_batched(self.prefill_budget)
        self._place_chunked()  # a prompt whose last piece is in waits for a free slot
        if self._pf is None:
            head = self._head()
            if head is None:
                return
            if bucket(len(head.prompt)) <= c:
                return self._admit_batched(c if self.prefill_budget is None else min(c, self.prefill_budget))
            with self._lock:
                self._waiting.popleft()  # the head: only this thread removes waiting requests
            self._pf = _Chunked(head, slots_lib.empty_cache(self.model, 1, like=self._state))
        if self._pf.prefix is None:
            self._prefill_piece()
            self._place_chunked()

    def _head(self):
        """The first waiting request that is not cancelled (cancelled ones before it are finished here)."""
        while True:
            with self._lock:
                if not self._waiting:
                    return None
                req = self._waiting[0]
                if req.id not in self._cancel:
                    return req
                self._waiting.popleft()
            self._notify(req, [], "cancelled")
            self._finish(None, req, "cancelled")

    def _prefill_piece(self) -> None:
        """The next piece (``prefill_chunk_tokens`` tokens, one compiled program) of the chunked prompt in flight;
        after its last piece, ``self._pf.prefix`` is its row (first token included)."""
        pf, c = self._pf, self.prefill_chunk_tokens
        req = pf.req
        piece = req.prompt[pf.done:pf.done + c]
        last = pf.done + len(piece) >= len(req.prompt)

        def prefill(decoder):
            return slots_lib.prefill(decoder, self.model, self.params, [piece], like=self._state,
                                     max_new_tokens=req.max_new_tokens, min_new_tokens=req.min_new_tokens,
                                     seed=[req.seed], stop_ids=self.eos_ids, prompt_bucket=c,
                                     sampling=self._sampling([req.temperature], [req]), cache=pf.cache)

        if last and req.constraint is not None:  # the first token is masked: a session over this row
            from jaxdec.constrained.processor import Session, activate
            sess = Session([req.constraint])
            sess.begin_batch(1)
            with activate(sess):
                out = prefill(self._constrained()[0])
                jax.block_until_ready(out.tokens)
        else:
            out = prefill(self.decoder)
        self._log_prefill(c)
        pf.cache, pf.done = out.cache, pf.done + len(piece)
        if last:
            pf.prefix = self._whole_prompt_hist(out, [req.prompt]) if self.speculative else out

    def _whole_prompt_hist(self, prefix, prompts):
        """Speculative rows prefilled in pieces: the history of each whole prompt (`_prompt_hist`)."""
        arr = np.zeros((len(prompts), self.cache_size), np.int32)
        for i, p in enumerate(prompts):
            arr[i, :len(p)] = p
        return _prompt_hist(prefix, jnp.asarray(arr), jnp.asarray([len(p) for p in prompts], jnp.int32))

    def _place_chunked(self) -> None:
        """Insert the chunked prompt whose last piece is in into the first free slot (if one is free)."""
        pf = self._pf
        if pf is None or pf.prefix is None or self._slot_req.count(None) == 0:
            return
        slot = self._slot_req.index(None)
        self._insert_prefix(pf.prefix, [slot])
        self._slot_req[slot], self._seen[slot], self._pf = pf.req, 0, None
        self._fresh[slot] = True
        if pf.req.constraint is not None:
            self._set_matcher(slot, pf.req.constraint)

    def _log_prefill(self, tokens: int) -> None:
        if self._it:
            self._it["prefill_tokens"] += tokens
            self._it["prefill_calls"] += 1

    def _admit_batched(self, budget: Optional[int]):
        """Batched admission: the waiting requests that fit the free slots (and ``budget``, padded prompt tokens)
        are prefilled together: per prompt bucket, one compiled `init` per power-of-two part of their count
        (`_row_counts`), each part inserted at once."""
        free = [s for s in range(self.slots) if self._slot_req[s] is None]
        if not free:
            return
        take = self._take(len(free), budget)
        groups: dict = {}
        for req in take:
            groups.setdefault((bucket(len(req.prompt)), req.constraint is not None), []).append(req)
        for (p, constrained), same in groups.items():
            for n in self._row_counts(len(same)):
                group, same = same[:n], same[n:]
                where, free = free[:n], free[n:]
                self._prefill_insert(p, constrained, group, where)

    def _prefill_insert(self, p: int, constrained: bool, group: list, where: list) -> None:
        def prefill(decoder):
            return slots_lib.prefill(decoder, self.model, self.params, [r.prompt for r in group], like=self._state,
                                     max_new_tokens=[r.max_new_tokens for r in group],
                                     min_new_tokens=[r.min_new_tokens for r in group],
                                     seed=[r.seed for r in group],
                                     stop_ids=self.eos_ids, prompt_bucket=p,
                                     sampling=self._sampling([r.temperature for r in group], group))

        if constrained:  # the first token is masked too: a session over these rows for the prefill
            from jaxdec.constrained.processor import Session, activate
            sess = Session([r.constraint for r in group])
            sess.begin_batch(len(group))
            with activate(sess):
                prefix = prefill(self._constrained()[0])
                jax.block_until_ready(prefix.tokens)
        else:
            prefix = prefill(self.decoder)
        self._log_prefill(p * len(group))
        self._insert_prefix(prefix, where)
        for slot, req in zip(where, group):
            self._slot_req[slot] = req
            self._seen[slot] = 0
            self._fresh[slot] = True
            if constrained:
                self._set_matcher(slot, req.constraint)

    def warmup(self, prompt_lengths: Sequence[int]) -> int:
        """Compile every admission shape for these prompt lengths' buckets (each power-of-two row count's
        prefill and insert), so that no request waits on an admission compile; the slots are untouched
        (the warm-up rows are all fillers, dropped by the insert). Only public seams: each shape is
        `jaxdec.core.slots.prefill` of one pad-token row plus ``fillers`` (the admission path's program: same
        rows, prompt bucket, cache and sampling inputs). With ``prefill_chunk_tokens``, buckets above it are
        prefilled in pieces: their one shape is the piece program (`slots.prefill(..., cache=)` of one pad-token row)
        and its one-row insert. Returns the number of shapes."""
        buckets = sorted({bucket(_int_field("prompt_lengths[]", n, 1)) for n in prompt_lengths})
        if any(b > self.cache_size for b in buckets):
            raise RequestError(f"prompt_lengths: a bucket of {buckets} does not fit a slot of {self.cache_size}")
        counts = [1 << b for b in range(self.slots.bit_length())]  # every part `_row_counts` can give
        c = self.prefill_chunk_tokens
        chunked = c is not None and any(p > c for p in buckets)
        buckets = [p for p in buckets if c is None or p <= c]  # the others are prefilled in pieces
        if chunked:  # the piece program (every piece of every chunked prompt) and its one-row insert
            prefix = slots_lib.prefill(self.decoder, self.model, self.params, [[self._pad]], like=self._state,
                                       max_new_tokens=1, stop_ids=self.eos_ids, prompt_bucket=c,
                                       sampling=self._sampling([0.0]),
                                       cache=slots_lib.empty_cache(self.model, 1, like=self._state))
            if self.speculative:
                prefix = self._whole_prompt_hist(prefix, [[self._pad]])
            self._insert_prefix(prefix, [self.slots])
        for p in buckets:
            for nb in counts:
                prefix = slots_lib.prefill(self.decoder, self.model, self.params, [[self._pad]], like=self._state,
                                           max_new_tokens=1, stop_ids=self.eos_ids, prompt_bucket=p,
                                           sampling=self._sampling([0.0]), fillers=nb - 1)
                self._insert_prefix(prefix, [self.slots] * nb)
        jax.block_until_ready(self._state.done)
        return len(buckets) * len(counts) + int(chunked)

    def _notify(self, req, toks, reason):
        if req.on_tokens is not None:
            req.on_tokens(req.id, toks, reason)

    def step(self) -> int:
        """Admit waiting requests, run one decode step over the slots, deliver new tokens; returns the number of
        requests still waiting or running."""
        with self._lock:
            cancel = set(self._cancel)
        for slot, req in enumerate(self._slot_req):
            if req is not None and req.id in cancel:
                self._notify(req, [], "cancelled")
                self._finish(slot, req, "cancelled")
        if self._pf is not None and self._pf.req.id in cancel:  # a chunked prefill in flight: its cache is dropped
            req, self._pf = self._pf.req, None
            self._notify(req, [], "cancelled")
            self._finish(None, req, "cancelled")
        self._it = {"prefill_tokens": 0, "prefill_calls": 0, "decode": 0, "decode_tokens": 0}
        self.iteration_log.append(self._it)
        self._admit()
        if all(r is None for r in self._slot_req):
            return len(self._requests)
        st = self._state
        # rows whose device row is still live need a step; rows admitted already done (EOS or max_new at the
        # first token) only need reading
        done_dev = np.asarray(st.done)
        live = [r is not None and not done_dev[s] for s, r in enumerate(self._slot_req)]
        if any(live):
            if any(lv and r.constraint is not None for lv, r in zip(live, self._slot_req)):
                # the masked step (one host callback fills every constrained slot's mask); the session must stay
                # active until the step has run
                from jaxdec.constrained.processor import activate
                decoder, sess = self._constrained()
                with activate(sess):
                    self._state, small = _step(decoder, self.model, self.params, st.cache, st.replace(cache=None))
                    small = jax.device_get(small)
            else:
                self._state, small = _step(self.decoder, self.model, self.params, st.cache, st.replace(cache=None))
            self.steps += 1
            self._it["decode"] = sum(live)
        else:
            small = (st.tokens, st.num_new, st.done, st.finish)
        tokens, num_new, done, finish = jax.device_get(small)
        now = time.perf_counter()
        count = self._it["decode"] > 0 and not self._tau_stale
        self._tau_stale = False
        for slot, req in enumerate(self._slot_req):
            if req is None:
                continue
            if count and live[slot]:  # tokens this decode step gave the row (its prefill token excluded)
                got = int(num_new[slot]) - self._seen[slot] - int(self._fresh[slot])
                self.decode_tokens += got
                self.row_steps += 1
                self._it["decode_tokens"] += got
            self._fresh[slot] = False
            new = tokens[slot, self._seen[slot]:num_new[slot]].tolist()
            self._seen[slot] = int(num_new[slot])
            reason = None
            for i, t in enumerate(new):
                if t in req.stop_ids and t not in self.eos_ids:
                    new, reason = new[:i + 1], "stop"
                    break
            if reason is None and done[slot]:
                reason = _FINISH.get(int(finish[slot]), "length")
            if new and req.first_token_time is None:
                req.first_token_time = now
            req.tokens.extend(new)
            if new or reason:
                self._notify(req, new, reason)
            if reason is not None:
                self._finish(slot, req, reason)
        return len(self._requests)

    def score(self, prompts, continuations) -> list:
        """`jaxdec.score(..., top=True)` with this engine's model: per pair ``(logp, top_ids, top_logp)``
        (callable from any thread while the engine steps; only the params are shared)."""
        from jaxdec.core.generate import score
        return score(self.model, self.params, prompts, continuations, top=True)

    def time_steps(self, n: int) -> list:
        """Benchmarks: run ``n`` decode steps over the slots as they are (no admission, no host reads) and
        return each step's seconds (dispatch to ready). The tokens stay on the device; the next `step`
        delivers them, so the requests in the slots stay consistent."""
        out = []
        for _ in range(_int_field("n", n, 1)):
            st = self._state
            t0 = time.perf_counter()
            self._state, small = _step(self.decoder, self.model, self.params, st.cache, st.replace(cache=None))
            jax.block_until_ready(small)
            out.append(time.perf_counter() - t0)
            self.steps += 1
            self._tau_stale = True  # the next `step` reads these tokens: not counted in tau
        return out

    @property
    def tau(self) -> Optional[float]:
        """Tokens per decode step per live row (1.0 for plain decoding; speculative: accepted drafts + 1), over
        the engine's life (None before its first decode step)."""
        return self.decode_tokens / self.row_steps if self.row_steps else None

    def stats(self) -> dict:
        """Decode counters: ``steps`` (decode steps over the slots), ``row_steps`` (live rows stepped, summed over
        steps), ``decode_tokens`` (tokens those steps gave them) and ``tau`` (their ratio)."""
        return {"steps": self.steps, "row_steps": self.row_steps, "decode_tokens": self.decode_tokens,
                "tau": self.tau, "speculative": self.speculative}

    def fail_all(self, reason: str = "error") -> None:
        """End every waiting and running request with ``reason`` (after a failed step); the slots are freed
        and the device state is rebuilt (a failed step may have consumed the donated cache)."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        if self._pf is not None:
            waiting.insert(0, self._pf.req)
            self._pf = None
        for req in waiting:
            self._notify(req, [], reason)
            self._finish(None, req, reason)
        for slot, req in enumerate(self._slot_req):
            if req is not None:
                self._notify(req, [], reason)
                self._finish(slot, req, reason)
        self._state = self._empty_state()
        if self._csession is not None:
            self._csession.begin_batch(self.slots)

    def run_until_done(self, max_steps: Optional[int] = None) -> dict:
        """Step until no request waits or runs; returns {request id: Result} of the finished requests (and
        forgets them)."""
        n = 0
        while self.busy:
            self.step()
            n += 1
            if max_steps is not None and n >= max_steps:
                break
        out, self._results = self._results, {}
        return out
