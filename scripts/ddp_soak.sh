#!/usr/bin/env bash
# The DDP test N times in a row (default 30) while one busy process competes for the CPUs: how a
# flaky test is found. Prints one line a run and the totals.   bash scripts/ddp_soak.sh [N]
set -u
cd "$(dirname "$0")/.."
n=${1:-30}
yes > /dev/null &
load=$!
trap 'kill $load 2>/dev/null' EXIT
pass=0; fail=0
for i in $(seq 1 "$n"); do
  if .venv/bin/python -m pytest -q -p no:cacheprovider \
      "tests/test_train.py::test_ddp_two_processes_stay_identical_and_resume_after_a_killed_worker" >/dev/null 2>&1; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
  fi
  echo "run $i: pass=$pass fail=$fail $(date +%T)"
done
echo "DONE pass=$pass fail=$fail"
