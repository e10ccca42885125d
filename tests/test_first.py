"""FiRST (#21 item 5, `jaxdec.layerskip.first`): routers trained on a tiny config (loss falls, checkpoint
round trip), and on the default model: all-keep routers give plain greedy token for token, a forced
skip set matches a teacher-forced block forward with its mask (CI) and a layer-by-layer reference (slow),
and the skip set is decided once and stays fixed at every step."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec.core.generate import generate
from jaxdec.layerskip.first import (features, first_generate, forced_routers, gated_logits, keep_prob,
                                    load_routers)
from neartie import assert_sequences_match

# the tiny random Llama of the EAD tests (4 layers), shared rather than rebuilt
from test_search_ead import L, V, tiny  # noqa: E402,F401,F811


def test_gated_forward_matches_the_layer_mask(tiny):
    """The training forward (gates scale each layer's residual update; a scan of the model cut to one
    layer) equals the model's own ``layers=`` forward at gates 1 and at a 0/1 skip pattern."""
    model, params = tiny
    ids = jnp.asarray(np.random.default_rng(1).integers(1, V, (2, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    fwd = jax.jit(lambda on: model(params, ids, pos, model.init_cache(2, 12), layers=on).logits)
    gated = jax.jit(lambda g: gated_logits(model, params, ids, g))
    for on in ([1, 1, 1, 1], [0, 1, 1, 0]):
        ref = fwd(jnp.asarray(on, bool))
        got = gated(jnp.broadcast_to(jnp.asarray(on, jnp.float32), (2, L)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)
    # half a gate is between the two (a real interpolation, not a switch)
    half = gated(jnp.full((2, L), 0.5))
    assert not np.allclose(np.asarray(half), np.asarray(ref), atol=1e-3)


def test_routers_train_loss_falls_and_checkpoint_round_trips(tiny, tmp_path):
    from train.first_routers import FirstTrainConfig, train_routers
    from train.harness import _manager, restore_checkpoint, tree_hash
    model, params = tiny
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, V, int(rng.integers(4, 9))).tolist() for _ in range(12)]
    g = generate(model, params, prompts, max_new_tokens=8, stop_ids=[])
    seqs = [p + t for p, t in zip(prompts, g.tokens)]
    cfg = FirstTrainConfig(out=str(tmp_path / "run"), steps=20, batch_size=4, lr=0.05, warmup=2, seq_len=16,
                           rank=4, lam=1.0, save_every=20, eval_every=20, eval_batches=1, log_every=1,
                           progress=False, eval_fraction=0.2)
    res, path = train_routers(cfg, model, params, seqs, [len(p) for p in prompts], fingerprint="tiny",
                              log=lambda *a: None)
    losses = [r["loss"] for r in res.records if r["kind"] == "train"]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    keep = [r["keep_frac"] for r in res.records if r["kind"] == "train"]
    assert keep[-1] < keep[0]  # the latency penalty pushes gates towards skipping
    # orbax round trip: the latest checkpoint restores to bit-identical params, and so does routers.npz
    state, meta = restore_checkpoint(_manager(cfg.out, cfg), res.state)
    assert int(state.step) == 20 and meta["fingerprint"] == "tiny"
    assert tree_hash(state.params) == tree_hash(res.params)
    loaded, rmeta = load_routers(path)
    assert tree_hash(loaded) == tree_hash(jax.device_get(res.params))
    assert rmeta["config"]["lam"] == 1.0
    # the routers depend on their input: different prompts get different keep probabilities
    ids = np.zeros((2, 4), np.int32)
    ids[0], ids[1] = prompts[0][:4], prompts[1][:4]
    p = np.asarray(keep_prob(loaded, features(model, params, ids, np.array([4, 4]))))
    assert p.shape == (2, L) and not np.allclose(p[0], p[1])


def test_bad_router_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="router file"):
        load_routers(str(tmp_path / "none.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, w1=np.zeros(1))
    with pytest.raises(ValueError, match="not a FiRST router file"):
        load_routers(str(bad))


# ------------------------------------------------------------------------------------ default model

def _prompts(ids, k=2):
    return [list(x) for x in ids[:k]]


def test_all_keep_equals_greedy(model_f32, chat_prompt_ids):
    model, params = model_f32
    prompts = _prompts(chat_prompt_ids)
    ref = generate(model, params, prompts, max_new_tokens=24, batch_size=2)
    keep = forced_routers(model.num_layers, model.config.hidden_size, ())
    got = first_generate(model, params, prompts, keep, max_new_tokens=24, batch_size=2)
    assert got.tokens == ref.tokens
    assert got.stats["layers_skipped"] == [] and got.stats["mean_layers_skipped"] == 0.0


SKIP = (9, 14, 20, 29)  # includes the last layer: the reference must still advance the cache


@functools.lru_cache(maxsize=None)
def _ref_step(model, keep):
    """One token of the reference: the kept layers one by one (``layer_range``), skipped ones left out."""
    from jaxdec.cache.kv import rollback
    from jaxdec.models.llama import rms_norm
    from jaxdec.quant import matmul

    @jax.jit
    def step(params, tok, pos, cache):
        h = model.embed(params, tok[:, None]).astype(jnp.float32)
        p = pos[:, None]
        lengths = cache.lengths
        for l in keep:
            out = model(params, None, p, cache, layer_range=(l, l + 1), hidden_in=h,
                        logits_at=jnp.zeros((1, 1), jnp.int32))
            h, cache = out.residual, out.cache
        cache = rollback(cache, lengths + 1)
        h = rms_norm(h, params["final_norm"], model.config.rms_norm_eps)
        return matmul(h, params["lm_head"] if "lm_head" in params else params["embed"])[:, 0], cache
    return step


def _reference(model, params, prompt, skip, n):
    """Greedy tokens and step logits: full-model prefill, then only the kept layers per token."""
    keep = tuple(l for l in range(model.num_layers) if l not in skip)
    step = _ref_step(model, keep)
    p = len(prompt)
    cache = model.init_cache(1, p + n + 1)
    out = model(params, jnp.asarray([prompt], jnp.int32), jnp.arange(p)[None], cache,
                logits_at=jnp.asarray([[p - 1]], jnp.int32))
    logits, cache = out.logits[:, 0], out.cache
    toks, step_logits = [], []
    for i in range(n):
        step_logits.append(np.asarray(logits[0]))
        toks.append(int(np.argmax(step_logits[-1])))
        logits, cache = step(params, jnp.asarray([toks[-1]], jnp.int32), jnp.asarray([p + i], jnp.int32), cache)
    return toks, step_logits


@functools.lru_cache(maxsize=None)
def _block_fn(model):
    @jax.jit
    def block(params, prompt, cont, keep):
        """Full prefill, then the continuation as ONE cached block through the kept layers (teacher forced):
        the logits that chose each continuation token."""
        p, n = prompt.shape[1], cont.shape[1]
        out = model(params, prompt, jnp.arange(p)[None], model.init_cache(1, p + n))
        blk = model(params, cont, p + jnp.arange(n)[None], out.cache, layers=keep)
        return jnp.concatenate([out.logits[:, -1:], blk.logits[:, :-1]], axis=1)[0]
    return block


def test_forced_skip_is_fixed_and_matches_the_block_forward(model_f32, chat_prompt_ids):
    """A forced skip set: every decode step of every batch runs the same mask (decided once), the text
    differs from greedy (lossy, so the check can see a skip), and each token is the argmax of a
    teacher-forced forward of the whole continuation as one block with the same mask (another path:
    block attention over the cache, not the token loop)."""
    model, params = model_f32
    prompts = _prompts(chat_prompt_ids)
    n = 12
    routers = forced_routers(model.num_layers, model.config.hidden_size, SKIP)
    seen = []
    got = first_generate(model, params, prompts, routers, max_new_tokens=n, stop_ids=[], batch_size=1, debug=True,
                         callback=lambda st: seen.append(np.asarray(st.method.keep)))
    assert got.stats["layers_skipped"] == list(SKIP) and got.stats["batches"] == 2
    want = np.ones(model.num_layers, bool)
    want[list(SKIP)] = False
    assert len(seen) >= 2 * (n - 1) and all(np.array_equal(k, want) for k in seen)
    plain = generate(model, params, prompts, max_new_tokens=n, stop_ids=[], batch_size=2)
    assert got.tokens != plain.tokens
    block = _block_fn(model)
    pairs = []
    for i, (pr, toks) in enumerate(zip(prompts, got.tokens)):
        lg = np.asarray(block(params, jnp.asarray([pr]), jnp.asarray([toks]), jnp.asarray(want)))
        pairs.append((f"prompt {i}", toks, lg.argmax(-1).tolist(), lg))
    assert_sequences_match(pairs, max_dlogit=1e-4, max_excused_frac=0.5)
    # a wrong mask is caught: the same check against the all-layers block fails somewhere
    lg = np.asarray(block(params, jnp.asarray([prompts[0]]), jnp.asarray([got.tokens[0]]),
                          jnp.ones(model.num_layers, bool)))
    assert lg.argmax(-1).tolist() != got.tokens[0]


@pytest.mark.slow
def test_forced_skip_equals_layer_by_layer_reference(model_f32, chat_prompt_ids):
    model, params = model_f32
    prompts = _prompts(chat_prompt_ids)
    n = 16
    routers = forced_routers(model.num_layers, model.config.hidden_size, SKIP)
    got = first_generate(model, params, prompts, routers, max_new_tokens=n, stop_ids=[], batch_size=1)
    pairs = []
    for i, pr in enumerate(prompts):
        toks, lg = _reference(model, params, pr, SKIP, n)
        pairs.append((f"prompt {i}", got.tokens[i], toks, lg))
    assert_sequences_match(pairs, max_dlogit=1e-4, max_excused_frac=0.5)
