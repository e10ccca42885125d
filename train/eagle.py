"""Train the EAGLE-style head (`jaxdec.speculative.heads.eagle`, first slice): ``python -m train.eagle``.

Teacher forcing over whole sequences: the draft layer reads ``fc([f_t ; embed(x_{t+1})])`` for every
position t (``f`` = the frozen target's final-norm hidden states, recomputed in the step or stored)
and learns the target's greedy token ``x_{t+2}`` through the shared LM-head rows of the reduced draft
vocabulary (labels outside it are left out; ``in_vocab`` logs their share). Training-time test
(``--ttt-steps S``, EAGLE-3): pass s + 1 feeds the layer its own outputs of pass s as the features
(``f_{t+1} <- o_t``), as drafting at depth s + 1 does; pass s's loss is weighted ``decay**s``. (EAGLE-3
masks each pass's attention to the target features of earlier positions; this slice does not yet.)
``--feature-layers 3,15,-1`` fuses the residual streams after those target layers (-1: the final-norm
hidden state) into the feature, as EAGLE-3 does (`jaxdec.speculative.heads.eagle.target_features`);
``--calibrate-chain`` picks the chain length stored with the head from the held-out acceptance of each
depth and the target's measured cost curve (`calibrate_chain`).

Writes ``<out>/heads.safetensors`` (kind "eagle", with d2t) like train/medusa.py.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, check_target_run_flags, fit
from train.medusa import (build_draft_vocab, evenly_spaced, run_head_script, save_finished_heads,
                          sequences_to_arrays, split_heldout, store_hidden)


@dataclasses.dataclass(frozen=True)
class EagleTrainConfig(TrainConfig):
    out: str = "train/work/runs/eagle"
    data: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    draft_vocab: int = 8192
    num_tokens: int = 4  # chain length stored with the head (what the drafter drafts)
    feature_layers: tuple = ()  # target layers fused into the feature (EAGLE-3); -1 = final-norm hidden
    calibrate_chain: bool = False  # choose num_tokens (<= --num-tokens) on the measured cost curve
    ttt_steps: int = 2
    decay: float = 0.8
    seq_len: int = 256
    max_sequences: int = 0  # > 0: train on this many evenly spaced corpus sequences (τ against training tokens)
    eval_fraction: float = 0.05
    hidden: str = "recompute"
    hidden_cache: str = ""  # with --hidden stored: a folder keeping the states for the next run ("" : none)
    steps: int = 2000
    batch_size: int = 8
    lr: float = 3e-4
    export: str = ""

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=("draft_vocab", "num_tokens", "ttt_steps", "seq_len", ("max_sequences", 0)))
        if self.seq_len < 3:
            raise ConfigError(f"--seq-len must be >= 3, got {self.seq_len}")
        if any(i < -1 for i in self.feature_layers) or len(set(self.feature_layers)) != len(self.feature_layers):
            raise ConfigError(f"--feature-layers must be distinct layer counts >= 0 or -1, got "
                              f"{','.join(map(str, self.feature_layers))}")


def split_stored(config, hid):
    """A stored-hidden batch -> ``(hidden, layer_hidden)`` as `target_features` reads them."""
    if not config.model_layers:
        return hid[..., -1, :] if hid.ndim == 4 else hid, None
    return hid[:, :, -1], jnp.moveaxis(hid[:, :, :-1], 2, 0)


def make_loss(model, config, d2t, ttt_steps: int, decay: float):
    from jaxdec.speculative.heads.eagle import draft_inputs, layer_params, target_call, target_features
    from jaxdec.speculative.heads.medusa import draft_head
    lm = config.layer_model("reference")
    t2d_np = np.full((model.vocab_size,), -1, np.int32)
    t2d_np[np.asarray(d2t)] = np.arange(len(d2t), dtype=np.int32)

    def loss_fn(hp, tp, batch, key):
        tokens, length, plen = batch["tokens"], batch["length"], batch["prompt_len"]
        b, t = tokens.shape
        if "hidden" in batch:
            hid = target_features(config, hp, *split_stored(config, batch["hidden"].astype(jnp.float32)))
        else:
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            out = jax.lax.stop_gradient(target_call(config, model, tp, tokens, pos, model.init_cache(b, t)))
            hid = target_features(config, hp, *out)
        head_w = draft_head(model, tp, d2t)
        lp = layer_params(hp, head_w)
        n = t - 2  # positions t = 0 .. T-3 have a label x_{t+2}
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
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
            out = lm(lp, None, pos, lm.init_cache(b, n), embeds=draft_inputs(hp, model, tp, feat, nxt))
            lse = jax.nn.logsumexp(out.logits, axis=-1)
            ll = jnp.take_along_axis(out.logits, lab[..., None], axis=-1)[..., 0]
            ce = jnp.sum((lse - ll) * m) / jnp.maximum(jnp.sum(m), 1.0)
            aux[f"acc{s}"] = jnp.sum((jnp.argmax(out.logits, -1) == lab) * m) / jnp.maximum(jnp.sum(m), 1.0)
            total = total + decay ** s * ce
            wsum += decay ** s
            feat = jnp.concatenate([hid[:, :1], out.hidden[:, :-1]], axis=1)  # f_{t+1} <- o_t
        aux["in_vocab"] = jnp.sum(m) / n_all
        return total / wsum, aux

    return loss_fn


def layer_config(model, e: int, cfg: EagleTrainConfig):
    """The draft layer's sizes: the target's (a `LlamaModel`), else small ones for a toy target."""
    from jaxdec.speculative.heads.eagle import EagleConfig
    c = getattr(model, "config", None)
    if c is not None and hasattr(c, "num_heads"):
        return EagleConfig(hidden=e, draft_vocab=cfg.draft_vocab, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                           head_dim=c.head_dim, intermediate=c.intermediate_size, rope_theta=float(c.rope_theta),
                           max_position=int(c.max_position), num_tokens=cfg.num_tokens,
                           feature_layers=cfg.feature_layers)
    heads = 2 if e % 2 == 0 else 1
    return EagleConfig(hidden=e, draft_vocab=cfg.draft_vocab, num_heads=heads, num_kv_heads=1, head_dim=e // heads,
                       intermediate=2 * e, rope_theta=10000.0, max_position=4096, num_tokens=cfg.num_tokens,
                       feature_layers=cfg.feature_layers)


def predicted_speedup(acc, k: int, curve_relative: dict, draft_cost: float) -> tuple:
    """(τ, cost, speedup) of a chain of k: depth d's token is accepted with probability ``acc[d-1]`` given
    the ones before it (the last entry repeats for deeper depths); a step costs the target's block of
    k + 1 tokens (relative to one) plus k draft steps of ``draft_cost`` each."""
    from jaxdec.speculative.calibrate import relative_cost
    p, tau = 1.0, 1.0
    for d in range(k):
        p *= float(acc[min(d, len(acc) - 1)])
        tau += p
    cost = relative_cost({"relative": curve_relative}, k + 1) + k * draft_cost
    return tau, cost, tau / cost


def calibrate_chain(model, ecfg, hp, target_params, d2t, acc, log=print) -> dict:
    """The chain length for this machine: the target's cost curve (batch 1) and one draft step's cost are
    measured; the length (1 .. ``ecfg.num_tokens``) with the best `predicted_speedup` under the held-out
    per-depth accuracies ``acc`` (the training-time test's passes) is kept."""
    from jaxdec.speculative.calibrate import measure_cost_curve
    from jaxdec.speculative.heads.eagle import draft_inputs, layer_params
    from jaxdec.speculative.heads.medusa import draft_head
    curve = measure_cost_curve(model, target_params, sizes=range(1, ecfg.num_tokens + 2), batch=1, context=128, reps=5)
    lm = ecfg.layer_model()
    head_w = draft_head(model, target_params, d2t)
    cache = lm.init_cache(1, 160)
    cache = cache.replace(lengths=cache.lengths + 128)

    @jax.jit
    def step(hp, tp, hw, c):
        x = draft_inputs(hp, model, tp, jnp.zeros((1, 1, ecfg.hidden), jnp.float32), jnp.zeros((1, 1), jnp.int32))
        return lm(layer_params(hp, hw), None, c.lengths[:, None], c, embeds=x).logits

    jax.block_until_ready(step(hp, target_params, head_w, cache))
    secs = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(step(hp, target_params, head_w, cache))
        secs.append(time.perf_counter() - t0)
    draft_cost = float(np.min(secs)) / curve["seconds"][1]
    rows = [(k,) + predicted_speedup(acc, k, curve["relative"], draft_cost) for k in range(1, ecfg.num_tokens + 1)]
    best = max(rows, key=lambda r: r[3])
    log(f"chain: {best[0]} tokens, predicted τ {best[1]:.2f}, speedup {best[3]:.2f} (draft step {draft_cost:.3f} "
        f"of a target call; held-out accuracy per depth {[round(float(a), 3) for a in acc]})")
    return {"num_tokens": int(best[0]),
            "calibration": {"predicted_speedup": best[3], "draft_cost": draft_cost, "accuracy": [float(a) for a in acc],
                            "cost_curve": {str(k): v for k, v in curve["relative"].items()},
                            "candidates": [list(r) for r in rows]}}


def train_eagle(cfg: EagleTrainConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
                target_name: str = "", command: str = "", stop_after=None, log=print):
    from jaxdec.speculative.heads.eagle import KIND, init_params
    seqs, prompt_lens = evenly_spaced(seqs, prompt_lens, cfg.max_sequences)
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    e = int(model(target_params, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                  model.init_cache(1, 1)).hidden.shape[-1])
    ecfg = layer_config(model, e, cfg)
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    if cfg.hidden == "stored":
        arrays["hidden"] = store_hidden(model, target_params, arrays["tokens"], cfg.batch_size, log,
                                        cfg.hidden_cache, f"{fingerprint}|{cfg.weights}", ecfg.model_layers or ())
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    d2t = build_draft_vocab([seqs[i] for i in tr], [prompt_lens[i] for i in tr], model.vocab_size,
                            min(cfg.draft_vocab, model.vocab_size))
    if len(d2t) != ecfg.draft_vocab:
        raise ConfigError(f"--draft-vocab {cfg.draft_vocab} exceeds the target's vocabulary ({model.vocab_size})")
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": ecfg.to_dict()}
    res = fit(cfg, init_params(ecfg, cfg.seed), make_loss(model, ecfg, d2t, cfg.ttt_steps, cfg.decay), train,
              frozen=target_params, eval_data=held, meta=meta, stop_after=stop_after, log=log)
    extra = {}
    if cfg.calibrate_chain and int(res.state.step) == cfg.steps:
        ev = res.final_eval or {}
        acc = [ev[f"acc{s}"] for s in range(cfg.ttt_steps) if f"acc{s}" in ev]
        if not acc:
            raise ConfigError("--calibrate-chain needs a held-out evaluation (acc0 ...) at the end of the run")
        cal = calibrate_chain(model, ecfg, res.params, target_params, d2t, acc, log)
        ecfg = dataclasses.replace(ecfg, num_tokens=cal["num_tokens"])
        extra["calibration"] = cal["calibration"]
    path = save_finished_heads(res, cfg, KIND, {**jax.device_get(res.params), "d2t": d2t}, ecfg.to_dict(),
                               fingerprint, target_name, command, int(len(tr)), int(np.sum(arrays["length"][tr])),
                               log, data_generated_tokens=int(np.sum(arrays["length"][tr] - arrays["prompt_len"][tr])),
                               **extra)
    res.d2t = d2t
    return res, path


def main(argv=None):
    return run_head_script("eagle", EagleTrainConfig, train_eagle, argv, __doc__)

if __name__ == "__main__":
    main()
