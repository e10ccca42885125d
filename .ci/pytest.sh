#!/usr/bin/env bash
# Runs the test suite; pytest's exit code 5 ("no tests collected") is a failure, never a silent pass.
#
# Without arguments (CI, `make test`) .ci/parallel_pytest.py runs the test files in groups of ~100
# tests, each group a fresh pytest process, two processes at a time on this 2-core machine, and prints
# one closing line for all of them (its docstring says why processes and why two).
# With arguments (`make acceptance`, a file, -k ...) pytest runs once with them, as before.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -gt 0 ]; then
  python3 -m pytest tests -q -p no:cacheprovider "$@"
  rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "ci: pytest collected no tests: failing" >&2
    exit 1
  fi
  exit "$rc"
fi

exec python3 .ci/parallel_pytest.py
