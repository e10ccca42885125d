"""Greedy throughput of two jaxdec versions, interleaved in one run: the checkout against a base commit.

The refactor issues ask that a change of shared code costs no speed: this script puts the base commit in
a `git worktree`, starts one worker process per version (each imports jaxdec from its own tree and loads
the default model once per weight kind), and then times the same greedy generation in both, alternating
which goes first, repetition after repetition. The result is the median of per-repetition speed ratios
(new / base, > 1 = the checkout is faster) for each weight kind and batch size, with the spread, and a
check that both versions produced the same tokens.

    python experiments/bench_versions.py --base 9435ce2              # f32 and q, batch 1 and 8, 64 tokens
    python experiments/bench_versions.py --base HEAD~3 --new-tokens 32 --reps 5
    python experiments/bench_versions.py --base HEAD~1 --smoke       # f32, batch 1, 4 tokens, to a temp dir

Runs through experiments/runner.py: one cell per (weights, batch), each interleaving base and new within
its repetitions; both resolved commits are part of the cells' identity (a new commit or base is refused
unless --fresh). Writes ``experiments/results/bench_versions.{json,md}`` with the command, both commits and
the load average before and after (a run whose load exceeded the core count is flagged in the results).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)
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


@dataclasses.dataclass(frozen=True)
class Config:
    base: str = dataclasses.field(default="", metadata={"help": "base commit (required; a worktree is made "
                                                                "under /tmp)"})
    weights: tuple[str, ...] = dataclasses.field(default=("f32", "q"), metadata={"choices": ["f32", "q"]})
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 64
    reps: int = dataclasses.field(default=7, metadata={"help": ">= 5 interleaved repetitions"})


SMOKE = Config(weights=("f32",), batches=(1,), new_tokens=4, reps=5)


def markdown(rec):
    c = idt = rec["config"]
    lines = [f"jaxdec {idt['new'][:10]} vs base {idt['base'][:10]}: greedy speed, interleaved (base and new "
             f"alternate which goes first) in each cell; {c['new_tokens']} new tokens, {c['reps']} repetitions. "
             "Ratio = base seconds / new seconds per repetition (> 1: the checkout is faster).", "",
             "| weights / batch | median speed ratio new/base | min | max | same tokens |",
             "| --- | --- | --- | --- | --- |"]
    for key in rec["cells_order"]:
        r = runner.result(rec, key)
        if r is not None:
            lines.append(f"| {key} | {r['median_ratio']:.3f} | {r['min_ratio']:.3f} | {r['max_ratio']:.3f} | "
                         f"{r['same_tokens']} |")
    if rec.get("loaded"):
        lines += ["", "**FLAGGED: the load average exceeded the core count; do not quote these ratios.**"]
    return lines


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    ap = opts.parser
    if not cfg.base:
        ap.error("--base REV is required")
    if cfg.reps < 5 and not opts.smoke:
        ap.error("--reps must be >= 5")
    if any(b < 1 or b > len(PROMPTS) for b in cfg.batches):
        ap.error(f"--batches must be in [1, {len(PROMPTS)}]")
    base = git("rev-parse", cfg.base)
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    new = head + (" + uncommitted changes" if dirty else "")
    tree = f"/tmp/jaxdec-base-{base[:10]}"
    if not os.path.isdir(tree):
        git("worktree", "add", "--detach", tree, base)
    workers = {}

    def measure(cell):
        w, b = cell.split("/b")
        b = int(b)
        if not workers:  # started once, on the first cell that needs them
            workers.update(base=Worker(tree), new=Worker(runner.ROOT))
        outs = {k: wk.run(weights=w, batch=b, new=cfg.new_tokens) for k, wk in workers.items()}  # warm-up
        times = {"base": [], "new": []}
        for r in range(cfg.reps):
            order = ("base", "new") if r % 2 == 0 else ("new", "base")
            for k in order:
                times[k].append(workers[k].run(weights=w, batch=b, new=cfg.new_tokens)["seconds"])
        import numpy as np
        ratio = np.asarray(times["base"]) / np.asarray(times["new"])  # speed of new relative to base
        return {"median_ratio": float(np.median(ratio)), "min_ratio": float(ratio.min()),
                "max_ratio": float(ratio.max()), "base_s": times["base"], "new_s": times["new"],
                "same_tokens": outs["base"]["tokens"] == outs["new"]["tokens"]}

    cells = [f"{w}/b{b}" for w in cfg.weights for b in cfg.batches]
    try:
        rec = runner.run_experiment("bench_versions", cfg, cells, measure, opts=opts, markdown=markdown,
                                    identity={"base": base, "new": new},
                                    title=f"jaxdec {new[:10]} vs base {base[:10]}: greedy speed, interleaved")
    finally:
        for wk in workers.values():
            wk.close()
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
