"""Model inputs and outputs beyond token ids (issue #10, part 3), against independent references.

* ``embeds=``: `model.embed` of known ids fed as ``embeds`` gives exactly the token path (f32 and the
  Q8_0-stored table); arbitrary input vectors give the HF peer's ``inputs_embeds`` logits.
* ``attention=``: an explicit ``[B,T,S+T]`` mask in `attend` equals a plain NumPy softmax reference
  (GQA, ragged lengths, sliding window, fully masked queries); in the model, an explicit mask over
  cache slots equals the uncached call with the same visibility; "bidirectional" equals the peer run
  with an all-ones 4-D attention mask (negative control: the causal logits differ).
* ``hidden_layers=``: the chosen layers' residuals equal those rows of the full ``[L+1]`` stack, and
  the traced program holds a ``[k,B,T,E]`` array and no ``[L,...]``/``[L+1,...]`` hidden stack.
* ``layer_range=`` + ``hidden_in=``: ``[0, a)`` then ``[a, L)`` equals the full call (logits, hidden,
  cache), with ragged rows; ``(0, b)`` alone is early exit (the ``layers`` mask with the rest off).
* ``truncate``: the truncated model equals the first layers of the full one; `truncated_draft` and
  superposed decoding go through the protocol and refuse, by name, a model without the member.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peer
from jaxdec.attention.reference import attend

PROMPT = "The quick brown fox jumps over the lazy dog."


def _ids():
    return peer.peer_tokenizer()(PROMPT, add_special_tokens=False)["input_ids"]


def _close_to_peer(ours, ref, what):
    for pos in range(ref.shape[0]):
        bound = 1e-4 * np.abs(ref[pos]).max()
        d = np.abs(ours[pos] - ref[pos]).max()
        assert d <= bound, f"{what} position {pos}: max|dlogit| {d:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def small_f32(model_f32):
    """The default model's first 6 layers: properties that do not need all 30 compile and run faster."""
    model, params = model_f32
    return model.truncate(params, 6)


@pytest.fixture(scope="module")
def small_q(model_q):
    model, params = model_q
    return model.truncate(params, 6)


def _ragged_block(model, params, batch_prompts, t_new, size=32, seed=0):
    """Prefill right-padded prompts of different lengths; returns (cache, new tokens [B,T], positions)."""
    from jaxdec.core.steps import prefill
    lens = np.array([len(p) for p in batch_prompts], np.int32)
    width = int(lens.max())
    toks = np.array([p + [2] * (width - len(p)) for p in batch_prompts], np.int32)
    cache = model.init_cache(len(batch_prompts), size)
    _, cache, _ = jax.jit(lambda p, c: prefill(model, p, jnp.asarray(toks), jnp.asarray(lens), c))(params, cache)
    rng = np.random.default_rng(seed)
    new = jnp.asarray(rng.integers(3, 1000, (len(batch_prompts), t_new)), jnp.int32)
    pos = jnp.asarray(lens[:, None] + np.arange(t_new)[None], jnp.int32)
    return cache, new, pos


@pytest.fixture(scope="module")
def ragged(small_f32, small_q):
    """weights -> (model, params, cache holding two prompts of lengths 11 and 4, a 3-token block, positions)."""
    out = {}
    for w, (model, params) in (("f32", small_f32), ("q", small_q)):
        out[w] = (model, params) + _ragged_block(model, params, [_ids(), _ids()[:4]], 3)
    return out


# ------------------------------------------------------------------------------------ embeds
@pytest.mark.parametrize("weights", ["f32", "q"])
def test_embeds_of_ids_equal_token_path_exactly(weights, ragged):
    model, params, cache, new, pos = ragged[weights]

    @jax.jit
    def both(params, cache):
        a = model(params, new, pos, cache)
        b = model(params, None, pos, cache, embeds=model.embed(params, new))
        return a, b

    a, b = both(params, cache)
    assert model.embed(params, new).shape == new.shape + (model.config.hidden_size,)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    np.testing.assert_array_equal(np.asarray(a.hidden), np.asarray(b.hidden))
    np.testing.assert_array_equal(np.asarray(a.cache.k), np.asarray(b.cache.k))
    np.testing.assert_array_equal(np.asarray(a.cache.lengths), np.asarray(b.cache.lengths))


