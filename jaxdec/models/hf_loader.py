"""Load a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``) into jaxdec's Llama model.

Supported ``model_type``: ``llama``, ``qwen2``, ``mistral``. Weights may sit in one ``model.safetensors``
or in shards listed by ``model.safetensors.index.json``; F32/F16/BF16 tensors are read with
``safetensors`` (numpy framework; BF16 is widened to float32 by hand since numpy has no bfloat16).

HF stores q/k projections for the half-rotation RoPE that `jaxdec.models.llama` uses, so no row
permutation is needed (unlike GGUF). HF linear weights are ``[out, in]``, as jaxdec's.

Conventions matched to transformers 5.24:

* Sliding window: HF masks key ``k`` for query ``q`` unless ``q - window < k <= q``, i.e. it keeps
  ``q - k < window``; jaxdec's reference attention keeps exactly the same keys, so ``sliding_window``
  is copied unchanged.
* Mistral: ``sliding_window`` (may be null) applies to every layer.
* Qwen2: the window is used only when ``use_sliding_window`` is true, and then only on layers listed as
  ``"sliding_attention"`` in ``layer_types`` (when the file lacks ``layer_types``, transformers derives it:
  layer ``i`` slides iff ``i >= max_window_layers``, default 28). jaxdec has a single window for all
  layers, so a mix of sliding and full layers is refused; all-full gives no window.
* EOS ids: ``config.json``'s ``eos_token_id`` (int or list), followed by any further ids from
  ``generation_config.json`` (what HF ``generate`` stops on).

Anything the model cannot represent (rope scaling other than the default, o_proj / MLP biases, an
activation other than SiLU, unexpected tensors) raises instead of being silently ignored.
"""
from __future__ import annotations

import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np

from jaxdec.models.config import LlamaConfig
from jaxdec.models.llama import LlamaModel

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config default
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------- config


def _read_json(path: str) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _as_id_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]


def _rope_theta(cfg: dict, default: float = 10000.0) -> float:
    """RoPE base from ``rope_parameters`` (transformers >= 5) or legacy ``rope_theta``/``rope_scaling``;
    raises on any scaling other than the default."""
    rp = cfg.get("rope_parameters")
    candidates = []
    if isinstance(rp, dict):
        if rp and all(isinstance(v, dict) for v in rp.values()):  # per-layer-type parameters
            candidates.extend(rp.items())
        else:
            candidates.append(("rope_parameters", rp))
    elif rp is not None:
        raise ValueError(f"unrecognised rope_parameters in config.json: {rp!r}")
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ValueError(f"unrecognised rope_scaling in config.json: {scaling!r}")
        candidates.append(("rope_scaling", scaling))
    thetas = set()
    for key, p in candidates:
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(
                f"unsupported RoPE scaling in config.json ({key}: rope_type={kind!r}, {p!r}); jaxdec "
                "implements only plain RoPE and refuses to ignore the scaling silently")
        prf = p.get("partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise ValueError(f"unsupported partial_rotary_factor={prf!r} in config.json ({key})")
        if p.get("rope_theta") is not None:
            thetas.add(float(p["rope_theta"]))
    if cfg.get("rope_theta") is not None:
        thetas.add(float(cfg["rope_theta"]))
    if len(thetas) > 1:
        raise ValueError(f"config.json gives several RoPE bases {sorted(thetas)}; jaxdec uses one")
    return thetas.pop() if thetas else default


def _qwen2_window(cfg: dict, num_layers: int):
    if not cfg.get("use_sliding_window", False) or cfg.get("sliding_window") is None:
        return None  # transformers sets sliding_window = None unless use_sliding_window
    window = int(cfg["sliding_window"])
    types = cfg.get("layer_types")
    if types is None:
        mwl = cfg.get("max_window_layers", _QWEN2_DEFAULT_MAX_WINDOW_LAYERS)
        types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"config.json layer_types has {len(types)} entries for {num_layers} layers")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"unsupported layer_types {sorted(unknown)} in config.json")
    sliding = [t == "sliding_attention" for t in types]
    if all(sliding):
        return window
    if not any(sliding):
        return None
    raise ValueError(
        f"Qwen2 config mixes sliding-window and full-attention layers (layer_types={types}); jaxdec "
        "applies one sliding window to every layer and cannot represent this model")


