"""A small draft language model distilled from the target, and S2D sorted nested drafts.

The draft (Leviathan et al. 2023 / Chen et al. 2023's separate draft model, trained here by
``train/distill_draft.py``) is ``num_layers`` (k) Llama decoder layers of the target's shape, initialised
from chosen target layers (``init_layers``), with its own final norm. It shares the target's tokenizer,
and its input embedding and LM head are the target's own, shared and frozen (not stored in the heads
file); the LM head is restricted to a reduced draft vocabulary (``draft_vocab`` rows, the d2t map of
`jaxdec.speculative.heads.medusa` / ``eagle``): the target's full 49152-row head would cost more per draft
token than two draft layers.

S2D (Kavehzadeh et al. 2024, "S2D: Sorted Speculative Decoding For More Efficient Deployment of Nested
Large Language Models"; the sorted fine-tuning of Sorted LLaMA / SortedNet): one network whose first d
layers are each a usable draft. ``exits`` lists the depths trained as drafts: every exit reads its
residual stream through the (one, shared) final norm and the shared LM-head rows, and the training loss
is summed over the exits. One KIND covers both: plain distillation is ``exits == (k,)``, S2D any longer
sorted tuple ending at k. `build(..., depth=d)` drafts with the first d layers (a model of d layers
and a d-layer KV cache: a shallower exit really costs less); S2D's confidence-based choice of a draft
per step is not implemented (the depth is fixed per run).

* `DraftLMConfig`: sizes (the target's), k, ``init_layers``, ``draft_vocab``, ``exits``.
* `DraftLM`: the draft as a model for `jaxdec.speculative.drafters.DraftModelDrafter`: its logits over
  the full vocabulary are the draft-vocabulary logits scattered at d2t (every other token ``-inf``), so
  greedy and sampling verification work unchanged (a drafted token is always in the draft vocabulary).
  Params: ``{"embed": the target's table, "layers", "final_norm", "lm_head": its d2t rows, "d2t"}``.
* `init_from_target`: draft params from target layers (dequantized when the target holds Q4_1 / Q8_0).
* `exit_logits`: the training-time forward: draft-vocabulary logits ``[n_exits, B, T, Vd]``.
* `load_draft_lm(path, fingerprint)`, `build(model, params, heads, ...)`: `methods.medusa`'s pattern.

Precision: the heads file stores the layer matrices as float16 (norms float32); the drafter computes in
float32 (``compute="f32"``) or, by default with a block-quantized target (``weights="q"``), with the
layer matrices re-quantized to Q8_0 at load time (``compute="q8_0"``: the target's native block kernels,
4x fewer bytes per draft token than float32). Verification makes either lossless.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

KIND = "draft_lm"
STORE_DTYPE = np.float16  # layer matrices in the heads file
COMPUTE = ("auto", "f32", "q8_0")


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"DraftLMConfig.{name} must be an integer >= {lo}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class DraftLMConfig:
    hidden: int  # the target's E
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    num_layers: int  # k: the draft's layers
    draft_vocab: int  # rows of the shared LM head the draft scores (d2t)
    init_layers: tuple = ()  # the target layer that initialised each draft layer (provenance; () = 0 .. k-1)
    exits: tuple = ()  # S2D: the depths trained as drafts, sorted, the last = num_layers; () = (num_layers,)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 8192
    qkv_bias: bool = False

    def __post_init__(self):
        for name in ("hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "num_layers",
                     "draft_vocab", "max_position"):
            _int(name, getattr(self, name), 1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DraftLMConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        init = tuple(self.init_layers)
        if init and (len(init) != self.num_layers or any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
                                                         or i < 0 for i in init)):
            raise ValueError(f"DraftLMConfig.init_layers must be () or {self.num_layers} target layer indices "
                             f">= 0, got {self.init_layers!r}")
        ex = tuple(self.exits)
        if ex and (any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in ex)
                   or list(ex) != sorted(set(ex)) or ex[0] < 1 or ex[-1] != self.num_layers):
            raise ValueError(f"DraftLMConfig.exits must be () or strictly increasing depths in [1, "
                             f"{self.num_layers}] ending at num_layers={self.num_layers}, got {self.exits!r}")
        object.__setattr__(self, "init_layers", tuple(int(i) for i in init) or tuple(range(self.num_layers)))
        object.__setattr__(self, "exits", tuple(int(d) for d in ex) or (self.num_layers,))

    @property
    def sorted(self) -> bool:
        """True for an S2D network (more than one exit)."""
        return len(self.exits) > 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["init_layers"], d["exits"] = list(self.init_layers), list(self.exits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DraftLMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        need = {"hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "num_layers", "draft_vocab"}
        if not isinstance(d, dict) or set(d) - names or not need <= set(d):
            raise ValueError(f"draft_lm config must be a dict with keys among {sorted(names)} (at least "
                             f"{sorted(need)}), got {d!r}")
        d = dict(d)
        for k in ("init_layers", "exits"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_target(cls, model, num_layers: int, draft_vocab: int, init_layers=(), exits=()) -> "DraftLMConfig":
        """The draft's sizes taken from a `LlamaModel` target."""
        c = getattr(model, "config", None)
        if c is None or not hasattr(c, "num_kv_heads"):
            raise TypeError(f"a distilled draft is built from a Llama-family target (jaxdec.models.llama."
                            f"LlamaModel), got {type(model).__name__}")
        if c.sliding_window is not None:
            raise ValueError("a target with a sliding window is not supported by the distilled draft yet")
        return cls(hidden=c.hidden_size, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                   intermediate=c.intermediate_size, num_layers=num_layers, draft_vocab=draft_vocab,
                   init_layers=tuple(init_layers), exits=tuple(exits), rope_theta=float(c.rope_theta),
                   rms_norm_eps=float(c.rms_norm_eps), max_position=int(c.max_position), qkv_bias=bool(c.qkv_bias))

    def layer_model(self, depth: Optional[int] = None, attention: str = "xla", prefill_chunk: Optional[int] = 512):
        """The first ``depth`` (default k) draft layers as a `LlamaModel` whose vocabulary is the draft
        vocabulary (its ``lm_head`` param holds the d2t rows; inputs come through ``embeds=``)."""
        from jaxdec.models.config import LlamaConfig
        from jaxdec.models.llama import LlamaModel
        d = self.num_layers if depth is None else int(depth)
        return LlamaModel(LlamaConfig(vocab_size=self.draft_vocab, hidden_size=self.hidden,
                                      intermediate_size=self.intermediate, num_layers=d, num_heads=self.num_heads,
                                      num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                      rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
                                      tie_embeddings=False, qkv_bias=self.qkv_bias,
                                      max_position=self.max_position),
                          prefill_chunk=prefill_chunk).with_attention(attention)


