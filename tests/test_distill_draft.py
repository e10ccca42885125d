"""Issue 16: a small draft model distilled from the target, and S2D sorted nested drafts
(`jaxdec.speculative.heads.draft_lm`, ``train/distill_draft.py``).

CI tier: a tiny random Llama target (4 layers) and its self-distillation corpus (through train.data, as
tests/test_train.py does); a 2-layer S2D draft (exits 1 and 2) initialised from target layers 0 and 1,
i.e. untrained it is `methods.draft_model`'s layer-truncated target, trained 20 steps. Checks: the loss
falls; each exit drafts, trained beats untrained τ per depth, the deeper exit is no worse than the
shallower; greedy verification is lossless at batch 1 and on a ragged batch; the heads file resumes
identically and refuses bad input. Slow tier: the shipped default-model artefact is lossless on >= 16
held-out prompts at batch 1 and a ragged batch 8 (tests/test_heads_shipped.py's fixture pattern).
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec.speculative.heads import draft_lm as D
from jaxdec.speculative.heads.artefact import HeadsMismatch, read_heads, save_heads
from train.harness import ConfigError, tree_hash

V, E, F, L, H, KVH, HD = 64, 32, 64, 4, 4, 2, 8
FP = "sha256:" + "ef" * 32  # the toy target's fingerprint
MAX_NEW = 24
NT = 3  # draft chain length


def _toy_target():
    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=F, num_layers=L, num_heads=H,
                      num_kv_heads=KVH, head_dim=HD, rope_theta=10000.0, eos_ids=(), max_position=256)
    rng = np.random.default_rng(0)
    n = lambda *s, sc=0.3: jnp.asarray(rng.normal(0, sc, s), jnp.float32)  # noqa: E731
    # layers 0-1 (the draft's initialisation) weak, layers 2-3 a strong MLP without attention: the target's
    # greedy token is nearly a function of the current token that the truncated target does not compute
    mlp = lambda *s: jnp.concatenate([n(2, *s), n(L - 2, *s, sc=1.0)])  # noqa: E731
    params = {"embed": n(V, E, sc=1.0), "final_norm": jnp.ones((E,)),
              "layers": {"attn_norm": jnp.ones((L, E)), "wq": n(L, H * HD, E), "wk": n(L, KVH * HD, E),
                         "wv": n(L, KVH * HD, E), "wo": n(L, E, H * HD) * jnp.asarray([0.1, 0.1, 0, 0])[:, None, None],
                         "mlp_norm": jnp.ones((L, E)), "w_gate": mlp(F, E), "w_up": mlp(F, E), "w_down": mlp(E, F)}}
    prompts = [[int(x) for x in rng.integers(0, V, size=int(rng.integers(2, 7)))] for _ in range(48)]
    return LlamaModel(cfg), params, prompts


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy target, its corpus, a 20-step S2D distillation run and the greedy tokens of the test prompts."""
    from train.data import generate_corpus, load_corpus
    from train.distill_draft import DistillDraftConfig, train_distill_draft
    model, params, prompts = _toy_target()
    d = tmp_path_factory.mktemp("distill")
    generate_corpus(model, params, prompts[:40], [f"p{i}" for i in range(40)], str(d / "data"), FP, "toy",
                    max_new_tokens=MAX_NEW, batch_size=8, shard_size=40)
    corpus = load_corpus(str(d / "data"))
    cfg = DistillDraftConfig(out=str(d / "run"), steps=20, batch_size=8, lr=3e-2, warmup=2, seq_len=32,
                             eval_every=10, save_every=10, log_every=1, progress=False, num_layers=2,
                             exits=(1, 2), draft_vocab=48)
    res, path = train_distill_draft(cfg, model, params, corpus["seqs"], corpus["prompt_lens"], FP,
                                    target_name="toy", command="pytest", log=lambda *a: None)
    test = prompts[40:]
    greedy = jaxdec.generate(model, params, test, max_new_tokens=MAX_NEW)
    return dict(model=model, params=params, prompts=prompts, corpus=corpus, cfg=cfg, res=res, path=path,
                test=test, greedy=greedy, dir=d)


def _run(toy, heads, depth, prompts=None, **kw):
    dec, pp = D.build(toy["model"], toy["params"], heads, target=FP, depth=depth, num_tokens=NT, **kw)
    return jaxdec.generate(toy["model"], pp, toy["test"] if prompts is None else prompts, decoder=dec,
                           max_new_tokens=MAX_NEW)


