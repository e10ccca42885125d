"""Clover draft heads (Xiao et al. 2024, "Clover: Regressive Lightweight Speculative Decoding with Sequential
Knowledge"; official code: github.com/XiaoBin1992/clover, whose current tree is Clover-2).

Three pieces on top of the frozen target, as in the paper:

* **Augmenting block**: one transformer block (a 1-layer `LlamaModel`, causal self-attention over the
  sequence, with its own KV cache) over the target's final-norm hidden states ``f``; its output is added
  to ``f``: ``a_t = f_t + block(f)_t`` (the block's output norm starts at zero, so an untrained block passes
  ``f`` through). It runs once per decoding step over the newly accepted positions, not once per head.
* **Attention decoder**: head k merges the hidden side with the embedding ``e_k`` (the target's own,
  shared and frozen) of the token before the one it predicts: the query comes from the token,
  ``q = Wq rms(e_k)``, the keys/values from the hidden side, ``rms(m_j) Wk / Wv`` over the memory
  ``m = [a_t, s_1, .., s_{k-1}]`` (the augmented hidden state and the earlier heads' states), softmax per
  attention head; ``g_k = s_{k-1} + Wo c_k``.
* **Regressive connection**: ``s_k = R(W [g_k ; rms(e_k)] + b)`` with ``R(x) = x + SiLU(Wr x + br)`` (a
  Medusa-style residual block); head k's token is the one head k-1 drafted (head 1 reads the target's own
  next token), so the drafts are sequential, and ``s_k`` is the next head's hidden state. The weights are
  shared by the heads (Clover-2's recurrent form; the artefact stays under 20 MB).

What is this module's own choice rather than the paper's: the official repository holds Clover-2 (its
attention decoder runs before the augmenting block, queries from the hidden side and weighs each head's value
by a cosine similarity; its heads share one recurrent block), while this module keeps the Clover paper's
order (augmenting block, then per head a token-side query over the hidden side); the attention decoder's
memory (the augmented state plus the earlier heads' states, so that the softmax has more than one key from
the second head on) and the shared head weights are this module's.

Each head scores a reduced draft vocabulary through the target's LM-head rows ``d2t`` (EAGLE-3's map; the
rows are gathered by `jaxdec.speculative.heads.medusa.draft_head`, a quantized head stays quantized).

Drafts are chains of ``num_tokens``; greedy verification gives exactly the greedy tokens, and with
``sampling=True`` each head's token is drawn from its processed distribution (the next head reads the drawn
token) and the drafts carry those ``q``, so speculative sampling is lossless for sampling.

SpecDec++'s learned stop (``CloverDrafter(stop_head=)``; `jaxdec.speculative.heads.acceptance`): an acceptance
head reads each head's regressive state ``s_k`` (the state whose LM-head scores give draft token k) and the
chain ends once the predicted probability that some of its tokens is rejected would pass the threshold;
tokens past the stop are marked invalid and never accepted. The heads are sequential (head k reads the token
head k-1 drafted and the earlier heads' states), so the stopped chain is a `lax.while_loop` (through
`jaxdec.speculative.drafters.autoregressive_chain`) and the head calls a row declines are not run (once no
row of the batch goes on); the augmenting block runs once per step either way, and a short draft also pays
a short verify block (verify buckets). The draft distribution is untouched (lossless greedy, exact
sampling); without a stop head the drafter is the unrolled chain below, unchanged. `draft_id` names a head
file's weights, so an acceptance head records which Clover heads it was trained for and is refused on
others.

Params (a dict of arrays, no flax module): ``{"aug": {"final_norm", "layers"}, "dec": {"q_norm", "kv_norm",
"wq", "wk", "wv", "wo"}, "merge": {"w", "b"}, "res": {"w", "b"}}``; the drafter's params are
``{"heads": those, "target": target params, "d2t": [Vd], "head_w": LM-head rows}`` (`build` makes them).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.speculative.heads.medusa import split_draft_params
from jaxdec.speculative.tree import Draft, TreeSpec

KIND = "clover"


@dataclasses.dataclass(frozen=True)
class CloverConfig:
    hidden: int  # the target's E
    draft_vocab: int  # rows of the shared LM head the heads score (d2t)
    num_tokens: int = 4  # heads = chain length drafted per step
    dec_heads: int = 9  # attention heads of the attention decoder (divides hidden)
    aug_heads: int = 9  # the augmenting block's attention
    aug_kv_heads: int = 3
    aug_head_dim: int = 64
    aug_intermediate: int = 768
    rope_theta: float = 100000.0
    max_position: int = 8192
    rms_eps: float = 1e-5

    def __post_init__(self):
        for name in ("hidden", "draft_vocab", "num_tokens", "dec_heads", "aug_heads", "aug_kv_heads", "aug_head_dim",
                     "aug_intermediate", "max_position"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"CloverConfig.{name} must be an integer >= 1, got {v!r}")
        if self.hidden % self.dec_heads:
            raise ValueError(f"CloverConfig.dec_heads ({self.dec_heads}) must divide hidden ({self.hidden})")
        if self.aug_heads % self.aug_kv_heads:
            raise ValueError(f"CloverConfig.aug_kv_heads ({self.aug_kv_heads}) must divide aug_heads ({self.aug_heads})")
        for name in ("rope_theta", "rms_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not v > 0:
                raise ValueError(f"CloverConfig.{name} must be a number > 0, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CloverConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or not {"hidden", "draft_vocab"} <= set(d):
            raise ValueError(f"clover config must be a dict with keys among {sorted(names)} (hidden and draft_vocab "
                             f"required), got {d!r}")
        return cls(**d)

    def aug_model(self, attention: str = "xla"):
        """The augmenting block as a 1-layer `LlamaModel` (its "vocabulary" is the draft vocabulary, only so
        that its params carry the LM-head rows); training uses ``attention="reference"`` (differentiable)."""
        from jaxdec.models.config import LlamaConfig
        from jaxdec.models.llama import LlamaModel
        return LlamaModel(LlamaConfig(vocab_size=self.draft_vocab, hidden_size=self.hidden,
                                      intermediate_size=self.aug_intermediate, num_layers=1, num_heads=self.aug_heads,
                                      num_kv_heads=self.aug_kv_heads, head_dim=self.aug_head_dim,
                                      rope_theta=float(self.rope_theta), tie_embeddings=False,
                                      rms_norm_eps=float(self.rms_eps), max_position=self.max_position),
                          prefill_chunk=None).with_attention(attention)


def param_shapes(config: CloverConfig) -> dict:
    e, h, kv, d, f = (config.hidden, config.aug_heads, config.aug_kv_heads, config.aug_head_dim,
                      config.aug_intermediate)
    return {"aug": {"final_norm": (e,),
                    "layers": {"attn_norm": (1, e), "wq": (1, h * d, e), "wk": (1, kv * d, e), "wv": (1, kv * d, e),
                               "wo": (1, e, h * d), "mlp_norm": (1, e), "w_gate": (1, f, e), "w_up": (1, f, e),
                               "w_down": (1, e, f)}},
            "dec": {"q_norm": (e,), "kv_norm": (e,), "wq": (e, e), "wk": (e, e), "wv": (e, e), "wo": (e, e)},
            "merge": {"w": (e, 2 * e), "b": (e,)}, "res": {"w": (e, e), "b": (e,)}}


def init_params(config: CloverConfig, seed: int = 0) -> dict:
    """Fresh weights: the augmenting block scaled like a new transformer layer with a zero output norm (it
    adds nothing yet), random attention projections with a small ``Wo``, a merge that passes the hidden side
    (``[I, 0]`` plus small noise) and a zero residual block."""
    e = config.hidden
    shapes = param_shapes(config)
    ks = iter(jax.random.split(jax.random.key(seed), 16))

    def normal(shape, scale=1.0):
        return jax.random.normal(next(ks), shape, jnp.float32) * (scale / np.sqrt(shape[-1]))

    lay = shapes["aug"]["layers"]
    aug = {"final_norm": jnp.zeros((e,), jnp.float32),
           "layers": {"attn_norm": jnp.ones(lay["attn_norm"], jnp.float32), "wq": normal(lay["wq"]),
                      "wk": normal(lay["wk"]), "wv": normal(lay["wv"]), "wo": normal(lay["wo"], 0.1),
                      "mlp_norm": jnp.ones(lay["mlp_norm"], jnp.float32), "w_gate": normal(lay["w_gate"]),
                      "w_up": normal(lay["w_up"]), "w_down": normal(lay["w_down"], 0.1)}}
    dec = {"q_norm": jnp.ones((e,), jnp.float32), "kv_norm": jnp.ones((e,), jnp.float32), "wq": normal((e, e)),
           "wk": normal((e, e)), "wv": normal((e, e)), "wo": normal((e, e), 0.1)}
    merge_w = jnp.concatenate([jnp.eye(e, dtype=jnp.float32), jnp.zeros((e, e), jnp.float32)], axis=1)
    merge = {"w": merge_w + normal((e, 2 * e), 0.01), "b": jnp.zeros((e,), jnp.float32)}
    res = {"w": jnp.zeros((e, e), jnp.float32), "b": jnp.zeros((e,), jnp.float32)}
    return {"aug": aug, "dec": dec, "merge": merge, "res": res}


def check_params(config: CloverConfig, params, where: str = "clover head params") -> None:
    """ValueError naming the first tensor whose shape does not match the config (or that is missing)."""
    want = param_shapes(config)

    def walk(w, p, path):
        if not isinstance(p, dict):
            raise ValueError(f"{where}: {path or 'params'} must be a dict of arrays, got {type(p).__name__}")
        if set(w) != set(p):
            raise ValueError(f"{where}: {path or 'params'} has keys {sorted(p)}, expected {sorted(w)}")
        for k, s in w.items():
            q = f"{path}/{k}" if path else k
            if isinstance(s, dict):
                walk(s, p[k], q)
            elif tuple(np.shape(p[k])) != s:
                raise ValueError(f"{where}: {q} has shape {tuple(np.shape(p[k]))}, the config needs {s}")

    walk(want, params, "")


# --------------------------------------------------------------------------------------------------
# the heads
# --------------------------------------------------------------------------------------------------

def _rms(x, w, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def aug_params(hp, head_w):
    return {"final_norm": hp["aug"]["final_norm"], "layers": hp["aug"]["layers"], "lm_head": head_w}


def augment(config: CloverConfig, hp, head_w, feats, positions, cache, logits_at=None, attention: str = "xla"):
    """The augmenting block over ``feats [B,T,E]`` at ``positions`` -> (``a = f + block(f)`` [B,T,E], cache)."""
    lm = config.aug_model(attention)
    b = feats.shape[0]
    at = jnp.zeros((b, 1), jnp.int32) if logits_at is None else logits_at
    out = lm(aug_params(hp, head_w), None, positions, cache, embeds=feats.astype(jnp.float32), logits_at=at)
    return feats.astype(jnp.float32) + out.hidden.astype(jnp.float32), out.cache


def head_step(config: CloverConfig, hp, s_prev, memory, mem_valid, emb):
    """One head: ``s_prev [...,E]`` (the previous head's state, or ``a`` for the first head), ``memory
    [...,M,E]`` with ``mem_valid [...,M]``, ``emb [...,E]`` the embedding of the token before the one this
    head predicts -> the head's state ``s_k [...,E]`` (its logits: ``s_k`` times the LM-head rows)."""
    d = hp["dec"]
    e = config.hidden
    nh = config.dec_heads
    dh = e // nh
    eps = config.rms_eps
    en = _rms(emb, d["q_norm"], eps)
    q = jnp.einsum("...i,oi->...o", en, d["wq"]).reshape(en.shape[:-1] + (nh, dh))
    mn = _rms(memory, d["kv_norm"], eps)
    k = jnp.einsum("...mi,oi->...mo", mn, d["wk"]).reshape(mn.shape[:-1] + (nh, dh))
    v = jnp.einsum("...mi,oi->...mo", mn, d["wv"]).reshape(mn.shape[:-1] + (nh, dh))
    sc = jnp.einsum("...hd,...mhd->...hm", q, k) / np.sqrt(dh)
    sc = jnp.where(mem_valid[..., None, :], sc, -1e30)
    att = jax.nn.softmax(sc, axis=-1)
    c = jnp.einsum("...hm,...mhd->...hd", att, v).reshape(en.shape)
    g = s_prev.astype(jnp.float32) + jnp.einsum("...i,oi->...o", c, d["wo"])
    x = jnp.einsum("...i,oi->...o", jnp.concatenate([g, _rms(emb, 1.0, eps)], axis=-1), hp["merge"]["w"])
    x = x + hp["merge"]["b"]
    return x + jax.nn.silu(jnp.einsum("...i,oi->...o", x, hp["res"]["w"]) + hp["res"]["b"])


def head_scores(s, head_w):
    """Head states ``[...,E]`` -> logits over the draft vocabulary ``[...,Vd]`` (a float or quantized head)."""
    from jaxdec.quant import matmul
    return matmul(s, head_w)


def heads_chain(config: CloverConfig, hp, head_w, a, tokens, embed_fn, states: bool = False):
    """Teacher-forced (training) or given-token run of the K heads: ``a [...,E]`` augmented states,
    ``tokens [..., K]`` the token each head reads (head 1: the target's next token; head k: the k-th token
    after it) -> logits ``[K, ..., Vd]`` (``states``: and the heads' states ``[K, ..., E]``)."""
    kk = config.num_tokens
    mem = jnp.zeros(a.shape[:-1] + (kk, a.shape[-1]), jnp.float32).at[..., 0, :].set(a)
    s = a.astype(jnp.float32)
    out, ss = [], []
    for i in range(kk):
        valid = jnp.broadcast_to(jnp.arange(kk) <= i, a.shape[:-1] + (kk,))
        s = head_step(config, hp, s, mem, valid, embed_fn(tokens[..., i]))
        out.append(head_scores(s, head_w))
        ss.append(s)
        if i + 1 < kk:
            mem = mem.at[..., i + 1, :].set(s)
    return (jnp.stack(out), jnp.stack(ss)) if states else jnp.stack(out)


# --------------------------------------------------------------------------------------------------
# drafter
# --------------------------------------------------------------------------------------------------

@struct.dataclass
class CloverState:
    """cache: the augmenting block's KV cache (committed: one position per target position before the
    pending ones). pend_f [B,P,E], npend [B]: target features not yet run through the block (P = depth + 1),
    the first ``npend`` valid; the last of them is the feature whose next token is ``state.last``."""

    cache: object
    pend_f: jax.Array
    npend: jax.Array


def target_embed(model, target_params, ids):
    """The target's input embeddings of ``ids`` (``model.embed``, else its ``embed`` table) as float32."""
    fn = getattr(model, "embed", None)
    if fn is not None:
        return fn(target_params, ids).astype(jnp.float32)
    from jaxdec.quant import embed_lookup
    return embed_lookup(target_params["embed"], ids).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class CloverDrafter:
    """Drafts a chain of ``config.num_tokens`` with Clover heads (see the module docstring); ``sample``:
    each token drawn from its head's processed distribution (for the sampling verifier).

    stop_head: SpecDec++'s learned stop (an object with ``advance``, e.g.
    `jaxdec.speculative.heads.acceptance.AcceptanceStop`) reading each head's state ``s_k``; its params ride
    in the drafter's params under ``"stop"`` (`jaxdec.speculative.methods.clover(..., stop_head=)` builds
    them), and the draft's ``calls`` (the ``draft_calls`` statistic) counts the head calls run. None (the
    default): every output and the compiled program are as before (``draft_calls`` stays 0)."""

    config: CloverConfig
    sample: bool = False
    stop_head: Any = None

    own_params = True
    max_children = 1
    is_chain = True
    extra_headroom = 0
    draft_calls_per_step = 0  # the heads are not target calls (their cost shows in wall time)

    def __post_init__(self):
        if not isinstance(self.config, CloverConfig):
            raise TypeError(f"CloverDrafter.config must be a CloverConfig, got {type(self.config).__name__}")
        if self.stop_head is not None and not callable(getattr(self.stop_head, "advance", None)):
            raise TypeError(f"CloverDrafter: stop_head must have an advance(params, feat, surv, alive, index) method, "
                            f"got {type(self.stop_head).__name__}")

    num_nodes = property(lambda self: self.config.num_tokens)
    max_depth = property(lambda self: self.config.num_tokens)

    @staticmethod
    def _split(dparams):
        return split_draft_params(dparams, "CloverDrafter", ("heads", "target", "head_w", "d2t"), "jaxdec.speculative.heads.clover.build")

    def init(self, model, dparams, prompts, prompt_lens, state, inputs):
        from jaxdec.cache.kv import rollback
        hp, tp, head_w, _ = self._split(dparams)
        b, p = prompts.shape
        c = self.config
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        # the target's features at every prompt position (a second prefill; the engine's is not shared)
        feats = model(tp, prompts, pos, model.init_cache(b, p)).hidden  # [B,P,E]
        if feats.shape[-1] != c.hidden:
            raise ValueError(f"clover heads were built for hidden size {c.hidden}, the target's is {feats.shape[-1]}")
        _, dcache = augment(c, hp, head_w, feats, pos, c.aug_model().init_cache(b, state.cache.size))
        dcache = rollback(dcache, prompt_lens - 1)  # positions 0 .. plen-2 committed; plen-1 pending
        last_f = jnp.take_along_axis(feats, (prompt_lens - 1)[:, None, None], axis=1).astype(jnp.float32)
        pend_f = jnp.zeros((b, c.num_tokens + 1, c.hidden), jnp.float32).at[:, :1].set(last_f)
        return CloverState(cache=dcache, pend_f=pend_f, npend=jnp.ones((b,), jnp.int32))

    def propose(self, model, dparams, state, keys):
        from jaxdec.cache.kv import rollback
        hp, tp, head_w, d2t = self._split(dparams)
        ds = state.method.draft
        c = self.config
        l0 = ds.cache.lengths
        slots = ds.pend_f.shape[1]
        pos = l0[:, None] + jnp.arange(slots, dtype=jnp.int32)[None]
        a_all, cache = augment(c, hp, head_w, ds.pend_f, pos, ds.cache, logits_at=(ds.npend - 1)[:, None])
        cache = rollback(cache, l0 + ds.npend)
        a = jnp.take_along_axis(a_all, (ds.npend - 1)[:, None, None], axis=1)[:, 0]  # [B,E]
        d2t = jnp.asarray(d2t, jnp.int32)
        kk = c.num_tokens
        b = a.shape[0]
        mem = jnp.zeros((b, kk, c.hidden), jnp.float32).at[:, 0].set(a)
        if self.stop_head is not None:
            draft = self._stopped_chain(model, dparams, hp, tp, head_w, d2t, a, mem, state, keys)
            return draft, ds.replace(cache=cache), state.cache
        s, x = a, state.last.astype(jnp.int32)
        toks, qs = [], []
        if self.sample:
            from jaxdec.speculative.drafters import _draw_rows, draft_distribution
            ks = jax.vmap(lambda kx: jax.random.split(kx, kk))(keys)  # [B,K]
        for i in range(kk):
            valid = jnp.broadcast_to(jnp.arange(kk) <= i, (b, kk))
            s = head_step(c, hp, s, mem, valid, target_embed(model, tp, x))
            logits = head_scores(s, head_w).astype(jnp.float32)  # [B,Vd]
            if self.sample:
                full = jnp.full((b, model.vocab_size), -jnp.inf, jnp.float32).at[:, d2t].set(logits)
                _, q = draft_distribution(full, state, True)
                x = _draw_rows(ks[:, i], q)
                qs.append(q)
            else:
                x = d2t[jnp.argmax(logits, axis=-1)].astype(jnp.int32)
            toks.append(x)
            if i + 1 < kk:
                mem = mem.at[:, i + 1].set(s)
        toks = jnp.stack(toks, axis=1)
        q = jnp.stack(qs, axis=1) if self.sample else None
        draft = Draft(toks, TreeSpec.chain(kk).parents_array(b), jnp.ones(toks.shape, bool), None, q)
        return draft, ds.replace(cache=cache), state.cache

    def _stopped_chain(self, model, dparams, hp, tp, head_w, d2t, a, mem, state, keys):
        """The chain under the learned stop: `autoregressive_chain`'s `while_loop`; its step is head i + 1
        (the carry holds the last head's state ``s``, the memory and i), and each head's ``s`` is what the
        stop head reads for the token it scores."""
        from jaxdec.speculative.drafters import autoregressive_chain
        sparams, = split_draft_params(dparams, "CloverDrafter with a stop_head", ("stop",),
                                      "jaxdec.speculative.methods.clover(..., stop_head=)")
        c = self.config
        kk = c.num_tokens

        def head(s, mem, i, x):  # head i (0-based) reading token x -> (its state, its draft-vocabulary logits)
            valid = jnp.broadcast_to(jnp.arange(kk) <= i, mem.shape[:2])
            s = head_step(c, hp, s, mem, valid, target_embed(model, tp, x))
            return s, head_scores(s, head_w).astype(jnp.float32)

        def step(carry, x):
            s, mem, i = carry
            mem = jax.lax.dynamic_update_slice_in_dim(mem, s[:, None], i + 1, axis=1)
            s, logits = head(s, mem, i + 1, x)
            return (s, mem, i + 1), logits, s

        s0, logits0 = head(a, mem, 0, state.last.astype(jnp.int32))
        draft, _ = autoregressive_chain(step, (s0, mem, jnp.zeros((), jnp.int32)), logits0, state, keys, kk,
                                        self.sample, None, self.stop_head, sparams, s0, d2t=d2t,
                                        vocab_size=model.vocab_size)
        return draft

    def update(self, model, dparams, state, dstate, info):
        # the accepted path's target features: root .. last accepted node (cnt of them); the last one's
        # next token is the bonus token (state.last after this step)
        feats = jnp.take_along_axis(info.hidden, info.path[:, :, None], axis=1).astype(jnp.float32)  # [B,D+1,E]
        run = info.live & (info.cnt > 0)
        return dstate.replace(pend_f=jnp.where(run[:, None, None], feats, dstate.pend_f),
                              npend=jnp.where(run, info.cnt, dstate.npend))


def draft_id(config: CloverConfig, hp, d2t) -> str:
    """``"clover:<sha256>"`` of the heads' weights, their d2t map and their config: what an acceptance head
    trained for them records (`jaxdec.speculative.heads.acceptance.AcceptanceConfig.draft`); the same for
    the file and its loaded params."""
    from jaxdec.speculative.heads.artefact import weights_id
    return weights_id(KIND, config.to_dict(), hp, d2t)


# --------------------------------------------------------------------------------------------------
# loading and the constructor
# --------------------------------------------------------------------------------------------------

def load_clover(path: str, fingerprint: Optional[str]):
    """(CloverConfig, head params as float32 jax arrays, metadata, d2t) from a heads file, refused with
    `HeadsMismatch` when it was trained for another target (``fingerprint=None`` skips the check)."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    d2t = params.pop("d2t", None)
    try:
        config = CloverConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad clover config in its metadata ({e})") from None
    check_params(config, params, f"heads file {str(path)!r} (corrupt file)")
    if d2t is None or np.shape(d2t) != (config.draft_vocab,):
        raise ValueError(f"heads file {str(path)!r}: its d2t map {None if d2t is None else np.shape(d2t)} does not "
                         f"match draft_vocab={config.draft_vocab} (corrupt file)")
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), meta, np.asarray(d2t, np.int32)


def resolve_heads(model, params, heads, target=None):
    """(CloverConfig, head params, d2t) of a heads file written by ``train/clover.py`` (checked against the
    target: `HeadsMismatch` when it was trained for another one) or an in-memory ``(CloverConfig, head params,
    d2t)`` triple (no check); d2t must be ``draft_vocab`` token ids of the target's vocabulary."""
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    if isinstance(heads, tuple) and len(heads) == 3 and isinstance(heads[0], CloverConfig):
        config, hp, d2t = heads
        check_params(config, hp)
    elif isinstance(heads, (str, os.PathLike)):
        fp = expected_fingerprint(model, params, target)
        config, hp, _, d2t = load_clover(heads, fp)
    else:
        raise TypeError(f"heads must be a heads file path or a (CloverConfig, params, d2t) triple, got "
                        f"{type(heads).__name__}")
    d2t = np.asarray(d2t)
    if (d2t.shape != (config.draft_vocab,) or not np.issubdtype(d2t.dtype, np.integer) or d2t.min() < 0
            or d2t.max() >= model.vocab_size):
        raise ValueError(f"clover: d2t must be {config.draft_vocab} token ids in [0, {model.vocab_size})")
    return config, hp, d2t


def build(model, params, heads, target=None, sampling: bool = False, stop=None, verify_buckets=None):
    """-> (decoder, params): Clover heads drafting for the target (greedy verification; ``sampling=True``:
    each head's token drawn from its distribution, verified by lossless speculative sampling).

    heads: see `resolve_heads`. target: the target's model file or folder (``m.path``), or a fingerprint
    string; None: the params are fingerprinted (`params_fingerprint`). stop: SpecDec++'s learned stop as a
    ``(stop object, its params)`` pair (`jaxdec.speculative.methods.clover(..., stop_head=)` checks the head
    and builds it); verify_buckets: `SpeculativeDecoder`'s (None: the engine's default)."""
    from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
    from jaxdec.speculative.heads.medusa import draft_head
    config, hp, d2t = resolve_heads(model, params, heads, target)
    dparams = {"heads": hp, "target": params, "d2t": d2t.astype(np.int32), "head_w": draft_head(model, params, d2t)}
    verifier = "sampling" if sampling else "greedy"
    kw = {} if verify_buckets is None else {"verify_buckets": verify_buckets}
    if stop is None:
        return (SpeculativeDecoder(CloverDrafter(config, sample=bool(sampling)), verifier, **kw),
                with_draft_params(params, dparams))
    return (SpeculativeDecoder(CloverDrafter(config, sample=bool(sampling), stop_head=stop[0]), verifier, **kw),
            with_draft_params(params, {**dparams, "stop": stop[1]}))
