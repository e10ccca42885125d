"""Train the LongSpec draft head (`jaxdec.speculative.heads.longspec`): ``python -m train.longspec``.

Teacher forcing over whole (short) sequences, as train/eagle.py: the draft layer reads ``fc([f_t ;
embed(x_{t+1})])`` for every position t (``f`` = the frozen target's final-norm hidden states, recomputed or
stored) and learns the target's greedy token ``x_{t+2}`` over the reduced draft vocabulary, its self-attention
limited to the sinks and the sliding window (``--window``, ``--sinks``). Anchor-offset indices (LongSpec's,
``--max-offset N``, 0 = off): each sequence keeps RoPE indices ``0..sinks-1`` for its first tokens and shifts
the rest by a random offset up to N, so the draft trained on 256-token sequences runs at positions of
thousands. ``--ttt-steps`` feeds the layer its own outputs as the next pass's features (as drafting deeper
does), weighted ``decay**s``.

Writes ``<out>/heads.safetensors`` (kind "longspec", with d2t) like train/medusa.py.
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
class LongSpecTrainConfig(TrainConfig):
    out: str = "train/work/runs/longspec"
    data: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    draft_vocab: int = 8192
    num_tokens: int = 4
    window: int = 512
    sinks: int = 4
    max_offset: int = 8192  # anchor-offset indices: shift up to this far (0: plain positions 0..T-1)
    ttt_steps: int = 2
    decay: float = 0.8
    seq_len: int = 256
    eval_fraction: float = 0.05
    hidden: str = "recompute"
    hidden_cache: str = ""
    steps: int = 2000
    batch_size: int = 8
    lr: float = 3e-4
    export: str = ""
    # stop once this many steps are done (0: run to --steps) and write the heads of that step (a run cut short
    # on this machine's time budget; the schedule stays that of --steps, so it resumes exactly)
    stop_at: int = 0

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=("draft_vocab", "num_tokens", "ttt_steps", "seq_len", "window"))
        if self.seq_len < 3:
            raise ConfigError(f"--seq-len must be >= 3, got {self.seq_len}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ConfigError(f"--sinks must be an integer >= 0, got {self.sinks}")
        if isinstance(self.max_offset, bool) or not isinstance(self.max_offset, int) or self.max_offset < 0:
            raise ConfigError(f"--max-offset must be an integer >= 0, got {self.max_offset}")
        if isinstance(self.stop_at, bool) or not isinstance(self.stop_at, int) or not 0 <= self.stop_at <= self.steps:
            raise ConfigError(f"--stop-at must be an integer in [0, --steps], got {self.stop_at}")


def make_loss(model, config, d2t, ttt_steps: int, decay: float, max_offset: int):
    from jaxdec.speculative.heads.longspec import anchor_offset_positions, draft_inputs, forward, head_scores
    from jaxdec.speculative.heads.medusa import draft_head
    t2d_np = np.full((model.vocab_size,), -1, np.int32)
    t2d_np[np.asarray(d2t)] = np.arange(len(d2t), dtype=np.int32)

    def loss_fn(hp, tp, batch, key):
        tokens, length, plen = batch["tokens"], batch["length"], batch["prompt_len"]
        b, t = tokens.shape
        if "hidden" in batch:
            hid = batch["hidden"].astype(jnp.float32)
            hid = hid[..., -1, :] if hid.ndim == 4 else hid
        else:
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            hid = jax.lax.stop_gradient(model(tp, tokens, pos, model.init_cache(b, t)).hidden.astype(jnp.float32))
        head_w = draft_head(model, tp, d2t)
        n = t - 2
        index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        rope = anchor_offset_positions(config, key, b, n, max_offset) if max_offset else index
        nxt = tokens[:, 1:n + 1]
        lab_pos = jnp.arange(n)[None] + 2
        m = ((lab_pos < length[:, None]) & (lab_pos >= plen[:, None])).astype(jnp.float32)
        lab = jnp.asarray(t2d_np)[tokens[:, 2:]]
        n_all = jnp.maximum(jnp.sum(m), 1.0)
        m = m * (lab >= 0)
        lab = jnp.maximum(lab, 0)
        feat = hid[:, :n]
        total, wsum, aux = 0.0, 0.0, {}
        for s in range(ttt_steps):
            o = forward(config, hp, draft_inputs(hp, model, tp, feat, nxt), rope, index)
            logits = head_scores(o, head_w).astype(jnp.float32)
            lse = jax.nn.logsumexp(logits, axis=-1)
            ll = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
            ce = jnp.sum((lse - ll) * m) / jnp.maximum(jnp.sum(m), 1.0)
            aux[f"acc{s}"] = jnp.sum((jnp.argmax(logits, -1) == lab) * m) / jnp.maximum(jnp.sum(m), 1.0)
            total = total + decay ** s * ce
            wsum += decay ** s
            feat = jnp.concatenate([hid[:, :1], o[:, :-1]], axis=1)  # f_{t+1} <- o_t
        aux["in_vocab"] = jnp.sum(m) / n_all
        return total / wsum, aux

    return loss_fn


def layer_config(model, e: int, cfg: LongSpecTrainConfig):
    """The draft layer's sizes: the target's (a `LlamaModel`), else small ones for a toy target."""
    from jaxdec.speculative.heads.longspec import LongSpecConfig
    c = getattr(model, "config", None)
    common = dict(hidden=e, draft_vocab=cfg.draft_vocab, num_tokens=cfg.num_tokens, window=cfg.window, sinks=cfg.sinks)
    if c is not None and hasattr(c, "num_heads"):
        return LongSpecConfig(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                              intermediate=c.intermediate_size, rope_theta=float(c.rope_theta), **common)
    heads = 2 if e % 4 == 0 else 1
    return LongSpecConfig(num_heads=heads, num_kv_heads=1, head_dim=e // heads, intermediate=2 * e,
                          rope_theta=10000.0, **common)


def train_longspec(cfg: LongSpecTrainConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
                   target_name: str = "", command: str = "", stop_after=None, log=print):
    from jaxdec.speculative.heads.longspec import KIND, init_params
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    e = int(model(target_params, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                  model.init_cache(1, 1)).hidden.shape[-1])
    lcfg = layer_config(model, e, cfg)
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    if cfg.hidden == "stored":
        arrays["hidden"] = store_hidden(model, target_params, arrays["tokens"], cfg.batch_size, log,
                                        cfg.hidden_cache, f"{fingerprint}|{cfg.weights}", ())
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    d2t = build_draft_vocab([seqs[i] for i in tr], [prompt_lens[i] for i in tr], model.vocab_size,
                            min(cfg.draft_vocab, model.vocab_size))
    if len(d2t) != lcfg.draft_vocab:
        raise ConfigError(f"--draft-vocab {cfg.draft_vocab} exceeds the target's vocabulary ({model.vocab_size})")
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": lcfg.to_dict()}
    res = fit(cfg, init_params(lcfg, cfg.seed), make_loss(model, lcfg, d2t, cfg.ttt_steps, cfg.decay, cfg.max_offset),
              train, frozen=target_params, eval_data=held, meta=meta,
              stop_after=stop_after if stop_after is not None else (cfg.stop_at or None), log=log)
    extra = {}
    done = int(res.state.step)
    if cfg.stop_at and stop_after is None and cfg.stop_at <= done < cfg.steps:
        # (a run resumed from a checkpoint at --stop-at makes one step more before the harness stops it)
        extra = {"stopped_at": done, "schedule_steps": cfg.steps}
        cfg = dataclasses.replace(cfg, steps=done, stop_at=0)  # the heads of the step reached
    path = save_finished_heads(res, cfg, KIND, {**jax.device_get(res.params), "d2t": d2t}, lcfg.to_dict(),
                               fingerprint, target_name, command, int(len(tr)), int(np.sum(arrays["length"][tr])),
                               log, data_generated_tokens=int(np.sum(arrays["length"][tr] - arrays["prompt_len"][tr])),
                               anchor_offset=cfg.max_offset, **extra)
    res.d2t = d2t
    res.longspec_config = lcfg
    return res, path


def main(argv=None):
    return run_head_script("longspec", LongSpecTrainConfig, train_longspec, argv, __doc__)


if __name__ == "__main__":
    main()