def test_sibling_tree_is_lossless_and_not_below_the_chain(toy):
    """siblings=3: each depth's runner-up tokens as leaves beside the greedy chain. The tokens equal greedy's
    in the ragged batch at both exits and at batch 1; τ is not below the chain's (the tree holds the chain);
    a row whose accepted path ends on a sibling feeds it to the draft next step, which a wrong draft cache
    would turn into lower τ, never other tokens, so τ is compared too. Bad settings are refused."""
    for depth in toy["res"].draft_config.exits:
        chain = _run(toy, toy["path"], depth)
        tree = _run(toy, toy["path"], depth, siblings=3)
        assert tree.tokens == toy["greedy"].tokens, depth
        assert tree.stats["tau"] >= chain.stats["tau"] - 0.05, (depth, tree.stats["tau"], chain.stats["tau"])
        assert tree.stats["side_branch_accepts"] > 0, tree.stats  # a sibling was accepted somewhere
    dec, pp = D.build(toy["model"], toy["params"], toy["path"], target=FP, num_tokens=NT, siblings=3)
    one = jaxdec.generate(toy["model"], pp, toy["test"][:2], decoder=dec, max_new_tokens=MAX_NEW, batch_size=1)
    assert one.tokens == toy["greedy"].tokens[:2]
    for kw, needle in ((dict(siblings=0), "siblings must be an integer >= 1, got 0"),
                       (dict(siblings=2, sampling=True), "siblings > 1 .* drafts greedily")):
        with pytest.raises(ValueError, match=needle):
            D.build(toy["model"], toy["params"], toy["path"], target=FP, num_tokens=NT, **kw)


def test_loss_falls_over_20_steps(toy):
    recs = toy["res"].records
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    assert len(train) == 20 and [r["step"] for r in ev] == [10, 20]
    assert train[-1] < 0.6 * train[0], train
    assert ev[-1]["loss"] < ev[0]["loss"] and ev[-1]["acc2"] > ev[0]["acc2"], ev
    for k in ("acc1", "acc2", "ce1", "ce2", "kl1", "kl2", "in_vocab"):  # one loss per exit, both logged
        assert k in ev[-1], k


def test_trained_exits_raise_tau_per_depth_and_stay_lossless(toy):
    """Each S2D exit drafts; trained > untrained (= the layer-truncated target) at every depth; the deeper
    exit is no worse than the shallower; tokens equal greedy on a ragged batch (>= 2 prompt lengths)."""
    res = toy["res"]
    dc = res.draft_config
    untrained = (dc, D.init_from_target(dc, toy["params"]), res.d2t)
    assert len({len(p) for p in toy["test"]}) >= 2  # ragged
    taus = {}
    for depth in dc.exits:
        for name, heads in (("untrained", untrained), ("trained", toy["path"])):
            out = _run(toy, heads, depth)
            assert out.tokens == toy["greedy"].tokens, (name, depth)
            taus[name, depth] = out.stats["tau"]
    print("tau per depth:", taus)
    for depth in dc.exits:
        assert taus["trained", depth] > taus["untrained", depth] + 0.2, taus
    # the deeper exit no worse than the shallower (within 0.1: about one accepted token in 8 x 24 emitted)
    assert taus["trained", 2] >= taus["trained", 1] - 0.1, taus
    # control: the untrained exit is the layer-truncated target (`methods.draft_model`'s draft) restricted to
    # the draft vocabulary: the same logits there
    from jaxdec.speculative.drafters import truncated_draft
    tm, tp = truncated_draft(toy["model"], toy["params"], 2)
    dm = D.DraftLM(dc, 2, V)
    dparams = D.draft_params(dc, untrained[1], toy["model"], toy["params"], res.d2t, 2)
    ids = jnp.asarray([toy["test"][0]])
    pos = jnp.arange(ids.shape[1])[None]
    a = np.asarray(dm(dparams, ids, pos, dm.init_cache(1, 8)).logits)[..., res.d2t]
    b = np.asarray(tm(tp, ids, pos, tm.init_cache(1, 8)).logits)[..., res.d2t]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_lossless_at_batch_1_and_no_mass_outside_the_draft_vocabulary(toy):
    p = toy["test"][:1]
    out = _run(toy, toy["path"], 2, prompts=p)
    assert out.tokens == toy["greedy"].tokens[:1] and out.stats["tau"] > 1.0
    # a reduced-vocabulary draft puts no mass outside d2t: the logits there are -inf
    cfg, dp, _, d2t = D.load_draft_lm(toy["path"], FP)
    dparams = D.draft_params(cfg, dp, toy["model"], toy["params"], d2t, 1)
    dm = D.DraftLM(cfg, 1, V)
    o = dm(dparams, jnp.asarray([p[0]]), jnp.arange(len(p[0]))[None], dm.init_cache(1, 16))
    lg = np.asarray(o.logits)
    outside = np.setdiff1d(np.arange(V), d2t)
    assert len(outside) > 0 and np.all(np.isneginf(lg[..., outside])) and np.all(np.isfinite(lg[..., d2t]))
    # compute="q8_0" (the default with a block-quantized target): the layer matrices re-quantized to Q8_0
    # give the float32 logits within Q8_0's rounding, and not exactly (the quantized path really ran)
    from jaxdec.quant import QTensor
    q8 = D.draft_params(cfg, dp, toy["model"], toy["params"], d2t, 1, compute="q8_0")
    assert isinstance(q8["layers"]["wq"], QTensor) and q8["layers"]["wq"].kind == "q8_0"
    lq = np.asarray(dm(q8, jnp.asarray([p[0]]), jnp.arange(len(p[0]))[None], dm.init_cache(1, 16)).logits)
    err = np.max(np.abs(lq[..., d2t] - lg[..., d2t]))
    assert 0 < err < 0.05 * np.max(np.abs(lg[..., d2t])), err


