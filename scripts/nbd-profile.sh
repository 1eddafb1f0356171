#!/usr/bin/env bash
# Where a first write's time goes through `timezero serve` (NBD): one qemu-img bench of 4 KiB
# first writes (a 64 KiB stride, so each write copies its grain first) against a no-copy session,
# with perf watching the server. Writes, in OUT (default: a new directory under DIR):
#   syscalls.txt  per thread: count, total and mean time of each system call (perf trace -s)
#   oncpu.svg     flame graph of the server's CPU time (perf record --call-graph dwarf; inferno)
#   oncpu.folded  the same stacks, folded
#   bench.txt     qemu-img's own figures for each of the two runs
# The bench sends no flush, so profile the write-through path with TZ_FLAGS=--write-through
# (the servers' default, write-back, holds first writes until a flush).
# Needs root (perf), qemu-img and, for the flame graph, inferno (cargo install inferno).
# Usage: scripts/nbd-profile.sh [DIR]   (env: SIZE_MIB=256 COUNT=4096 DEPTH=1 TIMEZERO=path
#                                        TZ_FLAGS= OUT=)
set -euo pipefail
for t in qemu-img perf; do
    command -v "$t" >/dev/null 2>&1 || { echo "nbd-profile: $t not found; skipping"; exit 0; }
done
TZ_BIN=${TIMEZERO:-$(dirname "$0")/../target/release/timezero}
[ -x "$TZ_BIN" ] || { echo "nbd-profile: $TZ_BIN missing; run cargo build --release first" >&2; exit 1; }
SIZE_MIB=${SIZE_MIB:-256} COUNT=${COUNT:-4096} DEPTH=${DEPTH:-1}
DIR=$(mktemp -d "${1:-${TMPDIR:-/tmp}}/nbd-profile.XXXXXX")
OUT=${OUT:-$DIR/out}
mkdir -p "$OUT"
SRC=$DIR/src.img TGT=$DIR/tgt.img TAB=$DIR/t.tz SOCK=$DIR/nbd.sock
PID=
# Stop the server (the profiler's child), then wait for the profiler to write its results.
stop() {
    if [ -n "$PID" ]; then
        pkill -TERM -P "$PID" -x timezero 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
        PID=
    fi
    rm -f "$SOCK"
}
trap 'stop; rm -f "$SRC" "$TGT"' EXIT
start() {
    rm -f "$TAB" "$TAB".* "$TGT"
    dd if=/dev/urandom of="$SRC" bs=1M count="$SIZE_MIB" conv=fsync status=none
    truncate -s "${SIZE_MIB}M" "$TGT"; fallocate -l "${SIZE_MIB}M" "$TGT" 2>/dev/null || true
    "$TZ_BIN" init "$TAB" >/dev/null
    "$TZ_BIN" establish "$TAB" "$SRC" "$TGT" --nocopy >/dev/null
    # The server runs under the given profiler ("$@"), which follows every thread it starts.
    # shellcheck disable=SC2086
    "$@" "$TZ_BIN" --direct ${TZ_FLAGS:-} serve "$TAB" --socket "$SOCK" >"$DIR/server.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 500); do [ -S "$SOCK" ] && return 0; sleep 0.02; done
    echo "nbd-profile: server did not start" >&2; cat "$DIR/server.log" >&2; exit 1
}
bench() {
    qemu-img bench -w -f raw -c "$COUNT" -d "$DEPTH" -s 4096 -S 65536 --pattern=0x5a \
        "nbd+unix:///src.img?socket=$SOCK"
}
echo "nbd-profile: $(date -u +%FT%TZ), $COUNT first writes of 4 KiB, depth $DEPTH, $TZ_BIN --direct ${TZ_FLAGS:-} serve" | tee "$OUT/bench.txt"

# 1. System calls per thread, with their times (tracepoints: little overhead).
start perf trace -s -o "$OUT/syscalls.txt" --
bench | tee -a "$OUT/bench.txt"
stop

# 2. CPU time by call stack.
start perf record -q -F 499 --call-graph dwarf,16384 -o "$DIR/perf.data" --
bench | tee -a "$OUT/bench.txt"
stop
if command -v inferno-collapse-perf >/dev/null 2>&1; then
    perf script -i "$DIR/perf.data" 2>/dev/null | inferno-collapse-perf >"$OUT/oncpu.folded"
    inferno-flamegraph --title "timezero serve: CPU time of $COUNT NBD first writes (depth $DEPTH)" \
        <"$OUT/oncpu.folded" >"$OUT/oncpu.svg"
else
    echo "nbd-profile: inferno not found (cargo install inferno); no flame graph" >&2
fi
echo "nbd-profile: results in $OUT"
