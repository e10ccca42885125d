"""Issue 16: hidden-transfer drafting (`jaxdec.speculative.heads.hidden_transfer`, ``train/hidden_transfer.py``).

CI tier: a tiny Llama target (2 layers, V = E = 32, untied LM head) whose greedy next token is a fixed
permutation of the current one (the LM head's rows are the embeddings permuted; the layers are weak, with
attention on), so the k tokens after the pending one are ``perm^i(x_{n+1})``: an untrained transfer (a copy
of the anchor's residual) drafts almost nothing, a trained one drafts the chain. A 16-step run at layer
t = 1. Checks: the loss falls; trained beats untrained τ and both are lossless on a ragged batch and at
batch 1 (chain and tree); an interrupted run resumes bit-identically; bad input is refused naming the
argument. Slow tier: the shipped default-model transfer is lossless on >= 16 held-out prompts at batch 1
and a ragged batch 8, and its τ beats the untrained transfer on the held-out and should-help lists.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jaxdec  # noqa: E402
from jaxdec.speculative.heads import hidden_transfer as HT  # noqa: E402
from jaxdec.speculative.heads.artefact import HeadsMismatch, read_heads, save_heads  # noqa: E402
from train.harness import ConfigError, tree_hash  # noqa: E402

V, E, F, L, H, KVH, HD = 32, 32, 32, 2, 2, 1, 16
FP = "sha256:" + "a7" * 32  # the toy target's fingerprint
MAX_NEW = 16
K = 3


def _toy_target():
    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=F, num_layers=L, num_heads=H,
                      num_kv_heads=KVH, head_dim=HD, rope_theta=10000.0, eos_ids=(), max_position=128,
                      tie_embeddings=False)
    rng = np.random.default_rng(0)
    n = lambda *s, sc=1.0: jnp.asarray(rng.normal(0, sc, s) / np.sqrt(s[-1]), jnp.float32)  # noqa: E731
    emb = rng.normal(0, 1.0, (V, E))
    perm = rng.permutation(V)
    head = np.zeros((V, E))
    head[perm] = emb  # logits[y] = <h, emb[perm^-1 y]>: the greedy token after x is perm[x]
    params = {"embed": jnp.asarray(emb, jnp.float32), "lm_head": jnp.asarray(head, jnp.float32),
              "final_norm": jnp.ones((E,)),
              "layers": {"attn_norm": jnp.ones((L, E)), "wq": n(L, H * HD, E), "wk": n(L, KVH * HD, E),
                         "wv": n(L, KVH * HD, E), "wo": n(L, E, H * HD, sc=0.05), "mlp_norm": jnp.ones((L, E)),
                         "w_gate": n(L, F, E), "w_up": n(L, F, E), "w_down": n(L, E, F, sc=0.05)}}
    prompts = [[int(x) for x in rng.integers(0, V, size=int(rng.integers(2, 7)))] for _ in range(40)]
    return LlamaModel(cfg), params, prompts


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy target, its greedy continuations as the corpus (32) and test references (8), a 16-step run
    (checkpoints at 8 and 16)."""
    from train.hidden_transfer import HiddenTransferTrainConfig, train_hidden_transfer
    model, params, prompts = _toy_target()
    g = jaxdec.generate(model, params, prompts, max_new_tokens=MAX_NEW)
    seqs = [p + t for p, t in zip(prompts[:32], g.tokens[:32])]
    plens = [len(p) for p in prompts[:32]]
    d = tmp_path_factory.mktemp("ht")
    cfg = HiddenTransferTrainConfig(out=str(d / "run"), steps=16, batch_size=8, lr=0.05, warmup=2, seq_len=24,
                                    positions=8, eval_every=16, save_every=8, log_every=1, progress=False, layer=1,
                                    num_tokens=K)
    res, path = train_hidden_transfer(cfg, model, params, seqs, plens, FP, target_name="toy", command="pytest",
                                      log=lambda *a: None)
    return dict(model=model, params=params, prompts=prompts, greedy=g.tokens, seqs=seqs, plens=plens, cfg=cfg,
                res=res, path=path)


