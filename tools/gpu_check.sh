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
#
# Dry run without a GPU (checks this script and the bundle, not the GPU): put the CUDA emulator's
# libraries first on the library path, where the bundle's programs load the driver from, e.g.
#   cargo build --release -p elder-cuda-emu   # after any kernel change: the emulator embeds the kernels
#   LD_LIBRARY_PATH=$(ls -td target/release/build/elder-cuda-emu-*/out | head -1) \
#     GPU_CHECK_BENCH_FILTER='copy|norm' gpu-bundle/gpu_check.sh
set -uo pipefail
# A test here must use the GPU or say SKIP, never fall back to the CPU emulator of tools/cuda-emu.
export ELDER_CUDA_EMU=0
BUNDLE=${1:-$(cd "$(dirname "$0")" && pwd)}
LOG_DIR=$(mktemp -d)
declare -a ROWS
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"

# Test binaries that must be in the bundle: a missing one is a failed check, not a silent pass.
EXPECTED_TESTS="gpu_kernels gpu_model gpu_train gpu_train_stored"
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

  # The edit step through the command line: two edits trained on the CPU and on CUDA (f32) from
  # the same random checkpoint must report the same losses and leave the same state (experts
  # within 2e-3, identical codebook); a second CUDA run resumes (applies nothing).
  log="$LOG_DIR/cli_edit.log"
  verdict=ok
  cat >"$smoke/edits.jsonl" <<'JSONL'
{"id": "a", "knowledge_id": "k1", "prompt": "a b c d", "target_new": "e f"}
{"id": "b", "knowledge_id": "k2", "prompt": "b c d e f", "target_new": "g"}
JSONL
  printf 'iterations = 10\n' >"$smoke/edit.toml"
  edit() { # device dtype state
    "$BUNDLE/elder" --device "$1" --gpu-dtype "$2" edit --model "$smoke/model" --edits "$smoke/edits.jsonl" \
      --state "$smoke/$3" --config "$smoke/edit.toml" --json
  }
  {
    edit cpu f32 state-cpu >"$smoke/edit-cpu.json" &&
      edit cuda f32 state-cuda >"$smoke/edit-cuda.json" &&
      edit cuda f32 state-cuda >"$smoke/edit-resume.json" &&
      "$BUNDLE/elder" state export "$smoke/state-cpu" --out "$smoke/experts-cpu.safetensors" &&
      "$BUNDLE/elder" state export "$smoke/state-cuda" --out "$smoke/experts-cuda.safetensors" &&
      python3 -c '
import glob, json, os, sys
cpu, cuda, resume, scpu, scuda = sys.argv[1:6]
a, b, r = (json.load(open(p)) for p in (cpu, cuda, resume))
ok = a["applied"] == b["applied"] == 2 and r["applied"] == 0 and r["already_applied"] == 2
for k in ("mean_first_loss", "mean_last_loss"):
    print(k, "cpu", a[k], "cuda", b[k])
    ok = ok and abs(a[k] - b[k]) <= 1e-3 * max(1.0, abs(a[k]))
latest = lambda d, pat: sorted(glob.glob(os.path.join(d, pat)))[-1]
try:
    import numpy as np
    from safetensors.numpy import load_file
    ea = load_file(os.path.join(os.path.dirname(scpu), "experts-cpu.safetensors"))
    eb = load_file(os.path.join(os.path.dirname(scuda), "experts-cuda.safetensors"))
    diff = max(float(np.abs(ea[k] - eb[k]).max()) for k in ea)
    print("experts max |cpu - cuda|", diff)
    ok = ok and ea.keys() == eb.keys() and diff <= 2e-3
except ImportError:
    print("safetensors/numpy not installed: experts not compared")
same = open(latest(scpu, "codebook-*.bin"), "rb").read() == open(latest(scuda, "codebook-*.bin"), "rb").read()
print("codebooks identical:", same)
sys.exit(0 if ok and same else 1)
' "$smoke/edit-cpu.json" "$smoke/edit-cuda.json" "$smoke/edit-resume.json" "$smoke/state-cpu" "$smoke/state-cuda"
  } >"$log" 2>&1 || { verdict=FAIL; status=1; tail -n 20 "$log"; }
  ROWS+=("cli   elder --device cuda edit (vs cpu, resume)  $verdict")

  # The server on the GPU (the paper preset; the default preset's serving on the GPU is checked
  # by tests/serve.rs on the emulator): one edit through the log, then tools/bench_serve.py on
  # loopback, 1 and 8 clients for 20 s each (scores), bounded; the rows give QPS and latency.
  log="$LOG_DIR/serve.log"
  verdict=ok
  {
    "$BUNDLE/elder" --device cuda serve --model "$smoke/model" --state "$smoke/served" --preset paper \
      --addr 127.0.0.1:0 >"$smoke/serve.out" 2>"$LOG_DIR/serve-requests.log" &
    pid=$!
    for _ in $(seq 120); do grep -q listening "$smoke/serve.out" 2>/dev/null && break; sleep 0.5; done
    url=$(sed 's/listening on //' "$smoke/serve.out")
    for _ in $(seq 240); do curl -sf "$url/ready" >/dev/null && break; sleep 0.5; done
    curl -sf "$url/v1/edits" -d '{"edits": [{"id": "a", "prompt": "a b c d", "target_new": "e f"}]}' && echo &&
      curl -sf "$url/v1/completions" -d '{"prompt": "a b c d", "max_tokens": 2, "temperature": 0, "min_generation": 1}' && echo &&
      printf '{"id":"s%d","prompt":"a b c d %d","target_new":"e","rephrases":["a b %d"],"locality":[{"prompt":"x y %d","answer":"z"}]}\n' \
        $(for i in $(seq 50); do echo "$i $i $i $i"; done) >"$smoke/serve-data.jsonl" &&
      python3 "$BUNDLE/bench_serve.py" --url "$url" --clients 1 --seconds 20 --data "$smoke/serve-data.jsonl" &&
      python3 "$BUNDLE/bench_serve.py" --url "$url" --clients 8 --seconds 20 --data "$smoke/serve-data.jsonl"
    rc=$?
    kill -TERM "$pid"; wait "$pid"; term=$?
    [ "$rc" -eq 0 ] && [ "$term" -eq 0 ]
  } >"$log" 2>&1 || { verdict=FAIL; status=1; tail -n 20 "$log"; }
  ROWS+=("serve elder --device cuda serve (edit, completions, bench_serve 1 and 8 clients)  $verdict")
  while read -r line; do ROWS+=("serve $line"); done < <(grep -A1 '^ *clients' "$log" | grep -v -e '^ *clients' -e '^--')

  # The default preset on the GPU (issue 15): 12 edits with the default preset on the CPU, its
  # answer gate off (a random tiny model learns too little for its experts to pass the gate), then
  # an edit prompt and another prompt scored on the CPU and on CUDA: the same scope and
  # log-probabilities (f32 within 1e-3, bf16 within 0.1), the edit's moved away from the base
  # model's; then the gated default state's final evaluation, CPU against CUDA f32 / bf16; then
  # the same 12 ungated edits trained on CUDA f32 and bf16 and evaluated there, against the
  # CPU-trained ungated state's evaluation on the CPU (most edits in scope; f32 within 0.02, bf16
  # within 0.1), with each run's edit seconds.
  log="$LOG_DIR/default_preset.log"
  verdict=ok
  {
    printf '{"id":"k%d","subject":"Subject%d","prompt":"The code of Subject%d is","target_new":" v%d","rephrases":["Subject%d has the code"],"locality":[{"prompt":"Other%d is","answer":" w"}]}\n' \
      $(for i in $(seq 12); do echo "$i $i $i $i $i $i"; done) >"$smoke/default-edits.jsonl" &&
      printf 'answer_gate = 0.0\n' >"$smoke/ungated.toml" &&
      "$BUNDLE/elder" --device cpu edit --model "$smoke/model" --edits "$smoke/default-edits.jsonl" \
        --state "$smoke/ungated-state" --config "$smoke/ungated.toml" --json >/dev/null &&
      "$BUNDLE/elder" --device cpu edit --model "$smoke/model" --edits "$smoke/default-edits.jsonl" \
        --state "$smoke/default-state" --json >/dev/null &&
      runs_ok=1 &&
      for d in "cpu f32" "cuda f32" "cuda bf16"; do
        read -r device dtype <<<"$d"
        for p in "The code of Subject3 is| v3|edit" "Other3 is| w|other"; do
          IFS='|' read -r prompt target tag <<<"$p"
          "$BUNDLE/elder" --device "$device" --gpu-dtype "$dtype" score --model "$smoke/model" \
            --state "$smoke/ungated-state" --prompt "$prompt" --target "$target" --json \
            >"$smoke/default-score-$tag-$device-$dtype.json" || runs_ok=0
        done
        "$BUNDLE/elder" --device "$device" --gpu-dtype "$dtype" score --model "$smoke/model" \
          --prompt "The code of Subject3 is" --target " v3" --json >"$smoke/default-score-base-$device-$dtype.json" ||
          runs_ok=0
        "$BUNDLE/elder" --device "$device" --gpu-dtype "$dtype" eval --model "$smoke/model" \
          --state "$smoke/default-state" --data "$smoke/default-edits.jsonl" --json \
          >"$smoke/default-eval-$device-$dtype.json" || runs_ok=0
        # The ungated edits trained on this device (on the CPU: the state scored above), then
        # evaluated on it: the gate would turn every edit of the random tiny model away.
        ungated="$smoke/ungated-state"
        if [ "$device" = cuda ]; then
          ungated="$smoke/ungated-state-$dtype"
          "$BUNDLE/elder" --device cuda --gpu-dtype "$dtype" edit --model "$smoke/model" \
            --edits "$smoke/default-edits.jsonl" --state "$ungated" --config "$smoke/ungated.toml" \
            --json >"$smoke/default-edit-cuda-$dtype.json" || runs_ok=0
        fi
        "$BUNDLE/elder" --device "$device" --gpu-dtype "$dtype" eval --model "$smoke/model" \
          --state "$ungated" --data "$smoke/default-edits.jsonl" --json \
          >"$smoke/default-eval-trained-$device-$dtype.json" || runs_ok=0
      done &&
      [ "$runs_ok" = 1 ] &&
      python3 -c '
import json, sys
d = sys.argv[1]
load = lambda kind, dev: json.load(open(f"{d}/default-{kind}-{dev}.json"))
ok = True
for dev, tol in (("cuda-f32", 1e-3), ("cuda-bf16", 0.1)):
    for tag in ("edit", "other"):
        a, b = load("score-" + tag, "cpu-f32"), load("score-" + tag, dev)
        diff = max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))
        sa, sb = a["in_scope"], b["in_scope"]
        print(f"{dev} {tag}: in scope cpu {sa} cuda {sb}, max |logprob diff| {diff:.2e}")
        ok = ok and a["in_scope"] == b["in_scope"] and diff <= tol
    e, m = load("eval", "cpu-f32"), load("eval", dev)
    for k in ("reliability", "generalization", "locality", "in_scope_edits"):
        print(f"{dev} eval {k}: cpu {e[k]:.4f} cuda {m[k]:.4f}")
        ok = ok and abs(e[k] - m[k]) <= (0.02 if dev == "cuda-f32" else 0.1)
    c, t = load("eval", "trained-cpu-f32"), load("eval", "trained-" + dev)
    ok = ok and c["in_scope_edits"] > 0.5
    for k in ("reliability", "generalization", "locality", "in_scope_edits"):
        print(f"{dev} ungated, trained on the GPU, eval {k}: cpu-trained {c[k]:.4f} gpu-trained {t[k]:.4f}")
        ok = ok and abs(c[k] - t[k]) <= (0.02 if dev == "cuda-f32" else 0.1)
    s = load("edit", dev)
    spe, its = s.get("seconds_per_edit"), s.get("mean_iterations")
    print(f"{dev} edit: {spe} s per edit, {its} iterations per batch")
