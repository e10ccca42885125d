"""`SpeculativeDecoder`: draft -> one target call over the draft tree -> verify -> compact -> bonus.

One decoder for every speculative method: it is a frozen dataclass (static configuration, a `jit`
static argument) run by the spine's driver (`jaxdec.core.loop`), so the whole decode is one
`lax.while_loop`. A step is:

1. ``drafter.propose`` returns a static-shaped `Draft` (N nodes: tokens, parents, validity, draft
   probabilities); drafters that run a model (layer skip, draft model) make their calls here.
2. One target call over the block ``[last, node_1 .. node_N]`` at positions ``length + depth`` with
   the tree's ancestor mask (a chain's mask is causal).
3. The verifier (`greedy` or `sampling`) picks the accepted path and the bonus/correction token.
4. Output: the accepted tokens and the bonus are written for each row (rows accept different counts),
   clipped at the first stop id (an EOS accepted mid-draft ends the row there) and at ``max_new``, so a
   row emits exactly what token-by-token decoding would.
5. KV cache: the accepted path's entries are compacted with `gather_block` (a chain only rolls back),
   so each row's cache length is exactly its committed context; rows that are already done do not move.
6. ``drafter.update`` learns from the verify call (Token Recycling's adjacency, n-gram tables ...).

Rows never depend on their batch neighbours: positions, masks and cache lengths are per row.

Statistics (`summarize`): τ (mean tokens per target step per row, bonus included: 1.0 is plain
decoding), acceptance per draft position (P(position d accepted | position d-1 accepted and a draft
token was offered there)), target calls, draft calls, tokens per target call.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.cache.kv import append, gather_block, rollback
from jaxdec.core.state import EOS, LENGTH, DecodeState, emit
from jaxdec.core import reduce as reduce_lib
from jaxdec.core.keys import stream_keys, token_keys
from jaxdec.core.protocols import check_drafter, hook
from jaxdec.core.logits import post_commit, run_processors, step_context, with_sampling
from jaxdec.core.steps import initial_state, prefill
from jaxdec.speculative.drafters import DrafterCarry
from jaxdec.speculative.stats import merge_raw, summarize_stats  # noqa: F401 (re-exported)
from jaxdec.speculative.tree import ancestor_mask, block_depths
from jaxdec.speculative.verify import greedy_verify, sampling_verify_chain, sampling_verify_tree

VERIFIERS = ("greedy", "sampling")


def _write_at(buf, start, toks, cnt):
    """buf [B,C] <- toks[b, :cnt[b]] at columns start[b] .. start[b]+cnt[b]-1 (no scatter collisions)."""
    col = jnp.arange(buf.shape[1])[None, :]
    rel = col - start[:, None]
    w = (rel >= 0) & (rel < cnt[:, None])
    src = jnp.take_along_axis(toks, jnp.clip(rel, 0, toks.shape[1] - 1), axis=1)
    return jnp.where(w, src, buf)


def emit_block(state: DecodeState, toks, n):
    """Append up to ``n[b]`` tokens ``toks[b, :n[b]]`` per live row, stopping after the first stop id and
    at ``max_new``. Returns (state, cnt [B] tokens actually written)."""
    live = ~state.done
    k = toks.shape[1]
    ar = jnp.arange(k)[None, :]
    in_n = ar < n[:, None]
    stop_ids = state.stop_ids
    if stop_ids.size:
        is_stop = jnp.any(toks[..., None] == stop_ids[None, None, :], axis=-1) & in_n
    else:
        is_stop = jnp.zeros_like(in_n)
    any_stop = jnp.any(is_stop, axis=1)
    first_stop = jnp.where(any_stop, jnp.argmax(is_stop, axis=1), k)
    cnt = jnp.minimum(jnp.minimum(n, first_stop + 1), state.max_new - state.num_new)
    cnt = jnp.where(live, jnp.maximum(cnt, 0), 0).astype(jnp.int32)
    tokens = _write_at(state.tokens, state.num_new, toks, cnt)
    num_new = state.num_new + cnt
    hit_eos = live & any_stop & (first_stop < cnt)
    hit_len = live & ~hit_eos & (num_new >= state.max_new)
    finish = jnp.where(hit_eos, EOS, jnp.where(hit_len, LENGTH, state.finish))
    last_tok = jnp.take_along_axis(toks, jnp.maximum(cnt - 1, 0)[:, None], axis=1)[:, 0]
    last = jnp.where(live & (cnt > 0), last_tok, state.last)
    state = state.replace(tokens=tokens, num_new=num_new, done=state.done | hit_eos | hit_len, finish=finish,
                          last=last)
    return state, cnt


def step_keys(state: DecodeState, stream: int):
    """Per-row typed keys for this step: depend on the row's key, its progress and a stream id only."""
    return stream_keys(state.keys, state.num_new, stream)


