"""Issue 15 (train/ I): the training harness, the self-distillation corpus and Medusa-1 heads, at tiny size.

The toy target is `jaxdec.testing.toy_speculative.TrigramModel` with a table whose greedy next token is
``perm[token]`` (noise elsewhere) and params ``{"table", "embed": I}``: its hidden state is the one-hot
of the current token and its LM head is the identity, so a Medusa head can learn ``perm^(k+2)`` while
an untrained head repeats the current token. Each check has a control that would fail it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec.speculative import methods as M
from jaxdec.speculative.heads.artefact import HeadsMismatch, read_heads, save_heads
from jaxdec.speculative.heads.medusa import MedusaConfig, init_params
from jaxdec.testing.toy_speculative import TrigramModel, peaked_trigram
from train.harness import ArrayData, ConfigError, TrainConfig, _manager, fit, restore_checkpoint, tree_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 16
FP = "sha256:" + "ab" * 32  # the toy target's fingerprint
MAX_NEW = 24


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy target, its self-distillation corpus (through train.data) and a 20-step Medusa run."""
    from train.data import generate_corpus, load_corpus
    from train.medusa import MedusaTrainConfig, train_medusa
    model, params, prompts = peaked_trigram(V, 40)
    d = tmp_path_factory.mktemp("train")
    data = str(d / "data")
    part = generate_corpus(model, params, prompts[:32], [f"p{i}" for i in range(32)], data, FP, "toy",
                           max_new_tokens=MAX_NEW, batch_size=8, shard_size=16, stop_after_shards=1)
    incomplete_error = None
    try:
        load_corpus(data)
    except ValueError as e:
        incomplete_error = str(e)
    first_shard_mtime = os.path.getmtime(os.path.join(data, "shard-00000.npz"))
    man = generate_corpus(model, params, prompts[:32], [f"p{i}" for i in range(32)], data, FP, "toy",
                          max_new_tokens=MAX_NEW, batch_size=8, shard_size=16)
    corpus = load_corpus(data)
    cfg = MedusaTrainConfig(out=str(d / "run"), steps=20, batch_size=8, lr=0.3, warmup=2, positions=16, seq_len=32,
                            eval_every=10, save_every=10, log_every=1, progress=False, num_heads=3)
    res, heads = train_medusa(cfg, model, params, corpus["seqs"], corpus["prompt_lens"], FP, target_name="toy",
                              command="pytest", log=lambda *a: None)
    return dict(model=model, params=params, prompts=prompts, data=data, part=part, man=man, corpus=corpus,
                incomplete_error=incomplete_error, first_shard_mtime=first_shard_mtime, cfg=cfg, res=res,
                heads=heads, mcfg=MedusaConfig(hidden=V, num_heads=3), dir=d)


# --------------------------------------------------------------------------- self-distillation data
def test_corpus_shards_manifest_and_resume(toy):
    assert not toy["part"]["complete"] and len(toy["part"]["shards"]) == 1
    assert "incomplete" in toy["incomplete_error"]
    man = toy["man"]
    assert man["complete"] and [s["index"] for s in man["shards"]] == [0, 1] and man["fingerprint"] == FP
    # the resumed run did not rewrite the finished shard
    assert os.path.getmtime(os.path.join(toy["data"], "shard-00000.npz")) == toy["first_shard_mtime"]
    c = toy["corpus"]
    greedy = jaxdec.generate(toy["model"], toy["params"], toy["prompts"][:32], max_new_tokens=MAX_NEW)
    assert [list(s) for s in c["seqs"]] == [p + t for p, t in zip(toy["prompts"][:32], greedy.tokens)]
    assert c["prompt_lens"] == [len(p) for p in toy["prompts"][:32]]
    assert c["tokens"] == man["tokens"] == sum(len(s) for s in c["seqs"])


