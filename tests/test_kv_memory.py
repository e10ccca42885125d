"""KV memory: Hydragen shared-prefix attention, compressed KV caches (KIVI, GEAR, Mustafar, Double
Sparsity) and their byte accounting. Small random inputs only (fast on CPU)."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdec.attention.reference import attend, causal_block_mask
from jaxdec.attention.hydragen import hydragen_attend, split_shared_prefix
from jaxdec.cache.kv import swap_heads_slots


def _close(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * max(np.abs(ref).max(), 1e-30))


def _hydragen_case(seed, b=5, t=3, h=9, kvh=3, d=16, p_cap=24, prefix_len=19, s_cap=11,
                   sliding_window=None, poison=True):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    q = f(b, t, h, d)
    pk, pv = f(p_cap, kvh, d), f(p_cap, kvh, d)
    sk, sv = f(b, s_cap, kvh, d), f(b, s_cap, kvh, d)
    suf = jnp.asarray(rng.integers(0, s_cap + 1, size=b).astype(np.int32))
    suf = suf.at[0].set(0).at[1].set(s_cap)  # empty and full suffixes
    if poison:  # garbage past the valid entries must never leak
        pk = pk.at[prefix_len:].set(jnp.nan)
        pv = pv.at[prefix_len:].set(jnp.nan)
        mask = (jnp.arange(s_cap)[None, :] >= suf[:, None])[:, :, None, None]
        sk = jnp.where(mask, jnp.nan, sk)
        sv = jnp.where(mask, jnp.nan, sv)
    kn, vn = f(b, t, kvh, d), f(b, t, kvh, d)
    bm = causal_block_mask(b, t)
    qpos = (prefix_len + suf)[:, None] + jnp.arange(t)[None, :]
    out = hydragen_attend(q, pk, pv, prefix_len, sk, sv, suf, kn, vn, bm, qpos,
                          sliding_window=sliding_window)
    # reference: the concatenated per-row cache
    s = prefix_len + s_cap
    kc = np.zeros((b, s, kvh, d), np.float32)
    vc = np.zeros((b, s, kvh, d), np.float32)
    for i in range(b):
        n = int(suf[i])
        kc[i, :prefix_len] = np.asarray(pk[:prefix_len])
        vc[i, :prefix_len] = np.asarray(pv[:prefix_len])
        kc[i, prefix_len:prefix_len + n] = np.asarray(sk[i, :n])
        vc[i, prefix_len:prefix_len + n] = np.asarray(sv[i, :n])
    ref = attend(q, jnp.asarray(kc), jnp.asarray(vc), prefix_len + suf, kn, vn, bm, qpos,
                 sliding_window=sliding_window)
    return out, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hydragen_equals_attend(seed):
    out, ref = _hydragen_case(seed)
    _close(out, ref)


def test_hydragen_decode_step_sliding_window_and_empty_prefix():
    out, ref = _hydragen_case(3, t=1, sliding_window=7)
    _close(out, ref)
    out, ref = _hydragen_case(4, prefix_len=0, poison=True)
    _close(out, ref)


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_hydragen_grouped_prefixes_equal_attend(sliding_window):
    """G = 3 prefixes of different lengths, 2 rows each: equals attend on each row's own prefix ++ suffix."""
    rng = np.random.default_rng(11)
    g, r, t, h, kvh, d, p_cap, s_cap = 3, 2, 2, 9, 3, 16, 12, 7
    b = g * r
    f = lambda *sh: jnp.asarray(rng.normal(size=sh).astype(np.float32))
    q, pk, pv = f(b, t, h, d), f(g, p_cap, kvh, d), f(g, p_cap, kvh, d)
    plen = jnp.asarray([12, 0, 5], jnp.int32)
    pk = jnp.where((jnp.arange(p_cap)[None, :] >= plen[:, None])[:, :, None, None], jnp.nan, pk)
    pv = jnp.where((jnp.arange(p_cap)[None, :] >= plen[:, None])[:, :, None, None], jnp.nan, pv)
    sk, sv = f(b, s_cap, kvh, d), f(b, s_cap, kvh, d)
    suf = jnp.asarray(rng.integers(0, s_cap + 1, size=b).astype(np.int32))
    kn, vn = f(b, t, kvh, d), f(b, t, kvh, d)
    bm = causal_block_mask(b, t)
    row_plen = jnp.repeat(plen, r)
    qpos = (row_plen + suf)[:, None] + jnp.arange(t)[None, :]
    out = hydragen_attend(q, pk, pv, plen, sk, sv, suf, kn, vn, bm, qpos, sliding_window=sliding_window)
    kc = np.zeros((b, p_cap + s_cap, kvh, d), np.float32)
    vc = np.zeros_like(kc)
    for i in range(b):
        pl, n = int(row_plen[i]), int(suf[i])
        kc[i, :pl], vc[i, :pl] = np.asarray(pk[i // r, :pl]), np.asarray(pv[i // r, :pl])
        kc[i, pl:pl + n], vc[i, pl:pl + n] = np.asarray(sk[i, :n]), np.asarray(sv[i, :n])
    ref = attend(q, jnp.asarray(kc), jnp.asarray(vc), row_plen + suf, kn, vn, bm, qpos,
                 sliding_window=sliding_window)
    _close(out, ref)
    with pytest.raises(ValueError, match="multiple of the number of prefix groups"):
        hydragen_attend(q[:5], pk, pv, plen, sk[:5], sv[:5], suf[:5], kn[:5], vn[:5], bm[:5], qpos[:5])


def test_hydragen_fully_masked_rows_zero():
    b, t, h, kvh, d = 2, 2, 9, 3, 8
    z = jnp.zeros
    q = jnp.ones((b, t, h, d))
    out = hydragen_attend(q, z((4, kvh, d)), z((4, kvh, d)), 0, z((b, 3, kvh, d)), z((b, 3, kvh, d)),
                          jnp.zeros((b,), jnp.int32), z((b, t, kvh, d)), z((b, t, kvh, d)),
                          jnp.zeros((b, t, t), bool), jnp.zeros((b, t), jnp.int32))
    assert np.all(np.asarray(out) == 0)


def test_split_shared_prefix_round_trip():
    rng = np.random.default_rng(5)
    b, s, kvh, d, p = 4, 20, 3, 8, 9
    k = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    k[:, :p] = k[0, :p]
    v[:, :p] = v[0, :p]
    lengths = jnp.asarray([9, 12, 20, 15], jnp.int32)
    pk, pv, sk, sv, sl = split_shared_prefix(jnp.asarray(k), jnp.asarray(v), lengths, p)
    q = jnp.asarray(rng.normal(size=(b, 1, 9, d)).astype(np.float32))
    kn = jnp.asarray(rng.normal(size=(b, 1, kvh, d)).astype(np.float32))
    vn = jnp.asarray(rng.normal(size=(b, 1, kvh, d)).astype(np.float32))
    bm = causal_block_mask(b, 1)
    qpos = lengths[:, None]
    out = hydragen_attend(q, pk, pv, p, sk, sv, sl, kn, vn, bm, qpos)
    ref = attend(q, jnp.asarray(k), jnp.asarray(v), lengths, kn, vn, bm, qpos)
    _close(out, ref)


# ------------------------------------------------------------------------------------------------
# compressed caches
# ------------------------------------------------------------------------------------------------
from jaxdec.cache.quantized import FP32, GEAR, KIVI  # noqa: E402
from jaxdec.cache.sparse import (DoubleSparsity, Mustafar, calibrate_channels,  # noqa: E402
                                 double_sparse_attend)


def _kv(seed, b=2, s=100, kvh=3, d=64, outliers=True):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    if outliers:  # a few heavy channels (as real keys have) and sparse spikes
        k[..., 5] *= 8.0
        spikes = rng.random(k.shape) < 0.01
        k = np.where(spikes, k * 10, k)
        v = np.where(rng.random(v.shape) < 0.01, v * 10, v)
    return jnp.asarray(k), jnp.asarray(v), jnp.asarray([s, 70], jnp.int32)


def _err(x, xh, lengths):
    m = (np.arange(x.shape[1])[None, :] < np.asarray(lengths)[:, None])
    return float(np.sqrt(((np.asarray(x) - np.asarray(xh)) ** 2)[m].mean()))


def test_quantized_error_order_and_window():
    k, v, ln = _kv(0)
    e = {}
    for name, meth in [("int8", KIVI(bits=8)), ("int4", KIVI(bits=4)), ("gear", GEAR(bits=4))]:
        kh, vh = meth.compress(k, v, ln)
        assert np.all(np.isfinite(kh)) and np.all(np.isfinite(vh))
        e[name] = (_err(k, kh, ln), _err(v, vh, ln))
        # the exact recent window: rows of 100 and 70 tokens quantize 96 and 64 (whole key groups)
        np.testing.assert_array_equal(np.asarray(kh[0, 96:]), np.asarray(k[0, 96:]))
        np.testing.assert_array_equal(np.asarray(vh[1, 64:70]), np.asarray(v[1, 64:70]))
        # slots past lengths are passed through
        np.testing.assert_array_equal(np.asarray(kh[1, 70:]), np.asarray(k[1, 70:]))
    assert 0 < e["int8"][0] < e["int4"][0] and 0 < e["int8"][1] < e["int4"][1]
    assert e["gear"][0] < 0.8 * e["int4"][0] and e["gear"][1] < 0.8 * e["int4"][1]
    kh, vh = FP32().compress(k, v, ln)
    np.testing.assert_array_equal(np.asarray(kh), np.asarray(k))


def test_gear_each_part_reduces_error():
    k, v, ln = _kv(1)
    base = _err(k, KIVI(bits=4).compress(k, v, ln)[0], ln)
    lr = _err(k, GEAR(bits=4, rank=8, outliers=0).compress(k, v, ln)[0], ln)
    sp = _err(k, GEAR(bits=4, rank=0, outliers=2).compress(k, v, ln)[0], ln)
    assert lr < base and sp < base


@pytest.mark.parametrize("sparsity,kept", [(0.5, 32), (0.7, 19)])
def test_mustafar_keeps_exact_fraction(sparsity, kept):
    k, v, ln = _kv(2, outliers=False)
    m = Mustafar(sparsity)
    assert m.kept(64) == kept
    kh, vh = m.compress(k, v, ln)
    for x, xh in ((k, kh), (v, vh)):
        x, xh = np.asarray(x), np.asarray(xh)
        nz = (xh != 0).sum(-1)  # [B,S,KVH]
        assert np.all(nz[0] == kept) and np.all(nz[1, :70] == kept)
        np.testing.assert_array_equal(xh[1, 70:], x[1, 70:])
        # kept entries are unchanged and are the largest in magnitude
        keep = xh != 0
        np.testing.assert_array_equal(xh[keep], x[keep])
        lo_kept = np.where(keep, np.abs(x), np.inf).min(-1)
        hi_drop = np.where(keep, -np.inf, np.abs(x)).max(-1)
        assert np.all(lo_kept[0] >= hi_drop[0])


def test_double_sparsity_full_equals_attend_and_sparse_is_close():
    rng = np.random.default_rng(3)
    b, t, h, kvh, d, s = 3, 2, 9, 3, 16, 40
    f = lambda *sh: jnp.asarray(rng.normal(size=sh).astype(np.float32))
    q, kc, vc, kn, vn = f(b, t, h, d), f(b, s, kvh, d), f(b, s, kvh, d), f(b, t, kvh, d), f(b, t, kvh, d)
    ln = jnp.asarray([40, 17, 0], jnp.int32)
    bm = causal_block_mask(b, t)
    qpos = ln[:, None] + jnp.arange(t)[None]
    ref = attend(q, kc, vc, ln, kn, vn, bm, qpos)
    all_ch = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (kvh, d))
    out = double_sparse_attend(q, kc, vc, ln, kn, vn, bm, qpos, all_ch, token_frac=1.0, min_tokens=1)
    _close(out, ref)
    # sparse: only the budgeted tokens are read; with exact channels this is top-k exact attention
    out = double_sparse_attend(q, kc, vc, ln, kn, vn, bm, qpos, all_ch, token_frac=1 / 8, min_tokens=4)
    assert np.all(np.isfinite(out))
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() > 1e-4  # it really dropped tokens


def test_calibrate_channels_finds_planted_channels():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(50, 9, 16)).astype(np.float32)
    k = rng.normal(size=(60, 3, 16)).astype(np.float32)
    q[:, :, 7] *= 20
    k[:, 1, 3] *= 30
    ch = np.asarray(calibrate_channels(jnp.asarray(q), jnp.asarray(k), 2))
    assert ch.shape == (3, 2) and all(7 in ch[j] for j in range(3)) and 3 in ch[1]


