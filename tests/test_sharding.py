"""8 simulated CPU devices: a data mesh and a 2x4 data x model mesh give the default model's tokens of one
device (the CI default-model check of issue 20's mesh matrix; the whole matrix is tests/test_mesh_matrix.py),
and `jaxdec generate --mesh 2x4` gives them too. Bad --mesh values are reported before the model loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import peer
from conftest import read_prompts
from jaxdec import cli, sharding

HERE = os.path.dirname(__file__)


# CI: 2x4 only (pure data-axis layouts are tests/test_mesh_matrix.py's 8x1 on the tiny model)
MESHES = {"f32": ("data2_model4",), "q": ("data2_model4",)}  # q: the model-axis split of QTensor codes


# q weights (QTensor codes split over the model axis) cost a second 8-device subprocess (~3 min here): acceptance tier
@pytest.mark.parametrize("weights", ["f32", pytest.param("q", marks=pytest.mark.slow)])
def test_meshes_give_single_device_tokens(weights, chat_prompt_ids, tmp_path):
    prompts = chat_prompt_ids[:8]
    meshes = MESHES[weights]
    texts = tmp_path / "prompts.jsonl"  # the same prompts as text, for `jaxdec generate --chat --mesh 2x4`
    texts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in read_prompts()[:8]))
    from test_mesh_matrix import PATIENT_COLLECTIVES
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 " + PATIENT_COLLECTIVES,
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "sharding_check.py"), peer.default_gguf_path(),
                           weights, "12", json.dumps(prompts), ",".join(meshes)]
                          + ([str(texts)] if weights == "f32" else []),
                          env=env, capture_output=True, text=True, timeout=1200)
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
        assert r["wq_replicated"], r  # 9 query / 3 KV heads do not divide the model axis (4): heads stay whole
    if weights == "f32":  # the CLI flag, on the same prompts (tokenized by jaxdec from the chat text)
        c = res["cli"]
        assert c["rc"] == 0 and c["prompt_ids"] == prompts, c
        assert c["tokens"] == res["single"], "jaxdec generate --mesh 2x4 tokens differ from one device"


def _bad(capsys, argv, *needles):
    """`jaxdec generate` exits 2 with one error line naming the flag, before any model loads."""
    rc = cli.main(["generate", "--prompt", "Hi"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("jaxdec: error:"), err
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize("value", ["2by4", "2x", "0x4", "2x4x1", "1.5x2", ""])
def test_cli_mesh_malformed(value, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("model loaded before the error"))
    _bad(capsys, ["--mesh", value], "--mesh", "DATAxMODEL", repr(value))


def test_cli_mesh_checks_devices_batch_and_method(capsys, monkeypatch):
    import jax
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("model loaded before the error"))
    n = len(jax.devices())
    _bad(capsys, ["--mesh", f"1x{n + 1}"], f"--mesh 1x{n + 1} needs {n + 1} devices", f"only {n}")
    _bad(capsys, ["--mesh", "2x1"], "--mesh 2x1", "data axis (2)", "1 prompt x --n 1")
    _bad(capsys, ["--mesh", "2x1", "--n", "4", "--batch-size", "3"], "data axis (2)", "--batch-size 3")
    _bad(capsys, ["--method", "stochastic-beam", "--mesh", "1x1"], "--mesh is not used by --method stochastic-beam",
         "greedy")
    for d in ("pearl", "draft-model", "medusa", "eagle"):  # their draft params are outside the partition rules
        _bad(capsys, ["--method", "speculative", "--drafter", d, "--mesh", "1x1"],
             f"--mesh is not supported by --drafter {d}", "pld")
    # a speculative call decodes every row in one call (batches padded to --batch-size): 1 prompt x 3 samples
    _bad(capsys, ["--method", "speculative", "--mesh", "2x1", "--n", "3"], "data axis (2)", "1 prompt x --n 3")


def test_cli_multihost_flags_checked_before_anything_starts(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("model loaded before the error"))
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **k: pytest.fail(f"initialize called: {k}"))
    for k in ("JAXDEC_COORDINATOR", "JAXDEC_NUM_PROCESSES", "JAXDEC_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    mh = ["--coordinator", "localhost:1234", "--num-processes", "2"]
    _bad(capsys, ["--coordinator", "nohost", "--mesh", "1x1"], "--coordinator expects HOST:PORT", "'nohost'")
    _bad(capsys, ["--coordinator", "localhost:70000", "--mesh", "1x1"], "--coordinator", "1..65535")
    _bad(capsys, ["--process-id", "0"], "--process-id needs --coordinator")
    _bad(capsys, mh + ["--mesh", "1x1"], "--process-id is needed with --coordinator", "JAXDEC_PROCESS_ID")
    _bad(capsys, mh + ["--process-id", "2", "--mesh", "1x1"], "--process-id must be in [0, --num-processes)", "got 2")
    _bad(capsys, ["--coordinator", "localhost:1234", "--num-processes", "0", "--process-id", "0", "--mesh", "1x1"],
         "--num-processes must be an integer >= 1")
    _bad(capsys, mh + ["--process-id", "1"], "--coordinator (a multi-process run) needs --mesh")
    _bad(capsys, mh + ["--process-id", "1", "--mesh", "1x1", "--stream"], "--stream is not supported", "multi-process")
    monkeypatch.setenv("JAXDEC_COORDINATOR", "localhost:1234")  # the environment counts as the flags
    _bad(capsys, ["--mesh", "1x1"], "--num-processes is needed with --coordinator", "JAXDEC_NUM_PROCESSES")


def test_make_mesh_errors_and_subsets():
    import jax
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"mesh 1x{n + 1} .*needs {n + 1} devices.*only {n}"):
        sharding.make_mesh(1, n + 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="model must be an integer >= 1"):
            sharding.make_mesh(1, bad)
    m = sharding.make_mesh(1, 1)  # a mesh smaller than the devices takes the first ones
    assert dict(m.shape) == {"data": 1, "model": 1}
    assert sharding.parse_mesh(" 2X4 ") == (2, 4)


def test_initialize_distributed_reads_env_and_names_bad_values(monkeypatch):
    for k in ("JAXDEC_COORDINATOR", "JAXDEC_NUM_PROCESSES", "JAXDEC_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **k: pytest.fail(f"initialize called: {k}"))
    assert sharding.initialize_distributed() is False  # no coordinator anywhere: single process, nothing to do
    monkeypatch.setenv("JAXDEC_COORDINATOR", "localhost:1234")
    with pytest.raises(ValueError, match="num_processes must be an integer .*JAXDEC_NUM_PROCESSES.*None"):
        sharding.initialize_distributed()
    monkeypatch.setenv("JAXDEC_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXDEC_PROCESS_ID", "two")
    with pytest.raises(ValueError, match="process_id must be an integer .*'two'"):
        sharding.initialize_distributed()
    with pytest.raises(ValueError, match="0 <= process_id < num_processes, got 2 and 2"):
        sharding.initialize_distributed(process_id=2)
    seen = {}
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **k: seen.update(k))
    assert sharding.initialize_distributed(process_id=1, timeout_s=9) is True
    assert seen == {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1,
                    "initialization_timeout": 9}


def tiny_cli_setup(tmp_path):
    """The tiny Llama (16 / 8 heads: both split on a model axis of 4) as an HF folder, and its 8 prompts."""
    sys.path.insert(0, os.path.join(HERE, "scripts"))
    from tiny_llama import tiny_prompt_texts, write_hf_folder
    folder = write_hf_folder(str(tmp_path / "tiny"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny_prompt_texts(8)))
    return folder, str(prompts)


def test_cli_speculative_mesh_gives_single_device_tokens(tmp_path):
    """`jaxdec generate --method speculative --drafter pld --mesh 2x4` on 8 CPU devices writes the rows of the
    same command on one device, and prompt lookup accepted drafts on both (τ > 1: a working speculative
    path, not greedy in disguise). Every drafter of MESH_DRAFTERS gave one device's tokens at 2x4 when
    checked by hand (session 8); CI runs pld."""
    from test_mesh_matrix import FAST_COMPILE, PATIENT_COLLECTIVES  # the mesh matrix's compile flags (same for both runs)
    folder, prompts = tiny_cli_setup(tmp_path)
    base = ["generate", "--model", folder, "--prompts-file", prompts, "--max-new-tokens", "16", "--quiet",
            "--method", "speculative", "--drafter", "pld", "--draft-tokens", "4"]
    runs = [base + ["--out", str(tmp_path / "one.jsonl")], base + ["--mesh", "2x4", "--out", str(tmp_path / "mesh.jsonl")]]
    env = dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=8", PATIENT_COLLECTIVES, FAST_COMPILE]), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "cli_runs.py"), json.dumps(runs)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, mesh = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert one["rc"] == 0 and mesh["rc"] == 0, (one["rc"], mesh["rc"], proc.stderr[-3000:])
    assert len(one["rows"]) == len(mesh["rows"]) == 8
    assert [r["tokens"] for r in mesh["rows"]] == [r["tokens"] for r in one["rows"]], "--mesh 2x4 tokens differ"
    assert [r["prompt_ids"] for r in mesh["rows"]] == [r["prompt_ids"] for r in one["rows"]]
    assert max(len(r["tokens"]) for r in one["rows"]) == 16
    assert one["rows"][0]["stats"]["tau"] > 1.0 and mesh["rows"][0]["stats"]["tau"] > 1.0


def test_pallas_attention_runs_per_device_under_shard_map():
    """attention_impl="pallas" on a 2x4 mesh (8 CPU devices, the kernel in interpret mode): the driver hands
    the model its mesh, the kernel is wrapped by `sharding.shard_map_attention` (heads split: 16 / 8 divide 4)
    and the traced forward holds a shard_map (the single-device one none); tokens equal one device's, which
    equal the XLA attention's."""
    from test_mesh_matrix import FAST_COMPILE, PATIENT_COLLECTIVES
    env = dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=8", PATIENT_COLLECTIVES, FAST_COMPILE]), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "pallas_mesh.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert res["devices"] == 8 and res["single_wraps"] == 0 and res["mesh_wraps"] >= 1, res
    assert res["wraps"][0] == {"mesh": {"data": 2, "model": 4}, "split_heads": True, "fn": "tree_attention"}, res
    assert res["jaxpr_shard_maps"] >= 1 and res["jaxpr_shard_maps_single"] == 0, res
    assert res["mesh"] == res["single"], "pallas attention on a 2x4 mesh: tokens differ from one device"
    assert res["single"] == res["xla"] and max(len(t) for t in res["single"]) == 12