# --------------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------------

def _layer_array(v, i: int) -> np.ndarray:
    """Target layer ``i`` of one stacked layer param as float32 (a QTensor stack is dequantized)."""
    from jaxdec.compress.dfloat11 import DF11Stack
    from jaxdec.quant import PackedQ8, QTensor, dequantize, unpack_q8
    if isinstance(v, DF11Stack):
        raise ValueError("initialising a draft from DFloat11-compressed target layers is not supported: load the "
                         "target with weights='q', 'f32' or 'bf16'")
    if isinstance(v, PackedQ8):
        v = unpack_q8(v)
    if isinstance(v, QTensor):
        return np.asarray(dequantize(jax.tree.map(lambda a: a[i], v)), np.float32)
    return np.asarray(v[i], np.float32)


def init_from_target(config: DraftLMConfig, target_params) -> dict:
    """Draft params ``{"layers": stacked [k, ...] float32, "final_norm": [E]}``: layer j is a copy of the
    target's layer ``config.init_layers[j]`` (dequantized), the final norm the target's."""
    if not isinstance(target_params, dict) or "layers" not in target_params or "final_norm" not in target_params:
        raise TypeError("init_from_target needs Llama-layout target params with 'layers' and 'final_norm'")
    layers = target_params["layers"]
    n = int(np.shape(layers["attn_norm"])[0])
    bad = [i for i in config.init_layers if i >= n]
    if bad:
        raise ValueError(f"init_layers {list(config.init_layers)}: the target has only {n} layers (0 .. {n - 1})")
    out = {k: jnp.asarray(np.stack([_layer_array(v, i) for i in config.init_layers])) for k, v in layers.items()}
    return {"layers": out, "final_norm": jnp.asarray(np.asarray(target_params["final_norm"], np.float32))}


