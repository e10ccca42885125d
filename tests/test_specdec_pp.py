"""Issue 16: SpecDec++'s acceptance head (`jaxdec.speculative.heads.acceptance`), its training script
(`train/specdec_pp.py`) and the learned stop in `DraftModelDrafter`, at tiny size.

Toy target and draft (`jaxdec.testing.toy_speculative.TrigramModel`, V = 16): the target's greedy next
token after ``tok`` is ``perm[tok]``; the draft's is the same for the tokens of a set G and a wrong one
elsewhere. The draft's hidden state is the one-hot of its current token, so a trained head can tell
whether the next draft token will be accepted (``tok in G``) while an untrained head guesses; the
trained stop must beat the untrained one under a fixed cost model, and greedy verification must stay
exact with the head on.

The second half stops EAGLE chains (`EagleDrafter(stop_head=)`, `methods.eagle(..., stop_head=)`,
``train/specdec_pp.py --drafter eagle``) on a toy EAGLE head trained with a reduced draft vocabulary
(see `eagle_toy`); the third stops Clover chains the same way (`CloverDrafter(stop_head=)`,
`methods.clover(..., stop_head=)`, ``--drafter clover``; see `clover_toy`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import jax.numpy as jnp
import pytest

import jaxdec
from jaxdec.speculative import methods as M
from jaxdec.speculative.drafters import DraftModelDrafter
from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
from jaxdec.speculative.heads import acceptance as A
from jaxdec.speculative.heads.artefact import HeadsMismatch, save_heads
from jaxdec.testing.toy_speculative import TrigramModel

V = 16
FP = "sha256:" + "5e" * 32
MAX_NEW = 24
K = 6
COST_DRAFT = 0.3  # cost model: a draft call costs 0.3 target calls


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from train.specdec_pp import SpecDecPPTrainConfig, train_specdec_pp
    rng = np.random.default_rng(0)
    perm = rng.permutation(V)
    good = rng.permutation(V)[: V // 2]  # G: tokens after which the draft guesses right
    wrong = (perm + 1 + rng.integers(0, V - 1, V)) % V
    wrong = np.where(wrong == perm, (perm + 1) % V, wrong)
    table = (rng.normal(size=(V, V, V)) * 0.3).astype(np.float32)
    dtable = table.copy()
    table[:, np.arange(V), perm] += 4.0
    dnext = perm.copy()
    bad = np.setdiff1d(np.arange(V), good)
    dnext[bad] = wrong[bad]
    dtable[:, np.arange(V), dnext] += 4.0
    model = TrigramModel(V)
    params = {"table": jnp.asarray(table), "embed": jnp.eye(V, dtype=jnp.float32)}
    dparams = {"table": jnp.asarray(dtable), "embed": jnp.eye(V, dtype=jnp.float32)}
    prompts = [[int(x) for x in rng.integers(0, V, size=int(rng.integers(2, 6)))] for _ in range(48)]
    gen = jaxdec.generate(model, params, prompts[:40], max_new_tokens=MAX_NEW)
    seqs = [p + list(t) for p, t in zip(prompts[:40], gen.tokens)]
    d = tmp_path_factory.mktemp("specdec_pp")
    cfg = SpecDecPPTrainConfig(out=str(d / "run"), steps=20, batch_size=8, lr=0.1, warmup=2, seq_len=32,
                               num_layers=1, eval_every=10, save_every=10, log_every=1, progress=False,
                               eval_fraction=0.1)
    res, path = train_specdec_pp(cfg, model, params, seqs, [len(p) for p in prompts[:40]], FP, target_name="toy",
                                 command="pytest", log=lambda *a: None, draft=(model, dparams, "toy-draft"))
    test = prompts[40:]
    assert len({len(p) for p in test}) >= 3  # a ragged batch
    greedy = jaxdec.generate(model, params, test, max_new_tokens=MAX_NEW).tokens
    return dict(model=model, params=params, dparams=dparams, good=set(int(g) for g in good), prompts=prompts,
                test=test, greedy=greedy, res=res, path=path, cfg=cfg, acfg=res.acceptance_config, dir=d)


def _run(toy, hp, prompts=None, threshold=0.7, sampling=False, batch_size=None, **kw):
    dec, pp = A.build(toy["model"], toy["params"], (toy["acfg"], hp), draft=(toy["model"], toy["dparams"]),
                      num_tokens=K, threshold=threshold, sampling=sampling, **kw)
    return jaxdec.generate(toy["model"], pp, prompts or toy["test"], decoder=dec, max_new_tokens=MAX_NEW,
                           batch_size=batch_size, **({"sampling": {"temperature": 0.0}} if sampling else {}))


def _cost_speedup(stats):
    """Tokens per unit time under the fixed cost model (a target call 1, a draft call COST_DRAFT), and
    rejected draft tokens per target call (runs at batch 1, so calls are per row)."""
    raw = stats["raw"]
    emitted = int(np.sum(raw["emitted"]))
    cost = stats["target_calls"] + COST_DRAFT * stats["draft_calls"]
    rejected = int(np.sum(raw["pos_offered"])) - int(np.sum(raw["accepted"]))
    return emitted / cost, rejected / stats["target_calls"]


# --------------------------------------------------------------------------- training
def test_loss_falls_and_head_learns_the_set(toy):
    recs = toy["res"].records
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    assert len(train) == 20 and [r["step"] for r in ev] == [10, 20]
    assert train[-1] < 0.3 * train[0], train
    assert ev[-1]["acc"] > 0.95 and ev[-1]["loss"] < 0.3 * train[0]
    # labels: greedy acceptance is exactly "the current token is in G" at every labelled position
    lab = toy["res"].labels
    hp = toy["res"].params
    p = np.asarray(A.accept_prob(hp, jnp.eye(V)))[:, 0]
    g = np.array([i in toy["good"] for i in range(V)])
    assert p[g].min() > 0.6 and p[~g].max() < 0.1, p  # separated (rejections weigh 6x: p_accept leans low)
    assert 0.2 < lab["label"][lab["mask"]].mean() < 0.8  # both classes present


def test_labels_match_the_rule_and_sampling_labels_are_min_p_over_q(toy):
    from train.specdec_pp import label_pass
    from train.medusa import sequences_to_arrays
    seqs = [p + [int(x) for x in np.arange(5)] for p in toy["prompts"][:4]]
    arr = sequences_to_arrays(seqs, [len(p) for p in toy["prompts"][:4]], 12)
    lab = label_pass(toy["model"], toy["params"], toy["model"], toy["dparams"], arr, "greedy", 4, log=lambda *a: None)
    tok = arr["tokens"]
    want = np.array([[t in toy["good"] for t in row] for row in tok], np.float32)
    assert np.array_equal(lab["label"][lab["mask"]], want[lab["mask"]])
    assert np.array_equal(lab["feat"].astype(np.float32), np.eye(V, dtype=np.float32)[tok])
    soft = label_pass(toy["model"], toy["params"], toy["model"], toy["dparams"], arr, "sampling", 4,
                      log=lambda *a: None)["label"]
    assert np.all((soft >= 0) & (soft <= 1)) and not np.all((soft == 0) | (soft == 1))


# --------------------------------------------------------------------------- the stop rule
def test_stop_rule():
    surv = jnp.ones((4,))
    alive = jnp.array([True, True, True, False])
    p = jnp.array([0.9, 0.5, 0.2, 0.9])
    s, take, go = A.stop_rule(surv, alive, p, 0, 0.3, min_tokens=0)
    assert take.tolist() == [True, False, False, False] and np.allclose(s, [0.9, 1, 1, 1])
    assert go.tolist() == take.tolist()  # the paper's rule: go on while proposing
    s2, take2, _ = A.stop_rule(s, take, jnp.array([0.9, 0.9, 0.9, 0.9]), 1, 0.3, min_tokens=0)
    assert take2.tolist() == [True, False, False, False] and np.isclose(s2[0], 0.81)
    _, take3, _ = A.stop_rule(s2, take2, jnp.array([0.8, 1, 1, 1]), 2, 0.3, min_tokens=0)  # 1 - 0.648 > 0.3
    assert take3.tolist() == [False] * 4
    _, take4, _ = A.stop_rule(surv, alive, p, 0, 0.3, min_tokens=1)  # the first token always joins
    assert take4.tolist() == [True, True, True, False]
    # lookahead: 0.9 * 0.7 = 0.63 < 0.7 would be declined next, so no further draft call
    _, take5, go5 = A.stop_rule(surv, alive, p, 0, 0.3, min_tokens=0, p_next=jnp.array([0.7, 1, 1, 1]))
    assert take5.tolist() == [True, False, False, False] and go5.tolist() == [False] * 4
    _, _, go6 = A.stop_rule(surv, alive, p, 0, 0.3, min_tokens=2, p_next=jnp.array([0.7, 1, 1, 1]))
    assert go6.tolist() == [True, True, True, False]  # min_tokens forces the second call


def test_trained_stop_beats_untrained_and_fixed_lengths(toy):
    """Under the cost model (batch 1): the trained stop beats an untrained head, with the paper's rule and
    with the lookahead, and the lookahead rule beats every fixed draft length tried (1 and K)."""
    greedy = toy["greedy"]
    sp = {}
    for name, hp in (("trained", toy["res"].params), ("untrained", A.init_params(toy["acfg"], seed=3))):
        for la in (True, False):
            out = _run(toy, hp, batch_size=1, lookahead=la)
            assert out.tokens == greedy
            assert out.stats["tau"] > 1.0
            sp[name, la] = _cost_speedup(out.stats)[0]
    assert sp["trained", True] > 1.1 * sp["untrained", True], sp
    assert sp["trained", False] > 1.1 * sp["untrained", False], sp
    assert sp["trained", True] > sp["trained", False], sp  # no draft call spent on a declined token
    for k in (1, K):
        dec, pp = M.draft_model(toy["model"], toy["params"], draft=(toy["model"], toy["dparams"]), num_tokens=k)
        fixed = jaxdec.generate(toy["model"], pp, toy["test"], decoder=dec, max_new_tokens=MAX_NEW, batch_size=1)
        assert fixed.tokens == greedy
        assert sp["trained", True] > 1.05 * _cost_speedup(fixed.stats)[0], (k, sp, _cost_speedup(fixed.stats))


def test_lossless_ragged_batch_min_tokens_zero_and_sampling(toy):
    """Batch 1 is covered above (every run at batch_size=1 equals greedy); here the ragged batch of 8."""
    for mt in (1, 0):
        out = _run(toy, toy["res"].params, min_tokens=mt)
        assert out.tokens == toy["greedy"]
        assert out.stats["tau"] > 1.0


@pytest.mark.slow
def test_sampling_verification_with_the_head(toy):
    """Sampling verification with temperature-0 rows is greedy decoding (one more compiled program)."""
    samp = _run(toy, toy["res"].params, sampling=True)
    assert samp.tokens == toy["greedy"] and samp.stats["tau"] > 1.0


def test_head_off_is_unchanged_and_a_never_stopping_head_drafts_the_full_chain(toy):
    dec, pp = M.draft_model(toy["model"], toy["params"], draft=(toy["model"], toy["dparams"]), num_tokens=K)
    off = jaxdec.generate(toy["model"], pp, toy["test"], decoder=dec, max_new_tokens=MAX_NEW, batch_size=1)
    hp = dict(A.init_params(toy["acfg"]))
    hp["out_b"] = jnp.full((2,), 50.0)  # p_accept = 1: never stops
    on = _run(toy, hp, batch_size=1)
    assert on.tokens == off.tokens == toy["greedy"]
    for k in ("tau", "target_calls", "draft_calls"):
        assert on.stats[k] == off.stats[k], k
    np.testing.assert_array_equal(on.stats["acceptance_per_position"], off.stats["acceptance_per_position"])
    # negative control: a head that always predicts rejection drafts one token per call
    hp["out_b"] = jnp.full((2,), -50.0)
    low = _run(toy, hp, batch_size=1)
    assert low.tokens == off.tokens and low.stats["draft_calls"] <= low.stats["target_calls"]  # one per step
    assert off.stats["draft_calls"] > 3 * off.stats["target_calls"]


# --------------------------------------------------------------------------- files and bad input
def test_heads_file_roundtrip_and_bad_input(toy, tmp_path):
    path = toy["path"]
    dec, pp = A.build(toy["model"], toy["params"], path, target=FP, draft=(toy["model"], toy["dparams"]),
                      num_tokens=K)
    out = jaxdec.generate(toy["model"], pp, toy["test"], decoder=dec, max_new_tokens=MAX_NEW)
    ref = _run(toy, toy["res"].params)
    assert out.tokens == ref.tokens and out.stats["draft_calls"] == ref.stats["draft_calls"]
    cfg, hp, meta = A.load_acceptance(path, FP)
    assert cfg.draft == "toy-draft" and meta["kind"] == A.KIND and meta["command"] == "pytest"
    with pytest.raises(HeadsMismatch, match="another target"):
        A.build(toy["model"], toy["params"], path, target="sha256:" + "cd" * 32, draft=(toy["model"], toy["dparams"]))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        A.load_acceptance(str(cut), FP)
    other = tmp_path / "medusa.safetensors"
    save_heads(str(other), "medusa", {"w": np.zeros((2, 2), np.float32)}, {"hidden": V}, FP)
    with pytest.raises(ValueError, match="holds 'medusa' heads, expected 'specdec_pp'"):
        A.load_acceptance(str(other), FP)
    wrong = tmp_path / "wrong.safetensors"
    save_heads(str(wrong), A.KIND, {"w": np.zeros((2, 2), np.float32)}, toy["acfg"].to_dict(), FP)
    with pytest.raises(ValueError, match="expected tensors"):
        A.load_acceptance(str(wrong), FP)
    good = (toy["acfg"], toy["res"].params)
    draft = (toy["model"], toy["dparams"])
    with pytest.raises(ValueError, match="threshold"):
        A.build(toy["model"], toy["params"], good, draft=draft, threshold=1.5)
    with pytest.raises(ValueError, match="lookahead"):
        A.build(toy["model"], toy["params"], good, draft=draft, lookahead="yes")
    with pytest.raises(ValueError, match="min_tokens"):
        A.build(toy["model"], toy["params"], good, draft=draft, min_tokens=-1)
    with pytest.raises(ValueError, match="num_tokens"):
        A.build(toy["model"], toy["params"], good, draft=draft, num_tokens=0)
    with pytest.raises(TypeError, match="heads must be"):
        A.build(toy["model"], toy["params"], 3, draft=draft)
    with pytest.raises(ValueError, match="expected tensors"):
        A.build(toy["model"], toy["params"], (toy["acfg"], {"w": 1}), draft=draft)
    with pytest.raises(ValueError, match="hidden"):
        A.AcceptanceConfig(hidden=0)
    with pytest.raises(ValueError, match="labels"):
        A.AcceptanceConfig(hidden=4, labels="soft")
    with pytest.raises(ValueError, match="draft_layers=2.*first 3 layers"):
        A.resolve_draft(toy["model"], toy["params"], A.AcceptanceConfig(hidden=4, draft="layers:3"), draft_layers=2)
    stop = A.AcceptanceStop(toy["acfg"])
    with pytest.raises(ValueError, match="not both"):
        DraftModelDrafter(toy["model"], 4, stop_threshold=0.3, stop_head=stop)
    with pytest.raises(TypeError, match="advance"):
        DraftModelDrafter(toy["model"], 4, stop_head=object())
    plain = SpeculativeDecoder(DraftModelDrafter(toy["model"], 4, stop_head=stop))
    with pytest.raises(ValueError, match="'model'.*'stop'"):
        jaxdec.generate(toy["model"], with_draft_params(toy["params"], toy["dparams"]), toy["test"][:1],
                        decoder=plain, max_new_tokens=4)


def test_train_config_bad_values():
    from train.harness import ConfigError
    from train.specdec_pp import SpecDecPPTrainConfig
    for kw, flag in (({"labels": "soft"}, "--labels"), ({"weight_mismatch": 0.0}, "--weight-mismatch"),
                     ({"num_layers": -1}, "--num-layers"), ({"draft": "x", "draft_layers": 3}, "--draft"),
                     ({"draft_depth": 2}, "--draft-depth"), ({"seq_len": 2}, "--seq-len")):
        with pytest.raises(ConfigError, match=flag):
            SpecDecPPTrainConfig(**kw).validate()


# --------------------------------------------------------------------------- the shipped head (slow tier)
SHIPPED_MAX_NEW = 32


@pytest.fixture(scope="module")
def shipped(model_q, gguf_path):
    """16 held-out prompts (10 chat, 6 copy, interleaved so each batch of 8 is ragged), the greedy reference
    at batch 8, the teacher logits and block-vs-step |Δlogit| for the near-tie rule
    (tests/test_distill_draft.py's pattern)."""
    from test_heads_shipped import heldout_target
    from jaxdec.speculative.heads import shipped_path
    return {**heldout_target(model_q, gguf_path, SHIPPED_MAX_NEW), "path": shipped_path(A.KIND, "smollm2-135m")}


@pytest.mark.slow
def test_shipped_head_provenance_and_size(gguf_path):
    from test_heads_shipped import shipped_provenance
    hp, meta = shipped_provenance(A.KIND, "train.specdec_pp", gguf_path)
    cfg = A.AcceptanceConfig.from_dict(meta["config"])
    assert cfg.draft  # the draft it was trained on is recorded
    assert 0.0 < meta["label_mean"] < 1.0


@pytest.mark.slow
def test_shipped_head_lossless_batch1_and_ragged_batch8(shipped):
    """The shipped head's stop on its draft: tokens equal greedy (near-tie rule) at batch 8 (ragged) and
    batch 1, with min_tokens 1 and 0; drafts both accepted and rejected."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import neartie
    from jaxdec.cache.kv import bucket
    from test_speculative import assert_accepts_and_rejects
    t = shipped
    assert len({bucket(len(p)) for p in t["prompts"]}) >= 2 and len(t["prompts"]) >= 16
    dec, pp = A.build(t["model"], t["params"], t["path"], target=t["gguf"])
    pairs, taus = [], {}
    for bs, mt in ((8, 1), (1, 1), (8, 0)):
        out = jaxdec.generate(t["model"], A.with_settings(pp, min_tokens=mt), t["prompts"], decoder=dec,
                              max_new_tokens=SHIPPED_MAX_NEW, batch_size=bs)
        pairs += [(f"specdec_pp b{bs} min{mt} prompt {i}", o, r, lg) for i, (o, r, lg) in
                  enumerate(zip(out.tokens, t["ref"].tokens, t["logits"]))]
        assert_accepts_and_rejects(out.stats, f"b{bs} min{mt}")
        taus[bs, mt] = (out.stats["tau"], out.stats["draft_calls"] / out.stats["target_calls"])
    print("shipped specdec_pp (τ, draft calls per target call) per (batch, min_tokens):", taus)
    neartie.assert_sequences_match(pairs, t["dlogit"])


# --------------------------------------------------------------------------- the learned stop on EAGLE chains
# Toy: `peaked_trigram`'s target (greedy next token perm[tok]) and an EAGLE head trained 20 steps on its
# greedy text with a draft vocabulary of 11 of the 16 tokens, so a draft is rejected where the target's next
# token is outside it (and where the briefly trained head errs): what an acceptance head reading the EAGLE
# layer's output can learn. The stop head is then trained on the EAGLE labels (train/specdec_pp.py
# --drafter eagle). Every stop-head run shares one compiled program (same head shapes; settings are traced).
EK = 4  # EAGLE chain length


def _heads_toy(tmp_path_factory, name, make_heads, **stop_kw):
    """The toy target (`peaked_trigram`, seed 1), its greedy continuations of 40 prompts as the corpus and 8
    ragged test prompts; ``make_heads(model, params, seqs, plens, folder)`` writes the EAGLE or Clover heads
    file (``name``), and the stop head is trained for it (train/specdec_pp.py --drafter name)."""
    from jaxdec.speculative.heads.acceptance import heads_module
    from jaxdec.testing.toy_speculative import peaked_trigram
    from train.specdec_pp import SpecDecPPTrainConfig, train_specdec_pp
    model, params, prompts = peaked_trigram(V, 48, seed=1)
    gen = jaxdec.generate(model, params, prompts[:40], max_new_tokens=MAX_NEW)
    seqs = [p + list(t) for p, t in zip(prompts[:40], gen.tokens)]
    plens = [len(p) for p in prompts[:40]]
    d = tmp_path_factory.mktemp(f"specdec_pp_{name}")
    hpath = make_heads(model, params, seqs, plens, d)
    hc, hhp, _, d2t = heads_module(name)[1](hpath, FP)
    d2t = np.asarray(d2t)
    cfg = SpecDecPPTrainConfig(out=str(d / "stop"), steps=60, batch_size=8, lr=0.1, warmup=2, seq_len=32,
                               num_layers=1, eval_every=30, save_every=30, log_every=1, progress=False,
                               eval_fraction=0.1, drafter=name, **stop_kw)
    res, path = train_specdec_pp(cfg, model, params, seqs, plens, FP, target_name="toy", command="pytest",
                                 log=lambda *a: None, **{name: (hc, hhp, d2t)})
    test = prompts[40:]
    assert len({len(p) for p in test}) >= 3  # a ragged batch
    greedy = jaxdec.generate(model, params, test, max_new_tokens=MAX_NEW).tokens
    return dict(name=name, file=hpath, triple=(hc, hhp, d2t), model=model, params=params, prompts=prompts, seqs=seqs,
                plens=plens, d2t=d2t, res=res, path=path, acfg=res.acceptance_config, test=test, greedy=greedy, dir=d)


@pytest.fixture(scope="module")
def eagle_toy(tmp_path_factory):
    from train.eagle import EagleTrainConfig, train_eagle

    def make(model, params, seqs, plens, d):
        ecfg = EagleTrainConfig(out=str(d / "eagle"), steps=20, batch_size=8, lr=0.05, warmup=2, seq_len=32,
                                eval_every=20, save_every=20, log_every=1, progress=False, draft_vocab=11,
                                num_tokens=EK)
        return train_eagle(ecfg, model, params, seqs, plens, FP, log=lambda *a: None)[1]

    t = _heads_toy(tmp_path_factory, "eagle", make, depths=3)
    return {**t, "epath": t["file"], "ec": t["triple"][0], "ehp": t["triple"][1]}


def _fixed_head(t, logit):
    hp = dict(A.init_params(t["acfg"]))
    hp["out_b"] = jnp.full((2,), float(logit))  # p_accept = sigmoid(50) = 1 (never stops) or 0 (always)
    return (t["acfg"], hp)


def _row_cost_speedup(stats):
    """Tokens per unit cost per row (ragged batch): a row step costs 1, each draft token it proposed
    COST_DRAFT (one draft-layer call each)."""
    raw = stats["raw"]
    return int(np.sum(raw["emitted"])) / (stats["row_steps"] + COST_DRAFT * int(np.sum(raw["pos_offered"])))


def _heads_stop(t, stop_head=None, prompts=None, max_new=MAX_NEW, **kw):
    """`methods.eagle` / `methods.clover` (per ``t["name"]``) on the toy's heads file -> (decoder, params, output)."""
    dec, pp = getattr(M, t["name"])(t["model"], t["params"], t["file"], target=FP, stop_head=stop_head, **kw)
    return dec, pp, jaxdec.generate(t["model"], pp, prompts or t["test"], decoder=dec, max_new_tokens=max_new)


def _check_stop_runs(t, k):
    """The shared checks of a learned stop on a chain of ``k`` heads (EAGLE, Clover) on the toy's ragged batch:
    lossless with every head; a never-stopping head gives the heads' τ, calls and acceptance without a stop;
    an always-stopping one drafts ``min_tokens`` per step with as many draft calls and the smallest verify
    bucket; the trained head beats the untrained one (and the full chain) under the per-row cost model and
    drafts less. -> (the run without a stop, {name: (decoder, params, output)})."""
    _, _, off = _heads_stop(t)
    assert off.tokens == t["greedy"] and off.stats["tau"] > 2.0  # the heads draft well
    assert np.all(np.asarray(off.stats["raw"]["pos_offered"]) > 0)  # the full chain of k offered
    runs = {}
    for name, head in (("never", _fixed_head(t, 50.0)), ("always", _fixed_head(t, -50.0)), ("trained", t["path"]),
                       ("untrained", (t["acfg"], A.init_params(t["acfg"], seed=3)))):
        dec, pp, out = _heads_stop(t, head)
        assert dec.verify_buckets == "auto" and dec.drafter.stop_head is not None
        assert out.tokens == t["greedy"], name  # lossless on the ragged batch
        runs[name] = (dec, pp, out)
    never = runs["never"][2].stats
    for key in ("tau", "target_calls", "row_steps"):  # a head that never stops = the heads without one
        assert never[key] == off.stats[key], key
    np.testing.assert_array_equal(never["acceptance_per_position"], off.stats["acceptance_per_position"])
    assert never["draft_calls"] == k * never["block_calls"]
    # a head that always predicts rejection drafts min_tokens per step (and one draft call each)
    dec, pp, always = runs["always"]
    for mt in (1, 2):
        out = jaxdec.generate(t["model"], A.with_settings(pp, min_tokens=mt), t["test"], decoder=dec,
                              max_new_tokens=MAX_NEW)
        assert out.tokens == t["greedy"]
        off_pos = np.asarray(out.stats["raw"]["pos_offered"])
        assert np.all(off_pos[:mt] > 0) and np.all(off_pos[mt:] == 0), (mt, off_pos)
        assert out.stats["draft_calls"] == mt * out.stats["block_calls"], (mt, out.stats)
        bucket = {1: 2, 2: 4}[mt]  # the smallest "auto" bucket (1, 2, 4, k + 1) holding mt drafts + the root
        assert out.stats["block_tokens"] == bucket * out.stats["block_calls"], (mt, out.stats["bucket_steps"])
    # the trained head beats the untrained one under the per-row cost model, and drafts less than the full chain
    sp = {n: _row_cost_speedup(r[2].stats) for n, r in runs.items()}
    tr = runs["trained"][2].stats
    assert sp["trained"] > 1.05 * sp["untrained"], sp
    assert sp["trained"] > 1.02 * sp["never"], sp  # and the full chain (same τ here, fewer rejected drafts)
    assert tr["tau"] > 1.5, (tr["tau"], sp)
    drafted = lambda st: int(np.sum(st["raw"]["pos_offered"])) / st["row_steps"]  # noqa: E731
    assert drafted(tr) < 0.9 * drafted(off.stats), (drafted(tr), drafted(off.stats))
    print(f"{t['name']} + stop (ragged batch 8): per-row cost speedup", sp, "tau",
          {n: r[2].stats["tau"] for n, r in runs.items()}, "drafted per row step",
          {n: drafted(r[2].stats) for n, r in runs.items()})
    return off, runs


def test_eagle_stop_lossless_ragged_full_chain_min_tokens_and_trained_beats_untrained(eagle_toy):
    off, runs = _check_stop_runs(eagle_toy, EK)
    assert runs["never"][2].stats["draft_calls"] == off.stats["draft_calls"]  # EAGLE counts its layer calls anyway
    assert runs["trained"][2].stats["tau"] > runs["untrained"][2].stats["tau"]


def _simulate_first_draft(labels, plen, max_new):
    """Row steps and accepted tokens of a chain of exactly one draft token per step, from depth-1 labels
    ``labels[t]`` (the draft after the token at t + 1 is accepted iff 1): what the real drafter must do."""
    length, steps, acc = plen + 1, 0, 0  # the prefill emitted the first new token
    while length < plen + max_new:
        ok = bool(labels[length - 2])  # (on the last step a right draft counts as accepted, its bonus is cut)
        steps, acc, length = steps + 1, acc + int(ok), length + 1 + int(ok)
    return steps, acc


def test_eagle_labels_are_the_drafters_first_token_acceptance(eagle_toy):
    """The depth-1 labels of the label pass (teacher forcing the EAGLE head on the target's greedy text)
    predict exactly what the real drafter does when it drafts one token per step (an always-stopping head,
    min_tokens 1): its row steps and accepted tokens on those sequences. Deeper passes exist and differ."""
    from train.medusa import sequences_to_arrays
    from train.specdec_pp import eagle_label_pass
    t = eagle_toy
    n = 8
    arr = sequences_to_arrays(t["seqs"][:n], t["plens"][:n], 32)
    lab = eagle_label_pass(t["model"], t["params"], t["ec"], t["ehp"], t["d2t"], arr, "greedy", 4, 3,
                           log=lambda *a: None)
    from train.medusa import store_hidden
    # --hidden stored: the same EAGLE features (the toy's logits are not its LM head on its hidden state, so
    # only the features compare here); sampling labels min(1, p/q) are soft
    th = store_hidden(t["model"], t["params"], arr["tokens"], 4, log=lambda *a: None)
    st = eagle_label_pass(t["model"], t["params"], t["ec"], t["ehp"], t["d2t"], arr, "sampling", 4, 3,
                          target_hidden=th, log=lambda *a: None)
    np.testing.assert_array_equal(st["feat"], lab["feat"])
    _check_first_draft_labels(t, lab, st, n, 3)


def _check_first_draft_labels(t, lab, st, n, depths):
    """The label passes' shared checks on the first ``n`` corpus sequences: ``lab`` greedy labels, ``st``
    sampling labels (soft, same mask); both depths present (fewer positions deeper, other features); the
    first draft's labels predict the real drafter's row steps and accepted tokens at one draft per step (an
    always-stopping head, min_tokens 1), and labels shifted by one position do not. -> (labels, mask)
    ``[n, depths, T-1]``."""
    np.testing.assert_array_equal(st["mask"], lab["mask"])
    soft = st["label"][st["mask"]]
    assert np.all((soft >= 0) & (soft <= 1)) and not np.all((soft == 0) | (soft == 1))
    y = lab["label"].reshape(n, depths, -1)
    m = lab["mask"].reshape(n, depths, -1)
    assert lab["feat"].shape == (n, depths * 31, V) and 0.2 < y[:, 0][m[:, 0]].mean() < 0.95
    assert m[:, 1].sum() < m[:, 0].sum() and not np.array_equal(lab["feat"][:, :31], lab["feat"][:, 31:62])
    want = [_simulate_first_draft(y[i, 0], t["plens"][i], MAX_NEW) for i in range(n)]
    dec, pp = getattr(M, t["name"])(t["model"], t["params"], t["file"], target=FP, stop_head=_fixed_head(t, -50.0))
    out = jaxdec.generate(t["model"], A.with_settings(pp, min_tokens=1), t["prompts"][:n], decoder=dec,
                          max_new_tokens=MAX_NEW)
    assert [p + list(o) for p, o in zip(t["prompts"][:n], out.tokens)] == t["seqs"][:n]
    assert (out.stats["row_steps"], int(out.stats["raw"]["accepted"])) == tuple(np.sum(want, axis=0)), want
    # control: labels of another head (or shifted by one position) predict other counts
    shifted = [_simulate_first_draft(np.roll(y[i, 0], 1), t["plens"][i], MAX_NEW) for i in range(n)]
    assert tuple(np.sum(shifted, axis=0)) != tuple(np.sum(want, axis=0))
    return y, m


def _check_stop_refusals(t, tmp_path, other, what, feature):
    """The shared refusals of a learned stop on EAGLE / Clover heads (``t["name"]``): the file's head is accepted
    on its heads and refused on ``other`` heads of the same shapes (file or in memory), on a draft model's
    record, on another target and when its file records no draft; an in-memory head without a record is taken
    but must read ``feature``'s size; bad stop params, thresholds and drafter params are named. -> the
    head's config."""
    model, params = t["model"], t["params"]
    build = lambda heads=None, **kw: getattr(M, t["name"])(model, params, t["file"] if heads is None else heads,  # noqa: E731
                                                         **{"target": FP, **kw})
    cfg, _, meta = A.load_acceptance(t["path"], FP)
    assert cfg.draft == A.heads_draft_id(t["name"], t["file"]) and cfg.draft.startswith(t["name"] + ":")
    assert 0 < meta["label_mean_depth1"] < 1
    build(stop_head=t["path"])  # the right head: accepted
    with pytest.raises(ValueError, match=f"stop_head: the acceptance head was trained on {t['name']}:.*not on {what}"):
        build(other, stop_head=t["path"])
    with pytest.raises(ValueError, match=f"not on {what}"):  # the same, in memory
        build(other, target=None, stop_head=(cfg, t["res"].params))
    dm_head = (dataclasses.replace(cfg, draft="layers:1"), t["res"].params)  # trained on a draft model
    with pytest.raises(ValueError, match="trained on layers:1"):
        build(stop_head=dm_head)
    with pytest.raises(ValueError, match=f"trained for .*methods.{t['name']}"):  # and the reverse
        A.build(model, params, t["path"], target=FP)
    with pytest.raises(HeadsMismatch, match="another target"):
        build(t["triple"], target="sha256:" + "cd" * 32, stop_head=t["path"])
    unrec = tmp_path / "unrecorded.safetensors"  # a file that records no draft is refused ...
    save_heads(str(unrec), A.KIND, dict(t["res"].params), dataclasses.replace(cfg, draft="").to_dict(), FP)
    with pytest.raises(ValueError, match="trained on an unrecorded draft"):
        build(stop_head=str(unrec))
    # ... an in-memory head without a record is taken as given, but must read the heads' hidden size
    build(stop_head=(dataclasses.replace(cfg, draft=""), t["res"].params))
    small = A.AcceptanceConfig(hidden=8, num_layers=1)
    with pytest.raises(ValueError, match=f"hidden size 8, {feature} has {V}"):
        build(stop_head=(small, A.init_params(small)))
    with pytest.raises(ValueError, match="expected tensors"):
        build(stop_head=(cfg, {"w": 1}))
    with pytest.raises(TypeError, match="stop_head must be"):
        build(stop_head=3)
    with pytest.raises(ValueError, match="threshold"):
        build(stop_head=t["path"], stop_threshold=1.5)
    with pytest.raises(ValueError, match="stop_threshold is used only with stop_head"):
        build(stop_threshold=0.5)
    with pytest.raises(TypeError, match="advance"):
        type(build()[0].drafter)(t["triple"][0], stop_head=object())
    dec, pp = build(stop_head=t["path"])
    plain, pp0 = build()
    with pytest.raises(ValueError, match="'stop'"):  # a stop head without its params
        jaxdec.generate(model, pp0, t["test"][:1], decoder=dec, max_new_tokens=4)
    assert plain.verify_buckets == () and dec.verify_buckets == "auto"
    return cfg


def test_eagle_stop_head_for_another_draft_refused_and_bad_input(eagle_toy, tmp_path):
    from jaxdec.speculative.heads.eagle import EagleDrafter, draft_id, init_params as eagle_init
    t = eagle_toy
    other = (t["ec"], eagle_init(t["ec"], 5), t["d2t"])  # another EAGLE head of the same shapes
    cfg = _check_stop_refusals(t, tmp_path, other, "this EAGLE head", "the EAGLE layer's output")
    assert A.load_acceptance(t["path"], FP)[2]["depths"] == 3
    # the file's draft id is that of the loaded params, and the chain length does not enter it
    assert draft_id(dataclasses.replace(t["ec"], num_tokens=2), t["ehp"], t["d2t"]) == cfg.draft
    with pytest.raises(ValueError, match="tree_topk=2"):
        M.eagle(t["model"], t["params"], t["epath"], target=FP, stop_head=t["path"], tree_topk=2, tree_nodes=4)
    with pytest.raises(ValueError, match="chain only"):
        EagleDrafter(dataclasses.replace(t["ec"], tree_topk=2, tree_nodes=4), stop_head=A.AcceptanceStop(cfg))


def test_train_config_eagle_bad_values():
    from train.harness import ConfigError
    from train.specdec_pp import SpecDecPPTrainConfig
    for kw, flag in (({"drafter": "medusa"}, "--drafter"), ({"drafter": "eagle", "depths": 0}, "--depths"),
                     ({"eagle": "x.safetensors"}, "--eagle"), ({"drafter": "eagle", "draft_layers": 3}, "--draft"),
                     ({"depths": 2}, "--depths")):
        with pytest.raises(ConfigError, match=flag):
            SpecDecPPTrainConfig(**kw).validate()
    SpecDecPPTrainConfig(drafter="eagle", depths=2).validate()


def _check_stop_sampling(method, model, tp, tab, triple, seeds):
    """Chains drawn from the draft's q and cut by a learned stop (a random head whose stop point varies by row
    and step), verified by speculative sampling: the first three tokens' joint distribution is the target's
    (exact enumeration, 100k rows, tests/stat_checks.py); without residual resampling it is not (negative
    control). The stop really cut chains: later positions were offered less often."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from stat_checks import assert_speculative_joint
    tv = model.vocab_size
    acfg = A.AcceptanceConfig(hidden=tv, num_layers=1)
    ahp = dict(A.init_params(acfg, seed=4))
    ahp["out_w"] = ahp["out_w"] * 8.0  # predictions spread over (0, 1): some chains stop after 1 token, some after 2
    ahp["out_b"] = jnp.array([1.0, 1.0])
    dec, params = method(model, tp, triple, sampling=True, stop_head=(acfg, ahp), stop_threshold=0.5)
    assert dec.drafter.sample and dec.drafter.stop_head is not None
    stats = assert_speculative_joint(
        lambda residual: SpeculativeDecoder(dec.drafter, "sampling", residual=residual, verify_buckets="auto"), model,
        params, tab, seeds)
    offered = np.asarray(stats["raw"]["pos_offered"])
    assert offered[0] > 1.3 * offered[1] > 0 and offered[1] > offered[2], offered


@pytest.mark.slow
def test_eagle_stop_sampling_follows_the_target_distribution():
    """`_check_stop_sampling` on an EAGLE head (draft vocabulary 4 of 5 tokens)."""
    from jaxdec.speculative.heads.eagle import EagleConfig, init_params as eagle_init
    from jaxdec.testing.toy_speculative import random_table
    tv = 5
    tab = random_table(23, tv, 1.2)
    tp = {"table": jnp.asarray(tab), "embed": jnp.eye(tv, dtype=jnp.float32)}
    ec = EagleConfig(hidden=tv, draft_vocab=4, num_heads=1, num_kv_heads=1, head_dim=4, intermediate=8,
                     max_position=64, num_tokens=3)
    _check_stop_sampling(M.eagle, TrigramModel(tv), tp, tab, (ec, eagle_init(ec, 2), np.array([0, 1, 2, 4])), (73, 74))


def _check_cli_build(t, tmp_path, what):
    """``--drafter eagle|clover --heads H --stop-head S [--stop-threshold T]`` builds `methods.eagle` /
    `methods.clover` ``(..., stop_head=)`` with verify buckets on; a head for another draft is a ``--stop-head:``
    error (and, in the check before the model loads, too; the head is refused for a draft model); without
    the flag the drafter is as before."""
    import argparse
    from jaxdec.speculative import cli as scli
    d = t["name"]
    method = getattr(M, d)
    ns = lambda **kw: argparse.Namespace(**{**scli._DEFAULTS, "drafter": d, "spec_sampling": False,  # noqa: E731
                                            "model": "toy", "heads": t["file"], **kw})
    dec, pp = scli.build(ns(stop_head=t["path"], stop_threshold=0.6), t["model"], t["params"], FP)
    ref, rp = method(t["model"], t["params"], t["file"], target=FP, stop_head=t["path"], stop_threshold=0.6)
    assert dec == ref and dec.verify_buckets == "auto" and np.isclose(float(pp["draft"]["stop"]["threshold"]), 0.6)
    plain, _ = scli.build(ns(), t["model"], t["params"], FP)
    assert plain == method(t["model"], t["params"], t["file"], target=FP)[0] and plain.drafter.stop_head is None
    wrong = tmp_path / "wrong.safetensors"
    cfg, hp, _ = A.load_acceptance(t["path"], FP)
    save_heads(str(wrong), A.KIND, dict(hp), dataclasses.replace(cfg, draft="layers:1").to_dict(), FP)
    with pytest.raises(ValueError, match="^--stop-head: .*trained on layers:1"):
        scli.build(ns(stop_head=str(wrong)), t["model"], t["params"], FP)
    with pytest.raises(ValueError, match="^--heads: "):  # the heads file's own errors stay --heads errors
        scli.build(ns(stop_head=t["path"], heads=str(wrong)), t["model"], t["params"], FP)
    A.check_file_for_drafter(t["path"], d, t["file"])  # the check before the model loads: the right heads pass ...
    with pytest.raises(ValueError, match=f"wrong.safetensors': .*trained on layers:1.*not on {what} '"):
        A.check_file_for_drafter(str(wrong), d, t["file"])
    with pytest.raises(ValueError, match=f"trained for .*--drafter {d}"):  # ... a draft model does not
        A.check_file_for_drafter(t["path"], "draft-model")


def test_cli_build_eagle_with_stop_head(eagle_toy, tmp_path):
    _check_cli_build(eagle_toy, tmp_path, "the EAGLE head")


# --------------------------------------------------------------------------- SpecDec++ on Clover
# The same toy target and corpus as the EAGLE half. Clover heads are set by hand rather than trained (training
# them costs ~15 s of CI): every weight random (`clover.init_params`, the augmenting block switched on), then the
# merge maps the token a head reads to the target's next token, ``perm[x]``, over half its state, so each head
# drafts ``perm[x]`` whenever that token is in its reduced draft vocabulary (11 of 16 tokens) and something else
# (decided by its earlier states through the memory) when it is not. A head whose next token lies outside the
# vocabulary is always rejected, which the stop head, reading each head's regressive state, can learn; it is
# trained on the Clover labels (train/specdec_pp.py --drafter clover).
CK = 4  # Clover chain length (heads)


def _clover_heads(params, seed: int = 0):
    from jaxdec.speculative.heads import clover as C
    cc = C.CloverConfig(hidden=V, draft_vocab=11, num_tokens=CK, dec_heads=2, aug_heads=2, aug_kv_heads=1,
                        aug_head_dim=8, aug_intermediate=32, max_position=256)
    perm = np.asarray(params["table"])[0].argmax(-1)  # the target's greedy next token after each token
    hp = C.init_params(cc, seed)
    hp["aug"]["final_norm"] = jnp.full((V,), 0.3)  # the augmenting block adds to the target's features
    hp["merge"]["w"] = hp["merge"]["w"].at[:, :V].multiply(0.5).at[:, V:].set(jnp.eye(V)[perm].T)
    d2t = np.sort(np.random.default_rng(seed).permutation(V)[:11])
    return cc, hp, d2t


@pytest.fixture(scope="module")
def clover_toy(tmp_path_factory):
    from jaxdec.speculative.heads.clover import KIND

    def make(model, params, seqs, plens, d):
        cc, chp, d2t = _clover_heads(params)
        return save_heads(str(d / "clover.safetensors"), KIND, {**chp, "d2t": d2t}, cc.to_dict(), FP)

    t = _heads_toy(tmp_path_factory, "clover", make)
    return {**t, "cpath": t["file"], "cc": t["triple"][0], "chp": t["triple"][1]}


def test_clover_stop_lossless_ragged_full_chain_min_tokens_and_trained_beats_untrained(clover_toy):
    off, runs = _check_stop_runs(clover_toy, CK)
    assert off.stats["draft_calls"] == 0  # without a stop head Clover counts no draft calls (as before)


def _simulate_chain(labels, plen, max_new):
    """Row steps and accepted tokens of full Clover chains from the labels of every head ``labels [K,n]``
    (head k after the token at a + 1: ``labels[k, a]``): each step accepts the leading run of 1s."""
    length, steps, acc = plen + 1, 0, 0
    while length < plen + max_new:
        run = np.cumprod(labels[:, length - 2] > 0.5)
        steps, acc, length = steps + 1, acc + int(run.sum()), length + 1 + int(run.sum())
    return steps, acc


def test_clover_labels_are_the_drafters_acceptance_at_every_head(clover_toy):
    """The labels (teacher forcing Clover on the target's greedy text) predict exactly what the real drafter
    does: the first head's, its row steps and accepted tokens when it drafts one token per step (an
    always-stopping head, min_tokens 1); every head's, those of the full chain (a never-stopping head, with
    max_new short enough that every label lies inside the sequences). Labels shifted by one position (the
    first head's, or the later heads') predict other counts."""
    from train.medusa import sequences_to_arrays, store_hidden
    from train.specdec_pp import clover_label_pass
    t = clover_toy
    n = 8
    arr = sequences_to_arrays(t["seqs"][:n], t["plens"][:n], 32)
    lab = clover_label_pass(t["model"], t["params"], t["cc"], t["chp"], t["d2t"], arr, "greedy", 4, log=lambda *a: None)
    # --hidden stored: the same head states (the toy's logits are not its LM head on its hidden state, so only
    # the states compare); sampling labels min(1, p/q) are soft
    th = store_hidden(t["model"], t["params"], arr["tokens"], 4, log=lambda *a: None)
    st = clover_label_pass(t["model"], t["params"], t["cc"], t["chp"], t["d2t"], arr, "sampling", 4, target_hidden=th,
                           log=lambda *a: None)
    np.testing.assert_allclose(st["feat"].astype(np.float32), lab["feat"].astype(np.float32), atol=1e-2)
    y, m = _check_first_draft_labels(t, lab, st, n, CK)
    assert np.array_equal(lab["mask_next"].reshape(n, CK, -1)[:, 0], m[:, 0] & m[:, 1])
    assert not lab["mask_next"].reshape(n, CK, -1)[:, -1].any()  # the last head has no next one
    short = MAX_NEW - CK - 1  # the last step's deepest draft scores a token of the sequence
    want = tuple(np.sum([_simulate_chain(y[i], t["plens"][i], short) for i in range(n)], axis=0))
    dec, pp = M.clover(t["model"], t["params"], t["cpath"], target=FP, stop_head=_fixed_head(t, 50.0))
    out = jaxdec.generate(t["model"], pp, t["prompts"][:n], decoder=dec, max_new_tokens=short)
    assert (out.stats["row_steps"], int(out.stats["raw"]["accepted"])) == want and want[1] > want[0], want
    later = [np.concatenate([y[i, :1], np.roll(y[i, 1:], 1, axis=-1)]) for i in range(n)]
    assert tuple(np.sum([_simulate_chain(later[i], t["plens"][i], short) for i in range(n)], axis=0)) != want


def test_clover_stop_head_for_another_draft_refused_and_bad_input(clover_toy, tmp_path):
    from jaxdec.speculative.heads.clover import init_params as clover_init
    from jaxdec.speculative.heads.eagle import EagleConfig, init_params as eagle_init
    t = clover_toy
    model, params = t["model"], t["params"]
    other = (t["cc"], clover_init(t["cc"], 5), t["d2t"])  # other Clover heads of the same shapes
    cfg = _check_stop_refusals(t, tmp_path, other, "these Clover heads", "the Clover heads' state")
    assert A.load_acceptance(t["path"], FP)[2]["depths"] == CK
    with pytest.raises(ValueError, match="not on these Clover heads"):  # the same weights with another d2t map
        M.clover(model, params, (t["cc"], t["chp"], (t["d2t"] + 1) % V), stop_head=(cfg, t["res"].params))
    with pytest.raises(ValueError, match="trained on eagle:"):  # trained for an EAGLE head ...
        M.clover(model, params, t["cpath"], target=FP, stop_head=(dataclasses.replace(cfg, draft="eagle:" + "0" * 64),
                                                                  t["res"].params))
    ec = EagleConfig(hidden=V, draft_vocab=11, num_heads=1, num_kv_heads=1, head_dim=4, intermediate=8,
                     max_position=64, num_tokens=3)
    with pytest.raises(ValueError, match="trained on clover:.*not on this EAGLE head"):  # ... and the reverse
        M.eagle(model, params, (ec, eagle_init(ec, 0), t["d2t"]), stop_head=t["path"], target=FP)


def test_train_config_clover_bad_values():
    from train.harness import ConfigError
    from train.specdec_pp import SpecDecPPTrainConfig
    for kw, flag in (({"clover": "x.safetensors"}, "--clover FILE needs --drafter clover"),
                     ({"drafter": "clover", "eagle": "x.safetensors"}, "--eagle FILE needs --drafter eagle"),
                     ({"drafter": "clover", "draft": "d.safetensors"}, "--drafter clover"),
                     ({"drafter": "clover", "depths": 2}, "--depths"),
                     ({"drafter": "clover", "clover": "/no/such.safetensors"}, "--clover: no such file")):
        with pytest.raises(ConfigError, match=flag):
            SpecDecPPTrainConfig(**kw).validate()
    from jaxdec.speculative.heads import shipped_heads
    SpecDecPPTrainConfig(drafter="clover", clover=shipped_heads("clover", "smollm2-135m")).validate()


@pytest.mark.slow
def test_clover_stop_sampling_follows_the_target_distribution():
    """`_check_stop_sampling` on Clover heads (draft vocabulary 4 of 5 tokens, random weights that make each
    head's q depend on the tokens drawn before it)."""
    from jaxdec.speculative.heads import clover as C
    from jaxdec.testing.toy_speculative import random_table
    tv = 5
    tab = random_table(21, tv, 1.2)
    tp = {"table": jnp.asarray(tab), "embed": jnp.eye(tv, dtype=jnp.float32)}
    cc = C.CloverConfig(hidden=tv, draft_vocab=4, num_tokens=3, dec_heads=1, aug_heads=1, aug_kv_heads=1,
                        aug_head_dim=4, aug_intermediate=8, max_position=64)
    hp = C.init_params(cc, 3)
    rng = np.random.default_rng(3)
    hp["res"] = {"w": jnp.asarray(rng.normal(0, 1.0, (tv, tv)), jnp.float32), "b": jnp.zeros((tv,))}
    hp["merge"]["w"] = hp["merge"]["w"] + jnp.asarray(rng.normal(0, 1.0, (tv, 2 * tv)), jnp.float32)
    _check_stop_sampling(M.clover, TrigramModel(tv), tp, tab, (cc, hp, np.array([0, 1, 2, 4])), (75, 76))


def test_cli_build_clover_with_stop_head(clover_toy, tmp_path):
    _check_cli_build(clover_toy, tmp_path, "the Clover heads")


@pytest.mark.slow
def test_shipped_eagle_stop_head_provenance_lossless_and_stops(shipped):
    """The acceptance head shipped for the shipped EAGLE head (``specdec_pp_eagle``): made for the default model
    by ``python -m train.specdec_pp --drafter eagle``, recording that EAGLE head's weights id; on a chain of up
    to 4 tokens its stop gives greedy's tokens (near-tie rule) at batch 8 (ragged) and batch 1, with drafts
    accepted and rejected, and proposes fewer tokens than the full chain."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import neartie
    from test_speculative import assert_accepts_and_rejects
    from jaxdec.speculative.heads import shipped_heads
    from jaxdec.speculative.heads.artefact import read_heads, target_fingerprint
    from jaxdec.speculative.heads.eagle import draft_id, load_eagle
    t = shipped
    path, eagle = shipped_heads(A.EAGLE_SHIPPED, "smollm2-135m"), shipped_heads("eagle", "smollm2-135m")
    assert path is not None and os.path.getsize(path) <= 20 * 2**20
    _, meta = read_heads(path, A.KIND)
    assert meta["fingerprint"] == target_fingerprint(t["gguf"]) and meta["command"].startswith(
        "python -m train.specdec_pp --drafter eagle")
    ecfg, ehp, _, d2t = load_eagle(eagle, None)
    assert A.AcceptanceConfig.from_dict(meta["config"]).draft == draft_id(ecfg, ehp, d2t)
    pairs, props = [], {}
    for bs in (8, 1):
        dec, pp = M.eagle(t["model"], t["params"], eagle, target=t["gguf"], num_tokens=4, tree_topk=0, stop_head=path)
        out = jaxdec.generate(t["model"], pp, t["prompts"], decoder=dec, max_new_tokens=SHIPPED_MAX_NEW, batch_size=bs)
        pairs += [(f"eagle stop b{bs} prompt {i}", o, r, lg) for i, (o, r, lg) in
                  enumerate(zip(out.tokens, t["ref"].tokens, t["logits"]))]
        assert_accepts_and_rejects(out.stats, f"eagle stop b{bs}")
        raw = out.stats["raw"]
        props[bs] = raw["block_tokens"] / (raw["model_calls"] - 1)  # the prefill call has no verify block
    print("shipped EAGLE stop: verify block tokens per call per batch size:", props)
    assert props[1] < 5.0, props  # a full chain of 4 verifies 5 tokens every call
    neartie.assert_sequences_match(pairs, t["dlogit"])
