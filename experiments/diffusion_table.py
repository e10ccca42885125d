"""Diffusion-LM decoding on the task models (issue 19): per task and schedule, accuracy, model calls and wall time
against one-token-per-step decoding and against the same-size autoregressive model.

Needs the two task models of ``python -m train.masked_diffusion`` (``--objective diffusion`` and
``--objective ar``; see that script) and, for the ``learn2pd`` schedule, the filter of ``python -m
train.learn2pd_filter`` (``make diffusion-models`` trains all three). Each cell is one (task, schedule) over the
task's fixed held-out set (`jaxdec.diffusion.tasks.heldout`): accuracy with the task's grader, mean model calls
per row, tokens per call, wall seconds of the decode after a warm-up call (compile time reported separately).
``ar`` rows decode the autoregressive model greedily through ``jaxdec.generate`` (one call per token, KV cache).

    python experiments/diffusion_table.py            # the shipped models and filter (jaxdec.diffusion.shipped)
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

# schedule name -> SamplerConfig settings (block length and threshold from the config unless given;
# "-b24": no semi-AR blocks, the whole 24-position window is one block)
SCHEDULES = {
    "one-per-step": dict(name="one-per-step", block_length=None),
    "llada-low-confidence": dict(name="llada-low-confidence", steps=8),
    "llada-random": dict(name="llada-random", steps=8),
    "dream-maskgit-plus": dict(name="dream-maskgit-plus", steps=8),
    "dream-topk-margin": dict(name="dream-topk-margin", steps=8),
    "dream-entropy": dict(name="dream-entropy", steps=8),
    "fast-dllm-threshold": dict(name="fast-dllm-threshold"),
    "fast-dllm-threshold-b24": dict(name="fast-dllm-threshold", block_length=None),
    "fast-dllm-threshold-dual": dict(name="fast-dllm-threshold", cache="dual"),
    "fast-dllm-factor": dict(name="fast-dllm-factor", factor=1.0),
    "freedave": dict(name="freedave", drafts=4, block_length=None),
    "localleap": dict(name="localleap", relaxed_threshold=0.6, radius=2),
    "credit": dict(name="credit"),
    "adablock": dict(name="adablock"),
    "ccd": dict(name="ccd", ccd_window=2),
    "remask": dict(name="remask", steps=12, remask_threshold=0.1),
    "learn2pd": dict(name="learn2pd", eos_id=T.EOS_ID),  # the filter of --learn2pd-filter at --threshold
    "learn2pd-b24": dict(name="learn2pd", eos_id=T.EOS_ID, block_length=None),
}
LIST_TASKS = T.LIST_TASKS
LENGTH = T.PROMPT_LEN + T.GEN_LEN  # one canvas length for every task: one compile per schedule


@dataclasses.dataclass(frozen=True)
class Config:
    diffusion_model: str = "diffusion-tasks"  # a shipped name (jaxdec.diffusion.shipped) or a model folder
    ar_model: str = "diffusion-tasks-ar"
    learn2pd_filter: str = "learn2pd-diffusion-tasks"  # a shipped filter name or a .safetensors file
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


def _identity(cfg) -> dict:
    """What the cells' numbers depend on beyond the config: the weights of the models and filter used."""
    from jaxdec.diffusion import shipped
    from jaxdec.speculative.heads.artefact import target_fingerprint
    import hashlib
    out = {}
    for key, name in (("diffusion_weights", cfg.diffusion_model), ("ar_weights", cfg.ar_model)):
        try:
            out[key] = target_fingerprint(shipped.resolve(name))[:23]
        except (FileNotFoundError, ValueError):
            out[key] = "missing"
    f = shipped.path_of(cfg.learn2pd_filter) if cfg.learn2pd_filter in shipped.FILTERS else cfg.learn2pd_filter
    out["filter_weights"] = hashlib.sha256(open(f, "rb").read()).hexdigest()[:16] if os.path.isfile(f) else "missing"
    return out


def depends(cell) -> list:
    """The config and identity fields a cell's numbers depend on (the AR cells: not the diffusion model's)."""
    if cell.endswith("/ar"):
        return ["ar_model", "ar_weights", "n"]
    return ["diffusion_model", "diffusion_weights", "learn2pd_filter", "filter_weights", "n", "block_length",
            "threshold"]


