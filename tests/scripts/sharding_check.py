"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharding.py).
Prints one JSON line with the tokens of each layout and the shardings that were used.

argv: GGUF WEIGHTS N_NEW PROMPT_IDS_JSON [MESHES [CLI_PROMPTS_JSONL]]. With CLI_PROMPTS_JSONL (the same
prompts as text), it also runs `jaxdec generate --chat --mesh 2x4` in this process and reports its rows."""
import json
import sys

import jax

from jaxdec.core.generate import generate
from jaxdec.sharding import make_mesh
from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
from jaxdec.models import llama
from jaxdec.models.llama import LlamaModel

from jaxdec import sharding  # noqa: E402

path, weights, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = json.loads(sys.argv[4])
meshes = sys.argv[5].split(",") if len(sys.argv) > 5 else ["data8", "data2_model4"]
r = open_gguf(path)
cfg, arch = config_from_gguf(r)
params = load_gguf_params(r, cfg, arch, weights)
model = LlamaModel(cfg)
out = {"devices": len(jax.devices())}
impls = []  # the matmul implementation each traced product asked for
_matmul = llama.quant_matmul


def _spy(x, w, impl=None):
    impls.append(impl)
    return _matmul(x, w, impl)


llama.quant_matmul = _spy
used = []  # the params `generate` itself placed on the mesh (not a separate shard_params call)
_shard_params = sharding.shard_params


def _shard_spy(p, mesh, model=None):
    placed = _shard_params(p, mesh, model)
    used.append(placed)
    return placed


sharding.shard_params = _shard_spy
g1 = generate(model, params, prompts, max_new_tokens=n_new)
out["single"] = g1.tokens
for name, (d, m) in {"data8": (8, 1), "data2_model4": (2, 4)}.items():
    if name not in meshes:
        continue
    mesh = make_mesh(d, m)
    impls.clear()
    used.clear()
    g = generate(model, params, prompts, max_new_tokens=n_new, mesh=mesh)
    assert len(used) == 1, f"generate placed its params {len(used)} times"
    sp = used[0]
    gate = sp["layers"]["w_gate"]
    gate_sh = gate.codes.sharding if hasattr(gate, "codes") else gate.sharding
    emb = sp["embed"]
    emb_sh = emb.codes.sharding if hasattr(emb, "codes") else emb.sharding
    out[name] = {"tokens": g.tokens, "token_spec": str(g.extras["token_sharding"].spec),
                 "token_replicated": g.extras["token_sharding"].is_fully_replicated,
                 "cache_spec": str(g.extras["cache_sharding"].spec),
                 "cache_replicated": g.extras["cache_sharding"].is_fully_replicated,
                 "gate_spec": str(gate_sh.spec), "gate_replicated": gate_sh.is_fully_replicated,
                 "embed_spec": str(emb_sh.spec), "matmul_impls": sorted(set(map(str, impls)))}
    wq = sp["layers"]["wq"]
    out[name]["wq_replicated"] = (wq.codes if hasattr(wq, "codes") else wq).sharding.is_fully_replicated
if len(sys.argv) > 6:  # the CLI flag: `jaxdec generate --mesh 2x4` on the same prompts (as chat text)
    import os
    import tempfile

    from jaxdec import cli
    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, "out.jsonl")
        rc = cli.main(["generate", "--prompts-file", sys.argv[6], "--chat", "--weights", weights, "--max-new-tokens",
                       str(n_new), "--mesh", "2x4", "--out", dest, "--quiet"])
        rows = [json.loads(line) for line in open(dest)] if rc == 0 else []
    out["cli"] = {"rc": rc, "prompt_ids": [r["prompt_ids"] for r in rows], "tokens": [r["tokens"] for r in rows]}
print("RESULT " + json.dumps(out))
