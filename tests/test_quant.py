"""Block-quantized weights: bit-exact dequantization against gguf, and the fast matmuls against
``x @ dequantize(W).T`` (kernel tolerance of DESIGN.md: rtol 1e-5, atol 1e-6 * max|ref|).

The native CPU kernels are required: when they cannot be built or loaded, every native test FAILS
(with the build error), it never skips silently. A machine that cannot build them (no C++ compiler,
no x86-64 AVX2 CPU) opts out explicitly with ``JAXDEC_ALLOW_NO_NATIVE=1``: those tests are then skipped.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peer
from jaxdec import quant

# tensors of the default model, one per shape and kind that the model multiplies with
TENSORS = ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.attn_v.weight",
           "blk.3.attn_output.weight", "blk.7.ffn_gate.weight", "blk.12.ffn_up.weight", "blk.21.ffn_down.weight")
BATCHES = (1, 2, 3, 5, 8, 16, 32)  # activation rows: decode steps, verify blocks, batches


@pytest.fixture(scope="module")
def gguf_tensors():
    from gguf import GGUFReader, quants
    r = GGUFReader(peer.default_gguf_path())
    by_name = {t.name: t for t in r.tensors}
    out = {}
    for name in TENSORS:
        t = by_name[name]
        shape = tuple(int(s) for s in reversed(list(t.shape)))
        ref = quants.dequantize(t.data, t.tensor_type).reshape(shape)  # gguf's own float32 dequantization
        out[name] = (t.tensor_type.name, quant.from_gguf_bytes(np.asarray(t.data), t.tensor_type.name.lower(), shape),
                     ref)
    return out


def _can_build_native() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


NATIVE = _can_build_native()  # what this machine looks like; reported when the kernels are missing
ALLOW_NO_NATIVE = os.environ.get("JAXDEC_ALLOW_NO_NATIVE", "0") == "1"


def require_native():
    """The native kernels, or a failure naming the reason (a skip only with JAXDEC_ALLOW_NO_NATIVE=1)."""
    lib = quant.native_kernels()
    if lib is None:
        why = (f"native CPU kernels unavailable ({quant.native._NATIVE_STATE.get('error')}; this machine "
               f"{'should build them' if NATIVE else 'has no C++ compiler or no x86-64 AVX2/FMA CPU'})")
        if ALLOW_NO_NATIVE:
            pytest.skip(why + ", JAXDEC_ALLOW_NO_NATIVE=1")
        pytest.fail(why + ": set JAXDEC_ALLOW_NO_NATIVE=1 only on a machine that cannot build them")
    return lib


@pytest.fixture
def native_lib():
    return require_native()


needs_native = pytest.mark.usefixtures("native_lib")


def assert_kernel_close(y, ref):
    y, ref = np.asarray(y), np.asarray(ref)
    assert y.shape == ref.shape and np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))


def test_both_kinds_are_covered(gguf_tensors):
    assert {k for k, _, _ in gguf_tensors.values()} == {"Q4_1", "Q8_0"}


@pytest.mark.parametrize("name", TENSORS)
def test_dequantize_is_bit_exact(gguf_tensors, name):
    _, q, ref = gguf_tensors[name]
    assert quant.dequantize(q).dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(q)), ref)  # no FMA contraction


def test_layer_slice_dequantizes_its_layer(model_q):
    _, params = model_q
    stacked = params["layers"]["w_down"]
    for i in (0, 13, stacked.codes.shape[0] - 1):
        one = jax.tree.map(lambda a: a[i], stacked)
        got = jax.jit(quant.dequantize)(quant.LayerSlice(stacked, jnp.int32(i)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(quant.dequantize(one)))


def _xs(n_in, batch, seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, n_in), np.float32))


def _f32_stack(layers, n_out, n_in, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((layers, n_out, n_in), np.float32))


def _x(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


F32_ROWS = (1, 2, 3, 5, 8, 11, 16, 32)


@pytest.mark.parametrize("impl", ["xla", "native"])
@pytest.mark.parametrize("name", TENSORS)
def test_matmul_matches_dequantized_product(gguf_tensors, name, impl):
    if impl == "native":
        require_native()
    _, q, ref_w = gguf_tensors[name]
    f = jax.jit(functools.partial(quant.matmul, impl=impl))
    for batch in BATCHES:
        x = _xs(ref_w.shape[1], batch, seed=batch)
        assert_kernel_close(f(x, q), np.asarray(x) @ ref_w.T)


@pytest.mark.parametrize("impl", ["xla", "native"])
def test_matmul_layer_slices_and_shapes(model_q, impl):
    """Stacked layer weights read in place by a traced index; leading dims, > 8 rows, 1 row of 3-D x."""
    if impl == "native":
        require_native()
    _, params = model_q
    f = jax.jit(functools.partial(quant.matmul, impl=impl))
    for name in ("wq", "wk", "w_gate", "w_down"):
        stacked = params["layers"][name]
        n_layers, n_in = stacked.codes.shape[0], stacked.shape[-1]
        for i in (0, n_layers // 2, n_layers - 1):
            w = quant.dequantize(jax.tree.map(lambda a: a[i], stacked))
            for shape in ((1, n_in), (3, n_in), (8, n_in), (11, n_in), (2, 5, n_in), (1, 1, n_in)):
                x = jnp.asarray(np.random.default_rng(i).standard_normal(shape, np.float32))
                got = f(x, quant.LayerSlice(stacked, jnp.int32(i)))
                assert_kernel_close(got, np.asarray(x) @ np.asarray(w).T)


@pytest.mark.parametrize("impl", ["xla", "native"])
def test_float16_block_scales(gguf_tensors, impl):
    """GGUF stores block scales as float16; QTensors holding them that way give the same products."""
    if impl == "native":
        require_native()
    f = jax.jit(functools.partial(quant.matmul, impl=impl))
    for name in ("blk.7.ffn_gate.weight", "token_embd.weight"):
        _, q, ref_w = gguf_tensors[name]
        q16 = q.replace(scale=q.scale.astype(jnp.float16),
                        offset=None if q.offset is None else q.offset.astype(jnp.float16))
        np.testing.assert_array_equal(np.asarray(quant.dequantize(q16)), ref_w)
        for batch in (1, 8):
            x = _xs(ref_w.shape[1], batch, seed=batch)
            assert_kernel_close(f(x, q16), np.asarray(x) @ ref_w.T)


@needs_native
def test_native_path_runs_without_materializing_weights(gguf_tensors):
    """The custom call is what runs (no path that never runs), and no float32 weight-sized buffer exists."""
    assert quant.native_kernels(required=True) is not None
    for name in ("blk.7.ffn_gate.weight", "token_embd.weight"):
        _, q, ref_w = gguf_tensors[name]
        x = _xs(ref_w.shape[1], 1, 0)
        hlo = jax.jit(functools.partial(quant.matmul, impl="native")).lower(x, q).compile().as_text()
        assert f'custom_call_target="{quant.native._TARGETS[q.kind]}"' in hlo
        out, n_in = ref_w.shape
        assert f"f32[{out},{n_in}]" not in hlo and f"f32[{out},{n_in // 32},32]" not in hlo
        xla_hlo = jax.jit(functools.partial(quant.matmul, impl="xla")).lower(x, q).compile().as_text()
        assert "custom_call_target" not in xla_hlo


@needs_native
def test_avx2_build_matches(gguf_tensors, tmp_path):
    """The AVX2 variant of the kernels (for CPUs without AVX-512) gives the same products (quantized and
    float32 weights)."""
    lib = quant.native._Native(quant.build_native(("-mno-avx512f",), out_dir=str(tmp_path)), suffix="_avx2_test")
    assert lib.isa == "avx2"
    f = jax.jit(lib.call)
    for name in ("blk.0.attn_q.weight", "blk.21.ffn_down.weight", "token_embd.weight"):
        _, q, ref_w = gguf_tensors[name]
        for batch in (1, 3, 8, 11):
            x = _xs(ref_w.shape[1], batch, seed=batch)
            assert_kernel_close(f(x, q), np.asarray(x) @ ref_w.T)
    stack = _f32_stack(2, 37, 40)  # and the float32 kernel (tail of K, N not a multiple of the tile)
    g = jax.jit(lib.call_f32)
    for rows in F32_ROWS:
        x = _x((rows, 40), rows)
        assert_kernel_close(g(x, stack, jnp.int32(1)), np.asarray(x) @ np.asarray(stack[1]).T)


@needs_native
def test_native_matmul_differentiates_in_x(gguf_tensors):
    _, q, ref_w = gguf_tensors["blk.3.attn_output.weight"]
    x = _xs(ref_w.shape[1], 2, 0)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((2, ref_w.shape[0]), np.float32))
    g = jax.grad(lambda x: jnp.sum(quant.matmul(x, q, impl="native") * ct))(x)
    assert_kernel_close(g, np.asarray(ct) @ ref_w)


@pytest.mark.parametrize("impl", ["xla", "native"])
def test_quantized_greedy_tokens_equal_f32(model_f32, model_q, chat_prompt_ids, impl):
    """Greedy decoding with the block-quantized weights gives the float32 weights' tokens."""
    from jaxdec.core.generate import generate
    model, pf = model_f32
    _, pq = model_q
    if impl == "native":
        require_native()  # the default model (matmul_impl None = auto) runs the kernels: its programs are shared
    else:
        model = dataclasses.replace(model, matmul_impl="xla")  # chosen at trace time: a model of its own
    prompts = chat_prompt_ids[:3]
    n = 24 if impl == "native" else 8
    want = generate(model, pf, prompts, max_new_tokens=n, stop_ids=()).tokens
    got = generate(model, pq, prompts, max_new_tokens=n, stop_ids=()).tokens
    assert got == want


