#!/usr/bin/env bash
# Runs the AMQP end-to-end benchmark (bench/e2e_amqp.cpp) with its NestJS
# peer: installs the peer's npm packages (bench/peers/nestjs/package.json +
# package-lock.json) into BUILD/bench/peers/nestjs/npm once (again when the
# package files change), then runs the benchmark binary.
#
#   scripts/bench-amqp.sh BUILD_DIR [messages] [keys] [runs] [--json FILE]
#
# Needs rabbitmq-server (scripts/install-deps.sh --with-servers) and, for the
# NestJS row, node and npm (apt-get install nodejs npm).
set -euo pipefail
build=${1:?usage: scripts/bench-amqp.sh BUILD_DIR [messages] [keys] [runs] [--json FILE]}
shift
src=$(cd "$(dirname "$0")/.." && pwd)/bench/peers/nestjs
cache=$build/bench/peers/nestjs/npm
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  mkdir -p "$cache"
  stamp=$cache/.installed
  if [ ! -d "$cache/node_modules" ] || [ ! -f "$stamp" ] \
     || ! cat "$src/package.json" "$src/package-lock.json" | cmp -s - "$stamp"; then
    cp "$src/package.json" "$src/package-lock.json" "$cache/"
    echo "npm ci in $cache (first run, or the package files changed)"
    (cd "$cache" && npm ci --no-audit --no-fund --loglevel=error)
    cat "$src/package.json" "$src/package-lock.json" > "$stamp"
  fi
else
  echo "node/npm not installed: the NestJS row will be skipped" \
       "(apt-get install nodejs npm)"
fi
exec nice -n 0 "$build/bench/evmesh_bench_e2e_amqp" "$@" \
  --nest-script "$src/consume.js" --node-path "$cache/node_modules"