def test_corpus_other_settings_and_corrupt_shard_refused(toy, tmp_path):
    from train.data import generate_corpus, load_corpus
    with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
        generate_corpus(toy["model"], toy["params"], toy["prompts"][:32], [f"p{i}" for i in range(32)], toy["data"],
                        FP, "toy", max_new_tokens=MAX_NEW + 1, shard_size=16)
    bad = tmp_path / "bad"
    shutil.copytree(toy["data"], bad)
    (bad / "shard-00001.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="shard-00001.npz.*corrupt"):
        load_corpus(str(bad))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        load_corpus(str(tmp_path / "nothing"))


def test_prompt_sources_keep_humaneval_100_to_163_held_out():
    from train.data import build_prompts
    recs = build_prompts(("chat", "written", "humaneval", "stdlib"), stdlib_max=50)
    he = [r["id"] for r in recs if r["id"].startswith("humaneval/")]
    assert he == [f"humaneval/{i}" for i in range(100)]
    srcs = {r["id"].split("/")[0] for r in recs}
    assert srcs == {"chat", "written", "humaneval", "stdlib"}
    assert len([r for r in recs if r["id"].startswith("stdlib/")]) == 50
    assert len({r["id"] for r in recs}) == len(recs)


# --------------------------------------------------------------------------- Medusa heads
def test_loss_falls_over_20_steps(toy):
    recs = toy["res"].records
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    assert len(train) == 20 and [r["step"] for r in ev] == [10, 20]
    assert train[-1] < 0.25 * train[0], train
    assert ev[-1]["loss"] < 0.25 * train[0]
    assert ev[-1]["acc0"] > 0.9  # head 0 (token t+2) learnt on held-out sequences
    assert os.path.isfile(os.path.join(toy["cfg"].out, "loss.png"))
    assert json.load(open(os.path.join(toy["cfg"].out, "summary.json")))["step"] == 20


def test_trained_head_raises_tau_and_stays_lossless(toy):
    model, params, test = toy["model"], toy["params"], toy["prompts"][32:]
    greedy = jaxdec.generate(model, params, test, max_new_tokens=MAX_NEW)
    taus = {}
    for name, hp in (("untrained", init_params(toy["mcfg"])), ("trained", toy["res"].params)):
        dec, pp = M.medusa(model, params, (toy["mcfg"], hp))
        out = jaxdec.generate(model, pp, test, decoder=dec, max_new_tokens=MAX_NEW)
        assert out.tokens == greedy.tokens, name  # lossless
        taus[name] = out.stats["tau"]
    assert taus["untrained"] < 1.5  # the control: an untrained head repeats the current token
    assert taus["trained"] > taus["untrained"] + 1.5, taus
    # a Cartesian tree (2 candidates of head 0, each continued by heads 1 and 2): lossless too
    from jaxdec.speculative.tree import TreeSpec
    tree = TreeSpec.from_widths((2, 1, 1))
    dec, pp = M.medusa(model, params, (toy["mcfg"], toy["res"].params), tree=tree)
    assert dec.drafter.num_nodes == 6 and not dec.drafter.is_chain
    out = jaxdec.generate(model, pp, test, decoder=dec, max_new_tokens=MAX_NEW)
    assert out.tokens == greedy.tokens and out.stats["tau"] > taus["untrained"] + 1.5
    with pytest.raises(ValueError, match="exceeds the 3 heads"):
        M.medusa(model, params, (toy["mcfg"], toy["res"].params), tree=TreeSpec.chain(4))


def test_checkpoint_restores_bit_identical(toy):
    cfg, res = toy["cfg"], toy["res"]
    mngr = _manager(cfg.out, cfg)
    assert mngr.all_steps() == [10, 20]
    final, meta = restore_checkpoint(mngr, res.state)
    assert tree_hash(final) == tree_hash(res.state)
    assert meta["step"] == 20 and meta["data_position"] == 160 and meta["fingerprint"] == FP
    earlier, _ = restore_checkpoint(mngr, res.state, 10)  # control: the hash tells checkpoints apart
    assert tree_hash(earlier.params) != tree_hash(res.state.params)


def test_heads_file_metadata_other_target_and_corrupt(toy, tmp_path):
    model, params, path = toy["model"], toy["params"], toy["heads"]
    hp, meta = read_heads(path, "medusa")
    for k in ("fingerprint", "command", "data_tokens", "data_examples", "commit", "wall_s", "config", "steps"):
        assert k in meta, k
    assert meta["fingerprint"] == FP and meta["config"] == {"hidden": V, "num_heads": 3, "num_layers": 1, "draft_vocab": 0}
    assert tree_hash(hp) == tree_hash(jax.device_get(toy["res"].params))
    test = toy["prompts"][32:]  # the same shapes as above: the compiled programs are reused
    greedy = jaxdec.generate(model, params, test, max_new_tokens=MAX_NEW)
    dec, pp = M.medusa(model, params, path, target=FP)
    out = jaxdec.generate(model, pp, test, decoder=dec, max_new_tokens=MAX_NEW)
    assert out.tokens == greedy.tokens and out.stats["tau"] > 3.0
    with pytest.raises(HeadsMismatch, match="another target"):
        M.medusa(model, params, path, target="sha256:" + "cd" * 32)
    with pytest.raises(HeadsMismatch, match="another target"):  # no target given: the params' fingerprint
        M.medusa(model, params, path)
    blob = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        M.medusa(model, params, str(cut), target=FP)
    with pytest.raises(ValueError, match="is a folder"):
        M.medusa(model, params, str(tmp_path), target=FP)
    with pytest.raises(FileNotFoundError, match="not found"):
        M.medusa(model, params, str(tmp_path / "none.safetensors"), target=FP)
    other = save_heads(str(tmp_path / "eagle.safetensors"), "eagle", {"w": np.zeros(2)}, {}, FP)
    with pytest.raises(ValueError, match="holds 'eagle' heads, expected 'medusa'"):
        M.medusa(model, params, other, target=FP)


def test_resume_refuses_another_config_or_target(toy, tmp_path):
    from train.medusa import train_medusa
    run = tmp_path / "run"
    shutil.copytree(toy["cfg"].out, run)
    import dataclasses
    c = toy["corpus"]
    cfg = dataclasses.replace(toy["cfg"], out=str(run), lr=0.1)
    with pytest.raises(ConfigError, match="--lr was 0.3"):
        train_medusa(cfg, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    cfg = dataclasses.replace(toy["cfg"], out=str(run))
    with pytest.raises(ConfigError, match="trained for target"):
        train_medusa(cfg, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], "sha256:other",
                     log=lambda *a: None)


# --------------------------------------------------------------------------- harness: exact resume
def _regression():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    data = ArrayData({"x": x, "y": x @ rng.normal(size=(6,)).astype(np.float32)})

    def loss_fn(p, frozen, b, key):  # the step key matters: noisy targets
        y = b["y"] + 0.1 * jax.random.normal(key, b["y"].shape)
        return jnp.mean((b["x"] @ p["w"] - y) ** 2), {}

    return data, loss_fn


class _Shifted(ArrayData):
    """A resume bug as a control: the data position restarts at 0."""

    offset = 0

    def batch(self, step, batch, seed):
        return super().batch(step - self.offset, batch, seed)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    data, loss_fn = _regression()
    quiet = dict(log=lambda *a: None)
    cfg = lambda out, **kw: TrainConfig(out=str(tmp_path / out), steps=12, batch_size=8, lr=0.05, save_every=5,  # noqa
                                        eval_every=100, progress=False, **kw)
    p0 = {"w": jnp.zeros((6,), jnp.float32)}
    a = fit(cfg("a"), p0, loss_fn, data, **quiet)
    b1 = fit(cfg("b"), p0, loss_fn, data, stop_after=7, **quiet)  # interrupted after step 7, checkpoint at 5
    assert int(b1.state.step) == 7
    b = fit(cfg("b"), p0, loss_fn, data, **quiet)
    assert b.resumed_from == 5
    assert tree_hash(b.params) == tree_hash(a.params)
    assert tree_hash(b.state.opt_state) == tree_hash(a.state.opt_state)
    # controls: another seed, or a resume that loses the data position, ends elsewhere
    assert tree_hash(fit(cfg("c", seed=1), p0, loss_fn, data, **quiet).params) != tree_hash(a.params)
    fit(cfg("d"), p0, loss_fn, data, stop_after=5, **quiet)
    shifted = _Shifted(data.arrays)
    shifted.offset = 5
    assert tree_hash(fit(cfg("d"), p0, loss_fn, shifted, **quiet).params) != tree_hash(a.params)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    data, loss_fn = _regression()
    cfg = TrainConfig(out=str(tmp_path / "r"), steps=5, batch_size=8, save_every=5, eval_every=100, progress=False)
    p0 = {"w": jnp.zeros((6,), jnp.float32)}
    fit(cfg, p0, loss_fn, data, log=lambda *a: None)
    state_dir = tmp_path / "r" / "checkpoints" / "5" / "state"
    for root, _, files in os.walk(state_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\0garbage")
    with pytest.raises(ValueError, match="checkpoints/5.*corrupt"):
        fit(TrainConfig(**{**cfg.__dict__, "steps": 5}), p0, loss_fn, data, log=lambda *a: None)


def test_config_flags_override_and_bad_values_exit_2(capsys):
    from train.harness import config_from_args
    from train.medusa import MedusaTrainConfig
    c = config_from_args(MedusaTrainConfig, ["--steps", "7", "--lr", "0.01", "--no-progress", "--num-heads", "2"])
    assert (c.steps, c.lr, c.progress, c.num_heads) == (7, 0.01, False, 2)
    with pytest.raises(dataclasses_frozen_error()):
        c.steps = 3
    for argv, needle in ((["--steps", "0"], "--steps must be an integer >= 1"), (["--lr", "nan"], "--lr must be"),
                         (["--decay", "2"], "--decay must be in (0, 1]"), (["--weights", "int3"], "--weights")):
        with pytest.raises(SystemExit) as e:
            config_from_args(MedusaTrainConfig, argv)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


# --------------------------------------------------------------------------- data parallel
_DP = r"""
import sys, json, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from train.harness import ArrayData, TrainConfig, fit, make_train_step, data_mesh
rng = np.random.default_rng(1)
x = rng.normal(size=(64, 6)).astype(np.float32)
data = ArrayData({"x": x, "y": x @ rng.normal(size=(6,)).astype(np.float32)})
def loss_fn(p, fr, b, key):
    return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2), {}
out = {}
for n in (1, 8):
    r = fit(TrainConfig(out=sys.argv[2] + f"/d{n}", steps=6, batch_size=8, lr=0.05, save_every=100, eval_every=100,
                        log_every=1, progress=False, devices=n), {"w": jnp.zeros((6,))}, loss_fn, data, log=lambda *a: None)
    out[n] = [q["loss"] for q in r.records if q["kind"] == "train"]
mesh = data_mesh(8)
from jax.sharding import NamedSharding, PartitionSpec as P
b = jax.device_put({"x": x[:8]}, NamedSharding(mesh, P("data")))
print(json.dumps({"one": out[1], "eight": out[8], "devices": len(jax.devices()),
                  "shards": len(b["x"].sharding.device_set), "spec": str(b["x"].sharding.spec)}))
"""


def test_data_parallel_over_8_devices_matches_1(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _DP, ROOT, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["devices"] == 8 and got["shards"] == 8 and "data" in got["spec"]
    assert len(got["one"]) == len(got["eight"]) == 6
    np.testing.assert_allclose(got["eight"], got["one"], rtol=1e-5)
    assert len(set(got["one"])) == 6  # the params moved: each step's loss differs


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_no_load(monkeypatch):
    import jaxdec.cli as cli

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad --heads was reported")
    monkeypatch.setattr(cli, "load_model", boom)
    return cli


def _cli_error(cli, capsys, argv):
    rc = cli.main(["generate", "--prompt", "Hi", "--method", "speculative", *argv])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("jaxdec: error:"), (rc, err)
    return err[0]


def test_cli_medusa_heads_errors_before_the_model_loads(toy, cli_no_load, capsys, tmp_path, monkeypatch):
    import jaxdec.speculative.heads as heads_pkg
    cli = cli_no_load
    monkeypatch.setattr(heads_pkg, "ARTEFACT_DIR", str(tmp_path / "none"))  # as if nothing were shipped
    assert "no Medusa heads are shipped for --model 'smollm2-135m'; pass --heads" in \
        _cli_error(cli, capsys, ["--drafter", "medusa"])
    assert "no EAGLE heads are shipped for --model 'smollm2-135m'; pass --heads" in \
        _cli_error(cli, capsys, ["--drafter", "eagle"])
    assert "no lexical-unit heads are shipped for --model 'smollm2-135m'; pass --heads PATH (a file written by " \
        "python -m train.lexical_units)" in _cli_error(cli, capsys, ["--drafter", "lud"])
    assert "--spec-sampling: --drafter lud is verified greedily only" in \
        _cli_error(cli, capsys, ["--drafter", "lud", "--spec-sampling"])
    assert "another target model or vocabulary" in \
        _cli_error(cli, capsys, ["--drafter", "medusa", "--heads", toy["heads"]])  # trained for the toy
    assert "holds 'medusa' heads, expected 'eagle'" in \
        _cli_error(cli, capsys, ["--drafter", "eagle", "--heads", toy["heads"]])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert "--heads" in (e := _cli_error(cli, capsys, ["--drafter", "medusa", "--heads", str(bad)])) and "corrupt" in e
    assert "--heads is not used by --drafter pld" in _cli_error(cli, capsys, ["--drafter", "pld", "--heads", str(bad)])
    # control: a heads file made for the default model's fingerprint passes these checks (the model
    # loader is reached, which this fixture turns into an AssertionError)
    from jaxdec.models.registry import resolve
    from jaxdec.speculative.heads.artefact import target_fingerprint
    ok = save_heads(str(tmp_path / "ok.safetensors"), "medusa", {"w": np.zeros((1, 1, 576, 576), np.float32),
                                                                 "b": np.zeros((1, 1, 576), np.float32)},
                    {"hidden": 576, "num_heads": 1, "num_layers": 1}, target_fingerprint(resolve("smollm2-135m")))
    with pytest.raises(AssertionError, match="model was loaded"):
        cli.main(["generate", "--prompt", "Hi", "--method", "speculative", "--drafter", "medusa", "--heads", ok])


def _tiny_gguf(path, name="tiny", tokens=("a", "b", "c"), value=1.0):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_token_list(list(tokens))
    w.add_tensor("token_embd.weight", np.full((3, 4), value, np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.arange(16, dtype=np.float32).reshape(4, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_target_fingerprint_covers_tensor_data_and_vocabulary_only(tmp_path, monkeypatch):
    from jaxdec.speculative.heads.artefact import target_fingerprint
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = target_fingerprint(_tiny_gguf(tmp_path / "a.gguf"))
    assert base.startswith("sha256:") and len(base) == 71
    assert target_fingerprint(_tiny_gguf(tmp_path / "b.gguf", name="renamed")) == base  # other metadata: same
    assert target_fingerprint(_tiny_gguf(tmp_path / "c.gguf", value=1.5)) != base  # tensor data
    assert target_fingerprint(_tiny_gguf(tmp_path / "d.gguf", tokens=("a", "b", "d"))) != base  # vocabulary
    assert target_fingerprint(str(tmp_path / "a.gguf")) == base  # cached (in memory and on disk)
    assert os.path.isfile(tmp_path / "cache" / "jaxdec" / "fingerprints.json")


def test_stored_hidden_states_train_the_same_heads(toy, tmp_path):
    """--hidden stored (one forward up front, float16) gives the same run as recomputing in the step (the
    toy's one-hot hidden states are exact in float16)."""
    import dataclasses
    from train.medusa import train_medusa
    c = toy["corpus"]
    cfg = dataclasses.replace(toy["cfg"], out=str(tmp_path / "stored"), hidden="stored")
    res, _ = train_medusa(cfg, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    assert tree_hash(res.params) == tree_hash(toy["res"].params)
    assert [r["loss"] for r in res.records] == [r["loss"] for r in toy["res"].records]
    # control: the step really reads the stored states (zeros there train other heads)
    import train.medusa as tm
    real = tm.store_hidden
    tm.store_hidden = lambda *a, **k: np.zeros_like(real(*a, **k))
    try:
        cfg = dataclasses.replace(cfg, out=str(tmp_path / "zeros"))
        res0, _ = train_medusa(cfg, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    finally:
        tm.store_hidden = real
    assert tree_hash(res0.params) != tree_hash(toy["res"].params)


def test_reduced_draft_vocabulary(toy, tmp_path):
    """--draft-vocab 8: the heads score the corpus' 8 most generated tokens only (d2t in the heads file);
    still lossless, and better than untrained heads."""
    import dataclasses
    from train.medusa import build_draft_vocab, train_medusa
    c = toy["corpus"]
    cfg = dataclasses.replace(toy["cfg"], out=str(tmp_path / "dv"), draft_vocab=8)
    res, path = train_medusa(cfg, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    counts = np.bincount(np.concatenate([np.asarray(s[p:]) for s, p in zip(c["seqs"], c["prompt_lens"])]),
                         minlength=V)
    d2t = res.d2t
    assert d2t.shape == (8,) and list(d2t) == sorted(d2t)
    assert counts[d2t].min() >= np.sort(counts)[::-1][7]  # the 8 most frequent generated tokens
    ev = [r for r in res.records if r["kind"] == "eval"][-1]
    assert 0 < ev["in_vocab"] <= 1 and ev["loss"] < 0.25 * res.records[0]["loss"]
    hp, meta = read_heads(path, "medusa")
    assert meta["config"]["draft_vocab"] == 8 and list(hp["d2t"]) == list(d2t)
    test = toy["prompts"][32:]
    greedy = jaxdec.generate(toy["model"], toy["params"], test, max_new_tokens=MAX_NEW)
    dec, pp = M.medusa(toy["model"], toy["params"], path, target=FP)
    assert pp["draft"]["head_w"].shape == (8, V)  # the draft step reads 8 LM-head rows, not 16
    out = jaxdec.generate(toy["model"], pp, test, decoder=dec, max_new_tokens=MAX_NEW)
    assert out.tokens == greedy.tokens and out.stats["tau"] > 2.0
    mc = MedusaConfig(hidden=V, num_heads=3, draft_vocab=8)
    with pytest.raises(ValueError, match="d2t must be 8 token ids"):
        M.medusa(toy["model"], toy["params"], (mc, res.params, np.arange(7)))
    with pytest.raises(ValueError, match="needs a d2t map"):
        M.medusa(toy["model"], toy["params"], (mc, res.params))
    with pytest.raises(ConfigError, match="--draft-vocab must be in"):
        build_draft_vocab(c["seqs"], c["prompt_lens"], V, V + 1)


# --------------------------------------------------------------------------- EAGLE-style head (first slice)
def test_eagle_head_trains_raises_tau_and_stays_lossless(toy, tmp_path):
    from jaxdec.speculative.heads.eagle import init_params as eagle_init
    from train.eagle import EagleTrainConfig, layer_config, train_eagle
    c = toy["corpus"]
    cfg = EagleTrainConfig(out=str(tmp_path / "eagle"), steps=20, batch_size=8, lr=0.05, warmup=2, seq_len=32,
                           eval_every=10, save_every=10, log_every=1, progress=False, draft_vocab=12, num_tokens=3)
    res, path = train_eagle(cfg, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    train = [r["loss"] for r in res.records if r["kind"] == "train"]
    assert train[-1] < 0.5 * train[0], train
    hp, meta = read_heads(path, "eagle")
    assert meta["config"]["draft_vocab"] == 12 and hp["d2t"].shape == (12,) and meta["fingerprint"] == FP
    test = toy["prompts"][32:]
    greedy = jaxdec.generate(toy["model"], toy["params"], test, max_new_tokens=MAX_NEW)
    ec = layer_config(toy["model"], V, cfg)
    taus = {}
    for name, heads in (("untrained", (ec, eagle_init(ec), res.d2t)), ("trained", path)):
        dec, pp = M.eagle(toy["model"], toy["params"], heads, target=FP)
        out = jaxdec.generate(toy["model"], pp, test, decoder=dec, max_new_tokens=MAX_NEW)
        assert out.tokens == greedy.tokens, name  # lossless
        taus[name] = out.stats["tau"]
    assert taus["untrained"] < 1.5 and taus["trained"] > taus["untrained"] + 1.0, taus
    with pytest.raises(HeadsMismatch):
        M.eagle(toy["model"], toy["params"], path, target="sha256:" + "cd" * 32)
    with pytest.raises(ValueError, match="holds 'eagle' heads, expected 'medusa'"):
        M.medusa(toy["model"], toy["params"], path, target=FP)


def test_eagle_fused_features_stored_equals_recomputed_and_calibrated_chain(toy, tmp_path):
    """EAGLE-3 feature fusion on the toy: the feature fuses the residual stream after layer 1 (the one-hot of
    the token before, which the toy's table reads) with the final hidden state; stored hidden states give
    the same run as recomputing them in the step (one-hot values are exact in float16), and a fused head
    that read the wrong stored streams (zeros) trains other params (control). --calibrate-chain stores a
    chain length chosen on the measured cost curve, and the drafter uses it; lossless, τ above untrained."""
    import dataclasses
    from jaxdec.speculative.heads.eagle import init_params as eagle_init
    import train.medusa as tm
    from train.eagle import EagleTrainConfig, layer_config, predicted_speedup, train_eagle
    c = toy["corpus"]
    base = EagleTrainConfig(out=str(tmp_path / "fused"), steps=20, batch_size=8, lr=0.05, warmup=2, seq_len=32,
                            eval_every=10, save_every=10, log_every=1, progress=False, draft_vocab=12, num_tokens=3,
                            feature_layers=(1, -1))
    res, path = train_eagle(base, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    hp, meta = read_heads(path, "eagle")
    assert meta["config"]["feature_layers"] == [1, -1] and hp["fuse"].shape == (V, 2 * V)
    st = dataclasses.replace(base, out=str(tmp_path / "stored"), hidden="stored", calibrate_chain=True)
    res_s, path_s = train_eagle(st, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    assert tree_hash(res_s.params) == tree_hash(res.params)
    real = tm.store_hidden
    tm.store_hidden = lambda *a, **k: np.zeros_like(real(*a, **k))
    import train.eagle as te
    te.store_hidden = tm.store_hidden
    try:
        res0, _ = train_eagle(dataclasses.replace(st, out=str(tmp_path / "zeros"), calibrate_chain=False), toy["model"],
                              toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    finally:
        tm.store_hidden = te.store_hidden = real
    assert tree_hash(res0.params) != tree_hash(res.params)
    _, meta_s = read_heads(path_s, "eagle")
    cal = meta_s["calibration"]
    k = meta_s["config"]["num_tokens"]
    assert 1 <= k <= 3 and [r[0] for r in cal["candidates"]] == [1, 2, 3] and len(cal["accuracy"]) == 2
    assert max(r[3] for r in cal["candidates"]) == cal["predicted_speedup"] == cal["candidates"][k - 1][3]
    tau, cost, sp = predicted_speedup([0.5, 0.25], 2, {"1": 1.0, "3": 2.0}, 0.1)
    assert np.allclose((tau, cost, sp), (1.625, 2.2, 1.625 / 2.2), rtol=1e-12, atol=0)
    test = toy["prompts"][32:]
    greedy = jaxdec.generate(toy["model"], toy["params"], test, max_new_tokens=MAX_NEW)
    ec = layer_config(toy["model"], V, base)
    taus = {}
    for name, heads in (("untrained", (dataclasses.replace(ec, num_tokens=k), eagle_init(ec, 1), res.d2t)),
                        ("trained", path_s)):
        dec, pp = M.eagle(toy["model"], toy["params"], heads, target=FP)
        assert dec.drafter.target_hidden_layers == (1,)
        out = jaxdec.generate(toy["model"], pp, test, decoder=dec, max_new_tokens=MAX_NEW, batch_size=4)
        assert out.tokens == greedy.tokens, name  # lossless
        taus[name] = out.stats["tau"]
    assert dec.drafter.config.num_tokens == k
    assert taus["trained"] > taus["untrained"] + 0.3, taus  # the same chain length (the calibrated one)
    # EAGLE-2 dynamic tree, depth 3, on the untrained head (unsure drafts, where extra candidates pay): with
    # one child per node and 3 nodes it is the chain (same tokens, same τ); with 2 children per node and 8 of
    # the 10 candidates kept it stays lossless and accepts more than the chain
    got = {}
    for kind, kw in (("chain", dict(num_tokens=3, tree_topk=0)), ("k1", dict(num_tokens=3, tree_topk=1, tree_nodes=3)),
                     ("k2", dict(num_tokens=3, tree_topk=2, tree_nodes=8))):
        dec, pp = M.eagle(toy["model"], toy["params"], (ec, eagle_init(ec, 1), res.d2t), target=FP, **kw)
        out = jaxdec.generate(toy["model"], pp, test, decoder=dec, max_new_tokens=MAX_NEW, batch_size=4)
        assert out.tokens == greedy.tokens, kind
        got[kind] = out.stats["tau"]
    assert got["k1"] == got["chain"] and got["k2"] > got["chain"] + 0.05, got
    with pytest.raises(ValueError, match="tree_nodes <= 10 candidates"):
        M.eagle(toy["model"], toy["params"], path_s, target=FP, num_tokens=3, tree_topk=2, tree_nodes=11)
    with pytest.raises(ConfigError, match="--feature-layers"):
        dataclasses.replace(base, feature_layers=(1, 1)).validate()


def test_eagle_sampling_verification_follows_the_target_distribution():
    """EAGLE chains drawn from the draft's q over the draft vocabulary (the rest probability 0), verified
    by speculative sampling: the first three tokens' joint distribution is the target's (exact
    enumeration); without residual resampling it is not (negative control)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from stat_checks import assert_speculative_joint
    from jaxdec.speculative import SpeculativeDecoder
    from jaxdec.speculative.heads.eagle import EagleConfig, EagleDrafter, init_params as eagle_init
    from jaxdec.testing.toy_speculative import random_table
    tv = 5
    tab = random_table(23, tv, 1.2)
    model = TrigramModel(tv)
    tp = {"table": jnp.asarray(tab), "embed": jnp.eye(tv, dtype=jnp.float32)}
    ec = EagleConfig(hidden=tv, draft_vocab=4, num_heads=1, num_kv_heads=1, head_dim=4, intermediate=8,
                     max_position=64, num_tokens=2)
    _, params = M.eagle(model, tp, (ec, eagle_init(ec, 2), np.array([0, 1, 2, 4])), sampling=True)
    assert_speculative_joint(lambda residual: SpeculativeDecoder(EagleDrafter(ec, sample=True), "sampling",
                                                                 residual=residual), model, params, tab, (71, 72))


# --------------------------------------------------------------------------- Medusa under sampling
def test_medusa_sampling_verification_follows_the_target_distribution():
    """Medusa chain drafts drawn from each head's q, verified by speculative sampling: the first three
    tokens' joint distribution is the target's (exact enumeration, 100k rows); without residual
    resampling it is not (negative control). Same check as tests/test_speculative_sampling.py's."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from stat_checks import assert_speculative_joint
    from jaxdec.speculative import SpeculativeDecoder
    from jaxdec.speculative.heads.medusa import MedusaDrafter
    from jaxdec.testing.toy_speculative import random_table
    tv = 5
    tab = random_table(21, tv, 1.2)
    model = TrigramModel(tv)
    tp = {"table": jnp.asarray(tab), "embed": jnp.eye(tv, dtype=jnp.float32)}
    mc = MedusaConfig(hidden=tv, num_heads=2)
    rng = np.random.default_rng(3)
    hp = {"w": jnp.asarray(rng.normal(0, 1.0, (2, 1, tv, tv)), jnp.float32), "b": jnp.zeros((2, 1, tv))}
    _, params = M.medusa(model, tp, (mc, hp), sampling=True)
    assert_speculative_joint(lambda residual: SpeculativeDecoder(MedusaDrafter(mc, sample=True), "sampling",
                                                                 residual=residual), model, params, tab, (61, 62))
    with pytest.raises(ValueError, match="chain only"):
        MedusaDrafter(mc, tree=__import__("jaxdec.speculative.tree", fromlist=["TreeSpec"]).TreeSpec.from_widths((2, 1)),
                      sample=True)


# --------------------------------------------------------------------------- Medusa tree calibration
def test_tree_from_paths_is_the_best_prefix_closed_tree():
    """Exhaustive check on small cases: for every size n, `tree_from_paths` finds a tree (prefix-closed
    set of rank paths) whose measured τ is the best over all prefix-closed sets of n nodes, and its
    reported τ is what a direct count over the positions gives."""
    import itertools
    from jaxdec.speculative.calibrate import tree_from_paths
    rng = np.random.default_rng(5)
    nodes = [(a,) for a in range(3)] + [(a, b) for a in range(3) for b in range(3)]
    for trial in range(3):
        paths = rng.choice(3, size=(60, 2), p=[0.6, 0.25, 0.15])
        paths[rng.random((60, 2)) < 0.25] = 8  # misses
        def tau_of(chosen):
            return 1.0 + np.mean([sum(tuple(row[:len(p)]) == p for p in chosen) for row in paths.tolist()])
        for n in (1, 2, 3, 5):
            tree, tau = tree_from_paths(paths, n)
            got, rec = set(), {0: ()}
            for i, (par, r) in enumerate(zip(tree.parents, tree.ranks)):
                rec[i + 1] = rec[par] + (r,)
                got.add(rec[i + 1])
            assert abs(tau - tau_of(got)) < 1e-9
            best = max(tau_of(s) for s in itertools.combinations(nodes, n)
                       if all(len(p) == 1 or p[:1] in s for p in s))
            assert abs(tau - best) < 1e-9, (trial, n, tau, best)
    with pytest.raises(ValueError, match="non-empty"):
        tree_from_paths(np.zeros((0, 2), int), 3)


def test_calibrated_tree_is_stored_with_the_heads_and_used(toy, tmp_path):
    import dataclasses
    from jaxdec.speculative.heads.medusa import tree_from_meta
    from train.medusa import train_medusa
    c = toy["corpus"]
    cfg = dataclasses.replace(toy["cfg"], out=str(tmp_path / "cal"), calibrate_tree=True)
    _, path = train_medusa(cfg, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP, log=lambda *a: None)
    _, meta = read_heads(path, "medusa")
    tree = tree_from_meta(meta)
    cal = meta["calibration"]
    assert tree is not None and tree.max_depth <= 3 and cal["positions"] > 0 and cal["predicted_speedup"] > 0
    assert [r[1] for r in cal["candidates"]] and cal["cost_curve"]["1"] == 1.0
    dec, pp = M.medusa(toy["model"], toy["params"], path, target=FP)
    assert dec.drafter.tree == tree  # the stored tree is the default
    test = toy["prompts"][32:]
    greedy = jaxdec.generate(toy["model"], toy["params"], test, max_new_tokens=MAX_NEW)
    out = jaxdec.generate(toy["model"], pp, test, decoder=dec, max_new_tokens=MAX_NEW)
    assert out.tokens == greedy.tokens and out.stats["tau"] > 1.5


def test_every_head_script_names_the_bad_shared_flag():
    """The flags all target runs share (`check_target_run_flags`) fail the same way in every script."""
    from train.clover import CloverTrainConfig
    from train.distill_draft import DistillDraftConfig
    from train.eagle import EagleTrainConfig
    from train.medusa import MedusaTrainConfig
    from train.specdec_pp import SpecDecPPTrainConfig
    cases = ((dict(eval_fraction=1.0), "--eval-fraction must be in (0, 1), got 1.0"),
             (dict(hidden="disk"), "--hidden must be 'recompute' or 'stored', got 'disk'"),
             (dict(weights="int4"), "--weights must be one of f32, q, bf16"),
             (dict(seq_len=0), "--seq-len must be an integer >= "), (dict(decay=0.0), "--decay must be in (0, 1]"))
    for cls in (MedusaTrainConfig, CloverTrainConfig, EagleTrainConfig, DistillDraftConfig, SpecDecPPTrainConfig):
        cls().validate()  # the defaults are valid
        for kw, needle in cases:
            if not all(hasattr(cls, k) for k in kw):
                continue
            with pytest.raises(ConfigError) as e:
                cls(**kw).validate()
            assert needle in str(e.value), (cls.__name__, kw, str(e.value))


def test_evenly_spaced_subset_keeps_every_source_and_eagle_refuses_a_negative_count():
    """`evenly_spaced` (EAGLE's --max-sequences, for τ against training tokens): n sequences spread over the
    corpus order (so each prompt source keeps its share), all of them for 0 or n >= their count."""
    from train.eagle import EagleTrainConfig
    from train.medusa import evenly_spaced
    seqs = [[i] * 3 for i in range(10)]
    plens = list(range(10))
    s, p = evenly_spaced(seqs, plens, 4)
    assert [x[0] for x in s] == [0, 3, 6, 9] and p == [0, 3, 6, 9]
    assert evenly_spaced(seqs, plens, 0) == (seqs, plens) and evenly_spaced(seqs, plens, 10) == (seqs, plens)
    with pytest.raises(ConfigError, match="--max-sequences must be an integer >= 0"):
        EagleTrainConfig(max_sequences=-1).validate()


def test_head_drafters_name_the_params_they_need():
    from jaxdec.speculative.heads.clover import CloverDrafter
    from jaxdec.speculative.heads.eagle import EagleDrafter
    from jaxdec.speculative.heads.medusa import MedusaDrafter
    for drafter, keys in ((MedusaDrafter, "'heads', 'target'"), (EagleDrafter, "'heads', 'target', 'head_w', 'd2t'"),
                          (CloverDrafter, "'heads', 'target', 'head_w', 'd2t'")):
        with pytest.raises(ValueError, match=f"{drafter.__name__} needs params=with_draft_params") as e:
            drafter._split({"heads": {}})
        assert keys in str(e.value)
        assert len(drafter._split({"heads": 1, "target": 2, "head_w": 3, "d2t": 4})) == keys.count(",") + 1
