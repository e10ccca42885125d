"""One process of the 2-process localhost test (tests/test_multihost.py starts two of these).

The environment says everything: XLA_FLAGS (devices per process), JAXDEC_COORDINATOR (localhost:PORT),
JAXDEC_NUM_PROCESSES, JAXDEC_PROCESS_ID. Joins the job through `jaxdec.sharding.initialize_distributed`
(jax.distributed from those variables; gloo collectives on CPU), builds one global data x model mesh (data across the
processes, model within each), greedy-decodes the tiny Llama's prompts with ``generate(mesh=...)`` and
prints ``RESULT {json}``: the gathered tokens, how the token buffer was placed, and (process 0) the
tokens of the same decode on this process's first device alone.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from jaxdec import sharding  # noqa: E402


def main():
    assert sharding.initialize_distributed(timeout_s=60), "JAXDEC_COORDINATOR is not set"
    pid, nproc = jax.process_index(), jax.process_count()
    from tiny_llama import tiny_llama, tiny_prompts

    from jaxdec.core.generate import generate
    model, params = tiny_llama()
    prompts = tiny_prompts(8)
    local = jax.local_device_count()
    mesh = sharding.make_mesh(nproc, local)  # data across processes x model within one
    g = generate(model, params, prompts, max_new_tokens=16, mesh=mesh)
    ts = g.extras["token_sharding"]
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "devices": len(jax.devices()), "local_devices": local, "mesh": dict(mesh.shape),
           "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
           "tokens": g.tokens, "token_spec": str(ts.spec), "token_fully_addressable": bool(ts.is_fully_addressable)}
    if pid == 0:  # the same decode on one device (no mesh, no collective)
        out["single"] = generate(model, params, prompts, max_new_tokens=16).tokens
    print("RESULT " + json.dumps(out), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
