"""Issue 19, shipped part: the masked-diffusion task model, the same-size autoregressive model and the
Learn2PD filter shipped in the package (`jaxdec.diffusion.shipped`). The diffusion model scores >= 90 % on
held-out copy and reverse at one token per step (an untrained model of the same size: the control); every
sampler runs on it at reduced size (FreeDave == one-per-step exactly); they load by name from Python and
the CLI; their files carry provenance and stay under the size budget."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxdec.diffusion import model as DM
from jaxdec.diffusion import shipped
from jaxdec.diffusion import tasks as T
from jaxdec.diffusion.samplers import SAMPLERS, SamplerConfig, sample

N_HELDOUT = 32  # held-out examples per task in the accuracy check
LENGTH = T.PROMPT_LEN + T.GEN_LEN  # one canvas length for every task: one compile per sampler


@pytest.fixture(scope="module")
def diff():
    model, params, obj = shipped.load_model("diffusion-tasks", require="masked_diffusion")
    return dict(model=model, params=params, fn=DM.logits_fn(model), obj=obj)


def _exact(fn, params, task, n, cfg, **kw):
    ex = T.heldout(task, n)
    toks, st = sample(fn, params, [T.encode(e.prompt) for e in ex], T.GEN_LEN, cfg, length=LENGTH, **kw)
    return float(np.mean([T.grade(e.prompt, T.decode(t)) for e, t in zip(ex, toks.tolist())])), toks, st


def test_shipped_diffusion_model_scores_90_on_heldout_copy_and_reverse(diff):
    one = SamplerConfig("one-per-step", mask_id=T.MASK_ID, pad_id=T.PAD_ID)
    for task in ("copy", "reverse"):
        acc, _, st = _exact(diff["fn"], diff["params"], task, N_HELDOUT, one)
        assert acc >= 0.9, (task, acc)
        assert st["model_calls"] == [T.GEN_LEN] * N_HELDOUT  # one token per call
    # control: an untrained model of the same size fails the same check
    cfg = json.load(open(os.path.join(shipped.shipped_path("diffusion-tasks"), "config.json")))["jaxdec_task_model"]
    fresh = DM.init_params(DM.TaskModelConfig(**cfg), seed=3)
    assert _exact(diff["fn"], fresh, "copy", N_HELDOUT, one)[0] < 0.9


def test_every_sampler_runs_on_the_shipped_model_at_reduced_size(diff):
    ex = T.heldout("copy", 4)
    prompts = [T.encode(e.prompt) for e in ex]
    filt = shipped.load_filter()
    base = None
    for name in SAMPLERS:
        cfg = SamplerConfig(name, steps=8, block_length=None if name in ("one-per-step", "freedave") else 8,
                            threshold=0.9, delimiters=T.DELIMITER_IDS, eos_id=T.EOS_ID)
        toks, st = sample(diff["fn"], diff["params"], prompts, T.GEN_LEN, cfg, length=LENGTH,
                          filter_params=filt if name == "learn2pd" else None)
        assert not np.any(toks == T.MASK_ID), name
        assert all(1 <= c <= T.GEN_LEN + 1 for c in st["model_calls"]), (name, st["model_calls"])
        if name == "one-per-step":
            base = (toks, st)
            assert np.mean([T.grade(e.prompt, T.decode(t)) for e, t in zip(ex, toks.tolist())]) >= 0.75
        if name == "freedave":
            np.testing.assert_array_equal(toks, base[0])  # greedy-exact
            assert sum(st["model_calls"]) < sum(base[1]["model_calls"])


def test_loading_by_name_python_and_cli(diff, tmp_path, capsys):
    from jaxdec.cli import main
    assert diff["obj"] == "masked_diffusion"
    assert shipped.load_model("diffusion-tasks-ar")[2] == "autoregressive"
    with pytest.raises(ValueError, match="holds a task model trained 'autoregressive'"):
        shipped.load_model("diffusion-tasks-ar", require="masked_diffusion")
    with pytest.raises(ValueError, match="name must be a shipped task model"):
        shipped.load_model("no-such-model")
    prompt = "copy : Ada Lovelace , Alan Turing , Grace Hopper =>"
    want = "Ada Lovelace , Alan Turing , Grace Hopper"
    out = tmp_path / "out.jsonl"

    def cli(*extra):
        if out.exists():
            out.unlink()
        rc = main(["generate", "--prompt", prompt, "--quiet", "--out", str(out), "--max-new-tokens", "24", *extra])
        return rc, ([json.loads(x) for x in out.read_text().splitlines()] if rc == 0 else None)

    rc, rows = cli("--model", "diffusion-tasks", "--method", "diffusion", "--sampler", "learn2pd",
                   "--block-length", "8")  # the shipped filter by default
    assert rc == 0 and rows[0]["text"] == want and rows[0]["stats"]["sampler"] == "learn2pd", rows
    assert rows[0]["stats"]["model_calls"] < T.GEN_LEN
    rc, rows = cli("--model", "diffusion-tasks-ar", "--method", "greedy")
    assert rc == 0 and rows[0]["text"].strip() == want, rows
    # the wrong kind of decoding for each shipped model is refused by name
    rc, _ = cli("--model", "diffusion-tasks", "--method", "greedy")
    assert rc == 2 and "is a masked-diffusion model: decode it with --method diffusion" in capsys.readouterr().err
    rc, _ = cli("--model", "diffusion-tasks-ar", "--method", "diffusion")
    assert rc == 2 and "is the autoregressive task model" in capsys.readouterr().err


def test_provenance_and_size_budget(tmp_path):
    from jaxdec.speculative.heads.artefact import HeadsMismatch, load_heads, read_heads, target_fingerprint
    for name in shipped.NAMES:
        p = shipped.shipped_path(name)
        size = sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p)) if os.path.isdir(p) else os.path.getsize(p)
        assert size <= 20 * 2 ** 20, (name, size)
        meta = shipped.provenance(name)
        for key in ("kind", "format", "config", "fingerprint", "command", "commit", "steps", "data", "data_examples",
                    "wall_s", "final_eval"):
            assert meta.get(key) not in (None, "", {}), (name, key)
        assert meta["name"] == name and meta["command"].startswith("python -m train.")
    for name in shipped.MODELS:
        acc = shipped.provenance(name)["heldout_exact"]
        assert set(acc) == set(T.TASKS)
    assert min(shipped.provenance("diffusion-tasks")["heldout_exact"][t] for t in ("copy", "reverse")) >= 0.9
    # the filter is bound to the shipped model it was trained on; another model's fingerprint is refused
    fpath = shipped.shipped_path("learn2pd-diffusion-tasks")
    load_heads(fpath, shipped.FILTER_KIND, target_fingerprint(shipped.shipped_path("diffusion-tasks")))
    with pytest.raises(HeadsMismatch):
        load_heads(fpath, shipped.FILTER_KIND, target_fingerprint(shipped.shipped_path("diffusion-tasks-ar")))
    # control: a weights file without the provenance header is refused by name
    from safetensors.numpy import load_file, save_file
    bare = tmp_path / "bare"
    shutil.copytree(shipped.shipped_path("diffusion-tasks"), bare)
    save_file(load_file(str(bare / "model.safetensors")), str(bare / "model.safetensors"))
    with pytest.raises(ValueError, match="no jaxdec heads metadata"):
        read_heads(str(bare / "model.safetensors"), shipped.MODEL_KIND)
    with pytest.raises(ValueError, match="name must be one of the shipped diffusion artefacts"):
        shipped.provenance("nope")
