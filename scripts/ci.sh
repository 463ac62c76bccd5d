#!/usr/bin/env bash
# Runs what CI runs: the clang-format check, then scripts/test.sh (dev preset:
# ASan/UBSan build with -Werror and every test).
set -euo pipefail
cd "$(dirname "$0")/.."

source_dirs=(include core actors transports stores tools examples test bench)

dirs=()
for d in "${source_dirs[@]}"; do
  [[ -d "$d" ]] && dirs+=("$d")
done

# Tracked files plus new ones not yet added (but not ignored), so a local run
# checks what the next commit will contain; in CI both sets are the same.
files=()
if ((${#dirs[@]} > 0)); then
  while IFS= read -r -d '' f; do
    [[ -f "$f" ]] && files+=("$f")
  done < <(git ls-files -z --cached --others --exclude-standard -- \
    "${dirs[@]/%//*.cpp}" "${dirs[@]/%//*.hpp}" | sort -zu)
fi

if ! command -v clang-format >/dev/null; then
  echo "ci.sh: clang-format not found; run scripts/install-deps.sh" >&2
  exit 1
fi
version="$(clang-format --version)"
if [[ "$version" != *"version 14."* ]]; then
  echo "ci.sh: warning: the style is checked with clang-format 14, found: $version" >&2
fi

echo "ci.sh: format check of ${#files[@]} files"
if ((${#files[@]} > 0)) && ! clang-format --dry-run --Werror "${files[@]}"; then
  echo "ci.sh: FAILED (format). Fix with: clang-format -i FILE..." >&2
  exit 1
fi

bash scripts/test.sh
