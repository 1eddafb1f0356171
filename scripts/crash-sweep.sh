#!/usr/bin/env bash
# Run the crash-state enumerator with every-I/O error sweeps over many seeds and report the
# violations per seed. Usage: scripts/crash-sweep.sh SEEDS WORKLOADS
#   SEEDS      a list ("3 7 99"), a range ("1-20") or a mix ("1-20 99 4711")
#   WORKLOADS  workloads per seed (default 60)
# Environment: WRITE_BACK=1 runs every other round of the workload templates with the engine in
# write-back mode (crashtest --write-back); SERIAL_COPIES=1 runs every workload with serial
# copy-before-write (`--serial-copies`) instead of the engine's default checked copy records.
# Exit status: 0 when no seed reported a violation, 1 otherwise. One JSON report per seed is kept
# in $OUT (default: a new directory under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
# The enumerator builds and drops many device images of a few MiB each; glibc's default
# allocator hands such blocks back to the kernel at every free, and the next image faults every
# page in again (41 % of the enumerator's time in page faults). Keeping freed memory in the
# process makes a seed about 1.3x faster (docs/crash-model.md). Ignored by other allocators.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=4294967295}"
seeds_arg="${1:?usage: scripts/crash-sweep.sh SEEDS [WORKLOADS]}"
workloads="${2:-60}"
modes=()
[ "${WRITE_BACK:-0}" = 1 ] && modes+=(--write-back)
[ "${SERIAL_COPIES:-0}" = 1 ] && modes+=(--serial-copies)
out="${OUT:-$(mktemp -d /var/tmp/crash-sweep.XXXXXX)}"
mkdir -p "$out"
seeds=()
for part in $seeds_arg; do
  if [[ "$part" =~ ^([0-9]+)-([0-9]+)$ ]]; then
    for ((s = BASH_REMATCH[1]; s <= BASH_REMATCH[2]; s++)); do seeds+=("$s"); done
  elif [[ "$part" =~ ^[0-9]+$ ]]; then
    seeds+=("$part")
  else
    echo "crash-sweep: bad seed '$part' (want N or N-M)" >&2
    exit 2
  fi
done
cargo build --release --features fault --quiet
bin=target/release/timezero
failed=0
echo "modes: ${modes[*]:-default}"
printf '%-8s %-10s %-12s %-10s %s\n' seed workloads states violations seconds
for s in "${seeds[@]}"; do
  start=$(date +%s)
  rc=0
  "$bin" crashtest --workloads "$workloads" --seed "$s" --eio-points all ${modes[@]+"${modes[@]}"} --json \
    >"$out/seed-$s.json" 2>"$out/seed-$s.err" || rc=$?
  secs=$(( $(date +%s) - start ))
  read -r states violations < <(python3 -c '
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print(r["states_total"], r["violations"])
except Exception:
    print("?", "?")
' "$out/seed-$s.json")
  printf '%-8s %-10s %-12s %-10s %s\n' "$s" "$workloads" "$states" "$violations" "$secs"
  if [ "$rc" -ne 0 ] || [ "$violations" != "0" ]; then
    failed=1
    python3 -c '
import json, sys
try:
    for v in json.load(open(sys.argv[1]))["violation_samples"][:3]:
        print("    " + v[:400])
except Exception:
    pass
' "$out/seed-$s.json"
  fi
done
echo "reports: $out"
exit "$failed"
