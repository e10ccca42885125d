"""Greedy throughput of two jaxdec versions, interleaved in one run: the checkout against a base commit.

The refactor issues ask that a change of shared code costs no speed: this script puts the base commit in
a `git worktree`, starts one worker process per version (each imports jaxdec from its own tree and loads
the default model once per weight kind), and then times the same greedy generation in both, alternating
which goes first, repetition after repetition. The result is the median of per-repetition speed ratios
(new / base, > 1 = the checkout is faster) for each weight kind and batch size, with the spread, and a
check that both versions produced the same tokens.

    python experiments/bench_versions.py --base 9435ce2              # f32 and q, batch 1 and 8, 64 tokens
    python experiments/bench_versions.py --base HEAD~3 --quick

Writes ``experiments/results/bench_versions.{json,md}`` with the command, both commits and the load average
before and after (a run whose load exceeded the core count is flagged in the results).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (load average before/after, flags a loaded machine)
RESULTS = os.path.join(ROOT, "experiments", "results")
from bench_greedy import PROMPTS  # noqa: E402 (the same eight chat prompts as the greedy benchmark)


# ------------------------------------------------------------------------------------------------ worker
def worker(root: str) -> None:
    """Serve timing requests (one JSON object per stdin line) with the jaxdec found under ``root``."""
    sys.path.insert(0, root)
    import jaxdec
    assert os.path.dirname(os.path.dirname(os.path.abspath(jaxdec.__file__))) == os.path.abspath(root), jaxdec.__file__
    loaded = {}
    tok = jaxdec.load().tokenizer
    ids = [tok.chat_ids(p) for p in PROMPTS]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        w = req["weights"]
        if w not in loaded:
            loaded[w] = jaxdec.load(weights=w)
        m = loaded[w]
        rows = ids[:req["batch"]]
        t = time.perf_counter()
        g = jaxdec.generate(m.model, m.params, rows, max_new_tokens=req["new"], stop_ids=())
        secs = time.perf_counter() - t
        print(json.dumps({"seconds": secs, "tokens": g.tokens}), flush=True)


class Worker:
    def __init__(self, root: str):
        env = dict(os.environ, PYTHONPATH=root)
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", root], cwd=root, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.p.stdout.readline())["ready"]

    def run(self, **req) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("worker died")
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


# ------------------------------------------------------------------------------------------------ driver
def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base commit (a worktree is made under /tmp)")
    ap.add_argument("--weights", nargs="+", default=["f32", "q"], choices=["f32", "q"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 5 repetitions")
    ap.add_argument("--out", default=os.path.join(RESULTS, "bench_versions"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if not a.base:
        ap.error("--base REV is required")
    new_tokens = a.new_tokens or (32 if a.quick else 64)
    reps = a.reps or (5 if a.quick else 7)
    if reps < 5:
        ap.error("--reps must be >= 5")
    if any(b < 1 or b > len(PROMPTS) for b in a.batches):
        ap.error(f"--batches must be in [1, {len(PROMPTS)}]")
    base = git("rev-parse", a.base)
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    tree = f"/tmp/jaxdec-base-{base[:10]}"
    if not os.path.isdir(tree):
        git("worktree", "add", "--detach", tree, base)
    load = benchlib.LoadMonitor()
    load0 = load.before
    t0 = time.time()
    workers = {"base": Worker(tree), "new": Worker(ROOT)}
    configs = [(w, b) for w in a.weights for b in a.batches]
    times = {f"{w}/b{b}": {"base": [], "new": []} for w, b in configs}
    same_tokens = {}
    try:
        for w, b in configs:  # warm-up: compile both versions' programs for every shape
            outs = {k: wk.run(weights=w, batch=b, new=new_tokens) for k, wk in workers.items()}
            same_tokens[f"{w}/b{b}"] = outs["base"]["tokens"] == outs["new"]["tokens"]
        for r in range(reps):
            for w, b in configs:
                order = ("base", "new") if r % 2 == 0 else ("new", "base")
                for k in order:
                    times[f"{w}/b{b}"][k].append(workers[k].run(weights=w, batch=b, new=new_tokens)["seconds"])
    finally:
        for wk in workers.values():
            wk.close()
    load1 = load.finish().after
    import numpy as np
    rows = {}
    for key, tv in times.items():
        ratio = np.asarray(tv["base"]) / np.asarray(tv["new"])  # speed of new relative to base
        rows[key] = {"median_ratio": float(np.median(ratio)), "min_ratio": float(ratio.min()),
                     "max_ratio": float(ratio.max()), "base_s": tv["base"], "new_s": tv["new"],
                     "same_tokens": same_tokens[key]}
    ncpu = os.cpu_count() or 1
    flagged = load.overloaded
    out = {"command": "python experiments/bench_versions.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "base": base, "new": head + (" + uncommitted changes" if dirty else ""), "new_tokens": new_tokens,
           "reps": reps, "load_before": load0, "load_after": load1, "cores": ncpu,
           "flagged_load": flagged, "load": load.record(), "wall_s": time.time() - t0, "results": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# jaxdec {out['new'][:10]} vs base {base[:10]}: greedy speed, interleaved in one run", "",
             f"Command: `{out['command']}`; {new_tokens} new tokens, {reps} repetitions; load average "
             f"{load0[0]:.2f} before, {load1[0]:.2f} after, {ncpu} cores.", ""]
    if flagged:
        lines += ["**FLAGGED: the load average exceeded the core count; do not quote these ratios.**", ""]
    lines += [load.markdown().strip(), ""]
    lines += ["| weights / batch | median speed ratio new/base | min | max | same tokens |", "| --- | --- | --- | --- | --- |"]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['median_ratio']:.3f} | {r['min_ratio']:.3f} | {r['max_ratio']:.3f} | "
                     f"{r['same_tokens']} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
