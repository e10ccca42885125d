"""The Pallas attention kernel (interpret mode on CPU) under a mesh: run as a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/test_sharding.py does). Greedy-decodes the
tiny Llama (16 / 8 heads: split on a model axis of 4) with ``attention_impl="pallas"`` on one device and
on a 2x4 mesh, counting the kernels `jaxdec.sharding.shard_map_attention` wrapped and the shard_map
equations in the traced decode step, and prints ``RESULT {json}``."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from jaxdec import sharding  # noqa: E402
from jaxdec.core.generate import generate  # noqa: E402


def main():
    from tiny_llama import tiny_llama, tiny_prompts
    model, params = tiny_llama()
    model = model.with_attention("pallas")
    prompts = tiny_prompts(8)
    wrapped = []
    real = sharding.shard_map_attention

    def spy(fn, mesh, split_heads):
        wrapped.append({"mesh": dict(mesh.shape), "split_heads": split_heads, "fn": getattr(fn, "__name__", "")})
        return real(fn, mesh, split_heads)

    sharding.shard_map_attention = spy
    one = generate(model, params, prompts, max_new_tokens=12)
    single_wraps = len(wrapped)
    mesh = sharding.make_mesh(2, 4)
    g = generate(model, params, prompts, max_new_tokens=12, mesh=mesh)
    # the traced forward of a mesh model holds shard_map equations; the single-device one none
    m = dataclasses.replace(model, matmul_impl="xla", attention_mesh=mesh)
    import numpy as np
    ids = np.ones((8, 4), np.int32)
    pos = np.broadcast_to(np.arange(4, dtype=np.int32), (8, 4))

    def fwd(mod):
        return str(jax.make_jaxpr(lambda p: mod(p, ids, pos, mod.init_cache(8, 16)).logits)(params))

    res = {"devices": len(jax.devices()), "single": one.tokens, "mesh": g.tokens, "single_wraps": single_wraps,
           "wraps": wrapped[single_wraps:][:1], "mesh_wraps": len(wrapped) - single_wraps,
           "jaxpr_shard_maps": fwd(m).count("shard_map"), "jaxpr_shard_maps_single": fwd(model).count("shard_map"),
           "xla": generate(dataclasses.replace(model, attention_impl="xla"), params, prompts, max_new_tokens=12).tokens}
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
