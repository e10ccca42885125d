"""The one training harness every `train/` script runs on.

A script supplies a frozen config dataclass (a subclass of `TrainConfig`), initial params, a loss
function ``loss_fn(params, frozen, batch, key) -> (loss, aux dict)`` and its data as `ArrayData`
(numpy arrays with a leading example axis). `fit` then does the rest:

* optax AdamW with linear warmup and cosine decay, global-norm clipping (`make_optimizer`);
* one jitted train step, data-parallel over a `jaxdec.sharding` mesh: the batch is split over the
  ``data`` axis, params and optimizer state are replicated, XLA inserts the gradient all-reduce
  (the same code runs on 1 or 8 devices);
* an orbax `CheckpointManager`: save every ``save_every`` steps and at the end, keep ``keep``; a run
  started again in the same ``out`` folder resumes from the latest checkpoint. Resuming is exact: the
  batch of step s is a pure function of (seed, s) and the step key is ``fold_in(key, s)``, so an
  interrupted-and-resumed run ends with bit-identical params to an uninterrupted one;
* evaluation on held-out data every ``eval_every`` steps, ``log.jsonl`` (one record per logged step or
  eval), ``loss.png``, a tqdm progress bar with ETA, and a time / size estimate printed once the step
  is compiled, before the long part of the run.

Config fields become CLI flags (`config_from_args`): ``--steps 2000 --lr 3e-4 --no-progress``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P


class ConfigError(ValueError):
    """A bad configuration value (the message names the flag)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fields every run has; a script subclasses it with its own (all become ``--flags``)."""

    out: str = "train/work/runs/run"  # run folder: checkpoints, log.jsonl, loss.png, summary.json
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0  # global-norm gradient clipping (0: off)
    seed: int = 0
    save_every: int = 200
    keep: int = 3
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    progress: bool = True
    devices: int = 0  # data-parallel devices (0: all)

    def validate(self) -> None:
        """Raise `ConfigError` naming the flag of a bad value (subclasses extend it)."""
        for name in ("steps", "batch_size", "save_every", "keep", "eval_every", "eval_batches", "log_every"):
            check_int_flag(name, getattr(self, name), 1)
        check_int_flag("warmup", self.warmup, 0)
        check_int_flag("devices", self.devices, 0)
        check_int_flag("seed", self.seed, 0)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ConfigError(f"--clip must be a finite number >= 0 (0: no clipping), got {self.clip}")
        if not self.out:
            raise ConfigError("--out must name a run folder")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_int_flag(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ConfigError(f"{flag_name(name)} must be an integer >= {lo}, got {v!r}")


def check_target_run_flags(cfg, ints=(), weights=("f32", "q", "bf16", "df11")) -> None:
    """The flags every run against a frozen target shares, where its config has them: ``ints`` (field names,
    or (name, minimum) pairs; minimum 1 by default), ``--eval-fraction`` in (0, 1), ``--decay`` in (0, 1],
    ``--hidden`` recompute|stored and ``--weights`` one of ``weights``."""
    for item in ints:
        name, lo = item if isinstance(item, tuple) else (item, 1)
        check_int_flag(name, getattr(cfg, name), lo)
    if hasattr(cfg, "decay") and not 0.0 < cfg.decay <= 1.0:
        raise ConfigError(f"--decay must be in (0, 1], got {cfg.decay}")
    if hasattr(cfg, "eval_fraction") and not 0.0 < cfg.eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction must be in (0, 1), got {cfg.eval_fraction}")
    if hasattr(cfg, "hidden") and cfg.hidden not in ("recompute", "stored"):
        raise ConfigError(f"--hidden must be 'recompute' or 'stored', got {cfg.hidden!r}")
    if hasattr(cfg, "weights") and cfg.weights not in weights:
        raise ConfigError(f"--weights must be one of {', '.join(weights)}, got {cfg.weights!r}")


def config_from_args(cls, argv=None, prog: Optional[str] = None, description: Optional[str] = None):
    """An instance of the frozen dataclass ``cls`` with ``--field`` flags overriding its defaults
    (``--flag/--no-flag`` for bools), validated; a bad value exits 2 with one ``error:`` line."""
    import argparse
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag_name(f.name), dest=f.name, default=default,
                                type=lambda s: tuple(int(x) for x in s.split(",") if x.strip()),
                                help=f"comma-separated integers (default {','.join(map(str, default))})")
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, type=type(default), default=default,
                                help=f"default {default}")
    args = parser.parse_args(argv)
    cfg = cls(**vars(args))
    try:
        cfg.validate()
    except ConfigError as e:
        parser.error(str(e))
    return cfg


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ArrayData:
    """Examples as numpy arrays with a common leading axis. The batch of global step s holds the
    examples at stream positions ``s*B .. s*B+B-1`` of the stream made of one permutation per epoch
    (epoch e permuted by ``default_rng([seed, e])``): a pure function of (seed, step)."""

    arrays: dict

    def __post_init__(self):
        ns = {k: len(v) for k, v in self.arrays.items()}
        if not ns or len(set(ns.values())) != 1:
            raise ValueError(f"ArrayData: every array needs the same leading size, got {ns}")
        if next(iter(ns.values())) == 0:
            raise ValueError("ArrayData: no examples")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def indices(self, step: int, batch: int, seed: int) -> np.ndarray:
        n = len(self)
        pos = np.arange(step * batch, (step + 1) * batch)
        out = np.empty(batch, np.int64)
        for e in np.unique(pos // n):
            sel = pos // n == e
            perm = np.random.default_rng([seed, int(e)]).permutation(n)
            out[sel] = perm[pos[sel] % n]
        return out

    def batch(self, step: int, batch: int, seed: int) -> dict:
        idx = self.indices(step, batch, seed)
        return {k: v[idx] for k, v in self.arrays.items()}

    def fixed_batches(self, batch: int, count: int):
        """The first ``count`` batches in stored order (held-out evaluation), wrapping around."""
        n = len(self)
        for i in range(count):
            idx = np.arange(i * batch, (i + 1) * batch) % n
            yield {k: v[idx] for k, v in self.arrays.items()}


# --------------------------------------------------------------------------------------------------
# optimizer, state, step
# --------------------------------------------------------------------------------------------------

def make_schedule(cfg: TrainConfig):
    warm = min(cfg.warmup, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0 if warm else cfg.lr, cfg.lr, max(warm, 1) if warm else 1,
                                              max(cfg.steps, warm + 1), end_value=cfg.lr * 0.1)


def make_optimizer(cfg: TrainConfig):
    parts = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip > 0 else []
    parts.append(optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32 steps done
    params: Any
    opt_state: Any
    key: jax.Array  # [2] uint32 base key; step s uses fold_in(key, s)


def data_mesh(devices: int = 0):
    """A (data, model=1) `jaxdec.sharding` mesh over the first ``devices`` devices (0: all)."""
    from jaxdec.sharding import make_mesh
    devs = jax.devices()
    if devices:
        if devices > len(devs):
            raise ConfigError(f"--devices {devices}: only {len(devs)} device(s) available")
        devs = devs[:devices]
    return make_mesh(model=1, devices=devs)


def _replicated(mesh):
    return NamedSharding(mesh, P())


def _rows(mesh):
    from jaxdec.sharding import DATA
    return NamedSharding(mesh, P(DATA))


def make_train_step(loss_fn: Callable, tx, mesh):
    """The jitted step ``(state, frozen, batch) -> (state, metrics)``; the batch is sharded over the
    mesh's data axis, everything else replicated."""

    def step(state: TrainState, frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    rep = _replicated(mesh)
    return jax.jit(step, in_shardings=(rep, rep, _rows(mesh)), out_shardings=(rep, rep), donate_argnums=(0,))


def make_eval_step(eval_fn: Callable, mesh):
    rep = _replicated(mesh)
    return jax.jit(eval_fn, in_shardings=(rep, rep, _rows(mesh)), out_shardings=rep)


def tree_bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in jax.tree.leaves(tree)))