def config_from_hf(cfg: dict, generation_config: dict | None = None) -> LlamaConfig:
    """A `LlamaConfig` from a parsed HF ``config.json`` (and optional ``generation_config.json``)."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r} in config.json; supported: {SUPPORTED_MODEL_TYPES}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {act!r} (jaxdec's MLP is SwiGLU with SiLU)")
    if cfg.get("mlp_bias", False):
        raise ValueError("unsupported mlp_bias=true: jaxdec's MLP has no biases")
    if mt == "llama" and cfg.get("attention_bias", False):
        raise ValueError("unsupported attention_bias=true for llama (it adds an o_proj bias jaxdec lacks)")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        inter = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise ValueError(f"config.json lacks required key {e.args[0]!r}") from None
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    if mt == "qwen2":
        window = _qwen2_window(cfg, layers)
    elif mt == "mistral":
        window = cfg.get("sliding_window")
        window = int(window) if window is not None else None
    else:
        window = None
    gen = generation_config or {}
    eos = _as_id_list(cfg.get("eos_token_id"))
    for e in _as_id_list(gen.get("eos_token_id")):
        if e not in eos:
            eos.append(e)
    bos = cfg.get("bos_token_id", gen.get("bos_token_id"))
    pad = cfg.get("pad_token_id")
    if pad is None:
        pad = gen.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=int(kv), head_dim=int(head_dim),
        rope_theta=_rope_theta(cfg), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=(mt == "qwen2"),
        sliding_window=window, max_position=int(cfg.get("max_position_embeddings") or 8192),
        bos_id=int(bos) if bos is not None else None, eos_ids=tuple(eos), pad_id=int(pad), name=mt)


# ----------------------------------------------------------------------------------------------- tensors


def _safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


class _TensorStore:
    """Name -> float32 numpy array over one or more safetensors files."""

    def __init__(self, folder: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map'")
            self.where = {k: os.path.join(folder, v) for k, v in weight_map.items()}
            for f in sorted(set(self.where.values())):
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"shard {os.path.basename(f)!r} listed in {index} is missing")
        else:
            files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            if not files:
                extra = " (only PyTorch .bin weights found; convert them to safetensors)" if glob.glob(
                    os.path.join(folder, "*.bin")) else ""
                raise FileNotFoundError(f"no *.safetensors weights in {folder!r}{extra}")
            self.where = {}
            from safetensors import safe_open
            for f in files:
                with safe_open(f, framework="numpy") as h:
                    for k in h.keys():
                        self.where[k] = f
        self.used: set[str] = set()
        self._headers: dict[str, tuple[dict, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        self.used.add(name)
        path = self.where[name]
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as h:
            if name not in h.keys():
                raise ValueError(f"tensor {name!r} is not in {os.path.basename(path)!r} as the index claims")
            dt = h.get_slice(name).get_dtype()
            if dt in ("F32", "F16", "F64"):
                return np.asarray(h.get_tensor(name), np.float32)
        if dt == "BF16":
            return self._bf16(path, name)
        raise ValueError(f"tensor {name!r} has unsupported dtype {dt} (expected F32, F16 or BF16)")

    def _bf16(self, path: str, name: str) -> np.ndarray:
        if path not in self._headers:
            self._headers[path] = _safetensors_header(path)
        header, base = self._headers[path]
        info = header[name]
        start, end = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(base + start)
            raw = f.read(end - start)
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(info["shape"])


# ----------------------------------------------------------------------------------------------- loading


def _load_params(store: _TensorStore, c: LlamaConfig, dtype):
    def get(name, shape):
        w = store.get(name)
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, config.json implies {tuple(shape)}")
        return w

    e, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
    qd, kd = c.num_heads * hd, c.num_kv_heads * hd
    spec = {"attn_norm": ("input_layernorm.weight", (e,)),
            "wq": ("self_attn.q_proj.weight", (qd, e)), "wk": ("self_attn.k_proj.weight", (kd, e)),
            "wv": ("self_attn.v_proj.weight", (kd, e)), "wo": ("self_attn.o_proj.weight", (e, qd)),
            "mlp_norm": ("post_attention_layernorm.weight", (e,)),
            "w_gate": ("mlp.gate_proj.weight", (f, e)), "w_up": ("mlp.up_proj.weight", (f, e)),
            "w_down": ("mlp.down_proj.weight", (e, f))}
    if c.qkv_bias:
        spec.update(bq=("self_attn.q_proj.bias", (qd,)), bk=("self_attn.k_proj.bias", (kd,)),
                    bv=("self_attn.v_proj.bias", (kd,)))
    layers = {}
    for key, (suffix, shape) in spec.items():
        stacked = np.stack([get(f"model.layers.{i}.{suffix}", shape) for i in range(c.num_layers)])
        layers[key] = jnp.asarray(stacked, dtype)
    params = {"embed": jnp.asarray(get("model.embed_tokens.weight", (c.vocab_size, e)), dtype),
              "final_norm": jnp.asarray(get("model.norm.weight", (e,)), dtype), "layers": layers}
    if not c.tie_embeddings:
        params["lm_head"] = jnp.asarray(get("lm_head.weight", (c.vocab_size, e)), dtype)
    elif "lm_head.weight" in store:
        store.used.add("lm_head.weight")  # tied: some checkpoints still store a copy; the embedding rules
    unused = sorted(k for k in store.where if k not in store.used and not k.endswith(_IGNORABLE_SUFFIXES))
    if unused:
        more = f" (+{len(unused) - 8} more)" if len(unused) > 8 else ""
        raise ValueError(f"checkpoint has tensors jaxdec's {c.name} model would ignore: {unused[:8]}{more}")
    return params


def load_hf_folder(path: str, dtype=jnp.float32, attention_impl: str = "xla"):
    """Load an HF folder (``config.json`` + safetensors) -> ``(LlamaModel, params)``.

    ``dtype`` is the dtype of the returned parameter arrays (the model computes in float32).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path!r}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in model folder {path!r}")
    cfg = _read_json(cfg_path)
    gen_path = os.path.join(path, "generation_config.json")
    gen = _read_json(gen_path) if os.path.isfile(gen_path) else None
    config = config_from_hf(cfg, gen)
    params = _load_params(_TensorStore(path), config, dtype)
    model = LlamaModel(config)
    if attention_impl != "xla":
        model = model.with_attention(attention_impl)
    return model, params
