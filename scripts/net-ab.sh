#!/bin/bash
# One redis-benchmark run against the networked guest, protected (a pair) or
# not (a primary alone), in a network namespace of its own that is removed
# at the end: the tool behind docs/benchmarks.md's interleaved A/B tables
# (run it for two builds in turn, several rounds).
#
#   scripts/net-ab.sh BIN PROTECTED CONNS REQUESTS ["extra primary options"]
#
# BIN: a castor binary; PROTECTED: 1 (pair) or 0 (alone). Prints
# redis-benchmark's INCR csv row and the primary's status before and after
# (status0.json, status.json) in the kept directory it names. Needs root,
# iproute2 and redis-tools (scripts/deps.sh). PLOG sets the primary's CASTOR_LOG
# (default warn; e.g. PLOG=warn,vmm::retention=debug), its log kept as p.log.
set -euo pipefail
BIN=$1 PROT=$2 C=$3 N=$4 EXTRA=${5:-}
NS=castor-ab-$$-0
D=$(mktemp -d /tmp/castor-ab.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns delete "$NS" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 address 02:ca:57:0e:00:01 type bridge
ip -n "$NS" addr add 10.77.0.1/24 dev br0
ip -n "$NS" link set br0 up
"$BIN" keygen "$D/secret" >/dev/null
MAC=52:54:00:ca:57:09
# wait_ready FILE: the node's ready file (its bound addresses)
wait_ready() { for _ in $(seq 1 600); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "no ready file $1" >&2; exit 1; }
PEER=()
if [ "$PROT" = 1 ]; then
  CASTOR_LOG=warn "$BIN" secondary --secret-file "$D/secret" --service-listen 127.0.0.1:0 --listen 127.0.0.1:0 \
    --net "tap=cab$$,mac=$MAC,bridge=br0,netns=$NS" --control "$D/s.ctl" --ready-file "$D/s.ready" >"$D/s.log" 2>&1 &
  PIDS+=($!)
  wait_ready "$D/s.ready"
  PEER=(--peer "$(sed -n 's/.*"replication": *"\([^"]*\)".*/\1/p' "$D/s.ready")")
fi
# shellcheck disable=SC2086
CASTOR_LOG=${PLOG:-warn} "$BIN" primary --secret-file "$D/secret" --service-listen 127.0.0.1:0 "${PEER[@]}" --guest redis --vcpus 1 \
  --net "tap=caa$$,mac=$MAC,ip=10.77.0.2/24,bridge=br0,netns=$NS" --control "$D/p.ctl" $EXTRA >"$D/p.log" 2>&1 &
PIDS+=($!)
want=unprotected; [ "$PROT" = 1 ] && want=protected
for _ in $(seq 1 240); do
  "$BIN" status --control "$D/p.ctl" 2>/dev/null | grep -q "\"protection\": *\"$want\"" && break
  sleep 0.5
done
"$BIN" status --control "$D/p.ctl" > "$D/status0.json" 2>/dev/null || true
ip netns exec "$NS" redis-benchmark -h 10.77.0.2 -c "$C" -n "$N" -t incr -r 1000 --csv 2>&1 | grep INCR
"$BIN" status --control "$D/p.ctl" > "$D/status.json" 2>/dev/null || true
echo "kept: $D"
