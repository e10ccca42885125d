#!/usr/bin/env bash
# Runs the test suite; pytest's exit code 5 ("no tests collected") is a failure, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ci: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
