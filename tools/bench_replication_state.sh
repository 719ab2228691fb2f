#!/usr/bin/env bash
# Replication on a grown state, one elder binary after another (loopback, this machine): for each
# BINARY, a fresh nats-server, a leader on a copy of STATE (it publishes that generation first), a
# replica from an empty folder (its catch-up timed), then tools/bench_replication.py posting EDITS
# edits one at a time (lag per generation); prints the last install lines and the object store's
# size on disk. Used for BENCHMARKS.md "Chunked generations and retention at 1000 edits":
#
#   tools/bench_replication_state.sh runs/smollm2-135m-default-1000-edits 12 OLD_ELDER NEW_ELDER
#
# Every server listens on 127.0.0.1 only and is stopped at the end; the work folder is
# $TMPDIR/bench-replication-<n> per binary.
set -euo pipefail
STATE=${1:?state folder}; EDITS=${2:?edits}; shift 2
MODEL=${MODEL:-models/smollm2-135m}
n=0
for BIN in "$@"; do
  n=$((n + 1))
  W=${TMPDIR:-/tmp}/bench-replication-$n
  rm -rf "$W"; mkdir -p "$W"
  cp -r "$STATE" "$W/leader"
  NP=$((14400 + RANDOM % 500)); LP=$((15000 + RANDOM % 500)); RP=$((16000 + RANDOM % 500))
  nats-server -a 127.0.0.1 -p $NP -js -sd "$W/nats" >"$W/nats.log" 2>&1 &
  NPID=$!
  sleep 1
  t0=$(date +%s.%N)
  "$BIN" --device cpu serve --addr 127.0.0.1:$LP --model "$MODEL" --state "$W/leader" \
    --edit-log nats://127.0.0.1:$NP --role leader >"$W/leader.out" 2>"$W/leader.log" &
  LPID=$!
  for _ in $(seq 600); do curl -sf http://127.0.0.1:$LP/ready >/dev/null && break; sleep 0.2; done
  t1=$(date +%s.%N)
  G=$(curl -s http://127.0.0.1:$LP/ready | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')
  echo "$BIN: leader ready at generation $G after $(echo "$t1 - $t0" | bc) s"
  "$BIN" --device cpu serve --addr 127.0.0.1:$RP --model "$MODEL" --state "$W/replica" \
    --edit-log nats://127.0.0.1:$NP --role replica >"$W/replica.out" 2>"$W/replica.log" &
  RPID=$!
  for _ in $(seq 1200); do
    g=$(curl -s http://127.0.0.1:$RP/ready 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("generation", 0))' 2>/dev/null || true)
    [ "$g" = "$G" ] && break
    sleep 0.1
  done
  t2=$(date +%s.%N)
  echo "$BIN: replica caught up with generation $G after $(echo "$t2 - $t1" | bc) s"
  python3 tools/bench_replication.py --leader http://127.0.0.1:$LP --replica http://127.0.0.1:$RP \
    --edits "$EDITS" --qps-seconds 1 --json "$W/bench.json" | grep -v QPS || true
  grep -h "published generation\|installed" "$W/leader.log" "$W/replica.log" | tail -4 || true
  du -sh "$W/nats"
  kill "$LPID" "$RPID"; wait "$LPID" "$RPID" 2>/dev/null || true
  kill "$NPID"; wait "$NPID" 2>/dev/null || true
done