def _decode_step_hlo(model, params):
    """Compiled HLO text of one batch-1 decode step of the model through its KV cache."""
    cache = model.init_cache(1, 64)
    tok = jnp.zeros((1, 1), jnp.int32)
    pos = jnp.full((1, 1), 5, jnp.int32)
    return jax.jit(lambda p, t, x, c: model(p, t, x, c).logits).lower(params, tok, pos, cache).compile().as_text()


def test_model_decode_step_runs_the_native_kernels(model_f32, model_q):
    """No path that never runs: the default model's compiled decode step calls the native kernels (Q4_1
    layer weights, the Q8_0 tied LM head; float32 layer weights through the float32 kernel). Negative
    control: the forced XLA fallback (``matmul_impl="xla"``, what a missing kernel silently gives) has
    no custom call, so this check fails on it."""
    require_native()
    model, pf = model_f32
    _, pq = model_q
    hq = _decode_step_hlo(model, pq)
    for kind in ("q4_1", "q8_0"):
        assert f'custom_call_target="{quant.native._TARGETS[kind]}"' in hq, kind
    assert f'custom_call_target="{quant.native._TARGETS["f32"]}"' in _decode_step_hlo(model, pf)
    forced = _decode_step_hlo(dataclasses.replace(model, matmul_impl="xla"), pq)
    assert not any(f'custom_call_target="{t}"' in forced for t in quant.native._TARGETS.values())


