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

# Test binaries that must be in the bundle: a missing one is a failed check, not a silent pass.
EXPECTED_TESTS="gpu_kernels gpu_model"
for name in $EXPECTED_TESTS; do
  if [ ! -x "$BUNDLE/tests/$name" ]; then
    ROWS+=("test  $name  MISSING from $BUNDLE/tests")
    status=1
  fi
done
# tests/gpu_model.rs reads the transformers parity fixtures from here.
export ELDER_FIXTURES_DIR="$BUNDLE/fixtures/parity"

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

# End to end through the command line: the same score on the CPU and on CUDA (f32), and a CUDA
# generation, on a random tiny checkpoint written by the binary itself.
if [ -x "$BUNDLE/elder" ]; then
  smoke="$LOG_DIR/smoke"
  mkdir -p "$smoke"
  log="$LOG_DIR/cli_smoke.log"
  verdict=ok
  {
    "$BUNDLE/elder" init-random --arch llama --preset tiny --seed 3 --out "$smoke/model" &&
      "$BUNDLE/elder" --device cpu score --model "$smoke/model" --prompt "a b c d" --target " e f" --json >"$smoke/cpu.json" &&
      "$BUNDLE/elder" --device cuda --gpu-dtype f32 score --model "$smoke/model" --prompt "a b c d" --target " e f" --json >"$smoke/cuda.json" &&
      "$BUNDLE/elder" --device cuda generate --model "$smoke/model" --prompt "a b c" --max-new-tokens 8 &&
      python3 -c '
import json, sys
a = json.load(open(sys.argv[1]))["logprobs"]; b = json.load(open(sys.argv[2]))["logprobs"]
d = max(abs(x - y) for x, y in zip(a, b))
print("cpu vs cuda f32 score: max |diff|", d)
sys.exit(0 if len(a) == len(b) and d <= 1e-3 else 1)
' "$smoke/cpu.json" "$smoke/cuda.json"
  } >"$log" 2>&1 || { verdict=FAIL; status=1; tail -n 20 "$log"; }
  ROWS+=("cli   elder --device cuda (score vs cpu, generate)  $verdict")
else
  ROWS+=("cli   elder binary MISSING from $BUNDLE")
  status=1
fi

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
