"""Issue 21 item 3: LongSpec (`jaxdec.speculative.heads.longspec`, `train/longspec.py`).

CI tier, on the peaked toy target (`peaked_trigram`: greedy next token ``perm[token]``; hidden state = one-hot of
the token): the loss falls over 20 steps; the trained draft gives a higher τ than the same draft untrained,
with exactly the greedy tokens at batch 1, in a ragged batch and on 300-token prompts (positions far past the
training sequences: the anchor-offset indices); the draft's cache is the same size for a 12-token and a
400-token prompt and holds exactly the sinks and the last window; the ring cache run step by step (with
rejected drafts left in it) equals the whole-sequence layer; a run interrupted and resumed ends bit-identical;
bad input is refused naming it.

Slow tier, on the default model (q weights) and the shipped draft: exactly the greedy tokens (DESIGN's near-tie
rule) on the RAPID held-out long prompts (2.2k-4.7k tokens, jaxdec/data/prompts/rapid_heldout.jsonl, chat
template) at batch 1 and in a ragged batch of 4, τ printed, above an untrained draft's.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jaxdec  # noqa: E402
from jaxdec.speculative.heads import longspec as L  # noqa: E402
from jaxdec.speculative.heads.artefact import HeadsMismatch, read_heads, save_heads  # noqa: E402
from jaxdec.testing.toy_speculative import peaked_trigram  # noqa: E402
from train.harness import ConfigError, tree_hash  # noqa: E402

V = 16
FP = "sha256:" + "ab" * 32  # the toy target's fingerprint
MAX_NEW = 24
LONG = 300  # toy prompt length of the long-position checks (training sequences are 32 tokens)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy target, its greedy continuations as the corpus and a 20-step run (checkpoints at 10, 20) of a
    draft with a 6-position window and 2 sinks, trained with anchor offsets up to 4000."""
    from train.longspec import LongSpecTrainConfig, train_longspec
    model, params, prompts = peaked_trigram(V, 40)
    g = jaxdec.generate(model, params, prompts, max_new_tokens=MAX_NEW)
    seqs = [p + t for p, t in zip(prompts[:32], g.tokens[:32])]
    plens = [len(p) for p in prompts[:32]]
    d = tmp_path_factory.mktemp("longspec")
    cfg = LongSpecTrainConfig(out=str(d / "run"), steps=20, batch_size=8, lr=0.03, warmup=2, seq_len=32,
                              eval_every=20, save_every=10, log_every=1, progress=False, draft_vocab=12, num_tokens=3,
                              window=6, sinks=2, max_offset=4000)
    res, heads = train_longspec(cfg, model, params, seqs, plens, FP, target_name="toy", command="pytest",
                                log=lambda *a: None)
    return dict(model=model, params=params, prompts=prompts, greedy=g.tokens, seqs=seqs, plens=plens, cfg=cfg,
                res=res, heads=heads, dir=d)


def test_loss_falls_over_20_steps(toy):
    recs = toy["res"].records
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    assert len(train) == 20 and [r["step"] for r in ev] == [20]
    assert train[-1] < 0.25 * train[0], train
    assert ev[-1]["loss"] < 0.25 * train[0]
    assert min(ev[-1][f"acc{k}"] for k in range(2)) > 0.9, ev[-1]


def _long_prompts(toy, n=4):
    """Toy prompts of about LONG tokens (random tokens, ragged) and their greedy continuations."""
    rng = np.random.default_rng(5)
    ps = [[int(x) for x in rng.integers(0, V, size=LONG - 7 * i)] for i in range(n)]
    return ps, jaxdec.generate(toy["model"], toy["params"], ps, max_new_tokens=MAX_NEW).tokens