def test_loss_falls(toy):
    recs = toy["res"].records
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    assert len(train) == 16 and [r["step"] for r in ev] == [16]
    assert train[-1] < 0.5 * train[0], train
    assert ev[-1]["loss"] < 0.5 * train[0], (ev, train[0])
    assert ev[-1]["acc0"] > 0.8 and ev[-1]["acc2"] > 0.5, ev[-1]  # every pseudo position learnt, not just the first


def test_trained_transfer_raises_tau_and_stays_lossless(toy):
    """Trained vs untrained transfer through `SpeculativeDecoder`: the greedy tokens on a ragged batch of 8
    (prompt lengths 2-6); τ higher by a margin."""
    model, params, test, greedy = toy["model"], toy["params"], toy["prompts"][32:], toy["greedy"][32:]
    assert len({len(p) for p in test}) >= 2
    hc = toy["res"].ht_config
    taus = {}
    for name, heads in (("untrained", (hc, HT.init_params(hc, 1))), ("trained", toy["path"])):
        dec, pp = HT.build(model, params, heads, target=FP)
        out = jaxdec.generate(model, pp, test, decoder=dec, max_new_tokens=MAX_NEW)
        assert out.tokens == greedy, name
        taus[name] = out.stats["tau"]
    assert taus["untrained"] < 1.4, taus  # control: a copied residual drafts the pending token again
    assert taus["trained"] > taus["untrained"] + 1.0, taus


@pytest.mark.slow  # one more compiled decoder (~8 s on this machine): past this file's CI share
def test_tree_draft_at_batch_1_is_lossless(toy):
    """A Medusa-style tree over the pseudo positions (2 candidates at depths 1 and 2) at batch 1: the greedy
    tokens, and more than 2 tokens per step."""
    from jaxdec.speculative.tree import TreeSpec
    model, params, test, greedy = toy["model"], toy["params"], toy["prompts"][32:], toy["greedy"][32:]
    tree = TreeSpec((0, 0, 1, 1, 3), (0, 1, 0, 1, 0))  # 2 candidates at depths 1 and 2, then a chain
    dec, pp = HT.build(model, params, toy["path"], target=FP, tree=tree)
    assert dec.drafter.num_nodes == 5 and dec.drafter.target_hidden_layers == (1,)
    one = jaxdec.generate(model, pp, test[:3], decoder=dec, max_new_tokens=MAX_NEW, batch_size=1)
    assert one.tokens == greedy[:3]
    assert one.stats["tau"] > 2.0, one.stats


def test_interrupted_and_resumed_run_is_bit_identical(toy, tmp_path):
    from train.hidden_transfer import train_hidden_transfer
    run = tmp_path / "run"
    shutil.copytree(toy["cfg"].out, run)
    shutil.rmtree(run / "checkpoints" / "16")
    os.remove(run / "heads.safetensors")
    cfg = dataclasses.replace(toy["cfg"], out=str(run))
    res, path = train_hidden_transfer(cfg, toy["model"], toy["params"], toy["seqs"], toy["plens"], FP,
                                      target_name="toy", command="pytest", log=lambda *a: None)
    assert res.resumed_from == 8
    assert tree_hash(res.params) == tree_hash(toy["res"].params)
    assert tree_hash(read_heads(path, HT.KIND)[0]) == tree_hash(read_heads(toy["path"], HT.KIND)[0])
    hc = res.ht_config
    assert tree_hash(res.params) != tree_hash(HT.init_params(hc, 0))  # control: the hash tells params apart
    with pytest.raises(ConfigError, match="--lr was 0.05"):
        train_hidden_transfer(dataclasses.replace(cfg, lr=0.1), toy["model"], toy["params"], toy["seqs"],
                              toy["plens"], FP, log=lambda *a: None)


