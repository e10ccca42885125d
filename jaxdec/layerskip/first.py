"""FiRST (Jain et al., 2024): router-selected layers, decided once at prefill. LOSSY.

One tiny router per layer reads the residual stream entering that layer during the prompt's prefill
(RMS-normalised, mean-pooled over the prompt's tokens) and outputs a keep probability g_l. After the
prefill (which runs every layer, so the prompt's keys/values are the full model's), layer l is skipped
for the whole generation when g_l < threshold. Decoding then runs through the driver's compiled loop
with that fixed ``[L]`` mask on the model's ``layers=`` switch (the SWIFT/DEL/EAD layer-skip
mechanism: a skipped layer is the identity and writes zeros to its cache slots, never read because the
layer stays skipped). Nothing runs in Python per token.

Batches: the decision is per batch. A layer is skipped only when the routers of every live row say so
(no row gets a smaller model than it asked for); at batch 1 (the paper's setting) it is exactly the
per-input decision. ``stats["layers_skipped"]`` lists the skipped layers (CLI: per row's batch).

Training (`train/first_routers.py`): the routers' gates scale each layer's residual update,
``h_{l+1} = h_l + g_l * (layer_l(h_l) - h_l)`` with g fixed per sequence (as at inference), and the
loss is the gated model's cross-entropy on the full model's own greedy continuation plus ``lam *
mean(g)`` (the paper's latency penalty on kept layers); the base model stays frozen. The router
features come from the full model's prefill, exactly what the decoder reads at inference.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.cache.kv import rollback
from jaxdec.core.generate import Generation, generate
from jaxdec.core.steps import decode_call, initial_state
from jaxdec.core.token import TokenDecoder, TokenState


class Routers(nn.Module):
    """L independent two-layer MLP routers ``E -> rank -> 1`` (stacked): features ``[B, L, E]`` -> keep
    logits ``[B, L]``. ``keep_bias`` initialises every router towards "keep" (sigmoid(2) = 0.88)."""

    num_layers: int
    rank: int = 16
    keep_bias: float = 2.0

    @nn.compact
    def __call__(self, feats):
        e = feats.shape[-1]
        w1 = self.param("w1", nn.initializers.normal(1.0 / np.sqrt(e)), (self.num_layers, e, self.rank))
        b1 = self.param("b1", nn.initializers.zeros, (self.num_layers, self.rank))
        w2 = self.param("w2", nn.initializers.normal(1.0 / np.sqrt(self.rank)), (self.num_layers, self.rank))
        b2 = self.param("b2", nn.initializers.constant(self.keep_bias), (self.num_layers,))
        x = feats * jax.lax.rsqrt(jnp.mean(feats * feats, axis=-1, keepdims=True) + 1e-6)
        hid = jax.nn.gelu(jnp.einsum("ble,ler->blr", x, w1) + b1)
        return jnp.einsum("blr,lr->bl", hid, w2) + b2


def init_routers(num_layers: int, hidden: int, rank: int = 16, keep_bias: float = 2.0, seed: int = 0) -> dict:
    mod = Routers(num_layers, rank, keep_bias)
    return mod.init(jax.random.key(seed), jnp.zeros((1, num_layers, hidden), jnp.float32))["params"]


def keep_prob(router_params, feats):
    """Keep probabilities ``[B, L]`` of features ``[B, L, E]``."""
    l, _, r = router_params["w1"].shape
    return jax.nn.sigmoid(Routers(l, r).apply({"params": router_params}, feats))


def forced_routers(num_layers: int, hidden: int, skip=(), rank: int = 2) -> dict:
    """Routers that ignore their input: keep probability ~1 except for the layers in ``skip`` (~0)."""
    bad = [i for i in skip if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"skip layers must be in [0, {num_layers}), got {list(skip)}")
    b2 = np.full((num_layers,), 30.0, np.float32)
    b2[list(int(i) for i in skip)] = -30.0
    return {"w1": jnp.zeros((num_layers, hidden, rank)), "b1": jnp.zeros((num_layers, rank)),
            "w2": jnp.zeros((num_layers, rank)), "b2": jnp.asarray(b2)}


def pooled_features(layer_hidden, lens):
    """``layer_hidden [L, B, T, E]`` (the residual entering each layer) -> mean over each row's first
    ``lens`` positions, ``[B, L, E]``."""
    valid = (jnp.arange(layer_hidden.shape[2])[None, :] < lens[:, None]).astype(layer_hidden.dtype)
    s = jnp.einsum("lbte,bt->ble", layer_hidden, valid)
    return s / jnp.maximum(lens, 1)[:, None, None].astype(layer_hidden.dtype)


def prefill_features(model, params, prompts, prompt_lens, cache):
    """The full-model prefill (one call) that also returns the router features:
    (logits at each row's last prompt token [B, V], cache, features [B, L, E])."""
    b, p = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    last = (prompt_lens - 1)[:, None].astype(jnp.int32)
    out = model(params, prompts, positions, cache, logits_at=last, hidden_layers=tuple(range(model.num_layers)))
    return out.logits[:, 0], rollback(out.cache, prompt_lens), pooled_features(out.layer_hidden, prompt_lens)


@functools.partial(jax.jit, static_argnums=0)
def _features_jit(model, params, ids, lens):
    return prefill_features(model, params, ids, lens, model.init_cache(ids.shape[0], ids.shape[1]))[2]


def features(model, params, ids, lens):
    """Router features ``[B, L, E]`` of right-padded prompts ``ids [B, P]`` (jitted)."""
    return _features_jit(model, params, jnp.asarray(ids, jnp.int32), jnp.asarray(lens, jnp.int32))


def gated_logits(model, params, ids, gates, positions=None):
    """Logits ``[B, T, V]`` of the model whose layer l's residual update is scaled by ``gates[:, l]``
    (uncached, causal; differentiable in ``gates``). One `lax.scan` over the stacked layers, each step the
    model itself cut to that one layer (``num_layers=1``, fed the residual as ``embeds``): one layer
    body to compile. Plain (float) layer weights; ``positions [B, T]`` default ``0 .. T-1``."""
    from jaxdec.models.llama import rms_norm
    from jaxdec.quant import matmul
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
    one = dataclasses.replace(model, config=dataclasses.replace(model.config, num_layers=1))
    at = jnp.zeros((b, 1), jnp.int32)

    def layer(h, xs):
        lp, g = xs
        p = {**params, "layers": jax.tree.map(lambda a: a[None], lp)}
        out = one(p, None, pos, one.init_cache(b, t), embeds=h, logits_at=at, return_layer_hidden=True)
        return h + g[:, None, None] * (out.layer_hidden[1] - h), None

    h0 = model.embed(params, ids).astype(jnp.float32)
    h, _ = jax.lax.scan(layer, h0, (params["layers"], jnp.transpose(gates)))
    h = rms_norm(h, params["final_norm"], model.config.rms_norm_eps)
    head = params["lm_head"] if "lm_head" in params else params["embed"]
    return matmul(h, head)


def make_loss(model, lam: float):
    """``loss_fn(router_params, base_params, batch, key)`` for `train.harness.fit`. batch: ``tokens [B,
    T]`` (prompt + the full model's greedy continuation), ``target [B, T]`` (next token), ``weight [B,
    T]`` (1 on continuation positions), ``feats [B, L, E]``, ``positions [B, T]`` (0 .. T-1, an input so XLA does not constant-fold the masks)."""

    def loss_fn(rp, base, batch, key):
        g = keep_prob(rp, batch["feats"])
        logits = gated_logits(model, base, batch["tokens"], g, batch["positions"])
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(lp, batch["target"][..., None], axis=-1)[..., 0]
        w = batch["weight"].astype(jnp.float32)
        ce = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
        agree = jnp.sum((jnp.argmax(logits, -1) == batch["target"]) * w) / jnp.maximum(jnp.sum(w), 1.0)
        keep = jnp.mean(g)
        return ce + lam * keep, {"ce": ce, "keep_frac": keep, "agree": agree,
                                 "hard_skipped": jnp.mean(jnp.sum(g < 0.5, axis=-1).astype(jnp.float32))}

    return loss_fn


# --------------------------------------------------------------------------------------------- decoding

class RouterSet:
    """Router params as a static (hashable) part of a decoder: hashed by content, so equal routers share
    one compiled program. ``threshold``: keep probability below which a layer is skipped."""

    def __init__(self, params, threshold: float = 0.5):
        self.params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
        if set(self.params) != {"w1", "b1", "w2", "b2"}:
            raise ValueError(f"router params need w1, b1, w2, b2, got {sorted(self.params)}")
        if not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        h = hashlib.sha256(repr(self.threshold).encode())
        for k in sorted(self.params):
            h.update(k.encode() + str(self.params[k].shape).encode() + self.params[k].tobytes())
        self.digest = h.hexdigest()

    @property
    def num_layers(self) -> int:
        return int(self.params["b2"].shape[0])

    def __hash__(self):
        return hash(self.digest)

    def __eq__(self, other):
        return isinstance(other, RouterSet) and other.digest == self.digest


@struct.dataclass
class FirstState(TokenState):
    """`TokenState` plus ``keep [L]`` bool: the layers this batch runs (fixed at prefill)."""

    keep: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class FirstDecoder(TokenDecoder):
    """`TokenDecoder` (greedy or sampling) whose decode steps skip the layers the routers drop at prefill."""

    routers: Any = None  # a RouterSet
    shared_prefix_ok = False  # the router features come from each row's own full prefill

    def batch_keep(self, model, feats, live):
        if self.routers is None or self.routers.num_layers != model.num_layers:
            raise ValueError(f"FirstDecoder needs a RouterSet for {model.num_layers} layers, got {self.routers!r}")
        p = keep_prob(jax.tree.map(jnp.asarray, self.routers.params), feats)
        row_keep = p >= self.routers.threshold
        # a layer is skipped only if every live row's routers skip it (no live row: keep all)
        return jnp.any(row_keep | ~live[:, None], axis=0) | ~jnp.any(live)

    def init(self, model, params, prompts, prompt_lens, cache, inputs):
        logits, cache, feats = prefill_features(model, params, prompts, prompt_lens, cache)
        keep = self.batch_keep(model, feats, inputs.max_new > 0)
        method = FirstState(sampling=None if self.greedy else inputs.sampling, keep=keep)
        if self.repetition_penalty:
            b, p = prompts.shape
            valid = jnp.arange(p)[None, :] < prompt_lens[:, None]
            seen = jnp.zeros((b, model.vocab_size), bool)
            method = method.replace(seen=seen.at[jnp.arange(b)[:, None], prompts].max(valid))
        stats = {"model_calls": jnp.ones((), jnp.int32), "skipped": (~keep).astype(jnp.int32),
                 "batches": jnp.ones((), jnp.int32)}
        state = initial_state(prompts, cache, inputs, method, stats)
        return self._commit(state, *self.pick(logits, state))

    def step(self, model, params, state):
        logits, cache, _ = decode_call(model, params, state, layers=state.method.keep)
        state = state.replace(cache=cache, step=state.step + 1,
                              stats={**state.stats, "model_calls": state.stats["model_calls"] + 1})
        return self._commit(state, *self.pick(logits, state))

    def summarize(self, state):
        sk = np.asarray(state.stats["skipped"])
        nb = int(np.asarray(state.stats["batches"]))
        return {"layers_skipped": [int(i) for i in np.flatnonzero(sk == nb)] if nb else [],
                "skip_count_per_layer": sk.tolist(), "batches": nb,
                "mean_layers_skipped": float(sk.sum()) / max(nb, 1)}


def first_generate(model, params, prompts, routers, *, threshold: float = 0.5, method: str = "greedy",
                   max_new_tokens: int = 64, min_new_tokens: int = 0, sampling=None, seed: int = 0, stop_ids=None,
                   batch_size: Optional[int] = 1, tokenizer=None, debug: bool = False, callback=None,
                   prefill_chunk=None) -> Generation:
    """FiRST decoding (lossy): ``routers`` is a router params dict (or a `RouterSet`). Batch 1 by default
    (the per-input decision); ``stats["layers_skipped"]`` lists the layers every batch skipped."""
    if method not in ("greedy", "sample"):
        raise ValueError(f"method must be 'greedy' or 'sample', got {method!r}")
    rs = routers if isinstance(routers, RouterSet) else RouterSet(routers, threshold)
    if rs.num_layers != model.num_layers:
        raise ValueError(f"routers are for {rs.num_layers} layers, the model has {model.num_layers}")
    dec = FirstDecoder(greedy=method == "greedy", routers=rs)
    return generate(model, params, prompts, decoder=dec, max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids,
                    batch_size=batch_size, tokenizer=tokenizer, debug=debug, callback=callback,
                    prefill_chunk=prefill_chunk, shared_prefix=False)


def save_routers(path: str, params, meta: Optional[dict] = None) -> str:
    """Routers as ``.npz`` (w1, b1, w2, b2 and a JSON ``meta``)."""
    import json
    arrs = {k: np.asarray(v, np.float32) for k, v in params.items()}
    np.savez(path, meta=np.asarray(json.dumps(meta or {})), **arrs)
    return path


def load_routers(path: str) -> tuple:
    """(params, meta) of a `save_routers` file; a missing or malformed file raises naming the path."""
    import json
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f"router file {path!r} does not exist (train one with python -m train.first_routers)")
    try:
        with np.load(path) as z:
            params = {k: jnp.asarray(z[k]) for k in ("w1", "b1", "w2", "b2")}
            meta = json.loads(str(z["meta"]))
    except Exception as e:
        raise ValueError(f"router file {path!r} is not a FiRST router file ({type(e).__name__}: {e})") from None
    return params, meta
