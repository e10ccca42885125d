"""Small task models: jaxdec's Llama-family model with a tiny config over the task vocabulary
(`jaxdec.diffusion.tasks`), run bidirectionally (masked diffusion) or causally (the autoregressive
model of the same size, trained on the same data).

A trained model is saved as a Hugging Face style folder (``config.json`` with ``model_type: llama``,
``model.safetensors``, a word-level ``tokenizer.json``), so ``jaxdec.load(folder)`` and ``jaxdec generate
--model folder`` open it like any other model. ``config.json`` also says ``jaxdec_objective``
("masked_diffusion" or "autoregressive") and ``mask_token_id``: the CLI refuses a model trained for the
other kind of decoding.

The diffusion forward (`logits_fn`) attends bidirectionally over every non-[PAD] position of a row
(an explicit ``[B, T, 1+T]`` attention array: no cache slot, all real keys), so rows of different
lengths in one batch do not see each other's padding.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.diffusion import tasks as T

OBJECTIVES = ("masked_diffusion", "autoregressive")


@dataclasses.dataclass(frozen=True)
class TaskModelConfig:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384
    max_position: int = 64
    rope_theta: float = 10000.0

    def llama(self):
        from jaxdec.models.config import LlamaConfig
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return LlamaConfig(vocab_size=T.VOCAB_SIZE, hidden_size=self.hidden, intermediate_size=self.ffn,
                           num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.heads,
                           head_dim=self.hidden // self.heads, rope_theta=self.rope_theta, rms_norm_eps=1e-5,
                           tie_embeddings=True, max_position=self.max_position, eos_ids=(T.EOS_ID,),
                           pad_id=T.PAD_ID, name="llama")


def build(cfg: TaskModelConfig, attention_impl: str = "reference"):
    """The `LlamaModel` of ``cfg`` (reference attention: differentiable, and exact for small T)."""
    from jaxdec.models.llama import LlamaModel
    return LlamaModel(cfg.llama(), prefill_chunk=None).with_attention(attention_impl)


def init_params(cfg: TaskModelConfig, seed: int = 0) -> dict:
    """Random weights scaled like a fresh transformer (residual projections scaled down by depth)."""
    e, h, f, n = cfg.hidden, cfg.hidden, cfg.ffn, cfg.layers
    ks = jax.random.split(jax.random.key(seed), 8)

    def w(k, *s, scale=1.0):
        return jax.random.normal(k, (n,) + s, jnp.float32) * (scale / np.sqrt(s[-1]))

    res = 1.0 / np.sqrt(2 * n)
    return {"embed": jax.random.normal(ks[0], (T.VOCAB_SIZE, e), jnp.float32) * 0.5,
            "final_norm": jnp.ones((e,), jnp.float32),
            "layers": {"attn_norm": jnp.ones((n, e), jnp.float32), "wq": w(ks[1], h, e), "wk": w(ks[2], h, e),
                       "wv": w(ks[3], h, e), "wo": w(ks[4], e, h, scale=res), "mlp_norm": jnp.ones((n, e), jnp.float32),
                       "w_gate": w(ks[5], f, e), "w_up": w(ks[6], f, e), "w_down": w(ks[7], e, f, scale=res)}}


def forward(model, params, canvas, causal: bool = False):
    """Logits ``[B,T,V]`` of ``canvas [B,T]``: every query sees the row's non-[PAD] keys (and only the
    earlier ones when ``causal``)."""
    b, t = canvas.shape
    valid = canvas != model.pad_id
    see = jnp.broadcast_to(valid[:, None, :], (b, t, t))
    if causal:
        see = see & jnp.tril(jnp.ones((t, t), bool))[None]
    att = jnp.concatenate([jnp.zeros((b, t, 1), bool), see], axis=-1)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model(params, canvas, pos, model.init_cache(b, 1), attention=att).logits


@dataclasses.dataclass(frozen=True)
class TaskForward:
    """The samplers' ``logits_fn`` for a task model: ``self(params, canvas) -> logits``, plus the two
    calls of Fast-dLLM's caches: `full` (logits and every position's keys/values) and `block` (only a
    block of positions recomputed against cached keys/values)."""

    model: object

    def __call__(self, params, canvas):
        return forward(self.model, params, canvas)

    def full(self, params, canvas):
        """``(logits [B,T,V], cache)``: the bidirectional forward, with every position's keys/values
        written to a T-slot cache (lengths T)."""
        b, t = canvas.shape
        valid = canvas != self.model.pad_id
        att = jnp.concatenate([jnp.zeros((b, t, t), bool), jnp.broadcast_to(valid[:, None, :], (b, t, t))], -1)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        out = self.model(params, canvas, pos, self.model.init_cache(b, t), attention=att)
        return out.logits, out.cache

    def block(self, params, canvas, cache, start, length: int, dual: bool):
        """Logits ``[B,length,V]`` of positions ``start .. start+length-1`` (per row), recomputed from
        their current tokens; they see each other and the cached keys/values of the positions before
        ``start`` (prefix cache) and, with ``dual``, of the non-[PAD] positions after the block too. The
        block's own new keys/values are not kept (written past the cache's end: dropped)."""
        b, t = canvas.shape
        idx = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
        toks = jnp.take_along_axis(canvas, idx, axis=1)
        slot = jnp.arange(t, dtype=jnp.int32)[None]
        see = slot < start[:, None]
        if dual:
            see = see | ((slot >= start[:, None] + length) & (canvas != self.model.pad_id))
        att = jnp.concatenate([jnp.broadcast_to(see[:, None, :], (b, length, t)),
                               jnp.ones((b, length, length), bool)], -1)
        return self.model(params, toks, idx, cache, attention=att).logits


@functools.lru_cache(maxsize=16)
def logits_fn(model) -> TaskForward:
    """The samplers' ``logits_fn(params, canvas)`` of ``model`` (one object per model: one compile)."""
    return TaskForward(model.with_attention("reference") if model.attention_impl != "reference" else model)


