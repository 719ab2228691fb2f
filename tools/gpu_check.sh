#!/usr/bin/env bash
# Runs on a GPU machine WITHOUT Rust: every prebuilt GPU test, then every GPU benchmark, then prints a
# short table. Build the bundle on a development machine first (tools/collect_gpu_bundle.sh), copy the
# gpu-bundle/ folder over, then:
#
#   gpu-bundle/gpu_check.sh [bundle-dir]      # default: the folder this script sits in
#
# A test that prints "SKIP" counts as NOT run (the table says so): on a GPU machine that means the
# driver or the kernels were missing, which is a failure of the check. Exit status is non-zero when any
# test failed or was skipped.
set -uo pipefail
BUNDLE=${1:-$(cd "$(dirname "$0")" && pwd)}
LOG_DIR=$(mktemp -d)
declare -a ROWS
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"

for t in "$BUNDLE"/tests/*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  log="$LOG_DIR/$name.log"
  start=$(date +%s.%N)
  "$t" --test-threads=1 --nocapture >"$log" 2>&1
  rc=$?
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  passed=$(grep -Eo '[0-9]+ passed' "$log" | tail -1 | cut -d' ' -f1)
  failed=$(grep -Eo '[0-9]+ failed' "$log" | tail -1 | cut -d' ' -f1)
  skipped=$(grep -c '^SKIP ' "$log" || true)
  verdict=ok
  if [ "$rc" -ne 0 ]; then verdict=FAIL; status=1; fi
  if [ "${skipped:-0}" -gt 0 ]; then verdict="$verdict(SKIPPED ${skipped})"; status=1; fi
  ROWS+=("test  $name  passed=${passed:-0} failed=${failed:-0} skipped=${skipped} ${secs}s  $verdict")
  [ "$rc" -ne 0 ] && tail -n 40 "$log"
done

for b in "$BUNDLE"/benches/*; do
  [ -x "$b" ] || continue
  name=$(basename "$b")
  log="$LOG_DIR/$name.log"
  "$b" --bench >"$log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  # Criterion prints "thrpt: [lo mid hi]" per benchmark; keep the id and the middle value.
  while read -r line; do ROWS+=("bench $line"); done < <(
    awk '/^[a-zA-Z0-9_\/ =.-]+$/ { id = $0 } /thrpt:/ { print id "  " $(NF-3) " " $(NF-2) }' "$log"
  )
  grep '^SKIP ' "$log" && status=1
done

echo
echo "== GPU check summary (logs in $LOG_DIR)"
printf '%s\n' "${ROWS[@]}"
exit $status