@pytest.mark.slow  # one more compiled decoder (~10 s): kept out of the CI tier's 45 s
def test_sampling_verification_with_top_k_1_equals_greedy(toy):
    """Sampling verification (the draft's q over the full vocabulary, zero outside d2t): with top_k=1 the
    target's distribution is its argmax, so lossless speculative sampling must give the greedy tokens."""
    p = toy["test"][:1]
    dec, pp = D.build(toy["model"], toy["params"], toy["path"], target=FP, depth=2, num_tokens=NT, sampling=True)
    assert dec.drafter.sample and dec.verifier == "sampling"
    out = jaxdec.generate(toy["model"], pp, p, decoder=dec, max_new_tokens=MAX_NEW, seed=3,
                          sampling={"temperature": 1.0, "top_k": 1})
    assert out.tokens == toy["greedy"].tokens[:1] and out.stats["tau"] > 1.0


def test_heads_file_and_resume_identical(toy, tmp_path):
    from train.distill_draft import train_distill_draft
    hp, meta = read_heads(toy["path"], "draft_lm")
    for k in ("fingerprint", "command", "data_tokens", "commit", "wall_s", "config", "steps", "loss"):
        assert k in meta, k
    assert meta["config"]["exits"] == [1, 2] and meta["config"]["init_layers"] == [0, 1]
    assert hp["layers"]["wq"].dtype == np.float16 and hp["d2t"].shape == (48,)
    # resume: the run folder with its step-20 checkpoint removed resumes from step 10 and ends identical
    run = tmp_path / "run"
    shutil.copytree(toy["cfg"].out, run)
    shutil.rmtree(run / "checkpoints" / "20")
    cfg = dataclasses.replace(toy["cfg"], out=str(run))
    c = toy["corpus"]
    res, _ = train_distill_draft(cfg, toy["model"], toy["params"], c["seqs"], c["prompt_lens"], FP,
                                 log=lambda *a: None)
    assert res.resumed_from == 10
    assert tree_hash(res.params) == tree_hash(toy["res"].params)
    ck10 = tmp_path / "ck10"  # control: the step-10 params differ from the final ones
    shutil.copytree(toy["cfg"].out, ck10)
    from train.harness import _manager, restore_checkpoint
    early, _ = restore_checkpoint(_manager(str(ck10), cfg), res.state, 10)
    assert tree_hash(early.params) != tree_hash(res.params)


