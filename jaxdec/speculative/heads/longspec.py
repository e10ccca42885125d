"""LongSpec draft head (Yang et al. 2025, "LongSpec: Long-Context Speculative Decoding with Efficient Drafting
and Verification"; official code github.com/sail-sg/LongSpec).

A one-layer draft on the target's features, like `jaxdec.speculative.heads.eagle` (input at position t:
``fc([f_t ; embed(x_{t+1})])``, ``f_t`` the target's final-norm hidden state, ``embed`` the target's own frozen
embedding; the output ``o_t`` scores ``x_{t+2}`` through the target's LM-head rows ``d2t`` and is fed back as
the feature of the next draft position), whose memory is **constant in the context length**:

* its self-attention sees only the first ``sinks`` positions (attention sinks) and the last ``window``
  positions; its KV cache is a fixed buffer of ``sinks + window + num_tokens + 1`` slots (sinks at slots
  ``0..sinks-1``, the rest a ring: position p >= sinks lives at ``sinks + (p - sinks) % ring``), so a 4k-token
  prompt costs the draft the same memory and the same attention work per step as a 40-token one. The long
  context reaches the draft through the target's features ``f_t`` (the target has read the whole prompt).
* anchor-offset position indices in training (`anchor_offset_positions`): a training sequence keeps the
  RoPE indices ``0..sinks-1`` for its first ``sinks`` tokens and every later token is shifted by one random
  offset per row (up to ``max_offset``), so a draft trained on short sequences has seen the large distances
  between the sinks and the window that a long prompt gives at inference.

Facts from the official code (longspec/train/models/llama_glide.py) and where this module differs:
the official draft layer ("glide") runs sliding-window self-attention (flash-attn ``window_size=(512, -1)``)
over its own token embeddings, then a cross-attention that reads the **target's last-layer KV cache**, then
the MLP; training shifts positions ``[sink:]`` by ``randint(0, min(30000, max_len - 1000) - T)`` with
``sink = randint(0, 4)`` for sequences under 1200 tokens. Here (the project's brief) the long context enters
through the target's hidden states as in EAGLE instead of a cross-attention over the target's KV cache (no
second read of the long cache per draft step), the attention sinks are kept in the draft's own cache as well
as in the position indices, and the sink count is the fixed ``sinks`` (default 4, window default 512).

Initialisation reads the engine's prefilled target cache: one target call over the last ``ring + 1`` prompt
positions (the cache rolled back to where they start) gives the features the draft cache holds, so a long
prompt is prefilled once, not twice as a drafter with a full-length draft cache would need.

Hybrid tree attention (LongSpec's verify call: Flash-Decoding over the long committed prefix, a tree-masked
kernel over the draft block, the two merged by their log-sum-exp) is the target's own default "xla" attention
here, not this module: `jaxdec.attention.blockwise` reads the committed cache in key chunks (trip count from the
rows' lengths, an online softmax), the block's own keys under the tree/ancestor mask (`block_partial`), and
merges the two online-softmax states; the Pallas tree-attention kernel does the same in one kernel.
Drafts are chains of ``num_tokens``, greedy verification (lossless for greedy decoding).

Params (a dict of arrays): ``{"fc": [E,2E], "attn_norm": [E], "wq": [H*D,E], "wk": [KV*D,E], "wv": [KV*D,E],
"wo": [E,H*D], "mlp_norm": [E], "w_gate": [F,E], "w_up": [F,E], "w_down": [E,F], "final_norm": [E]}``; the
drafter's params are ``{"heads": those, "target": target params, "d2t": [Vd], "head_w": LM-head rows}``
(`build` makes them).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.speculative.heads.medusa import split_draft_params
from jaxdec.speculative.tree import Draft, TreeSpec

KIND = "longspec"


@dataclasses.dataclass(frozen=True)
class LongSpecConfig:
    hidden: int  # the target's E
    draft_vocab: int  # rows of the shared LM head the draft scores (d2t)
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate: int = 1536
    rope_theta: float = 100000.0
    num_tokens: int = 4  # chain length drafted per step
    window: int = 512  # sliding window of the draft's self-attention (the query's own position included)
    sinks: int = 4  # attention sinks: the first positions, always attended, RoPE indices kept in training
    rms_eps: float = 1e-5

    def __post_init__(self):
        for name in ("hidden", "draft_vocab", "num_heads", "num_kv_heads", "head_dim", "intermediate", "num_tokens",
                     "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"LongSpecConfig.{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, (int, np.integer)) or self.sinks < 0:
            raise ValueError(f"LongSpecConfig.sinks must be an integer >= 0, got {self.sinks!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LongSpecConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads "
                             f"({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LongSpecConfig.head_dim must be even (RoPE), got {self.head_dim}")
        for name in ("rope_theta", "rms_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"LongSpecConfig.{name} must be a number > 0, got {v!r}")

    @property
    def ring(self) -> int:
        """Slots of the window ring: the window plus the positions one step writes past the committed ones."""
        return self.window + self.num_tokens + 1

    @property
    def slots(self) -> int:
        """The draft cache's size (per row): constant, whatever the context length."""
        return self.sinks + self.ring

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LongSpecConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or not {"hidden", "draft_vocab"} <= set(d):
            raise ValueError(f"longspec config must be a dict with keys among {sorted(names)}, got {d!r}")
        return cls(**d)


