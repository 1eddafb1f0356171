#!/usr/bin/env bash
# Power cuts under the real binary (tests/powerloss.rs) outside the test suite, with any number
# of cuts and any seed. Usage: scripts/powerloss.sh [CUTS] [SEED]
#   CUTS  power cuts (default 200)
#   SEED  seed of the cut points, loss policies and workloads (default 17, the test suite's)
# Set CANARY=1 to run with the engine's skipped-flush canary, CANARY=log with the copy log's
# skipped-write canary: the run must then report violations (and exits 0 when it does). Needs root and /dev/fuse (the test says so and skips
# otherwise). The last line is
#   power cuts N, wrong images W, lost acknowledged writes L, ordering violations V
# Exit status: 0 when no violation was found (or, with a canary, when some were), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
cuts="${1:-200}"
seed="${2:-17}"
log="$(mktemp /var/tmp/powerloss.XXXXXX.log)"
rc=0
TIMEZERO_POWERLOSS_CUTS="$cuts" TIMEZERO_POWERLOSS_SEED="$seed" \
  TIMEZERO_POWERLOSS_CANARY="${CANARY:-0}" \
  cargo test --release --all-features --test powerloss \
  power_cuts_under_the_binary_keep_images_and_acknowledged_writes -- --nocapture \
  >"$log" 2>&1 || rc=$?
grep -E '^(powerloss:|  VIOLATION|SKIPPED)' "$log" || true
if grep -q '^SKIPPED' "$log"; then
  echo "log: $log"
  exit 1
fi
line="$(grep -E '^power cuts [0-9]+, ' "$log" | tail -n 1 || true)"
if [ -z "$line" ]; then
  tail -n 40 "$log"
  echo "log: $log"
  echo "power cuts ?, wrong images ?, lost acknowledged writes ?, ordering violations ?"
  exit 1
fi
echo "log: $log"
echo "$line"
exit "$rc"
