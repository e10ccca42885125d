"""Pallas kernels vs their jnp references (interpret mode on CPU).

Conventions (shared/DESIGN.md): rtol=1e-5, atol=1e-6*max|ref|; NaN never passes; fully masked query
rows output exact zeros; `pallas_call` must be in the traced program; outputs that start as NaN
(aliased, ``_poison_output=True``) must be fully overwritten. Sizes are small: every distinct shape
is a fresh interpret-mode trace.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdec.attention.reference import attend, causal_block_mask
from pallas_kernels.quantized_kv_attention import (
    QuantizedKVCache, dequantize_keys, dequantize_values, pack_int4, quantize_keys_per_channel,
    quantize_kv_cache, quantize_values_per_token, quantized_kv_attention,
    reference_quantized_attention, unpack_int4,
)
from pallas_kernels.tree_attention import (
    default_interpret, is_valid_tree, tree_attention, tree_mask_from_parents,
)


def assert_close(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    assert np.isfinite(ref).all(), "reference has NaN/inf"
    assert np.isfinite(out).all(), "kernel output has NaN/inf"
    atol = 1e-6 * float(np.abs(ref).max())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=atol, equal_nan=False)


def random_parents(rng, t):
    return np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, t)], np.int32)


def depths(parents):
    d = np.zeros(len(parents), np.int32)
    for i, p in enumerate(parents):
        d[i] = 0 if p < 0 else d[p] + 1
    return d


def make_case(seed, *, b, t, h, kvh, d, s, lengths, tree=True, nan_unused=False):
    """Random inputs: tree (or chain) block after a ragged cache; positions = length + depth."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    q, kc, vc = f(b, t, h, d), f(b, s, kvh, d), f(b, s, kvh, d)
    kn, vn = f(b, t, kvh, d), f(b, t, kvh, d)
    lengths = np.asarray(lengths, np.int32)
    if tree:
        parents = np.stack([random_parents(rng, t) for _ in range(b)])
    else:
        parents = np.tile(np.arange(-1, t - 1, dtype=np.int32), (b, 1))
    mask = np.array(tree_mask_from_parents(parents))
    q_pos = lengths[:, None] + np.stack([depths(p) for p in parents])
    if nan_unused:
        for i, n in enumerate(lengths):
            kc[i, n:] = np.nan
            vc[i, n:] = np.nan
    return dict(q=q, k_cache=kc, v_cache=vc, lengths=lengths, k_new=kn, v_new=vn,
                block_mask=mask, q_pos=q_pos.astype(np.int32))


def run_both(case, window=None, **kw):
    out = tree_attention(**case, sliding_window=window, **kw)
    ref = attend(**{k: jnp.asarray(v) for k, v in case.items()}, sliding_window=window)
    return np.asarray(out), np.asarray(ref)


def test_interpret_default_on_cpu():
    assert jax.default_backend() != "cpu" or default_interpret()


# ------------------------------------------------------------------------------------------------
# tree attention vs reference
# ------------------------------------------------------------------------------------------------

def test_gqa_9_3_random_trees_ragged_fully_masked_row():
    """Default-model heads (H=9, KVH=3, D=64), S=37 (not a multiple of block_k=16), T=5 random
    trees, lengths incl. 0 and S; one query row masked from everything; several seeds."""
    for seed in (0, 1, 2):
        case = make_case(seed, b=3, t=5, h=9, kvh=3, d=64, s=37, lengths=[37, 0, 20])
        case["block_mask"][1, 3, :] = False  # row 1 has no cache: query 3 sees no key at all
        out, ref = run_both(case, block_k=16, _poison_output=True)
        assert_close(out, ref)
        assert np.all(out[1, 3] == 0.0) and np.all(ref[1, 3] == 0.0)
        assert np.abs(out[1, :3]).max() > 0  # the other queries of that row do see keys


MHA_CASE = dict(b=3, t=5, h=4, kvh=4, d=32, s=37, lengths=[37, 9, 0], tree=False)


def test_mha_4_4_chain_sliding_window_split_k():
    """H=KVH=4, D=32, causal chain, sliding window, flash-decoding split over the cache."""
    for seed in (3, 4):
        case = make_case(seed, **MHA_CASE)
        out, ref = run_both(case, 7, block_k=16, num_splits=3, _poison_output=True)
        assert_close(out, ref)


