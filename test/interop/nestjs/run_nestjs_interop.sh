#!/usr/bin/env bash
# Runs the NestJS interop test: installs the npm packages of package.json into
# a cache directory in the build tree (once, again when package.json or the
# lockfile change), then the test binary with the paths it needs.
# Usage: run_nestjs_interop.sh SOURCE_DIR CACHE_DIR TEST_BINARY [ARGS...]
# Exits 77 (ctest: skipped) when node or npm is not installed.
set -euo pipefail
src=$1 cache=$2 binary=$3
shift 3
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "SKIPPED: node and npm are not installed; the NestJS interop test" \
       "needs them (apt-get install nodejs npm)"
  exit 77
fi
mkdir -p "$cache"
stamp="$cache/.installed"
if [ ! -d "$cache/node_modules" ] || [ ! -f "$stamp" ] \
   || ! cat "$src/package.json" "$src/package-lock.json" | cmp -s - "$stamp"; then
  cp "$src/package.json" "$src/package-lock.json" "$cache/"
  echo "npm ci in $cache (first run, or the package files changed)"
  (cd "$cache" && npm ci --no-audit --no-fund --loglevel=error)
  cat "$src/package.json" "$src/package-lock.json" > "$stamp"
fi
export EVMESH_NESTJS_SCRIPT="$src/nest_interop.js"
export NODE_PATH="$cache/node_modules"
exec "$binary" "$@"
