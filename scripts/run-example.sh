#!/usr/bin/env bash
# README command 1: builds the order_service example (release preset) and runs
# its demo from the repository root, where it keeps its files under ./state/.
# Extra arguments are passed on to order_service. Exits with its exit code.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake --preset release
cmake --build --preset release --target order_service -j "$(nproc)"

exec build/release/examples/order_service/order_service --demo "$@"
