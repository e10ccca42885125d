"""FiRST (issue 21 item 5, LOSSY): layers skipped vs agreement with full-model greedy, NLL and speed.

Cells: one per router threshold (``t0.5`` ...): a layer is skipped for a prompt's whole generation when its
router's keep probability (read from the prompt's prefill) is below the threshold; higher thresholds skip
more. Routers: ``--routers`` (a `train.first_routers` file; default the one committed beside the results,
trained on train/prompts_written.jsonl) or ``forced:9,14`` (skip those layers for every prompt). Prompts:
the chat prompts of jaxdec/data/prompts/chat_prompts.jsonl (held out from the routers' training data), f32
weights, batch 1 (the per-prompt decision), a fixed N new tokens (EOS ignored).

Per cell: layers skipped (mean over prompts, and the skip sets); agreement with full-model greedy as
(a) teacher-forced: the FiRST model's argmax on the full model's greedy continuation equals it, (b) free
running: positions where FiRST's own greedy output equals full greedy, (c) the mean matching prefix; NLL
(nats/token) of the full model's greedy continuation under the FiRST model (full model: its own NLL); a
control with as many layers skipped, drawn at random from layers 1 .. L-2 (3 draws per prompt: teacher-
forced agreement and NLL);
tokens/s of FiRST and of jaxdec greedy in the same run (one untimed warm-up each, --reps interleaved
repetitions, median [min, max] of per-repetition ratios). Writes experiments/results/first_table.{json,md}.

    python experiments/first_table.py                      # 8 prompts, 32 new tokens, 3 reps
    python experiments/first_table.py --thresholds 0.5 0.8 --prompts 4
    python experiments/first_table.py --smoke              # 1 prompt, forced skip set, 4 tokens, temp dir
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)
from bench_throughput import interleaved, ratio, strip_tokens  # noqa: E402  (the interleaved timing loop)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROUTERS = os.path.join(ROOT, "experiments", "results", "first_routers.npz")


@dataclasses.dataclass(frozen=True)
class Config:
    routers: str = field(default=os.path.relpath(DEFAULT_ROUTERS, ROOT),
                         metadata={"help": "router file (python -m train.first_routers) or forced:L1,L2,..."})
    prompts: int = field(default=8, metadata={"help": "held-out chat prompts"})
    new_tokens: int = field(default=32, metadata={"help": "new tokens per prompt (EOS ignored)"})
    reps: int = field(default=3, metadata={"help": "interleaved timed repetitions"})
    thresholds: tuple[float, ...] = field(default=(0.5, 0.7, 0.9), metadata={"help": "router thresholds (cells)"})


SMOKE = Config(routers="forced:9,14", prompts=1, new_tokens=4, reps=1, thresholds=(0.5,))


@functools.lru_cache(maxsize=None)
def load():
    import jaxdec
    return jaxdec.load("smollm2-135m", weights="f32")


@functools.lru_cache(maxsize=None)
def prompt_ids(n: int) -> tuple:
    import json
    with open(os.path.join(ROOT, "jaxdec", "data", "prompts", "chat_prompts.jsonl")) as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return tuple(tuple(load().tokenizer.chat_ids(t)) for t in texts[:n])


def routers_of(spec: str):
    from jaxdec.layerskip.first import forced_routers, load_routers
    m = load()
    if spec.startswith("forced:"):
        skip = [int(x) for x in spec[len("forced:"):].split(",") if x.strip()]
        return forced_routers(m.model.num_layers, m.model.config.hidden_size, skip)
    path = spec if os.path.isabs(spec) else os.path.join(ROOT, spec)
    return load_routers(path)[0]


@functools.lru_cache(maxsize=None)
def _scorer(model):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def score(params, prompt, cont, keep):
        """Full-model prefill of the prompt, then the continuation as one cached block through the kept
        layers (the decode's cache semantics, teacher forced): log-probs of each next token and argmaxes."""
        p, n = prompt.shape[1], cont.shape[1]
        cache = model.init_cache(1, p + n)
        out = model(params, prompt, jnp.arange(p)[None], cache)
        first = jax.nn.log_softmax(out.logits[:, -1].astype(jnp.float32), -1)
        blk = model(params, cont, p + jnp.arange(n)[None], out.cache, layers=keep)
        lp = jnp.concatenate([first[:, None], jax.nn.log_softmax(blk.logits[:, :-1].astype(jnp.float32), -1)], 1)
        tok_lp = jnp.take_along_axis(lp, cont[..., None], -1)[..., 0]
        return tok_lp, jnp.argmax(lp, -1)
    return score


def measure_cell(cfg, cell):
    import jax.numpy as jnp
    import numpy as np
    from jaxdec import generate
    from jaxdec.layerskip.first import RouterSet, features, first_generate, keep_prob
    m = load()
    model, params = m.model, m.params
    thr = float(cell[1:])
    rs = RouterSet(routers_of(cfg.routers), thr)
    prompts = [list(p) for p in prompt_ids(cfg.prompts)]
    n = cfg.new_tokens
    skip_sets = []

    def greedy(ps):
        return [generate(model, params, [p], max_new_tokens=n, stop_ids=()).tokens[0] for p in ps]

    def first(ps):
        out = []
        for p in ps:
            g = first_generate(model, params, [p], rs, max_new_tokens=n, stop_ids=())
            out.append(g.tokens[0])
            if len(skip_sets) < len(ps):
                skip_sets.append(g.stats["layers_skipped"])
        return out

    res = interleaved({"greedy": greedy, "first": first}, prompts, cfg.reps, n, len(prompts))
    full, fst = res["greedy"]["tokens"], res["first"]["tokens"]
    score = _scorer(model)
    tf_agree, nll, nll_full, probs = [], [], [], []
    for p, c, sk in zip(prompts, full, skip_sets):
        keep = np.ones(model.num_layers, bool)
        keep[sk] = False
        lp, am = score(params, jnp.asarray([p]), jnp.asarray([c]), jnp.asarray(keep))
        lp0, _ = score(params, jnp.asarray([p]), jnp.asarray([c]), jnp.ones(model.num_layers, bool))
        tf_agree.append(float(np.mean(np.asarray(am)[0] == np.asarray(c))))
        nll.append(float(-np.mean(np.asarray(lp))))
        nll_full.append(float(-np.mean(np.asarray(lp0))))
        probs.append(np.asarray(keep_prob(rs.params, features(model, params, np.asarray([p]), np.asarray([len(p)]))))[0]
                     .round(3).tolist())
    # control: as many layers, drawn at random from layers 1 .. L-2 (3 draws per prompt), same scorer
    rng = np.random.default_rng(0)
    rnd_agree, rnd_nll = [], []
    for p, c, sk in zip(prompts, full, skip_sets):
        for _ in range(3):
            keep = np.ones(model.num_layers, bool)
            keep[rng.choice(np.arange(1, model.num_layers - 1), len(sk), replace=False)] = False
            lp, am = score(params, jnp.asarray([p]), jnp.asarray([c]), jnp.asarray(keep))
            rnd_agree.append(float(np.mean(np.asarray(am)[0] == np.asarray(c))))
            rnd_nll.append(float(-np.mean(np.asarray(lp))))
    match = [float(np.mean(np.asarray(a) == np.asarray(b))) for a, b in zip(full, fst)]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n) for a, b in zip(full, fst)]
    out = {"threshold": thr, "prompts": len(prompts), "new_tokens": n, "num_layers": model.num_layers,
           "skip_sets": skip_sets, "layers_skipped_mean": float(np.mean([len(s) for s in skip_sets])),
           "agree_teacher_forced": float(np.mean(tf_agree)), "agree_free_running": float(np.mean(match)),
           "matching_prefix_mean": float(np.mean(prefix)), "nll": float(np.mean(nll)),
           "nll_full": float(np.mean(nll_full)), "keep_prob": probs,
           "random_agree_teacher_forced": float(np.mean(rnd_agree)), "random_nll": float(np.mean(rnd_nll)),
           "speedup": ratio(res, "first", "greedy"), "timing": strip_tokens(res)}
    print(f"[{cell}] skipped {out['layers_skipped_mean']:.2f} layers, agree tf {out['agree_teacher_forced']:.3f} "
          f"free {out['agree_free_running']:.3f}, nll {out['nll']:.3f} (full {out['nll_full']:.3f}), "
          f"speed {out['speedup']['median']:.2f}x", flush=True)
    return out