def test_window_excludes_everything_gives_zeros():
    case = make_case(5, **MHA_CASE)
    out, ref = run_both(case, 0, block_k=16, num_splits=3, _poison_output=True)
    assert np.all(out == 0.0) and np.all(ref == 0.0)


def test_many_row_and_block_tiles_with_window():
    """T=20 tree, R=T*G=60 rows -> 4 row tiles of 16, 2 block-key chunks of 16, window 12."""
    case = make_case(6, b=2, t=20, h=9, kvh=3, d=32, s=37, lengths=[25, 37])
    out, ref = run_both(case, 12, block_k=16, block_r=16, block_t=16, _poison_output=True)
    assert_close(out, ref)


def test_decode_step_cache_smaller_than_block():
    """T=1 decode, S=10 < block_k (padded path), default block sizes, no poison hook (plain path)."""
    case = make_case(7, b=3, t=1, h=9, kvh=3, d=32, s=10, lengths=[10, 3, 0], tree=False)
    out, ref = run_both(case)
    assert_close(out, ref)
    assert np.abs(out[2]).max() > 0  # an empty-cache row still sees its own key


def test_nan_in_unused_cache_slots_does_not_leak():
    shape = dict(b=3, t=5, h=9, kvh=3, d=64, s=37, lengths=[37, 0, 20])
    clean, dirty = make_case(0, **shape), make_case(0, **shape, nan_unused=True)
    assert np.isnan(dirty["v_cache"]).any()
    kw = dict(block_k=16, _poison_output=True)
    out_dirty = np.asarray(tree_attention(**dirty, **kw))
    assert np.isfinite(out_dirty).all()
    np.testing.assert_array_equal(out_dirty, np.asarray(tree_attention(**clean, **kw)))
    assert_close(out_dirty, attend(**clean))
    # with split-K and a sliding window (skipped and partly masked blocks) as well
    clean, dirty = make_case(1, **MHA_CASE), make_case(1, **MHA_CASE, nan_unused=True)
    kw = dict(sliding_window=7, block_k=16, num_splits=3, _poison_output=True)
    out_dirty = np.asarray(tree_attention(**dirty, **kw))
    assert_close(out_dirty, attend(**clean, sliding_window=7))


def test_cache_blocks_visited_follow_lengths_not_buffer():
    """The lengths rule (as in jaxdec.attention.blockwise): each program's cache loop visits
    cdiv(length, block_k) blocks (minus those before every query's window), the same count for a
    256-slot and a 1024-slot cache; the output still equals the jnp reference (`attend`)."""
    lengths = [0, 17, 64, 100]
    counts = {}
    for s in (256, 1024):
        case = make_case(3, b=4, t=3, h=6, kvh=2, d=16, s=s, lengths=lengths, nan_unused=True)
        out, cnt = tree_attention(**case, block_k=16, _count_blocks=True)
        ref = attend(**make_case(3, b=4, t=3, h=6, kvh=2, d=16, s=s, lengths=lengths))
        assert_close(out, ref)
        counts[s] = np.asarray(cnt)
        assert counts[s].shape == (4, 2, 1)
        np.testing.assert_array_equal(counts[s][:, :, 0], np.array([[0, 0], [2, 2], [4, 4], [7, 7]]))
    np.testing.assert_array_equal(counts[256], counts[1024])
    # sliding window: blocks wholly before every query's window are not visited (row 3: positions
    # 100 sees keys 81..99, blocks 5 and 6 of 16 keys; without the window it visits 7); split-K sums them
    case = make_case(4, b=4, t=1, h=6, kvh=2, d=16, s=256, lengths=lengths, tree=False)
    out, cnt = tree_attention(**case, block_k=16, sliding_window=20, num_splits=4, _count_blocks=True)
    assert_close(out, attend(**case, sliding_window=20))
    np.testing.assert_array_equal(np.asarray(cnt)[:, 0, 0], [0, 2, 2, 2])  # row 2: keys 45..63, blocks 2-3


def test_pallas_call_in_traced_program():
    case = make_case(0, b=1, t=2, h=4, kvh=2, d=32, s=16, lengths=[4])
    jaxpr = str(jax.make_jaxpr(lambda *a: tree_attention(*a, block_k=16))(*case.values()))
    assert "pallas_call" in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda *a: attend(*a))(*case.values()))
    assert "pallas_call" not in jaxpr  # negative control: the reference is plain XLA