def test_embeds_equal_peer_inputs_embeds(model_f32):
    """Arbitrary vectors (the last three positions are mixtures of two token rows) give the peer's
    logits on the same vectors built from the peer's own embedding table, at every position."""
    import torch
    model, params = model_f32
    ids = _ids()
    t = len(ids)
    rng = np.random.default_rng(3)
    other = rng.integers(3, 40000, t)
    mix = np.where(np.arange(t) >= t - 3, 0.6, 1.0).astype(np.float32)

    @jax.jit
    def ours(params):
        e = mix[:, None] * model.embed(params, jnp.asarray(ids)) + (1 - mix)[:, None] * model.embed(params, jnp.asarray(other))
        return model(params, None, jnp.arange(t)[None], model.init_cache(1, t), embeds=e[None]).logits[0]

    hf = peer.peer_model()
    with torch.no_grad():
        table = hf.get_input_embeddings().weight
        w = torch.tensor(mix)[:, None]
        x = w * table[torch.tensor(ids)] + (1 - w) * table[torch.tensor(other.tolist())]
        ref = hf(inputs_embeds=x[None]).logits[0].numpy()
    got = np.asarray(ours(params))
    _close_to_peer(got, ref, "embeds")
    # negative control: the plain token logits differ at the mixed positions
    plain = peer.peer_logits(ids)
    assert np.abs(plain[-1] - ref[-1]).max() > 100 * 1e-4 * np.abs(ref[-1]).max()


# ------------------------------------------------------------------------------------ attention
def _np_attend(q, kc, vc, lengths, kn, vn, full, q_pos, window=None):
    """Plain softmax attention over [cache slots ; block keys] with the explicit visibility ``full``."""
    q, kc, vc, kn, vn = (np.asarray(a, np.float64) for a in (q, kc, vc, kn, vn))
    b, t, h, d = q.shape
    s, kvh = kc.shape[1], kc.shape[2]
    keys = np.concatenate([kc, kn], 1)
    vals = np.concatenate([vc, vn], 1)
    kpos = np.concatenate([np.broadcast_to(np.arange(s), (b, s)), np.asarray(q_pos)], 1)  # [B,S+T]
    vis = np.array(full, bool).copy()
    vis[:, :, :s] &= np.arange(s)[None, None, :] < np.asarray(lengths)[:, None, None]
    if window is not None:
        vis &= (np.asarray(q_pos)[:, :, None] - kpos[:, None, :]) < window
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for i in range(t):
            for hh in range(h):
                kv = hh // (h // kvh)
                sc = keys[bi, :, kv] @ q[bi, i, hh] * d ** -0.5
                m = vis[bi, i]
                if not m.any():
                    continue
                p = np.exp(sc[m] - sc[m].max())
                out[bi, i, hh] = (p / p.sum()) @ vals[bi, m, kv]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_attend_explicit_mask_equals_numpy_reference(window):
    rng = np.random.default_rng(7)
    b, t, s, h, kvh, d = 3, 4, 9, 6, 2, 8
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    kc, vc = (rng.normal(size=(b, s, kvh, d)).astype(np.float32) for _ in range(2))
    kn, vn = (rng.normal(size=(b, t, kvh, d)).astype(np.float32) for _ in range(2))
    lengths = np.array([9, 4, 0], np.int32)
    q_pos = lengths[:, None] + np.arange(t)[None]
    full = rng.random((b, t, s + t)) < 0.6
    full[1, 2] = False  # a query that sees nothing outputs zeros
    full[2, 0, s:] = False  # row 2 has an empty cache: its first query sees nothing either
    got = attend(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(lengths), jnp.asarray(kn),
                 jnp.asarray(vn), jnp.asarray(full[:, :, s:]), jnp.asarray(q_pos), sliding_window=window,
                 cache_mask=jnp.asarray(full[:, :, :s]))
    ref = _np_attend(q, kc, vc, lengths, kn, vn, full, q_pos, window)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert not np.asarray(got)[1, 2].any() and not np.asarray(got)[2, 0].any()
    # an all-visible cache mask is the plain call
    plain = attend(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(lengths), jnp.asarray(kn),
                   jnp.asarray(vn), jnp.asarray(full[:, :, s:]), jnp.asarray(q_pos), sliding_window=window)
    ones = attend(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(lengths), jnp.asarray(kn),
                  jnp.asarray(vn), jnp.asarray(full[:, :, s:]), jnp.asarray(q_pos), sliding_window=window,
                  cache_mask=jnp.ones((b, t, s), bool))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(ones))