def storable(draft_params) -> dict:
    """Draft params for the heads file: layer matrices as float16, the rest float32."""
    def cast(x):
        a = np.asarray(jax.device_get(x))
        return a.astype(STORE_DTYPE if a.ndim == 3 else np.float32)
    return jax.tree.map(cast, draft_params)


def quantize_q8_0(w) -> "object":
    """A float ``[..., out, in]`` matrix (stack) as a Q8_0 `QTensor` (blocks of 32 along ``in``, one float
    scale each: ``codes = round(w / s)``, ``s = max|block| / 127``)."""
    from jaxdec.quant import QTensor
    from jaxdec.quant.formats import BLOCK
    a = np.asarray(w, np.float32)
    if a.shape[-1] % BLOCK:
        raise ValueError(f"q8_0 needs the inner dimension to be a multiple of {BLOCK}, got {a.shape}")
    b = a.reshape(a.shape[:-1] + (a.shape[-1] // BLOCK, BLOCK))
    s = np.max(np.abs(b), axis=-1) / 127.0
    codes = np.round(b / np.where(s > 0, s, 1.0)[..., None]).astype(np.int8)
    return QTensor(jnp.asarray(codes), jnp.asarray(s.astype(np.float32)), None, "q8_0")


def _target_quantized(target_params) -> bool:
    from jaxdec.quant import PackedQ8, QTensor
    leaves = jax.tree.leaves(target_params.get("layers", {}), is_leaf=lambda x: isinstance(x, (QTensor, PackedQ8)))
    return any(isinstance(x, (QTensor, PackedQ8)) for x in leaves)


# --------------------------------------------------------------------------------------------------
# the model the drafter runs
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DraftLM:
    """The first ``depth`` layers of a distilled draft as a model over the target's vocabulary (see the
    module docstring): ``DraftModelDrafter(DraftLM(config, depth, V), ...)`` with params from `draft_params`."""

    config: DraftLMConfig
    depth: int
    target_vocab: int
    prefill_chunk: Optional[int] = 512
    attention_impl: str = "xla"

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, (int, np.integer)) or not \
                1 <= self.depth <= self.config.num_layers:
            raise ValueError(f"depth must be an integer in [1, {self.config.num_layers}], got {self.depth!r}")

    @property
    def vocab_size(self) -> int:
        return int(self.target_vocab)

    @property
    def num_layers(self) -> int:
        return int(self.depth)

    @property
    def eos_ids(self) -> tuple:
        return ()

    @property
    def lm(self):
        return self.config.layer_model(self.depth, self.attention_impl, self.prefill_chunk)

    def with_prefill_chunk(self, chunk):
        return dataclasses.replace(self, prefill_chunk=None if chunk is None else int(chunk))

    def init_cache(self, batch: int, size: int, dtype=jnp.float32):
        return self.lm.init_cache(batch, size, dtype)

    def __call__(self, params, tokens, positions, cache, mask=None, layers=None, logits_at=None, **kw):
        from jaxdec.quant import embed_lookup
        if layers is not None:
            raise ValueError("DraftLM does not take a layers mask (pick the exit with depth=)")
        emb = embed_lookup(params["embed"], tokens).astype(jnp.float32)
        out = self.lm(params, None, positions, cache, mask=mask, logits_at=logits_at, embeds=emb, **kw)
        d2t = jnp.asarray(params["d2t"], jnp.int32)
        full = jnp.full(out.logits.shape[:-1] + (self.target_vocab,), -jnp.inf, jnp.float32)
        return out._replace(logits=full.at[..., d2t].set(out.logits.astype(jnp.float32)))


def draft_params(config: DraftLMConfig, dp, model, target_params, d2t, depth: int, compute: str = "f32") -> dict:
    """The `DraftLM` params of exit ``depth``: the draft's first ``depth`` layers (float32, or re-quantized
    to Q8_0 with ``compute="q8_0"``), its final norm, and the target's embedding and LM-head rows."""
    from jaxdec.speculative.heads.medusa import draft_head
    emb = target_params.get("embed") if isinstance(target_params, dict) else None
    if emb is None:
        raise TypeError(f"{type(model).__name__}: the distilled draft shares the target's input embedding and "
                        "needs params with 'embed' (the Llama layout)")
    layers = {k: jnp.asarray(v[:depth], jnp.float32) for k, v in dp["layers"].items()}
    if compute == "q8_0":
        layers = {k: (quantize_q8_0(v) if v.ndim == 3 else v) for k, v in layers.items()}
    return {"embed": emb, "layers": layers, "final_norm": jnp.asarray(dp["final_norm"], jnp.float32),
            "lm_head": draft_head(model, target_params, d2t), "d2t": jnp.asarray(d2t, jnp.int32)}


def exit_logits(config: DraftLMConfig, dp, model, target_params, head_w, tokens, exits=None,
                attention: str = "reference"):
    """Training forward: ``tokens [B,T]`` -> draft-vocabulary logits ``[n_exits, B, T, Vd]`` of each exit
    (its residual stream through the shared final norm and LM-head rows ``head_w [Vd, E]``)."""
    from jaxdec.models.llama import rms_norm
    from jaxdec.quant import matmul
    from jaxdec.speculative.heads.eagle import target_embed
    exits = config.exits if exits is None else tuple(exits)
    lm = config.layer_model(attention=attention, prefill_chunk=None)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    emb = target_embed(model, target_params, tokens)
    lp = {"layers": dp["layers"], "final_norm": dp["final_norm"], "lm_head": head_w}
    out = lm(lp, None, pos, lm.init_cache(b, t), embeds=emb, hidden_layers=exits,
             logits_at=jnp.zeros((b, 1), jnp.int32))
    h = rms_norm(out.layer_hidden, dp["final_norm"], config.rms_norm_eps)  # [n_exits,B,T,E]
    return matmul(h, head_w)


# --------------------------------------------------------------------------------------------------
# loading and the decoder
# --------------------------------------------------------------------------------------------------

def _check_params(config: DraftLMConfig, dp, where: str) -> None:
    c = config
    want = {"attn_norm": (c.num_layers, c.hidden), "mlp_norm": (c.num_layers, c.hidden),
            "wq": (c.num_layers, c.num_heads * c.head_dim, c.hidden),
            "wk": (c.num_layers, c.num_kv_heads * c.head_dim, c.hidden),
            "wv": (c.num_layers, c.num_kv_heads * c.head_dim, c.hidden),
            "wo": (c.num_layers, c.hidden, c.num_heads * c.head_dim),
            "w_gate": (c.num_layers, c.intermediate, c.hidden), "w_up": (c.num_layers, c.intermediate, c.hidden),
            "w_down": (c.num_layers, c.hidden, c.intermediate)}
    if c.qkv_bias:
        want.update(bq=(c.num_layers, c.num_heads * c.head_dim), bk=(c.num_layers, c.num_kv_heads * c.head_dim),
                    bv=(c.num_layers, c.num_kv_heads * c.head_dim))
    if not isinstance(dp, dict) or set(dp) != {"layers", "final_norm"} or not isinstance(dp["layers"], dict):
        raise ValueError(f"{where}: draft params must be {{'layers': {{...}}, 'final_norm': [E]}}, got "
                         f"{sorted(dp) if isinstance(dp, dict) else type(dp).__name__}")
    got = {k: tuple(np.shape(v)) for k, v in dp["layers"].items()}
    if got != want or tuple(np.shape(dp["final_norm"])) != (c.hidden,):
        raise ValueError(f"{where}: draft tensors {got} (final_norm {tuple(np.shape(dp['final_norm']))}) do not "
                         f"match its config {want} (final_norm {(c.hidden,)})")


def load_draft_lm(path: str, fingerprint: Optional[str]):
    """(DraftLMConfig, draft params as float32 jax arrays, metadata, d2t) from a heads file, refused with
    `HeadsMismatch` when it was trained for another target (``fingerprint=None`` skips the check)."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    d2t = params.pop("d2t", None)
    try:
        config = DraftLMConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad draft_lm config in its metadata ({e})") from None
    if d2t is None or np.shape(d2t) != (config.draft_vocab,):
        raise ValueError(f"heads file {str(path)!r}: its d2t map {None if d2t is None else np.shape(d2t)} does not "
                         f"match draft_vocab={config.draft_vocab} (corrupt file)")
    _check_params(config, params, f"heads file {str(path)!r}")
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), meta, np.asarray(d2t)


def build(model, params, heads, target=None, depth: Optional[int] = None, num_tokens: int = 4,
          sampling: bool = False, compute: str = "auto", stop_threshold: Optional[float] = None, siblings: int = 1):
    """-> (decoder, params): the distilled draft (or exit ``depth`` of an S2D network) drafting chains of
    ``num_tokens`` for the target through `DraftModelDrafter`.

    heads: a heads file written by ``train/distill_draft.py`` (checked against the target like
    `jaxdec.speculative.methods.medusa`: ``target`` = the target's model file or folder, a fingerprint
    string, or None to fingerprint ``params``), or an in-memory ``(DraftLMConfig, draft params, d2t)``
    triple (no check). depth: the exit to draft with (one of ``config.exits``; default the deepest).
    compute: "f32", "q8_0" (layer matrices re-quantized at load) or "auto" (q8_0 when the target's layers
    are block-quantized, else f32). sampling: the draft's tokens are drawn from its distribution and
    verified by lossless speculative sampling; otherwise greedy drafts and greedy verification. siblings: w > 1
    adds the draft's next w - 1 best tokens at every depth as leaves beside the greedy chain (a tree of
    ``num_tokens * w`` nodes at the chain's draft calls; greedy only, `DraftModelDrafter`)."""
    import os
    from jaxdec.speculative.drafters import DraftModelDrafter
    from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    if isinstance(heads, tuple) and len(heads) == 3 and isinstance(heads[0], DraftLMConfig):
        config, dp, d2t = heads
        _check_params(config, dp, "draft_lm heads")
    elif isinstance(heads, (str, os.PathLike)):
        fp = expected_fingerprint(model, params, target)
        config, dp, _, d2t = load_draft_lm(heads, fp)
    else:
        raise TypeError(f"heads must be a heads file path or a (DraftLMConfig, draft params, d2t) triple, got "
                        f"{type(heads).__name__}")
    d = config.num_layers if depth is None else depth
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) not in config.exits:
        raise ValueError(f"depth must be one of the draft's trained exits {list(config.exits)}, got {depth!r}")
    if compute not in COMPUTE:
        raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
    d2t = np.asarray(d2t)
    if d2t.shape != (config.draft_vocab,) or d2t.min() < 0 or d2t.max() >= model.vocab_size:
        raise ValueError(f"draft_lm: d2t must be {config.draft_vocab} token ids in [0, {model.vocab_size})")
    if compute == "auto":
        compute = "q8_0" if _target_quantized(params) and config.hidden % 32 == 0 else "f32"
    dparams = draft_params(config, dp, model, params, d2t, int(d), compute)
    dm = DraftLM(config, int(d), model.vocab_size)
    dec = SpeculativeDecoder(DraftModelDrafter(dm, int(num_tokens), sample=sampling, stop_threshold=stop_threshold,
                                               siblings=siblings),
                             "sampling" if sampling else "greedy")
    return dec, with_draft_params(params, dparams)
