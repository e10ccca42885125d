"""Llama-family decoder (Llama, SmolLM, Qwen2 q/k/v bias, Mistral sliding window) as pure JAX functions.

Parameters are a plain pytree with per-layer weights stacked on a leading ``[L]`` axis so the layer stack
runs as one `lax.scan` (fast compiles). Linear weights use the ``[out, in]`` convention and may be float
arrays or block-quantized `QTensor`s (dequantized inside the jitted matmul)::

    {"embed": [V, E], "final_norm": [E], "lm_head": [V, E] (untied models only),
     "layers": {"attn_norm": [L, E], "wq": [L, H*D, E], "wk": [L, KVH*D, E], "wv": [L, KVH*D, E],
                "wo": [L, E, H*D], "bq"/"bk"/"bv": [L, *] (qkv_bias only), "mlp_norm": [L, E],
                "w_gate": [L, F, E], "w_up": [L, F, E], "w_down": [L, E, F]}}
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdec.attention.hydragen import hydragen_attend
from jaxdec.attention.reference import attend, causal_block_mask
from jaxdec.cache.kv import KVCache, append
from jaxdec.models.config import LlamaConfig
from jaxdec.models.interface import ModelOutput
from jaxdec.models.quant import IMPLS, embed_lookup, scan_layer_params
from jaxdec.models.quant import matmul as quant_matmul

ATTENTION_IMPLS = ("xla", "pallas")


def rms_norm(x, w, eps):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * w


def rope_tables(positions, head_dim, theta):
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B,T,D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def _attention_fn(impl):
    if impl == "xla":
        return attend
    if impl == "pallas":
        from pallas_kernels.tree_attention import tree_attention
        return tree_attention
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


@dataclasses.dataclass(frozen=True)
class LlamaModel:
    config: LlamaConfig
    attention_impl: str = "xla"
    # weight products: None follows JAXDEC_QMATMUL (native CPU kernels where available); "xla" keeps XLA's
    # dots, which the SPMD partitioner can shard (the drivers pick it for mesh runs: a custom call has no
    # sharding rule, so XLA would all-gather its operands)
    matmul_impl: Optional[str] = None
    # the drivers may hand this model a shared-prefix KVCache (Hydragen; see jaxdec.cache.kv)
    supports_shared_prefix = True

    def __post_init__(self):
        if self.matmul_impl not in (None,) + IMPLS:
            raise ValueError(f"matmul_impl must be None or one of {IMPLS}, got {self.matmul_impl!r}")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def eos_ids(self) -> tuple:
        return tuple(self.config.eos_ids)

    def with_attention(self, impl: str) -> "LlamaModel":
        _attention_fn(impl)
        return dataclasses.replace(self, attention_impl=impl)

    def init_cache(self, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        c = self.config
        return KVCache.create(c.num_layers, batch, size, c.num_kv_heads, c.head_dim, dtype)

    def __call__(self, params, tokens, positions, cache: KVCache, mask=None, layers=None,
                 logits_at=None, return_layer_hidden: bool = False, attn_fn: Optional[Callable] = None,
                 attn_extra=None, collect_qk: bool = False) -> ModelOutput:
        """One forward pass over a block of T tokens (see `jaxdec.models.interface`).

        Attention per layer, in this order of precedence:

        * ``attn_fn`` (with ``attn_extra``): a per-layer attention function
          ``attn_fn(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos, extra,
          sliding_window=...) -> [B,T,H,D]`` (q/k post-RoPE), ``extra`` being that layer's slice of
          ``attn_extra`` (a pytree with a leading ``[num_layers]`` axis scanned with the layers; None
          passes None). Methods with per-layer attention state use it (Double Sparsity's channels).
        * a shared-prefix cache (``cache.prefix_k`` set): Hydragen, `hydragen_attend` with the layer's
          prefix slice ``[G,P,KVH,D]`` (each group of rows against its own prefix), the rows' suffixes
          and suffix lengths ``cache.lengths - cache.row_prefix_len``.
        * otherwise ``attention_impl`` ("xla" reference or the "pallas" tree-attention kernel).

        ``collect_qk=True`` also returns every layer's post-RoPE queries and keys of the block in
        ``ModelOutput.qk = (q [L,B,T,H,D], k [L,B,T,KVH,D])`` (zeros for skipped layers).
        """
        c = self.config
        b, t = tokens.shape
        matmul = functools.partial(quant_matmul, impl=self.matmul_impl)
        x = embed_lookup(params["embed"], tokens).astype(jnp.float32)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        block_mask = causal_block_mask(b, t) if mask is None else mask
        on = jnp.ones((c.num_layers,), bool) if layers is None else jnp.asarray(layers, bool)
        prefix = isinstance(cache, KVCache) and cache.prefix_k is not None
        if attn_fn is not None:
            if prefix:
                raise ValueError("attn_fn cannot be combined with a shared-prefix cache (cache.prefix_k "
                                 "is set): the cache's prefix needs the Hydragen attention")
            attn, extra_xs, lengths = attn_fn, attn_extra, cache.lengths
        elif prefix:
            plen = cache.prefix_len

            def attn(q, kc, vc, suf_len, k, v, bm, q_pos, extra, sliding_window=None):
                pk, pv = extra
                return hydragen_attend(q, pk, pv, plen, kc, vc, suf_len, k, v, bm, q_pos,
                                       sliding_window=sliding_window)
            extra_xs, lengths = (cache.prefix_k, cache.prefix_v), cache.lengths - cache.row_prefix_len
        else:
            base = _attention_fn(self.attention_impl)

            def attn(q, kc, vc, lens, k, v, bm, q_pos, extra, sliding_window=None):
                return base(q, kc, vc, lens, k, v, bm, q_pos, sliding_window=sliding_window)
            extra_xs, lengths = None, cache.lengths

        def block(h, p, kc, vc, extra):
            hn = rms_norm(h, p["attn_norm"], c.rms_norm_eps)
            q = matmul(hn, p["wq"])
            k = matmul(hn, p["wk"])
            v = matmul(hn, p["wv"])
            if c.qkv_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
            v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
            a = attn(q, kc, vc, lengths, k, v, block_mask, positions, extra, sliding_window=c.sliding_window)
            h = h + matmul(a.reshape(b, t, c.num_heads * c.head_dim), p["wo"])
            hn = rms_norm(h, p["mlp_norm"], c.rms_norm_eps)
            h = h + matmul(jax.nn.silu(matmul(hn, p["w_gate"])) * matmul(hn, p["w_up"]), p["w_down"])
            return h, k, v, (q if collect_qk else None)

        def skip(h, p, kc, vc, extra):
            z = jnp.zeros((b, t, c.num_kv_heads, c.head_dim), h.dtype)
            zq = jnp.zeros((b, t, c.num_heads, c.head_dim), h.dtype) if collect_qk else None
            return h, z, z, zq

        # quantized stacks are read in place by index (a scan slice would copy them every step)
        layer_xs, pick_layer = scan_layer_params(params["layers"])

        def layer(h, xs):
            p, index, kc, vc, on_l, extra = xs
            p = pick_layer(p, index)
            if layers is None:
                h2, k, v, q = block(h, p, kc, vc, extra)
            else:
                h2, k, v, q = jax.lax.cond(on_l, block, skip, h, p, kc, vc, extra)
            return h2, (k, v, h2 if return_layer_hidden else None, q)

        h, (k_new, v_new, per_layer, q_all) = jax.lax.scan(
            layer, x, (layer_xs, jnp.arange(c.num_layers, dtype=jnp.int32), cache.k, cache.v, on, extra_xs))
        cache = append(cache, k_new, v_new)
        h = rms_norm(h, params["final_norm"], c.rms_norm_eps)
        hs = h if logits_at is None else jnp.take_along_axis(h, logits_at[:, :, None], axis=1)
        head = params["lm_head"] if "lm_head" in params else params["embed"]
        logits = matmul(hs, head)
        layer_hidden = None
        if return_layer_hidden:
            layer_hidden = jnp.concatenate([x[None], per_layer], axis=0)
        qk = (q_all, k_new) if collect_qk else None
        return ModelOutput(logits, h, cache, layer_hidden, qk)