def test_model_explicit_mask_over_cache_equals_uncached_call(small_f32):
    """Prefix of P tokens in the cache, then a block of T whose explicit mask hides cache slot 2 and
    lays the block out as a tree: equals one uncached call over all P+T tokens with the same visibility."""
    model, params = small_f32
    ids = _ids()[:10]
    p, t, s = 6, 4, 16
    tree = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], bool)
    full_mask = np.tril(np.ones((p + t, p + t), bool))
    full_mask[p:, 2] = False
    full_mask[p:, p:] = tree
    explicit = np.zeros((1, t, s + t), bool)
    explicit[0, :, :p] = True
    explicit[0, :, 2] = False
    explicit[0, :, 9] = True  # a slot past the committed length: still invisible
    explicit[0, :, s:] = tree
    seq = jnp.asarray([ids])

    @jax.jit
    def run(params):
        ref = model(params, seq, jnp.arange(p + t)[None], model.init_cache(1, p + t), mask=jnp.asarray(full_mask)[None])
        c = model(params, seq[:, :p], jnp.arange(p)[None], model.init_cache(1, s)).cache
        got = model(params, seq[:, p:], jnp.arange(p, p + t)[None], c, attention=jnp.asarray(explicit))
        causal = np.zeros((1, t, s + t), bool)
        causal[0, :, :s] = True
        causal[0, :, s:] = np.tril(np.ones((t, t), bool))
        default = model(params, seq[:, p:], jnp.arange(p, p + t)[None], c)
        as_mask = model(params, seq[:, p:], jnp.arange(p, p + t)[None], c, attention=jnp.asarray(causal))
        return ref.logits[0, p:], got.logits[0], default.logits, as_mask.logits, got.cache.lengths

    ref, got, default, as_mask, lengths = (np.asarray(a) for a in run(params))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(as_mask, default, rtol=1e-6, atol=1e-6 * np.abs(default).max())
    assert lengths.tolist() == [p + t]
    assert np.abs(got - default[0]).max() > 1e-2  # the mask did change what the block saw


def test_bidirectional_equals_peer_with_all_ones_4d_mask(model_f32):
    import torch
    model, params = model_f32
    ids = _ids()[:8]
    t = len(ids)
    run = jax.jit(lambda p, attention: model(p, jnp.asarray([ids]), jnp.arange(t)[None], model.init_cache(1, t),
                                             attention=attention).logits[0], static_argnums=1)
    got = np.asarray(run(params, "bidirectional"))
    causal = np.asarray(run(params, "causal"))
    hf = peer.peer_model()
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), attention_mask=torch.ones((1, 1, t, t), dtype=torch.bool)).logits[0].numpy()
    _close_to_peer(got, ref, "bidirectional")
    # negative control: causal attention gives other logits (the first position sees only itself)
    assert np.abs(causal[0] - ref[0]).max() > 100 * 1e-4 * np.abs(ref[0]).max()


def test_bad_attention_arguments(small_f32):
    model, params = small_f32
    c = model.init_cache(1, 8)
    toks, pos = jnp.zeros((1, 2), jnp.int32), jnp.arange(2)[None]
    with pytest.raises(ValueError, match="attention must be"):
        model(params, toks, pos, c, attention="sideways")
    with pytest.raises(ValueError, match="bidirectional"):
        model(params, toks, pos, c, attention="bidirectional", mask=jnp.ones((1, 2, 2), bool))
    with pytest.raises(ValueError, match="S\\+T"):
        model(params, toks, pos, c, attention=jnp.ones((1, 2, 2), bool))
    with pytest.raises(ValueError, match="xla"):
        model.with_attention("pallas")(params, toks, pos, c, attention=jnp.ones((1, 2, 10), bool))
    with pytest.raises(ValueError, match="exactly one"):
        model(params, toks, pos, c, embeds=model.embed(params, toks))
    with pytest.raises(ValueError, match="exactly one"):
        model(params, None, pos, c)


# ------------------------------------------------------------------------------------ hidden states
def test_hidden_layers_equal_full_stack_rows(ragged):
    model, params, cache, new, pos = ragged["f32"]

    @jax.jit
    def run(params, cache):
        full = model(params, new, pos, cache, return_layer_hidden=True)
        some = model(params, new, pos, cache, hidden_layers=(5, 0, 2, 5, 6))
        mid = model(params, new, pos, cache, layer_range=(0, 2))
        rng = model(params, None, pos, mid.cache, layer_range=(2, 6), hidden_in=mid.residual, hidden_layers=(2, 4, 6))
        return full, some, rng

    full, some, rng = run(params, cache)
    stack = np.asarray(full.layer_hidden)
    assert stack.shape[0] == 7 and some.layer_hidden.shape == (5,) + stack.shape[1:]
    np.testing.assert_allclose(np.asarray(some.layer_hidden), stack[[5, 0, 2, 5, 6]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rng.layer_hidden), stack[[2, 4, 6]], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(some.logits), np.asarray(full.logits))