def test_trained_draft_raises_tau_and_stays_lossless_at_long_positions(toy):
    """Trained vs untrained draft through `SpeculativeDecoder` on ragged ~300-token prompts (positions ten times
    the training length; the 6-position window wraps around its ring dozens of times), batch 4 and batch 1:
    exactly the greedy tokens, τ higher by a margin."""
    model, params = toy["model"], toy["params"]
    lcfg = toy["res"].longspec_config
    long_ps, long_ref = _long_prompts(toy)
    assert len({len(p) for p in long_ps}) == 4
    taus = {}
    for name, heads in (("untrained", (lcfg, L.init_params(lcfg, 1), toy["res"].d2t)), ("trained", toy["heads"])):
        dec, pp = L.build(model, params, heads, target=FP)
        lo = jaxdec.generate(model, pp, long_ps, decoder=dec, max_new_tokens=MAX_NEW)
        assert lo.tokens == long_ref, name  # lossless
        taus[name] = lo.stats["tau"]
    one = jaxdec.generate(model, pp, long_ps[:2], decoder=dec, max_new_tokens=MAX_NEW, batch_size=1)
    assert one.tokens == long_ref[:2]
    assert one.stats["tau"] > 2.0, one.stats["tau"]
    assert taus["untrained"] < 1.5, taus  # the control: a fresh draft rarely guesses the toy's permutation
    assert taus["trained"] > taus["untrained"] + 1.0, taus


def test_ring_cache_steps_equal_the_whole_sequence_layer(toy):
    """Positions 0..39 written through `cached_step` in chunks of 1-4 (window 6, sinks 2, ring 10: it wraps
    three times), each chunk first preceded by a rejected 'draft' of garbage at the same positions: every
    output equals `forward` over the whole sequence. Control: a layer with a wider window differs, so the
    window is what the cache reproduces."""
    lcfg = toy["res"].longspec_config
    hp = toy["res"].params
    rng = np.random.default_rng(0)
    t = 40
    x = jnp.asarray(rng.normal(size=(2, t, V)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    full, wide = jax.jit(lambda xx: (L.forward(lcfg, hp, xx, pos),
                                     L.forward(dataclasses.replace(lcfg, window=30), hp, xx, pos)))(x)
    assert float(jnp.max(jnp.abs(wide - full))) > 1e-3
    step = jax.jit(lambda c, xx, p, v: L.cached_step(lcfg, hp, c, xx, p, v))
    cache = L.empty_cache(lcfg, 2)
    outs, p0 = [], 0
    for n in [1, 3, 4, 2, 4, 1, 4, 3, 4, 4, 2, 4, 4]:
        pos = jnp.broadcast_to(jnp.arange(p0, p0 + 4), (2, 4))
        valid = jnp.broadcast_to(jnp.arange(4) < n, (2, 4))
        junk = jnp.asarray(rng.normal(size=(2, 4, V)), jnp.float32)
        _, cache = step(cache, junk, pos, jnp.ones((2, 4), bool))  # a rejected draft at these positions
        xx = jax.lax.dynamic_slice_in_dim(jnp.pad(x, ((0, 0), (0, 4), (0, 0))), p0, 4, axis=1)
        o, cache = step(cache, xx, pos, valid)
        outs.append(o[:, :n])
        p0 += n
    assert p0 == t
    got = jnp.concatenate(outs, axis=1)
    assert float(jnp.max(jnp.abs(got - full))) < 1e-4
    assert cache.k.shape[1] == lcfg.slots == 2 + 6 + 3 + 1


def test_draft_memory_is_constant_in_the_prompt_length(toy):
    """`LongSpecDrafter.init` for 12-token and 400-token prompts: every array of the draft state has the same
    shape, and the 400-token cache holds exactly the sinks and the newest ring positions (the committed
    positions are 0..398); the engine's target cache for the same prompts grows (the control)."""
    from jaxdec.cache.kv import rollback
    model, params = toy["model"], toy["params"]
    dec, pp = L.build(model, params, toy["heads"], target=FP)
    c = dec.drafter.config
    shapes, sizes = [], []
    for p in (12, 400):
        prompts = jnp.asarray(np.random.default_rng(p).integers(0, V, size=(2, p)), jnp.int32)
        lens = jnp.asarray([p, p - 3], jnp.int32)
        def init(pr, ln):  # the engine's prefilled target cache, then the drafter's init
            pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), pr.shape)
            tc = rollback(model(params, pr, pos, model.init_cache(2, p + MAX_NEW)).cache, ln)
            return dec.drafter.init(model, pp["draft"], pr, ln, types.SimpleNamespace(last=pr[:, -1], cache=tc), None)

        ds = jax.jit(init)(prompts, lens)
        shapes.append([x.shape for x in jax.tree.leaves(ds)])
        sizes.append(model.init_cache(2, p + MAX_NEW).k.shape)
        if p == 400:
            for row, n in enumerate((399, 396)):
                want = set(range(c.sinks)) | set(range(n - c.ring, n))
                assert set(np.asarray(ds.cache.pos[row]).tolist()) == want, row
    assert shapes[0] == shapes[1]
    assert sizes[0] != sizes[1]