def param_shapes(c: LongSpecConfig) -> dict:
    e, h, kv, d, f = c.hidden, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate
    return {"fc": (e, 2 * e), "attn_norm": (e,), "wq": (h * d, e), "wk": (kv * d, e), "wv": (kv * d, e),
            "wo": (e, h * d), "mlp_norm": (e,), "w_gate": (f, e), "w_up": (f, e), "w_down": (e, f), "final_norm": (e,)}


def init_params(c: LongSpecConfig, seed: int = 0) -> dict:
    """Random layer weights (scaled like a fresh transformer layer); ``fc`` starts as ``f_t + embed(x_{t+1})``."""
    shapes = param_shapes(c)
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    out = {}
    for k, (name, s) in zip(keys, sorted(shapes.items())):
        if name.endswith("norm"):
            out[name] = jnp.ones(s, jnp.float32)
        elif name == "fc":
            out[name] = jnp.concatenate([jnp.eye(c.hidden), jnp.eye(c.hidden)], axis=1).astype(jnp.float32)
        else:
            w = jax.random.normal(k, s, jnp.float32) / np.sqrt(s[-1])
            out[name] = w * 0.1 if name in ("wo", "w_down") else w
    return out


def check_params(c: LongSpecConfig, params, where: str = "longspec head params") -> None:
    """ValueError naming the first tensor that is missing or whose shape does not match the config."""
    want = param_shapes(c)
    if not isinstance(params, dict) or set(params) != set(want):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{where}: params have keys {got}, expected {sorted(want)}")
    for k, s in want.items():
        if tuple(np.shape(params[k])) != s:
            raise ValueError(f"{where}: {k} has shape {tuple(np.shape(params[k]))}, the config needs {s}")


# --------------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------------