def test_heads_file_and_bad_input(toy, tmp_path):
    model, params, path = toy["model"], toy["params"], toy["path"]
    hp, meta = read_heads(path, HT.KIND)
    for k in ("fingerprint", "command", "data_tokens", "data_examples", "commit", "wall_s", "config", "steps",
              "draft_cost"):
        assert k in meta, k
    assert meta["kind"] == HT.KIND and meta["fingerprint"] == FP and set(hp) == {"w", "b"}
    assert meta["draft_cost"] == 0.5  # layers [1, 2) of 2
    with pytest.raises(HeadsMismatch, match="another target"):
        HT.build(model, params, path, target="sha256:" + "cd" * 32)
    with pytest.raises(HeadsMismatch, match="another target"):  # no target: the params' fingerprint
        HT.build(model, params, path)
    other = save_heads(str(tmp_path / "medusa.safetensors"), "medusa", {"w": np.zeros(2)}, {}, FP)
    with pytest.raises(ValueError, match="holds 'medusa' heads, expected 'hidden_transfer'"):
        HT.build(model, params, other, target=FP)
    blob = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        HT.build(model, params, str(cut), target=FP)
    hc = toy["res"].ht_config
    bad = {"w": np.zeros((K, E, E), np.float32), "b": np.zeros((K, E), np.float32)}
    badp = save_heads(str(tmp_path / "bad.safetensors"), HT.KIND, bad, meta["config"], FP)
    with pytest.raises(ValueError, match=r"w has shape \(3, 32, 32\), the config needs \(3, 32, 64\)"):
        HT.build(model, params, badp, target=FP)
    badc = save_heads(str(tmp_path / "badc.safetensors"), HT.KIND, dict(hp), {**meta["config"], "layer": 2}, FP)
    with pytest.raises(ValueError, match="bad hidden_transfer config.*layer must be in"):
        HT.build(model, params, badc, target=FP)
    with pytest.raises(ValueError, match="built for 2 layers of size 16, the target has 2 of size 32"):
        HT.build(model, params, (dataclasses.replace(hc, hidden=16), HT.init_params(dataclasses.replace(hc, hidden=16))))
    with pytest.raises(TypeError, match="heads must be a heads file path"):
        HT.build(model, params, {"w": 1})
    from jaxdec.speculative.tree import TreeSpec
    with pytest.raises(ValueError, match="tree has depth 4, more than the 3 pseudo positions"):
        HT.build(model, params, toy["path"], target=FP, tree=TreeSpec.chain(4))
    with pytest.raises(ValueError, match="sampling=True drafts a chain"):
        HT.build(model, params, toy["path"], target=FP, tree=TreeSpec((0, 0), (0, 1)), sampling=True)
    for kw, needle in ((dict(num_tokens=0), "num_tokens must be an integer >= 1"),
                       (dict(layer=0), "layer must be an integer >= 1"),
                       (dict(layer=2), r"layer must be in \[1, num_layers=2\)"), (dict(rms_eps=0.0), "rms_eps"),
                       (dict(hidden=True), "hidden")):
        with pytest.raises(ValueError, match=needle):
            dataclasses.replace(hc, **kw)
    assert HT.HiddenTransferConfig.from_dict(hc.to_dict()) == hc
    with pytest.raises(ValueError, match="hidden_transfer config must be a dict"):
        HT.HiddenTransferConfig.from_dict({"hidden": 32, "num_layers": 2})


def test_training_flags_and_bad_values_exit_2(capsys):
    from train.hidden_transfer import HiddenTransferTrainConfig
    from train.harness import config_from_args
    c = config_from_args(HiddenTransferTrainConfig, ["--steps", "7", "--layer", "20", "--num-tokens", "3"])
    assert (c.steps, c.layer, c.num_tokens) == (7, 20, 3)
    for argv, needle in ((["--layer", "0"], "--layer must be an integer >= 1"),
                         (["--num-tokens", "0"], "--num-tokens"), (["--decay", "2"], "--decay must be in (0, 1]"),
                         (["--hidden", "disk"], "--hidden"), (["--max-sequences", "-1"], "--max-sequences"),
                         (["--seq-len", "4"], "--seq-len must be >= num_tokens + 2")):
        with pytest.raises(SystemExit) as e:
            config_from_args(HiddenTransferTrainConfig, argv)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err


