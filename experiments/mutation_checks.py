"""Deliberately broken variants must FAIL the checks that guard them (issue 13's acceptance).

Each case runs one test in a fresh pytest process with one mutation applied (by
`experiments/mutation_plugin.py`, or by environment variables) and records whether it failed. A case
"passes" this script when the mutated test FAILS (or, for the opt-out case, is skipped). ``--controls``
also runs every test unmutated (it must pass).

Runs through experiments/runner.py: one cell per case (``control/NAME`` for a control), so an interrupted
run resumes; ``--only CASE ...`` always re-records those cases and keeps the others; a full rerun after a
code change needs ``--fresh`` (the cells do not know the code changed).
Writes experiments/results/mutation_checks.{json,md} and the plain-text log
experiments/results/mutation_checks.log (exit status 1 when some case did not behave).

    python experiments/mutation_checks.py [--controls] [--only NAME ...] [--fresh]
    python experiments/mutation_checks.py --smoke     # one case (frozen_counter), written to a temp dir
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)

# name: (test node id, extra environment, what the broken variant is, expected outcome)
CASES = {
    "silent_drafter": ("tests/test_speculative.py::test_toy_exact_all_drafters[pld]", {"JAXDEC_MUTATION": "silent_drafter"},
                       "PromptLookupDrafter.propose marks every draft node invalid (a drafter that never proposes)", "fail"),
    "wrong_key_fold": ("tests/test_sampling.py::test_generate_sampling_joint_matches_numpy_reference",
                       {"JAXDEC_MUTATION": "wrong_key_fold"},
                       "row_keys_for_step ignores the token index (every token of a row uses one key)", "fail"),
    "forced_xla_fallback": ("tests/test_quant.py::test_model_decode_step_runs_the_native_kernels",
                            {"JAXDEC_QMATMUL": "xla"}, "JAXDEC_QMATMUL=xla: the model's matmuls take the XLA fallback",
                            "fail"),
    "missing_kernel": ("tests/test_quant.py::test_model_decode_step_runs_the_native_kernels",
                       {"CXX": "/nonexistent/c++", "JAXDEC_CACHE_DIR": "<tmp>"},
                       "no C++ compiler and an empty kernel cache: the native kernels cannot be built", "fail"),
    "missing_kernel_opt_out": ("tests/test_quant.py::test_model_decode_step_runs_the_native_kernels",
                               {"CXX": "/nonexistent/c++", "JAXDEC_CACHE_DIR": "<tmp>", "JAXDEC_ALLOW_NO_NATIVE": "1"},
                               "as missing_kernel, with the explicit opt-out", "skip"),
    "frozen_counter": ("tests/test_loop.py::test_trace_counter_moves_when_a_shape_changes",
                       {"JAXDEC_MUTATION": "frozen_counter"}, "loop.count_trace does nothing (a frozen trace counter)",
                       "fail"),
    "no_residual_top_p": ("tests/test_speculative_sampling.py::test_engine_joint_top_k_top_p_draft_model",
                          {"JAXDEC_MUTATION": "no_residual"},
                          "speculative sampling verifier draws corrections from p, not the residual (top-k + top-p)",
                          "fail"),
}


def run_case(node, env_extra):
    env = dict(os.environ)
    tmp = None
    for k, v in env_extra.items():
        if v == "<tmp>":
            tmp = tmp or tempfile.mkdtemp(prefix="jaxdec-mut-")
            v = tmp
        env[k] = v
    env["PYTHONPATH"] = os.path.join(ROOT, "experiments") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", node, "-q", "-p", "no:cacheprovider", "-p", "mutation_plugin", "-rs",
           "-m", "slow or not slow"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip().splitlines()
    outcome = {0: "pass", 1: "fail"}.get(r.returncode, f"rc={r.returncode}")
    if r.returncode == 0 and any(" skipped" in line for line in out[-3:]) and not any(" passed" in l for l in out[-3:]):
        outcome = "skip"
    return outcome, time.time() - t0, out


@dataclasses.dataclass(frozen=True)
class Config:
    controls: bool = runner.select(False, "also run each test unmutated (it must pass)")
    only: tuple[str, ...] = runner.select((), "only these cases (default all): " + ", ".join(CASES))


SMOKE = Config(only=("frozen_counter",))


def measure(cell):
    control = cell.startswith("control/")
    name = cell.split("/", 1)[1] if control else cell
    node, env_extra, what, expected = CASES[name]
    if control:
        expected = "pass"
    outcome, secs, out = run_case(node, {} if control else env_extra)
    key = [l for l in out if l.startswith("E  ") or "SKIPPED" in l or "Error" in l][:4] + out[-1:]
    return {"case": name, "control": control, "node": node, "env": {} if control else env_extra, "what": what,
            "expected": expected, "outcome": outcome, "ok": outcome == expected, "seconds": round(secs, 1),
            "key_lines": [l[:200] for l in key]}


def log_lines(rec) -> list:
    """The plain-text log (experiments/results/mutation_checks.log) from the stored cells."""
    lines = ["# mutation checks: broken variants must fail their checks", f"command: {rec['command']}",
             f"date: {rec.get('finished')}", f"commit: {rec['git']['commit']}"
             + (" (uncommitted changes)" if rec["git"].get("dirty") else ""),
             f"machine: {rec['machine'].get('cpu')} {rec['machine'].get('cores')} cores", ""]
    for key in rec["cells_order"]:
        r = runner.result(rec, key)
        if r is None:
            continue
        if r["control"]:
            lines.append(f"[{'OK' if r['ok'] else 'BAD'}] control {r['case']}: {r['node']} unmutated -> {r['outcome']} "
                         f"({r['seconds']:.0f} s)")
            continue
        env_s = " ".join(f"{k}={v}" for k, v in r["env"].items())
        lines.append(f"[{'OK' if r['ok'] else 'BAD'}] {r['case']}: {r['what']}")
        lines.append(f"    {env_s} python -m pytest {r['node']} -p mutation_plugin -> {r['outcome']} (expected "
                     f"{r['expected']}, {r['seconds']:.0f} s)")
        lines += ["    | " + l for l in r["key_lines"]]
    ok = all(c["result"]["ok"] for c in rec["cells"].values())
    lines += ["", runner.benchlib.LoadMonitor.markdown_of(rec.get("load")).strip().strip("*"),
              f"RESULT: {'every broken variant was caught' if ok else 'SOME CASE DID NOT BEHAVE'}"]
    return lines


def markdown(rec):
    lines = ["| case | what | mutated test | expected | outcome | ok |", "| --- | --- | --- | --- | --- | --- |"]
    for key in rec["cells_order"]:
        r = runner.result(rec, key)
        if r is not None:
            lines.append(f"| {key} | {'unmutated' if r['control'] else r['what']} | `{r['node']}` | {r['expected']} | "
                         f"{r['outcome']} | {'OK' if r['ok'] else 'BAD'} |")
    return lines + ["", "Log: mutation_checks.log"]


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    unknown = [n for n in cfg.only if n not in CASES]
    if unknown:
        opts.parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    cells = []
    for name in cfg.only or CASES:
        if cfg.controls and name != "missing_kernel_opt_out":
            cells.append(f"control/{name}")
        cells.append(name)

    def one(cell):
        r = measure(cell)
        print(f"[{'OK' if r['ok'] else 'BAD'}] {cell}: {r['outcome']} (expected {r['expected']}, {r['seconds']:.0f} s)",
              flush=True)
        return r

    rec = runner.run_experiment("mutation_checks", cfg, cells, one, opts=opts, markdown=markdown,
                                title="Mutation checks: broken variants must fail their checks",
                                depends=lambda c: [], redo=cells if cfg.only else ())
    lines = log_lines(rec)
    runner.atomic_write(os.path.join(opts.out_dir or runner.RESULTS, "mutation_checks.log"), "\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))
    return 0 if all(runner.result(rec, c)["ok"] for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
