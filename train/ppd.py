"""Train PPD prompt tokens (`jaxdec.speculative.heads.ppd`) on the self-distillation corpus:
``python -m train.ppd [--flags]``.

The target is frozen and only the ``k x e x E`` prompt embeddings learn. Each step runs the target once over
whole sequences plus, for ``--positions`` anchors ``t`` per row (from the last prompt token on), the ``k*e``
prompt tokens appended to the block: prompt ``(i, j)`` at position ``t + 1 + i`` sees the tokens up to ``t``
and the earlier prompts of its ensemble stream ``j`` (the paper's ensemble attention, `ensemble_mask`'s
pattern repeated per anchor); the ``e`` outputs' logits are averaged and trained with cross-entropy against
the target's greedy token at ``t + 2 + i`` (``--loss ce``, the default; the corpus is the target's greedy
continuations) or, ``--loss kd`` (the paper's distillation), with ``KL(p || q)`` where ``p`` is the target's own
next-token distribution at position ``t + 1 + i`` (the one that predicts ``t + 2 + i``; its logits come from the
same forward pass, which the prompts never enter, under stop_gradient) and ``q`` the prompts' averaged one;
either is weighted ``decay**i`` over the same anchors. The final evaluation measures, per depth and rank,
how often the rank-r guess is the label (``rank_probs``, stored in the heads file for the dynamic tree).

Writes ``<out>/heads.safetensors`` (kind "ppd") like train/medusa.py; ``--export PATH`` copies it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, check_target_run_flags, fit
from train.medusa import run_head_script, save_finished_heads, sequences_to_arrays, split_heldout

RANKS = 4  # ranks measured per depth for the dynamic tree
LOSSES = ("ce", "kd")  # --loss: cross-entropy on the corpus' token, or KL from the target's distribution


@dataclasses.dataclass(frozen=True)
class PPDTrainConfig(TrainConfig):
    out: str = "train/work/runs/ppd"
    data: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    num_tokens: int = 3  # prompt positions k
    ensemble: int = 2  # ensemble tokens per position e
    positions: int = 8  # anchors per row and step
    decay: float = 0.8
    seq_len: int = 128
    eval_fraction: float = 0.05
    steps: int = 150
    batch_size: int = 4
    lr: float = 1e-2
    loss: str = "ce"  # one of LOSSES
    export: str = ""

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=("num_tokens", "ensemble", "positions", "seq_len"))
        if self.seq_len < 4:
            raise ConfigError(f"--seq-len must be >= 4, got {self.seq_len}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


def anchor_block(config, idx, t: int):
    """For anchors ``idx [B,P]`` over a ``t``-token sequence: (positions ``[B, t + P*k*e]``, block mask
    ``[B, t + P*k*e, t + P*k*e]``) of the tokens followed by every anchor's prompt tokens."""
    from jaxdec.speculative.heads.ppd import prompt_layout
    b, p = idx.shape
    ii, jj = prompt_layout(config)
    n = config.num_prompt
    ar = jnp.arange(t)
    ppos = (idx[:, :, None] + 1 + jnp.asarray(ii)[None, None]).reshape(b, p * n)
    pos = jnp.concatenate([jnp.broadcast_to(ar, (b, t)), ppos], axis=1).astype(jnp.int32)
    tok_tok = jnp.broadcast_to(ar[None, :] <= ar[:, None], (b, t, t))
    tok_pr = jnp.zeros((b, t, p * n), bool)
    pr_tok = jnp.broadcast_to((ar[None, None, None, :] <= idx[:, :, None, None]), (b, p, n, t)).reshape(b, p * n, t)
    a = np.repeat(np.arange(p), n)
    i = np.tile(ii, p)
    j = np.tile(jj, p)
    pr_pr = (a[:, None] == a[None, :]) & (j[:, None] == j[None, :]) & (i[None, :] <= i[:, None])
    pr_pr = jnp.broadcast_to(jnp.asarray(pr_pr), (b, p * n, p * n))
    mask = jnp.concatenate([jnp.concatenate([tok_tok, tok_pr], axis=2), jnp.concatenate([pr_tok, pr_pr], axis=2)],
                           axis=1)
    return pos, mask


