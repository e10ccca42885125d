#!/usr/bin/env bash
# Runs the test suite; pytest's exit code 5 ("no tests collected") is a failure, never a silent pass.
#
# Without arguments (CI, `make test`) the test files run in three pytest processes, one after the other:
# one process over the whole suite accumulated enough compiled XLA programs and state to crash inside
# XLA's compiler (a segfault in test_search_toy after ~380 tests, twice, not reproducible in a fresh
# process), and three processes of ~200 tests each stay far from that. The closing line sums all three.
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

files=(tests/test_*.py)
n=${#files[@]}
parts=3
out=$(mktemp -d)
status=0
for ((g = 0; g < parts; g++)); do
  chunk=()
  for ((i = g * n / parts; i < (g + 1) * n / parts; i++)); do
    chunk+=("${files[$i]}")
  done
  python3 -m pytest "${chunk[@]}" -q -p no:cacheprovider --junitxml="$out/part$g.xml"
  rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "ci: pytest collected no tests in part $g: failing" >&2
    status=1
  elif [ "$rc" -ne 0 ]; then
    status=$rc
  fi
done
python3 - "$out" <<'EOF'
import glob, sys
import xml.etree.ElementTree as ET
tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for path in sorted(glob.glob(sys.argv[1] + "/part*.xml")):
    root = ET.parse(path).getroot()
    for suite in (root.iter("testsuite")):
        for k in tot:
            tot[k] += int(suite.get(k, 0))
failed = tot["failures"] + tot["errors"]
passed = tot["tests"] - failed - tot["skipped"]
print(f"ci: {passed} passed, {failed} failed, {tot['skipped']} skipped")
if tot["tests"] == 0:
    sys.exit(1)
EOF
[ "$?" -eq 0 ] || status=1
rm -rf "$out"
exit "$status"
