#!/usr/bin/env bash
# Side-by-side CPU timings of the engine and PyTorch (transformers) in one run, same threads:
#  - forward of a 32-token prompt on the gpt2 (124M) preset (seeded random weights, seed 0);
#  - one ELDER edit (6 MoLoRA layers x 4 experts, r 8, 50 Adam iterations, 20-token edit) on the
#    same checkpoint, PyTorch done the released code's way (dense experts, routing every forward);
#  - the same edit on the real SmolLM2-135M (models/smollm2-135m, when present): the engine's preset
#    (6 MoLoRA layers on down_proj from block 22, query at block 21) in both.
#  Each edit also PyTorch done well (bench_torch_edit.py --done-well --compile: selected experts only,
#  the frozen prefix cached, the head on the target rows, torch.compile on the trained blocks).
# The default preset's edit stream against PyTorch done well: tools/bench_stream_compare.sh.
# Needs the torch venv (tools/setup_torch.sh) at $TORCH_VENV (default .venv-torch).
# Usage: tools/bench_cpu_compare.sh [threads]   (prints medians and ratios; criterion reports in target/criterion)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
py="${TORCH_VENV:-.venv-torch}/bin/python"
ckpt="target/bench-gpt2-124m"
export RAYON_NUM_THREADS="$threads"

cargo build --release --quiet
[ -f "$ckpt/config.json" ] || target/release/elder init-random --arch gpt2 --preset gpt2 --seed 0 --out "$ckpt" --dtype f32

median_ms() { # criterion's estimates.json -> median in ms
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['median']['point_estimate']/1e6)" "$1"
}

cargo bench --quiet --bench cpu_forward -- --noplot gpt2-124m >/dev/null
cargo bench --quiet --bench cpu_edit -- --noplot >/dev/null
elder_fwd=$(median_ms target/criterion/cpu_forward_32_tokens/gpt2-124m/new/estimates.json)
elder_edit=$(median_ms "target/criterion/cpu_edit_50_iterations_gpt2-124m/new/estimates.json")

"$py" tools/bench_torch_forward.py --model "$ckpt" --tokens 32 --threads "$threads" --attn eager --json target/torch_forward.json >/dev/null
"$py" tools/bench_torch_edit.py --model "$ckpt" --site c_fc --threads "$threads" --random-tokens \
  --prompt-tokens 17 --target-tokens 3 --edits 3 --json target/torch_edit.json >/dev/null
"$py" tools/bench_torch_edit.py --model "$ckpt" --site c_fc --threads "$threads" --random-tokens \
  --prompt-tokens 17 --target-tokens 3 --edits 3 --done-well --compile --json target/torch_edit_well.json >/dev/null 2>&1
rows=()
smol=models/smollm2-135m
if [ -f "$smol/config.json" ]; then
  "$py" tools/bench_torch_edit.py --model "$smol" --site down_proj --layers 6 --first-block 22 --threads "$threads" \
    --random-tokens --prompt-tokens 17 --target-tokens 3 --edits 3 --json target/torch_edit_smollm2.json >/dev/null
  "$py" tools/bench_torch_edit.py --model "$smol" --site down_proj --layers 6 --first-block 22 --threads "$threads" \
    --random-tokens --prompt-tokens 17 --target-tokens 3 --edits 3 --done-well --compile \
    --json target/torch_edit_smollm2_well.json >/dev/null 2>&1
  elder_smol=$(median_ms "target/criterion/cpu_edit_50_iterations_smollm2-135m/new/estimates.json")
  torch_smol=$(python3 -c "import json; print(json.load(open('target/torch_edit_smollm2.json'))['median_s_per_edit']*1000)")
  well_smol=$(python3 -c "import json; print(json.load(open('target/torch_edit_smollm2_well.json'))['median_s_per_edit']*1000)")
  rows+=("one edit (50 it.), smollm2-135m|$elder_smol|$torch_smol|$well_smol")
else
  echo "SKIP smollm2-135m: $smol not found (tools/fetch_smollm2.sh)"
fi
torch_fwd=$(python3 -c "import json; print(json.load(open('target/torch_forward.json'))['median_ms'])")
torch_edit=$(python3 -c "import json; print(json.load(open('target/torch_edit.json'))['median_s_per_edit']*1000)")
well_edit=$(python3 -c "import json; print(json.load(open('target/torch_edit_well.json'))['median_s_per_edit']*1000)")

printf '\nCPU, %s threads, %s (torch: the released code way; torch well: done well, see above)\n' "$threads" "$(date -u +%F)"
printf '%-34s %12s %12s %8s %14s %8s\n' workload "elder (ms)" "torch (ms)" "t/elder" "torch well (ms)" "tw/elder"
for row in "forward 32 tokens, gpt2-124m|$elder_fwd|$torch_fwd|" "one edit (50 it.), gpt2-124m|$elder_edit|$torch_edit|$well_edit" "${rows[@]}"; do
  IFS='|' read -r name e t w <<<"$row"
  if [ -n "$w" ]; then
    printf '%-34s %12.1f %12.1f %8.2f %14.1f %8.2f\n' "$name" "$e" "$t" "$(python3 -c "print($t/$e)")" "$w" "$(python3 -c "print($w/$e)")"
  else
    printf '%-34s %12.1f %12.1f %8.2f %14s %8s\n' "$name" "$e" "$t" "$(python3 -c "print($t/$e)")" "-" "-"
  fi
done