# ------------------------------------------------------------------- float32 layer stacks, read in place
@needs_native
def test_f32_kernel_matches_product():
    """The float32 kernel, called directly: any row count, K not a multiple of 16 (and of 8), N not a
    multiple of the outputs per pass, each layer of the stack (and a 2-D matrix as layer 0)."""
    lib = quant.native_kernels(required=True)
    stack = _f32_stack(3, 37, 40)
    f = jax.jit(lib.call_f32)
    for rows in F32_ROWS:
        x = _x((rows, 40), rows)
        outs = []
        for i in range(3):
            got = f(x, stack, jnp.int32(i))
            assert_kernel_close(got, np.asarray(x) @ np.asarray(stack[i]).T)
            outs.append(np.asarray(got))
        assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])  # the index selects
        assert_kernel_close(f(x, stack[1], 0), np.asarray(x) @ np.asarray(stack[1]).T)
    x = _x((2, 5, 40), 7)  # leading dims are rows
    assert_kernel_close(f(x, stack, jnp.int32(2)), np.einsum("bti,oi->bto", np.asarray(x), np.asarray(stack[2])))
    for n_in in (7, 16, 33):  # shorter than one vector, exactly one, one plus a tail
        s2 = _f32_stack(2, 5, n_in, seed=n_in)
        for rows in (1, 3):
            x = _x((rows, n_in), n_in)
            assert_kernel_close(f(x, s2, jnp.int32(1)), np.asarray(x) @ np.asarray(s2[1]).T)


