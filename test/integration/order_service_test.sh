#!/usr/bin/env bash
# Runs `order_service --demo` (the README's first command) in a fresh
# directory, then reads the dead letters it left behind with the operator CLI.
#
#   order_service_test.sh PATH/TO/order_service PATH/TO/evmesh
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 ORDER_SERVICE EVMESH_CLI" >&2
  exit 2
fi
service=$(realpath "$1")
cli=$(realpath "$2")

dir=$(mktemp -d "${TMPDIR:-/tmp}/evmesh-order-service.XXXXXX")
trap 'rm -rf "$dir"' EXIT
cd "$dir"

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

expect_in() { # expect_in FILE PATTERN WHAT
  grep -qE -- "$2" "$1" || {
    echo "----- $1 -----" >&2
    cat "$1" >&2
    fail "$3 (no match for /$2/ in $1)"
  }
}

db="sqlite://$dir/state/dlq.db"

run_demo() { # run_demo OUTPUT_FILE
  local status=0
  "$service" --demo \
    --dead_letter.url "$db" \
    --dedupe.url "sqlite://$dir/state/dedupe.db" \
    --tracing.sink "otlp-file://$dir/state/spans.jsonl" \
    >"$1" 2>&1 || status=$?
  if [[ $status -ne 0 ]]; then
    cat "$1" >&2
    fail "order_service --demo exited with $status"
  fi
  expect_in "$1" '^demo OK$' "the demo did not report success"
}

# -- first run ------------------------------------------------------------------
run_demo first.out
expect_in first.out 'same trace' "the traced event did not keep its trace id"
[[ -s state/dlq.db ]] || fail "no DLQ database at $dir/state/dlq.db"
[[ -s state/spans.jsonl ]] || fail "no spans at $dir/state/spans.jsonl"
grep -q 4bf92f3577b34da6a3ce929d0e0e4736 state/spans.jsonl \
  || fail "no span of the producer's trace in state/spans.jsonl"

# -- the CLI reads the dead letters ---------------------------------------------
"$cli" dlq list --db "$db" >list.out 2>&1 || {
  cat list.out >&2
  fail "evmesh dlq list failed"
}
for category in malformed_payload retries_exhausted decode_error no_handler \
  permanent; do
  expect_in list.out "$category" "dlq list does not show the $category record"
done

"$cli" dlq list --db "$db" --json >list.json 2>&1 || {
  cat list.json >&2
  fail "evmesh dlq list --json failed"
}
[[ $(wc -l <list.json) -eq 5 ]] || {
  cat list.json >&2
  fail "expected 5 dead-letter records after one run"
}
id=$(grep '"retries_exhausted"' list.json | head -n1 \
  | sed -E 's/.*"id":([0-9]+).*/\1/')
[[ $id =~ ^[0-9]+$ ]] || fail "no id for the retries_exhausted record in list.json"

"$cli" dlq show "$id" --db "$db" >show.out 2>&1 || {
  cat show.out >&2
  fail "evmesh dlq show $id failed"
}
expect_in show.out 'retries_exhausted' "dlq show $id lacks the category"
expect_in show.out 'fraud service unreachable' "dlq show $id lacks the reason"
expect_in show.out 'order\.fraud_check' "dlq show $id lacks the topic"

status=0
"$cli" dlq show 999999 --db "$db" >missing.out 2>&1 || status=$?
[[ $status -eq 1 ]] || fail "dlq show of an unknown id exited with $status, not 1"

# -- a second run in the same directory is independent of the first --------------
run_demo second.out
"$cli" dlq list --db "$db" --json >list2.json 2>&1 || fail "dlq list failed"
[[ $(wc -l <list2.json) -eq 10 ]] || {
  cat list2.json >&2
  fail "expected 10 dead-letter records after two runs"
}

# -- SIGTERM stops a consuming service gracefully ---------------------------------
for sig in TERM INT; do
  "$service" --dead_letter.url "sqlite://$dir/state/dlq.db" \
    --dedupe.url "sqlite://$dir/state/dedupe.db" >"serve_$sig.out" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do # up to 10 s for the runtime to start
    grep -q 'runtime started' "serve_$sig.out" && break
    sleep 0.1
  done
  grep -q 'runtime started' "serve_$sig.out" || {
    kill -9 "$pid" 2>/dev/null
    cat "serve_$sig.out" >&2
    fail "the service did not start within 10 s"
  }
  kill -s "$sig" "$pid"
  status=0
  for _ in $(seq 1 150); do # up to 15 s for a graceful stop
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid"
    fail "SIG$sig did not stop the service within 15 s"
  fi
  wait "$pid" || status=$?
  [[ $status -eq 0 ]] || {
    cat "serve_$sig.out" >&2
    fail "SIG$sig: the service exited with $status, not 0"
  }
  expect_in "serve_$sig.out" 'stopped' "SIG$sig: no stop summary"
done

echo "order_service demo: OK (dir $dir)"