def test_bad_input(toy, tmp_path):
    model, params, path = toy["model"], toy["params"], toy["path"]
    with pytest.raises(HeadsMismatch, match="another target"):
        D.build(model, params, path, target="sha256:" + "cd" * 32)
    with pytest.raises(HeadsMismatch, match="another target"):  # no target: the params' fingerprint
        D.build(model, params, path)
    with pytest.raises(ValueError, match="depth must be one of the draft's trained exits"):
        D.build(model, params, path, target=FP, depth=3)
    with pytest.raises(ValueError, match="compute must be one of"):
        D.build(model, params, path, target=FP, compute="int4")
    with pytest.raises(ValueError, match="num_tokens"):
        D.build(model, params, path, target=FP, num_tokens=0)
    with pytest.raises(TypeError, match="heads must be"):
        D.build(model, params, 42)
    blob = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        D.build(model, params, str(cut), target=FP)
    with pytest.raises(FileNotFoundError, match="not found"):
        D.build(model, params, str(tmp_path / "none.safetensors"), target=FP)
    other = save_heads(str(tmp_path / "medusa.safetensors"), "medusa", {"w": np.zeros(2)}, {}, FP)
    with pytest.raises(ValueError, match="holds 'medusa' heads, expected 'draft_lm'"):
        D.build(model, params, other, target=FP)
    hp, meta = read_heads(path, "draft_lm")  # a file whose tensors do not match its config
    bad = dict(hp)
    bad["layers"] = {**hp["layers"], "wq": hp["layers"]["wq"][:1]}
    p2 = save_heads(str(tmp_path / "bad.safetensors"), "draft_lm", bad, meta["config"], FP)
    with pytest.raises(ValueError, match="do not match its config"):
        D.build(model, params, p2, target=FP)
    cfg = meta["config"]
    for field, value, match in (("exits", [2, 1], "exits must be"), ("exits", [1], "exits must be"),
                                ("init_layers", [0], "init_layers must be"), ("num_layers", 0, "num_layers"),
                                ("draft_vocab", -1, "draft_vocab")):
        with pytest.raises(ValueError, match=match):
            D.DraftLMConfig.from_dict({**cfg, field: value})
    with pytest.raises(ValueError, match="keys among"):
        D.DraftLMConfig.from_dict({**cfg, "bogus": 1})
    c = toy["res"].draft_config
    with pytest.raises(ValueError, match="init_layers .* the target has only 4 layers"):
        D.init_from_target(dataclasses.replace(c, init_layers=(0, 7)), params)


