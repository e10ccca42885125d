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
import numpy as np

from jaxdec.attention.blockwise import blockwise_attend
from jaxdec.attention.hydragen import hydragen_attend
from jaxdec.attention.reference import attend, causal_block_mask
from jaxdec.cache.kv import KVCache, append
from jaxdec.compress.dfloat11 import DF11Stack
from jaxdec.models.config import LlamaConfig
from jaxdec.models.interface import ModelOutput
from jaxdec.quant import IMPLS, embed_lookup, scan_layer_params
from jaxdec.quant import matmul as quant_matmul

# "xla": blockwise attention whose cost follows the committed lengths (jaxdec.attention.blockwise);
# "reference": the reference `attend` (reads every cache slot; differentiable; the tests' oracle);
# "pallas": the tree-attention kernel
ATTENTION_IMPLS = ("xla", "reference", "pallas")


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
        return blockwise_attend
    if impl == "reference":
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
    # prompt tokens per prefill chunk (`jaxdec.core.steps.prefill`: one compiled chunk program, peak
    # memory O(chunk x cache)); None runs the whole prompt block in one call
    prefill_chunk: Optional[int] = 512
    # a mesh run with attention_impl "pallas": the drivers set the mesh here and the kernel runs per device
    # under shard_map (`jaxdec.sharding.shard_map_attention`; a custom call has no sharding rule)
    attention_mesh: Optional[object] = None
    # the drivers may hand this model a shared-prefix KVCache (Hydragen; see jaxdec.cache.kv)
    supports_shared_prefix = True
    # __call__(..., write_cache=False) returns the block's keys/values in ModelOutput.kv instead of writing
    # them (`jaxdec.cache.kv.append` writes them later: the speculative engine keeps the cache out of its
    # lax.cond, where XLA:CPU copied the whole cache twice per step)
    supports_deferred_kv_write = True

    def __post_init__(self):
        if self.matmul_impl not in (None,) + IMPLS:
            raise ValueError(f"matmul_impl must be None or one of {IMPLS}, got {self.matmul_impl!r}")
        c = self.prefill_chunk
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1):
            raise ValueError(f"prefill_chunk must be None or an integer >= 1, got {c!r}")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def eos_ids(self) -> tuple:
        return tuple(self.config.eos_ids)

    @property
    def pad_id(self) -> int:
        return int(self.config.pad_id)

    @property
    def max_position(self) -> int:
        return int(self.config.max_position)

    def with_attention(self, impl: str) -> "LlamaModel":
        _attention_fn(impl)
        return dataclasses.replace(self, attention_impl=impl)

    def with_prefill_chunk(self, chunk: Optional[int]) -> "LlamaModel":
        """This model with prompts prefilled in chunks of ``chunk`` tokens (None: one call)."""
        return dataclasses.replace(self, prefill_chunk=None if chunk is None else int(chunk))

    def init_cache(self, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        c = self.config
        return KVCache.create(c.num_layers, batch, size, c.num_kv_heads, c.head_dim, dtype)

    def embed(self, params, ids) -> jax.Array:
        """Input embeddings ``[..., E]`` float32 of token ids ``[...]``: exactly what ``__call__`` feeds
        the first layer for these tokens (a block-quantized table dequantizes only the gathered rows)."""
        return embed_lookup(params["embed"], ids).astype(jnp.float32)

    def truncate(self, params, num_layers: int):
        """The model made of this one's first ``num_layers`` layers (same embeddings, final norm and
        head): returns ``(model, params)``. Block-quantized and DFloat11 stacks are sliced per layer."""
        n = self.config.num_layers
        if not isinstance(num_layers, (int, np.integer)) or not 1 <= num_layers <= n:
            raise ValueError(f"num_layers must be an integer in [1, {n}], got {num_layers!r}")
        num_layers = int(num_layers)
        model = dataclasses.replace(self, config=dataclasses.replace(self.config, num_layers=num_layers))
        out = dict(params)
        out["layers"] = {k: _slice_stack(v, 0, num_layers) for k, v in params["layers"].items()}
        return model, out

    def _layer_range(self, layer_range):
        n = self.config.num_layers
        if layer_range is None:
            return 0, n
        try:
            lo, hi = (int(i) for i in layer_range)
        except (TypeError, ValueError):
            raise ValueError(f"layer_range must be a static pair (a, b), got {layer_range!r}") from None
        if not 0 <= lo < hi <= n:
            raise ValueError(f"layer_range (a, b) needs 0 <= a < b <= {n}, got {layer_range!r}")
        return lo, hi

    def __call__(self, params, tokens, positions, cache: KVCache, mask=None, layers=None,
                 logits_at=None, return_layer_hidden: bool = False, attn_fn: Optional[Callable] = None,
                 attn_extra=None, collect_qk: bool = False, *, embeds=None, attention="causal",
                 hidden_layers: Optional[tuple] = None, layer_range: Optional[tuple] = None,
                 hidden_in=None, write_cache: bool = True) -> ModelOutput:
        """One forward pass over a block of T tokens (see `jaxdec.models.interface`).

        Inputs (exactly one): ``tokens [B,T]`` int; ``embeds [B,T,E]`` input vectors in place of token
        embeddings (``tokens=None``; `embed` gives the vectors of token ids); ``hidden_in [B,T,E]``, the
        residual stream entering layer ``a`` of ``layer_range=(a, b)`` (required when a > 0).

        ``layer_range=(a, b)`` (static) runs layers ``a .. b-1`` only: their keys/values are written at
        each row's ``cache.lengths``, which advance by T only when ``b`` is the last layer (the call that
        completes the stack commits the block), so ``[0, a)`` then ``[a, L)`` on its ``residual`` equals
        the full call (logits, hidden, cache). ``logits``/``hidden`` are the final norm and head applied
        to layer b-1's output (early exit); ``residual`` is that output before the norm.

        ``attention``: "causal" (default; ``mask [B,T,T]`` may replace the causal block pattern),
        "bidirectional" (every block token sees the whole block: masked-diffusion models), or a bool array
        ``[B,T,S+T]`` (S = ``cache.size``): which cache slots (first S columns; only committed ones count)
        and block tokens (last T) each query may see. An array needs the "xla" (or "reference") attention and an ordinary
        cache. The model's sliding window still applies.

        ``hidden_layers`` (static tuple of ints in ``[a, b]``): ``layer_hidden [k,B,T,E]`` holds the
        residual stream after that many layers (0 = the embeddings; HF's ``hidden_states`` indexing,
        before any final norm), collected in the scan without stacking the other layers.

        Attention per layer, in this order of precedence:

        * ``attn_fn`` (with ``attn_extra``): a per-layer attention function
          ``attn_fn(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, q_pos, extra,
          sliding_window=...) -> [B,T,H,D]`` (q/k post-RoPE), ``extra`` being that layer's slice of
          ``attn_extra`` (a pytree with a leading ``[num_layers]`` axis scanned with the layers; None
          passes None). Methods with per-layer attention state use it (Double Sparsity's channels).
        * a shared-prefix cache (``cache.prefix_k`` set): Hydragen, `hydragen_attend` with the layer's
          prefix slice ``[G,P,KVH,D]`` (each group of rows against its own prefix), the rows' suffixes
          (read chunk by chunk from the stacked cache) and suffix lengths ``cache.lengths -
          cache.row_prefix_len``.
        * otherwise ``attention_impl``: "xla" (`blockwise_attend`: reads only the committed chunks of the
          layer's cache, straight from the stacked cache), "reference" (`attend`, every slot) or "pallas"
          (the tree-attention kernel).

        ``collect_qk=True`` also returns every layer's post-RoPE queries and keys of the block in
        ``ModelOutput.qk = (q [L,B,T,H,D], k [L,B,T,KVH,D])`` (zeros for skipped layers; the range's
        layers only with ``layer_range``).

        ``write_cache=False`` (full calls only): the cache is returned as it came and the block's keys/values
        ``[L,B,T,KVH,D]`` are in ``ModelOutput.kv``; ``jaxdec.cache.kv.append(cache, *kv)`` then gives the
        cache the default call returns.
        """
        c = self.config
        lo, hi = self._layer_range(layer_range)
        partial = (lo, hi) != (0, c.num_layers)
        n_run = hi - lo
        matmul = functools.partial(quant_matmul, impl=self.matmul_impl)
        given = [n for n, v in (("tokens", tokens), ("embeds", embeds), ("hidden_in", hidden_in)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of tokens, embeds, hidden_in (got {given or 'none'})")
        if hidden_in is not None:
            x = jnp.asarray(hidden_in).astype(jnp.float32)
        elif lo > 0:
            raise ValueError(f"layer_range starts at layer {lo}: pass the residual stream entering it as hidden_in")
        elif embeds is not None:
            x = jnp.asarray(embeds).astype(jnp.float32)
        else:
            x = embed_lookup(params["embed"], tokens).astype(jnp.float32)
        if x.ndim != 3 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"{given[0]} must be [B, T, {c.hidden_size}], got shape {x.shape}")
        b, t = x.shape[:2]
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        prefix = isinstance(cache, KVCache) and cache.prefix_k is not None
        cache_mask = None
        if isinstance(attention, str):
            if attention == "causal":
                block_mask = causal_block_mask(b, t) if mask is None else mask
            elif attention == "bidirectional":
                if mask is not None:
                    raise ValueError("attention='bidirectional' cannot be combined with a block mask")
                block_mask = jnp.ones((b, t, t), bool)
            else:
                raise ValueError(f"attention must be 'causal', 'bidirectional' or a bool [B, T, S+T] array, "
                                 f"got {attention!r}")
        else:
            if mask is not None:
                raise ValueError("an explicit attention array already holds the block mask: pass mask=None")
            if attn_fn is not None or prefix or self.attention_impl not in ("xla", "reference"):
                raise ValueError("an explicit attention array needs attention_impl='xla', no attn_fn and an "
                                 "ordinary (not shared-prefix) cache")
            full = jnp.asarray(attention, bool)
            s = cache.size
            if full.shape != (b, t, s + t):
                raise ValueError(f"attention array must be [B, T, S+T] = {(b, t, s + t)} (S = cache.size), "
                                 f"got {full.shape}")
            cache_mask, block_mask = full[:, :, :s], full[:, :, s:]
        on = jnp.ones((c.num_layers,), bool) if layers is None else jnp.asarray(layers, bool)
        # stacked: the attention reads the layer's keys/values from the whole [L,...] cache by layer index
        # (blockwise attention: only the committed chunks are read, no per-layer copy of the cache)
        stacked = False
        if attn_fn is not None:
            if prefix:
                raise ValueError("attn_fn cannot be combined with a shared-prefix cache (cache.prefix_k "
                                 "is set): the cache's prefix needs the Hydragen attention")
            attn, extra_xs, lengths = attn_fn, attn_extra, cache.lengths
        elif prefix:
            plen = cache.prefix_len

            def attn(q, kc, vc, suf_len, k, v, bm, q_pos, extra, sliding_window=None, layer=None):
                pk, pv = extra
                return hydragen_attend(q, pk, pv, plen, kc, vc, suf_len, k, v, bm, q_pos,
                                       sliding_window=sliding_window, layer=layer, cache_layout="bksd")
            # the suffixes are read chunk by chunk from the stacked cache, like the "xla" path
            extra_xs, lengths = (cache.prefix_k, cache.prefix_v), cache.lengths - cache.row_prefix_len
            stacked = True
        elif cache_mask is not None and self.attention_impl == "reference":
            def attn(q, kc, vc, lens, k, v, bm, q_pos, extra, sliding_window=None):
                return attend(q, kc, vc, lens, k, v, bm, q_pos, sliding_window=sliding_window,
                              cache_mask=cache_mask)
            extra_xs, lengths = None, cache.lengths
        elif self.attention_impl == "xla":
            def attn(q, kc, vc, lens, k, v, bm, q_pos, extra, sliding_window=None, layer=None):
                return blockwise_attend(q, kc, vc, lens, k, v, bm, q_pos, sliding_window=sliding_window,
                                        cache_mask=cache_mask, layer=layer, cache_layout="bksd")
            extra_xs, lengths, stacked = None, cache.lengths, True
        else:
            base = _attention_fn(self.attention_impl)
            if self.attention_mesh is not None:
                from jaxdec import sharding
                base = sharding.shard_map_attention(base, self.attention_mesh,
                                                    sharding.heads_split(self, self.attention_mesh))

            def attn(q, kc, vc, lens, k, v, bm, q_pos, extra, sliding_window=None):
                return base(q, kc, vc, lens, k, v, bm, q_pos, sliding_window=sliding_window)
            extra_xs, lengths = None, cache.lengths

        def block(h, p, kc, vc, extra, li):
            hn = rms_norm(h, p["attn_norm"], c.rms_norm_eps)
            q = matmul(hn, p["wq"])
            k = matmul(hn, p["wk"])
            v = matmul(hn, p["wv"])
            if c.qkv_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
            v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
            if stacked:
                a = attn(q, cache.k, cache.v, lengths, k, v, block_mask, positions, extra,
                         sliding_window=c.sliding_window, layer=li)
            else:  # per-layer attention functions take [B,S,KVH,D]; the cache stores [B,KVH,S,D]
                a = attn(q, jnp.swapaxes(kc, 1, 2), jnp.swapaxes(vc, 1, 2), lengths, k, v, block_mask, positions,
                         extra, sliding_window=c.sliding_window)
            h = h + matmul(a.reshape(b, t, c.num_heads * c.head_dim), p["wo"])
            hn = rms_norm(h, p["mlp_norm"], c.rms_norm_eps)
            h = h + matmul(jax.nn.silu(matmul(hn, p["w_gate"])) * matmul(hn, p["w_up"]), p["w_down"])
            return h, k, v, (q if collect_qk else None)

        def skip(h, p, kc, vc, extra, li):
            z = jnp.zeros((b, t, c.num_kv_heads, c.head_dim), h.dtype)
            zq = jnp.zeros((b, t, c.num_heads, c.head_dim), h.dtype) if collect_qk else None
            return h, z, z, zq

        # quantized stacks are read in place by index (a scan slice would copy them every step)
        layer_xs, pick_layer = scan_layer_params(params["layers"])
        kc_xs, vc_xs = (None, None) if stacked else (cache.k, cache.v)
        if partial:
            part = lambda a: a[lo:hi]
            layer_xs = jax.tree.map(part, layer_xs)
            kc_xs, vc_xs, on = jax.tree.map(part, kc_xs), jax.tree.map(part, vc_xs), part(on)
            extra_xs = None if extra_xs is None else jax.tree.map(part, extra_xs)

        # hidden_layers: a [k,B,T,E] buffer in the scan carry, slot j written when its layer's output passes
        picks = None
        if hidden_layers is not None:
            if return_layer_hidden:
                raise ValueError("pass hidden_layers or return_layer_hidden, not both")
            want = tuple(int(i) for i in hidden_layers)
            if not want or any(not lo <= i <= hi for i in want):
                raise ValueError(f"hidden_layers must be a non-empty tuple of layer counts in [{lo}, {hi}], "
                                 f"got {hidden_layers!r}")
            uniq = sorted(set(want))
            slot_of = np.full((n_run,), -1, np.int32)  # scan step i (layer lo + i) -> slot of count lo + i + 1
            for j, n in enumerate(uniq):
                if n > lo:
                    slot_of[n - lo - 1] = j
            picks = jnp.zeros((len(uniq), b, t, x.shape[-1]), x.dtype)
            if uniq[0] == lo:
                picks = picks.at[0].set(x)

        def layer(carry, xs):
            p, index, kc, vc, on_l, extra, slot = xs
            h = carry if picks is None else carry[0]
            p = pick_layer(p, index)
            if layers is None:
                h2, k, v, q = block(h, p, kc, vc, extra, index)
            else:
                h2, k, v, q = jax.lax.cond(on_l, block, skip, h, p, kc, vc, extra, index)
            if picks is None:
                out = h2
            else:
                buf = carry[1]
                j = jnp.maximum(slot, 0)
                cur = jax.lax.dynamic_index_in_dim(buf, j, 0, keepdims=False)
                buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, h2, cur), j, 0)
                out = (h2, buf)
            return out, (k, v, h2 if return_layer_hidden else None, q)

        init = x if picks is None else (x, picks)
        slots = None if picks is None else jnp.asarray(slot_of)
        carry, (k_new, v_new, per_layer, q_all) = jax.lax.scan(
            layer, init, (layer_xs, jnp.arange(lo, hi, dtype=jnp.int32), kc_xs, vc_xs, on, extra_xs, slots))
        h = carry if picks is None else carry[0]
        residual = h if partial else None
        kv = None
        if not write_cache:
            if partial:
                raise ValueError("write_cache=False needs a full call (no layer_range)")
            kv = (k_new, v_new)
        elif partial:
            cache = _write_layers(cache, k_new, v_new, lo, hi, advance=hi == c.num_layers)
        else:
            cache = append(cache, k_new, v_new)
        h = rms_norm(h, params["final_norm"], c.rms_norm_eps)
        hs = h if logits_at is None else jnp.take_along_axis(h, logits_at[:, :, None], axis=1)
        head = params["lm_head"] if "lm_head" in params else params["embed"]
        logits = matmul(hs, head)
        layer_hidden = None
        if return_layer_hidden:
            layer_hidden = jnp.concatenate([x[None], per_layer], axis=0)
        elif picks is not None:
            buf = carry[1]
            layer_hidden = buf if list(want) == uniq else buf[np.asarray([uniq.index(i) for i in want])]
        qk = (q_all, k_new) if collect_qk else None
        return ModelOutput(logits, h, cache, layer_hidden, qk, residual, kv)


