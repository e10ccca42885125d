"""Train FiRST routers on the shared harness: ``python -m train.first_routers [--flags]``.

Data: the written training prompts (``train/prompts_written.jsonl``, disjoint from the evaluation chat
prompts), each continued by the frozen model's own greedy decoding (``--gen-tokens`` tokens). Router
features are the full model's prefill residuals entering each layer, mean-pooled over the prompt
(`jaxdec.layerskip.first.features`), computed once. The loss (`jaxdec.layerskip.first.make_loss`): the
gated model's cross-entropy on the continuation + ``--lam`` x the mean keep probability; only the routers
train. Writes ``<out>/routers.npz`` (with the config, target and final eval) besides the harness's
checkpoints, log and plot; a run started again in the same ``--out`` resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, config_from_args, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class FirstTrainConfig(TrainConfig):
    out: str = "train/work/runs/first"
    model: str = "smollm2-135m"
    weights: str = "f32"
    prompts: str = "train/prompts_written.jsonl"
    max_prompts: int = 0  # 0: all
    gen_tokens: int = 24  # the full model's greedy continuation per prompt (the training targets)
    seq_len: int = 96  # prompt + continuation, cut / padded to this many tokens
    rank: int = 16
    keep_bias: float = 2.0
    lam: float = 1.0  # weight of the mean keep probability (the latency penalty)
    eval_fraction: float = 0.1
    steps: int = 60
    batch_size: int = 4
    lr: float = 3e-2
    warmup: int = 5
    save_every: int = 20
    eval_every: int = 20
    eval_batches: int = 2
    log_every: int = 5

    def validate(self) -> None:
        super().validate()
        for name in ("gen_tokens", "seq_len", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.max_prompts < 0:
            raise ConfigError(f"--max-prompts must be >= 0 (0: all), got {self.max_prompts}")
        if not (np.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"--lam must be a finite number >= 0, got {self.lam}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")


def build_arrays(model, params, seqs, prompt_lens, seq_len: int, pad_id: int = 0) -> dict:
    """Training arrays of sequences (prompt + continuation): tokens, next-token targets, continuation
    weights and the router features of each prompt."""
    from jaxdec.layerskip.first import features
    n = len(seqs)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    target = np.zeros((n, seq_len), np.int32)
    weight = np.zeros((n, seq_len), np.float32)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        if p >= seq_len:
            raise ConfigError(f"prompt {i} has {p} tokens, --seq-len {seq_len} leaves no continuation")
        s = list(s)[:seq_len + 1]
        tokens[i, :min(len(s), seq_len)] = s[:seq_len]
        target[i, :len(s) - 1] = s[1:]
        weight[i, p - 1:len(s) - 1] = 1.0  # positions predicting continuation tokens
    pmax = max(prompt_lens)
    ids = np.full((n, pmax), pad_id, np.int32)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :p] = s[:p]
    feats = np.concatenate([np.asarray(features(model, params, ids[i:i + 8], np.asarray(prompt_lens[i:i + 8])))
                            for i in range(0, n, 8)])
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return {"tokens": tokens, "target": target, "weight": weight, "feats": feats.astype(np.float32),
            "positions": positions}


def train_routers(cfg: FirstTrainConfig, model, params, seqs, prompt_lens, fingerprint: str = "", log=print,
                  stop_after=None):
    """Fit routers on ``seqs`` (prompt + continuation, ``prompt_lens``); -> (FitResult, routers path or None)."""
    from jaxdec.layerskip.first import init_routers, make_loss, save_routers
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    arrays = build_arrays(model, params, seqs, prompt_lens, cfg.seq_len, int(getattr(model.config, "pad_id", 0)))
    n_ho = max(1, int(round(len(seqs) * cfg.eval_fraction)))
    tr, ho = np.arange(len(seqs) - n_ho), np.arange(len(seqs) - n_ho, len(seqs))
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    init = init_routers(model.num_layers, arrays["feats"].shape[-1], cfg.rank, cfg.keep_bias, cfg.seed)
    res = fit(cfg, init, make_loss(model, cfg.lam), train, frozen=params, eval_data=held,
              meta={"fingerprint": fingerprint, "kind": "first-routers"}, stop_after=stop_after, log=log)
    path = None
    if int(res.state.step) == cfg.steps:
        final = res.final_eval
        path = save_routers(os.path.join(cfg.out, "routers.npz"), res.params,
                            {"config": dataclasses.asdict(cfg), "fingerprint": fingerprint, "final_eval": final,
                             "train_examples": int(len(tr))})
        log(f"routers: {path}")
    return res, path


def read_prompt_file(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    cfg = config_from_args(FirstTrainConfig, argv, prog="python -m train.first_routers", description=__doc__)
    import jaxdec
    from jaxdec.core.generate import generate
    from jaxdec.speculative.heads.artefact import target_fingerprint
    m = jaxdec.load(cfg.model, weights=cfg.weights)
    recs = read_prompt_file(cfg.prompts)
    if cfg.max_prompts:
        recs = recs[:cfg.max_prompts]
    ids = [m.tokenizer.chat_ids(r["prompt"]) if r.get("chat", True) else m.tokenizer.encode(r["prompt"])
           for r in recs]
    g = generate(m.model, m.params, ids, max_new_tokens=cfg.gen_tokens, batch_size=8)
    seqs = [p + t for p, t in zip(ids, g.tokens)]
    train_routers(cfg, m.model, m.params, seqs, [len(p) for p in ids], fingerprint=target_fingerprint(m.path))


if __name__ == "__main__":
    sys.exit(main())
