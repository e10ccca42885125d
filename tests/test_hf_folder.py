"""HF checkpoint folders (config.json + safetensors) -> jaxdec, checked against transformers' own forward.

Each case builds a tiny random model with transformers (eager attention, float32), perturbs every weight
so norms and biases are not trivial, saves it with `save_pretrained`, loads the folder with
`load_hf_folder` and compares logits per position (max|d| <= 1e-4 * max|peer|) for a full prefix and for
>= 16 one-token decode steps through jaxdec's cache against the peer's full-sequence forward.
"""
from __future__ import annotations

import functools

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxdec.models.hf_loader import config_from_hf, load_hf_folder  # noqa: E402

VOCAB, B, T, PREFIX = 128, 2, 24, 8  # T - PREFIX = 16 decode steps
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
REL_TOL = 1e-4


def _hf_config(kind: str, **kw):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[kind]
    args = dict(SMALL)
    if kind != "qwen2":
        args.update(bos_token_id=1, eos_token_id=2)
    args.update(kw)
    return cls(**args)


def _peer(kind: str, seed: int = 0, **kw):
    """A tiny transformers model with every parameter randomised (float32, eager attention)."""
    cfg = _hf_config(kind, **kw)
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                      dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)
    return m.eval()


def _save(model, folder, **kw):
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return str(folder)


def _tokens(seed=0, b=B, t=T):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(b, t)).astype(np.int32)


def _peer_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _fwd(model, p, tok, pos, cache):
    out = model(p, tok, pos, cache)
    return out.logits, out.cache


def _check_close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    d = np.abs(ours - ref).max(-1)
    bound = REL_TOL * np.abs(ref).max(-1)
    worst = np.unravel_index(np.argmax(d / bound), d.shape)
    assert np.all(d <= bound), f"{what}: max|d|={d[worst]:.3g} > {bound[worst]:.3g} at {worst}"
    return float(d.max())


def _check_folder(folder, peer_model, seed=0):
    """Full-sequence logits and 16 cached decode steps of jaxdec vs the peer's full forward."""
    model, params = load_hf_folder(folder)
    tokens = _tokens(seed)
    ref = _peer_logits(peer_model, tokens)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    logits, _ = _fwd(model, params, jnp.asarray(tokens), jnp.asarray(pos), model.init_cache(B, T))
    _check_close(logits, ref, "full forward")
    logits, cache = _fwd(model, params, jnp.asarray(tokens[:, :PREFIX]), jnp.asarray(pos[:, :PREFIX]),
                         model.init_cache(B, T))
    _check_close(logits, ref[:, :PREFIX], "prefill")
    for t in range(PREFIX, T):
        step_pos = jnp.full((B, 1), t, jnp.int32)
        logits, cache = _fwd(model, params, jnp.asarray(tokens[:, t:t + 1]), step_pos, cache)
        _check_close(logits[:, 0], ref[:, t], f"decode step at position {t}")
    assert int(cache.lengths[0]) == T
    return model, params


# ---------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama(tmp_path, tie):
    peer = _peer("llama", seed=1, tie_word_embeddings=tie, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 5000.0})
    model, params = _check_folder(_save(peer, tmp_path), peer)
    c = model.config
    assert (c.tie_embeddings, "lm_head" in params) == (tie, not tie)
    assert c.rope_theta == 5000.0 and c.sliding_window is None and not c.qkv_bias
    assert (c.bos_id, c.eos_ids, c.head_dim, c.num_kv_heads) == (1, (2,), 16, 2)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_qwen2_bias(tmp_path, tie):
    peer = _peer("qwen2", seed=2, tie_word_embeddings=tie, eos_token_id=[3, 4])
    assert peer.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    model, params = _check_folder(_save(peer, tmp_path), peer)
    c = model.config
    assert c.qkv_bias and c.sliding_window is None and c.eos_ids == (3, 4)
    assert params["layers"]["bq"].shape == (2, 64) and params["layers"]["bk"].shape == (2, 32)


def _assert_window_matters(kind, seed, window_kw, nowindow_kw):
    """The peer really applies the window: same weights, no window -> different logits past it."""
    win = _peer(kind, seed=seed, **window_kw)
    full = _peer(kind, seed=seed, **nowindow_kw)
    full.load_state_dict(win.state_dict())
    tokens = _tokens(seed)
    a, b = _peer_logits(win, tokens), _peer_logits(full, tokens)
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-6)  # within the window: same
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-2  # beyond it: the window changes the logits
    return win


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mistral_sliding_window(tmp_path, tie):
    peer = _assert_window_matters("mistral", 3, dict(sliding_window=4, tie_word_embeddings=tie),
                                  dict(sliding_window=None, tie_word_embeddings=tie))
    model, _ = _check_folder(_save(peer, tmp_path), peer, seed=3)
    assert model.config.sliding_window == 4 and T > 4


