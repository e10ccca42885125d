"""Train a small task model from scratch: ``python -m train.masked_diffusion [--objective ar] [--flags]``.

Data: `jaxdec.diffusion.tasks` (``--tasks all`` or a comma list), ``--per-task`` training examples per
task and the fixed held-out set (``--heldout-per-task``) for evaluation. The model is jaxdec's Llama
model with a tiny config over the task vocabulary (`jaxdec.diffusion.model`).

* ``--objective diffusion`` (masked diffusion, LLaDA's SFT objective): per row a mask ratio
  ``t ~ U(eps, 1)``; each position of the generation window (answer, then [EOS] fill) becomes [MASK]
  with probability t; the bidirectional model predicts the masked tokens; the loss is
  ``sum(CE over masked positions) / t / G`` averaged over rows (an upper bound on the negative
  log-likelihood). The prompt is never masked.
* ``--objective ar``: the same-size model, causal, next-token cross-entropy on the answer and one [EOS].

Runs on `train.harness.fit` (AdamW, orbax checkpoints, resumable: start the same command again in the
same ``--out``). At the end ``<out>/model`` is the model as a Hugging Face style folder (`jaxdec.load`,
``jaxdec generate --model <out>/model --method diffusion``); ``--export DIR`` also copies it there, and
``--ship NAME`` (``diffusion-tasks`` for ``--objective diffusion``, ``diffusion-tasks-ar`` for ``ar``) writes it
into the package as that shipped model (`jaxdec.diffusion.shipped`) with its provenance (command, data,
commit, fingerprint, held-out exact-match accuracy per task on ``--ship-heldout`` examples). The defaults are
the settings of the shipped models' first stage; ``--init-from DIR`` starts from a saved task model's weights
(same sizes) instead of a fresh init: the shipped diffusion model is 1500 steps from scratch, then 800 steps at
``--lr 1e-3 --warmup 50`` from that model (``make diffusion-models`` runs both).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp

from jaxdec.diffusion import model as DM
from jaxdec.diffusion import tasks as T
from train.harness import ArrayData, ConfigError, TrainConfig, config_from_args, fit

OBJECTIVE_NAMES = {"diffusion": "masked_diffusion", "ar": "autoregressive"}


@dataclasses.dataclass(frozen=True)
class MaskedDiffusionConfig(TrainConfig):
    out: str = "train/work/runs/diffusion"
    objective: str = "diffusion"  # "diffusion" (masked diffusion, bidirectional) or "ar" (causal)
    tasks: str = "all"  # "all" or a comma list of jaxdec.diffusion.tasks.TASKS
    per_task: int = 4000  # training examples per task
    heldout_per_task: int = 32  # held-out examples per task (evaluation)
    data_seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384
    eps: float = 1e-3  # smallest mask ratio
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    eval_every: int = 250
    save_every: int = 250
    export: str = ""  # also copy the model folder here
    init_from: str = ""  # start from this task model folder's weights (same sizes) instead of a fresh init
    ship: str = ""  # also write it into the package as this shipped model (jaxdec.diffusion.shipped.MODELS)
    ship_heldout: int = 64  # held-out examples per task for the shipped model's accuracy record

    def task_list(self) -> tuple:
        return parse_tasks(self.tasks)

    def model_config(self) -> DM.TaskModelConfig:
        return DM.TaskModelConfig(hidden=self.hidden, layers=self.layers, heads=self.heads, ffn=self.ffn,
                                  max_position=T.PROMPT_LEN + T.GEN_LEN)

    def validate(self) -> None:
        super().validate()
        if self.objective not in OBJECTIVE_NAMES:
            raise ConfigError(f"--objective must be 'diffusion' or 'ar', got {self.objective!r}")
        self.task_list()
        for n in ("per_task", "heldout_per_task", "hidden", "layers", "heads", "ffn"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{n.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads})")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"--eps must be in (0, 1), got {self.eps}")
        if self.init_from:
            from jaxdec.diffusion.model import objective_of
            if objective_of(self.init_from) != OBJECTIVE_NAMES[self.objective]:
                raise ConfigError(f"--init-from must be a {OBJECTIVE_NAMES[self.objective]} task model folder, got "
                                  f"{self.init_from!r} (objective {objective_of(self.init_from)!r})")
        if self.ship:
            from jaxdec.diffusion.shipped import MODELS
            if MODELS.get(self.ship) != OBJECTIVE_NAMES[self.objective]:
                want = [n for n, o in MODELS.items() if o == OBJECTIVE_NAMES[self.objective]]
                raise ConfigError(f"--ship must be empty or the shipped {self.objective} model name "
                                  f"({', '.join(want)}), got {self.ship!r}")
        if isinstance(self.ship_heldout, bool) or not isinstance(self.ship_heldout, int) or self.ship_heldout < 1:
            raise ConfigError(f"--ship-heldout must be an integer >= 1, got {self.ship_heldout!r}")


def parse_tasks(tasks: str) -> tuple:
    """The task names of a ``--tasks`` value ("all" or a comma list), or `ConfigError` naming the flag."""
    names = T.TASKS if tasks == "all" else tuple(s.strip() for s in tasks.split(",") if s.strip())
    if not names or any(n not in T.TASKS for n in names):
        raise ConfigError(f"--tasks must be 'all' or a comma list of {', '.join(T.TASKS)}, got {tasks!r}")
    return names


def make_loss(model, objective: str, eps: float = 1e-3):
    """``loss_fn(params, frozen, batch, key) -> (loss, {"acc": ...})`` for `train.harness.fit`."""

    def diffusion_loss(params, frozen, batch, key):
        toks, plen, glen = batch["tokens"], batch["prompt_len"], batch["gen_len"]
        b, t = toks.shape
        pos = jnp.arange(t)[None]
        gen = (pos >= plen[:, None]) & (pos < (plen + glen)[:, None])
        k1, k2 = jax.random.split(key)
        ratio = eps + (1.0 - eps) * jax.random.uniform(k1, (b, 1))
        m = gen & (jax.random.uniform(k2, (b, t)) < ratio)
        noisy = jnp.where(m, T.MASK_ID, toks)
        logits = DM.forward(model, params, noisy)
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[..., None], -1)[..., 0]
        mf = m.astype(jnp.float32)
        loss = jnp.mean(jnp.sum(ce * mf, axis=1) / ratio[:, 0] / glen)
        acc = jnp.sum((jnp.argmax(logits, -1) == toks) * mf) / jnp.maximum(jnp.sum(mf), 1.0)
        return loss, {"acc": acc}

    def ar_loss(params, frozen, batch, key):
        toks, plen, alen = batch["tokens"], batch["prompt_len"], batch["answer_len"]
        t = toks.shape[1]
        logits = DM.forward(model, params, toks, causal=True)[:, :-1]
        tgt = toks[:, 1:]
        pos = jnp.arange(1, t)[None]
        m = ((pos >= plen[:, None]) & (pos <= (plen + alen)[:, None])).astype(jnp.float32)  # answer + [EOS]
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
        loss = jnp.sum(ce * m) / jnp.sum(m)
        acc = jnp.sum((jnp.argmax(logits, -1) == tgt) * m) / jnp.sum(m)
        return loss, {"acc": acc}

    return diffusion_loss if objective == "diffusion" else ar_loss


def build_data(cfg: MaskedDiffusionConfig):
    """(train ArrayData, held-out ArrayData) of the configured tasks."""
    names = cfg.task_list()
    eos_fill = cfg.objective == "diffusion"
    train = T.to_arrays(T.mixture(names, cfg.per_task, "train", seed=cfg.data_seed), eos_fill=eos_fill)
    held = T.to_arrays([ex for n in names for ex in T.heldout(n, cfg.heldout_per_task)], eos_fill=eos_fill)
    return ArrayData(train), ArrayData(held)


def fingerprint(cfg: MaskedDiffusionConfig) -> str:
    init = ""
    if cfg.init_from:
        import hashlib
        with open(os.path.join(cfg.init_from, "model.safetensors"), "rb") as f:
            init = ":init=" + hashlib.sha256(f.read()).hexdigest()[:16]
    return (f"task-model:{cfg.objective}:{','.join(cfg.task_list())}:{cfg.per_task}:{cfg.data_seed}:"
            f"{cfg.hidden}x{cfg.layers}x{cfg.heads}x{cfg.ffn}:v{T.VOCAB_SIZE}{init}")


def train(cfg: MaskedDiffusionConfig, stop_after=None, log=print, command: str = ""):
    """Train (or resume) the run in ``cfg.out``; returns ``(FitResult, model folder or None)`` (the
    folder is written once the run reached ``cfg.steps``)."""
    cfg.validate()
    mcfg = cfg.model_config()
    model = DM.build(mcfg)
    tr, ho = build_data(cfg)
    init = DM.init_params(mcfg, cfg.seed)
    if cfg.init_from:
        icfg, init = DM.read_params(cfg.init_from)
        if (icfg.hidden, icfg.layers, icfg.heads, icfg.ffn) != (mcfg.hidden, mcfg.layers, mcfg.heads, mcfg.ffn):
            raise ConfigError(f"--init-from {cfg.init_from!r} has sizes {icfg}, this run {mcfg}")
    res = fit(cfg, init, make_loss(model, cfg.objective, cfg.eps), tr, eval_data=ho,
              meta={"fingerprint": fingerprint(cfg)}, tokens_per_example=T.PROMPT_LEN + T.GEN_LEN,
              stop_after=stop_after, log=log)
    if int(res.state.step) != cfg.steps:
        return res, None
    final = res.final_eval
    meta = {"steps": cfg.steps, "tasks": list(cfg.task_list()), "per_task": cfg.per_task, "wall_s": round(res.wall_s, 1),
            "final_eval": final, "command": command, "fingerprint": fingerprint(cfg)}
    folder = DM.save(os.path.join(cfg.out, "model"), mcfg, res.params, OBJECTIVE_NAMES[cfg.objective], meta)
    log(f"model: {folder}")
    if cfg.export:
        if os.path.isdir(cfg.export):
            shutil.rmtree(cfg.export)
        shutil.copytree(folder, cfg.export)
        log(f"exported {cfg.export}")
    if cfg.ship:
        ship(cfg, folder, res, len(tr), command, log)
    return res, folder


def ship(cfg: MaskedDiffusionConfig, folder: str, res, examples: int, command: str, log=print) -> str:
    """Write the trained model ``folder`` into the package as shipped model ``cfg.ship`` with its
    provenance (`jaxdec.diffusion.shipped.ship_model`)."""
    from jaxdec.diffusion import shipped
    from train.medusa import git_commit
    acc = shipped.heldout_exact(folder, cfg.task_list(), cfg.ship_heldout)
    log("held-out exact: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    facts = {"fingerprint": fingerprint(cfg), "command": command, "commit": git_commit(), "steps": cfg.steps,
             "batch_size": cfg.batch_size, "lr": cfg.lr, "objective": cfg.objective, "tasks": list(cfg.task_list()),
             "data_examples": examples, "data_tokens": examples * (T.PROMPT_LEN + T.GEN_LEN),
             "data": f"jaxdec.diffusion.tasks.mixture(tasks, {cfg.per_task}, 'train', seed={cfg.data_seed})",
             "tokens_seen": cfg.steps * cfg.batch_size * (T.PROMPT_LEN + T.GEN_LEN), "wall_s": round(res.wall_s, 1),
             "final_eval": res.final_eval, "heldout_exact": acc, "heldout_per_task": cfg.ship_heldout}
    if cfg.init_from:  # a continued run: where it started (that model's own provenance is in its config.json)
        with open(os.path.join(cfg.init_from, "config.json")) as f:
            facts["init_from"] = {"folder": cfg.init_from, "meta": json.load(f).get("jaxdec_meta", {})}
    return shipped.ship_model(folder, cfg.ship, facts, log=log)


def main(argv=None):
    prog = "python -m train.masked_diffusion"
    cfg = config_from_args(MaskedDiffusionConfig, argv, prog=prog, description=__doc__)
    return train(cfg, command=f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