def _rms(x, w, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
    """x [B,T,N,D] rotated at ``positions [B,T]`` (half-split RoPE, as the target's)."""
    from jaxdec.models.llama import apply_rope, rope_tables
    cos, sin = rope_tables(positions, x.shape[-1], theta)
    return apply_rope(x, cos, sin)


def qkv(c: LongSpecConfig, hp, x, rope_pos):
    """Queries [B,T,H,D], keys and values [B,T,KV,D] of inputs ``x [B,T,E]`` at RoPE indices ``rope_pos``."""
    b, t, _ = x.shape
    h = _rms(x, hp["attn_norm"], c.rms_eps)
    q = (h @ hp["wq"].T).reshape(b, t, c.num_heads, c.head_dim)
    k = (h @ hp["wk"].T).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = (h @ hp["wv"].T).reshape(b, t, c.num_kv_heads, c.head_dim)
    return _rope(q, rope_pos, c.rope_theta), _rope(k, rope_pos, c.rope_theta), v


def window_mask(c: LongSpecConfig, qpos, kpos):
    """[B,T,S] bool: key at position ``kpos [B,S]`` (-1: empty slot) is seen by the query at ``qpos [B,T]``:
    causal, and a sink (position < sinks) or one of the last ``window`` positions."""
    q, k = qpos[:, :, None], kpos[:, None, :]
    return (k >= 0) & (k <= q) & ((k < c.sinks) | (k > q - c.window))


def attend_and_mlp(c: LongSpecConfig, hp, x, q, k, v, mask):
    """The rest of the layer: attention of ``q`` over ``k, v [B,S,KV,D]`` under ``mask [B,T,S]``, residual,
    MLP, final norm -> the draft output ``o [B,T,E]``."""
    b, t = q.shape[:2]
    g = c.num_heads // c.num_kv_heads
    qg = q.reshape(b, t, c.num_kv_heads, g, c.head_dim)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k) / np.sqrt(c.head_dim)
    s = jnp.where(mask[:, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * jnp.any(mask, axis=-1)[:, None, None, :, None]
    a = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, c.num_heads * c.head_dim)
    x = x + a @ hp["wo"].T
    h = _rms(x, hp["mlp_norm"], c.rms_eps)
    x = x + (jax.nn.silu(h @ hp["w_gate"].T) * (h @ hp["w_up"].T)) @ hp["w_down"].T
    return _rms(x, hp["final_norm"], c.rms_eps)


def forward(c: LongSpecConfig, hp, x, rope_pos, index_pos=None):
    """Training / reference: the layer over whole sequences ``x [B,T,E]`` (no cache), RoPE at ``rope_pos``,
    the window and sinks by ``index_pos`` (default ``rope_pos``) -> ``o [B,T,E]``."""
    index_pos = rope_pos if index_pos is None else index_pos
    q, k, v = qkv(c, hp, x, rope_pos)
    return attend_and_mlp(c, hp, x, q, k, v, window_mask(c, index_pos, index_pos))


def anchor_offset_positions(c: LongSpecConfig, key, batch: int, length: int, max_offset: int):
    """LongSpec's anchor-offset indices ``[B,T]``: ``0..sinks-1``, then ``i + offset_b`` with one offset per
    row drawn uniformly from ``0 .. max(max_offset - T, 0)``."""
    i = jnp.arange(length, dtype=jnp.int32)[None]
    off = jax.random.randint(key, (batch, 1), 0, max(int(max_offset) - length, 0) + 1, jnp.int32)
    return jnp.where(i < c.sinks, i, i + off)


def slot_of(c: LongSpecConfig, pos):
    """The cache slot of position ``pos`` (sinks first, then the ring)."""
    return jnp.where(pos < c.sinks, pos, c.sinks + jnp.mod(pos - c.sinks, c.ring)).astype(jnp.int32)


@struct.dataclass
class DraftCache:
    """The draft's constant-size KV memory: k, v [B,slots,KV,D] (RoPE applied), pos [B,slots] (-1: empty)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


def empty_cache(c: LongSpecConfig, batch: int) -> DraftCache:
    z = jnp.zeros((batch, c.slots, c.num_kv_heads, c.head_dim), jnp.float32)
    return DraftCache(z, z, jnp.full((batch, c.slots), -1, jnp.int32))


def fill_cache(c: LongSpecConfig, hp, x, lengths, start=None, sink_x=None) -> DraftCache:
    """The cache holding positions ``0 .. lengths-1``: the sinks and the last ring's worth. ``x [B,W,E]``: the
    draft inputs at positions ``start .. start+W-1`` (``start [B]``, default 0); ``sink_x [B,s,E]``: those at
    positions ``0..s-1`` (``s <= sinks``) when the block does not start at 0. A position's keys depend on its
    input alone, so no attention is run."""
    b, w, _ = x.shape
    start = jnp.zeros((b,), jnp.int32) if start is None else start.astype(jnp.int32)
    _, k, v = qkv(c, hp, x, start[:, None] + jnp.arange(w, dtype=jnp.int32)[None])
    j = jnp.arange(c.slots, dtype=jnp.int32)[None]
    last = (lengths - 1)[:, None]
    # the newest position <= last that lives at slot j (sinks: slot j holds position j)
    src = jnp.where(j < c.sinks, j, last - jnp.mod(last - j, c.ring))
    ok = (src >= 0) & (src <= last) & ((j < c.sinks) | (src >= c.sinks))
    rel = src - start[:, None]
    in_blk = (rel >= 0) & (rel < w)
    idx = jnp.clip(rel, 0, w - 1)[:, :, None, None]
    k, v = jnp.take_along_axis(k, idx, axis=1), jnp.take_along_axis(v, idx, axis=1)
    if sink_x is not None and sink_x.shape[1]:
        s = sink_x.shape[1]
        _, ks, vs = qkv(c, hp, sink_x, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
        sidx = jnp.clip(j, 0, s - 1)[:, :, None, None] + jnp.zeros((b, 1, 1, 1), jnp.int32)
        use_s = (~in_blk & (j < s))[:, :, None, None]
        k = jnp.where(use_s, jnp.take_along_axis(ks, sidx, axis=1), k)
        v = jnp.where(use_s, jnp.take_along_axis(vs, sidx, axis=1), v)
        in_blk = in_blk | (j < s)
    ok = ok & in_blk
    return DraftCache(k * ok[:, :, None, None], v * ok[:, :, None, None], jnp.where(ok, src, -1))


def cached_step(c: LongSpecConfig, hp, cache: DraftCache, x, pos, valid):
    """Writes the keys of ``x [B,T,E]`` at positions ``pos [B,T]`` (where ``valid``) into the cache and runs
    the layer for those queries over the cache -> ``(o [B,T,E], cache)``. Entries at positions past a query
    (left from a rejected draft) are never read: the mask is causal by stored position."""
    b, t, _ = x.shape
    q, k, v = qkv(c, hp, x, pos)
    slot = jnp.where(valid, slot_of(c, pos), c.slots)  # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    cache = DraftCache(cache.k.at[rows, slot].set(k, mode="drop"), cache.v.at[rows, slot].set(v, mode="drop"),
                       cache.pos.at[rows, slot].set(pos, mode="drop"))
    return attend_and_mlp(c, hp, x, q, cache.k, cache.v, window_mask(c, pos, cache.pos)), cache


def target_embed(model, target_params, ids):
    fn = getattr(model, "embed", None)
    if fn is not None:
        return fn(target_params, ids)
    from jaxdec.quant import embed_lookup
    return embed_lookup(target_params["embed"], ids).astype(jnp.float32)


def draft_inputs(hp, model, target_params, feats, next_ids):
    """``fc([f ; embed(x_next)])``: ``feats [..., E]``, ``next_ids [...]`` -> ``[..., E]``."""
    x = jnp.concatenate([feats.astype(jnp.float32), target_embed(model, target_params, next_ids)], axis=-1)
    return x @ hp["fc"].T


def head_scores(o, head_w):
    from jaxdec.quant import matmul
    return matmul(o, head_w)


# --------------------------------------------------------------------------------------------------
# drafter
# --------------------------------------------------------------------------------------------------

@struct.dataclass
class LongSpecState:
    """cache: the draft's constant-size memory; length [B]: positions committed to it (one per target position
    but the last); pend_f [B,P,E], pend_x [B,P], npend [B]: (target feature, next token) pairs not yet written."""

    cache: DraftCache
    length: jax.Array
    pend_f: jax.Array
    pend_x: jax.Array
    npend: jax.Array


@dataclasses.dataclass(frozen=True)
class LongSpecDrafter:
    config: LongSpecConfig

    own_params = True
    extra_headroom = 0
    is_chain = True
    max_children = 1

    def __post_init__(self):
        if not isinstance(self.config, LongSpecConfig):
            raise TypeError(f"LongSpecDrafter.config must be a LongSpecConfig, got {type(self.config).__name__}")

    num_nodes = property(lambda self: self.config.num_tokens)
    max_depth = property(lambda self: self.config.num_tokens)
    draft_calls_per_step = property(lambda self: self.config.num_tokens)

    @staticmethod
    def _split(dparams):
        return split_draft_params(dparams, "LongSpecDrafter", ("heads", "target", "head_w", "d2t"),
                                  "jaxdec.speculative.heads.longspec.build")

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        """The draft cache from the target's features at the positions it holds: the last ``ring + 1`` prompt
        positions (one target call over them reading the engine's prefilled cache, rolled back to where they
        start: O(ring x prompt) work, not a second prefill) and the sinks (the first tokens alone)."""
        from jaxdec.cache.kv import rollback
        hp, tp, _, _ = self._split(dparams)
        b, p = prompts.shape
        c = self.config
        w = min(c.ring + 1, p)
        plen = prompt_lens.astype(jnp.int32)
        start = jnp.clip(plen - w, 0, p - w)
        bpos = start[:, None] + jnp.arange(w, dtype=jnp.int32)[None]
        blk = jnp.take_along_axis(prompts, bpos, axis=1)
        nxt = jnp.take_along_axis(prompts, jnp.minimum(bpos + 1, p - 1), axis=1).astype(jnp.int32)
        feats = model(tp, blk, bpos, rollback(state.cache, start)).hidden.astype(jnp.float32)  # [B,w,E]
        if feats.shape[-1] != c.hidden:
            raise ValueError(f"longspec head was built for hidden size {c.hidden}, the target's is {feats.shape[-1]}")
        s = min(c.sinks, p - 1)
        sink_x = None
        if s:
            spos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            sf = model(tp, prompts[:, :s], spos, model.init_cache(b, s)).hidden.astype(jnp.float32)
            sink_x = draft_inputs(hp, model, tp, sf, prompts[:, 1:s + 1].astype(jnp.int32))
        cache = fill_cache(c, hp, draft_inputs(hp, model, tp, feats, nxt), plen - 1, start, sink_x)
        slots = c.num_tokens + 1
        last_f = jnp.take_along_axis(feats, (plen - 1 - start)[:, None, None], axis=1)
        pend_f = jnp.zeros((b, slots, c.hidden), jnp.float32).at[:, :1].set(last_f)
        pend_x = jnp.zeros((b, slots), jnp.int32).at[:, 0].set(state.last)
        return LongSpecState(cache=cache, length=plen - 1, pend_f=pend_f, pend_x=pend_x,
                             npend=jnp.ones((b,), jnp.int32))

    def propose(self, model, dparams, state, keys):
        hp, tp, head_w, d2t = self._split(dparams)
        ds = state.method.draft
        c = self.config
        slots = ds.pend_x.shape[1]
        ar = jnp.arange(slots, dtype=jnp.int32)[None]
        pos = ds.length[:, None] + ar
        o, cache = cached_step(c, hp, ds.cache, draft_inputs(hp, model, tp, ds.pend_f, ds.pend_x), pos,
                               ar < ds.npend[:, None])
        committed = ds.length + ds.npend
        o = jnp.take_along_axis(o, (ds.npend - 1)[:, None, None], axis=1)  # [B,1,E]
        d2t = jnp.asarray(d2t, jnp.int32)
        toks = [d2t[jnp.argmax(head_scores(o[:, 0], head_w), axis=-1).astype(jnp.int32)]]
        b = o.shape[0]
        ones = jnp.ones((b, 1), bool)
        for i in range(1, c.num_tokens):
            o, cache = cached_step(c, hp, cache, draft_inputs(hp, model, tp, o, toks[-1][:, None]),
                                   (committed + i - 1)[:, None], ones)
            toks.append(d2t[jnp.argmax(head_scores(o[:, 0], head_w), axis=-1).astype(jnp.int32)])
        toks = jnp.stack(toks, axis=1)
        draft = Draft(toks, TreeSpec.chain(c.num_tokens).parents_array(b), jnp.ones(toks.shape, bool))
        # the drafted positions stay in the ring past `committed`: never read (causal by position), overwritten
        return draft, ds.replace(cache=cache, length=committed), state.cache

    def update(self, model, dparams, state, dstate, info):
        feats = jnp.take_along_axis(info.hidden.astype(jnp.float32), info.path[:, :, None], axis=1)  # [B,D+1,E]
        run = info.live & (info.cnt > 0)
        return dstate.replace(pend_f=jnp.where(run[:, None, None], feats, dstate.pend_f),
                              pend_x=jnp.where(run[:, None], info.out.astype(jnp.int32), dstate.pend_x),
                              npend=jnp.where(run, info.cnt, dstate.npend))


def load_longspec(path: str, fingerprint: Optional[str]):
    """(LongSpecConfig, head params as float32 jax arrays, metadata, d2t) from a heads file, refused with
    `HeadsMismatch` when it was trained for another target (``fingerprint=None`` skips the check)."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    d2t = params.pop("d2t", None)
    try:
        config = LongSpecConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad longspec config in its metadata ({e})") from None
    check_params(config, params, f"heads file {str(path)!r} (corrupt file)")
    if d2t is None or np.shape(d2t) != (config.draft_vocab,):
        raise ValueError(f"heads file {str(path)!r}: its d2t map does not match draft_vocab={config.draft_vocab} "
                         f"(corrupt file)")
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), meta, np.asarray(d2t, np.int32)


