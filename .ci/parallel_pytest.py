"""Runs the test files in several pytest processes, a few at a time, and prints one closing line.

Why processes: one process over the whole suite accumulated enough compiled XLA programs to crash inside
XLA's compiler (a segfault in test_search_toy after ~380 tests, twice, not reproducible in a fresh
process); groups of ~100 tests stay far from that.

Why several at a time: a large part of a test's time here is tracing and compiling (one thread) and
Python; two processes on this 2-core machine overlap those. Files are packed into groups by their
measured durations (tests/data/ci_durations.json, per file, written by this script with
--write-durations; a file not listed counts as DEFAULT_SECONDS), longest group first, and each free slot
takes the next group. Files that share an expensive session fixture (the peer's runs) go to the same
group when that balances: the packer is greedy by duration only, which keeps it simple and predictable.

Why a shared compilation cache: the groups are separate processes, so a program that several groups
compile (the default model's decode step at a common shape, say) was compiled once per group. The runner
points JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR) at a fresh folder of this run,
shared by its groups and the CLI subprocesses their tests start, and removes it at the end: every test
still traces and runs its program; only XLA's compile of an identical program is reused. Eviction is on
(a size bound), which makes JAX take a file lock around each read and write, so two groups never read a
half-written entry. A JAX_COMPILATION_CACHE_DIR already set is left alone (and not removed).

Environment: JAXDEC_CI_JOBS (processes at once; default: the number of cores, at most 2 and at least 1),
JAXDEC_CI_GROUPS (number of groups; default 6), JAXDEC_CI_WRITE_DURATIONS=1 (the same as
--write-durations, for runs started through `make test`), JAXDEC_CI_COMPILE_CACHE=0 (no shared
compilation cache).
Exit status: 0 when every group passed; 1 when any test failed or errored, when any group crashed or
collected no tests (pytest's exit code 5 is a failure here, never a silent pass).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATIONS = os.path.join(ROOT, "tests", "data", "ci_durations.json")
DEFAULT_SECONDS = 30.0


def positive_int_env(name, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        sys.exit(f"ci: {name} must be a positive integer, got {raw!r}")
    return value


def pack(files, seconds, groups):
    """Greedy longest-first packing of files into `groups` bins of similar total seconds."""
    bins = [[0.0, []] for _ in range(min(groups, len(files)))]
    for f in sorted(files, key=lambda f: (-seconds.get(f, DEFAULT_SECONDS), f)):
        b = min(bins, key=lambda b: b[0])
        b[0] += seconds.get(f, DEFAULT_SECONDS)
        b[1].append(f)
    bins.sort(key=lambda b: -b[0])
    return [(est, sorted(fs)) for est, fs in bins]


def per_file_seconds(xml_paths):
    """Seconds per test file from pytest's junit files (test time incl. fixture set-up it triggered)."""
    out = {}
    for path in xml_paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            mod = case.get("classname", "").split(".")
            # classname is "test_x" or "test_x.TestClass"; files live in tests/
            name = next((m for m in mod if m.startswith("test_")), None)
            if name:
                key = f"tests/{name}.py"
                out[key] = out.get(key, 0.0) + float(case.get("time", 0.0))
    return out


def totals(xml_paths):
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for path in xml_paths:
        for suite in ET.parse(path).getroot().iter("testsuite"):
            for k in tot:
                tot[k] += int(suite.get(k, 0))
    return tot


CACHE_MAX_BYTES = 16 << 30  # a bound only so that JAX locks the cache's files (a whole run writes tens of MB)


