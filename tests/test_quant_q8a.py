"""Int8 activations (``activations="q8"``, lossy and opt-in, issue 17): the repacked weight layout, the
AVX512-VNNI kernel and the model with it.

The kernel is checked two ways at every row count a decode step or verify block uses:
* tightly (kernel tolerance, rtol 1e-5 / atol 1e-6 max|ref|) against a float64 product of the SAME
  quantized activations with the exact weights, so a misplaced nibble or scale fails;
* against the exact product ``x @ dequantize(W).T`` within the rigorous bound of rounding each activation to
  its block's grid: |dy_o| <= sum_b dx_b / 2 * sum_{j in b} |W_oj| (plus float rounding), and NOT equal to it
  (a path that silently ran the exact kernel would pass the bound but fail this).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec import quant
from test_quant import assert_kernel_close, gguf_tensors, require_native  # noqa: F401 (a fixture)

ROWS = (1, 2, 3, 5, 8, 16, 32)
NAMES = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.21.ffn_down.weight", "blk.7.ffn_gate.weight",
         "token_embd.weight")


@pytest.fixture(scope="module")
def tensors(gguf_tensors):
    """The QTensors of test_quant's real tensors (every name here is among them)."""
    return {name: gguf_tensors[name][1] for name in NAMES}


def q8a_lib():
    lib = require_native()
    if not lib.has_q8a:
        pytest.skip("this CPU has no AVX512-VNNI: activations='q8' runs its XLA reference path")
    return lib


def _quantized_rows(x):
    q, d = quant.quantize_activations(x)
    return q, d, (np.asarray(q, np.float64) * np.asarray(d, np.float64)[..., None]).reshape(x.shape)


def check_lossy(y, x, w_exact):
    """y against the exact product: inside the activation-rounding bound, and not equal to it."""
    _, d, _ = _quantized_rows(x)
    w = np.asarray(w_exact, np.float64)
    exact = np.asarray(x, np.float64) @ w.T
    absw = np.abs(w).reshape(w.shape[0], -1, 32).sum(-1)            # [out, nb]
    bound = 0.5 * np.asarray(d, np.float64) @ absw.T                  # [..., out]
    err = np.abs(np.asarray(y, np.float64) - exact)
    slack = 1e-5 * np.abs(exact).max()
    assert (err <= bound + slack).all(), float((err - bound).max())
    assert err.max() > 10 * slack, "the product equals the exact one: the int8 path did not run"