def test_config_flags_and_bad_values_exit_2(capsys):
    from train.harness import config_from_args
    from train.distill_draft import DistillDraftConfig
    c = config_from_args(DistillDraftConfig, ["--num-layers", "3", "--init-layers", "0,14,29", "--exits", "1,2,3",
                                              "--loss", "kl"])
    assert (c.num_layers, c.init_layers, c.exits, c.loss) == (3, (0, 14, 29), (1, 2, 3), "kl")
    for argv, msg in ((["--exits", "2,1"], "--exits must be"), (["--exits", "1"], "--exits must be"),
                      (["--init-layers", "0"], "--init-layers must name 2"), (["--loss", "mse"], "--loss must be"),
                      (["--kl-weight", "-1"], "--kl-weight"), (["--weights", "df11"], "--weights"),
                      (["--num-layers", "0"], "--num-layers")):
        with pytest.raises(SystemExit) as e:
            config_from_args(DistillDraftConfig, argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, argv
    with pytest.raises(ConfigError, match="--init-layers .* the target has 4 layers"):
        from train.distill_draft import train_distill_draft
        model, params, _ = _toy_target()
        cfg = DistillDraftConfig(out="/tmp/s11/draftlm/never", init_layers=(0, 9), progress=False)
        train_distill_draft(cfg, model, params, [[1, 2, 3]] * 4, [1] * 4, FP, log=lambda *a: None)


# --------------------------------------------------------------------------- the shipped default-model draft
SHIPPED_MAX_NEW = 32


@pytest.fixture(scope="module")
def shipped(model_q, gguf_path):
    """tests/test_heads_shipped.py's pattern: 16 held-out prompts (10 chat, 6 copy, interleaved so each batch
    of 8 is ragged), the greedy reference at batch 8, the teacher logits and block-vs-step |Δlogit| for the
    near-tie rule."""
    from test_heads_shipped import heldout_target
    from jaxdec.speculative.heads import shipped_path
    return {**heldout_target(model_q, gguf_path, SHIPPED_MAX_NEW), "path": shipped_path(D.KIND, "smollm2-135m")}


@pytest.mark.slow
def test_shipped_draft_provenance_and_size(gguf_path):
    from test_heads_shipped import shipped_provenance
    hp, meta = shipped_provenance(D.KIND, "train.distill_draft", gguf_path)
    cfg = D.DraftLMConfig.from_dict(meta["config"])
    assert len(cfg.exits) >= 2 and hp["layers"]["wq"].dtype == np.float16  # S2D: several exits, float16 layers


@pytest.mark.slow
def test_shipped_draft_lossless_per_depth_batch1_and_ragged_batch8(shipped):
    """Every exit of the shipped S2D draft: tokens equal greedy (near-tie rule) at batch 8 (ragged) and, for
    the deepest exit, at batch 1; drafts both accepted and rejected; τ per depth printed."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import neartie
    from jaxdec.cache.kv import bucket
    from test_speculative import assert_accepts_and_rejects
    t = shipped
    assert len({bucket(len(p)) for p in t["prompts"]}) >= 2 and len(t["prompts"]) >= 16
    cfg, _, _, _ = D.load_draft_lm(t["path"], None)
    pairs, taus = [], {}
    for depth in cfg.exits:
        dec, pp = D.build(t["model"], t["params"], t["path"], target=t["gguf"], depth=depth)
        for bs in ((8, 1) if depth == cfg.num_layers else (8,)):
            out = jaxdec.generate(t["model"], pp, t["prompts"], decoder=dec, max_new_tokens=SHIPPED_MAX_NEW,
                                  batch_size=bs)
            pairs += [(f"draft_lm depth {depth} b{bs} prompt {i}", o, r, lg) for i, (o, r, lg) in
                      enumerate(zip(out.tokens, t["ref"].tokens, t["logits"]))]
            assert_accepts_and_rejects(out.stats, f"depth {depth} b{bs}")
            taus[depth, bs] = out.stats["tau"]
    print("shipped draft_lm τ per (depth, batch):", taus)
    neartie.assert_sequences_match(pairs, t["dlogit"])
    # the distillation moved τ: the deepest exit above `methods.draft_model` with the same number of layers
    # (the layer-truncated target, which is also this draft before training), at batch 8
    from jaxdec.speculative import methods as M
    dec, pp = M.draft_model(t["model"], t["params"], draft_layers=cfg.num_layers, num_tokens=4)
    base = jaxdec.generate(t["model"], pp, t["prompts"], decoder=dec, max_new_tokens=SHIPPED_MAX_NEW, batch_size=8)
    print("truncated-target draft τ:", base.stats["tau"])
    assert taus[cfg.num_layers, 8] > base.stats["tau"] + 0.05, (taus, base.stats["tau"])


# the configuration issue 16's bar (τ > 1.3 on the should-help prompts) is asserted with, per exit: the highest τ
# on the 16 held-out prompts among the chain lengths and sibling trees of at most 16 nodes
# (experiments/results/heads_tau_configs.md, draft_lm-* cells; not chosen on the should-help prompts): a chain
# of 4 with each depth's 3 runner-up tokens as leaves, at both exits
TAU_TOKENS, TAU_SIBLINGS = 4, 4


@pytest.mark.slow
def test_shipped_draft_tau_on_should_help(shipped):
    """Per S2D exit, with `TAU_TOKENS` / `TAU_SIBLINGS` on the should-help prompts: τ above 1.3 (issue 16),
    the tokens equal to greedy's (near-tie rule), and τ above the layer-truncated target's chain of the same
    length (the control) by a margin. The chains alone stay below 1.3 at the held-out choice (exit 2, chain 4:
    1.277; a 600-step retraining lowered it: experiments/results/draft_lm_600steps.md)."""
    from selfref import lazy_teacher_logits
    from test_heads_shipped import assert_greedy_on_should_help
    from test_speculative import heldout_prompt_ids
    from jaxdec.speculative import methods as M
    t = shipped
    prompts = heldout_prompt_ids()
    ref = jaxdec.generate(t["model"], t["params"], prompts, max_new_tokens=SHIPPED_MAX_NEW, batch_size=8)
    should_help = {"prompts": prompts, "ref": ref,  # test_heads_shipped's fixture of that name, on this target
                   "logits": lazy_teacher_logits(t["model"], t["params"], prompts, ref.tokens)}
    cfg, _, _, _ = D.load_draft_lm(t["path"], None)
    taus = {}
    for depth in cfg.exits:
        dec, pp = D.build(t["model"], t["params"], t["path"], target=t["gguf"], depth=depth, num_tokens=TAU_TOKENS,
                          siblings=TAU_SIBLINGS)
        out = jaxdec.generate(t["model"], pp, prompts, decoder=dec, max_new_tokens=SHIPPED_MAX_NEW, batch_size=8)
        assert_greedy_on_should_help(t, should_help, out, f"draft_lm depth {depth} siblings {TAU_SIBLINGS}")
        dec, pp = M.draft_model(t["model"], t["params"], draft_layers=depth, num_tokens=TAU_TOKENS)
        base = jaxdec.generate(t["model"], pp, prompts, decoder=dec, max_new_tokens=SHIPPED_MAX_NEW, batch_size=8)
        taus[depth] = (out.stats["tau"], base.stats["tau"])
    print("should-help τ per exit (draft_lm tree, truncated-target chain):", taus)
    for depth, (tau, base) in taus.items():
        assert tau > 1.3 and tau > base + 0.1, (depth, taus)
