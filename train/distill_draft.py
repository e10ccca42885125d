"""Distil a small draft model from the target (`jaxdec.speculative.heads.draft_lm`), optionally as S2D
sorted nested drafts: ``python -m train.distill_draft [--flags]``.

The draft is ``--num-layers`` k Llama layers initialised from the target layers ``--init-layers``
(default 0 .. k-1, so the untrained draft is the layer-truncated target of `methods.draft_model`;
dequantized when the target holds Q4_1 / Q8_0 weights) and the target's final norm; the target's input
embedding and the LM-head rows of the reduced draft vocabulary (``--draft-vocab``, the corpus' most
generated tokens) are shared and frozen. Teacher forcing over whole sequences of the self-distillation
corpus (`train.data`), one loss per exit:

* ``ce``: cross-entropy on the target's greedy tokens (the corpus' generated part; labels outside the
  draft vocabulary are left out, ``in_vocab`` logs their share): greedy verification accepts exactly
  the tokens whose draft argmax equals the target's greedy token, so this is the quantity drafting needs;
* ``kl``: KL(target || draft) with the target's next-token distribution restricted to the draft
  vocabulary (its final-norm hidden state times the same LM-head rows, renormalized), at every position
  with a next token, prompt positions included: dense soft targets, and cheap with ``--hidden stored``
  (the frozen target's forward is the costly part of a step, ~80 % on this CPU; stored, it runs once).

``--loss ce+kl`` (default) adds them (``--kl-weight`` scales the second). ``--loss ce`` needs no target
forward at all (the labels are the corpus' tokens): a step costs the draft's own layers only, the choice
when the target's hidden states are not stored yet and CPU time is short. ``--exits 1,2,...,k`` trains an
S2D network (sorted fine-tuning): every exit reads its residual stream through the shared final norm and
LM-head rows, and the loss is summed over the exits; ``acc<d>`` logs each exit's top-1 agreement with the
target's greedy token (out-of-vocabulary labels count as misses: the acceptance rate of one draft token).

Writes ``<out>/heads.safetensors`` (kind "draft_lm": the layers as float16, the final norm, d2t; the
config with ``exits``) with the target fingerprint and provenance, like train/medusa.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, check_target_run_flags, fit
from train.medusa import (build_draft_vocab, run_head_script, save_finished_heads, sequences_to_arrays,
                          split_heldout, store_hidden)

LOSSES = ("ce", "kl", "ce+kl")


@dataclasses.dataclass(frozen=True)
class DistillDraftConfig(TrainConfig):
    out: str = "train/work/runs/draft_lm"
    data: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    num_layers: int = 2  # k
    init_layers: tuple = ()  # target layer of each draft layer (default 0 .. k-1)
    exits: tuple = ()  # S2D: sorted depths ending at k (default: k only, plain distillation)
    draft_vocab: int = 8192
    loss: str = "ce+kl"
    kl_weight: float = 1.0
    seq_len: int = 256
    eval_fraction: float = 0.05
    hidden: str = "recompute"
    hidden_cache: str = ""
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-4
    export: str = ""

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=("num_layers", "draft_vocab", "seq_len"), weights=("f32", "q", "bf16"))
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be >= 2, got {self.seq_len}")
        k = self.num_layers
        init = tuple(self.init_layers)
        if init and (len(init) != k or min(init) < 0):
            raise ConfigError(f"--init-layers must name {k} target layers (>= 0), one per draft layer, got "
                              f"{','.join(map(str, init))}")
        ex = tuple(self.exits)
        if ex and (list(ex) != sorted(set(ex)) or ex[0] < 1 or ex[-1] != k):
            raise ConfigError(f"--exits must be strictly increasing depths in [1, {k}] ending at --num-layers {k}, "
                              f"got {','.join(map(str, ex))}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not (np.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ConfigError(f"--kl-weight must be a finite number >= 0, got {self.kl_weight}")


def make_loss(model, config, d2t, loss: str = "ce+kl", kl_weight: float = 1.0):
    """``loss_fn(draft_params, target_params, batch, key) -> (loss, aux)`` for `train.harness.fit`: the
    sum over ``config.exits`` of each exit's ``ce`` and/or ``kl_weight * kl`` (see the module docstring)."""
    from jaxdec.speculative.heads.draft_lm import exit_logits
    from jaxdec.speculative.heads.medusa import draft_head
    t2d_np = np.full((model.vocab_size,), -1, np.int32)
    t2d_np[np.asarray(d2t)] = np.arange(len(d2t), dtype=np.int32)
    use_ce, use_kl = loss in ("ce", "ce+kl"), loss in ("kl", "ce+kl")

    def loss_fn(dp, tp, batch, key):
        from jaxdec.quant import matmul
        tokens, length, plen = batch["tokens"], batch["length"], batch["prompt_len"]
        b, t = tokens.shape
        head_w = draft_head(model, tp, d2t)
        logits = exit_logits(config, dp, model, tp, head_w, tokens)[:, :, :t - 1]  # [X,B,T-1,Vd]
        lq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nxt = jnp.arange(1, t)[None]  # position of each label
        gen = ((nxt < length[:, None]) & (nxt >= plen[:, None])).astype(jnp.float32)  # [B,T-1]
        lab = jnp.asarray(t2d_np)[tokens[:, 1:]]
        inv = (lab >= 0).astype(jnp.float32)
        lab = jnp.maximum(lab, 0)
        m_ce = gen * inv
        n_ce = jnp.maximum(jnp.sum(m_ce), 1.0)
        hit = (jnp.argmax(logits, -1) == lab[None]).astype(jnp.float32) * m_ce[None]  # [X,B,T-1]
        acc = jnp.sum(hit, axis=(1, 2)) / jnp.maximum(jnp.sum(gen), 1.0)
        ce = -jnp.sum(jnp.take_along_axis(lq, lab[None, ..., None], axis=-1)[..., 0] * m_ce[None], axis=(1, 2)) / n_ce
        aux = {"in_vocab": jnp.sum(m_ce) / jnp.maximum(jnp.sum(gen), 1.0)}
        total = 0.0
        if use_ce:
            total = total + jnp.sum(ce)
        if use_kl:
            if "hidden" in batch:  # the target's final-norm hidden states (stored by `store_hidden`)
                hid = batch["hidden"].astype(jnp.float32)
            else:  # recomputed: the frozen target's forward (ce alone needs none: the labels are the corpus')
                pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
                hid = jax.lax.stop_gradient(model(tp, tokens, pos, model.init_cache(b, t)).hidden)
            m_kl = (nxt < length[:, None]).astype(jnp.float32)  # [B,T-1]
            lp = jax.nn.log_softmax(jax.lax.stop_gradient(matmul(hid[:, :t - 1], head_w)).astype(jnp.float32), -1)
            kl = jnp.sum(jnp.sum(jnp.exp(lp)[None] * (lp[None] - lq), axis=-1) * m_kl[None], axis=(1, 2)) / \
                jnp.maximum(jnp.sum(m_kl), 1.0)  # [X]
            total = total + kl_weight * jnp.sum(kl)
            for i, d in enumerate(config.exits):
                aux[f"kl{d}"] = kl[i]
        for i, d in enumerate(config.exits):
            aux[f"acc{d}"], aux[f"ce{d}"] = acc[i], ce[i]
        return total, aux

    return loss_fn