def test_pack_roundtrip_and_layout(tensors):
    """pack_q8 then unpack_q8 gives the QTensor back bit for bit (real tensors, both kinds, a stack, and
    an output count that is not a multiple of 16)."""
    for name, w in tensors.items():
        p = quant.pack_q8(w)
        assert p.scale.dtype == jnp.float16  # GGUF's own float16 scales: stored as such (exact)
        back = quant.unpack_q8(p)
        for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(back)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = tensors["blk.0.attn_k.weight"]
    odd = jax.tree.map(lambda a: jnp.stack([a[:37], a[5:42]]), w)  # [2, 37, ...]
    p = quant.pack_q8(odd)
    assert p.shape == (2, 37, w.shape[-1]) and p.codes.shape[-5] == 3
    back = quant.unpack_q8(p)
    for a, b in zip(jax.tree.leaves(odd), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _float32_scales(w):
    """The same tensor with block scales that float16 cannot hold (so the packed form keeps float32)."""
    return w.replace(scale=w.scale * np.float32(1 + 2 ** -20))


@pytest.mark.parametrize("name", NAMES + ("blk.0.attn_q.weight:f32scales",))
def test_kernel_at_every_block_size(tensors, name):
    lib = q8a_lib()
    w = tensors[name.split(":")[0]]
    if name.endswith(":f32scales"):
        w = _float32_scales(w)
    p = quant.pack_q8(w)
    assert p.scale.dtype == (jnp.float32 if name.endswith(":f32scales") else jnp.float16)
    wd = np.asarray(quant.dequantize(w), np.float64)
    f = jax.jit(lib.call_q8a)
    rng = np.random.default_rng(0)
    for rows in ROWS:
        x = jnp.asarray(rng.standard_normal((rows, w.shape[-1])).astype(np.float32)
                        * rng.uniform(0.1, 10, (rows, 1)).astype(np.float32))
        y = f(x, p)
        _, _, xq = _quantized_rows(x)
        assert_kernel_close(y, xq @ wd.T)
        check_lossy(y, x, wd)


def test_layer_slices_shapes_xla_reference_and_zero_rows(model_q):
    """A LayerSlice reads its layer in place; 3-D inputs; the XLA reference path computes the same; an
    all-zero activation block (dx = 0) gives the offset-free exact zero contribution."""
    lib = q8a_lib()
    _, params = model_q
    stack = jax.tree.map(lambda a: a[:3], params["layers"]["w_down"])
    p = quant.pack_q8(stack)
    nat = jax.jit(functools.partial(quant.matmul, impl="native"))
    ref = jax.jit(functools.partial(quant.matmul, impl="xla"))
    assert 'custom_call_target="jaxdec_q8a_matmul' in nat.lower(jnp.ones((4, stack.shape[-1])), p.replace(
        codes=p.codes[0], scale=p.scale[0], offset=p.offset[0])).compile().as_text()
    for i in (0, 2):
        w = np.asarray(quant.dequantize(jax.tree.map(lambda a: a[i], stack)), np.float64)
        for shape in ((1, stack.shape[-1]), (2, 5, stack.shape[-1])):
            x = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
            x[..., :64] = 0.0  # two whole blocks of zeros
            x = jnp.asarray(x)
            s = quant.LayerSlice(p, jnp.int32(i))
            y = nat(x, s)
            assert_kernel_close(y, _quantized_rows(x)[2] @ w.T)
            assert_kernel_close(ref(x, s), _quantized_rows(x)[2] @ w.T)
    assert lib.has_q8a


@pytest.fixture(scope="module")
def q8_params(model_q):
    return quant.pack_params_q8(model_q[1])


def test_model_q8_close_to_exact_and_kernel_in_verify_block(model_q, q8_params, chat_prompt_ids):
    """Teacher-forced logits of the whole model with int8 activations against the exact q path: the
    next-token argmax agrees at >= 90 % of positions (lossy, never claimed exact) and the compiled T = 4
    verify block runs the int8 kernel for every layer matrix and the LM head."""
    q8a_lib()
    model, params = model_q
    ids = [i for p in chat_prompt_ids[:4] for i in p][:160]
    toks = jnp.asarray([ids], jnp.int32)
    pos = jnp.arange(len(ids))[None]
    f = jax.jit(lambda p, t, ps: model(p, t, ps, model.init_cache(1, 256)).logits)
    exact, lossy = np.asarray(f(params, toks, pos))[0], np.asarray(f(q8_params, toks, pos))[0]
    agree = float(np.mean(exact.argmax(-1) == lossy.argmax(-1)))
    assert agree >= 0.9, agree
    assert not np.array_equal(exact, lossy)
    hlo = jax.jit(lambda p, t, ps: model(p, t, ps, model.init_cache(1, 64)).logits).lower(
        q8_params, toks[:, :4], pos[:, :4]).compile().as_text()
    assert hlo.count('custom_call_target="jaxdec_q8a_matmul') >= 8  # 7 layer matrices in the scan + the head
    assert 'custom_call_target="jaxdec_q4_1_matmul' not in hlo


def test_load_option_and_bad_input():
    import jaxdec
    with pytest.raises(ValueError, match="activations='q8' needs weights='q'"):
        jaxdec.load(weights="f32", activations="q8")
    with pytest.raises(ValueError, match="activations must be one of"):
        jaxdec.load(weights="q", activations="int4")
    with pytest.raises(ValueError, match="pack_q8 needs a Q4_1 or Q8_0 QTensor"):
        quant.pack_q8(jnp.ones((16, 32)))


def test_mesh_refuses_q8_params_by_name(model_q, q8_params):
    from jaxdec import sharding
    mesh = sharding.make_mesh(1, 1)
    sharding.param_shardings(model_q[1], mesh, model_q[0])  # the exact q params place fine
    with pytest.raises(ValueError, match="activations='q8'.*one device"):
        sharding.param_shardings(q8_params, mesh, model_q[0])


@pytest.mark.slow  # ~40-70 s: the acceptance tier (issue 17 gives CI one minute)
def test_speculative_with_q8_matches_q8_greedy_up_to_near_ties(model_q, q8_params):
    """Speculative decoding over q8 weights against q8 greedy, at batch 1 and ragged batch 3 on the held-out
    should-help prompts, drafts accepted and rejected. Not bit-exact, and this says how far: the int8
    path quantizes each row on its own, but a verify block's activations differ from a 1-token step's by
    float noise (~1e-5 in the exact path), and rounding to the int8 grid turns some of that into whole
    grid steps, so block and step logits differ by up to the measured `block_vs_step_dlogit` (0.5-7 here,
    against 2e-5 for exact q). Every difference must be a near tie under that measured bound, in at most
    one of the three prompts."""
    q8a_lib()
    import neartie
    from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits
    from test_speculative import assert_accepts_and_rejects, heldout_prompt_ids
    from jaxdec import generate
    from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder
    model = model_q[0]
    prompts = heldout_prompt_ids()[:4]
    ref = generate(model, q8_params, prompts, method="greedy", max_new_tokens=32)
    logits = lazy_teacher_logits(model, q8_params, prompts, ref.tokens)
    dlogit = lazy_block_vs_step_dlogit(model, q8_params, prompts[0], 9)
    dec = SpeculativeDecoder(PromptLookupDrafter(num_tokens=8, max_ngram=3))
    assert len(prompts) == 3
    for bs in (1, 3):
        out = generate(model, q8_params, prompts, decoder=dec, max_new_tokens=32, batch_size=bs)
        neartie.assert_sequences_match([(f"q8 pld b{bs} prompt {i}", out.tokens[i], ref.tokens[i], logits[i])
                                        for i in range(len(prompts))], dlogit, max_excused_frac=0.34)
        assert_accepts_and_rejects(out.stats, f"q8 pld b{bs}")


def test_gradient_in_x_is_straight_through(tensors):
    """d/dx of the int8 product is that of the exact product (rounding has zero derivative almost everywhere,
    which would stop every gradient through a q8 model)."""
    q8a_lib()
    w = tensors["blk.0.attn_q.weight"]
    p = quant.pack_q8(w)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, w.shape[-1])).astype(np.float32))
    ct = jnp.asarray(rng.standard_normal((3, w.shape[-2])).astype(np.float32))
    g = jax.grad(lambda x: jnp.sum(quant.matmul(x, p, impl="native") * ct))(x)
    assert_kernel_close(g, np.asarray(ct) @ np.asarray(quant.dequantize(w)))
