"""Diffusion-LM decoding on the task models (issue 19): per task and schedule, accuracy, model calls and wall time
against one-token-per-step decoding and against the same-size autoregressive model.

Needs the two task models of ``python -m train.masked_diffusion`` (``--objective diffusion`` and
``--objective ar``; see that script) and, for the ``learn2pd`` schedule, the filter of ``python -m
train.learn2pd_filter`` (``make diffusion-models`` trains all three). Each cell is one (task, schedule) over the
task's fixed held-out set (`jaxdec.diffusion.tasks.heldout`): accuracy with the task's grader, mean model calls
per row, tokens per call, wall seconds of the decode after a warm-up call (compile time reported separately).
``ar`` rows decode the autoregressive model greedily through ``jaxdec.generate`` (one call per token, KV cache).

    python experiments/diffusion_table.py --diffusion-model train/work/runs/diffusion/model \\
        --ar-model train/work/runs/diffusion-ar/model --n 64
    python experiments/diffusion_table.py --smoke     # trains two toy models and a filter for a few steps, temp dir

Writes ``experiments/results/diffusion.{json,md}`` and ``diffusion_calls_vs_accuracy.png``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)

from jaxdec.diffusion import tasks as T  # noqa: E402

# schedule name -> SamplerConfig settings (block length and threshold from the config unless given)
SCHEDULES = {
    "one-per-step": dict(name="one-per-step"),
    "llada-low-confidence": dict(name="llada-low-confidence", steps=8),
    "llada-random": dict(name="llada-random", steps=8),
    "dream-maskgit-plus": dict(name="dream-maskgit-plus", steps=8),
    "dream-topk-margin": dict(name="dream-topk-margin", steps=8),
    "dream-entropy": dict(name="dream-entropy", steps=8),
    "fast-dllm-threshold": dict(name="fast-dllm-threshold"),
    "fast-dllm-factor": dict(name="fast-dllm-factor", factor=1.0),
    "freedave": dict(name="freedave", drafts=4),
    "localleap": dict(name="localleap", relaxed_threshold=0.6, radius=2),
    "credit": dict(name="credit"),
    "adablock": dict(name="adablock"),
    "ccd": dict(name="ccd", ccd_window=2),
    "remask": dict(name="remask", steps=12, remask_threshold=0.1),
    "learn2pd": dict(name="learn2pd", eos_id=T.EOS_ID),  # the filter of --learn2pd-filter at --threshold
}


@dataclasses.dataclass(frozen=True)
class Config:
    diffusion_model: str = "train/work/runs/diffusion/model"
    ar_model: str = "train/work/runs/diffusion-ar/model"
    learn2pd_filter: str = "train/work/runs/learn2pd/filter.safetensors"  # python -m train.learn2pd_filter
    n: int = 64  # held-out examples per task
    block_length: int = 8
    threshold: float = 0.9
    tasks: tuple[str, ...] = runner.select(T.TASKS, "tasks to run")
    schedules: tuple[str, ...] = runner.select(tuple(SCHEDULES) + ("ar",), "schedules to run (ar: the autoregressive model)")


SMOKE = Config(n=2, tasks=("copy", "reverse"), schedules=("one-per-step", "fast-dllm-threshold", "freedave", "learn2pd",
                                                                       "ar"))


def _smoke_models() -> tuple:
    from train.masked_diffusion import MaskedDiffusionConfig, train
    d = tempfile.mkdtemp(prefix="diffusion_smoke_")
    out = []
    for obj in ("diffusion", "ar"):
        cfg = MaskedDiffusionConfig(out=os.path.join(d, obj), objective=obj, tasks="copy,reverse", per_task=64,
                                    heldout_per_task=2, steps=4, batch_size=8, warmup=1, eval_every=4, save_every=4,
                                    log_every=2, progress=False, hidden=32, layers=1, heads=2, ffn=64)
        out.append(train(cfg, log=lambda *a: None)[1])
    from train.learn2pd_filter import FilterConfig, train as train_filter
    fcfg = FilterConfig(out=os.path.join(d, "learn2pd"), model=out[0], tasks="copy,reverse", per_task=4,
                        heldout_per_task=2, states=2, replay_batch=8, steps=4, batch_size=32, warmup=1, eval_every=4,
                        save_every=4, eval_batches=1, progress=False)
    out.append(train_filter(fcfg, log=lambda *a: None)[1])
    return tuple(out)


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    import jaxdec
    from jaxdec.diffusion.model import logits_fn
    from jaxdec.diffusion.samplers import SamplerConfig, sample
    if opts.smoke:
        dm, am, fl = _smoke_models()
        cfg = dataclasses.replace(cfg, diffusion_model=dm, ar_model=am, learn2pd_filter=fl)
    for path in (cfg.diffusion_model, cfg.ar_model):
        if not os.path.isdir(path):
            raise SystemExit(f"diffusion_table: no task model at {path!r} (train it with python -m "
                             f"train.masked_diffusion; see the docstring)")
    loaded = {"diffusion": jaxdec.load(cfg.diffusion_model), "ar": jaxdec.load(cfg.ar_model)}
    filt = None
    if "learn2pd" in cfg.schedules:
        from jaxdec.diffusion.learn2pd import load_filter
        filt = load_filter(cfg.learn2pd_filter)  # a clear error naming the path when it is missing

    def measure(cell):
        task, sched = cell.split("/")
        ex = T.heldout(task, cfg.n)
        prompts = [T.encode(e.prompt) for e in ex]
        if sched == "ar":
            m = loaded["ar"]

            def run():
                g = jaxdec.generate(m.model, m.params, prompts, max_new_tokens=T.GEN_LEN)
                return g.tokens, [len(t) for t in g.tokens]
        else:
            m = loaded["diffusion"]
            scfg = SamplerConfig(**{"block_length": cfg.block_length, "threshold": cfg.threshold,
                                    "delimiters": T.DELIMITER_IDS, "mask_id": T.MASK_ID, "pad_id": T.PAD_ID,
                                    **SCHEDULES[sched]})
            if scfg.name == "one-per-step":
                scfg = dataclasses.replace(scfg, block_length=None)

            def run():
                toks, st = sample(logits_fn(m.model), m.params, prompts, T.GEN_LEN, scfg,
                                  filter_params=filt if scfg.name == "learn2pd" else None)
                return toks.tolist(), st["model_calls"]
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        toks, calls = run()
        wall = time.perf_counter() - t0
        ok = [T.grade(e.prompt, T.decode(t)) for e, t in zip(ex, toks)]
        return {"accuracy": float(np.mean(ok)), "calls": float(np.mean(calls)),
                "tokens_per_call": float(np.mean([min(len(T.encode(e.answer)) + 1, T.GEN_LEN) / c
                                                  for e, c in zip(ex, calls)])),
                "seconds": wall, "compile_s": max(first - wall, 0.0), "n": len(ex)}

    cells = [f"{t}/{s}" for t in cfg.tasks for s in cfg.schedules]

    def render(rec):
        lines = ["| task | schedule | accuracy | calls/row | answer tokens/call | seconds |", "|---|---|---|---|---|---|"]
        for c in rec["cells_order"]:
            r = runner.result(rec, c)
            if r is not None:
                t, s = c.split("/")
                lines.append(f"| {t} | {s} | {r['accuracy']:.3f} | {r['calls']:.1f} | {r['tokens_per_call']:.2f} | "
                             f"{r['seconds']:.2f} |")
        return lines

    def plot(rec, prefix):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        by = {}
        for c in rec["cells_order"]:
            r = runner.result(rec, c)
            if r is not None:
                by.setdefault(c.split("/")[1], []).append((r["calls"], r["accuracy"]))
        fig, ax = plt.subplots(figsize=(7, 5))
        for s, pts in by.items():
            x, y = np.mean([p[0] for p in pts]), np.mean([p[1] for p in pts])
            ax.scatter([x], [y])
            ax.annotate(s, (x, y), fontsize=7)
        ax.set_xlabel("model calls per row (mean over tasks)")
        ax.set_ylabel("accuracy (mean over tasks)")
        runner.stamp(fig, rec)
        fig.tight_layout()
        fig.savefig(prefix + "_calls_vs_accuracy.png", dpi=110)
        plt.close(fig)

    rec = runner.run_experiment("diffusion", cfg, cells, measure, opts=opts, markdown=render, plot=plot,
                                title="Masked-diffusion schedules vs one-token-per-step and the same-size AR model")
    print("\n".join(render(rec)))


if __name__ == "__main__":
    main()
