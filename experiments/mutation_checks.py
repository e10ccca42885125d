"""Deliberately broken variants must FAIL the checks that guard them (issue 13's acceptance).

Each case runs one test in a fresh pytest process with one mutation applied (by
`experiments/mutation_plugin.py`, or by environment variables) and records whether it failed. A case
"passes" this script when the mutated test FAILS (or, for the opt-out case, is skipped). ``--controls``
also runs every test unmutated (it must pass). Writes experiments/results/mutation_checks.log.

    python experiments/mutation_checks.py [--controls] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--controls", action="store_true", help="also run each test unmutated (must pass)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "mutation_checks.log"))
    args = ap.parse_args()
    names = args.only or list(CASES)
    load = benchlib.LoadMonitor()
    lines = [f"# mutation checks: broken variants must fail their checks",
             f"command: python experiments/mutation_checks.py {' '.join(sys.argv[1:])}".rstrip(),
             f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"commit: {benchlib.git_commit()}", f"machine: {platform.machine()} {os.cpu_count()} cores", ""]
    all_ok = True
    for name in names:
        node, env_extra, what, expected = CASES[name]
        if args.controls and name != "missing_kernel_opt_out":
            outcome, secs, _ = run_case(node, {})
            ok = outcome == "pass"
            all_ok &= ok
            lines.append(f"[{'OK' if ok else 'BAD'}] control {name}: {node} unmutated -> {outcome} ({secs:.0f} s)")
        outcome, secs, out = run_case(node, env_extra)
        ok = outcome == expected
        all_ok &= ok
        env_s = " ".join(f"{k}={v}" for k, v in env_extra.items())
        lines.append(f"[{'OK' if ok else 'BAD'}] {name}: {what}")
        lines.append(f"    {env_s} python -m pytest {node} -p mutation_plugin -> {outcome} (expected {expected}, "
                     f"{secs:.0f} s)")
        key = [l for l in out if l.startswith("E  ") or "SKIPPED" in l or "Error" in l][:4] + out[-1:]
        lines += ["    | " + l[:200] for l in key]
        print("\n".join(lines[-(len(key) + 2):]), flush=True)
    lines += ["", load.summary_line(), f"RESULT: {'every broken variant was caught' if all_ok else 'SOME CASE DID NOT BEHAVE'}"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
