#!/usr/bin/env bash
# Run every cargo-fuzz target for SECONDS each (default 30).
#
#   scripts/fuzz.sh [SECONDS]
#
# New inputs go to fuzz/target/corpus-work/<target> (not committed); the committed seeds in
# fuzz/corpus/<target> are read only. Crashes land in fuzz/artifacts/<target>/.
# Without a nightly toolchain or cargo-fuzz the run is SKIPPED (exit 0, and it says so).
#
# FUZZ_SEED=N fixes libFuzzer's seed and FUZZ_RUNS=N caps the executions per target (scaled per
# target by its speed, see below), so that a run from a fresh clone is reproducible: CI uses
# both, and SECONDS only as a safety cap.
set -euo pipefail
secs="${1:-30}"
cd "$(dirname "$0")/.."
targets=(table_decode table_open op_script nbd_request)

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz.sh: SKIPPED: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: SKIPPED: cargo-fuzz not installed (cargo install cargo-fuzz)"
    exit 0
fi

failed=()
for t in "${targets[@]}"; do
    work="fuzz/target/corpus-work/$t"
    mkdir -p "$work"
    echo "=== fuzz $t for ${secs}s"
    extra=()
    if [[ -n "${FUZZ_SEED:-}" ]]; then extra+=(-seed="$FUZZ_SEED"); fi
    if [[ -n "${FUZZ_RUNS:-}" ]]; then
        # Executions per target relative to FUZZ_RUNS: the decoders run ~100x faster than a
        # whole table open or an op script on simulated devices.
        case "$t" in
            table_decode | nbd_request) extra+=(-runs=$((FUZZ_RUNS * 100))) ;;
            table_open) extra+=(-runs=$((FUZZ_RUNS * 2))) ;;
            *) extra+=(-runs="$FUZZ_RUNS") ;;
        esac
    fi
    if ! (cd fuzz && cargo +nightly fuzz run "$t" "../$work" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 "${extra[@]}"); then
        failed+=("$t")
    fi
done
if ((${#failed[@]})); then
    echo "fuzz.sh: FAILED: ${failed[*]} (see fuzz/artifacts/)"
    exit 1
fi
echo "fuzz.sh: all ${#targets[@]} targets ran (at most ${secs}s each${FUZZ_RUNS:+, run counts from FUZZ_RUNS=$FUZZ_RUNS}${FUZZ_SEED:+, seed $FUZZ_SEED}) without a crash"