def draft_config(model, cfg: DistillDraftConfig):
    from jaxdec.speculative.heads.draft_lm import DraftLMConfig
    try:
        return DraftLMConfig.from_target(model, cfg.num_layers, min(cfg.draft_vocab, model.vocab_size),
                                         cfg.init_layers, cfg.exits)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def train_distill_draft(cfg: DistillDraftConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
                        target_name: str = "", command: str = "", stop_after=None, log=print):
    """Distil the draft on ``seqs``; writes ``<out>/heads.safetensors``; returns (FitResult, heads path);
    ``FitResult.d2t`` and ``.draft_config`` are set."""
    from jaxdec.speculative.heads.draft_lm import KIND, init_from_target, storable
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    dcfg = draft_config(model, cfg)
    n_target = model.num_layers
    if max(dcfg.init_layers) >= n_target:
        raise ConfigError(f"--init-layers {','.join(map(str, dcfg.init_layers))}: the target has {n_target} layers "
                          f"(0 .. {n_target - 1})")
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    if cfg.hidden == "stored" and cfg.loss != "ce":  # ce alone never reads the target's hidden states
        arrays["hidden"] = store_hidden(model, target_params, arrays["tokens"], cfg.batch_size, log,
                                        cfg.hidden_cache, f"{fingerprint}|{cfg.weights}")
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    d2t = build_draft_vocab([seqs[i] for i in tr], [prompt_lens[i] for i in tr], model.vocab_size,
                            dcfg.draft_vocab)
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": dcfg.to_dict(), "loss": cfg.loss,
            "kl_weight": cfg.kl_weight}
    init = init_from_target(dcfg, target_params)
    res = fit(cfg, init, make_loss(model, dcfg, d2t, cfg.loss, cfg.kl_weight), train, frozen=target_params,
              eval_data=held, meta=meta, stop_after=stop_after, log=log)
    path = save_finished_heads(res, cfg, KIND, {**storable(res.params), "d2t": d2t}, dcfg.to_dict(), fingerprint,
                               target_name, command, int(len(tr)), int(np.sum(arrays["length"][tr])), log,
                               data_generated_tokens=int(np.sum(arrays["length"][tr] - arrays["prompt_len"][tr])),
                               loss=cfg.loss, kl_weight=cfg.kl_weight)
    res.d2t = d2t
    res.draft_config = dcfg
    return res, path


def main(argv=None):
    return run_head_script("distill_draft", DistillDraftConfig, train_distill_draft, argv, __doc__)


if __name__ == "__main__":
    main()
