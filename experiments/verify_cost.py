"""What a verify block of T tokens costs against one token (issue 17): `measure_cost_curve` (one model call over T
new tokens with a tree mask, the cache holding 128 tokens, batch 1, the updated cache returned) for every
weights variant, and the same for a base commit checked out with `git worktree`, in one run.

Variants (cells): ``f32`` (float32 weights, native float32 kernel up to 32 rows), ``q`` (GGUF Q4_1/Q8_0 blocks,
exact native kernel), ``q8`` (the same blocks with int8 activations: LOSSY, opt-in, AVX512-VNNI), ``q-2threads``
(q with every product on XLA's thread pool: the thread policy re-measured), ``q8-2threads``. Each variant runs in its own
process, ``--rounds`` times in alternation with the others (so load drifts hit every variant alike); the
minimum per T over rounds is kept (the least disturbed by other processes), the median too.
``--base COMMIT`` adds ``base-<variant>`` cells for the variants that commit has (its own code, its own
kernel build), measured in the same alternation.

Writes experiments/results/verify_cost.{json,md} with the command, commit, machine and load average.

    python experiments/verify_cost.py [--base a1ac206] [--variants f32 q q8] [--sizes 1 2 4 8 16] [--rounds 2]
    python experiments/verify_cost.py --smoke
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {  # name -> (jaxdec.load kwargs, extra environment)
    "f32": ({"weights": "f32"}, {}),
    "q": ({"weights": "q"}, {}),
    "q8": ({"weights": "q", "activations": "q8"}, {}),
    "q-2threads": ({"weights": "q"}, {"JAXDEC_QMATMUL_MIN_PARALLEL": "0"}),
    "q8-2threads": ({"weights": "q", "activations": "q8"}, {"JAXDEC_QMATMUL_MIN_PARALLEL": "0"}),
}

# run in a fresh process with the tree under test first on sys.path (a base commit's worktree or this one)
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jaxdec
from jaxdec.speculative.calibrate import measure_cost_curve
kw, sizes, reps = json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
m = jaxdec.load(**kw)
c = measure_cost_curve(m.model, m.params, sizes=sizes, batch=1, context=128, reps=reps)
print("RESULT " + json.dumps({"seconds": c["seconds"], "seconds_median": c["seconds_median"]}))
"""


@dataclasses.dataclass(frozen=True)
class Config:
    variants: tuple[str, ...] = dataclasses.field(default=("f32", "q", "q8", "q-2threads", "q8-2threads"), metadata={
        "help": f"weights variants: {', '.join(VARIANTS)}"})
    sizes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
    reps: int = 7
    rounds: int = dataclasses.field(default=2, metadata={"help": "alternating processes per variant"})
    base: str = dataclasses.field(default="", metadata={"help": "a commit to measure beside this tree "
                                                                "(git worktree); empty: none"})


SMOKE = Config(variants=("q", "q8"), sizes=(1, 2), reps=2, rounds=1)


def _child(tree: str, variant: str, cfg) -> dict:
    kw, env_extra = VARIANTS[variant]
    env = dict(os.environ, **env_extra)
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", CHILD, tree, json.dumps(kw), json.dumps(list(cfg.sizes)),
                          str(cfg.reps)], capture_output=True, text=True, env=env, timeout=3600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{variant} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _base_tree(commit: str) -> str:
    d = os.path.join(tempfile.gettempdir(), f"jaxdec-verify-cost-base-{commit}")
    if not os.path.isdir(d):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", d, commit], check=True,
                       capture_output=True)
    return d


def measure(cfg) -> dict:
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown --variants {bad}; known: {', '.join(VARIANTS)}")
    jobs = [(v, ROOT, v) for v in cfg.variants]
    if cfg.base:
        tree = _base_tree(cfg.base)
        has_q8 = "ACTIVATIONS" in open(os.path.join(tree, "jaxdec", "models", "registry.py")).read()
        jobs += [(f"base-{v}", tree, v) for v in cfg.variants if has_q8 or "activations" not in VARIANTS[v][0]]
    runs: dict = {name: [] for name, _, _ in jobs}
    for r in range(cfg.rounds):
        for name, tree, v in (jobs if r % 2 == 0 else jobs[::-1]):
            print(f"round {r + 1}/{cfg.rounds}: {name}", flush=True)
            runs[name].append(_child(tree, v, cfg))
    rows = {}
    for name, rs in runs.items():
        secs = {t: min(x["seconds"][str(t)] for x in rs) for t in cfg.sizes}
        med = {t: sorted(x["seconds_median"][str(t)] for x in rs)[len(rs) // 2] for t in cfg.sizes}
        rows[name] = {"ms": {t: 1e3 * s for t, s in secs.items()}, "median_ms": {t: 1e3 * s for t, s in med.items()},
                      "relative": {t: secs[t] / secs[1] for t in cfg.sizes}}
    return {"rows": rows, "base": cfg.base}


def markdown(rec):
    c, r = rec["config"], runner.result(rec, "curve")
    sizes = [int(t) for t in c["sizes"]]
    lines = [f"One model call over T new tokens (tree mask), batch 1, cache holding 128 tokens; min over "
             f"{c['rounds']} alternating processes x {c['reps']} repetitions; cost relative to T = 1, with the "
             f"T = 1 time. Base commit: {c['base'] or 'none'}.", "",
             "| variant | T=1 ms | " + " | ".join(f"T={t}" for t in sizes[1:]) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in sizes[1:]) + " |"]
    for name, row in (r or {"rows": {}})["rows"].items():
        rel = {int(k): v for k, v in row["relative"].items()}
        ms = {int(k): v for k, v in row["ms"].items()}
        lines.append(f"| {name} | {ms[sizes[0]]:.1f} | " + " | ".join(f"{rel[t]:.2f}x" for t in sizes[1:]) + " |")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    rec = runner.run_experiment("verify_cost", cfg, ["curve"], lambda cell: measure(cfg), opts=opts,
                                markdown=markdown, title="Verify-block cost curve (issue 17)")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
