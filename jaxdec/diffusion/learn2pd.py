"""Learn2PD (Learning to Parallel Decode): a small learned filter that says, per still-masked position,
whether the model's current prediction there is already the final answer, plus End-of-Text Prediction.

* Features (`features`, ``NFEAT`` per position, computed from the step's logits and the canvas state):
  top-1 probability, ``-log(1 - p_top1)``, top-1 minus top-2 probability, normalised entropy, relative
  position in the window, fraction of the window still masked, whether the left / right neighbour is
  decided (prompt or committed), whether the prediction is [EOS].
* `Learn2PDFilter`: a flax MLP over those features -> one logit per position (sigmoid: "ready").
* Labels (`train.learn2pd_filter.replay_labels`, the "extremely greedy" replay): decode with one token per step; at a replayed
  state a masked position is ready iff its current argmax equals the token one-per-step decoding
  finally put there. ``train/learn2pd_filter.py`` trains the filter on them.
* The sampler (``SamplerConfig("learn2pd", threshold=...)`` with ``sample(..., filter_params=...)``)
  commits every masked position of the block whose filter probability is ``>= threshold`` (and always
  the top-1-probability one). With ``eot`` (End-of-Text Prediction) once an [EOS] is committed in a row,
  the row's masked positions after it become [EOS] at once (counted as committed in that call).

A filter is saved as ``<name>.safetensors`` (the flax params, flattened) + ``<name>.json`` (hidden size,
feature count, training facts); `save_filter` / `load_filter`.
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NFEAT = 9


class Learn2PDFilter(nn.Module):
    """MLP ``[..., NFEAT] -> [...]`` logits (ready / not ready)."""

    hidden: int = 32

    @nn.compact
    def __call__(self, f):
        h = nn.gelu(nn.Dense(self.hidden)(f))
        h = nn.gelu(nn.Dense(self.hidden)(h))
        return nn.Dense(1)(h)[..., 0]


def init_filter(hidden: int = 32, seed: int = 0):
    return Learn2PDFilter(hidden).init(jax.random.key(seed), jnp.zeros((1, NFEAT), jnp.float32))


def hidden_of(params) -> int:
    return int(params["params"]["Dense_0"]["kernel"].shape[-1])


def apply_filter(params, feats):
    """Filter logits ``[...]`` of features ``[..., NFEAT]``."""
    return Learn2PDFilter(hidden_of(params)).apply(params, feats)


def features(logp, x0, p0, masked, gen, eos_id):
    """``[B,T,NFEAT]`` float32 features of every position (only masked window positions are used).

    logp ``[B,T,V]`` log-probabilities ([MASK]/[PAD] excluded), x0/p0 ``[B,T]`` argmax and its
    probability, masked/gen ``[B,T]`` bool (still masked / in the generation window)."""
    b, t = masked.shape
    p = jnp.exp(logp)
    top2 = jax.lax.top_k(p, 2)[0]
    margin = top2[..., 0] - top2[..., 1]
    ent = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1) / jnp.log(float(logp.shape[-1]))
    pos = jnp.arange(t)[None]
    big = jnp.iinfo(jnp.int32).max
    start = jnp.min(jnp.where(gen, pos, big), axis=1)
    glen = jnp.maximum(jnp.sum(gen, axis=1), 1).astype(jnp.float32)
    rel = (pos - start[:, None]).astype(jnp.float32) / glen[:, None]
    frac = jnp.broadcast_to((jnp.sum(masked & gen, axis=1) / glen)[:, None], (b, t))
    done = ~masked
    left = jnp.concatenate([jnp.ones((b, 1), bool), done[:, :-1]], axis=1)
    right = jnp.concatenate([done[:, 1:], jnp.ones((b, 1), bool)], axis=1) & jnp.concatenate(
        [gen[:, 1:], jnp.zeros((b, 1), bool)], axis=1)  # decided window position to the right
    eos = jnp.zeros_like(masked) if eos_id is None else x0 == eos_id
    conf = -jnp.log(jnp.maximum(1.0 - p0, 1e-6)) / 6.0
    fs = [p0, conf, margin, ent, rel, frac, left, right, eos]
    return jnp.stack([jnp.asarray(x, jnp.float32) for x in fs], axis=-1)


def eot_fill(masked, gen, canvas_after, eos_id):
    """End-of-Text Prediction: ``[B,T]`` bool of the masked positions after a row's first decided
    [EOS] in its window (``canvas_after``: the canvas with this step's commits)."""
    t = masked.shape[1]
    pos = jnp.arange(t)[None]
    big = jnp.iinfo(jnp.int32).max
    hit = gen & ~masked & (canvas_after == eos_id)
    first = jnp.min(jnp.where(hit, pos, big), axis=1)
    return masked & gen & (pos > first[:, None])


# ------------------------------------------------------------------------------------------ files
def save_filter(path: str, params, meta: dict | None = None) -> str:
    """Write ``path`` (.safetensors) and its .json sidecar; returns ``path``."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in flatten_dict(jax.device_get(params)).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(flat, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"kind": "learn2pd-filter", "hidden": hidden_of(params), "features": NFEAT, **(meta or {})}, f,
                  indent=1)
    return path


def load_filter(path: str):
    """The flax params of a filter written by `save_filter`."""
    from flax.traverse_util import unflatten_dict
    from safetensors.numpy import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Learn2PD filter at {path!r} (train one with python -m train.learn2pd_filter)")
    flat = load_file(path)
    params = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    if params.get("params", {}).get("Dense_0", {}).get("kernel", np.zeros((0, 0))).shape[0] != NFEAT:
        raise ValueError(f"{path!r} is not a Learn2PD filter with {NFEAT} features")
    return params
