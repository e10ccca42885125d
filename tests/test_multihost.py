"""Issue 20's multi-host check on one machine: two processes joined by `jax.distributed` (coordinator on a
free loopback port, gloo collectives on the CPU backend), 4 CPU devices each, one global 2x4 mesh (data
across the processes, model within each); a tiny-Llama greedy decode whose gathered tokens equal the same
decode on one device. The test starts both processes, bounds them in time, and kills both on any failure
or timeout, so none is left behind."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240
# what XLA said when a CPU backend had no cross-process collectives (jax 0.10.2 has gloo: this test runs)
NO_CPU_COLLECTIVES = ("Multiprocess computations aren't implemented on the CPU backend",
                      "Cross-process collectives are not supported")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the process group of that child only (start_new_session)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait(timeout=30)


def run_processes(tmp_path, n: int = 2, devices: int = 4, argv=None):
    """Start ``n`` processes (default: tests/scripts/multihost_decode.py; ``argv(i, port)``: process i's
    command line), wait for all of them (at most TIMEOUT_S), kill any left; (exit codes, logs)."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(n)]
    procs = []
    try:
        for i in range(n):
            penv = dict(env, JAXDEC_COORDINATOR=f"localhost:{port}", JAXDEC_NUM_PROCESSES=str(n),
                        JAXDEC_PROCESS_ID=str(i))  # initialize_distributed reads these
            cmd = [sys.executable, os.path.join(HERE, "scripts", "multihost_decode.py")] if argv is None else argv(i, port)
            procs.append(subprocess.Popen(cmd, env=penv, stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        _kill(procs)
    texts = []
    for f in logs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return codes, texts


def test_two_processes_decode_like_one_device(tmp_path):
    t0 = time.monotonic()
    codes, texts = run_processes(tmp_path)
    if any(c != 0 for c in codes):
        if any(m in t for t in texts for m in NO_CPU_COLLECTIVES):
            pytest.skip("this jax build's CPU backend has no cross-process collectives: " + texts[0][-500:])
        timed_out = any(c is None for c in codes)
        pytest.fail(f"exit codes {codes}{' (timed out after %d s, killed)' % TIMEOUT_S if timed_out else ''}\n"
                    + "\n".join(f"--- process {i}:\n{t[-3000:]}" for i, t in enumerate(texts)))
    res = [json.loads([ln for ln in t.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):]) for t in texts]
    for i, r in enumerate(res):
        assert r["process_index"] == i and r["process_count"] == 2
        assert r["devices"] == 8 and r["local_devices"] == 4
        assert r["mesh"] == {"data": 2, "model": 4} and r["mesh_processes"] == [0, 1]
        # the token buffer was split over the data axis, i.e. across the processes, and gathered to each
        assert "data" in r["token_spec"] and not r["token_fully_addressable"], r
    assert res[0]["tokens"] == res[1]["tokens"]
    assert res[0]["tokens"] == res[0]["single"], "two-process tokens differ from one device"
    assert max(len(t) for t in res[0]["single"]) == 16
    assert time.monotonic() - t0 < TIMEOUT_S


def test_cli_two_processes_write_one_device_rows(tmp_path, monkeypatch):
    """`jaxdec generate --mesh 2x4 --coordinator localhost:PORT --num-processes 2 --process-id I` as two
    processes (4 CPU devices each; the flags, not the environment, join them): one global mesh, each
    process feeding the rows of its devices, rows gathered with process_allgather; process 0 alone
    prints and writes --out, and its rows equal `jaxdec generate` on one device in one process."""
    from jaxdec import cli
    from test_sharding import tiny_cli_setup
    folder, prompts = tiny_cli_setup(tmp_path)
    out = tmp_path / "rows.jsonl"
    base = ["generate", "--model", folder, "--prompts-file", prompts, "--max-new-tokens", "16"]

    def argv(i, port):
        return [sys.executable, "-m", "jaxdec.cli", *base, "--mesh", "2x4", "--out", str(out), "--coordinator",
                f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]

    for k in ("JAXDEC_COORDINATOR", "JAXDEC_NUM_PROCESSES", "JAXDEC_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    t0 = time.monotonic()
    codes, texts = run_processes(tmp_path, argv=argv)
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(f"--- process {i}:\n{t[-3000:]}"
                                                              for i, t in enumerate(texts))
    assert time.monotonic() - t0 < TIMEOUT_S
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not os.path.exists(str(out) + ".partial")
    assert "[jaxdec] model load" in texts[0] and "[jaxdec]" not in texts[1], texts[1][-2000:]
    assert rows[0]["text"] in texts[0] and "-" * 60 not in texts[1]  # process 1 printed no rows
    monkeypatch.setattr(cli, "_LOADED", {})  # keep the suite's cached model out of this
    ref = tmp_path / "one.jsonl"
    assert cli.main([*base, "--out", str(ref), "--quiet"]) == 0
    one = [json.loads(line) for line in ref.read_text().splitlines()]
    assert len(rows) == len(one) == 8
    assert [r["prompt_ids"] for r in rows] == [r["prompt_ids"] for r in one]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in one], "two-process CLI rows differ from one device"
    assert max(len(r["tokens"]) for r in one) == 16
