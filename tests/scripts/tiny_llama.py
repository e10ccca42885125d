"""A tiny random-weight Llama whose head counts (16 query / 8 KV heads) and MLP width divide a model
axis of 2, 4 or 8, so the mesh tests exercise the attention-head split the default model (9 / 3 heads)
never gets. Its untied LM head (split over the vocabulary like the embedding) favours the successor of the
current token in fixed 4-token cycles, blurred by the random layers (weights N(0, scale)): greedy text
partly repeats, so prompt lookup has drafts to accept (tau ~ 2 at 16 new tokens), and sampling at
temperature 1 still differs from greedy at most steps. Imported by the mesh scripts in this folder (run
as subprocesses with their own XLA_FLAGS)."""
from __future__ import annotations

import numpy as np

V, E, F, L, H, KVH, D = 256, 64, 128, 2, 16, 8, 4


def tiny_llama(seed: int = 0, scale: float = 0.13, head: float = 0.1):
    """(model, params): fixed random weights from ``seed`` (layers N(0, scale), embeddings N(0, 1), the
    head ``head`` x the embedding of each id's predecessor in its cycle)."""
    import jax.numpy as jnp

    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=KVH,
                      head_dim=D, rope_theta=10000.0, tie_embeddings=False, eos_ids=(0,), max_position=512)
    rng = np.random.default_rng(seed)

    def w(*shape, sd=scale):
        return jnp.asarray(rng.normal(0.0, sd, shape), jnp.float32)

    embed = w(V, E, sd=1.0)
    order = rng.permutation(np.arange(3, V))  # cycles of 4 over the ids 3.. (never the stop id 0)
    prev = np.arange(V)
    for c in range(0, len(order), 4):
        cyc = order[c:c + 4]
        prev[cyc] = np.roll(cyc, 1)  # row v of the head is the embedding of v's predecessor
    params = {"embed": embed, "lm_head": head * embed[prev], "final_norm": jnp.ones((E,), jnp.float32),
              "layers": {"attn_norm": jnp.ones((L, E), jnp.float32), "wq": w(L, H * D, E), "wk": w(L, KVH * D, E),
                         "wv": w(L, KVH * D, E), "wo": w(L, E, H * D), "mlp_norm": jnp.ones((L, E), jnp.float32),
                         "w_gate": w(L, F, E), "w_up": w(L, F, E), "w_down": w(L, E, F)}}
    return LlamaModel(cfg, matmul_impl="xla"), params


def tiny_prompts(count: int = 8, seed: int = 1) -> list:
    """``count`` prompts of 5..12 tokens (ids 3..V-1: never the stop id 0), each repeating a short
    pattern so prompt lookup finds n-grams to copy."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        pat = rng.integers(3, V, 3).tolist()
        n = 5 + (i * 5) % 8
        out.append((pat * 4)[:n])
    return out


def _byte_chars() -> list:
    """The 256 printable characters a byte-level BPE writes for the bytes 0..255 (GPT-2's table: printable
    Latin-1 bytes stand for themselves, the rest take the code points from 256 on, in byte order)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_hf_folder(path: str, seed: int = 0) -> str:
    """The tiny Llama as a Hugging Face folder `jaxdec.load` (and so `jaxdec generate --model PATH`) opens:
    config.json, model.safetensors and a byte-level tokenizer.json whose id b is the byte b (id 0, the
    byte NUL, is the stop token; ASCII prompts never contain it)."""
    import json
    import os

    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    _, params = tiny_llama(seed)
    os.makedirs(path, exist_ok=True)
    lay = {k: np.asarray(v) for k, v in params["layers"].items()}
    names = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
             "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    tensors = {"model.embed_tokens.weight": np.asarray(params["embed"]), "lm_head.weight": np.asarray(params["lm_head"]),
               "model.norm.weight": np.asarray(params["final_norm"])}
    for i in range(L):
        tensors.update({f"model.layers.{i}.{hf}.weight": np.ascontiguousarray(lay[ours][i]) for ours, hf in names.items()})
    save_file(tensors, os.path.join(path, "model.safetensors"))
    cfg = {"model_type": "llama", "hidden_size": E, "intermediate_size": F, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": KVH, "head_dim": D, "vocab_size": V,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": 0, "bos_token_id": None,
           "max_position_embeddings": 512, "hidden_act": "silu", "rms_norm_eps": 1e-6}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    chars = _byte_chars()
    tok = Tokenizer(models.BPE({c: b for b, c in enumerate(chars)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": chars[0]}, f)
    return path


def tiny_prompt_texts(count: int = 8, seed: int = 1) -> list:
    """``count`` ASCII prompts repeating a short pattern (prompt lookup finds n-grams to copy)."""
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [("".join(rng.choice(list(letters), 3)) * 4)[:5 + (i * 5) % 8] for i in range(count)]