def test_layer_out_of_range_for_the_target(toy):
    from train.hidden_transfer import train_hidden_transfer
    with pytest.raises(ConfigError, match=r"--layer must be in \[1, 1\]"):
        train_hidden_transfer(dataclasses.replace(toy["cfg"], layer=2), toy["model"], toy["params"], toy["seqs"],
                              toy["plens"], FP, log=lambda *a: None)


@pytest.mark.slow  # 100k rows through the drafter twice: past this file's CI share
def test_sampling_verification_follows_the_target_distribution():
    """A chain drawn from each pseudo position's q, verified by speculative sampling on a tiny Llama (V = 5):
    the first three tokens' joint distribution is the target's (enumerated exactly from the model's logits,
    100k rows, pooled chi-square); without residual resampling it is not (negative control)."""
    from stat_checks import pooled_chisquare_p
    from jaxdec.core import loop
    from jaxdec.core.processors import SamplingParams
    from jaxdec.core.state import DecodeInputs
    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    from jaxdec.speculative import SpeculativeDecoder
    tv, e, rows = 5, 8, 100_000
    model = LlamaModel(LlamaConfig(vocab_size=tv, hidden_size=e, intermediate_size=8, num_layers=2, num_heads=2,
                                   num_kv_heads=1, head_dim=4, rope_theta=10000.0, eos_ids=(), max_position=32))
    rng = np.random.default_rng(5)
    n = lambda *s: jnp.asarray(rng.normal(0, 1.0, s) / np.sqrt(s[-1]), jnp.float32)  # noqa: E731
    params = {"embed": n(tv, e) * 3, "final_norm": jnp.ones((e,)),
              "layers": {"attn_norm": jnp.ones((2, e)), "wq": n(2, 8, e), "wk": n(2, 4, e), "wv": n(2, 4, e),
                         "wo": n(2, e, 8), "mlp_norm": jnp.ones((2, e)), "w_gate": n(2, 8, e), "w_up": n(2, 8, e),
                         "w_down": n(2, e, 8)}}
    hc = HT.HiddenTransferConfig(hidden=e, num_layers=2, layer=1, num_tokens=2)
    hp = {"w": n(2, e, 2 * e), "b": jnp.zeros((2, e))}
    # the exact joint of the first three tokens after the prompt (3, 1)
    ab = np.array([(a, b) for a in range(tv) for b in range(tv)], np.int32)
    seq = jnp.asarray(np.concatenate([np.tile([[3, 1]], (len(ab), 1)), ab], 1))
    lg = model(params, seq, jnp.broadcast_to(jnp.arange(4), seq.shape), model.init_cache(len(ab), 4)).logits
    pr = np.asarray(jax.nn.softmax(lg.astype(jnp.float32), -1), np.float64)  # [25,4,V]
    joint = np.zeros((tv,) * 3)
    for r, (a, b) in enumerate(ab):
        joint[a, b] = pr[r, 1, a] * pr[r, 2, b] * pr[r, 3]
    assert abs(joint.sum() - 1) < 1e-5
    joint /= joint.sum()

    def run(residual, seed):
        dec = SpeculativeDecoder(HT.HiddenTransferDrafter(hc, sample=True), "sampling", residual=residual)
        _, dp = HT.build(model, params, (hc, hp), sampling=True)
        prompts = jnp.asarray(np.repeat(np.array([[3, 1]], np.int32), rows, 0))
        keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(seed), rows)).astype(jnp.uint32)
        inputs = DecodeInputs(max_new=jnp.full((rows,), 3, jnp.int32), min_new=jnp.zeros((rows,), jnp.int32),
                              keys=keys, stop_ids=jnp.zeros((0,), jnp.int32), out_buffer=jnp.zeros((rows, 4), jnp.int32),
                              sampling=SamplingParams.create(rows, temperature=1.0))
        st = loop.run_jit(dec, model, dp, prompts, jnp.full((rows,), 2, jnp.int32), inputs,
                          2 + 4 + dec.cache_headroom + 1)
        t = np.asarray(st.tokens)
        return np.bincount((t[:, 0] * tv + t[:, 1]) * tv + t[:, 2], minlength=tv ** 3), dec.summarize(st)

    good, stats = run(True, 71)
    assert pooled_chisquare_p(good, joint) > 1e-4
    assert stats["tau"] > 1.05, stats
    bad, _ = run(False, 72)
    assert pooled_chisquare_p(bad, joint) < 1e-4