def tree_hash(tree) -> str:
    """sha256 over every leaf's bytes (test helper: bit-identical params have equal hashes)."""
    import hashlib
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(x)
        h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

def _manager(out: str, cfg: TrainConfig):
    import orbax.checkpoint as ocp
    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, save_interval_steps=1,
                                        enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")), options=opts)


# config fields that must match to resume (the schedule and the data order depend on them)
RESUME_FIELDS = ("steps", "batch_size", "seed", "lr", "warmup", "weight_decay", "clip")


def save_checkpoint(mngr, state: TrainState, meta: dict) -> None:
    import orbax.checkpoint as ocp
    step = int(state.step)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()


def restore_checkpoint(mngr, like: TrainState, step: Optional[int] = None):
    """(state, meta) of checkpoint ``step`` (default latest) shaped and placed like ``like``; a
    checkpoint that cannot be read raises a ValueError naming its folder."""
    import orbax.checkpoint as ocp
    step = mngr.latest_step() if step is None else step
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    where = os.path.join(str(mngr.directory), str(step))
    try:
        r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged folder
        raise ValueError(f"checkpoint {where!r} is corrupt or does not match this run's shapes "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    return r.state, dict(r.meta)


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------

def _read_log(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_plot(records: list, path: str, title: str = "") -> Optional[str]:
    """loss.png: train loss (and eval loss) against step. Returns the path (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    tr = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    ev = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FitResult:
    params: Any
    state: TrainState
    records: list
    resumed_from: Optional[int]
    wall_s: float
    out: str

    @property
    def final_eval(self) -> Optional[dict]:
        """The last eval record of the run (None when it never evaluated)."""
        return last_eval(self.records)


def last_eval(records: list) -> Optional[dict]:
    return next((r for r in reversed(records) if r["kind"] == "eval"), None)


def fit(cfg: TrainConfig, init_params, loss_fn: Callable, train: ArrayData, *, frozen=None,
        eval_data: Optional[ArrayData] = None, eval_fn: Optional[Callable] = None, meta: Optional[dict] = None,
        tokens_per_example: Optional[int] = None, stop_after: Optional[int] = None, log=print) -> FitResult:
    """Train ``init_params`` for ``cfg.steps`` steps (resuming from ``cfg.out`` if it has checkpoints).

    frozen: arrays the loss reads but does not train (the target's params), replicated on the mesh.
    eval_fn(params, frozen, batch) -> dict with "loss" (default: loss_fn's loss with a fixed key).
    meta: JSON-able facts saved with every checkpoint (``meta["fingerprint"]`` must match to resume).
    stop_after: stop (as if interrupted) once this many steps are done, after saving any checkpoint due.
    """
    cfg.validate()
    meta = dict(meta or {})
    t_start = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    mesh = data_mesh(cfg.devices)
    ndata = mesh.shape["data"]
    if cfg.batch_size % ndata:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the {ndata} data-parallel devices")
    tx = make_optimizer(cfg)
    rep = _replicated(mesh)
    init_params = jax.tree.map(lambda x: jnp.array(x, copy=True), init_params)  # the step donates its state
    state = TrainState(step=jnp.zeros((), jnp.int32), params=init_params, opt_state=tx.init(init_params),
                       key=jax.random.key_data(jax.random.key(cfg.seed)))
    state = jax.device_put(state, rep)
    frozen = jax.device_put(frozen, rep) if frozen is not None else None
    mngr = _manager(cfg.out, cfg)
    resumed = None
    log_path = os.path.join(cfg.out, "log.jsonl")
    records = _read_log(log_path)
    if mngr.latest_step() is not None:
        state, old = restore_checkpoint(mngr, state)
        for k in RESUME_FIELDS:
            if old.get("config", {}).get(k) != getattr(cfg, k):
                raise ConfigError(f"cannot resume {cfg.out!r}: {flag_name(k)} was {old['config'].get(k)!r} "
                                  f"there, now {getattr(cfg, k)!r} (use another --out or the same value)")
        if old.get("fingerprint") != meta.get("fingerprint"):
            raise ConfigError(f"cannot resume {cfg.out!r}: its checkpoints were trained for target "
                              f"{old.get('fingerprint')!r}, this run's target is {meta.get('fingerprint')!r}")
        resumed = int(state.step)
        records = [r for r in records if r["step"] <= resumed]
        meta["wall_s_before"] = float(old.get("wall_s", 0.0))
        log(f"resuming {cfg.out} from step {resumed} (data position {resumed * cfg.batch_size})")
    with open(log_path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

    step_fn = make_train_step(loss_fn, tx, mesh)
    if eval_fn is None:
        def eval_fn(p, fr, b):  # the loss and its aux metrics with a fixed key
            loss, aux = loss_fn(p, fr, b, jax.random.key(0))
            return {"loss": loss, **aux}
    eval_step = make_eval_step(eval_fn, mesh)
    rows = _rows(mesh)
    sched = make_schedule(cfg)

    def put(batch):
        return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, rows)

    def evaluate(params):
        outs = [jax.device_get(eval_step(params, frozen, put(b)))
                for b in eval_data.fixed_batches(cfg.batch_size, cfg.eval_batches)]
        return {k: float(np.mean([o[k] for o in outs])) for k in outs[0]}

    def ckpt_meta(step):
        return {**meta, "config": dataclasses.asdict(cfg), "step": step, "data_position": step * cfg.batch_size,
                "wall_s": meta.get("wall_s_before", 0.0) + time.time() - t_start}

    # size estimate, then compile and time one step: the time estimate comes before the long part
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    ck_bytes = tree_bytes(state)
    start = int(state.step)
    todo = cfg.steps - start
    tok = f", {tokens_per_example * len(train):,} tokens" if tokens_per_example else ""
    log(f"train: {n_params:,} trainable params ({tree_bytes(state.params) / 2**20:.1f} MiB), checkpoint "
        f"{ck_bytes / 2**20:.1f} MiB x keep {cfg.keep}; data {len(train):,} examples{tok}; "
        f"{ndata} data-parallel device(s); steps {start} -> {cfg.steps}")
    fh = open(log_path, "a")
    bar = None
    if todo > 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, file=sys.stderr, unit="step",
                   dynamic_ncols=True)
    t_compile, n_timed = None, 0
    try:
        while int(state.step) < cfg.steps:
            s = int(state.step)
            batch = put(train.batch(s, cfg.batch_size, cfg.seed))
            t0 = time.time()
            state, m = step_fn(state, frozen, batch)
            m = jax.device_get(m)
            dt = time.time() - t0
            if t_compile is None:
                t_compile = dt
            elif n_timed == 0:  # the second step of this run: steady-state time, before the long part
                log(f"estimate: {dt:.3f} s/step after a {t_compile:.1f} s first step (compile): "
                    f"{todo} steps ~ {_fmt_s(t_compile + dt * (todo - 1))}")
                n_timed = 1
            _after_step(cfg, state, s, m, sched, fh, records, bar, mngr, ckpt_meta)
            done = int(state.step)
            if eval_data is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                ev = evaluate(state.params)
                rec = {"kind": "eval", "step": done, **ev}
                records.append(rec)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.3f}", eval=f"{ev['loss']:.3f}")
                write_plot(records, os.path.join(cfg.out, "loss.png"), os.path.basename(cfg.out.rstrip("/")))
            if stop_after is not None and done >= stop_after:
                break
        if int(state.step) == cfg.steps and mngr.latest_step() != cfg.steps:
            save_checkpoint(mngr, state, ckpt_meta(cfg.steps))
    finally:
        fh.close()
        if bar is not None:
            bar.close()
    write_plot(records, os.path.join(cfg.out, "loss.png"), os.path.basename(cfg.out.rstrip("/")))
    wall = meta.get("wall_s_before", 0.0) + time.time() - t_start
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump({**ckpt_meta(int(state.step)), "wall_s": wall, "resumed_from": resumed,
                   "final": last_eval(records)}, f, indent=1)
    return FitResult(state.params, state, records, resumed, wall, cfg.out)


def _after_step(cfg, state, s, m, sched, fh, records, bar, mngr, ckpt_meta):
    """Log step ``s`` (0-based: the step just taken), advance the bar, save a checkpoint when due."""
    done = s + 1
    if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"loss is {m['loss']} at step {done} (lower --lr?)")
    if done % cfg.log_every == 0 or done == 1:
        rec = {"kind": "train", "step": done, "lr": float(sched(s)),
               **{k: float(v) for k, v in m.items() if np.ndim(v) == 0}}
        records.append(rec)
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")
    if done % cfg.save_every == 0:
        save_checkpoint(mngr, state, ckpt_meta(done))
