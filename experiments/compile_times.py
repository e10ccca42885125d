"""First-call compile time of each decoder (issue 17's table): every decoder runs through the CLI's own code
(`jaxdec.cli.main`) twice on the same prompt in a fresh process, with no persistent compilation cache; the
first call compiles (and runs), the second only runs, so compile ≈ first - second. The model load is timed
separately (`load_model` first, which the CLI then reuses).

Cells: one per decoder (argv after ``generate``); each writes load, first-call, steady-call and estimated
compile seconds. Goal: ≤ 10 s per decoder on this machine (the load average is recorded; a loaded run is flagged).

    python experiments/compile_times.py [--decoders greedy pld medusa] [--weights q] [--new-tokens 16]
    python experiments/compile_times.py --smoke
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DECODERS = {  # name -> generate flags
    "greedy": ["--method", "greedy"],
    "sample-top-p": ["--method", "sample", "--temperature", "0.7", "--top-p", "0.9"],
    "beam4": ["--method", "beam", "--num-beams", "4"],
    "pld": ["--method", "speculative", "--drafter", "pld"],
    "recycling": ["--method", "speculative", "--drafter", "recycling"],
    "swift": ["--method", "speculative", "--drafter", "swift"],
    "medusa": ["--method", "speculative", "--drafter", "medusa"],
    "eagle": ["--method", "speculative", "--drafter", "eagle"],
    "regex-greedy": ["--method", "greedy", "--regex", "[A-Z][a-z]+( [a-z]+)*\\."],
}

CHILD = r"""
import io, json, sys, time, contextlib
sys.path.insert(0, sys.argv[1])
from jaxdec import cli
argv = json.loads(sys.argv[2])
weights = argv[argv.index("--weights") + 1]
t0 = time.perf_counter(); cli.load_model("smollm2-135m", weights); load = time.perf_counter() - t0
times = []
for _ in range(2):
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["generate"] + argv)
    times.append(time.perf_counter() - t0)
    if rc not in (0, None):
        raise SystemExit(f"exit {rc}")
print("RESULT " + json.dumps({"load_s": load, "first_s": times[0], "steady_s": times[1]}))
"""


@dataclasses.dataclass(frozen=True)
class Config:
    decoders: tuple[str, ...] = runner.select(tuple(DECODERS), "decoders (cells): " + ", ".join(DECODERS))
    weights: str = dataclasses.field(default="q", metadata={"choices": ["f32", "q"]})
    new_tokens: int = 16
    prompt: str = "Write a Python function that returns the n-th Fibonacci number."


SMOKE = Config(decoders=("greedy",), new_tokens=2)


def measure(cfg, name: str) -> dict:
    argv = DECODERS[name] + ["--prompt", cfg.prompt, "--chat", "--weights", cfg.weights,
                             "--max-new-tokens", str(cfg.new_tokens), "--quiet"]
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", CHILD, ROOT, json.dumps(argv)], capture_output=True, text=True,
                         env=env, timeout=1800)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    r["compile_s"] = max(0.0, r["first_s"] - r["steady_s"])
    r["argv"] = argv
    print(f"{name}: compile ≈ {r['compile_s']:.1f} s (first {r['first_s']:.1f} s, steady {r['steady_s']:.2f} s)",
          flush=True)
    return r


def markdown(rec):
    c = rec["config"]
    lines = [f"weights={c['weights']}, {c['new_tokens']} new tokens, one chat prompt; each decoder in a fresh "
             "process through the CLI's code, no persistent compilation cache; compile ≈ first call - second "
             "call (the model load timed apart). Goal: ≤ 10 s.", "",
             "| decoder | compile ≈ s | first call s | steady call s | model load s | ≤ 10 s |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name in rec["cells_order"]:
        r = runner.result(rec, name)
        if r:
            lines.append(f"| {name} | {r['compile_s']:.1f} | {r['first_s']:.1f} | {r['steady_s']:.2f} | "
                         f"{r['load_s']:.1f} | {'yes' if r['compile_s'] <= 10 else 'no'} |")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    bad = [d for d in cfg.decoders if d not in DECODERS]
    if bad:
        raise SystemExit(f"unknown --decoders {bad}; known: {', '.join(DECODERS)}")
    rec = runner.run_experiment("compile_times", cfg, list(cfg.decoders), lambda cell: measure(cfg, cell), opts=opts,
                                markdown=markdown, title="First-call compile time per decoder (issue 17)")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