def group_env(environ, out: str) -> dict:
    """The groups' environment: `environ` plus a compilation cache folder under `out` (see the module
    docstring), unless the caller set one or turned it off with JAXDEC_CI_COMPILE_CACHE=0."""
    env = dict(environ)
    setting = env.get("JAXDEC_CI_COMPILE_CACHE", "1")
    if setting not in ("0", "1"):
        sys.exit(f"ci: JAXDEC_CI_COMPILE_CACHE must be 0 or 1, got {setting!r}")
    if setting == "1" and not env.get("JAX_COMPILATION_CACHE_DIR"):
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(out, "xla-cache")
        env.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(CACHE_MAX_BYTES))
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-durations", action="store_true",
                    help=f"rewrite {os.path.relpath(DURATIONS, ROOT)} from this run's junit times")
    ap.add_argument("--dry-run", action="store_true", help="print the groups and exit")
    ap.add_argument("files", nargs="*", help="test files (default: tests/test_*.py)")
    args = ap.parse_args(argv)

    jobs = positive_int_env("JAXDEC_CI_JOBS", max(1, min(2, os.cpu_count() or 1)))
    groups = positive_int_env("JAXDEC_CI_GROUPS", 6)
    os.chdir(ROOT)
    files = sorted(args.files or glob.glob("tests/test_*.py"))
    if not files:
        print("ci: no test files found: failing", file=sys.stderr)
        return 1
    seconds = {}
    if os.path.exists(DURATIONS):
        with open(DURATIONS) as f:
            seconds = json.load(f)["seconds"]
    plan = pack(files, seconds, groups)
    print(f"ci: {len(files)} test files in {len(plan)} groups, {jobs} at a time "
          f"(estimated {sum(e for e, _ in plan) / 60:.1f} min of test time)", flush=True)
    for i, (est, fs) in enumerate(plan):
        print(f"ci: group {i}: ~{est / 60:.1f} min, {len(fs)} files: {' '.join(os.path.basename(f) for f in fs)}",
              flush=True)
    if args.dry_run:
        return 0

    out = tempfile.mkdtemp(prefix="jaxdec-ci-")
    env = group_env(os.environ, out)
    if env.get("JAX_COMPILATION_CACHE_DIR") != os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        print(f"ci: groups share a compilation cache in {env['JAX_COMPILATION_CACHE_DIR']} (removed at the end)",
              flush=True)
    pending = list(enumerate(plan))
    running = {}
    status = 0
    t_start = time.time()
    while pending or running:
        while pending and len(running) < jobs:
            i, (_, fs) = pending.pop(0)
            log = open(os.path.join(out, f"group{i}.log"), "w")
            cmd = [sys.executable, "-m", "pytest", *fs, "-q", "-p", "no:cacheprovider",
                   f"--junitxml={out}/group{i}.xml"]
            running[i] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
        time.sleep(1.0)
        for i in [i for i, (p, _, _) in running.items() if p.poll() is not None]:
            p, log, t0 = running.pop(i)
            log.close()
            rc = p.returncode
            print(f"\n===== group {i}: exit {rc}, {(time.time() - t0) / 60:.1f} min =====", flush=True)
            with open(os.path.join(out, f"group{i}.log")) as f:
                sys.stdout.write(f.read())
            sys.stdout.flush()
            if rc == 5:
                print(f"ci: pytest collected no tests in group {i}: failing", file=sys.stderr)
                status = 1
            elif rc != 0:
                status = 1
            if not os.path.exists(os.path.join(out, f"group{i}.xml")):
                print(f"ci: group {i} wrote no junit file (crashed?): failing", file=sys.stderr)
                status = 1
    xmls = sorted(glob.glob(os.path.join(out, "group*.xml")))
    tot = totals(xmls)
    measured = per_file_seconds(xmls)
    shutil.rmtree(out, ignore_errors=True)
    failed = tot["failures"] + tot["errors"]
    passed = tot["tests"] - failed - tot["skipped"]
    print(f"ci: wall {(time.time() - t_start) / 60:.1f} min, {jobs} processes at a time, {len(plan)} groups")
    if args.write_durations or os.environ.get("JAXDEC_CI_WRITE_DURATIONS") == "1":
        with open(DURATIONS, "w") as f:
            json.dump({"note": "seconds per test file from one CI run's junit times (.ci/parallel_pytest.py "
                               "--write-durations); used only to balance the groups",
                       "seconds": {k: round(v, 1) for k, v in sorted(measured.items())}}, f, indent=1)
            f.write("\n")
    print(f"ci: {passed} passed, {failed} failed, {tot['skipped']} skipped")
    if tot["tests"] == 0:
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
