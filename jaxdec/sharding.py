"""Meshes and partition rules: jaxdec runs on JAX's own SPMD (jit + NamedSharding), no custom scheduler.

Two axes: ``data`` splits batch rows; ``model`` splits the MLP's hidden dimension and the vocabulary,
and the attention heads where both head counts divide it (the default model's 9 query / 3 KV heads do
not divide 2, 4 or 8 devices, so its heads stay whole). `generate(..., mesh=mesh)` places params and
per-row inputs with these rules and lets XLA's sharding propagation partition the compiled loop.

Multi-host: `initialize_distributed` (``jax.distributed.initialize``) first, in every process; the
same `make_mesh` then spans every process's devices (the data axis across processes first), every
process runs the same `generate` call on the same prompts, and results reach the host through
`to_host` (``process_allgather`` for arrays split over other processes' devices). From the command line:
``jaxdec generate --mesh 2x4 --coordinator HOST:PORT --num-processes N --process-id I`` in every process
(or the JAXDEC_* variables below); process 0 alone prints and writes ``--out``.

Pallas attention (``attention_impl="pallas"``) on a mesh runs per device under `jax.shard_map`
(`shard_map_attention`; the drivers hand the model its mesh): a custom call has no sharding rule.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdec.quant import PackedQ8, QTensor

DATA, MODEL = "data", "model"
_MESH_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_mesh(text: str, flag: str = "--mesh") -> tuple:
    """``"DATAxMODEL"`` (e.g. ``"2x4"``) -> ``(2, 4)``; a ValueError names ``flag`` otherwise."""
    m = _MESH_RE.match(str(text))
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"{flag} expects DATAxMODEL with two integers >= 1 (e.g. 2x4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _size(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"make_mesh: {name} must be an integer >= 1, got {v!r}")
    return int(v)


def make_mesh(data: int = None, model: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: every device of every process, ordered by
    process then id, so the data axis runs across processes and the model axis within one).

    ``data`` defaults to all devices / model. A mesh smaller than the devices uses the first
    ``data * model`` of them; a larger one is an error naming the sizes and the visible devices."""
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    model = _size("model", model)
    if data is None:
        if len(devices) % model:
            raise ValueError(f"make_mesh: model ({model}) must divide the {len(devices)} devices when data is not "
                             f"given")
        data = len(devices) // model
    data = _size("data", data)
    if data * model > len(devices):
        hint = (" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported)"
                if devices and devices[0].platform == "cpu" else "")
        raise ValueError(f"make_mesh: mesh {data}x{model} (data x model) needs {data * model} devices, but only "
                         f"{len(devices)} are visible{hint}")
    return Mesh(np.array(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def _heads(model) -> tuple:
    """(query heads, KV heads) of a Llama-family model (``model.config``), or None."""
    cfg = getattr(model, "config", None)
    h, kv = getattr(cfg, "num_heads", None), getattr(cfg, "num_kv_heads", None)
    return None if h is None or kv is None else (int(h), int(kv))


# param name -> the axis the model axis splits (layer weights carry a leading [L] axis; see
# jaxdec/models/llama.py). Quantized QTensor codes/scales keep the same axes (the inner one in blocks).
_VOCAB = {"embed": 0, "lm_head": 0}  # vocabulary rows
_MLP = {"w_gate": 1, "w_up": 1, "w_down": 2}  # [L, F, E] output features; [L, E, F] input features
_HEAD = {"wq": 1, "wk": 1, "wv": 1, "bq": 1, "bk": 1, "bv": 1, "wo": 2}  # [L, H*D, E]; wo [L, E, H*D]


def _spec_for(name: str, shape: tuple, model_size: int, split_heads: bool) -> P:
    """PartitionSpec of one param leaf."""
    axis = _VOCAB.get(name, _MLP.get(name))
    if axis is None and split_heads:
        axis = _HEAD.get(name)
    if axis is None or model_size == 1 or len(shape) <= axis or shape[axis] % model_size:
        return P()
    spec = [None] * len(shape)
    spec[axis] = MODEL
    return P(*spec)


def heads_split(model, mesh: Mesh) -> bool:
    """Whether the model axis splits attention heads: both head counts divide it (whole heads, and
    whole GQA groups, on every device)."""
    hk = _heads(model)
    m = mesh.shape[MODEL]
    return m > 1 and hk is not None and hk[0] % m == 0 and hk[1] % m == 0


def param_shardings(params, mesh: Mesh, model=None):
    """NamedShardings for a Llama params pytree. ``model`` (its ``config`` head counts) enables the
    attention-head split when both head counts divide the model axis."""
    m = mesh.shape[MODEL]
    heads = heads_split(model, mesh)
    if any(isinstance(w, PackedQ8) for w in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, PackedQ8))):
        raise ValueError("params with int8 activations (activations='q8') run on one device: their kernel has no "
                         "sharding rule; load with activations='f32' for a mesh run")

    def for_weight(name, w):
        if isinstance(w, QTensor):
            return QTensor(*(None if x is None else NamedSharding(mesh, _spec_for(name, x.shape, m, heads))
                             for x in (w.codes, w.scale, w.offset)), kind=w.kind)
        return NamedSharding(mesh, _spec_for(name, np.shape(w), m, heads))

    return {k: ({n: for_weight(n, w) for n, w in v.items()} if k == "layers" else for_weight(k, v))
            for k, v in params.items()}


