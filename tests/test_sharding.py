"""8 simulated CPU devices: a data mesh and a 2x4 data x model mesh give the same tokens as one device."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import peer

HERE = os.path.dirname(__file__)


@pytest.mark.parametrize("weights", ["f32"])
def test_meshes_give_single_device_tokens(weights, chat_prompt_ids):
    prompts = chat_prompt_ids[:8]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "sharding_check.py"), peer.default_gguf_path(),
                           weights, "12", json.dumps(prompts)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["devices"] == 8
    for name in ("data8", "data2_model4"):
        assert res[name]["tokens"] == res["single"], f"{name} tokens differ from one device"
    # the fast paths really ran sharded
    # the KV cache (the per-row state that dominates memory) is split over the data axis
    assert not res["data8"]["cache_replicated"] and "data" in res["data8"]["cache_spec"], res["data8"]
    assert not res["data2_model4"]["gate_replicated"] and "model" in res["data2_model4"]["gate_spec"]
    assert "model" in res["data2_model4"]["embed_spec"]
    # mesh runs trace XLA dots (shardable), never the native custom calls (XLA would all-gather their inputs)
    for name in ("data8", "data2_model4"):
        assert res[name]["matmul_impls"] == ["xla"], res[name]
