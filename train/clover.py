"""Train Clover heads (`jaxdec.speculative.heads.clover`) on the self-distillation corpus:
``python -m train.clover [--flags]``.

The target is frozen; its final-norm hidden states ``f`` are recomputed inside the jitted step or stored once
up front (``--hidden stored``, shared with train/medusa.py and train/eagle.py through ``--hidden-cache``).
Each step runs the augmenting block over whole sequences (causal, teacher forcing), draws ``--positions``
anchors per row (positions from the last prompt token on, where drafting happens), and runs the K heads
there with the regressive inputs set to the true tokens: head k (0-based) reads ``x_{t+1+k}`` and learns
the target's greedy ``x_{t+2+k}`` (cross-entropy over the reduced draft vocabulary, labels outside it left
out, ``in_vocab`` logs their share), weighted ``decay**k``.

Writes ``<out>/heads.safetensors`` (kind "clover", with d2t; only Clover's own weights: the embedding and
LM head are the target's) like train/medusa.py; ``--export PATH`` copies it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, check_target_run_flags, fit
from train.medusa import (build_draft_vocab, run_head_script, save_finished_heads, sequences_to_arrays,
                          split_heldout, store_hidden)


@dataclasses.dataclass(frozen=True)
class CloverTrainConfig(TrainConfig):
    out: str = "train/work/runs/clover"
    data: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    draft_vocab: int = 8192
    num_tokens: int = 4  # heads (chain length drafted per step)
    aug_intermediate: int = 768  # MLP width of the augmenting block
    positions: int = 32  # anchor positions drawn per row and step
    decay: float = 0.8  # loss weight of head k: decay ** k
    seq_len: int = 256
    eval_fraction: float = 0.05
    hidden: str = "recompute"
    hidden_cache: str = ""  # with --hidden stored: a folder keeping the states for the next run ("" : none)
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    export: str = ""

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=("draft_vocab", "num_tokens", "aug_intermediate", "positions", "seq_len"))
        if self.seq_len < 3:
            raise ConfigError(f"--seq-len must be >= 3, got {self.seq_len}")


def clover_config(model, e: int, cfg: CloverTrainConfig, draft_vocab: int):
    """The heads' sizes: attention shapes of the target (a `LlamaModel`), else small ones for a toy target."""
    from jaxdec.speculative.heads.clover import CloverConfig
    c = getattr(model, "config", None)
    if c is not None and hasattr(c, "num_heads"):
        return CloverConfig(hidden=e, draft_vocab=draft_vocab, num_tokens=cfg.num_tokens, dec_heads=c.num_heads,
                            aug_heads=c.num_heads, aug_kv_heads=c.num_kv_heads, aug_head_dim=c.head_dim,
                            aug_intermediate=cfg.aug_intermediate, rope_theta=float(c.rope_theta),
                            max_position=int(c.max_position), rms_eps=float(c.rms_norm_eps))
    heads = 2 if e % 2 == 0 else 1
    return CloverConfig(hidden=e, draft_vocab=draft_vocab, num_tokens=cfg.num_tokens, dec_heads=heads,
                        aug_heads=heads, aug_kv_heads=1, aug_head_dim=max(e // heads, 1),
                        aug_intermediate=cfg.aug_intermediate, rope_theta=10000.0, max_position=4096)


def make_loss(model, config, d2t, positions: int, decay: float):
    """``loss_fn(head_params, target_params, batch, key) -> (loss, aux)`` for `train.harness.fit`."""
    from jaxdec.speculative.heads.clover import augment, heads_chain, target_embed
    from jaxdec.speculative.heads.medusa import draft_head
    kk = config.num_tokens
    weights = jnp.asarray([decay ** k for k in range(kk)], jnp.float32)
    t2d_np = np.full((model.vocab_size,), -1, np.int32)
    t2d_np[np.asarray(d2t)] = np.arange(len(d2t), dtype=np.int32)

    def loss_fn(hp, tp, batch, key):
        tokens, length, plen = batch["tokens"], batch["length"], batch["prompt_len"]
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if "hidden" in batch:  # stored by `store_hidden`
            hid = batch["hidden"].astype(jnp.float32)
        else:
            hid = jax.lax.stop_gradient(model(tp, tokens, pos, model.init_cache(b, t)).hidden)  # [B,T,E]
        head_w = draft_head(model, tp, d2t)
        aug, _ = augment(config, hp, head_w, hid, pos, config.aug_model("reference").init_cache(b, t),
                         attention="reference")  # [B,T,E]
        ar = jnp.arange(t)[None]
        ok = (ar >= plen[:, None] - 1) & (ar + 2 < length[:, None])  # anchors with a first label
        p = min(positions, t)
        score = jnp.where(ok, jax.random.uniform(key, (b, t)), -1.0)
        sc, idx = jax.lax.top_k(score, p)  # [B,P]
        sel = sc >= 0
        a = jnp.take_along_axis(aug, idx[:, :, None], axis=1)  # [B,P,E]
        steps = jnp.arange(kk)
        inp_pos = idx[:, :, None] + 1 + steps  # [B,P,K] the token head k reads: x_{t+1+k} (true tokens)
        inp = jnp.take_along_axis(tokens, jnp.clip(inp_pos, 0, t - 1).reshape(b, -1), axis=1).reshape(inp_pos.shape)
        logits = heads_chain(config, hp, head_w, a, inp,
                             lambda ids: target_embed(model, tp, ids))  # [K,B,P,Vd]
        lab_pos = jnp.moveaxis(inp_pos + 1, -1, 0)  # [K,B,P]
        lab = jnp.take_along_axis(jnp.broadcast_to(tokens[None], (kk, b, t)),
                                  jnp.clip(lab_pos, 0, t - 1).reshape(kk, b, -1), axis=2).reshape(lab_pos.shape)
        m = (sel[None] & (lab_pos < length[None, :, None])).astype(jnp.float32)
        lab = jnp.asarray(t2d_np)[lab]
        n_all = jnp.maximum(jnp.sum(m), 1.0)
        m = m * (lab >= 0)
        lab = jnp.maximum(lab, 0)
        lse = jax.nn.logsumexp(logits, axis=-1)
        ll = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
        cnt = jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)
        ce = jnp.sum((lse - ll) * m, axis=(1, 2)) / cnt  # [K]
        acc = jnp.sum((jnp.argmax(logits, -1) == lab) * m, axis=(1, 2)) / cnt
        loss = jnp.sum(weights * ce) / jnp.sum(weights)
        aux = {f"acc{k}": acc[k] for k in range(kk)}
        aux["in_vocab"] = jnp.sum(m) / n_all
        return loss, aux

    return loss_fn


