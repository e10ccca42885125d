"""Load any llama-architecture GGUF file: config from metadata, weights as float32 or kept block-quantized."""
from __future__ import annotations

import os
import struct

import jax.numpy as jnp
import numpy as np

from jaxdec.models.config import LlamaConfig
from jaxdec.quant import QTensor, from_gguf_bytes, stack

GGUF_MAGIC = b"GGUF"
_KEPT_QUANT = {"Q4_1": "q4_1", "Q8_0": "q8_0"}


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


_READERS: dict = {}  # (real path, size, mtime_ns) -> GGUFReader, the last few files opened
_READERS_KEPT = 2


def open_gguf(path: str):
    """A `gguf.GGUFReader` over `path` (read-only memory map), checked first for existence and the magic bytes.

    Building the reader parses every metadata field in Python (the 49152-entry vocabulary takes ~4 s on
    this CPU), so the reader of an unchanged file is kept and handed out again: loading the f32 and q
    weights and the tokenizer of one file parses it once. The key includes size and modification time,
    so a file rewritten in place is parsed anew."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path!r}")
    if not is_gguf(path):
        raise ValueError(f"not a GGUF file (no 'GGUF' magic bytes): {path!r}")
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    reader = _READERS.get(key)
    if reader is None:
        reader = _parse_gguf(path)
        while len(_READERS) >= _READERS_KEPT:
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = reader
    return reader


def _parse_gguf(path: str):
    from gguf import GGUFReader
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, EOFError, OverflowError, TypeError, struct.error) as e:
        # gguf's reader walks the header and maps every tensor onto the file: a file cut short fails
        # with an IndexError in the header or "cannot reshape array of size ..." in the tensor data
        raise ValueError(f"GGUF file {path!r} is truncated or corrupt ({os.path.getsize(path)} bytes; the "
                         f"reader failed with {type(e).__name__}: {e})") from None


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def config_from_gguf(reader) -> LlamaConfig:
    try:
        return _config_from_gguf(reader)
    except (TypeError, KeyError, IndexError) as e:  # a required metadata field is missing or malformed
        raise ValueError(f"GGUF metadata is incomplete or corrupt ({type(e).__name__}: {e})") from None


def _config_from_gguf(reader) -> LlamaConfig:
    arch = field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}; expected a llama-family model")
    g = lambda k, d=None: field(reader, f"{arch}.{k}", d)  # noqa: E731
    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    head_dim = int(g("attention.key_length", hidden // heads))
    window = g("attention.sliding_window")
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")), num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)), head_dim=head_dim,
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
        sliding_window=int(window) if window else None, max_position=int(g("context_length", 8192)),
        bos_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_ids=(int(eos),) if eos is not None else (),
        pad_id=int(field(reader, "tokenizer.ggml.padding_token_id", eos if eos is not None else 0)),
        name=str(field(reader, "general.name", arch)),
    ), arch


def _row_perm(n_heads: int, head_dim: int) -> np.ndarray:
    """Rows of llama.cpp's interleaved-RoPE q/k layout -> half-rotation layout."""
    return np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


def _tensor(t, weights: str):
    """One GGUF tensor as float32 numpy `[out, in]` or a QTensor."""
    from gguf import GGMLQuantizationType, quants
    qtype = t.tensor_type
    shape = tuple(int(s) for s in reversed(list(t.shape)))  # numpy order: [out, in]
    if qtype == GGMLQuantizationType.F32:
        return np.asarray(t.data, np.float32).reshape(shape)
    if qtype in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return quants.dequantize(t.data, qtype).astype(np.float32).reshape(shape)
    if weights == "q" and qtype.name in _KEPT_QUANT and len(shape) == 2:
        return from_gguf_bytes(np.asarray(t.data), _KEPT_QUANT[qtype.name], shape)
    return quants.dequantize(t.data, qtype).astype(np.float32).reshape(shape)


def _permute_rows(w, perm):
    if isinstance(w, QTensor):
        return QTensor(w.codes[perm], w.scale[perm], None if w.offset is None else w.offset[perm], w.kind)
    return w[perm]


def load_gguf_params(reader, config: LlamaConfig, arch: str, weights: str = "f32"):
    if weights not in ("f32", "q"):
        raise ValueError(f"weights must be 'f32' or 'q' (block-quantized as stored), got {weights!r}")
    by_name = {t.name: t for t in reader.tensors}

    def get(name, required=True):
        t = by_name.get(name)
        if t is None:
            if required:
                raise ValueError(f"GGUF file lacks tensor {name!r}")
            return None
        try:
            return _tensor(t, weights)
        except (ValueError, IndexError) as e:
            raise ValueError(f"GGUF tensor {name!r} is truncated or corrupt ({type(e).__name__}: {e})") from None

    c = config
    qperm = _row_perm(c.num_heads, c.head_dim) if arch == "llama" else None
    kperm = _row_perm(c.num_kv_heads, c.head_dim) if arch == "llama" else None
    per_layer = []
    for i in range(c.num_layers):
        p = f"blk.{i}."
        wq, wk = get(p + "attn_q.weight"), get(p + "attn_k.weight")
        if qperm is not None:
            wq, wk = _permute_rows(wq, qperm), _permute_rows(wk, kperm)
        layer = {
            "attn_norm": get(p + "attn_norm.weight"), "wq": wq, "wk": wk,
            "wv": get(p + "attn_v.weight"), "wo": get(p + "attn_output.weight"),
            "mlp_norm": get(p + "ffn_norm.weight"), "w_gate": get(p + "ffn_gate.weight"),
            "w_up": get(p + "ffn_up.weight"), "w_down": get(p + "ffn_down.weight"),
        }
        if c.qkv_bias:
            bq, bk = get(p + "attn_q.bias"), get(p + "attn_k.bias")
            if qperm is not None:
                bq, bk = bq[qperm], bk[kperm]
            layer.update(bq=bq, bk=bk, bv=get(p + "attn_v.bias"))
        per_layer.append(layer)
    layers = {k: stack([jnp.asarray(l[k]) if not isinstance(l[k], QTensor) else l[k] for l in per_layer])
              for k in per_layer[0]}
    params = {"embed": _as_jax(get("token_embd.weight")), "final_norm": jnp.asarray(get("output_norm.weight")),
              "layers": layers}
    if not c.tie_embeddings:
        params["lm_head"] = _as_jax(get("output.weight"))
    return params


def _as_jax(w):
    return w if isinstance(w, QTensor) else jnp.asarray(w)