def test_bytes_per_token_formulas():
    kvh, d = 3, 64
    assert FP32().bytes_per_token(96, kvh, d) == 2 * kvh * d * 4
    # 96 tokens, residual 32, key groups of 32 -> 64 quantized tokens + 32 exact ones
    q_len, r_len = 64, 32
    for bits in (8, 4):
        codes = 2 * q_len * kvh * d * bits / 8
        kscale = 2 * (q_len // 32) * kvh * d * 4
        vscale = 2 * q_len * kvh * (d // 32) * 4
        window = 2 * r_len * kvh * d * 4
        assert KIVI(bits=bits).bytes_per_token(96, kvh, d) == pytest.approx(
            (codes + kscale + vscale + window) / 96)
    g = GEAR(bits=4, rank=4, outliers=1)
    extra = 2 * q_len * kvh * 1 * 5 + 2 * kvh * 4 * (q_len + d) * 4
    assert g.bytes_per_token(96, kvh, d) == pytest.approx(
        KIVI(bits=4).bytes_per_token(96, kvh, d) + extra / 96)
    assert Mustafar(0.5).bytes_per_token(96, kvh, d) == 2 * kvh * (d / 8 + 32 * 4)
    assert Mustafar(0.7).bytes_per_token(96, kvh, d) == 2 * kvh * (d / 8 + 19 * 4)
    ds = DoubleSparsity()
    assert ds.bytes_per_token(1024, kvh, d) == kvh * (2 * d + 8) * 4
    assert ds.bytes_read_per_token(1024, kvh, d) == kvh * 8 * 4 + 2 * kvh * d * 4 * 128 / 1024
    assert KIVI(bits=4).bytes_per_token(4096, kvh, d) < KIVI(bits=8).bytes_per_token(4096, kvh, d) \
        < FP32().bytes_per_token(4096, kvh, d)


def test_bad_input_errors():
    k, v, ln = _kv(5, s=64)
    with pytest.raises(ValueError, match="bits"):
        KIVI(bits=3)
    with pytest.raises(ValueError, match="bits"):
        GEAR(bits=2)
    with pytest.raises(ValueError, match="does not divide"):
        KIVI(bits=4, value_group=48).compress(k, v, ln)
    with pytest.raises(ValueError, match="does not divide"):
        KIVI(bits=8, value_group=48).bytes_per_token(64, 3, 64)
    with pytest.raises(ValueError, match="residual"):
        KIVI(bits=8, key_group=64, residual=32)
    with pytest.raises(ValueError, match="sparsity"):
        Mustafar(1.5)
    with pytest.raises(ValueError, match="r must be"):
        calibrate_channels(jnp.ones((4, 9, 16)), jnp.ones((4, 3, 16)), 0)


# ------------------------------------------------------------------------------------------------
# the model's attention hooks and Hydragen decoding of rows sharing a prompt (tiny Llama, GQA 6/2)
# ------------------------------------------------------------------------------------------------
def _tiny_model(seed=0):
    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=6,
                      num_kv_heads=2, head_dim=8, rope_theta=10000.0)
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray((rng.normal(size=s) * 0.3).astype(np.float32))
    L, E, F = 2, 48, 64
    params = {"embed": f(97, E), "final_norm": 1 + f(E),
              "layers": {"attn_norm": 1 + f(L, E), "wq": f(L, 48, E), "wk": f(L, 16, E),
                         "wv": f(L, 16, E), "wo": f(L, E, 48), "mlp_norm": 1 + f(L, E),
                         "w_gate": f(L, F, E), "w_up": f(L, F, E), "w_down": f(L, E, F)}}
    return LlamaModel(cfg), params


def test_attn_fn_hook_equals_default_and_scans_extra():
    """The model's attn_fn/attn_extra hook (what pluggable.forward used to provide): the plain
    attention through the hook is the default path bit for bit, attn_extra reaches each layer as its
    own slice, and collect_qk returns the block's post-RoPE keys (the ones written to the cache)."""
    from jaxdec.attention.reference import attend as ref_attend
    model, params = _tiny_model()
    toks = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 7)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    cache = model.init_cache(2, 16)
    out = model(params, toks, pos, cache)

    def scaled(q, kc, vc, lengths, k, v, bm, qp, extra, sliding_window=None):
        return ref_attend(q, kc, vc, lengths, k, v, bm, qp, sliding_window=sliding_window) * extra

    def plain(q, kc, vc, lengths, k, v, bm, qp, extra, sliding_window=None):
        assert extra is None
        return ref_attend(q, kc, vc, lengths, k, v, bm, qp, sliding_window=sliding_window)

    same = model(params, toks, pos, cache, attn_fn=plain)  # the reference attention: equal up to rounding
    _close(same.logits, out.logits)
    _close(same.cache.k, out.cache.k)
    one = model(params, toks, pos, cache, attn_fn=scaled, attn_extra=jnp.ones((2,)), collect_qk=True)
    _close(one.logits, out.logits)
    _close(one.cache.k, out.cache.k)
    q, k = one.qk
    assert q.shape == (2, 2, 7, 6, 8) and k.shape == (2, 2, 7, 2, 8)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(swap_heads_slots(one.cache.k)[:, :, :7]))
    # layer 1 scaled by 0.5: layer 0 keys unchanged, layer 1 keys (from a changed residual) differ
    half = model(params, toks, pos, cache, attn_fn=scaled, attn_extra=jnp.asarray([1.0, 0.5]))
    np.testing.assert_array_equal(np.asarray(half.cache.k[0]), np.asarray(out.cache.k[0]))
    assert not np.allclose(np.asarray(half.logits), np.asarray(out.logits))
    pre = model(params, toks, pos, cache, attn_fn=scaled, attn_extra=jnp.asarray([0.5, 1.0]))
    assert not np.allclose(np.asarray(pre.cache.k[1]), np.asarray(out.cache.k[1]))