def test_qwen2_sliding_window_all_layers(tmp_path):
    peer = _assert_window_matters(
        "qwen2", 4, dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
        dict(use_sliding_window=False, sliding_window=4))
    model, _ = _check_folder(_save(peer, tmp_path), peer, seed=4)
    assert model.config.sliding_window == 4


def test_qwen2_sliding_window_off(tmp_path):
    # use_sliding_window false -> transformers drops the window; so does jaxdec.
    peer = _peer("qwen2", seed=5, use_sliding_window=False, sliding_window=4)
    model, _ = _check_folder(_save(peer, tmp_path), peer, seed=5)
    assert model.config.sliding_window is None


def test_qwen2_window_only_above_max_window_layers(tmp_path):
    # use_sliding_window true but max_window_layers (28 by default) >= num layers: no layer slides.
    peer = _peer("qwen2", seed=6, use_sliding_window=True, sliding_window=4)
    assert set(peer.config.layer_types) == {"full_attention"}
    folder = _save(peer, tmp_path)
    model, _ = _check_folder(folder, peer, seed=6)
    assert model.config.sliding_window is None
    # the same rule when config.json lacks layer_types (older files)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg.pop("layer_types")
    assert config_from_hf(cfg).sliding_window is None
    cfg["max_window_layers"] = 0
    assert config_from_hf(cfg).sliding_window == 4


def test_sharded_bf16(tmp_path):
    import copy
    peer = _peer("llama", seed=7)
    folder = _save(copy.deepcopy(peer).to(torch.bfloat16), tmp_path, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    shards = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert len(shards) > 1
    from safetensors import safe_open
    with safe_open(shards[0], framework="numpy") as h:
        assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"BF16"}
    with torch.no_grad():  # the f32 peer on exactly the stored bf16 values (its RoPE buffer stays f32)
        for prm in peer.parameters():
            prm.copy_(prm.to(torch.bfloat16).float())
    _check_folder(folder, peer, seed=7)


# ---------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_ok")
    return _save(_peer("llama", seed=8), d)


def _copy_with_config(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        data = open(os.path.join(src, f), "rb").read()
        open(os.path.join(dst, f), "wb").write(data)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    edit(cfg)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_hf_folder(tmp_path / "nope")


def test_missing_config(tmp_path, llama_folder):
    d = _copy_with_config(llama_folder, tmp_path / "m", lambda c: None)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_folder(d)


def test_no_safetensors(tmp_path, llama_folder):
    d = _copy_with_config(llama_folder, tmp_path / "m", lambda c: None)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_hf_folder(d)


def test_unsupported_model_type(tmp_path, llama_folder):
    d = _copy_with_config(llama_folder, tmp_path / "m", lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_hf_folder(d)


@pytest.mark.parametrize("edit", [
    lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192}),
    lambda c: (c.pop("rope_parameters"), c.update(rope_theta=1e4, rope_scaling={"type": "dynamic",
                                                                               "factor": 2.0})),
], ids=["linear", "llama3", "legacy-dynamic"])
def test_unsupported_rope_scaling(tmp_path, llama_folder, edit):
    d = _copy_with_config(llama_folder, tmp_path / "m", edit)
    with pytest.raises(ValueError, match="unsupported RoPE scaling"):
        load_hf_folder(d)


def test_legacy_rope_keys(tmp_path, llama_folder):
    def edit(c):
        c.pop("rope_parameters")
        c.update(rope_theta=123.0, rope_scaling=None)
    d = _copy_with_config(llama_folder, tmp_path / "m", edit)
    model, _ = load_hf_folder(d)
    assert model.config.rope_theta == 123.0


def test_missing_tensor(tmp_path, llama_folder):
    from safetensors.numpy import load_file, save_file
    d = _copy_with_config(llama_folder, tmp_path / "m", lambda c: None)
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf_folder(d)


def test_unexpected_tensor_and_shape(tmp_path, llama_folder):
    from safetensors.numpy import load_file, save_file
    d = _copy_with_config(llama_folder, tmp_path / "m", lambda c: None)
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_hf_folder(d)
    d2 = _copy_with_config(llama_folder, tmp_path / "m2", lambda c: c.update(intermediate_size=80))
    with pytest.raises(ValueError, match="has shape"):
        load_hf_folder(d2)


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c.update(mlp_bias=True), "mlp_bias"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_features(tmp_path, llama_folder, edit, msg):
    d = _copy_with_config(llama_folder, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=msg):
        load_hf_folder(d)


def test_qwen2_mixed_window_layers_refused():
    cfg = _hf_config("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1).to_dict()
    assert cfg["layer_types"] == ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention"):
        config_from_hf(cfg)


def test_eos_ids_from_generation_config():
    cfg = _hf_config("llama").to_dict()
    c = config_from_hf(cfg, {"eos_token_id": [2, 7], "pad_token_id": 9})
    assert c.eos_ids == (2, 7) and c.bos_id == 1 and c.pad_id == 9