def test_model_pallas_path_matches_xla():
    """jaxdec's Llama with attention_impl='pallas' runs the kernel and matches the XLA path."""
    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=9, num_kv_heads=3, head_dim=16)
    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.2)  # noqa: E731
    L, E, F, H, KVH, D = 2, 48, 64, 9, 3, 16
    params = {"embed": w(64, E), "final_norm": 1 + w(E),
              "layers": {"attn_norm": 1 + w(L, E), "wq": w(L, H * D, E), "wk": w(L, KVH * D, E),
                         "wv": w(L, KVH * D, E), "wo": w(L, E, H * D), "mlp_norm": 1 + w(L, E),
                         "w_gate": w(L, F, E), "w_up": w(L, F, E), "w_down": w(L, E, F)}}
    xla = LlamaModel(cfg)
    pal = xla.with_attention("pallas")
    tokens = jnp.asarray(rng.integers(0, 64, size=(2, 5)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    cache = xla.init_cache(2, 24)
    jaxpr = str(jax.make_jaxpr(lambda p, t, q, c: pal(p, t, q, c).logits)(params, tokens, pos,
                                                                          cache))
    assert "pallas_call" in jaxpr
    fx = jax.jit(lambda p, t, q, c: xla(p, t, q, c))
    fp = jax.jit(lambda p, t, q, c: pal(p, t, q, c))
    ox, op = fx(params, tokens, pos, cache), fp(params, tokens, pos, cache)
    assert_close(op.logits, ox.logits)
    # a second block over the (ragged: roll row 1 back) cache
    c2 = ox.cache.replace(lengths=jnp.array([5, 3], jnp.int32))
    pos2 = c2.lengths[:, None] + jnp.arange(5, dtype=jnp.int32)
    assert_close(fp(params, tokens, pos2, c2).logits, fx(params, tokens, pos2, c2).logits)


def test_bad_inputs_raise():
    case = make_case(0, b=2, t=3, h=4, kvh=2, d=32, s=16, lengths=[4, 5])
    bad = dict(case, k_cache=case["k_cache"][:, :, :1].repeat(3, axis=2),
               v_cache=case["v_cache"][:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        tree_attention(**bad)
    with pytest.raises(ValueError, match="block_mask"):
        tree_attention(**dict(case, block_mask=case["block_mask"][:, :2]))
    with pytest.raises(ValueError, match="q_pos"):
        tree_attention(**dict(case, q_pos=case["q_pos"][:, :2]))
    with pytest.raises(ValueError, match="lengths"):
        tree_attention(**dict(case, lengths=case["lengths"][:1]))
    with pytest.raises(ValueError, match="k_new"):
        tree_attention(**dict(case, k_new=case["k_new"][:, :2]))
    with pytest.raises(ValueError, match="k_cache/v_cache"):
        tree_attention(**dict(case, v_cache=case["v_cache"][:, :5]))
    with pytest.raises(ValueError, match="power of two"):
        tree_attention(**case, block_k=24)
    with pytest.raises(ValueError, match="num_splits"):
        tree_attention(**case, num_splits=0)


# ------------------------------------------------------------------------------------------------
# tree masks
# ------------------------------------------------------------------------------------------------

def brute_ancestors(parents):
    t = len(parents)
    m = np.zeros((t, t), bool)
    for i in range(t):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def test_tree_mask_chain_is_causal_and_random_trees_match_brute_force():
    chain = np.arange(-1, 6)
    np.testing.assert_array_equal(tree_mask_from_parents(chain), np.tril(np.ones((7, 7), bool)))
    np.testing.assert_array_equal(tree_mask_from_parents(chain[None]), causal_block_mask(1, 7))
    rng = np.random.default_rng(0)
    for t in (1, 5, 17):
        ps = np.stack([random_parents(rng, t) for _ in range(4)])
        got = np.asarray(tree_mask_from_parents(ps))
        assert got.shape == (4, t, t) and got.dtype == bool
        for i in range(4):
            np.testing.assert_array_equal(got[i], brute_ancestors(ps[i]))
    # traced input works under jit (no validation possible there; is_valid_tree is traceable)
    ps = np.stack([random_parents(rng, 9) for _ in range(3)])
    np.testing.assert_array_equal(jax.jit(tree_mask_from_parents)(ps), tree_mask_from_parents(ps))
    assert bool(jnp.all(jax.jit(is_valid_tree)(ps)))
    assert not bool(is_valid_tree(np.array([-1, 1, 0])))


@pytest.mark.parametrize("parents", [
    [-1, 1, 0],        # own index
    [-1, 0, 3, 1],     # a later node
    [-1, 0, 7],        # out of range
    [-1, -2, 0],       # below -1
    [0, -1],           # the first node must be a root
    [[-1, 0], [-1, 1]],  # batched, second tree bad
])
def test_tree_mask_rejects_invalid_trees(parents):
    with pytest.raises(ValueError, match="tree mask not a valid tree"):
        tree_mask_from_parents(np.array(parents))


def test_tree_mask_rejects_bad_rank_and_dtype():
    with pytest.raises(ValueError, match="tree mask not a valid tree"):
        tree_mask_from_parents(np.zeros((1, 1, 3), np.int32))
    with pytest.raises(ValueError, match="tree mask not a valid tree"):
        tree_mask_from_parents(np.array([-1.0, 0.0]))


# ------------------------------------------------------------------------------------------------
# quantized KV (KIVI)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_error_within_half_scale(bits):
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=(2, 64, 3, 32)) * rng.uniform(0.1, 5, size=(1, 1, 3, 32))).astype(np.float32)
    x[0, :16, 0, 0] = 1.5  # a constant group: scale 0, exact
    kc, ks, km = quantize_keys_per_channel(x, bits=bits, group_size=16)
    assert kc.dtype == jnp.uint8 and kc.shape == (2, 64, 3, 32 if bits == 8 else 16)
    assert ks.shape == km.shape == (2, 4, 3, 32)
    kd = np.asarray(dequantize_keys(kc, ks, km, bits=bits, group_size=16))
    bound = np.repeat(np.asarray(ks), 16, axis=1) / 2
    slack = 4 * np.finfo(np.float32).eps * (np.abs(x) + np.repeat(np.abs(np.asarray(km)), 16, 1))
    assert np.all(np.abs(kd - x) <= bound + slack)
    # the bound is tight: rounding to the nearest code, some entries land near half a step away
    assert (np.abs(kd - x)[bound > 0] / bound[bound > 0]).max() > 0.8
    assert kd[0, 0, 0, 0] == 1.5
    assert int(np.asarray(unpack_int4(kc) if bits == 4 else kc).max()) <= 2 ** bits - 1

    vc, vs, vm = quantize_values_per_token(x, bits=bits, group_size=8)
    assert vs.shape == vm.shape == (2, 64, 3, 4)
    vd = np.asarray(dequantize_values(vc, vs, vm, bits=bits, group_size=8))
    bound = np.repeat(np.asarray(vs), 8, axis=3) / 2
    slack = 4 * np.finfo(np.float32).eps * (np.abs(x) + np.repeat(np.abs(np.asarray(vm)), 8, 3))
    assert np.all(np.abs(vd - x) <= bound + slack)
    # the error bound is tight: the quantization is not lossless at these widths, and rounding to the
    # nearest code leaves some entries near half a step away (a coarser rounding would exceed the bound)
    assert (np.abs(vd - x)[bound > 0] / bound[bound > 0]).max() > 0.8


def test_int4_pack_roundtrip():
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(3, 8)), jnp.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 4) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_int4(packed), codes)
    np.testing.assert_array_equal(packed & 15, codes[:, :4])