def train_clover(cfg: CloverTrainConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
                 target_name: str = "", command: str = "", stop_after=None, log=print):
    """Train Clover heads on ``seqs``; writes ``<out>/heads.safetensors``; returns (FitResult, heads path)
    with ``res.d2t`` and ``res.clover_config``."""
    from jaxdec.speculative.heads.clover import KIND, init_params
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    if cfg.draft_vocab > model.vocab_size:
        raise ConfigError(f"--draft-vocab {cfg.draft_vocab} exceeds the target's vocabulary ({model.vocab_size})")
    e = int(model(target_params, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                  model.init_cache(1, 1)).hidden.shape[-1])
    ccfg = clover_config(model, e, cfg, cfg.draft_vocab)
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    if cfg.hidden == "stored":
        arrays["hidden"] = store_hidden(model, target_params, arrays["tokens"], cfg.batch_size, log,
                                        cfg.hidden_cache, f"{fingerprint}|{cfg.weights}")
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    d2t = build_draft_vocab([seqs[i] for i in tr], [prompt_lens[i] for i in tr], model.vocab_size, cfg.draft_vocab)
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": ccfg.to_dict()}
    res = fit(cfg, init_params(ccfg, cfg.seed), make_loss(model, ccfg, d2t, cfg.positions, cfg.decay), train,
              frozen=target_params, eval_data=held, meta=meta, stop_after=stop_after, log=log)
    path = save_finished_heads(res, cfg, KIND, {**jax.device_get(res.params), "d2t": d2t}, ccfg.to_dict(),
                               fingerprint, target_name, command, int(len(tr)), int(np.sum(arrays["length"][tr])),
                               log, data_generated_tokens=int(np.sum(arrays["length"][tr] - arrays["prompt_len"][tr])))
    res.d2t = d2t
    res.clover_config = ccfg
    return res, path


def main(argv=None):
    return run_head_script("clover", CloverTrainConfig, train_clover, argv, __doc__)


if __name__ == "__main__":
    main()
