#!/usr/bin/env bash
# qemu-img convert reading a session image exported by `timezero serve` over NBD (unix socket)
# vs qemu-img convert reading the source file directly, same size, interleaved round by round.
#
# Phase 1: a no-copy session over the whole source, nothing copied: every image read is
#          redirected to the source (the point-in-time read path before any copy).
# Phase 2: the same session after `timezero copy --convert` (sent to the server through its
#          control socket): every image read comes from the target.
#
# DIRECT=1 (default): the direct read uses -T none (O_DIRECT) and the server runs with
# --direct (O_DIRECT volumes), so neither side reads from the page cache. DIRECT=0: both
# buffered. The output is written with -t none in both cases.
# Usage: scripts/nbd-compare.sh [DIR]   (env: SIZE_MIB=2048 ROUNDS=3 DIRECT=1 TIMEZERO=path
#                                         IO_URING=0: serve with --io-uring when 1)
set -euo pipefail

if ! command -v qemu-img >/dev/null 2>&1; then
    echo "nbd-compare: qemu-img not found (Debian: apt-get install qemu-utils); skipping"
    exit 0
fi
TZ_BIN=${TIMEZERO:-$(dirname "$0")/../target/release/timezero}
if [ ! -x "$TZ_BIN" ]; then
    echo "nbd-compare: $TZ_BIN missing; run cargo build --release first" >&2
    exit 1
fi
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-3}
DIRECT=${DIRECT:-1}
IO_URING=${IO_URING:-0}
DIR=$(mktemp -d "${1:-${TMPDIR:-/tmp}}/nbd-compare.XXXXXX")
SRC=$DIR/src.img TGT=$DIR/tgt.img OUT=$DIR/out.img TAB=$DIR/table.tz SOCK=$DIR/table.nbd
SERVER=
cleanup() {
    if [ -n "$SERVER" ]; then
        "$TZ_BIN" stop "$TAB" >/dev/null 2>&1 || kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT

now() { date +%s.%N; }
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

SRV_FLAGS=() SRC_CACHE=writeback
if [ "$DIRECT" = 1 ]; then SRV_FLAGS+=(--direct); SRC_CACHE=none; fi
if [ "$IO_URING" = 1 ]; then SRV_FLAGS+=(--io-uring); fi

dd if=/dev/urandom of="$SRC" bs=1M count="$SIZE_MIB" conv=fsync status=none
dd if=/dev/zero of="$TGT" bs=1M count="$SIZE_MIB" conv=fsync status=none
"$TZ_BIN" init "$TAB" >/dev/null
"$TZ_BIN" establish "$TAB" "$SRC" "$TGT" --nocopy >/dev/null
"$TZ_BIN" "${SRV_FLAGS[@]}" serve "$TAB" --socket "$SOCK" >"$DIR/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 500); do [ -S "$SOCK" ] && break; sleep 0.02; done
[ -S "$SOCK" ] || { echo "nbd-compare: server did not start" >&2; cat "$DIR/serve.log" >&2; exit 1; }
sleep 0.2
URL="nbd+unix:///s1?socket=$SOCK"

echo "nbd-compare: ${SIZE_MIB} MiB, $ROUNDS rounds, DIRECT=$DIRECT, in $DIR"
echo "qemu-img: $(qemu-img --version | head -1); $(head -1 "$DIR/serve.log")"
"$TZ_BIN" status "$TAB" | tail -1

run_file() { rm -f "$OUT"; local t0; t0=$(now); qemu-img convert -T "$SRC_CACHE" -t none -f raw -O raw "$SRC" "$OUT"; echo "$(now) - $t0" | bc -l; }
run_nbd() { rm -f "$OUT"; local t0; t0=$(now); qemu-img convert -t none -f raw -O raw "$URL" "$OUT"; echo "$(now) - $t0" | bc -l; }

phase() {
    local label=$1 ratios=() r f n ratio
    for r in $(seq 1 "$ROUNDS"); do
        sync
        if [ $((r % 2)) -eq 1 ]; then f=$(run_file); n=$(run_nbd); else n=$(run_nbd); f=$(run_file); fi
        ratio=$(echo "$f / $n" | bc -l)
        ratios+=("$ratio")
        printf '%s round %d: convert from file %.3f s (%.0f MB/s), from timezero NBD image %.3f s (%.0f MB/s), NBD speed / file %.2fx\n' \
            "$label" "$r" "$f" "$(echo "$SIZE_MIB * 1.048576 / $f" | bc -l)" "$n" "$(echo "$SIZE_MIB * 1.048576 / $n" | bc -l)" "$ratio"
    done
    printf 'median (%s): NBD image speed / direct file = %.2fx\n' "$label" "$(med "${ratios[@]}")"
}

phase "uncopied"
cmp -n $((SIZE_MIB << 20)) "$SRC" "$OUT" >/dev/null || { echo "nbd-compare: image differs from source" >&2; exit 1; }
"$TZ_BIN" copy "$TAB" s1 --convert >/dev/null
phase "copied"
cmp -n $((SIZE_MIB << 20)) "$SRC" "$OUT" >/dev/null || { echo "nbd-compare: image differs from source" >&2; exit 1; }