def test_hidden_layers_trace_only_the_chosen_layers(model_f32):
    """EAGLE-3's low/middle/high layers of the 30: the jaxpr holds [3,B,T,E] and no 30/31-layer stack."""
    model, params = model_f32
    b, t, e = 2, 5, model.config.hidden_size
    toks, pos = jnp.zeros((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t))
    cache = model.init_cache(b, 16)
    text = str(jax.make_jaxpr(lambda p, c: model(p, toks, pos, c, hidden_layers=(2, 15, 28)).layer_hidden)(params, cache))
    assert f"f32[3,{b},{t},{e}]" in text
    for n in (30, 31):
        assert f"f32[{n},{b},{t},{e}]" not in text
    # positive control: the full stack is visible to the same check
    full = str(jax.make_jaxpr(lambda p, c: model(p, toks, pos, c, return_layer_hidden=True).layer_hidden)(params, cache))
    assert f"f32[31,{b},{t},{e}]" in full


@pytest.mark.parametrize("weights", ["f32", "q"])
def test_layer_range_split_equals_full_call(weights, ragged):
    """f32: two- and three-way splits and early exit; q (block-quantized stacks read in place at the
    range's absolute layer indices): the two-way split."""
    model, params, cache, new, pos = ragged[weights]
    n = model.num_layers

    @jax.jit
    def run(params, cache):
        full = model(params, new, pos, cache)
        a = model(params, new, pos, cache, layer_range=(0, 2))
        splits = [model(params, None, pos, a.cache, layer_range=(2, n), hidden_in=a.residual)]
        if weights == "q":
            return full, a, splits, None, None
        b1 = model(params, None, pos, a.cache, layer_range=(2, 5), hidden_in=a.residual)
        splits.append(model(params, None, pos, b1.cache, layer_range=(5, n), hidden_in=b1.residual))
        early = model(params, new, pos, cache, layer_range=(0, 4))
        skip = model(params, new, pos, cache, layers=jnp.arange(n) < 4)
        return full, a, splits, early, skip

    full, a, splits, early, skip = run(params, cache)
    assert np.asarray(a.cache.lengths).tolist() == np.asarray(cache.lengths).tolist()  # not committed yet
    for split in splits:
        np.testing.assert_allclose(np.asarray(split.logits), np.asarray(full.logits), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(np.asarray(split.hidden), np.asarray(full.hidden), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(split.cache.k), np.asarray(full.cache.k), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(split.cache.v), np.asarray(full.cache.v), rtol=1e-6, atol=1e-6)
        assert np.asarray(split.cache.lengths).tolist() == np.asarray(full.cache.lengths).tolist()
    if early is not None:
        # early exit: layers [0, 4) with the final norm and head = the full call with layers 4.. switched off
        np.testing.assert_allclose(np.asarray(early.logits), np.asarray(skip.logits), rtol=1e-6, atol=1e-5)
        assert np.asarray(early.cache.lengths).tolist() == np.asarray(cache.lengths).tolist()
    with pytest.raises(ValueError, match="hidden_in"):
        model(params, new, pos, cache, layer_range=(2, n))
    with pytest.raises(ValueError, match="layer_range"):
        model(params, new, pos, cache, layer_range=(3, 3))


# ------------------------------------------------------------------------------------ truncate
def test_truncate_equals_first_layers(model_q, small_q):
    model, params = model_q
    dm, dp = small_q
    assert dm.num_layers == 6 and dm.init_cache(1, 4).k.shape[0] == 6
    toks, pos = jnp.asarray([_ids()[:6]]), jnp.arange(6)[None]
    run = jax.jit(lambda p, dp: (model(p, toks, pos, model.init_cache(1, 8), layer_range=(0, 6)),
                                 dm(dp, toks, pos, dm.init_cache(1, 8))))
    first, small = run(params, dp)
    np.testing.assert_allclose(np.asarray(small.logits), np.asarray(first.logits), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(small.cache.k), np.asarray(first.cache.k[:6]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="num_layers"):
        model.truncate(params, 31)


def test_truncate_keeps_dfloat11_decode_tables():
    from jaxdec.compress.dfloat11 import decode_layer, encode_stack
    from jaxdec.models.llama import _slice_stack
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 64)), jnp.bfloat16)
    st = encode_stack(w)
    part = _slice_stack(st, 0, 2)
    assert part.shape == (2, 8, 64) and part.lut_symbol.shape == st.lut_symbol.shape
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(decode_layer(part, i)), np.asarray(w[i]))


def test_protocol_members_refused_by_name():
    from jaxdec.search.superposed import superposed_generate
    from jaxdec.testing.toy_search import TableModel
    from jaxdec.speculative.drafters import truncated_draft
    m = TableModel(vocab_size=5)
    with pytest.raises(TypeError, match="`truncate`"):
        truncated_draft(m, m.init_params(), 1)
    with pytest.raises(TypeError, match="`embed`"):
        superposed_generate(m, m.init_params(), [[1, 2]], num_drafts=2, max_new_tokens=2)
