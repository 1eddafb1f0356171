#!/usr/bin/env bash
# Side-by-side with QEMU, interleaved round by round (see docs/design anchors):
#  1. qemu-img bench of 4 KiB first writes (64 KiB stride) through the copy-before-write filter
#     vs the same bench on the raw file;
#  2. `timezero bench` first writes at the same depth vs raw pwrite+fdatasync (same process);
#  3. qemu-img convert -n -t none -T none vs `timezero copy` of the same image, both into a
#     preallocated zero-filled target.
# Usage: scripts/qemu-compare.sh [DIR]   (env: SIZE_MIB=512 ROUNDS=3 DEPTH=32 TIMEZERO=path
#                                          TZ_FLAGS="--direct" for O_DIRECT engine volumes)
# The NBD read comparison (qemu-img convert from `timezero serve`) is scripts/nbd-compare.sh.
# The 2 GiB copy comparison of two timezero builds against convert, O_DIRECT and buffered, is
# scripts/copy-compare.sh.
set -euo pipefail

if ! command -v qemu-img >/dev/null 2>&1; then
    echo "qemu-compare: qemu-img not found (Debian: apt-get install qemu-utils); skipping"
    exit 0
fi
TZ_BIN=${TIMEZERO:-$(dirname "$0")/../target/release/timezero}
if [ ! -x "$TZ_BIN" ]; then
    echo "qemu-compare: $TZ_BIN missing; run cargo build --release first" >&2
    exit 1