# --------------------------------------------------------------------------- default model (slow)
try:
    from test_heads_shipped import should_help, target  # noqa: E402,F401  the held-out prompts fixtures (q weights)
except Exception:  # pragma: no cover - the slow tier needs test_heads_shipped's helpers
    target = should_help = None


def _shipped():
    from jaxdec.speculative.heads import shipped_path
    p = shipped_path(HT.KIND, "smollm2-135m")
    assert os.path.isfile(p), f"no hidden-transfer artefact shipped ({p}: python -m train.hidden_transfer --export {p})"
    return p


@pytest.mark.slow
def test_shipped_file_provenance_and_size(gguf_path):
    from test_heads_shipped import shipped_provenance
    hp, meta = shipped_provenance(HT.KIND, "train.hidden_transfer", gguf_path)
    cfg = HT.HiddenTransferConfig.from_dict(meta["config"])
    assert (cfg.hidden, cfg.num_layers) == (576, 30) and meta["draft_cost"] == cfg.draft_cost
    assert set(hp) == {"w", "b"}


@pytest.mark.slow
def test_shipped_hidden_transfer_lossless_batch1_and_ragged_batch8(target):  # noqa: F811
    from test_heads_shipped import assert_lossless_batch8_and_batch1
    t = target
    assert_lossless_batch8_and_batch1(t, *HT.build(t["model"], t["params"], _shipped(), target=t["path"]), "hidden-transfer", max_new=32)


# the tree issue 16's bar (τ > 1.3 on the should-help prompts) is asserted with: the highest τ on the 16 held-out
# prompts among trees of at most 16 nodes (experiments/results/heads_tau_configs.md; not chosen on the should-help
# prompts)
TAU_TREE = (3, 2)


@pytest.mark.slow
def test_shipped_hidden_transfer_beats_untrained(target, should_help):  # noqa: F811
    """τ on the held-out prompts (the chain) and the should-help prompts (`TAU_TREE`): above the same decoder
    with a fresh (copying) transfer, the control, by a margin; on the should-help prompts above 1.3 (issue
    16), the tree's tokens equal to greedy's."""
    from test_heads_shipped import assert_greedy_on_should_help
    from jaxdec.speculative.tree import TreeSpec
    t = target
    path = _shipped()
    cfg, _, _ = HT.load_hidden_transfer(path, None)
    taus = {}
    for set_name, prompts, tree in (("held-out", t["prompts"], None),
                                    ("should-help", should_help["prompts"], TreeSpec.from_widths(TAU_TREE))):
        for name, heads in (("trained", path), ("untrained", (cfg, HT.init_params(cfg, 1)))):
            dec, params = HT.build(t["model"], t["params"], heads, target=t["path"], tree=tree)
            out = jaxdec.generate(t["model"], params, prompts, decoder=dec, max_new_tokens=32, batch_size=8)
            taus[set_name, name] = out.stats["tau"]
            if set_name == "should-help" and name == "trained":
                assert_greedy_on_should_help(t, should_help, out, "hidden-transfer tree")
    print(f"hidden-transfer τ: {taus}")
    for set_name in ("held-out", "should-help"):
        assert taus[set_name, "trained"] > taus[set_name, "untrained"] + 0.1, taus
    assert taus["should-help", "trained"] > 1.3, taus
