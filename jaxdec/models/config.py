"""Static model configuration (hashable, usable as a `jit` static argument)."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and options of a Llama-family decoder (Llama, SmolLM, Qwen2, Mistral)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2
    sliding_window: Optional[int] = None  # Mistral: a query sees keys with pos_q - pos_k < window
    max_position: int = 8192
    bos_id: Optional[int] = None
    eos_ids: tuple = ()
    pad_id: int = 0
    name: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
