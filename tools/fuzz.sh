#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 600), one after
# the other, starting from its corpus (fuzz/corpus/TARGET/, which it grows) and the hand-made
# seeds (fuzz/seeds/TARGET/, tools/fuzz_seeds.py, left as they are), minimises each corpus (`cargo fuzz cmin`, then drops inputs over 64 KiB: the corpora
# are committed and replayed by tests/fuzz_corpora.rs), and prints a table of executions, seconds
# fuzzed, corpus size and the crashes found (crash-/leak-/timeout-/oom- files under
# fuzz/artifacts/TARGET/).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). A run that stops on a
# crash is restarted for the time left (at most 5 times per target), so one bug does not end a
# target's session. Logs: fuzz/artifacts/logs/TARGET.log. CARGO_BUILD_JOBS defaults to 1.
set -uo pipefail

cd "$(dirname "$0")/.."
seconds=${1:-600}
shift $(($# > 0 ? 1 : 0))
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
fuzz_args=(-rss_limit_mb=2048 -timeout=10)
max_input=$((64 * 1024))

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
logs=fuzz/artifacts/logs
mkdir -p "$logs"

cargo +nightly fuzz build || exit 1

count_crashes() {
    find "fuzz/artifacts/$1" -maxdepth 1 -type f \
        \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) 2>/dev/null |
        wc -l
}

rows=()
for target in "${targets[@]}"; do
    log="$logs/$target.log"
    : >"$log"
    mkdir -p "fuzz/corpus/$target"
    crashes_before=$(count_crashes "$target")
    execs=0
    start=$(date +%s)
    for attempt in 1 2 3 4 5 6; do
        left=$((seconds - ($(date +%s) - start)))
        [ "$left" -gt 0 ] || break
        echo "== $target: run $attempt, ${left}s" | tee -a "$log"
        cargo +nightly fuzz run "$target" "$PWD/fuzz/corpus/$target" "$PWD/fuzz/seeds/$target" \
            -- -max_total_time="$left" -print_final_stats=1 \
            "${fuzz_args[@]}" >>"$log.run" 2>&1
        rc=$?
        n=$(grep -a 'stat::number_of_executed_units' "$log.run" | tail -1 | awk '{print $2}')
        execs=$((execs + ${n:-0}))
        cat "$log.run" >>"$log"
        rm -f "$log.run"
        [ "$rc" -eq 0 ] && break
        echo "== $target: run $attempt exited with $rc" | tee -a "$log"
    done
    ran=$(($(date +%s) - start))
    echo "== $target: cmin" >>"$log"
    cargo +nightly fuzz cmin "$target" -- "${fuzz_args[@]}" >>"$log" 2>&1 ||
        echo "== $target: cmin failed (corpus left as it was)" | tee -a "$log"
    find "fuzz/corpus/$target" -type f -size +"${max_input}"c -print -delete >>"$log"
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    crashes=$(($(count_crashes "$target") - crashes_before))
    rows+=("$(printf '%-16s %12s %8s %8s %8s' "$target" "$execs" "$ran" "$corpus" "$crashes")")
    echo "${rows[-1]}"
done

echo
printf '%-16s %12s %8s %8s %8s\n' target executions seconds corpus crashes
printf '%s\n' "${rows[@]}"
