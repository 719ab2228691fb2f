#!/usr/bin/env bash
# Build, on a development machine, everything the GPU machine runs (it has no Rust), and copy it into
# gpu-bundle/ next to tools/gpu_check.sh:
#
#   tools/collect_gpu_bundle.sh   # -> gpu-bundle/{tests,benches}/..., elder, fixtures/, gpu_check.sh,
#                                 #    bench_table.py
#   scp -r gpu-bundle gpu-host: && ssh gpu-host gpu-bundle/gpu_check.sh
#
# The executables embed the kernel fatbins (sm_90 + compute_80 PTX), so nvcc must be available here
# (.cuda-tools/, see docs/gpu.md). Release test binaries keep debug asserts off but run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
export NVCC="${NVCC:-$PWD/.cuda-tools/nvidia/cu13/bin/nvcc}"
OUT=gpu-bundle
rm -rf "$OUT"
mkdir -p "$OUT/tests" "$OUT/benches"

# cargo prints one JSON line per artifact; keep the executables of the gpu_* tests and the GPU benches.
collect() {
  local dest=$1
  shift
  cargo "$@" --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    name = (m.get("target") or {}).get("name", "")
    if exe and (name.startswith("gpu_") or name.endswith("_gpu")):
        print(name + "\t" + exe)
' | while IFS=$'\t' read -r name exe; do
    cp "$exe" "$dest/$name"
    echo "collected $dest/$name"
  done
}
collect "$OUT/tests" test --release --no-run
collect "$OUT/benches" bench --no-run
# The command line (for the end-to-end CUDA smoke test) and the parity fixtures the GPU model tests
# read (found through ELDER_FIXTURES_DIR there, since the source tree is not on the GPU machine).
cargo build --release --bin elder
cp target/release/elder "$OUT/"
mkdir -p "$OUT/fixtures"
cp -r tests/fixtures/parity "$OUT/fixtures/"
cp tools/gpu_check.sh tools/bench_table.py tools/bench_serve.py "$OUT/"
echo "bundle ready: $OUT/ (run $OUT/gpu_check.sh on the GPU machine)"