def build(model, params, heads, target=None, num_tokens: Optional[int] = None):
    """-> (decoder, params): the LongSpec draft head drafting chains for the target, greedy verification.

    heads: a heads file written by ``train/longspec.py`` (checked against the target: `HeadsMismatch` when it
    was trained for another one) or an in-memory ``(LongSpecConfig, head params, d2t)`` triple (no check).
    target: the target's model file or folder, or a fingerprint string; None: the params are fingerprinted.
    num_tokens: overrides the stored chain length."""
    from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    from jaxdec.speculative.heads.medusa import draft_head
    if isinstance(heads, tuple) and len(heads) == 3 and isinstance(heads[0], LongSpecConfig):
        config, hp, d2t = heads
        check_params(config, hp)
    elif isinstance(heads, (str, os.PathLike)):
        fp = expected_fingerprint(model, params, target)
        config, hp, _, d2t = load_longspec(heads, fp)
    else:
        raise TypeError(f"heads must be a heads file path or a (LongSpecConfig, params, d2t) triple, got "
                        f"{type(heads).__name__}")
    if num_tokens is not None:
        config = dataclasses.replace(config, num_tokens=num_tokens)
    d2t = np.asarray(d2t)
    if (d2t.shape != (config.draft_vocab,) or not np.issubdtype(d2t.dtype, np.integer) or d2t.min() < 0
            or d2t.max() >= model.vocab_size):
        raise ValueError(f"longspec: d2t must be {config.draft_vocab} token ids in [0, {model.vocab_size})")
    dparams = {"heads": hp, "target": params, "d2t": d2t.astype(np.int32), "head_w": draft_head(model, params, d2t)}
    return SpeculativeDecoder(LongSpecDrafter(config), "greedy"), with_draft_params(params, dparams)
