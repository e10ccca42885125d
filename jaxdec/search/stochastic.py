"""Stochastic beam search (Kool, van Hoof & Welling, 2019): k sequences sampled *without replacement*.

Gumbel-top-k over whole sequences, done incrementally: every partial sequence y carries its
log-probability phi(y) and a perturbed value G(y) ~ Gumbel(phi(y)) conditioned on being the maximum of
its children's perturbed values. Expanding y draws independent G~(c) = phi(c) + Gumbel(0) for each
child c, then shifts them so their maximum equals G(y):

    G(c) = -log(exp(-G(y)) - exp(-Z) + exp(-G~(c))),   Z = max_c G~(c)

(computed in the numerically stable form of the paper's appendix). Each step keeps the k largest G
among the children of the running beams and the already finished sequences (which carry over
unchanged); a sequence finishes on a stop id or at max_new_tokens. The final k finished sequences are
then exactly a sample without replacement from the model's sequence distribution, in sampling order
(largest G first), and phi is each one's log-probability (under ``temperature``).

``exact=False`` is an ablation (independent Gumbel noise per step, no conditioning on the parent),
which is *not* a without-replacement sample; tests use it as a negative control.

Host entry: `stochastic_beam_search(model, params, prompts, k=4, ...)` -> `Generation` with
``extras["beams"][i] = [{"tokens", "score" (= log-prob), "gumbel"}, ...]`` in sampling order.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.core.generate import Generation
from jaxdec.core.logits import check_processors, post_commit, run_processors, step_context, with_sampling
from jaxdec.core.state import emit
from jaxdec.core.steps import decode_call, initial_state, prefill
from jaxdec.search.common import expand_cache, flat, global_rows, per_prompt, reorder_cache, run_grouped

from jaxdec.masks import IMPOSSIBLE_LOGPROB as NEG_INF  # dead hypotheses (-inf)


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate everywhere."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def shift_gumbel(target, z, g):
    """Shift perturbed values ``g`` whose maximum is ``z`` so that their maximum becomes ``target``
    (the conditional Gumbel of Kool et al., eq. 23 / appendix B). Broadcasts target, z against g."""
    v = target - g + log1mexp(jnp.minimum(g - z, 0.0))
    return target - jax.nn.relu(v) - jnp.log1p(jnp.exp(-jnp.abs(v)))


@struct.dataclass
class SBSInputs:
    """Per-row inputs (traced): ``temperature [B]`` float32 of the Gumbel perturbation."""

    temperature: jax.Array


@struct.dataclass
class SBSState:
    """`StochasticBeam`'s method state; B prompts of k rows.

    phi:         [B, k] float32 each sample's log-probability (-inf: empty slot).
    G:           [B, k] float32 its perturbed (Gumbel) log-probability.
    key:         [B, 2] uint32 each prompt's key (step keys fold in the loop step).
    temperature: [B * k] float32.
    start:       [B * k] int32 cache length at the prompt's end.
    """

    phi: jax.Array
    G: jax.Array
    key: jax.Array
    temperature: jax.Array
    start: jax.Array


@dataclasses.dataclass(frozen=True)
class StochasticBeam:
    """k rows per prompt; per-row ``inputs.method.temperature`` (an `SBSInputs`, traced)."""

    k: int = 4
    exact: bool = True
    processors: tuple = ()  # the user's logits processors, applied to the tempered log-probs
    shared_prefix_ok = True  # one prompt per batch may use a Hydragen shared-prefix cache

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        k = self.k
        b = prompts.shape[0]
        logits, cache, _ = prefill(model, params, prompts, prompt_lens, cache)
        cache = expand_cache(cache, k)
        logits = jnp.repeat(logits, k, axis=0)
        first = jnp.arange(k) == 0
        method = SBSState(
            phi=jnp.where(first, 0.0, NEG_INF)[None].repeat(b, 0).astype(jnp.float32),
            G=jnp.where(first, 0.0, NEG_INF)[None].repeat(b, 0).astype(jnp.float32),
            key=inputs.keys[::k],
            temperature=inputs.method.temperature.astype(jnp.float32),
            start=cache.lengths)
        state = initial_state(jnp.zeros((b * k, 1), jnp.int32), cache, inputs, method,
                              {"model_calls": jnp.ones((), jnp.int32)})
        return self._advance(state, logits)

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._advance(state, logits)

    def _advance(self, state, logits):
        k = self.k
        m = state.method
        b = state.batch // k
        v = logits.shape[-1]
        temp = m.temperature[:, None]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32) / temp, axis=-1)
        ctx = step_context(state)
        lp = run_processors(with_sampling(self.processors, False), lp, ctx)
        lp = per_prompt(lp, k)  # [B,k,V]
        phi, g = m.phi, m.G
        alive = phi > NEG_INF
        fin = per_prompt(state.done, k) & alive
        running = alive & ~fin
        phi_c = phi[:, :, None] + lp
        keys = jax.vmap(lambda kk: jax.random.fold_in(kk, state.step))(m.key)
        gum = jax.vmap(lambda kk: jax.random.gumbel(kk, (k, v), jnp.float32))(keys)
        g_tilde = phi_c + gum
        if self.exact:
            z = jnp.max(g_tilde, axis=-1, keepdims=True)
            g_c = shift_gumbel(g[:, :, None], z, g_tilde)
        else:
            g_c = g_tilde
        cand = jnp.where(running[:, :, None], g_c, NEG_INF)
        carry = jnp.where(fin, g, NEG_INF)[:, :, None]
        allc = jnp.concatenate([cand, carry], axis=2).reshape(b, k * (v + 1))
        vals, idx = jax.lax.top_k(allc, k)
        src = idx // (v + 1)
        col = idx % (v + 1)
        is_carry = col == v
        valid = vals > NEG_INF
        tok = jnp.where(is_carry, 0, col).astype(jnp.int32)
        phi_new = jnp.where(is_carry, jnp.take_along_axis(phi, src, axis=1),
                            jnp.take_along_axis(phi_c.reshape(b, k * v), src * v + tok, axis=1))
        phi_new = jnp.where(valid, phi_new, NEG_INF)
        g_new = jnp.where(valid, vals, NEG_INF)

        live_prompt = ~jnp.all(per_prompt(state.done, k), axis=1)  # finished prompts stay as they are
        src = jnp.where(live_prompt[:, None], src, jnp.arange(k)[None, :])
        rows = global_rows(src)
        method = m.replace(phi=jnp.where(live_prompt[:, None], phi_new, phi),
                           G=jnp.where(live_prompt[:, None], g_new, g))
        expand = flat(live_prompt[:, None] & valid & ~is_carry)
        gathered = state.replace(
            tokens=jnp.take(state.tokens, rows, axis=0), num_new=jnp.take(state.num_new, rows, axis=0),
            finish=jnp.take(state.finish, rows, axis=0), last=jnp.take(state.last, rows, axis=0),
            done=~expand, cache=reorder_cache(state.cache, rows, m.start, state.capacity), method=method)
        # only expanded rows take a token; carried (finished) and empty rows stay done with their reason
        post_commit(self.processors, ctx, flat(tok)[:, None], expand.astype(jnp.int32), rows)
        out = emit(gathered, flat(tok))
        return out.replace(done=out.done | ~expand)


def stochastic_beam_search(model, params, prompts, *, k: int = 4, max_new_tokens: int = 64,
                           min_new_tokens: int = 0, temperature: float = 1.0, seed: int = 0, stop_ids=None,
                           batch_size: Optional[int] = None, cache_size: Optional[int] = None, exact: bool = True,
                           tokenizer=None, debug: bool = False, callback=None, processors=None,
                           constraint=None) -> Generation:
    """k sequences per prompt sampled without replacement (Gumbel-top-k via stochastic beam search).
    constraint: a `jaxdec.constrained` constraint (or one per prompt; needs ``tokenizer=``): every row is
    masked by its own matcher, forked when rows are reordered, so the k samples are drawn without
    replacement from the model's sequences that the grammar accepts; ``constraint_ok`` per prompt and per
    sample.

    Returns a `Generation`: ``tokens[i]`` is the first sample (largest perturbed value), and
    ``extras["beams"][i]`` all k samples in sampling order as ``{"tokens", "score", "gumbel"}`` where
    score is the sequence's log-probability under the (temperature-scaled) model. Fewer than k are
    returned when the model has fewer than k complete sequences.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    dec = StochasticBeam(k=int(k), exact=bool(exact), processors=check_processors(processors, "stochastic_beam_search"))

    def extra(inputs, chunk):
        return inputs.replace(method=SBSInputs(temperature=jnp.full((inputs.batch,), temperature, jnp.float32)))

    from jaxdec.constrained.api import grouped, running  # a constraint's mask and matchers (None without)
    cons = grouped(dec, constraint, prompts, k, tokenizer=tokenizer, model=model, inputs_fn=extra,
                   who="stochastic_beam_search")
    if cons is not None:
        dec, extra = cons.decoder, cons.inputs_fn
    with running(cons):
        prompts, results, stats = run_grouped(dec, model, params, prompts, k, max_new_tokens=max_new_tokens,
                                              min_new_tokens=min_new_tokens, stop_ids=stop_ids, seed=seed,
                                              batch_size=batch_size, cache_size=cache_size, debug=debug,
                                              callback=callback, extra_inputs=extra)
    beams, best, finish = [], [], []
    for state, real in results:
        toks = np.asarray(state.tokens)
        nn = np.asarray(state.num_new)
        fr = np.asarray(state.finish)
        phi = np.asarray(state.method.phi)
        g = np.asarray(state.method.G)
        for bi in range(real):
            order = np.argsort(-g[bi], kind="stable")
            hyps = []
            for j in order:
                if not np.isfinite(phi[bi, j]):
                    continue
                r = bi * k + j
                hyps.append({"tokens": toks[r, :nn[r]].tolist(), "score": float(phi[bi, j]),
                             "gumbel": float(g[bi, j]), "finish_reason": "eos" if fr[r] == 1 else "length"})
            beams.append(hyps)
            best.append(hyps[0]["tokens"])
            finish.append(hyps[0]["finish_reason"])
    new = sum(len(t) for t in best)
    stats.update({"new_tokens": new, "tokens_per_second": new / stats["seconds"] if stats["seconds"] > 0 else
                  float("nan"), "k": k})
    text = [tokenizer.decode(t) for t in best] if tokenizer is not None else None
    ok = None
    if cons is not None:
        ok = cons.ok(best, range(len(best)))
        cons.mark(beams)
    return Generation(prompt_ids=prompts, tokens=best, finish_reason=finish, stats=stats, text=text,
                      extras={"beams": beams}, constraint_ok=ok)
