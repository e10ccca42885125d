"""`jaxdec generate --method beam|stochastic-beam|...`: the spine's JSONL rows plus `beams`."""
from __future__ import annotations

import json

import numpy as np
import pytest


def run_cli(tmp_path, *extra):
    from jaxdec.cli import main
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--prompt", "What is 2+2?", "--chat", "--max-new-tokens", "6", "--quiet",
               "--out", str(out), *extra])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if rc == 0 else None
    return rc, rows


def test_cli_beam_and_stochastic_beam(tmp_path):
    rc, rows = run_cli(tmp_path, "--method", "beam", "--num-beams", "3")
    assert rc == 0 and len(rows) == 1
    r = rows[0]
    assert r["prompt_ids"][:3] == [1, 9690, 198]
    assert len(r["beams"]) == 3 and r["tokens"] == r["beams"][0]["tokens"]
    scores = [b["score"] for b in r["beams"]]
    assert scores == sorted(scores, reverse=True)
    assert isinstance(r["text"], str) and r["finish_reason"] in ("eos", "length")
    rc, rows = run_cli(tmp_path, "--method", "stochastic-beam", "--num-beams", "3", "--seed", "1")
    assert rc == 0 and len({tuple(b["tokens"]) for b in rows[0]["beams"]}) == 3


def test_cli_search_bad_input(tmp_path, capsys):
    rc, _ = run_cli(tmp_path, "--method", "diverse-beam", "--num-beams", "4", "--num-beam-groups", "3")
    assert rc == 2
    assert "must divide" in capsys.readouterr().err
    rc, _ = run_cli(tmp_path, "--method", "beam", "--num-beams", "0")
    assert rc == 2


