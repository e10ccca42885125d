"""The CI runner (.ci/parallel_pytest.py): groups balance, every group's result counts, and a group that
collects no tests or fails makes the whole run fail (pytest's exit code 5 is never a silent pass)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, ".ci", "parallel_pytest.py")

sys.path.insert(0, os.path.join(ROOT, ".ci"))
import parallel_pytest as pp  # noqa: E402


def test_pack_balances_and_keeps_every_file():
    secs = {"a": 100.0, "b": 60.0, "c": 50.0, "d": 40.0, "e": 10.0}
    plan = pp.pack(list(secs), secs, 2)
    assert sorted(f for _, fs in plan for f in fs) == sorted(secs)
    assert plan == [(140.0, ["a", "d"]), (120.0, ["b", "c", "e"])]  # longest first, each to the lighter bin
    assert max(e for e, _ in plan) <= 4 / 3 * sum(secs.values()) / 2  # the longest-first bound
    # more groups than files: one file per group, none empty
    assert all(fs for _, fs in pp.pack(["x", "y"], {}, 6))


def run_runner(tmp_path, files, jobs="2"):
    scratch = tmp_path / "scratch"  # the runner's own temporary folder goes here (and must be removed)
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, JAXDEC_CI_JOBS=jobs, JAXDEC_CI_GROUPS="2", TMPDIR=str(scratch))
    return subprocess.run([sys.executable, RUNNER, *files], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def write(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(body)
    return str(p)


def test_counts_every_group_and_fails_on_a_failing_test(tmp_path):
    ok = write(tmp_path, "test_ok.py", "def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    bad = write(tmp_path, "test_bad.py", "import pytest\n\ndef test_c():\n    assert 1 == 2\n\n"
                                          "@pytest.mark.skip(reason='x')\ndef test_d():\n    pass\n")
    r = run_runner(tmp_path, [ok, bad])
    last = r.stdout.strip().splitlines()[-1]
    assert last == "ci: 2 passed, 1 failed, 1 skipped", r.stdout + r.stderr
    assert r.returncode == 1


def test_all_green_exits_zero(tmp_path):
    ok = write(tmp_path, "test_ok.py", "def test_a():\n    pass\n")
    ok2 = write(tmp_path, "test_ok2.py", "def test_b():\n    pass\n")
    r = run_runner(tmp_path, [ok, ok2], jobs="1")
    assert r.stdout.strip().splitlines()[-1] == "ci: 2 passed, 0 failed, 0 skipped", r.stdout + r.stderr
    assert r.returncode == 0
    assert not [p.name for p in (tmp_path / "scratch").iterdir() if p.name.startswith("jaxdec-ci-")]


def test_a_group_without_tests_fails(tmp_path):
    ok = write(tmp_path, "test_ok.py", "def test_a():\n    pass\n")
    empty = write(tmp_path, "test_empty.py", "X = 1\n")
    r = run_runner(tmp_path, [ok, empty])
    assert r.returncode == 1
    assert "collected no tests" in r.stderr


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_jobs_setting_is_refused(tmp_path, value):
    r = run_runner(tmp_path, ["x"], jobs=value)
    assert r.returncode != 0 and "JAXDEC_CI_JOBS must be a positive integer" in r.stderr


PROBE = '''import os
import jax
import jax.numpy as jnp

def test_probe():
    hits = []
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(11.0)).block_until_ready()
    hit = "/jax/compilation_cache/cache_hits" in hits
    with open(os.path.join(OUT, os.path.basename(__file__) + ".txt"), "w") as f:
        f.write(f"{hit} {os.environ.get('JAX_COMPILATION_CACHE_DIR', '')}")
'''


@pytest.mark.parametrize("cache", ["1", "0"])
def test_groups_share_a_compilation_cache(tmp_path, cache):
    """With the cache on, the second group reads the program the first group compiled, from a folder
    inside the run's temporary folder that is gone afterwards; with JAXDEC_CI_COMPILE_CACHE=0 nothing
    is shared (the negative control)."""
    out = tmp_path / "out"
    out.mkdir()
    files = [write(tmp_path, f"test_probe{i}.py", f"OUT = {str(out)!r}\n" + PROBE) for i in (1, 2)]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAXDEC_CI_JOBS="1", JAXDEC_CI_GROUPS="2", TMPDIR=str(scratch), JAXDEC_CI_COMPILE_CACHE=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, RUNNER, *files], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = [(out / f"test_probe{i}.py.txt").read_text().split(" ", 1) for i in (1, 2)]
    hits = sorted(h == "True" for h, _ in seen)
    dirs = {d for _, d in seen}
    if cache == "1":
        assert hits == [False, True], seen  # one group compiled it, the other read it
        (d,) = dirs
        assert d.startswith(str(scratch)), d
        assert not os.path.exists(d)  # removed with the run's folder
    else:
        assert hits == [False, False] and dirs == {""}, seen


def test_bad_compile_cache_setting_is_refused(tmp_path):
    env = dict(os.environ, JAXDEC_CI_COMPILE_CACHE="yes")
    r = subprocess.run([sys.executable, RUNNER, write(tmp_path, "test_ok.py", "def test_a():\n    pass\n")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode != 0 and "JAXDEC_CI_COMPILE_CACHE must be 0 or 1" in r.stderr