@struct.dataclass
class SpecState:
    """`SpeculativeDecoder`'s method state (drafters read it as ``state.method``).

    hist:       [B, P + N + 1] int32 each row's context: prompt then committed output.
    hist_len:   [B] int32 valid entries of ``hist``.
    prompt_len: [B] int32.
    draft:      the drafter's own state (its `init` / `update` return it).
    sampling:   `SamplingParams` ([B] fields) for the sampling verifier, else None.
    """

    hist: jax.Array
    hist_len: jax.Array
    prompt_len: jax.Array
    draft: Any = None
    sampling: Any = None


def _chain(verifier: str, processors, state):
    sampling = verifier == "sampling"
    return with_sampling(processors, sampling), (state.method.sampling if sampling else None)


def first_token(verifier: str, processors, logits, state: DecodeState):
    """The token after the prompt from the prefill logits ``[B,V]`` (argmax, or a draw under the rows'
    `SamplingParams` for the sampling verifier) and the `ProcessorContext` its processors saw."""
    chain, sampling = _chain(verifier, processors, state)
    ctx = step_context(state, sampling=sampling)
    x = run_processors(chain, logits, ctx)
    if verifier == "greedy":
        return reduce_lib.argmax(x), ctx
    from jaxdec.core import sampling as sampling_lib
    keys = token_keys(state.keys, state.num_new)
    return sampling_lib.sample_processed(keys, x, jnp.asarray(sampling.temperature) <= 0), ctx


def block_targets(verifier: str, processors, logits, state: DecodeState, block, depth, parents):
    """Process a verify block's logits ``[B,T,V]`` (each node with its depth and parent; ``parents
    [B,T-1]`` are the draft nodes' block-index parents) -> (argmax ``[B,T]``, probabilities ``[B,T,V]``
    for the sampling verifier else None, the context)."""
    chain, sampling = _chain(verifier, processors, state)
    root = jnp.full((block.shape[0], 1), -1, jnp.int32)
    ctx = step_context(state, block=block, depth=depth, sampling=sampling,
                       parents=jnp.concatenate([root, parents.astype(jnp.int32)], axis=1))
    x = run_processors(chain, logits, ctx)
    am = reduce_lib.argmax(x)
    if verifier == "greedy":
        return am, None, ctx
    greedy_row = jnp.asarray(sampling.temperature, jnp.float32) <= 0  # [B]
    probs = jnp.where(greedy_row[:, None, None], jax.nn.one_hot(am, x.shape[-1], dtype=jnp.float32),
                      jax.nn.softmax(x, axis=-1))
    return am, probs, ctx


@dataclasses.dataclass(frozen=True)
class VerifyInfo:
    """What drafters see after a verify call (all arrays traced)."""

    block: Any  # [B,T] tokens of the block (invalid nodes replaced by 0)
    node_valid: Any  # [B,T] root and valid nodes
    logits: Any  # [B,T,V] raw target logits after each block node
    hidden: Any  # [B,T,E] target final hidden states
    depth: Any  # [B,T]
    path: Any  # [B,D+1]
    n_acc: Any  # [B] accepted draft tokens (before clipping)
    cnt: Any  # [B] tokens emitted this step
    live: Any  # [B] rows that were running at the start of the step
    start: Any  # [B] cache length at the start of the step
    out: Any  # [B,D+1] the verdict's tokens (accepted drafts then the bonus/correction)
    # [k,B,T,E] the residual stream after the layers the drafter names in ``target_hidden_layers``
    # (the model's ``hidden_layers``; EAGLE-3's fused features); None when it names none
    layer_hidden: Any = None
    # [B,S,V] target logits at the S extra input vectors of a drafter with ``extra_inputs`` (PPD's prompt
    # tokens riding in the verify call); None for every other drafter
    extra_logits: Any = None


