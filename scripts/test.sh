#!/usr/bin/env bash
# README command 2: builds everything with the dev preset (Debug, ASan/UBSan,
# -Werror) and runs every test with ctest. Works from any directory; exits
# non-zero when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="$(nproc)"
export CTEST_PARALLEL_LEVEL="$jobs"

step="install dependencies"
report_failure() {
  local rc=$?
  if ((rc != 0)); then
    echo "test.sh: FAILED (${step}, exit ${rc})"
  fi
}
trap report_failure EXIT

bash scripts/install-deps.sh --with-servers
step="configure (cmake --preset dev)"
cmake --preset dev
step="build (cmake --build --preset dev)"
cmake --build --preset dev -j "$jobs"
step="tests (ctest --preset dev)"
ctest --preset dev

echo "test.sh: PASSED (dev preset: build and all tests)"