def _slice_stack(v, lo: int, hi: int):
    """Layers ``lo .. hi-1`` of one stacked layer parameter (a float array, a QTensor or a DF11Stack,
    whose shared decode tables are kept whole)."""
    if isinstance(v, DF11Stack):
        return dataclasses.replace(v, sign_mantissa=v.sign_mantissa[lo:hi], stream=v.stream[lo:hi],
                                   block_offsets=v.block_offsets[lo:hi], shape=(hi - lo,) + tuple(v.shape[1:]))
    return jax.tree.map(lambda a: a[lo:hi], v)


def _write_layers(cache: KVCache, k_new, v_new, lo: int, hi: int, advance: bool) -> KVCache:
    """Write ``k_new/v_new [hi-lo,B,T,KVH,D]`` into cache layers ``lo .. hi-1`` (``[L,B,KVH,S,D]``) at each row's
    write offset; lengths advance by T only when ``advance``."""
    b, t = k_new.shape[1:3]
    off = cache.offsets
    rows, cols = jnp.arange(b)[:, None], off[:, None] + jnp.arange(t)[None, :]

    def upd(new, buf):  # [B,T,hi-lo,KVH,D]: the indexed axes first, as the scatter below wants them
        return jnp.transpose(new.astype(buf.dtype), (1, 2, 0, 3, 4))
    k = cache.k.at[lo:hi, rows, :, cols].set(upd(k_new, cache.k), mode="drop")
    v = cache.v.at[lo:hi, rows, :, cols].set(upd(v_new, cache.v), mode="drop")
    lengths = cache.lengths + t if advance else cache.lengths
    return cache.replace(k=k, v=v, lengths=lengths)
