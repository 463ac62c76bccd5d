#!/usr/bin/env bash
# The cluster example: one ingress and two workers on this machine. Starts
# them, kills worker w2 with SIGKILL while jobs flow, and prints the per-node
# counts and the final tally. Usage: run.sh [path/to/cluster_node]
set -euo pipefail
BIN=${1:-build/release/examples/cluster/cluster_node}
PORT=${PORT:-47411}
DIR=$(mktemp -d /tmp/evmesh-cluster-example-XXXXXX)
COMMON=(--cluster.secret "example-secret-change-me-0123456789"
        --cluster.heartbeat_interval 200ms --cluster.heartbeat_timeout 2s
        --dedupe.url memory:// --dead_letter.url none --tracing.sink none
        --runtime.log_level warn)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start_worker() {
  "$BIN" "${COMMON[@]}" --runtime.node_name "$1" --cluster.role worker \
    --cluster.seeds "127.0.0.1:$PORT" --transport.url "inproc://$1" \
    >"$DIR/$1.log" 2>&1 &
  pids+=($!)
}

"$BIN" "${COMMON[@]}" --runtime.node_name ingress --demo \
  --cluster.listen "127.0.0.1:$PORT" --transport.url inproc://jobs \
  >"$DIR/ingress.log" 2>&1 &
INGRESS=$!
pids+=($INGRESS)
start_worker w1
W1=$!
start_worker w2
W2=$!

# Kill w2 once it has answered jobs (the ingress prints progress every
# 500 ms; the stream takes several seconds).
for _ in $(seq 1 600); do
  grep -q "^  w2 \[alive\]: [1-9]" "$DIR/ingress.log" 2>/dev/null && break
  sleep 0.05
done
echo "== kill -9 w2 (pid $W2) while jobs are in flight"
kill -9 "$W2"

status=0
wait "$INGRESS" || status=$?
kill -TERM "$W1"
# w1 must stop cleanly (under the sanitizers: without leaks).
wait "$W1" || { echo "w1 did not stop cleanly (exit $?)"; status=1; }

echo "== ingress: per-node counts and the final tally"
sed -n '/^final/,/^[^ ]/p' "$DIR/ingress.log" | grep "^final\|^  "
echo "== workers (jobs each ran, duplicates included)"
grep -h "ran .* job" "$DIR/w1.log" || echo "w1: no count (see $DIR/w1.log)"
echo "w2: killed; its unanswered jobs were re-dispatched"
if ! grep -q "^  w2 \[dead\]" "$DIR/ingress.log"; then
  echo "w2 was not seen dead by the ingress: the kill came after the stream"
  status=1
fi
echo "logs: $DIR"
exit "$status"