def markdown(rec):
    where = ("a loaded shared machine (see the load average above)" if rec.get("loaded") else
             "this shared machine (load average above)")
    lines = ["FiRST is LOSSY: agreement < 1 means other text than greedy. Speed is measured on " + where +
             ": a ratio from the same repetitions, not an absolute claim.", "",
             "| threshold | layers skipped (mean of L) | agreement teacher-forced | agreement free-running | "
             "matching prefix | NLL of greedy text (full) | random same-count: agreement tf / NLL | greedy tok/s | "
             "FiRST tok/s | speed vs greedy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell in rec["cells_order"]:
        r = runner.result(rec, cell)
        sp = r["speedup"]
        row = [r["threshold"], f"{r['layers_skipped_mean']:.2f} of {r['num_layers']}",
               f"{r['agree_teacher_forced']:.3f}", f"{r['agree_free_running']:.3f}",
               f"{r['matching_prefix_mean']:.1f} / {r['new_tokens']}", f"{r['nll']:.3f} ({r['nll_full']:.3f})",
               f"{r['random_agree_teacher_forced']:.3f} / {r['random_nll']:.3f}",
               *(f"{r['timing'][k]['tok_s']:.1f}" for k in ("greedy", "first")),
               f"{sp['median']:.2f}x [{sp['min']:.2f}, {sp['max']:.2f}]"]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    lines += ["", "Skip sets per prompt:", ""]
    for cell in rec["cells_order"]:
        lines.append(f"* {cell}: {runner.result(rec, cell)['skip_sets']}")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    runner.run_experiment("first_table", cfg, [f"t{t:g}" for t in cfg.thresholds], lambda c: measure_cell(cfg, c),
                          opts=opts, title="FiRST router-selected layers (issue 21, lossy): layers skipped vs "
                          "agreement, NLL and speed (batch 1, f32)", markdown=markdown)


if __name__ == "__main__":
    main()