def test_quantizer_bad_arguments():
    x = jnp.zeros((1, 32, 2, 32), jnp.float32)
    for bits in (2, 3, 16):
        with pytest.raises(ValueError, match="bits"):
            quantize_keys_per_channel(x, bits=bits, group_size=16)
        with pytest.raises(ValueError, match="bits"):
            quantize_values_per_token(x, bits=bits, group_size=16)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_keys_per_channel(x, bits=8, group_size=12)  # 12 does not divide S=32
    with pytest.raises(ValueError, match="does not divide"):
        quantize_values_per_token(x, bits=4, group_size=12)  # 12 does not divide D=32
    with pytest.raises(ValueError, match="residual"):
        quantize_kv_cache(x, x, jnp.array([3]), key_group=16, residual=8)


def make_quant_case(seed, *, bits, b=3, t=5, h=9, kvh=3, d=64, s=90, lengths=(90, 0, 50),
                    key_group=16, value_group=32, residual=24, nan_unused=False):
    case = make_case(seed, b=b, t=t, h=h, kvh=kvh, d=d, s=s, lengths=lengths)
    cache = quantize_kv_cache(case["k_cache"], case["v_cache"], case["lengths"], bits=bits,
                              key_group=key_group, value_group=value_group, residual=residual)
    if nan_unused:  # poison every slot beyond the per-row lengths, scales included
        ql, rl = np.asarray(cache.q_lengths), np.asarray(cache.res_lengths)
        ks, km = np.array(cache.k_scale), np.array(cache.k_min)
        vs, vm = np.array(cache.v_scale), np.array(cache.v_min)
        kr, vr = np.array(cache.k_res), np.array(cache.v_res)
        for i in range(b):
            ks[i, ql[i] // key_group:] = np.nan
            km[i, ql[i] // key_group:] = np.nan
            vs[i, ql[i]:] = np.nan
            vm[i, ql[i]:] = np.nan
            kr[i, rl[i]:] = np.nan
            vr[i, rl[i]:] = np.nan
        cache = cache.replace(k_scale=ks, k_min=km, v_scale=vs, v_min=vm, k_res=kr, v_res=vr)
    del case["k_cache"], case["v_cache"], case["lengths"]
    return cache, case


@pytest.mark.parametrize("bits,window", [(8, None), (4, 30)])
def test_quantized_kernel_matches_dequantize_then_reference(bits, window):
    for seed in (0, 1):
        cache, case = make_quant_case(seed, bits=bits)
        # q_len / res_len cover: long row (quantized + residual), empty row, medium row
        assert list(np.asarray(cache.q_lengths)) == [80, 0, 32]
        assert list(np.asarray(cache.res_lengths)) == [10, 0, 18]
        case["block_mask"][1, 2, :] = False  # empty row: a query that sees nothing
        out = quantized_kv_attention(case["q"], cache, case["k_new"], case["v_new"],
                                     case["block_mask"], case["q_pos"], window,
                                     block_res=16, _poison_output=True)
        ref = reference_quantized_attention(case["q"], cache, case["k_new"], case["v_new"],
                                            case["block_mask"], case["q_pos"], window)
        assert_close(out, ref)
        assert np.all(np.asarray(out)[1, 2] == 0.0)


def test_quantized_kernel_mha_d32_and_quantization_is_close_to_fp():
    cache, case = make_quant_case(2, bits=8, b=2, h=4, kvh=4, d=32, s=40, lengths=(40, 33),
                                  key_group=8, value_group=16, residual=8)
    args = (case["q"], cache, case["k_new"], case["v_new"], case["block_mask"], case["q_pos"])
    out = quantized_kv_attention(*args)
    assert_close(out, reference_quantized_attention(*args))
    assert "pallas_call" in str(jax.make_jaxpr(lambda c: quantized_kv_attention(
        case["q"], c, case["k_new"], case["v_new"], case["block_mask"], case["q_pos"]))(cache))
    # 8-bit KIVI attention is close to (but not exactly) full-precision attention
    fp = make_case(2, b=2, t=5, h=4, kvh=4, d=32, s=40, lengths=(40, 33))
    err = np.abs(np.asarray(out) - np.asarray(attend(**fp))).max()
    assert 0 < err < 0.05


def test_quantized_nan_in_unused_slots_does_not_leak():
    cache, case = make_quant_case(0, bits=4)
    dirty, _ = make_quant_case(0, bits=4, nan_unused=True)
    args = (case["q"], case["k_new"], case["v_new"], case["block_mask"], case["q_pos"])
    run = lambda c: np.asarray(quantized_kv_attention(  # noqa: E731
        args[0], c, *args[1:], 30, block_res=16, _poison_output=True))
    out_dirty = run(dirty)
    assert np.isfinite(out_dirty).all()
    np.testing.assert_array_equal(out_dirty, run(cache))


def test_quantized_cache_validation():
    cache, case = make_quant_case(0, bits=8, b=1, lengths=(50,), s=64)
    args = (case["q"], case["k_new"], case["v_new"], case["block_mask"], case["q_pos"])
    with pytest.raises(ValueError, match="k_scale"):
        quantized_kv_attention(args[0], cache.replace(k_scale=cache.k_scale[:, :2]), *args[1:])
    with pytest.raises(ValueError, match="bits"):
        quantized_kv_attention(args[0], cache.replace(bits=2), *args[1:])
    with pytest.raises(ValueError, match="does not divide"):
        quantized_kv_attention(args[0], cache.replace(value_group=24), *args[1:])
    assert isinstance(cache, QuantizedKVCache)
