#!/usr/bin/env bash
# The default preset's edit stream, the engine and PyTorch done well side by side (issue 19):
# `elder --device cpu edit` of the first N geo edits into a fresh state, against
# tools/bench_torch_stream.py (the same sequences, experts, loss and early stop; eager and
# torch.compile), alternating, R rounds, same threads. Compared: the prepare and the iterations
# (the engine's key reads and commits have no PyTorch counterpart and are left out of both).
# Needs the torch venv (tools/setup_torch.sh) at $TORCH_VENV (default .venv-torch) and
# models/smollm2-135m (tools/fetch_smollm2.sh).
# Usage: tools/bench_stream_compare.sh [edits=64] [rounds=2] [threads=nproc] [expert rows: all|answer]
#   (all: the default preset; answer: `expert_rows = "answer"`, the throughput setting, in both)
set -euo pipefail
cd "$(dirname "$0")/.."
edits="${1:-64}"
rounds="${2:-2}"
threads="${3:-$(nproc)}"
rows="${4:-all}"
case "$rows" in all | answer) ;; *) echo "error: expert rows '$rows': expected all or answer" >&2; exit 2 ;; esac
py="${TORCH_VENV:-.venv-torch}/bin/python"
model=models/smollm2-135m
data=data/geo_facts.jsonl
out="${BENCH_OUT:-target/bench-stream-$rows}"
export RAYON_NUM_THREADS="$threads"
[ -f "$model/config.json" ] || { echo "error: $model not found (tools/fetch_smollm2.sh)" >&2; exit 2; }
[ -x "$py" ] || { echo "error: no torch venv at $py (tools/setup_torch.sh)" >&2; exit 2; }
cargo build --release --quiet
mkdir -p "$out"
config=""
if [ "$rows" = answer ]; then
  config="$out/answer-rows.toml"
  echo 'expert_rows = "answer"' >"$config"
fi
for r in $(seq 1 "$rounds"); do
  state="$out/state-$r"
  rm -rf "$state"
  target/release/elder --device cpu edit --model "$model" --edits "$data" --state "$state" \
    --limit "$edits" ${config:+--config "$config"} --json >"$out/elder-$r.json"
  rm -rf "$state"
  "$py" tools/bench_torch_stream.py --model "$model" --edits "$data" --limit "$edits" \
    --threads "$threads" --expert-rows "$rows" --json "$out/torch-$r.json" >/dev/null 2>&1
  "$py" tools/bench_torch_stream.py --model "$model" --edits "$data" --limit "$edits" \
    --threads "$threads" --expert-rows "$rows" --compile --json "$out/torch-compile-$r.json" >/dev/null 2>&1
done
python3 - "$out" "$rounds" "$edits" "$threads" "$rows" <<'EOF'
import json, statistics, sys
out, rounds, edits, threads, rows_mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def load(name):
    return [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, rounds + 1)]
rows = []
for d in load("elder"):
    t = d["times"]
    rows.append(("elder", (t["prepare"] + t["iterations"]) / edits, t["prepare"] / edits,
                 t["iterations"] / edits, d["mean_iterations"]))
for name, label in (("torch", "torch done well"), ("torch-compile", "torch done well, compiled")):
    for d in load(name):
        rows.append((label, d["s_per_edit"], d["prepare_s_per_edit"], d["iterations_s_per_edit"],
                     d["mean_iterations"]))
setting = "default preset" if rows_mode == "all" else 'expert_rows = "answer"'
print(f"\n{edits} geo edits, {setting}, CPU, {threads} threads, {rounds} rounds (medians; "
      "prepare + iterations, keys and commits left out)")
print(f"{'':28} {'s / edit':>9} {'prepare':>9} {'iterations':>11} {'it / batch':>11} {'x elder':>8}")
by = {}
for label, *vals in rows:
    by.setdefault(label, []).append(vals)
base = statistics.median(v[0] for v in by["elder"])
for label, vals in by.items():
    med = [statistics.median(v[i] for v in vals) for i in range(4)]
    print(f"{label:28} {med[0]:9.3f} {med[1]:9.3f} {med[2]:11.3f} {med[3]:11.1f} {med[0] / base:8.2f}")
EOF