# ------------------------------------------------------------------------------------------ folders
def _hf_config(cfg: TaskModelConfig, objective: str, meta: dict) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": T.VOCAB_SIZE,
            "hidden_size": cfg.hidden, "intermediate_size": cfg.ffn, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.heads, "head_dim": cfg.hidden // cfg.heads,
            "rope_theta": cfg.rope_theta, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
            "max_position_embeddings": cfg.max_position, "hidden_act": "silu", "eos_token_id": T.EOS_ID,
            "pad_token_id": T.PAD_ID, "bos_token_id": None, "mask_token_id": T.MASK_ID,
            "jaxdec_objective": objective, "jaxdec_task_model": dataclasses.asdict(cfg),
            "jaxdec_tasks": {"vocab": list(T.VOCAB), "prompt_len": T.PROMPT_LEN, "gen_len": T.GEN_LEN},
            "jaxdec_meta": meta}


def write_tokenizer(folder: str) -> None:
    """A word-level ``tokenizer.json`` (whitespace split) of the task vocabulary, specials marked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T.VOCAB)}, unk_token=T.UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(list(T.SPECIALS))
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": T.EOS, "pad_token": T.PAD, "unk_token": T.UNK, "mask_token": T.MASK}, f, indent=1)


_HF_NAMES = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
             "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
             "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}


def read_params(folder: str):
    """``(TaskModelConfig, params)`` of a saved task model folder, in `init_params`' layout (to continue
    training it: ``train.masked_diffusion --init-from``)."""
    from safetensors.numpy import load_file
    with open(os.path.join(folder, "config.json")) as f:
        cfg = TaskModelConfig(**json.load(f)["jaxdec_task_model"])
    t = load_file(os.path.join(folder, "model.safetensors"))
    lay = {k: jnp.asarray(np.stack([t[f"model.layers.{i}.{name}"] for i in range(cfg.layers)]))
           for k, name in _HF_NAMES.items()}
    return cfg, {"embed": jnp.asarray(t["model.embed_tokens.weight"]), "final_norm": jnp.asarray(t["model.norm.weight"]),
                 "layers": lay}


def save(folder: str, cfg: TaskModelConfig, params, objective: str, meta: Optional[dict] = None) -> str:
    """Write the HF-style folder of a task model; returns the folder."""
    from safetensors.numpy import save_file
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    os.makedirs(folder, exist_ok=True)
    p = jax.device_get(params)
    lay = p["layers"]
    names = _HF_NAMES
    tensors = {"model.embed_tokens.weight": np.asarray(p["embed"], np.float32),
               "model.norm.weight": np.asarray(p["final_norm"], np.float32)}
    for k, name in names.items():
        for i in range(cfg.layers):
            tensors[f"model.layers.{i}.{name}"] = np.ascontiguousarray(np.asarray(lay[k][i], np.float32))
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_hf_config(cfg, objective, meta or {}), f, indent=1)
    write_tokenizer(folder)
    return folder


def objective_of(path: str) -> Optional[str]:
    """``jaxdec_objective`` of a model folder's config.json (None: not a task model, e.g. a GGUF file
    or an ordinary HF folder, i.e. an autoregressive LM)."""
    cfg = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if cfg is None or not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            return json.load(f).get("jaxdec_objective")
    except (OSError, ValueError):
        return None


def load(folder: str, require: Optional[str] = None):
    """``(model, params, objective)`` of a saved task model (through `jaxdec.load`). ``require``
    ("masked_diffusion" for the samplers, "autoregressive" for jaxdec's decoders) refuses the other kind."""
    import jaxdec
    obj = objective_of(folder)
    if obj not in OBJECTIVES:
        raise ValueError(f"{folder!r} is not a jaxdec task model (config.json lacks jaxdec_objective)")
    if require is not None and require not in OBJECTIVES:
        raise ValueError(f"require must be None or one of {OBJECTIVES}, got {require!r}")
    if require is not None and obj != require:
        use = ("jaxdec.diffusion.samplers.sample" if obj == "masked_diffusion"
               else "jaxdec's autoregressive decoders (jaxdec.generate)")
        raise ValueError(f"folder {folder!r} holds a task model trained {obj!r}, require={require!r}: decode it with {use}")
    m = jaxdec.load(folder)
    return m.model, m.params, obj
