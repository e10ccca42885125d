"""Train the Learn2PD filter of a masked-diffusion task model: ``python -m train.learn2pd_filter --model DIR``.

Labels come from the "extremely greedy" replay (`replay_labels` below): the model
decodes ``--per-task`` training prompts per task one token per step; ``--states`` canvases per prompt
along that trajectory are scored again, and each masked position is labelled ready iff its current
argmax already equals the token one-per-step decoding finally put there. The filter (a flax MLP over
per-position confidence features, ``--hidden`` units) is fitted with binary cross-entropy on the shared
harness (`train.harness.fit`: AdamW, orbax checkpoints in ``--out``, resumable: start the same command
again). The replayed examples are cached in ``<out>/replay.npz``. At the end ``<out>/filter.safetensors``
(+ ``.json``) is the filter (`jaxdec.diffusion.learn2pd.load_filter`); ``--export PATH`` also writes it there,
and ``--ship learn2pd-diffusion-tasks`` writes it into the package as the shipped filter of the shipped model
``diffusion-tasks`` (`jaxdec.diffusion.shipped`; needs ``--model diffusion-tasks``) with its provenance.
``--model`` takes a task model folder or a shipped model name.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdec.diffusion import learn2pd as L
from jaxdec.diffusion import tasks as T
from jaxdec.diffusion.samplers import SamplerConfig, make_canvas, predict, sample
from train.harness import ArrayData, ConfigError, TrainConfig, config_from_args, fit
from train.masked_diffusion import parse_tasks


def replay_labels(logits_fn, aux, prompts, gen_len, mask_id: int, pad_id: int, eos_id, *, states: int = 6,
                  batch: int = 64, seed: int = 0):
    """The "extremely greedy" replay: one-per-step decoding of ``prompts``, then ``states`` canvases per
    row along that trajectory (the positions committed before call k filled in, k spread evenly), each
    scored by one model call. Returns ``{"features": [N, NFEAT], "label": [N]}`` over the masked window
    positions of every replayed canvas (label 1: the current argmax equals the final token)."""
    cfg = SamplerConfig("one-per-step", mask_id=mask_id, pad_id=pad_id)
    rng = np.random.default_rng(seed)
    feats, labels = [], []

    @jax.jit
    def score(aux, canvas, masked, gen, final):
        logp, x0, p0 = predict(cfg, logits_fn(aux, canvas))
        return L.features(logp, x0, p0, masked, gen, eos_id), x0 == final

    for i in range(0, len(prompts), batch):
        ps = prompts[i:i + batch]
        toks, st = sample(logits_fn, aux, ps, gen_len, cfg)
        canvas0, plen, glen = make_canvas(ps, gen_len, pad_id)
        t = canvas0.shape[1]
        pos = np.arange(t)[None]
        gen = (pos >= plen[:, None]) & (pos < (plen + glen)[:, None])
        final = canvas0.copy()
        cstep = np.full((len(ps), t), -1, np.int64)
        for r in range(len(ps)):
            final[r, plen[r]:plen[r] + glen[r]] = toks[r, :glen[r]]
            cstep[r, plen[r]:plen[r] + glen[r]] = st["commit_step"][r, :glen[r]]
        for s in range(states):
            # call index k per row: evenly spread over the trajectory, jittered
            k = np.minimum(((s + rng.uniform(size=(len(ps), 1))) / states * glen[:, None]).astype(np.int64),
                           glen[:, None] - 1)
            masked = gen & (cstep >= k)
            canvas = np.where(gen, np.where(masked, mask_id, final), canvas0)
            f, lab = score(aux, jnp.asarray(canvas), jnp.asarray(masked), jnp.asarray(gen), jnp.asarray(final))
            sel = masked
            feats.append(np.asarray(f)[sel])
            labels.append(np.asarray(lab)[sel])
    return {"features": np.concatenate(feats).astype(np.float32), "label": np.concatenate(labels).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class FilterConfig(TrainConfig):
    out: str = "train/work/runs/learn2pd"
    model: str = "diffusion-tasks"  # the masked-diffusion task model: a folder or a shipped model name
    tasks: str = "all"  # "all" or a comma list of jaxdec.diffusion.tasks.TASKS
    per_task: int = 200  # training prompts per task replayed
    heldout_per_task: int = 16  # held-out prompts per task replayed (evaluation)
    states: int = 6  # replayed canvases per prompt
    replay_batch: int = 64  # prompts decoded at once in the replay
    data_seed: int = 0
    hidden: int = 32
    steps: int = 2000
    batch_size: int = 512
    lr: float = 3e-3
    warmup: int = 50
    eval_every: int = 250
    save_every: int = 250
    export: str = ""  # also write the filter here (.safetensors)
    ship: str = ""  # also write it into the package as this shipped filter (jaxdec.diffusion.shipped.FILTERS)

    def task_list(self) -> tuple:
        return parse_tasks(self.tasks)

    def model_path(self) -> str:
        """``--model`` as a folder (a shipped model name resolved)."""
        from jaxdec.diffusion.shipped import resolve
        try:
            return resolve(self.model)
        except FileNotFoundError as e:
            raise ConfigError(f"--model: {e}") from None

    def validate(self) -> None:
        super().validate()
        self.task_list()
        for n in ("per_task", "heldout_per_task", "states", "replay_batch", "hidden"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{n.replace('_', '-')} must be an integer >= 1, got {v!r}")
        from jaxdec.diffusion.model import objective_of
        if objective_of(self.model_path()) != "masked_diffusion":
            raise ConfigError(f"--model {self.model!r} must be a masked-diffusion task model folder (written by "
                              f"python -m train.masked_diffusion) or shipped model name, got objective "
                              f"{objective_of(self.model_path())!r}")
        if self.ship:
            from jaxdec.diffusion.shipped import FILTERS
            if self.ship not in FILTERS or self.model != FILTERS[self.ship]:
                raise ConfigError(f"--ship must be empty or a shipped filter name ({', '.join(FILTERS)}) with "
                                  f"--model its shipped model ({', '.join(FILTERS.values())}), got --ship "
                                  f"{self.ship!r} --model {self.model!r}")


def bce_loss(params, frozen, batch, key):
    """``(mean binary cross-entropy, {"acc", "ready"})`` of the filter on replayed features/labels."""
    z = L.apply_filter(params, batch["features"])
    y = batch["label"]
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(z, y))
    return loss, {"acc": jnp.mean((z > 0) == (y > 0.5)), "ready": jnp.mean(y)}


def replay(cfg: FilterConfig, log=print):
    """(train, held-out) ArrayData of replayed features and labels (cached in ``<out>/replay.npz``)."""
    from jaxdec.diffusion.model import load, logits_fn
    path = os.path.join(cfg.out, "replay.npz")
    if os.path.isfile(path):
        z = np.load(path)
        if str(z["fingerprint"]) == fingerprint(cfg):
            return (ArrayData({"features": z["tr_f"], "label": z["tr_y"]}),
                    ArrayData({"features": z["ho_f"], "label": z["ho_y"]}))
    model, params, _ = load(cfg.model_path(), require="masked_diffusion")
    fn = logits_fn(model)
    names = cfg.task_list()
    out = []
    for split, n in (("train", cfg.per_task), ("heldout", cfg.heldout_per_task)):
        ex = T.mixture(names, n, "train", seed=cfg.data_seed) if split == "train" else \
            [e for name in names for e in T.heldout(name, n)]
        d = replay_labels(fn, params, [T.encode(e.prompt) for e in ex], T.GEN_LEN, T.MASK_ID, T.PAD_ID,
                            T.EOS_ID, states=cfg.states, batch=cfg.replay_batch, seed=cfg.data_seed)
        log(f"replay {split}: {len(ex)} prompts, {len(d['label'])} positions, {d['label'].mean():.3f} ready")
        out.append(d)
    os.makedirs(cfg.out, exist_ok=True)
    np.savez(path, fingerprint=fingerprint(cfg), tr_f=out[0]["features"], tr_y=out[0]["label"],
             ho_f=out[1]["features"], ho_y=out[1]["label"])
    return ArrayData(out[0]), ArrayData(out[1])


def fingerprint(cfg: FilterConfig) -> str:
    import hashlib
    with open(os.path.join(cfg.model_path(), "model.safetensors"), "rb") as f:  # the weights, not the file's date
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return (f"learn2pd:{digest}:{','.join(cfg.task_list())}:{cfg.per_task}:{cfg.heldout_per_task}:{cfg.states}:"
            f"{cfg.data_seed}:{cfg.hidden}:f{L.NFEAT}")


def train(cfg: FilterConfig, stop_after=None, log=print, command: str = ""):
    """Train (or resume) the filter in ``cfg.out``; returns ``(FitResult, filter path or None)`` (the path
    once the run reached ``cfg.steps``)."""
    cfg.validate()
    tr, ho = replay(cfg, log=log)
    res = fit(cfg, L.init_filter(cfg.hidden, cfg.seed), bce_loss, tr, eval_data=ho,
              meta={"fingerprint": fingerprint(cfg)}, stop_after=stop_after, log=log)
    if int(res.state.step) != cfg.steps:
        return res, None
    final = res.final_eval
    meta = {"model": cfg.model, "steps": cfg.steps, "tasks": list(cfg.task_list()), "per_task": cfg.per_task,
            "states": cfg.states, "positions": len(tr), "final_eval": final, "command": command}
    path = L.save_filter(os.path.join(cfg.out, "filter.safetensors"), res.params, meta)
    log(f"filter: {path}")
    if cfg.export:
        L.save_filter(cfg.export, res.params, meta)
        log(f"exported {cfg.export}")
    if cfg.ship:
        from jaxdec.diffusion import shipped
        from train.medusa import git_commit
        facts = {"command": command, "commit": git_commit(), "steps": cfg.steps, "batch_size": cfg.batch_size,
                 "lr": cfg.lr, "tasks": list(cfg.task_list()), "data": f"extremely-greedy replay of {cfg.per_task} "
                 f"training prompts per task (seed {cfg.data_seed}), {cfg.states} canvases each",
                 "data_examples": len(tr), "train_fingerprint": fingerprint(cfg), "wall_s": round(res.wall_s, 1),
                 "final_eval": final}
        shipped.ship_filter(res.params, cfg.ship, facts, log=log)
    return res, path


def main(argv=None):
    prog = "python -m train.learn2pd_filter"
    cfg = config_from_args(FilterConfig, argv, prog=prog, description=__doc__)
    return train(cfg, command=f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