@dataclasses.dataclass(frozen=True)
class SpeculativeDecoder:
    """drafter: any object with ``num_nodes``, ``max_depth``, ``is_chain``, ``init``, ``propose`` and
    ``update`` (see `jaxdec.speculative.drafters`). verifier: "greedy" (lossless for greedy decoding)
    or "sampling" (speculative sampling with residual resampling: lossless for sampling with the
    per-row `SamplingParams` in ``inputs.sampling``; rows with temperature 0 are greedy; the
    repetition penalty is not applied by this verifier: leave it at 1).
    tree_sampling: "iid" (siblings drawn independently, SpecInfer rule) or "without_replacement" (RSD).
    residual=False is the lossy negative control (draws the correction from p, not the residual).
    skip_empty_drafts: when no running row has a single valid draft node (prompt lookup found nothing,
    an empty recycling matrix), the step makes a plain one-token call instead of the full block call
    (`lax.cond`, both compiled once): same tokens, the cost of greedy decoding for that step.
    processors: the user's logits processors (`jaxdec.core.logits`); every node of the verify block is
    processed with its own depth and parent, so greedy verification gives exactly the tokens of greedy
    decoding with the same processors, and sampling verification samples their processed distribution.
    verify_buckets: the verify call sized to what the drafter proposed (for drafters that propose fewer
    nodes than their maximum: SpecDec++'s learned stop, prompt lookup). ``()`` (default): the full block
    of T = num_nodes + 1 tokens (or one token, see skip_empty_drafts). ``"auto"``: the powers of two below
    T, then T; or an ascending tuple of block lengths in [1, T] (T is added when missing). Each step the
    target runs over the first ``Tb`` block tokens, ``Tb`` the smallest bucket >= ``1 + (index of the last
    valid node over the running rows)`` (`lax.switch`, each bucket compiled once; skip_empty_drafts is then
    unused). The nodes after ``Tb`` are invalid for every running row, so the verdict is the same; the
    logits come from a matmul with fewer rows and may differ in the last bits (greedy tokens equal plain
    greedy decoding up to near-ties). Stats: ``block_tokens`` (the block tokens the target ran, summed
    over steps) and ``bucket_steps`` (steps per bucket). Drafters with ``extra_inputs`` (PPD) keep the
    full block."""

    drafter: Any
    verifier: str = "greedy"
    tree_sampling: str = "iid"
    residual: bool = True
    skip_empty_drafts: bool = True
    processors: tuple = ()
    verify_buckets: Any = ()

    def __post_init__(self):
        check_drafter(self.drafter)
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {VERIFIERS}, got {self.verifier!r}")
        if int(self.drafter.num_nodes) < 1:
            raise ValueError("draft length must be >= 1")
        if self.tree_sampling not in ("iid", "without_replacement"):
            raise ValueError("tree_sampling must be 'iid' or 'without_replacement'")
        if isinstance(self.verify_buckets, list):  # a list is not hashable (the decoder is a jit static argument)
            object.__setattr__(self, "verify_buckets", tuple(self.verify_buckets))
        self._buckets()  # bad verify_buckets: ValueError now, not at trace time

    def _buckets(self) -> tuple:
        """The verify block lengths this decoder may run, ascending, the full block T last."""
        t = int(self.drafter.num_nodes) + 1
        vb = self.verify_buckets
        if vb is None or (isinstance(vb, tuple) and not vb):
            return (1, t) if self.skip_empty_drafts else (t,)
        if isinstance(vb, str):
            if vb != "auto":
                raise ValueError(f"verify_buckets must be 'auto', () or an ascending tuple of block lengths in [1, {t}], "
                                 f"got {vb!r}")
            out = []
            b = 1
            while b < t:
                out.append(b)
                b *= 2
            return (*out, t)
        if not isinstance(vb, tuple) or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                                for x in vb):
            raise ValueError(f"verify_buckets must be 'auto', () or a tuple of integer block lengths in [1, {t}], "
                             f"got {vb!r}")
        vb = tuple(int(x) for x in vb)
        if min(vb) < 1 or max(vb) > t:
            raise ValueError(f"verify_buckets: every block length must be in [1, {t}] (T = draft nodes + 1 = {t}), "
                             f"got {vb}")
        if any(a >= b for a, b in zip(vb, vb[1:])):
            raise ValueError(f"verify_buckets must be strictly ascending, got {vb}")
        return vb if vb[-1] == t else (*vb, t)

    @property
    def buckets_on(self) -> bool:
        vb = self.verify_buckets
        return not (vb is None or (isinstance(vb, tuple) and not vb))

    def _split(self, params):
        """(target params, drafter params): drafters with ``own_params`` (a separate draft model) take
        ``params = {"target": ..., "draft": ...}`` (see `with_draft_params`); others share the target's."""
        if hook(self.drafter, "own_params"):
            if not (isinstance(params, dict) and "target" in params and "draft" in params):
                raise ValueError("this drafter has its own weights: pass params=with_draft_params(target, draft)")
            return params["target"], params["draft"]
        return params, params

    @property
    def cache_headroom(self) -> int:
        return int(self.drafter.num_nodes) + 1 + int(hook(self.drafter, "extra_headroom"))

    def _extra_call(self, model, params, extra_fn, dparams, state, draft, dstate, block, pos, anc, cache, kw):
        """The verify call with a drafter's S extra input vectors appended (``extra_fn(model, dparams, state,
        draft, dstate, pos, anc) -> (embeds [B,S,E], positions [B,S], mask rows [B,S,T+S])``): the block's
        tokens enter as ``model.embed`` vectors, the extra rows see what their mask rows say, no block row sees
        them; their keys/values are sliced off before the cache is written. -> (logits, hidden, kv of the
        block, layer_hidden, extra logits [B,S,V])."""
        if not getattr(model, "supports_deferred_kv_write", False) or not callable(getattr(model, "embed", None)):
            raise ValueError(f"drafter {type(self.drafter).__name__} appends extra inputs to the verify call: the "
                             "model needs embed() and write_cache=False (supports_deferred_kv_write)")
        x_emb, x_pos, x_mask = extra_fn(model, dparams, state, draft, dstate, pos, anc)
        b, t = block.shape
        s = x_emb.shape[1]
        if x_pos.shape != (b, s) or x_mask.shape != (b, s, t + s):
            raise ValueError(f"extra_inputs: positions must be [{b},{s}] and mask rows [{b},{s},{t + s}], got "
                             f"{tuple(x_pos.shape)} and {tuple(x_mask.shape)}")
        mask = jnp.concatenate([jnp.concatenate([anc, jnp.zeros((b, t, s), bool)], axis=2), x_mask.astype(bool)],
                               axis=1)
        emb = jnp.concatenate([model.embed(params, block).astype(jnp.float32), x_emb.astype(jnp.float32)], axis=1)
        o = model(params, None, jnp.concatenate([pos, x_pos.astype(pos.dtype)], axis=1), cache, mask=mask,
                  embeds=emb, **kw)
        kv = tuple(a[:, :, :t] for a in o.kv)  # the extra positions never reach the cache
        lh = o.layer_hidden[:, :, :t] if o.layer_hidden is not None and "hidden_layers" in kw else None
        return o.logits[:, :t], o.hidden[:, :t], kv, lh, o.logits[:, t:]

    # ------------------------------------------------------------------------------------------
    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        b, p = prompts.shape
        params, dparams = self._split(params)
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        depth_slots = int(self.drafter.max_depth)
        method = SpecState(hist=jnp.zeros((b, 0), jnp.int32), hist_len=prompt_lens.astype(jnp.int32),
                           prompt_len=prompt_lens.astype(jnp.int32))
        if self.verifier == "sampling":
            if inputs.sampling is None:
                raise ValueError("the sampling verifier needs per-row SamplingParams (generate(..., sampling=...))")
            method = method.replace(sampling=inputs.sampling)
        stats = {"model_calls": jnp.ones((), jnp.int32), "draft_calls": jnp.zeros((), jnp.int32),
                 "row_steps": jnp.zeros((), jnp.int32), "emitted": jnp.zeros((), jnp.int32),
                 "accepted": jnp.zeros((), jnp.int32),
                 "pos_offered": jnp.zeros((depth_slots,), jnp.int32),
                 "pos_accepted": jnp.zeros((depth_slots,), jnp.int32),
                 "side_branch_accepts": jnp.zeros((), jnp.int32),
                 "rank_accepts": jnp.zeros((int(hook(self.drafter, "max_children")),), jnp.int32),
                 "expanded": jnp.zeros((), jnp.int32), "block_calls": jnp.zeros((), jnp.int32),
                 "block_tokens": jnp.zeros((), jnp.int32),
                 "bucket_steps": jnp.zeros((len(self._buckets()),), jnp.int32)}
        state = initial_state(prompts, cache, inputs, method, stats)
        tok, ctx = first_token(self.verifier, self.processors, logits, state)
        post_commit(self.processors, ctx, tok[:, None], (~state.done).astype(jnp.int32))
        state = emit(state, tok)
        cap = state.tokens.shape[1]
        hist = jnp.concatenate([prompts.astype(jnp.int32), jnp.zeros((b, cap + 1), jnp.int32)], axis=1)
        hist = _write_at(hist, prompt_lens, tok[:, None], jnp.ones((b,), jnp.int32))
        state = state.replace(method=state.method.replace(hist=hist, hist_len=(prompt_lens + 1).astype(jnp.int32)))
        dstate = self.drafter.init(model, dparams, prompts, prompt_lens, state, inputs)
        return state.replace(method=state.method.replace(draft=dstate))

    def step(self, model, params, state: DecodeState) -> DecodeState:
        drafter = self.drafter
        params, dparams = self._split(params)
        live = ~state.done
        start = state.cache.lengths
        draft, dstate, cache = drafter.propose(model, dparams, state, step_keys(state, 1))
        n = draft.num_nodes
        max_depth = int(drafter.max_depth)
        valid = draft.valid
        parents = draft.parents
        anc = ancestor_mask(parents)
        depth = block_depths(parents, max_depth)
        block = jnp.concatenate([state.last[:, None], jnp.where(valid, draft.tokens, 0)], axis=1).astype(jnp.int32)
        pos = start[:, None] + depth
        t = block.shape[1]

        # a model that can return the block's keys/values instead of writing them (write_cache=False) gets its
        # cache written after the lax.cond: a cache passed out of a cond is copied whole by XLA:CPU (into the
        # cond's result, then into the loop's buffer)
        deferred = bool(getattr(model, "supports_deferred_kv_write", False))
        kw = {"write_cache": False} if deferred else {}
        want_layers = hook(drafter, "target_hidden_layers")
        if want_layers:
            kw["hidden_layers"] = tuple(want_layers)

        def block_call(c):
            o = model(params, block, pos, c, mask=anc, **kw)
            return o.logits, o.hidden, (o.kv if deferred else o.cache), o.layer_hidden if want_layers else None

        def prefix_call(tb, c):
            """The first ``tb`` block tokens (their ancestors all come before them; ``tb = 1``: nothing to verify,
            the plain one-token call); outputs padded to T: logits/hidden repeat the last row, keys/values are
            zeros past ``tb`` (never kept: the rollback / gather below keeps at most ``1 + accepted`` entries, all
            before ``tb``)."""
            o = model(params, block[:, :tb], pos[:, :tb], c, mask=None if tb == 1 else anc[:, :tb, :tb], **kw)

            def edge(a, axis):
                return jnp.pad(a, [(0, 0)] * axis + [(0, t - tb)] + [(0, 0)] * (a.ndim - axis - 1), mode="edge")

            kv = tuple(jnp.pad(a, [(0, 0), (0, 0), (0, t - tb), (0, 0), (0, 0)]) for a in o.kv) if deferred \
                else o.cache
            return edge(o.logits, 1), edge(o.hidden, 1), kv, edge(o.layer_hidden, 2) if want_layers else None

        def single_call(c):
            return prefix_call(1, c)

        def sized_call(tb):
            return block_call if tb == t else (lambda c: prefix_call(tb, c))

        buckets = self._buckets()
        # the block length the running rows need: the root, then up to their last valid node
        need = 1 + jnp.max(jnp.where(valid & live[:, None], jnp.arange(1, n + 1, dtype=jnp.int32)[None, :], 0))
        has_draft = need > 1
        extra_fn = hook(drafter, "extra_inputs")  # optional: only drafters that define it take this path
        extra_logits = None
        ran = jnp.full((), len(buckets) - 1, jnp.int32)  # which bucket ran (the full block unless chosen below)
        if extra_fn is not None:
            logits, hidden, written, layer_hidden, extra_logits = self._extra_call(
                model, params, extra_fn, dparams, state, draft, dstate, block, pos, anc, cache, kw)
            has_draft = jnp.ones((), bool)
        elif self.buckets_on:
            ran = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), need, side="left").astype(jnp.int32)
            logits, hidden, written, layer_hidden = jax.lax.switch(ran, [sized_call(b) for b in buckets], cache)
        elif self.skip_empty_drafts:
            logits, hidden, written, layer_hidden = jax.lax.cond(has_draft, block_call, single_call, cache)
            ran = has_draft.astype(jnp.int32)
        else:
            logits, hidden, written, layer_hidden = block_call(cache)
            has_draft = jnp.ones((), bool)
        out_cache = append(cache, *written) if deferred else written
        adjust = hook(drafter, "target_logits")
        if adjust is not None:  # the drafter redefines the target (RAPID's retrieval-augmented target: lossy)
            logits = adjust(logits, draft, dstate)
        target, probs, ctx = block_targets(self.verifier, self.processors, logits, state, block, depth, parents)
        if self.verifier == "greedy":
            verdict = greedy_verify(block, parents, valid, target, anc, depth, max_depth)
        elif drafter.is_chain:
            verdict = sampling_verify_chain(step_keys(state, 2), block, valid, probs, draft.q, self.residual)
        else:
            verdict = sampling_verify_tree(step_keys(state, 2), block, parents, valid, probs, draft.q, anc, depth,
                                           max_depth, int(drafter.max_children),
                                           self.tree_sampling == "without_replacement", self.residual)
        state2, cnt = emit_block(state, verdict.out, verdict.n_acc + 1)
        post_commit(self.processors, ctx, verdict.out, cnt)
        keep = jnp.where(live, cnt, 0)
        if drafter.is_chain:
            new_cache = rollback(out_cache, start + keep)
        else:
            new_cache = gather_block(out_cache, start, verdict.path, keep)
        m = state2.method
        m = m.replace(hist=_write_at(m.hist, m.hist_len, verdict.out, cnt), hist_len=m.hist_len + cnt, draft=dstate)
        state2 = state2.replace(cache=new_cache, method=m, step=state.step + 1)
        info = VerifyInfo(block=block, node_valid=jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1),
                          logits=logits, hidden=hidden, depth=depth, path=verdict.path, n_acc=verdict.n_acc,
                          cnt=cnt, live=live, start=start, out=verdict.out, layer_hidden=layer_hidden,
                          extra_logits=extra_logits)
        state2 = state2.replace(method=state2.method.replace(draft=drafter.update(model, dparams, state2, dstate, info)))
        st = self._stats(state.stats, draft, parents, depth, verdict, live, cnt, max_depth)
        st["block_calls"] = st["block_calls"] + has_draft.astype(jnp.int32)
        st["block_tokens"] = st["block_tokens"] + jnp.asarray(buckets, jnp.int32)[ran]
        st["bucket_steps"] = st["bucket_steps"] + (jnp.arange(len(buckets)) == ran).astype(jnp.int32)
        return state2.replace(stats=st)

    def _stats(self, st, draft, parents, depth, verdict, live, cnt, max_depth):
        n_acc = jnp.where(live, verdict.n_acc, 0)
        # offered[d]: a valid node at depth d+1 hangs below the accepted path's node at depth d
        node_depth = depth[:, 1:]  # [B,N]
        path_at_parent = jnp.take_along_axis(verdict.path, jnp.clip(node_depth - 1, 0, max_depth), axis=1)
        below = draft.valid & (parents == path_at_parent) & (node_depth - 1 <= verdict.n_acc[:, None])
        d = jnp.arange(max_depth)
        offered = jnp.any(below[:, None, :] & (node_depth[:, None, :] == d[None, :, None] + 1), axis=-1)  # [B,D]
        offered = offered & live[:, None]
        accepted = (verdict.n_acc[:, None] >= d[None, :] + 1) & live[:, None]
        # accepted paths that leave the first-child chain (a tree's side branches really won)
        n = parents.shape[1]
        earlier = jnp.tril(jnp.ones((n, n), bool), -1)
        first = ~jnp.any(earlier[None] & (parents[:, None, :] == parents[:, :, None]), axis=-1)  # [B,N]
        first = jnp.concatenate([jnp.ones_like(first[:, :1]), first], axis=1)
        on_path = jnp.arange(verdict.path.shape[1])[None] <= verdict.n_acc[:, None]
        side = jnp.any(on_path & ~jnp.take_along_axis(first, verdict.path, axis=1), axis=1) & live
        # sibling rank of each accepted node, and how many path nodes had children to try
        r_slots = int(hook(self.drafter, "max_children"))
        rank = jnp.sum(earlier[None] & (parents[:, None, :] == parents[:, :, None]), axis=-1)  # [B,N]
        rank = jnp.concatenate([jnp.zeros_like(rank[:, :1]), rank], axis=1)
        prank = jnp.take_along_axis(rank, verdict.path, axis=1)
        acc_node = on_path & (jnp.arange(verdict.path.shape[1])[None] >= 1) & live[:, None]
        rank_acc = jnp.sum(acc_node[..., None] & (prank[..., None] == jnp.arange(r_slots)), axis=(0, 1))
        t = parents.shape[1] + 1
        has_child = jnp.any(draft.valid[:, None, :] & (parents[:, None, :] == jnp.arange(t)[None, :, None]), axis=-1)
        expanded = jnp.sum(on_path & jnp.take_along_axis(has_child, verdict.path, axis=1) & live[:, None])
        return {**st,
                "model_calls": st["model_calls"] + 1,
                "draft_calls": st["draft_calls"] + (draft.calls if draft.calls is not None else
                                                    int(hook(self.drafter, "draft_calls_per_step"))),
                "row_steps": st["row_steps"] + jnp.sum(live).astype(jnp.int32),
                "emitted": st["emitted"] + jnp.sum(cnt).astype(jnp.int32),
                "accepted": st["accepted"] + jnp.sum(n_acc).astype(jnp.int32),
                "pos_offered": st["pos_offered"] + jnp.sum(offered, axis=0).astype(jnp.int32),
                "pos_accepted": st["pos_accepted"] + jnp.sum(accepted, axis=0).astype(jnp.int32),
                "side_branch_accepts": st["side_branch_accepts"] + jnp.sum(side).astype(jnp.int32),
                "rank_accepts": st["rank_accepts"] + rank_acc.astype(jnp.int32),
                "expanded": st["expanded"] + expanded.astype(jnp.int32)}

    carry_type = DrafterCarry

    def carry(self, state):
        """The drafter's exported state as the next batch's `DrafterCarry` (None if it exports nothing)."""
        export = hook(self.drafter, "export")
        out = export(state.method.draft) if export is not None else None
        return DrafterCarry.create(out) if out else None

    def summarize(self, state) -> dict:
        out = summarize_stats(state.stats)
        out["block_tokens"] = int(np.asarray(state.stats["block_tokens"]))
        out["verify_buckets"] = list(self._buckets())
        out["bucket_steps"] = [int(x) for x in np.asarray(state.stats["bucket_steps"])]
        export = hook(self.drafter, "export")
        if export is not None:  # drafter state a later run can start from (hot start), as host arrays
            out["carry"] = jax.tree.map(np.asarray, export(state.method.draft))
        return out


def with_draft_params(target_params, draft_params) -> dict:
    """The params bundle for drafters with their own weights (`DraftModelDrafter`)."""
    return {"target": target_params, "draft": draft_params}
