"""Runs `jaxdec generate` (in this process, through `jaxdec.cli.main`) once per argv list and prints one line
``RESULT {json}``: per run its exit code, wall seconds and the rows it wrote to its ``--out``.

argv: a JSON list of argv lists (each with ``--out PATH``). Run as a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/test_sharding.py does): 8 CPU devices for
``--mesh``, device 0 for the runs without it."""
from __future__ import annotations

import json
import sys
import time

from jaxdec import cli


def main():
    runs = []
    for argv in json.loads(sys.argv[1]):
        t0 = time.perf_counter()
        rc = cli.main(argv)
        dest = argv[argv.index("--out") + 1]
        rows = [json.loads(line) for line in open(dest)] if rc == 0 else []
        runs.append({"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "rows": rows})
    print("RESULT " + json.dumps(runs), flush=True)


if __name__ == "__main__":
    main()
