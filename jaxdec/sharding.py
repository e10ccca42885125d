"""Meshes and partition rules: jaxdec runs on JAX's own SPMD (jit + NamedSharding), no custom scheduler.

Two axes: ``data`` splits batch rows; ``model`` splits the MLP's hidden dimension and the vocabulary
(the default model's 9 query / 3 KV heads do not divide 2, 4 or 8 devices, so heads stay whole).
`generate(..., mesh=mesh)` places params and per-row inputs with these rules and lets XLA's sharding
propagation partition the compiled loop. Multi-host: call `jax.distributed.initialize()` first; the
same mesh code then spans every process's devices.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdec.quant import QTensor

DATA, MODEL = "data", "model"


def make_mesh(data: int = None, model: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh; ``data`` defaults to all devices / model."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"model axis size {model} must divide the {len(devices)} devices")
    data = len(devices) // model if data is None else data
    if data * model != len(devices):
        raise ValueError(f"mesh {data}x{model} does not match {len(devices)} devices")
    return Mesh(np.array(devices).reshape(data, model), (DATA, MODEL))


def _spec_for(name: str, leaf_name: str, shape: tuple, model_size: int) -> P:
    """PartitionSpec of one param leaf (layer weights carry a leading [L] axis)."""
    axis = None
    if name in ("embed", "lm_head"):
        axis = 0  # vocabulary rows
    elif name in ("w_gate", "w_up"):
        axis = 1  # [L, F, ...]: FFN output features
    elif name == "w_down":
        axis = 2  # [L, E, F] (or F/32 blocks for quantized codes/scales): FFN input features
    if axis is None or len(shape) <= axis or shape[axis] % model_size:
        return P()
    spec = [None] * len(shape)
    spec[axis] = MODEL
    return P(*spec)


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a Llama params pytree (see jaxdec/models/llama.py for the layout)."""
    m = mesh.shape[MODEL]

    def for_weight(name, w):
        if isinstance(w, QTensor):
            return QTensor(*(None if x is None else NamedSharding(mesh, _spec_for(name, f, x.shape, m))
                             for f, x in (("codes", w.codes), ("scale", w.scale), ("offset", w.offset))), kind=w.kind)
        return NamedSharding(mesh, _spec_for(name, "", w.shape, m))

    out = {}
    for k, v in params.items():
        if k == "layers":
            out[k] = {n: for_weight(n, w) for n, w in v.items()}
        else:
            out[k] = for_weight(k, v)
    return out


def shard_params(params, mesh: Mesh):
    return jax.device_put(params, param_shardings(params, mesh))


def shard_rows(tree, mesh: Mesh):
    """Put per-row arrays (leading batch axis) on the mesh's data axis; scalars/unbatched stay replicated."""
    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % mesh.shape[DATA]:
            return jax.device_put(x, NamedSharding(mesh, P()))
        return jax.device_put(x, NamedSharding(mesh, P(DATA)))
    return jax.tree.map(put, tree)