def goals(rec) -> list:
    """The issue's goals from the stored cells: per schedule over the list tasks, mean accuracy and calls
    against one-token-per-step; FreeDave's exactness; the dependent-task finding (ParallelBench)."""
    cells = {c: runner.result(rec, c) for c in rec["cells_order"]}
    tasks = sorted({c.split("/")[0] for c in cells if cells[c] is not None}, key=T.TASKS.index)
    scheds = list(dict.fromkeys(c.split("/")[1] for c in cells if cells[c] is not None))
    lt = [t for t in tasks if t in LIST_TASKS and cells.get(f"{t}/one-per-step") is not None]
    if not lt:
        return []
    lines = ["", "## Goals", "",
             f"List tasks ({', '.join(lt)}), held-out rows pooled: accuracy and model calls per row against "
             "one-token-per-step (calls x: one-per-step's mean calls / the schedule's; a point = 1 % of accuracy). "
             "`ar`: the autoregressive model of the same size (one call per generated token, KV cache).", "",
             "| schedule | accuracy | calls/row | calls x fewer | accuracy loss (points) | 5x fewer at <= 1 point |",
             "|---|---|---|---|---|---|"]

    def pooled(s):
        rs = [cells.get(f"{t}/{s}") for t in lt]
        if any(r is None for r in rs):
            return None
        n = sum(r["n"] for r in rs)
        return (sum(r["accuracy"] * r["n"] for r in rs) / n, sum(r["calls"] * r["n"] for r in rs) / n)

    def table(rows_of):
        base = rows_of("one-per-step")
        for s in scheds:
            p = rows_of(s)
            if p is None:
                continue
            x, loss = base[1] / p[1], 100 * (base[0] - p[0])
            lines.append(f"| {s} | {p[0]:.3f} | {p[1]:.2f} | {x:.2f} | {loss:+.1f} | "
                         f"{'yes' if x >= 5 and loss <= 1 else 'no'} |")

    table(pooled)
    solved = [t for t in lt if cells[f"{t}/one-per-step"]["accuracy"] >= 0.9]
    if solved and len(solved) < len(lt):
        lines += ["", f"The same over the list tasks this model solves at one token per step (>= 90 %: "
                      f"{', '.join(solved)}); on the others one-per-step itself is below 90 %, the model is unsure "
                      "and confidence rules commit little per call:", "",
                  "| schedule | accuracy | calls/row | calls x fewer | accuracy loss (points) | 5x fewer at <= 1 point |",
                  "|---|---|---|---|---|---|"]
        keep = lt
        lt = solved
        table(pooled)
        lt = keep
    fd = [(t, cells.get(f"{t}/freedave"), cells.get(f"{t}/one-per-step")) for t in tasks]
    fd = [(t, a, b) for t, a, b in fd if a is not None and b is not None]
    if fd:
        same = sum(sum(x == y for x, y in zip(a["outputs"], b["outputs"])) for _, a, b in fd)
        tot = sum(len(a["outputs"]) for _, a, _ in fd)
        calls = sum(a["calls"] * a["n"] for _, a, _ in fd) / sum(b["calls"] * b["n"] for _, _, b in fd)
        lines += ["", f"FreeDave: {same}/{tot} held-out outputs identical to one-token-per-step's over "
                      f"{len(fd)} tasks, {1 / calls:.2f}x fewer model calls (goal: exact, >= 2x)."]
    dep = [t for t in ("shuffle", "latin", "sudoku") if t in tasks]
    copyish = [t for t in ("copy", "reverse") if t in tasks]
    if dep and copyish:
        lines += ["", "ParallelBench's finding (accuracy; strongly dependent tasks vs copy-like ones):", "",
                  "| schedule | " + " | ".join(copyish + dep) + " |", "|---" * (1 + len(copyish) + len(dep)) + "|"]
        for s in scheds:
            row = [cells.get(f"{t}/{s}") for t in copyish + dep]
            lines.append(f"| {s} | " + " | ".join("-" if r is None else f"{r['accuracy']:.2f}" for r in row) + " |")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    import jaxdec
    from jaxdec.diffusion import shipped
    from jaxdec.diffusion.model import logits_fn
    from jaxdec.diffusion.samplers import SamplerConfig, sample
    if opts.smoke:
        dm, am, fl = _smoke_models()
        cfg = dataclasses.replace(cfg, diffusion_model=dm, ar_model=am, learn2pd_filter=fl)
    paths = {}
    need = [("diffusion", cfg.diffusion_model)] * any(s != "ar" for s in cfg.schedules) + \
        [("ar", cfg.ar_model)] * ("ar" in cfg.schedules)
    for key, name in need:
        try:
            paths[key] = shipped.resolve(name)
        except FileNotFoundError as e:
            raise SystemExit(f"diffusion_table: {e}") from None
        if not os.path.isdir(paths[key]):
            raise SystemExit(f"diffusion_table: no task model at {name!r} (a shipped name: "
                             f"{', '.join(shipped.MODELS)}, or a folder of python -m train.masked_diffusion)")
    loaded = {k: jaxdec.load(p) for k, p in paths.items()}
    filt = None
    if "learn2pd" in {SCHEDULES.get(s, {}).get("name") for s in cfg.schedules}:
        from jaxdec.diffusion.learn2pd import load_filter
        filt = (shipped.load_filter(cfg.learn2pd_filter) if cfg.learn2pd_filter in shipped.FILTERS
                else load_filter(cfg.learn2pd_filter))  # clear errors naming the file
    warmed = set()

    def measure(cell):
        task, sched = cell.split("/")
        ex = T.heldout(task, cfg.n)
        prompts = [T.encode(e.prompt) for e in ex]
        if sched == "ar":
            m = loaded["ar"]

            def run():
                g = jaxdec.generate(m.model, m.params, prompts, max_new_tokens=T.GEN_LEN)
                return g.tokens, [min(len(t), T.GEN_LEN) for t in g.tokens]
        else:
            m = loaded["diffusion"]
            scfg = SamplerConfig(**{"block_length": cfg.block_length, "threshold": cfg.threshold,
                                    "delimiters": T.DELIMITER_IDS, "mask_id": T.MASK_ID, "pad_id": T.PAD_ID,
                                    **SCHEDULES[sched]})

            def run():
                toks, st = sample(logits_fn(m.model), m.params, prompts, T.GEN_LEN, scfg, length=LENGTH,
                                  filter_params=filt if scfg.name == "learn2pd" else None)
                return toks.tolist(), st["model_calls"]
        first = 0.0
        if sched == "ar" or sched not in warmed:  # compile (the sampler's canvas has one length for every task)
            t0 = time.perf_counter()
            run()
            first = time.perf_counter() - t0
            warmed.add(sched)
        t0 = time.perf_counter()
        toks, calls = run()
        wall = time.perf_counter() - t0
        outs = [T.decode(t) for t in toks]
        ok = [T.grade(e.prompt, o) for e, o in zip(ex, outs)]
        return {"accuracy": float(np.mean(ok)), "calls": float(np.mean(calls)),
                "tokens_per_call": float(np.mean([min(len(T.encode(e.answer)) + 1, T.GEN_LEN) / c
                                                  for e, c in zip(ex, calls)])),
                "seconds": wall, "compile_s": max(first - wall, 0.0), "n": len(ex),
                **({"outputs": outs} if sched in ("one-per-step", "freedave") else {})}  # FreeDave's exactness

    cells = [f"{t}/{s}" for s in cfg.schedules for t in cfg.tasks]

    def render(rec):
        lines = ["Per task and schedule over the task's fixed held-out set: exact accuracy (the task's grader), "
                 "mean model calls per row (one-per-step: one per window position, 24), answer tokens (+[EOS]) "
                 "per call, wall seconds of the whole batch after compilation (a loaded, shared machine: "
                 f"indicative only). Block length {cfg.block_length} and threshold {cfg.threshold} unless the "
                 "schedule says otherwise (-b24: one block).", "",
                 "| task | schedule | accuracy | calls/row | answer tokens/call | seconds |", "|---|---|---|---|---|---|"]
        order = sorted(rec["cells_order"], key=lambda c: (T.TASKS.index(c.split("/")[0]), rec["cells_order"].index(c)))
        for c in order:
            r = runner.result(rec, c)
            if r is not None:
                t, s = c.split("/")
                lines.append(f"| {t} | {s} | {r['accuracy']:.3f} | {r['calls']:.1f} | {r['tokens_per_call']:.2f} | "
                             f"{r['seconds']:.2f} |")
        return goals(rec) + ["", "## All cells", ""] + lines

    def plot(rec, prefix):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        by = {}
        for c in rec["cells_order"]:
            r = runner.result(rec, c)
            if r is not None and c.split("/")[0] in LIST_TASKS:
                by.setdefault(c.split("/")[1], []).append((r["calls"], r["accuracy"]))
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for s, pts in by.items():
            x, y = np.mean([p[0] for p in pts]), np.mean([p[1] for p in pts])
            ax.scatter([x], [y], marker="s" if s == "ar" else "o")
            ax.annotate(s, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("model calls per row (mean over the list tasks, log scale)")
        ax.set_ylabel("exact accuracy (mean over the list tasks)")
        ax.set_title("Masked-diffusion schedules: calls vs accuracy (list tasks, held-out)", fontsize=9)
        runner.stamp(fig, rec)
        fig.tight_layout()
        fig.savefig(prefix + "_calls_vs_accuracy.png", dpi=110)
        plt.close(fig)

    rec = runner.run_experiment("diffusion", cfg, cells, measure, opts=opts, markdown=render, plot=plot,
                                identity=_identity(cfg), depends=depends,
                                title="Masked-diffusion schedules vs one-token-per-step and the same-size AR model")
    print("\n".join(render(rec)))


if __name__ == "__main__":
    main()