fi
SIZE_MIB=${SIZE_MIB:-512}
ROUNDS=${ROUNDS:-3}
DEPTH=${DEPTH:-32}
read -r -a TZ_FLAGS <<<"${TZ_FLAGS:-}"
COUNT=$((SIZE_MIB * 16)) # one write per 64 KiB unit
DIR=$(mktemp -d "${1:-${TMPDIR:-/tmp}}/qemu-compare.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
SRC=$DIR/src.img TGT=$DIR/tgt.img OUT=$DIR/out.img TAB=$DIR/table.tz

AIO=io_uring
fill() { dd if=/dev/urandom of="$1" bs=1M count="$SIZE_MIB" conv=fsync status=none; }
zero() { rm -f "$1"; qemu-img create -q -f raw "$1" "${SIZE_MIB}M"; dd if=/dev/zero of="$1" bs=1M count="$SIZE_MIB" conv=notrunc,fsync status=none; }
now() { date +%s.%N; }
secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'; }

fill "$SRC"
if ! qemu-img bench -f raw -t none -i io_uring -c 16 -d 1 -s 4096 "$SRC" >/dev/null 2>&1; then
    AIO=threads
    echo "qemu-compare: io_uring refused; using -i threads"
fi
CBW="driver=copy-before-write,file.driver=raw,file.file.driver=file,file.file.filename=$SRC,target.driver=raw,target.file.driver=file,target.file.filename=$TGT"

echo "qemu-compare: ${SIZE_MIB} MiB images, $ROUNDS rounds, depth $DEPTH, aio $AIO, in $DIR"
echo "qemu-img: $(qemu-img --version | head -1); timezero: $TZ_BIN ${TZ_FLAGS[*]}"
cbw_r=() conv_r=() tzfw_r=()
for r in $(seq 1 "$ROUNDS"); do
    zero "$TGT"
    run_raw() { qemu-img bench -w -f raw -t none -i "$AIO" -c "$COUNT" -d "$DEPTH" -s 4096 -S 65536 --pattern=0xaa "$SRC" | secs; }
    run_cbw() { qemu-img bench -w -t none -i "$AIO" -c "$COUNT" -d "$DEPTH" -s 4096 -S 65536 --pattern=0xbb --image-opts "$CBW" | secs; }
    if [ $((r % 2)) -eq 1 ]; then raw=$(run_raw); cbw=$(run_cbw); else cbw=$(run_cbw); raw=$(run_raw); fi
    ratio=$(echo "$cbw / $raw" | bc -l)
    cbw_r+=("$ratio")
    printf 'round %d: first writes x%d: raw %.3f s (%.0f IOPS), QEMU copy-before-write %.3f s (%.0f IOPS), ratio %.2fx\n' \
        "$r" "$COUNT" "$raw" "$(echo "$COUNT / $raw" | bc -l)" "$cbw" "$(echo "$COUNT / $cbw" | bc -l)" "$ratio"

    # timezero's first writes at the same depth ($DEPTH writer threads, each request to a fresh
    # 64 KiB grain), each made durable (target flush, table commit, the writer's source flush),
    # against raw pwrite+fdatasync interleaved in the same process (`timezero bench`; its other
    # figures are ignored here). QEMU's filter above persists nothing, so each system is
    # compared with its own raw counterpart.
    if command -v python3 >/dev/null 2>&1; then
        tzfw=$("$TZ_BIN" bench --dir "$DIR" --writers "$DEPTH" --rounds 1 --size 256MiB --json 2>/dev/null |
            python3 -c 'import json, sys; d = json.load(sys.stdin); w = sys.argv[1]; print(next(r["median"] for r in d["ratios"] if r["figure"] == "first write 4KiB + flush, %s writers" % w))' "$DEPTH")
        tzfw_r+=("$tzfw")
        printf 'round %d: timezero first writes x%d writers, durable: %.2fx raw pwrite+fdatasync (time ratio)\n' "$r" "$DEPTH" "$tzfw"
    fi

    # Copy of the same image: qemu-img convert (O_DIRECT both sides) vs timezero copy.
    sync
    # Both sides write into a preallocated, zero-filled target (as a block device would be),
    # prepared and synced before the clock starts, so that neither pays for block allocation
    # nor competes with the write-back of the other's preparation.
    settle() { sync; sleep 2; }
    run_conv() {
        zero "$OUT"; settle
        local t0; t0=$(now); qemu-img convert -n -t none -T none -f raw -O raw "$SRC" "$OUT"; sync; echo "$(now) - $t0" | bc -l
    }
    run_tz() {
        zero "$TGT"; rm -f "$TAB" "$TAB.holder"
        "$TZ_BIN" init "$TAB" >/dev/null
        "$TZ_BIN" establish "$TAB" "$SRC" "$TGT" >/dev/null
        settle
        local t0 t1; t0=$(now); "$TZ_BIN" "${TZ_FLAGS[@]}" copy "$TAB" >/dev/null 2>&1; t1=$(now)
        cmp -s "$SRC" "$TGT" || { echo "qemu-compare: the timezero copy differs from the source" >&2; return 1; }
        echo "$t1 - $t0" | bc -l
    }
    if [ $((r % 2)) -eq 1 ]; then qc=$(run_conv); tc=$(run_tz); else tc=$(run_tz); qc=$(run_conv); fi
    ratio=$(echo "$qc / $tc" | bc -l)
    conv_r+=("$ratio")
    printf 'round %d: copy %d MiB: qemu-img convert %.3f s (%.0f MB/s), timezero copy %.3f s (%.0f MB/s), timezero speed / qemu %.2fx\n' \
        "$r" "$SIZE_MIB" "$qc" "$(echo "$SIZE_MIB * 1.048576 / $qc" | bc -l)" "$tc" "$(echo "$SIZE_MIB * 1.048576 / $tc" | bc -l)" "$ratio"
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
printf 'median: QEMU copy-before-write first write / raw = %.2fx (time ratio)\n' "$(med "${cbw_r[@]}")"
if [ ${#tzfw_r[@]} -gt 0 ]; then
    printf 'median: timezero durable first write / raw pwrite+fdatasync = %.2fx (time ratio, %d writers)\n' "$(med "${tzfw_r[@]}")" "$DEPTH"
fi
printf 'median: timezero copy speed / qemu-img convert = %.2fx\n' "$(med "${conv_r[@]}")"