def test_anchor_offset_positions():
    c = L.LongSpecConfig(hidden=8, draft_vocab=4, num_heads=2, num_kv_heads=1, head_dim=4, sinks=3)
    pos = np.asarray(L.anchor_offset_positions(c, jax.random.key(0), 64, 10, 5000))
    assert (pos[:, :3] == np.arange(3)).all()
    off = pos[:, 3:] - np.arange(3, 10)
    assert (off == off[:, :1]).all() and off.min() >= 0 and off.max() <= 4990  # one offset per row
    assert len(np.unique(off[:, 0])) > 50  # drawn, not fixed
    assert (np.asarray(L.anchor_offset_positions(c, jax.random.key(0), 4, 10, 0)) == np.arange(10)).all()


def _key_in_sink_task(n, seed, k_keys=4, t=32):
    """Sequences whose every other token needs the first one: ``[k, r1, perm_k[r1], r2, perm_k[r2], ...]`` with
    a key k < 4 and random r >= 4 (12 values): predicting ``perm_k[r]`` from ``(x_t, r)`` needs k, which only
    the sink (position 0) holds once the window is one position."""
    perms = [4 + np.random.default_rng(100 + k).permutation(V - 4) for k in range(k_keys)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(0, k_keys))
        s = [k]
        while len(s) < t:
            r = int(rng.integers(4, V))
            s += [r, int(perms[k][r - 4])]
        out.append(s[:t])
    return np.asarray(out, np.int32)


def test_anchor_offsets_keep_the_draft_accurate_at_long_positions():
    """The anchor-offset indices do what LongSpec trains them for: on a task whose answer sits in the sink
    (`_key_in_sink_task`, window 1, 1 sink), a draft trained on 32-token sequences with offsets up to 4000 keeps
    its accuracy when run at positions ~3000 (the sink 3000 positions back), while the same draft trained on
    plain positions 0..31 (the control) reaches the same accuracy at its training positions and loses it there."""
    import optax
    from jaxdec.speculative.heads.medusa import draft_head
    from jaxdec.testing.toy_speculative import TrigramModel
    model, tp = TrigramModel(V), {"table": jnp.zeros((V, V, V)), "embed": jnp.eye(V)}
    c = L.LongSpecConfig(hidden=V, draft_vocab=V, num_heads=2, num_kv_heads=1, head_dim=8, intermediate=32,
                         rope_theta=1e4, num_tokens=3, window=1, sinks=1)
    steps, b, t = 300, 16, 32
    n = t - 2
    data = jnp.asarray(_key_in_sink_task(steps * b, 0)).reshape(steps, b, t)
    test = _key_in_sink_task(64, 1)
    head_w = draft_head(model, tp, np.arange(V))
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    sel = (np.arange(n) % 2 == 0) & (np.arange(n) >= 2)  # the positions whose label needs the sink
    tx = optax.adam(0.01)

    def logits(hp, toks, rope):
        x = L.draft_inputs(hp, model, tp, jax.nn.one_hot(toks[:, :n], V), toks[:, 1:n + 1])
        return L.head_scores(L.forward(c, hp, x, rope, jnp.broadcast_to(idx[:1], rope.shape)), head_w)

    def loss(hp, toks, rope):
        lg = logits(hp, toks, rope)
        return jnp.mean(jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, toks[:, 2:, None], -1)[..., 0])

    @jax.jit
    def train(ropes):  # one compile for both runs: the positions are data
        def step(carry, xs):
            hp, st = carry
            up, st = tx.update(jax.grad(loss)(hp, *xs), st, hp)
            return (optax.apply_updates(hp, up), st), None
        hp0 = L.init_params(c, 0)
        return jax.lax.scan(step, (hp0, tx.init(hp0)), (data, ropes))[0][0]

    keys = jax.random.split(jax.random.key(1), steps)
    anchored = train(jax.vmap(lambda k: L.anchor_offset_positions(c, k, b, n, 4000))(keys))
    plain = train(jnp.broadcast_to(idx, (steps, b, n)))
    eval_fn = jax.jit(lambda hp, off: jnp.argmax(logits(hp, jnp.asarray(test), jnp.where(
        idx[:1] < c.sinks, idx[:1], idx[:1] + off) + jnp.zeros((len(test), 1), jnp.int32)), -1))

    def accuracy(hp, offset):
        pred = np.asarray(eval_fn(hp, offset))
        return float(np.mean(pred[:, sel] == test[:, 2:][:, sel]))

    acc = {(name, off): accuracy(hp, off) for name, hp in (("anchored", anchored), ("plain", plain))
           for off in (0, 3000)}
    assert acc["anchored", 0] > 0.9 and acc["plain", 0] > 0.9, acc  # both learnt the task at short positions
    assert acc["anchored", 3000] > 0.9, acc
    assert acc["plain", 3000] < acc["anchored", 3000] - 0.1, acc