@needs_native
def test_f32_layer_slice_matmul_runs_the_kernel(monkeypatch):
    """`matmul` on a float32 LayerSlice: the custom call for up to `f32_native_max_rows()` rows (and no
    copy of the layer's matrix), XLA's dot of the sliced layer above it and with JAXDEC_QMATMUL=xla."""
    stack = _f32_stack(3, 37, 40)
    target = quant.native._TARGETS["f32"]
    assert quant.f32_native_max_rows() >= 8
    f = jax.jit(quant.matmul)
    for shape in ((1, 40), (3, 40), (2, 4, 40), (quant.f32_native_max_rows(), 40)):
        x = _x(shape, 1)
        for i in (0, 2):
            w = quant.LayerSlice(stack, jnp.int32(i))
            assert_kernel_close(f(x, w), np.einsum("...i,oi->...o", np.asarray(x), np.asarray(stack[i])))
            hlo = f.lower(x, w).compile().as_text()
            assert f'custom_call_target="{target}"' in hlo and "f32[37,40]" not in hlo
    x = _x((quant.f32_native_max_rows() + 1, 40), 2)  # above the threshold: XLA
    w = quant.LayerSlice(stack, jnp.int32(1))
    hlo = f.lower(x, w).compile().as_text()
    assert "custom_call_target" not in hlo
    assert_kernel_close(f(x, w), np.asarray(x) @ np.asarray(stack[1]).T)
    x = _x((2, 40), 3)
    monkeypatch.setenv("JAXDEC_QMATMUL", "xla")  # read at trace time
    g = jax.jit(quant.matmul)
    assert "custom_call_target" not in g.lower(x, w).compile().as_text()
    assert_kernel_close(g(x, w), np.asarray(x) @ np.asarray(stack[1]).T)
    monkeypatch.setenv("JAXDEC_QMATMUL", "auto")
    monkeypatch.setenv("JAXDEC_F32_NATIVE_MAX_ROWS", "1")
    assert "custom_call_target" not in jax.jit(quant.matmul).lower(x, w).compile().as_text()


@needs_native
def test_f32_layer_slice_gradients():
    """Gradients in x and in the whole weight stack through the kernel equal the einsum's."""
    stack = _f32_stack(3, 37, 40)
    x = _x((2, 3, 40), 4)
    ct = _x((2, 3, 37), 5)

    def loss(mm):
        return lambda x, s: jnp.sum(jnp.tanh(mm(x, quant.LayerSlice(s, jnp.int32(1)))) * ct)

    native = lambda x, w: quant.matmul(x, w, impl="native")
    ref = lambda x, w: jnp.einsum("...i,oi->...o", x, w.materialize())
    hlo = jax.jit(jax.grad(loss(native), argnums=(0, 1))).lower(x, stack).compile().as_text()
    assert f'custom_call_target="{quant.native._TARGETS["f32"]}"' in hlo
    gx, gs = jax.jit(jax.grad(loss(native), argnums=(0, 1)))(x, stack)
    rx, rs = jax.grad(loss(ref), argnums=(0, 1))(x, stack)
    assert_kernel_close(gx, rx)
    assert_kernel_close(gs, rs)
    assert not np.asarray(gs[0]).any() and not np.asarray(gs[2]).any()  # only the used layer
    assert_kernel_close(jax.grad(loss(native))(x, stack), rx)  # x alone


def test_scan_layer_params_keeps_float_matrix_stacks(model_f32):
    """float32 matrix stacks come back as LayerSlices (norms stay scanned); materializing one gives the layer."""
    _, params = model_f32
    xs, pick = quant.scan_layer_params(params["layers"])
    assert "attn_norm" in xs and "w_gate" not in xs and "wq" not in xs
    p = pick(jax.tree.map(lambda a: a[4], xs), 4)
    assert isinstance(p["w_gate"], quant.LayerSlice) and p["w_gate"].kind == "f32"
    assert p["w_gate"].shape == params["layers"]["w_gate"].shape[1:]
    np.testing.assert_array_equal(np.asarray(quant.dequantize(p["w_down"])), np.asarray(params["layers"]["w_down"][4]))