def place(x, s: NamedSharding):
    """``x`` (the same full value in every process) as a global array with sharding ``s``. One process:
    `jax.device_put`. Several: each process builds only the shards of its own devices from its host
    copy (`jax.make_array_from_callback`), so no process ships or compares the whole array."""
    if (jax.process_count() == 1 or s.is_fully_addressable
            or (isinstance(x, jax.Array) and not x.is_fully_addressable)):
        return jax.device_put(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])


def shard_params(params, mesh: Mesh, model=None):
    return jax.tree.map(place, params, param_shardings(params, mesh, model))


def shard_rows(tree, mesh: Mesh):
    """Put per-row arrays (leading batch axis) on the mesh's data axis; scalars/unbatched stay replicated.
    With several processes each one feeds the rows of its own devices (`place`)."""
    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % mesh.shape[DATA]:
            return place(x, NamedSharding(mesh, P()))
        return place(x, NamedSharding(mesh, P(DATA)))
    return jax.tree.map(put, tree)


def to_host(x) -> np.ndarray:
    """A NumPy copy of ``x`` on this host: arrays split over other processes' devices are gathered with
    ``process_allgather`` (every process must call it: a collective), everything else is `np.asarray`."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def initialize_distributed(coordinator_address: str = None, num_processes: int = None, process_id: int = None,
                           timeout_s: int = 300) -> bool:
    """``jax.distributed.initialize`` from arguments or the environment (``JAXDEC_COORDINATOR``,
    ``JAXDEC_NUM_PROCESSES``, ``JAXDEC_PROCESS_ID``); nothing to do (False) when neither names a
    coordinator. On CPU the cross-process collectives are gloo's (JAX's default there)."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXDEC_COORDINATOR")
    if not coordinator_address:
        return False
    num_processes = num_processes if num_processes is not None else env.get("JAXDEC_NUM_PROCESSES")
    process_id = process_id if process_id is not None else env.get("JAXDEC_PROCESS_ID")
    for name, v in (("num_processes", num_processes), ("process_id", process_id)):
        if v is None or not str(v).lstrip("-").isdigit():
            raise ValueError(f"initialize_distributed: {name} must be an integer (argument or JAXDEC_"
                             f"{name.upper()}), got {v!r}")
    num_processes, process_id = int(num_processes), int(process_id)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"initialize_distributed: need num_processes >= 1 and 0 <= process_id < num_processes, "
                         f"got {num_processes} and {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=int(timeout_s))
    return True


def shard_map_attention(fn, mesh: Mesh, split_heads: bool):
    """``fn`` (an attention kernel with `jaxdec.attention.reference.attend`'s signature, e.g. the Pallas
    `tree_attention`) run per device under `jax.shard_map`: batch rows over the data axis and, when
    ``split_heads`` (both head counts divide the model axis: whole GQA groups per device), the query and KV
    heads over the model axis; otherwise every device of the model axis computes its rows' attention whole.
    A Pallas call is a custom call with no sharding rule: left to the partitioner, XLA would gather its
    operands onto every device; under shard_map each device runs the kernel on its own shard."""
    h = MODEL if split_heads else None
    heads = P(DATA, None, h, None)  # q, caches, new keys/values and the output: [B, T or S, heads, D]
    rows = P(DATA)  # lengths [B], block_mask [B,T,T], q_pos [B,T]

    def wrapped(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos, sliding_window=None, **kw):
        body = lambda *a: fn(*a, sliding_window=sliding_window, **kw)  # noqa: E731 (static kwargs closed over)
        return jax.shard_map(body, mesh=mesh, in_specs=(heads, heads, heads, rows, heads, heads, rows, rows),
                             out_specs=heads, check_vma=False)(q, k_cache, v_cache, lengths, k_new, v_new,
                                                               block_mask, q_pos)

    return wrapped