def test_interrupted_and_resumed_run_is_bit_identical(toy, tmp_path):
    from train.longspec import train_longspec
    run = tmp_path / "run"
    shutil.copytree(toy["cfg"].out, run)
    shutil.rmtree(run / "checkpoints" / "20")
    os.remove(run / "heads.safetensors")
    cfg = dataclasses.replace(toy["cfg"], out=str(run))
    res, path = train_longspec(cfg, toy["model"], toy["params"], toy["seqs"], toy["plens"], FP, target_name="toy",
                               command="pytest", log=lambda *a: None)
    assert res.resumed_from == 10
    assert tree_hash(res.params) == tree_hash(toy["res"].params)
    assert tree_hash(read_heads(path, "longspec")[0]) == tree_hash(read_heads(toy["heads"], "longspec")[0])
    assert tree_hash(res.params) != tree_hash(L.init_params(res.longspec_config, 0))  # control
    with pytest.raises(ConfigError, match="--lr was 0.03"):
        train_longspec(dataclasses.replace(cfg, lr=0.1), toy["model"], toy["params"], toy["seqs"], toy["plens"], FP,
                       log=lambda *a: None)


def test_heads_file_and_bad_input(toy, tmp_path):
    model, params, path = toy["model"], toy["params"], toy["heads"]
    hp, meta = read_heads(path, "longspec")
    for k in ("fingerprint", "command", "data_tokens", "data_examples", "commit", "wall_s", "config", "steps"):
        assert k in meta, k
    assert meta["kind"] == "longspec" and meta["fingerprint"] == FP and hp["d2t"].shape == (12,)
    assert meta["config"]["window"] == 6 and meta["config"]["sinks"] == 2
    with pytest.raises(HeadsMismatch, match="another target"):
        L.build(model, params, path, target="sha256:" + "cd" * 32)
    other = save_heads(str(tmp_path / "medusa.safetensors"), "medusa", {"w": np.zeros(2)}, {}, FP)
    with pytest.raises(ValueError, match="holds 'medusa' heads, expected 'longspec'"):
        L.build(model, params, other, target=FP)
    blob = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        L.build(model, params, str(cut), target=FP)
    bad = {**jax.device_get(toy["res"].params), "d2t": toy["res"].d2t, "wo": np.zeros((V, 3), np.float32)}
    badp = save_heads(str(tmp_path / "bad.safetensors"), "longspec", bad, meta["config"], FP)
    with pytest.raises(ValueError, match=r"wo has shape \(16, 3\)"):
        L.build(model, params, badp, target=FP)
    badc = save_heads(str(tmp_path / "badc.safetensors"), "longspec", bad, {**meta["config"], "window": 0}, FP)
    with pytest.raises(ValueError, match="bad longspec config.*window"):
        L.build(model, params, badc, target=FP)
    lcfg, d2t = toy["res"].longspec_config, toy["res"].d2t
    with pytest.raises(ValueError, match="d2t must be 12 token ids"):
        L.build(model, params, (lcfg, toy["res"].params, np.full((12,), V, np.int32)))
    with pytest.raises(TypeError, match="heads must be a heads file path"):
        L.build(model, params, {"fc": 1})
    for kw, needle in ((dict(window=0), "window must be an integer >= 1"), (dict(sinks=-1), "sinks"),
                       (dict(num_kv_heads=3), "num_kv_heads"), (dict(head_dim=3), "head_dim must be even"),
                       (dict(rope_theta=0.0), "rope_theta")):
        with pytest.raises(ValueError, match=needle):
            dataclasses.replace(lcfg, **kw)
    assert L.LongSpecConfig.from_dict(lcfg.to_dict()) == lcfg
    with pytest.raises(ValueError, match="longspec config must be a dict"):
        L.LongSpecConfig.from_dict({"hidden": 16})