edit, base = load("score-edit", "cpu-f32"), load("score-base", "cpu-f32")
moved = max(abs(x - y) for x, y in zip(edit["logprobs"], base["logprobs"]))
scoped = edit["in_scope"]
print(f"the edit moved its prompt by {moved:.3f} (in scope: {scoped})")
ok = ok and edit["in_scope"] is True and moved > 0.05
sys.exit(0 if ok else 1)
' "$smoke"
  } >"$log" 2>&1 || { verdict=FAIL; status=1; tail -n 20 "$log"; }
  ROWS+=("cli   default preset: score, eval and edits on cuda f32/bf16 (vs cpu)  $verdict")
  while read -r line; do ROWS+=("cli   $line"); done < <(grep -E 'edit: .* s per edit' "$log")
else
  ROWS+=("cli   elder binary MISSING from $BUNDLE")
  status=1
fi

# Criterion's default 3 s warm-up and 5 s measurement per benchmark would spend most of a session's
# device time; medians of 3 s are enough here. GPU_CHECK_BENCH_FILTER picks benchmarks by name
# (a criterion filter, e.g. "copy|decode_step") when time is short.
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---warm-up-time 1 --measurement-time 3}
BENCH_LOGS=()
for b in "$BUNDLE"/benches/*; do
  [ -x "$b" ] || continue
  name=$(basename "$b")
  log="$LOG_DIR/$name.log"
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
  "$b" --bench $BENCH_ARGS ${GPU_CHECK_BENCH_FILTER:+"$GPU_CHECK_BENCH_FILTER"} >"$log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then status=1; ROWS+=("bench $name  FAILED (exit $rc)"); tail -n 20 "$log"; fi
  if grep '^SKIP ' "$log"; then status=1; ROWS+=("bench $name  SKIPPED"); fi
  BENCH_LOGS+=("$log")
done
# Kernel GB/s as a fraction of the measured copy rate, decode against its floor, edits against the
# paper (tools/bench_table.py).
if [ "${#BENCH_LOGS[@]}" -gt 0 ]; then
  while read -r line; do ROWS+=("bench $line"); done < <(python3 "$BUNDLE/bench_table.py" "${BENCH_LOGS[@]}")
fi

echo
echo "== GPU check summary (logs in $LOG_DIR)"
printf '%s\n' "${ROWS[@]}"
exit $status
