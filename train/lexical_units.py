"""Train lexical-unit heads (`jaxdec.speculative.heads.lexical_units`) on the self-distillation corpus:
``python -m train.lexical_units [--flags]``.

Labels (the paper's data-driven units, Sun et al. 2024): for every corpus position the frozen target's
probability ``conf[i] = p(x_i | x_<i)`` of the token the corpus holds there (the corpus is the target's own
greedy output, so this is its confidence in its own choice). At an anchor t (positions from the last prompt
token on) the unit after the target's next token ``x_{t+1}`` is the longest run ``x_{t+2} .. x_{t+1+L}`` with
every ``conf >= --alpha`` (cut at ``--max-unit`` and at the sequence end): ``L(t)`` in ``0 .. K``.

Loss: token head j (0-based, predicting ``x_{t+2+j}``) is trained with cross-entropy on the anchors whose
unit holds that token (``j < L(t)``; tokens outside the unit weigh ``--outside-weight``, 0 by default: the
heads learn the units only), and the unit-end classifier with cross-entropy on ``L(t)`` (weight
``--length-weight``). The target's hidden states are recomputed in the step or stored once up front
(``--hidden stored --hidden-cache``, shared with train/medusa.py); with stored states the confidences come
from them and the target's LM head (the same logits the target computes).

Writes ``<out>/heads.safetensors`` (kind "lud"; with d2t when ``--draft-vocab`` > 0) like train/medusa.py;
``--export PATH`` copies it.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, check_target_run_flags, fit
from train.medusa import (build_draft_vocab, run_head_script, save_finished_heads, sequences_to_arrays,
                          split_heldout, store_hidden)


@dataclasses.dataclass(frozen=True)
class LUDTrainConfig(TrainConfig):
    out: str = "train/work/runs/lud"
    data: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    max_unit: int = 4  # K: unit tokens after the target's next token (token heads)
    num_layers: int = 1
    alpha: float = 0.9  # a token joins the unit while the target's probability of it is >= alpha
    cut: float = 0.5  # stored in the config: the drafter's unit-end probability
    outside_weight: float = 0.0  # token-loss weight of tokens past the unit end
    length_weight: float = 1.0  # weight of the unit-end classifier's loss
    positions: int = 32  # anchors drawn per row and step
    seq_len: int = 256
    eval_fraction: float = 0.05
    draft_vocab: int = 8192
    hidden: str = "recompute"
    hidden_cache: str = ""
    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    export: str = ""

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=("max_unit", "num_layers", "positions", "seq_len"))
        if self.seq_len < 3:
            raise ConfigError(f"--seq-len must be >= 3, got {self.seq_len}")
        if isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int) or self.draft_vocab < 0:
            raise ConfigError(f"--draft-vocab must be an integer >= 0 (0: the full vocabulary), got {self.draft_vocab!r}")
        for name in ("alpha", "cut"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ConfigError(f"--{name} must be in (0, 1), got {v!r}")
        for name in ("outside_weight", "length_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 10.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 10], got {v!r}")


# --------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------

def target_confidence(model, target_params, tokens, hidden=None, batch_size: int = 4, need=None,
                      chunk: int = 1024) -> np.ndarray:
    """``conf [N,T]`` float32: the target's probability of ``tokens[:, i]`` given ``tokens[:, :i]``
    (``conf[:, 0] = 0``). With ``hidden`` (stored final-norm states ``[N,T,E]``) the logits are those states
    times the target's LM head, computed only at the positions ``need [N,T]`` marks (others 0; None: all),
    ``chunk`` rows per call; otherwise one forward of each batch of sequences."""
    from jaxdec.quant import matmul
    from jaxdec.speculative.heads.medusa import lm_head
    tokens = np.asarray(tokens, np.int32)
    n, t = tokens.shape
    if hidden is not None:
        @jax.jit
        def rows(tp, h, toks):  # [R,E] states before the tokens [R] -> p [R]
            lp = jax.nn.log_softmax(matmul(h.astype(jnp.float32), lm_head(model, tp)).astype(jnp.float32), axis=-1)
            return jnp.exp(jnp.take_along_axis(lp, toks[:, None], axis=-1)[:, 0])

        mask = np.ones((n, t), bool) if need is None else np.asarray(need, bool).copy()
        mask[:, 0] = False
        ni, ti = np.nonzero(mask)
        conf = np.zeros((n, t), np.float32)
        for lo in range(0, len(ni), chunk):
            a, b = ni[lo:lo + chunk], ti[lo:lo + chunk]
            pad = chunk - len(a)
            h = np.asarray(hidden[a, b - 1])
            x = tokens[a, b]
            if pad:
                h = np.concatenate([h, np.repeat(h[-1:], pad, 0)])
                x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
            conf[a, b] = np.asarray(rows(target_params, h, x))[:len(a)]
        return conf

    @jax.jit
    def from_tokens(tp, toks):
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), toks.shape)
        logits = model(tp, toks, pos, model.init_cache(toks.shape[0], t)).logits
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        p = jnp.exp(jnp.take_along_axis(lp, toks[:, 1:, None], axis=-1)[..., 0])
        return jnp.concatenate([jnp.zeros((toks.shape[0], 1), jnp.float32), p], axis=1)

    out = []
    for lo in range(0, n, batch_size):
        x = tokens[lo:lo + batch_size]
        pad = batch_size - len(x)
        out.append(np.asarray(from_tokens(target_params, np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x))[:len(x)])
    return np.concatenate(out).astype(np.float32)


def unit_lengths(conf, length, max_unit: int, alpha: float) -> np.ndarray:
    """``L [N,T]`` int32: at anchor t, how many tokens from ``x_{t+2}`` on have ``conf >= alpha`` in a row
    (at most ``max_unit``, none at or past the sequence's ``length``)."""
    conf = np.asarray(conf)
    n, t = conf.shape
    ok = (conf >= alpha) & (np.arange(t)[None] < np.asarray(length)[:, None])
    run = np.zeros((n, t + 1), np.int32)  # run[:, i]: the confident run starting at i
    for i in range(t - 1, -1, -1):
        run[:, i] = np.where(ok[:, i], run[:, i + 1] + 1, 0)
    lab = np.zeros((n, t), np.int32)
    lab[:, :max(t - 2, 0)] = run[:, 2:t]
    return np.minimum(lab, max_unit)


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------

def make_loss(model, config, positions: int, outside_weight: float, length_weight: float, d2t=None):
    """``loss_fn(head_params, target_params, batch, key) -> (loss, aux)`` for `train.harness.fit`; the
    batch carries ``unit_len`` (`unit_lengths`)."""
    from jaxdec.speculative.heads.lexical_units import length_logits, token_logits
    from jaxdec.speculative.heads.medusa import draft_head
    k_heads = config.max_unit
    if d2t is not None:
        t2d_np = np.full((model.vocab_size,), -1, np.int32)
        t2d_np[np.asarray(d2t)] = np.arange(len(d2t), dtype=np.int32)

    def loss_fn(hp, tp, batch, key):
        tokens, length, plen, ulen = batch["tokens"], batch["length"], batch["prompt_len"], batch["unit_len"]
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if "hidden" in batch:
            hid = batch["hidden"].astype(jnp.float32)
        else:
            hid = jax.lax.stop_gradient(model(tp, tokens, pos, model.init_cache(b, t)).hidden)  # [B,T,E]
        ar = jnp.arange(t)[None]
        ok = (ar >= plen[:, None] - 1) & (ar + 2 < length[:, None])
        p = min(positions, t)
        score = jnp.where(ok, jax.random.uniform(key, (b, t)), -1.0)
        sc, idx = jax.lax.top_k(score, p)  # [B,P]
        sel = (sc >= 0).astype(jnp.float32)
        hs = jnp.take_along_axis(hid, idx[:, :, None], axis=1)  # [B,P,E]
        lu = jnp.take_along_axis(ulen, idx, axis=1)  # [B,P] unit length labels
        head_w = None if d2t is None else draft_head(model, tp, d2t)
        logits = token_logits(config, hp, model, tp, hs, head_w)  # [K,B,P,V|Vd]
        lab_pos = idx[None] + 2 + jnp.arange(k_heads)[:, None, None]  # [K,B,P]
        lab = jnp.take_along_axis(jnp.broadcast_to(tokens[None], (k_heads, b, t)), jnp.clip(lab_pos, 0, t - 1), axis=2)
        exists = sel[None] * (lab_pos < length[None, :, None])
        inside = (jnp.arange(k_heads)[:, None, None] < lu[None]).astype(jnp.float32)
        w = exists * (inside + outside_weight * (1.0 - inside))
        if d2t is not None:
            lab = jnp.asarray(t2d_np)[lab]
            w = w * (lab >= 0)
            lab = jnp.maximum(lab, 0)
        lse = jax.nn.logsumexp(logits, axis=-1)
        ll = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
        tok_loss = jnp.sum((lse - ll) * w) / jnp.maximum(jnp.sum(w), 1.0)
        ll_len = jax.nn.log_softmax(length_logits(config, hp, hs), axis=-1)  # [B,P,K+1]
        len_ce = -jnp.take_along_axis(ll_len, lu[..., None], axis=-1)[..., 0]
        n_sel = jnp.maximum(jnp.sum(sel), 1.0)
        len_loss = jnp.sum(len_ce * sel) / n_sel
        loss = tok_loss + length_weight * len_loss
        hit = (jnp.argmax(logits, -1) == lab).astype(jnp.float32)
        in_w = exists * inside
        aux = {f"acc{j}": jnp.sum(hit[j] * in_w[j]) / jnp.maximum(jnp.sum(in_w[j]), 1.0) for j in range(k_heads)}
        aux["len_loss"] = len_loss
        aux["len_acc"] = jnp.sum((jnp.argmax(ll_len, -1) == lu) * sel) / n_sel
        aux["unit_mean"] = jnp.sum(lu * sel) / n_sel
        return loss, aux

    return loss_fn


def train_lud(cfg: LUDTrainConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
              target_name: str = "", command: str = "", stop_after=None, log=print):
    """Train lexical-unit heads on ``seqs``; writes ``<out>/heads.safetensors``; returns (FitResult, heads
    path) with ``res.d2t``, ``res.lud_config`` and ``res.unit_len`` (the labels of every sequence)."""
    from jaxdec.speculative.heads.lexical_units import KIND, LUDConfig, init_params
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    if cfg.draft_vocab > model.vocab_size:
        raise ConfigError(f"--draft-vocab {cfg.draft_vocab} exceeds the target's vocabulary ({model.vocab_size})")
    e = int(model(target_params, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                  model.init_cache(1, 1)).hidden.shape[-1])
    lcfg = LUDConfig(hidden=e, max_unit=cfg.max_unit, num_layers=cfg.num_layers, draft_vocab=cfg.draft_vocab,
                     alpha=float(cfg.alpha), cut=float(cfg.cut))
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    if cfg.hidden == "stored":
        arrays["hidden"] = store_hidden(model, target_params, arrays["tokens"], cfg.batch_size, log,
                                        cfg.hidden_cache, f"{fingerprint}|{cfg.weights}")
    ar = np.arange(cfg.seq_len)[None]
    need = (ar >= arrays["prompt_len"][:, None] + 1) & (ar < arrays["length"][:, None])  # labels of anchors >= plen-1
    t0 = time.time()
    conf = target_confidence(model, target_params, arrays["tokens"], arrays.get("hidden"), need=need)
    log(f"target confidences: {int(need.sum()):,} positions in {time.time() - t0:.0f} s")
    arrays["unit_len"] = unit_lengths(conf, arrays["length"], cfg.max_unit, cfg.alpha)
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    anchors = (np.arange(cfg.seq_len)[None] >= arrays["prompt_len"][:, None] - 1) & \
              (np.arange(cfg.seq_len)[None] + 2 < arrays["length"][:, None])
    hist = np.bincount(arrays["unit_len"][tr][anchors[tr]], minlength=cfg.max_unit + 1)
    log(f"lexical units (alpha {cfg.alpha}): length histogram 0..{cfg.max_unit} = {hist.tolist()}, mean "
        f"{float(np.sum(hist * np.arange(len(hist))) / max(hist.sum(), 1)):.2f}")
    d2t = None
    if cfg.draft_vocab:
        d2t = build_draft_vocab([seqs[i] for i in tr], [prompt_lens[i] for i in tr], model.vocab_size,
                                cfg.draft_vocab)
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": lcfg.to_dict()}
    loss_fn = make_loss(model, lcfg, cfg.positions, float(cfg.outside_weight), float(cfg.length_weight), d2t)
    res = fit(cfg, init_params(lcfg, cfg.seed), loss_fn, train, frozen=target_params, eval_data=held, meta=meta,
              stop_after=stop_after, log=log)
    tensors = dict(jax.device_get(res.params))
    if d2t is not None:
        tensors["d2t"] = d2t
    path = save_finished_heads(res, cfg, KIND, tensors, lcfg.to_dict(), fingerprint, target_name, command,
                               int(len(tr)), int(np.sum(arrays["length"][tr])), log,
                               data_generated_tokens=int(np.sum(arrays["length"][tr] - arrays["prompt_len"][tr])),
                               unit_histogram=hist.tolist())
    res.d2t = d2t
    res.lud_config = lcfg
    res.unit_len = arrays["unit_len"]
    return res, path


def main(argv=None):
    return run_head_script("lexical_units", LUDTrainConfig, train_lud, argv, __doc__)


if __name__ == "__main__":
    main()
