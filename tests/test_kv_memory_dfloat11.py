"""DFloat11-style lossless bfloat16 compression: bit-identical round trips."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdec.compress.dfloat11 import BLOCK, MAX_LEN, decode, encode, huffman_lengths


def _bits(x):
    return np.asarray(x).view(np.uint16)


@pytest.mark.parametrize("shape", [(257, 129), (BLOCK,), (3,)])
def test_round_trip_bit_identical(shape):
    rng = np.random.default_rng(0)
    w = (rng.normal(size=shape) * 0.02).astype(jnp.bfloat16)
    flat = w.reshape(-1)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e38, 1.0], np.float32)
    flat[: min(flat.size, specials.size)] = specials[: flat.size].astype(jnp.bfloat16)
    t = encode(w)
    out = jax.jit(lambda: decode(t))()
    assert out.dtype == jnp.bfloat16 and out.shape == w.shape
    np.testing.assert_array_equal(_bits(out), _bits(w))
    if w.size > 1000:
        assert t.ratio(with_tables=False) < 0.8  # ~11 bits per weight (decode tables are per tensor)


def test_skewed_frequencies_respect_max_len_and_prefix_property():
    freq = np.zeros(256, np.int64)
    freq[:40] = (10 ** np.linspace(9, 0, 40)).astype(np.int64)
    ln = huffman_lengths(freq)
    assert ln.max() <= MAX_LEN and np.all(ln[:40] > 0) and np.all(ln[40:] == 0)
    assert np.sum(2.0 ** -ln[:40]) <= 1.0 + 1e-12  # Kraft


def test_rejects_non_bf16():
    with pytest.raises(ValueError, match="bfloat16"):
        encode(np.zeros(4, np.float32))


# ------------------------------------------------------------------ DFloat11 inside the default model
@pytest.fixture(scope="module")
def df11_models(model_f32):
    """(model, bfloat16 params, DFloat11 params), the DFloat11 ones from the public `jaxdec.load(weights="df11")`."""
    import jaxdec
    from jaxdec.compress.dfloat11 import bf16_params
    model, params = model_f32
    loaded = jaxdec.load(weights="df11")
    assert loaded.model == model
    return model, bf16_params(params), loaded.params


def test_model_layers_decode_bit_identical(df11_models):
    from jaxdec.compress.dfloat11 import LAYER_MATRICES, DF11Stack, decode_layer
    _, bf16, df11 = df11_models
    dec = jax.jit(decode_layer)
    for k in LAYER_MATRICES:
        s = df11["layers"][k]
        assert isinstance(s, DF11Stack) and s.shape == bf16["layers"][k].shape
        for i in (0, s.shape[0] // 2, s.shape[0] - 1):
            np.testing.assert_array_equal(_bits(dec(s, i)), _bits(bf16["layers"][k][i]), err_msg=f"{k}[{i}]")


def test_model_keeps_only_compressed_bytes(df11_models):
    """Between uses only the compressed bytes exist: the params hold no bfloat16/float32 layer matrix,
    they are ~70% of the bfloat16 bytes, and the compiled forward needs only a few layers' worth of
    scratch memory more than the uncompressed bfloat16 forward (each layer's matrices are decoded inside
    the layer scan; decoding all layers up front would add the whole decoded size)."""
    from jaxdec.compress.dfloat11 import LAYER_MATRICES
    model, bf16, df11 = df11_models
    comp = sum(df11["layers"][k].nbytes() for k in LAYER_MATRICES)
    plain = sum(bf16["layers"][k].size * 2 for k in LAYER_MATRICES)
    assert comp < 0.75 * plain, (comp, plain)
    for k in LAYER_MATRICES:
        leaves = jax.tree.leaves(df11["layers"][k])
        assert all(a.dtype in (jnp.uint8, jnp.int32) for a in leaves), k
    cache = model.init_cache(1, 64)
    toks = jnp.zeros((1, 4), jnp.int32)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    fwd = jax.jit(lambda p, c: model(p, toks, pos, c).logits)
    mem_df11 = fwd.lower(df11, cache).compile().memory_analysis()
    mem_bf16 = fwd.lower(bf16, cache).compile().memory_analysis()
    if mem_df11 is None or mem_bf16 is None:
        pytest.skip("this backend reports no memory analysis")
    one_layer = plain // model.num_layers
    extra = mem_df11.temp_size_in_bytes - mem_bf16.temp_size_in_bytes
    assert extra < 4 * one_layer, (extra, one_layer, plain)


def test_df11_model_tokens_equal_bf16(df11_models, chat_prompt_ids):
    from jaxdec import generate
    model, bf16, df11 = df11_models
    prompts = chat_prompt_ids[:2]
    a = generate(model, bf16, prompts, max_new_tokens=16, stop_ids=())
    b = generate(model, df11, prompts, max_new_tokens=16, stop_ids=())
    assert a.tokens == b.tokens and all(len(t) == 16 for t in a.tokens)


def test_load_rejects_unknown_weights():
    import jaxdec
    with pytest.raises(ValueError, match="weights must be one of"):
        jaxdec.load(weights="fp8")
