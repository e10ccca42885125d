"""8 simulated CPU devices: a data mesh and a 2x4 data x model mesh give the same tokens as one device."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import peer

HERE = os.path.dirname(__file__)


MESHES = {"f32": ("data8", "data2_model4"), "q": ("data2_model4",)}  # q: the model-axis split of QTensor codes


# q weights (QTensor codes split over the model axis) cost a second 8-device subprocess (~3 min here): acceptance tier
@pytest.mark.parametrize("weights", ["f32", pytest.param("q", marks=pytest.mark.slow)])
def test_meshes_give_single_device_tokens(weights, chat_prompt_ids):
    prompts = chat_prompt_ids[:8]
    meshes = MESHES[weights]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "sharding_check.py"), peer.default_gguf_path(),
                           weights, "12", json.dumps(prompts), ",".join(meshes)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["devices"] == 8
    for name in meshes:
        assert res[name]["tokens"] == res["single"], f"{name} tokens differ from one device"
        # the KV cache (the per-row state that dominates memory) and the output token buffer are split over
        # the data axis; specs are read from the arrays `generate` itself placed and returned
        assert not res[name]["cache_replicated"] and "data" in res[name]["cache_spec"], res[name]
        assert not res[name]["token_replicated"] and "data" in res[name]["token_spec"], res[name]
        # mesh runs trace XLA dots (shardable), never the native custom calls (XLA would all-gather their inputs)
        assert res[name]["matmul_impls"] == ["xla"], res[name]
    if "data2_model4" in meshes:  # weights split over the model axis (q: the block codes themselves)
        r = res["data2_model4"]
        assert not r["gate_replicated"] and "model" in r["gate_spec"] and "model" in r["embed_spec"], r