def kd_terms(target_logits, logits):
    """``KL(softmax(target_logits) || softmax(logits))`` over the last axis (float32; no gradient reaches
    ``target_logits``)."""
    lp = jax.nn.log_softmax(jax.lax.stop_gradient(target_logits).astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def make_loss(model, config, positions: int, decay: float, loss: str = "ce"):
    """``loss_fn(prompt_params, target_params, batch, key) -> (loss, aux)`` for `train.harness.fit`; aux has
    ``acc{i}`` (top-1 per prompt position) and ``r{i}_{r}`` (the rank-r guess is the label). loss: "ce"
    (the corpus' token at ``t + 2 + i``) or "kd" (`kd_terms` against the target's logits at ``t + 1 + i``)."""
    from jaxdec.speculative.heads.ppd import average_ensemble, target_embed
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    kd = loss == "kd"
    k, n = config.num_tokens, config.num_prompt
    tm = model.with_attention("reference") if hasattr(model, "with_attention") else model  # differentiable
    weights = jnp.asarray([decay ** i for i in range(k)], jnp.float32)

    def loss_fn(hp, tp, batch, key):
        tokens, length, plen = batch["tokens"], batch["length"], batch["prompt_len"]
        b, t = tokens.shape
        ar = jnp.arange(t)[None]
        ok = (ar >= plen[:, None] - 1) & (ar + 2 < length[:, None])
        p = min(positions, t)
        score = jnp.where(ok, jax.random.uniform(key, (b, t)), -1.0)
        sc, idx = jax.lax.top_k(score, p)  # [B,P]
        sel = sc >= 0
        idx = jnp.where(sel, idx, 0)
        pos, mask = anchor_block(config, idx, t)
        x = jnp.concatenate([jax.lax.stop_gradient(target_embed(model, tp, tokens)),
                             jnp.broadcast_to(hp["prompt"].reshape(1, 1, n, -1), (b, p, n, config.hidden))
                             .reshape(b, p * n, config.hidden)], axis=1)
        at = jnp.broadcast_to(t + jnp.arange(p * n, dtype=jnp.int32), (b, p * n))
        lab_pos = idx[:, :, None] + 2 + jnp.arange(k)[None, None]  # [B,P,k]
        if kd:  # also the target's own logits at t + 1 + i (tokens never see the prompts: the plain target's)
            at = jnp.concatenate([at, jnp.clip(lab_pos - 1, 0, t - 1).reshape(b, p * k).astype(jnp.int32)], axis=1)
        out = tm(tp, None, pos, tm.init_cache(b, t + p * n), mask=mask, embeds=x, logits_at=at)
        logits = average_ensemble(config, out.logits[:, :p * n].reshape(b, p, n, -1))  # [B,P,k,V]
        lab = jnp.take_along_axis(tokens, jnp.clip(lab_pos, 0, t - 1).reshape(b, -1), axis=1).reshape(lab_pos.shape)
        m = (sel[:, :, None] & (lab_pos < length[:, None, None])).astype(jnp.float32)
        cnt = jnp.maximum(jnp.sum(m, axis=(0, 1)), 1.0)  # [k]
        if kd:
            per = kd_terms(out.logits[:, p * n:].reshape(b, p, k, -1), logits)  # [B,P,k]
        else:
            lse = jax.nn.logsumexp(logits, axis=-1)
            ll = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
            per = lse - ll
        ce = jnp.sum(per * m, axis=(0, 1)) / cnt
        loss = jnp.sum(weights * ce) / jnp.sum(weights)
        top = jax.lax.top_k(logits, RANKS)[1]  # [B,P,k,R]
        hit = (top == lab[..., None]).astype(jnp.float32) * m[..., None]
        rates = jnp.sum(hit, axis=(0, 1)) / cnt[:, None]  # [k,R]
        aux = {f"acc{i}": rates[i, 0] for i in range(k)}
        aux.update({f"r{i}_{r}": rates[i, r] for i in range(k) for r in range(RANKS)})
        return loss, aux

    return loss_fn


def rank_probs_from_eval(ev: dict, k: int) -> list:
    """Per-depth, per-rank acceptance for `jaxdec.speculative.heads.ppd.dynamic_tree`: depth 1 is the target's
    own token (always right), depth i + 2 is prompt position i's rate of "the rank-r guess is the label" on
    held-out data (so a rank-r node below an accepted parent is accepted with that probability)."""
    out = [[1.0] + [0.0] * (RANKS - 1)]
    for i in range(k):
        out.append([float(ev.get(f"r{i}_{r}", 0.0)) for r in range(RANKS)])
    return out


def train_ppd(cfg: PPDTrainConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
              target_name: str = "", command: str = "", stop_after=None, log=print):
    """Train PPD prompt tokens on ``seqs``; writes ``<out>/heads.safetensors``; returns (FitResult, heads path)
    with ``res.ppd_config`` and ``res.rank_probs``."""
    from jaxdec.speculative.heads.ppd import KIND, PPDConfig, init_params
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    emb = target_embed_table(model, target_params)
    pcfg = PPDConfig(hidden=int(emb.shape[-1]), num_tokens=cfg.num_tokens, ensemble=cfg.ensemble)
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": pcfg.to_dict(), "loss": cfg.loss}
    scale = float(np.std(np.asarray(emb, np.float32)))
    res = fit(cfg, init_params(pcfg, cfg.seed, scale), make_loss(model, pcfg, cfg.positions, cfg.decay, cfg.loss),
              train, frozen=target_params, eval_data=held, meta=meta, stop_after=stop_after, log=log)
    probs = rank_probs_from_eval(res.final_eval or {}, pcfg.num_tokens)
    path = save_finished_heads(res, cfg, KIND, jax.device_get(res.params), pcfg.to_dict(), fingerprint, target_name,
                               command, int(len(tr)), int(np.sum(arrays["length"][tr])), log, rank_probs=probs,
                               loss=cfg.loss)
    res.ppd_config = pcfg
    res.rank_probs = probs
    return res, path


def target_embed_table(model, target_params):
    """A sample of the target's input embeddings (the first 256 ids) for the hidden size and the init scale."""
    from jaxdec.speculative.heads.ppd import target_embed
    return np.asarray(target_embed(model, target_params, jnp.arange(min(256, model.vocab_size))[None]))[0]


def main(argv=None):
    return run_head_script("ppd", PPDTrainConfig, train_ppd, argv, __doc__)


if __name__ == "__main__":
    main()