def test_training_flags_and_bad_values_exit_2(capsys):
    from train.harness import config_from_args
    from train.longspec import LongSpecTrainConfig
    c = config_from_args(LongSpecTrainConfig, ["--steps", "7", "--window", "64", "--sinks", "2", "--max-offset", "0"])
    assert (c.steps, c.window, c.sinks, c.max_offset) == (7, 64, 2, 0)
    for argv, needle in ((["--window", "0"], "--window"), (["--sinks", "-1"], "--sinks must be"),
                         (["--max-offset", "-5"], "--max-offset must be"), (["--seq-len", "2"], "--seq-len")):
        with pytest.raises(SystemExit) as e:
            config_from_args(LongSpecTrainConfig, argv)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err


# --------------------------------------------------------------------------- default model (slow)

def _shipped():
    from jaxdec.speculative.heads import shipped_path
    p = shipped_path(L.KIND, "smollm2-135m")
    assert os.path.isfile(p), f"no longspec draft shipped ({p}: python -m train.longspec --export {p})"
    return p


@pytest.fixture(scope="module")
def long_target(model_q, gguf_path):
    """The default model (q weights), the first 8 of the 13 RAPID held-out long prompts (chat template; 2.2k-4.7k
    tokens, ~10 min of prefill per pass over all 13 on this 2-core machine) and their greedy reference (32 new
    tokens, batch 4)."""
    import peer
    from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits
    from jaxdec.speculative.rapid import heldout_prompts
    model, params = model_q
    prompts = [peer.peer_chat_ids(r["prompt"]) for r in heldout_prompts()[:8]]
    ref = jaxdec.generate(model, params, prompts, max_new_tokens=32, batch_size=4)
    return {"model": model, "params": params, "prompts": prompts, "ref": ref, "path": gguf_path,
            "logits": lazy_teacher_logits(model, params, prompts, ref.tokens),
            "dlogit": lazy_block_vs_step_dlogit(model, params, prompts[0], 16)}


@pytest.mark.slow
def test_shipped_file_provenance_and_size(gguf_path):
    from test_heads_shipped import shipped_provenance
    hp, meta = shipped_provenance("longspec", "train.longspec", gguf_path)
    assert meta["anchor_offset"] > 0


@pytest.mark.slow
def test_shipped_longspec_lossless_on_long_prompts(long_target):
    """Batch 4 (ragged) and batch 1 over 8 held-out long prompts: the greedy tokens (near-tie rule); τ printed,
    above 1.1 (a drafter that never proposes, or whose drafts are never accepted, has τ 1.0)."""
    import time
    import neartie
    t = long_target
    lens = [len(p) for p in t["prompts"]]
    assert len(lens) >= 8 and min(lens) >= 2000 and len(set(lens)) == len(lens), lens
    dec, params = L.build(t["model"], t["params"], _shipped(), target=t["path"])
    pairs, stats = [], {}
    for bs in (4, 1):
        t0 = time.perf_counter()
        out = jaxdec.generate(t["model"], params, t["prompts"], decoder=dec, max_new_tokens=32, batch_size=bs)
        pairs += [(f"longspec b{bs} prompt {i}", o, r, lg) for i, (o, r, lg) in
                  enumerate(zip(out.tokens, t["ref"].tokens, t["logits"]))]
        stats[bs] = (out.stats["tau"], out.stats["acceptance_per_position"], time.perf_counter() - t0)
    neartie.assert_sequences_match(pairs, t["dlogit"])
    print(f"longspec long prompts ({lens} tokens): τ, acceptance per position, wall s (compile included): {stats}")
    assert min(v[0] for v in stats.values()) > 1.1, stats