def test_attn_fn_with_prefix_cache_is_refused():
    from jaxdec.cache.kv import with_prefix_buffer
    model, params = _tiny_model()
    cache = with_prefix_buffer(model.init_cache(2, 8), 8)
    with pytest.raises(ValueError, match="attn_fn"):
        model(params, jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32), cache,
              attn_fn=lambda *a, **k: None)


def test_hydragen_sampling_n_rows_same_tokens_as_plain():
    """Model-level: a shared-prefix cache (prompt prefilled once through `prefill`) gives the plain
    replicated cache's logits at every step, and hence its sampled tokens."""
    from jaxdec.cache.kv import with_prefix_buffer
    from jaxdec.core.steps import prefill
    model, params = _tiny_model(2)
    n, steps = 4, 6
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, 97, 11), jnp.int32)
    p = prompt.shape[0]
    key = jax.random.PRNGKey(0)
    prompts = jnp.broadcast_to(prompt, (n, p))
    lens = jnp.full((n,), p, jnp.int32)
    step = jax.jit(lambda prm, t, c: model(prm, t, c.lengths[:, None], c))
    # plain: the prompt replicated in every row's cache
    last, cache, _ = prefill(model, params, prompts, lens, model.init_cache(n, p + steps))
    plain_tok, plain_logits = [], []
    for i in range(steps):
        tok = jax.random.categorical(jax.random.fold_in(key, i), last, axis=-1).astype(jnp.int32)
        plain_tok.append(tok)
        plain_logits.append(last)
        o = step(params, tok[:, None], cache)
        cache, last = o.cache, o.logits[:, 0]
    # Hydragen: prefill once, decode the n rows against one shared prefix
    last, suffix, _ = prefill(model, params, prompts, lens, with_prefix_buffer(model.init_cache(n, steps), 16))
    assert suffix.prefix_k.shape == (2, 1, 16, 2, 8) and suffix.k.shape == (2, n, 2, steps, 8)
    for i in range(steps):
        _close(last, plain_logits[i])
        tok = jax.random.categorical(jax.random.fold_in(key, i), last, axis=-1).astype(jnp.int32)
        np.testing.assert_array_equal(np.asarray(tok), np.asarray(plain_tok[i]))
        o = step(params, tok[:, None], suffix)
        suffix, last = o.cache, o.logits[:, 0]
    rows = np.stack([np.asarray(t) for t in plain_tok], axis=1)  # [n, steps]: one sampled sequence per row
    assert len({tuple(r) for r in rows}) > 1  # rows really sampled different sequences
