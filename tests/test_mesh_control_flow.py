"""Issue 20's deadlock: every device of a mesh must run the same collectives in the same order.

The default model's slow mesh matrix hung in sampling at 2x4 (session 14 isolated it): the decode loop's
`emit` wrote each row's new token with ``tokens.at[arange(B), pos].set(...)`` and read the old one with
``tokens[arange(B), pos]``. GSPMD cannot see that those row indices follow the data-axis split, so it
lowered them to collective-permutes, an all-reduce and all-gathers over all 8 devices that do not depend on
the model call; XLA:CPU's simulated devices (threads meeting at each collective) then ran those and the
layer loop's all-reduces in different orders on different devices: 2 threads in the layer loop's
all-reduce, 6 at the token-buffer collective-permute, for ever (the collective timeout aborts). The
order varied run to run (a race), so the regression checks here are structural and deterministic:

* `emit` on a data x model mesh compiles to no collective at all (its work is row-local);
* the whole sampling decode program of a small random Llama with the default model's 9 / 3 heads, at
  2x4, runs to completion under a short collective timeout and gives one device's tokens.

Each check runs in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before jax starts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
# a hang aborts in a minute instead of XLA's default wait
SHORT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=60 --xla_cpu_collective_timeout_seconds=60"
COLLECTIVES = ("all-reduce(", "all-gather(", "collective-permute(", "all-to-all(", "reduce-scatter(")


def run_child(code: str, timeout: int = 240) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 " + SHORT_COLLECTIVES,
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.path.join(HERE, "scripts"),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


EMIT_HLO = """
import json
import jax, jax.numpy as jnp, numpy as np
from jaxdec import sharding
from jaxdec.core.state import DecodeState, emit

mesh = sharding.make_mesh(2, 4)
b, n = 8, 16
rows = lambda x: sharding.shard_rows(x, mesh)
state = DecodeState(tokens=rows(np.zeros((b, n), np.int32)), num_new=rows(np.arange(b, dtype=np.int32) % 5),
                    done=rows(np.arange(b) % 3 == 0), finish=rows(np.zeros(b, np.int32)),
                    last=rows(np.zeros(b, np.int32)), keys=rows(np.zeros((b, 2), np.uint32)), cache=None,
                    max_new=rows(np.full(b, 4, np.int32)), min_new=rows(np.zeros(b, np.int32)),
                    stop_ids=jnp.asarray([2], jnp.int32), step=jnp.zeros((), jnp.int32))
new = rows(np.arange(b, dtype=np.int32) + 3)
f = jax.jit(emit)
txt = f.lower(state, new).compile().as_text()
out = f(state, new)
local = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), (state, new))
one = jax.jit(emit)(*local)  # the same update on one device
print("RESULT " + json.dumps({"hlo": txt, "tokens": np.asarray(out.tokens).tolist(),
                              "ref": np.asarray(one.tokens).tolist()}))
"""


def test_emit_is_row_local_on_a_mesh():
    """`emit` (every decoder's token write) compiles to no collective on a 2x4 mesh: nothing in it can
    run out of step with the model call's collectives. Fails on the gather/scatter form (collective-permutes,
    all-gathers and an all-reduce)."""
    res = run_child(EMIT_HLO, timeout=120)
    found = {c: res["hlo"].count(c) for c in COLLECTIVES if c in res["hlo"]}
    assert not found, f"emit on a 2x4 mesh compiles to collectives {found}"
    assert res["tokens"] == res["ref"]


SAMPLE_2X4 = """
import json
import numpy as np
from jaxdec import sharding
from jaxdec.core.generate import generate
import jax.numpy as jnp
from jaxdec.models.config import LlamaConfig
from jaxdec.models.llama import LlamaModel

# a small random Llama with SmolLM2's head counts (9 query / 3 KV heads: no model axis of 2, 4 or 8 divides
# them, so attention stays whole and only the MLP, embedding and head are split)
V, E, F, L, H, KVH, D = 512, 72, 128, 6, 9, 3, 8
cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=KVH,
                  head_dim=D, rope_theta=10000.0, tie_embeddings=True, eos_ids=(0,), max_position=512)
rng = np.random.default_rng(0)
w = lambda *shape, sd=0.15: jnp.asarray(rng.normal(0.0, sd, shape), jnp.float32)
params = {"embed": w(V, E, sd=1.0), "final_norm": jnp.ones((E,), jnp.float32),
          "layers": {"attn_norm": jnp.ones((L, E), jnp.float32), "wq": w(L, H * D, E), "wk": w(L, KVH * D, E),
                     "wv": w(L, KVH * D, E), "wo": w(L, E, H * D), "mlp_norm": jnp.ones((L, E), jnp.float32),
                     "w_gate": w(L, F, E), "w_up": w(L, F, E), "w_down": w(L, E, F)}}
model = LlamaModel(cfg, matmul_impl="xla")
ps = [rng.integers(3, V, 5 + (i * 5) % 9).tolist() for i in range(8)]
kw = dict(method="sample", sampling={"temperature": 1.0}, seed=7, max_new_tokens=12)
one = generate(model, params, ps, **kw).tokens
mesh = generate(model, params, ps, mesh=sharding.make_mesh(2, 4), **kw).tokens
print("RESULT " + json.dumps({"one": one, "mesh": mesh}))
"""


def test_sampling_2x4_runs_to_the_end_with_9_3_heads():
    """Sampling (the case that hung) on a 2x4 mesh with the default model's head counts (heads that divide
    no model axis stay whole, as SmolLM2's do): completes within the short collective timeout and gives one
    device's tokens exactly (sampling must match exactly: DESIGN)."""
    res = run_child(SAMPLE_2X4, timeout=240)
    assert res["mesh"] == res["one"]
    assert max(len(t) for t in res["one"]) == 12