# --------------------------------------------------------------------------- --mesh for beam search (issue 20)
def _bad(capsys, argv, *needles):
    """`jaxdec generate` exits 2 with one `jaxdec: error:` line holding every needle."""
    from jaxdec import cli
    src = [] if "--prompts-file" in argv else ["--prompt", "Hi"]
    rc = cli.main(["generate", *src, "--quiet"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("jaxdec: error:"), err
    for n in needles:
        assert n in err[0], (n, err[0])


def _mesh_runs(runs, devices: int):
    """Run `_MESH_RUNS` over ``runs`` (CLI argv lists) in a subprocess with ``devices`` CPU devices; returns
    (its per-run results, the tail of its stderr)."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(__file__)
    sys.path.insert(0, here)
    from test_mesh_matrix import FAST_COMPILE, PATIENT_COLLECTIVES
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", PATIENT_COLLECTIVES,
                                   FAST_COMPILE]),
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _MESH_RUNS, json.dumps(runs)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), proc.stderr[-3000:]


def test_cli_beam_mesh_bad_input(capsys, monkeypatch, tmp_path):
    """Before any model loads: the data axis must divide prompts x --num-beams of every compiled batch (the rows
    beam search decodes), other beam methods still refuse --mesh, a multi-process beam run is refused."""
    import jax

    from jaxdec import cli
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("model loaded before the error"))
    monkeypatch.delenv("JAXDEC_COORDINATOR", raising=False)
    beam = ["--method", "beam", "--num-beams"]
    _bad(capsys, beam + ["3", "--mesh", "2x1"], "--mesh 2x1", "data axis (2)", "got 3 rows", "1 prompt x --num-beams 3")
    # control: 1 prompt x 4 beams divides; with one device the run then stops at the device count, not the rows
    n = len(jax.devices())
    _bad(capsys, beam + ["4", "--mesh", f"2x{n}"], f"needs {2 * n} devices")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(3)))
    # --batch-size counts prompts: batches of 2 and 1 prompts x 3 beams = 6 and 3 rows
    _bad(capsys, ["--prompts-file", str(prompts)] + beam + ["3", "--batch-size", "2", "--mesh", "2x1"],
         "got 3 rows", "the last batch: 1 prompt x --num-beams 3")
    _bad(capsys, ["--method", "diverse-beam", "--mesh", "1x1"], "--mesh is not used by --method diverse-beam", "beam")
    _bad(capsys, beam + ["2", "--mesh", "1x1", "--coordinator", "localhost:1234", "--num-processes", "2",
                         "--process-id", "0"], "--method beam", "--coordinator", "not supported")


_MESH_RUNS = r"""
import json, sys
from jaxdec import cli, sharding
specs = []
orig = sharding.shard_rows
def shard_rows(tree, mesh):
    out = orig(tree, mesh)
    specs.append(str(out[2].keys.sharding.spec))  # the row keys of each compiled batch (prompts x beams rows)
    return out
sharding.shard_rows = shard_rows
res = []
for argv in json.loads(sys.argv[1]):
    rc = cli.main(argv)
    out = argv[argv.index("--out") + 1]
    res.append({"rc": rc, "rows": [json.loads(l) for l in open(out)] if rc == 0 else [], "specs": specs[:]})
    specs.clear()
print("RESULT " + json.dumps(res), flush=True)
"""


def test_cli_beam_mesh_gives_single_device_beams(tmp_path):
    """`jaxdec generate --method beam --mesh 2x2` on 4 CPU devices (tiny model: heads and vocabulary split on the
    model axis) writes the rows of the same command on one device: every hypothesis's tokens, scores equal up to
    float rounding. 8 prompts, --batch-size 3 (batches of 3, 3 and 2 prompts x 4 beams: 12 and 8 rows), so a
    prompt's beams span two data shards (rows 4..7 of a 12-row batch). The mesh run really split its rows over
    the data axis (the sharding spec of every batch's row keys; its prompt tokens, one row per prompt, split only
    where the prompts divide the axis); the single-device run placed nothing."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_sharding import tiny_cli_setup
    folder, prompts = tiny_cli_setup(tmp_path)
    base = ["generate", "--model", folder, "--prompts-file", prompts, "--max-new-tokens", "8", "--quiet",
            "--method", "beam", "--num-beams", "4", "--batch-size", "3"]
    runs = [base + ["--out", str(tmp_path / "one.jsonl")], base + ["--mesh", "2x2", "--out", str(tmp_path / "mesh.jsonl")]]
    (one, mesh), err = _mesh_runs(runs, 4)
    assert one["rc"] == 0 and mesh["rc"] == 0, err
    assert one["specs"] == [] and mesh["specs"] and all("data" in s for s in mesh["specs"]), mesh["specs"]
    assert len(one["rows"]) == len(mesh["rows"]) == 8
    for i, (a, b) in enumerate(zip(one["rows"], mesh["rows"])):
        assert b["prompt_ids"] == a["prompt_ids"] and b["tokens"] == a["tokens"], f"prompt {i}: best differs"
        assert [h["tokens"] for h in b["beams"]] == [h["tokens"] for h in a["beams"]], f"prompt {i}: beams differ"
        assert np.allclose([h["score"] for h in b["beams"]], [h["score"] for h in a["beams"]], rtol=1e-5, atol=1e-6)
    # the runs are not trivially equal: beams of a prompt differ from each other and from prompt to prompt
    assert len({tuple(h["tokens"]) for h in one["rows"][0]["beams"]}) == 4
    assert len({tuple(r["tokens"]) for r in one["rows"]}) > 1


def test_cli_beam_mesh_default_model_two_prompts(tmp_path):
    """The default model, 2 chat prompts x 3 beams on 2 CPU devices: --mesh 2x1 (rows split over the data axis)
    and --mesh 1x2 (vocabulary and MLP split over the model axis) write the single-device hypotheses."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+2?"}\n{"prompt": "Name a colour."}\n')
    base = ["generate", "--prompts-file", str(prompts), "--chat", "--max-new-tokens", "12", "--quiet", "--method",
            "beam", "--num-beams", "3"]
    runs = [base + extra + ["--out", str(tmp_path / f"{i}.jsonl")]
            for i, extra in enumerate([[], ["--mesh", "2x1"], ["--mesh", "1x2"]])]
    (one, *meshes), err = _mesh_runs(runs, 2)
    assert one["rc"] == 0 and all(m["rc"] == 0 for m in meshes), err
    assert one["specs"] == [] and meshes[0]["specs"] == ["P('data',)"], meshes[0]["specs"]
    for name, m in zip(("2x1", "1x2"), meshes):
        assert len(m["rows"]) == 2
        for a, b in zip(one["rows"], m["rows"]):
            assert [h["tokens"] for h in b["beams"]] == [h["tokens"] for h in a["beams"]], f"--mesh {name} differs"
            assert np.allclose([h["score"] for h in b["beams"]], [h["score"] for h in a["beams"]], rtol=1e-5)
    assert one["rows"][0]["text"].startswith("2 + 2 = 4")  # a real decode, not an empty one
