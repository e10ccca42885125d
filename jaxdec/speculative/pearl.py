"""PEARL (Liu et al., "PEARL: Parallel Speculative Decoding with Adaptive Draft Length", ICLR 2025) as one
step function of the spine's `lax.while_loop`.

PEARL runs the draft model and the target model *at the same time* (on two devices in the paper) and
switches between two schedules according to the last verification:

* **pre-verify** (after a rejection, and at the start): the draft model drafts ``gamma`` tokens
  ``d_1 .. d_gamma`` while the target, in parallel, runs one call on the last committed token, which
  gives its distribution for ``d_1``. Only ``d_1`` is verified. Rejected: the correction token is
  emitted and the drafts are dropped (one token per target call, as plain decoding). Accepted:
  ``d_1`` is emitted, ``d_2 .. d_gamma`` become *pending* (unverified) and the next step is post-verify.
* **post-verify**: the target verifies ``[last, d_2 .. d_gamma]`` (a call over ``gamma`` tokens) while
  the draft model, in parallel, keeps drafting ``e_1 .. e_gamma`` after ``d_gamma``, as if every pending
  token will be accepted. The chain ``d_2 .. d_gamma, e_1`` is verified (the target's logits after
  ``d_gamma`` judge ``e_1``, where plain speculative decoding would draw a bonus token). All accepted:
  ``gamma`` tokens are emitted, ``e_2 .. e_gamma`` become pending and the schedule stays post-verify,
  so the draft length grows for as long as drafts are accepted (the adaptive draft length). A rejection
  emits the accepted prefix and the correction and goes back to pre-verify.

On one device the two "parallel" calls of a step run one after the other inside the same step (they do
not depend on each other: the target's block is known before the step drafts anything), so what this
module measures is exactness and τ; the time the schedule would take with the draft and the target on
two devices is *modelled*: each step costs ``max(gamma * draft_cost, c(T))`` where ``c(T)`` is the
cost of a target call over T tokens from a cost curve (``T = gamma`` when a row of the batch is in
post-verify, else 1) and ``draft_cost`` the cost of one draft call, both relative to a one-token target
call; the sequential cost ``gamma * draft_cost + c(T)`` and plain greedy decoding's cost (one unit per
token of the longest row) are accumulated alongside.

Lossless: the greedy verifier accepts a token iff it is the target's argmax (exactly the greedy
tokens); the sampling verifier is the speculative sampling rule (accept with ``min(1, p/q)``, else draw
from ``norm(max(p - q, 0))``), applied to every token once, with the draft distribution each pending
token was drawn from kept in the state, so the emitted tokens follow the target's distribution.

State per row (``state.method``): the draft model's KV cache, which holds the committed and pending
tokens except the last one (fed at the start of the next step), the pending tokens ``pend [B, gamma-1]``
(and their draft distributions when sampling), the phase of the next step and a phase log per step
(``-1`` not running, ``0`` pre-verify, ``1`` post-verify). The target's cache holds the committed
tokens except ``state.last``, as in `SpeculativeDecoder`.

    from jaxdec.speculative import PearlDecoder, truncated_draft, with_draft_params
    dm, dp = truncated_draft(model, params, 12)
    out = generate(model, with_draft_params(params, dp), prompts, decoder=PearlDecoder(dm, gamma=4))
    out.stats["tau"], out.stats["pearl"]["post_verify_steps"], out.stats["pearl"]["speedup_parallel_model"]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.cache.kv import rollback
from jaxdec.core.state import DecodeState, emit
from jaxdec.core.steps import initial_state, prefill
from jaxdec.speculative.drafters import autoregressive_chain
from jaxdec.speculative.engine import VERIFIERS, block_targets, emit_block, first_token, step_keys
from jaxdec.speculative.stats import summarize_stats
from jaxdec.speculative.verify import greedy_verify, sampling_verify_chain

FLAT_CURVE = ((1, 1.0),)  # a target call over T tokens costs as much as over one (memory-bound decoding)


def _curve_cost(curve, t: int) -> float:
    xs = [int(a) for a, _ in curve]
    ys = [float(b) for _, b in curve]
    order = np.argsort(xs)
    return float(np.interp(t, np.asarray(xs)[order], np.asarray(ys)[order]))


def curve_from_calibration(curve: dict) -> tuple:
    """`calibrate.measure_cost_curve(...)` -> the hashable ``cost_curve`` of `PearlDecoder`."""
    return tuple(sorted((int(k), float(v)) for k, v in curve["relative"].items()))


@struct.dataclass
class PearlState:
    """`PearlDecoder`'s method state.

    sampling:  `SamplingParams` ([B] fields) for the sampling verifier, else None.
    dcache:    the draft model's KV cache.
    pend:      [B, gamma-1] int32 drafts waiting for verification (post-verify rows).
    pend_q:    [B, gamma-1, V] float32 their draft distributions (sampling verifier only).
    post:      [B] bool rows in post-verify.
    phase_log: [B, N] int8 each step's phase per row (1 post, 0 pre, -1 not running).
    """

    sampling: Any = None
    dcache: Any = None
    pend: Optional[jax.Array] = None
    pend_q: Optional[jax.Array] = None
    post: Optional[jax.Array] = None
    phase_log: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class PearlDecoder:
    """PEARL with a separate draft model (same vocabulary; a layer-truncated copy of the target from
    `truncated_draft`, or any model behind the interface). Pass ``params = with_draft_params(target,
    draft)`` to `generate`.

    gamma: draft tokens per draft phase (the paper's window γ; >= 1).
    verifier: "greedy" (exactly the greedy tokens) or "sampling" (lossless speculative sampling with the
    per-row `SamplingParams`; the draft samples from its own distribution under the same parameters).
    draft_cost: one draft call's cost relative to a one-token target call, for the parallel-time model
    (None: draft layers / target layers). cost_curve: ``((T, relative cost), ...)`` of a target call over
    T tokens (default: flat; `curve_from_calibration` turns a measured curve into one).
    skip_single: when no running row is in post-verify, the target call is over one token (``lax.cond``),
    as PEARL's pre-verify is. residual=False: the lossy negative control of the statistical tests."""

    draft_model: Any
    gamma: int = 4
    verifier: str = "greedy"
    draft_cost: Optional[float] = None
    cost_curve: tuple = FLAT_CURVE
    skip_single: bool = True
    residual: bool = True

    own_params = True

    def __post_init__(self):
        if int(self.gamma) < 1:
            raise ValueError(f"draft length (gamma) must be >= 1, got {self.gamma}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {VERIFIERS}, got {self.verifier!r}")
        if self.draft_cost is not None and not self.draft_cost >= 0:
            raise ValueError(f"draft_cost must be >= 0, got {self.draft_cost}")
        if not self.cost_curve or any(float(c) <= 0 for _, c in self.cost_curve):
            raise ValueError("cost_curve must be a non-empty tuple of (T, positive relative cost) pairs")

    @property
    def cache_headroom(self) -> int:
        # target: a block of gamma tokens; draft: up to gamma - 1 pending tokens plus gamma new ones
        return 2 * int(self.gamma) + 1

    def _split(self, params):
        if not (isinstance(params, dict) and "target" in params and "draft" in params):
            raise ValueError("PEARL runs a draft model with its own weights: pass "
                             "params=with_draft_params(target_params, draft_params)")
        return params["target"], params["draft"]

    def _draft_cost(self, model) -> float:
        if self.draft_cost is not None:
            return float(self.draft_cost)
        return float(self.draft_model.num_layers) / float(model.num_layers)

    # ------------------------------------------------------------------------------------------
    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        tparams, dparams = self._split(params)
        dm = self.draft_model
        if dm.vocab_size != model.vocab_size:
            raise ValueError(f"draft model vocabulary ({dm.vocab_size}) differs from the target's "
                             f"({model.vocab_size}): a PEARL draft model must share the target's tokenizer")
        g = int(self.gamma)
        b = prompts.shape[0]
        logits, cache, _ = prefill(model, tparams, prompts, prompt_lens, cache)
        sampling = None
        if self.verifier == "sampling":
            if inputs.sampling is None:
                raise ValueError("the sampling verifier needs per-row SamplingParams (generate(..., sampling=...))")
            sampling = inputs.sampling
        z = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
        f = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
        stats = {"model_calls": jnp.ones((), jnp.int32), "draft_calls": z(), "row_steps": z(), "emitted": z(),
                 "accepted": z(), "pos_offered": z(g), "pos_accepted": z(g), "side_branch_accepts": z(),
                 "rank_accepts": z(1), "expanded": z(), "block_calls": z(),
                 # PEARL
                 "pearl_tokens": z(), "pearl_pre_steps": z(), "pearl_post_steps": z(), "pearl_pre_accepted": z(),
                 "pearl_post_full": z(), "pearl_post_offered": z(g), "pearl_post_accepted": z(g),
                 "pearl_single_steps": z(), "pearl_loop_steps": z(), "pearl_time_parallel": f(),
                 "pearl_time_sequential": f(), "pearl_time_draft": f(), "pearl_time_target": f(),
                 "pearl_time_greedy": f()}
        state = initial_state(prompts, cache, inputs, PearlState(sampling=sampling), stats)
        tok, _ = first_token(self.verifier, (), logits, state)
        state = emit(state, tok)
        dcache = dm.init_cache(b, state.cache.size)
        _, dcache, _ = prefill(dm, dparams, prompts, prompt_lens, dcache)
        cap = state.tokens.shape[1]
        # the draft cache holds the prompt; `last` (the first new token) is fed by the first step
        m = state.method.replace(dcache=dcache, pend=z(b, g - 1), post=jnp.zeros((b,), bool),
                                 phase_log=jnp.full((b, cap), -1, jnp.int8))
        if self.verifier == "sampling":
            m = m.replace(pend_q=jnp.zeros((b, g - 1, model.vocab_size), jnp.float32))
        st = dict(state.stats)
        st["pearl_time_greedy"] = jnp.maximum(jnp.max(state.num_new) - 1, 0).astype(jnp.float32)
        return state.replace(method=m, stats=st)

    def step(self, model, params, state: DecodeState) -> DecodeState:
        tparams, dparams = self._split(params)
        dm = self.draft_model
        g = int(self.gamma)
        sample = self.verifier == "sampling"
        m = state.method
        b = state.batch
        live = ~state.done
        post = m.post & live
        start = state.cache.lengths

        # ---- target: [last] (pre-verify) or [last, pending] (post-verify); independent of this step's draft
        tblock = jnp.concatenate([state.last[:, None], m.pend], axis=1).astype(jnp.int32)  # [B,g]
        tpos = start[:, None] + jnp.arange(g, dtype=jnp.int32)[None]

        def block_call(c):
            o = model(tparams, tblock, tpos, c)
            return o.logits, o.cache

        def single_call(c):
            o = model(tparams, tblock[:, :1], tpos[:, :1], c)
            return jnp.broadcast_to(o.logits, (b, g) + o.logits.shape[2:]), o.cache

        any_post = jnp.any(post)
        if g == 1:
            logits, tcache = single_call(state.cache)
        elif self.skip_single:
            logits, tcache = jax.lax.cond(any_post, block_call, single_call, state.cache)
        else:
            logits, tcache = block_call(state.cache)
            any_post = jnp.ones((), bool)

        # ---- draft: feed the one token the draft cache lacks, then draft gamma tokens
        dc0 = m.dcache
        dl0 = dc0.lengths
        miss = jnp.where(post, m.pend[:, -1], state.last) if g > 1 else state.last

        def dstep(c, x):
            o = dm(dparams, x[:, None], c.lengths[:, None], c)
            return o.cache, o.logits[:, 0]

        dc, first = dstep(dc0, miss)
        draft, dc = autoregressive_chain(dstep, dc, first, state, step_keys(state, 1), g, sample, None)
        dtok = draft.tokens  # [B,g]

        # ---- verify the chain [pending .., draft_1] (post) or [draft_1] (pre)
        pad = jnp.zeros((b, g - 1), jnp.int32)
        nodes = jnp.where(post[:, None], jnp.concatenate([m.pend, dtok[:, :1]], axis=1),
                          jnp.concatenate([dtok[:, :1], pad], axis=1))
        n_valid = jnp.where(post, g, 1).astype(jnp.int32)
        valid = jnp.arange(g)[None, :] < n_valid[:, None]
        block = jnp.concatenate([state.last[:, None], nodes], axis=1).astype(jnp.int32)  # [B,g+1]
        depth = jnp.broadcast_to(jnp.arange(g + 1, dtype=jnp.int32), (b, g + 1))
        # the target never saw the last node: a copy of the previous logits stands in (its verdict token is
        # the 'bonus', which PEARL does not take: it is dropped below)
        full_logits = jnp.concatenate([logits, logits[:, -1:]], axis=1)
        parents = jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32), (b, g))
        target, probs, _ = block_targets(self.verifier, (), full_logits, state, block, depth, parents)
        if sample:
            qpad = jnp.zeros((b, g - 1) + draft.q.shape[2:], jnp.float32)
            q = jnp.where(post[:, None, None], jnp.concatenate([m.pend_q, draft.q[:, :1]], axis=1),
                          jnp.concatenate([draft.q[:, :1], qpad], axis=1))
            verdict = sampling_verify_chain(step_keys(state, 2), block, valid, probs, q, self.residual)
        else:
            anc = jnp.broadcast_to(jnp.tril(jnp.ones((g + 1, g + 1), bool)), (b, g + 1, g + 1))
            verdict = greedy_verify(block, parents, valid, target, anc, depth, g)
        n_acc = verdict.n_acc
        full = n_acc >= n_valid  # every node accepted: no correction token
        n_out = jnp.where(full, n_valid, n_acc + 1).astype(jnp.int32)
        state2, cnt = emit_block(state, verdict.out, n_out)

        # ---- caches and the schedule of the next step
        keep = jnp.where(live, cnt, 0)
        new_tcache = rollback(tcache, start + keep)
        dlen = jnp.where(~live, dl0, jnp.where(full, dl0 + g, start + 1 + n_acc))
        stay = live & full
        col = jnp.minimum(state.step, state.tokens.shape[1] - 1)
        mm = state2.method.replace(
            dcache=rollback(dc, dlen), pend=jnp.where(stay[:, None], dtok[:, 1:], m.pend),
            post=jnp.where(live, full, m.post),
            phase_log=m.phase_log.at[:, col].set(jnp.where(live, post.astype(jnp.int8), jnp.int8(-1))))
        if sample:
            mm = mm.replace(pend_q=jnp.where(stay[:, None, None], draft.q[:, 1:], m.pend_q))
        state2 = state2.replace(cache=new_tcache, method=mm, step=state.step + 1)

        # ---- statistics
        st = dict(state.stats)
        d = jnp.arange(g)[None, :]
        offered = valid & (n_acc[:, None] >= d) & live[:, None]  # position d+1 offered
        accepted = (n_acc[:, None] >= d + 1) & live[:, None]
        pre = live & ~post
        i32 = lambda x: jnp.sum(x).astype(jnp.int32)  # noqa: E731
        col_sum = lambda x: jnp.sum(x, axis=0).astype(jnp.int32)  # noqa: E731
        c_d = self._draft_cost(model)
        t_draft = g * c_d
        t_target = jnp.where(any_post, _curve_cost(self.cost_curve, g), _curve_cost(self.cost_curve, 1))
        st.update({
            "model_calls": st["model_calls"] + 1,
            "draft_calls": st["draft_calls"] + draft.calls,
            "row_steps": st["row_steps"] + i32(live),
            "emitted": st["emitted"] + i32(cnt),
            "accepted": st["accepted"] + i32(jnp.where(live, n_acc, 0)),
            "pos_offered": st["pos_offered"] + col_sum(offered),
            "pos_accepted": st["pos_accepted"] + col_sum(accepted),
            "block_calls": st["block_calls"] + any_post.astype(jnp.int32),
            "pearl_tokens": st["pearl_tokens"] + i32(jnp.where(live, n_out, 0)),
            "pearl_pre_steps": st["pearl_pre_steps"] + i32(pre),
            "pearl_post_steps": st["pearl_post_steps"] + i32(post),
            "pearl_pre_accepted": st["pearl_pre_accepted"] + i32(pre & (n_acc >= 1)),
            "pearl_post_full": st["pearl_post_full"] + i32(post & full),
            "pearl_post_offered": st["pearl_post_offered"] + col_sum(offered & post[:, None]),
            "pearl_post_accepted": st["pearl_post_accepted"] + col_sum(accepted & post[:, None]),
            "pearl_single_steps": st["pearl_single_steps"] + (~any_post).astype(jnp.int32),
            "pearl_loop_steps": st["pearl_loop_steps"] + 1,
            "pearl_time_parallel": st["pearl_time_parallel"] + jnp.maximum(t_draft, t_target),
            "pearl_time_sequential": st["pearl_time_sequential"] + t_draft + t_target,
            "pearl_time_draft": st["pearl_time_draft"] + t_draft,
            "pearl_time_target": st["pearl_time_target"] + t_target,
            # plain greedy decoding of this batch: one one-token call per token of its longest row
            "pearl_time_greedy": jnp.maximum(jnp.max(state2.num_new) - 1, 0).astype(jnp.float32),
        })
        return state2.replace(stats=st)

    def summarize(self, state) -> dict:
        out = summarize_stats(state.stats)
        log = np.asarray(state.method.phase_log)
        out["phase_trace"] = [[int(x) for x in row[row >= 0]] for row in log]
        return out
