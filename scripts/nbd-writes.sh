#!/usr/bin/env bash
# Writes and image reads over NBD, side by side in one run: a raw export of the source
# (qemu-storage-daemon), QEMU's copy-before-write export (qemu-storage-daemon: a
# copy-before-write node over source and target, its T0 image through a snapshot-access node)
# and `timezero --direct --write-through serve` with a no-copy session. O_DIRECT on every side,
# unix sockets.
#
# Per round and queue depth: `qemu-img bench -w` of COUNT 4 KiB writes at a 64 KiB stride
# (every write lands in a grain of its own: all first writes), the same writes again (all to
# already-copied grains), then COUNT 4 KiB reads of the T0 image at the same offsets (timezero's
# session export vs QEMU's snapshot-access export; every grain read was copied by the writes).
# Each run gets fresh servers and files; the three systems run in an order that rotates per
# round. Ratios are time ratios against QEMU's copy-before-write (below 1 = timezero faster),
# medians over rounds.
#
# With WRITE_BACK=1 a fourth system runs: `timezero --direct --write-back serve`, the servers'
# default (first writes held until the client's flush; `--write-through` is left out for a binary
# that predates that flag, whose servers were write-through by default). FLUSH_INTERVAL=N makes
# every bench of writes flush after each N requests (the flush inside the timed run), so
# write-back pays for its durability in the figure.
# SERIAL_COPIES=1 runs both timezero servers with `--serial-copies` (target flush, then the
# table's commit, instead of the default checked copy records).
# LOG_SIZE=SIZE creates the timezero tables with `init --log-size SIZE` (0: no copy log, so a
# first write waits for its target's flush too; unset: the default log).
#
# Usage: scripts/nbd-writes.sh [DIR]   (env: SIZE_MIB=512 COUNT=8192 ROUNDS=3 DEPTHS="1 32"
#                                        TIMEZERO=path WRITE_BACK=0 FLUSH_INTERVAL=
#                                        LOG_SIZE=)
set -euo pipefail
TZ_CHECKED=""
[ "${SERIAL_COPIES:-0}" = 1 ] && TZ_CHECKED=--serial-copies

for t in qemu-img qemu-storage-daemon; do
    if ! command -v "$t" >/dev/null 2>&1; then
        echo "nbd-writes: $t not found (Debian: apt-get install qemu-utils); skipping"
        exit 0
    fi
done
TZ_BIN=${TIMEZERO:-$(dirname "$0")/../target/release/timezero}
[ -x "$TZ_BIN" ] || { echo "nbd-writes: $TZ_BIN missing; run cargo build --release first" >&2; exit 1; }
SIZE_MIB=${SIZE_MIB:-512}
COUNT=${COUNT:-8192}
ROUNDS=${ROUNDS:-3}
DEPTHS=${DEPTHS:-"1 32"}
DIR=$(mktemp -d "${1:-${TMPDIR:-/tmp}}/nbd-writes.XXXXXX")
SRC=$DIR/src.img TGT=$DIR/tgt.img TAB=$DIR/t.tz SOCK=$DIR/nbd.sock
PID=
stop_server() {
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
        PID=
    fi
    rm -f "$SOCK"
}
cleanup() { stop_server; rm -rf "$DIR"; }
trap cleanup EXIT

med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'; }
wait_sock() {
    for _ in $(seq 1 500); do [ -S "$SOCK" ] && return 0; sleep 0.02; done
    echo "nbd-writes: server did not start" >&2; cat "$DIR/server.log" >&2; exit 1
}
fresh_files() {
    cp --sparse=never "$DIR/base.img" "$SRC"
    rm -f "$TGT"; truncate -s "${SIZE_MIB}M" "$TGT"
    fallocate -l "${SIZE_MIB}M" "$TGT" 2>/dev/null || true
    sync
}
FLUSH_ARGS=()
[ -n "${FLUSH_INTERVAL:-}" ] && FLUSH_ARGS=(--flush-interval="$FLUSH_INTERVAL")
bench() { # URL DEPTH [-w]
    local extra=()
    [ "${3:-}" = -w ] && extra=("${FLUSH_ARGS[@]}")
    qemu-img bench "${@:3}" ${extra[@]+"${extra[@]}"} -f raw -c "$COUNT" -d "$2" -s 4096 -S 65536 --pattern=0x5a "$1" | secs
}

# Each start_* leaves a server on $SOCK and sets W_URL (the export written) and R_URL (the T0
# image read; empty for the raw export).
start_raw() {
    qemu-storage-daemon \
        --blockdev file,node-name=src,filename="$SRC",cache.direct=on,aio=io_uring \
        --nbd-server addr.type=unix,addr.path="$SOCK" \
        --export nbd,id=e,node-name=src,name=src,writable=on >"$DIR/server.log" 2>&1 &
    PID=$!; wait_sock
    W_URL="nbd+unix:///src?socket=$SOCK" R_URL=
}
start_qemu() {
    qemu-storage-daemon \
        --blockdev file,node-name=src,filename="$SRC",cache.direct=on,aio=io_uring \
        --blockdev file,node-name=tgt,filename="$TGT",cache.direct=on,aio=io_uring \
        --blockdev copy-before-write,node-name=cbw,file=src,target=tgt \
        --blockdev snapshot-access,node-name=acc,file=cbw \
        --nbd-server addr.type=unix,addr.path="$SOCK" \
        --export nbd,id=e,node-name=cbw,name=src,writable=on \
        --export nbd,id=a,node-name=acc,name=img >"$DIR/server.log" 2>&1 &
    PID=$!; wait_sock
    W_URL="nbd+unix:///src?socket=$SOCK" R_URL="nbd+unix:///img?socket=$SOCK"
}
start_tz() {
    rm -f "$TAB" "$TAB".*
    "$TZ_BIN" init "$TAB" ${LOG_SIZE:+--log-size "$LOG_SIZE"} >/dev/null
    "$TZ_BIN" establish "$TAB" "$SRC" "$TGT" --nocopy >/dev/null
    "$TZ_BIN" --direct ${TZ_EXTRA:-$WT} ${TZ_CHECKED:-} serve "$TAB" --socket "$SOCK" >"$DIR/server.log" 2>&1 &
    PID=$!; wait_sock
    W_URL="nbd+unix:///src.img?socket=$SOCK" R_URL="nbd+unix:///s1?socket=$SOCK"
}
start_tzwb() { TZ_EXTRA=--write-back start_tz; }
WT=
grep -q -- --write-through <<<"$("$TZ_BIN" --help)" && WT=--write-through

dd if=/dev/urandom of="$DIR/base.img" bs=1M count="$SIZE_MIB" conv=fsync status=none
echo "nbd-writes: $(date -u +%FT%TZ), ${SIZE_MIB} MiB source, $COUNT writes of 4 KiB at a 64 KiB stride, $ROUNDS rounds, depths $DEPTHS, in $DIR"
echo "qemu-img: $(qemu-img --version | head -1); timezero: $TZ_BIN --direct $WT serve"

declare -A T
systems=(raw qemu tz)
[ "${WRITE_BACK:-0}" = 1 ] && systems+=(tzwb)
n=${#systems[@]}
for depth in $DEPTHS; do
    for r in $(seq 1 "$ROUNDS"); do
        for k in $(seq 0 $((n - 1))); do
            sys=${systems[$(((k + r) % n))]}
            fresh_files
            "start_$sys"
            first=$(bench "$W_URL" "$depth" -w)
            again=$(bench "$W_URL" "$depth" -w)
            read=
            [ -n "$R_URL" ] && read=$(bench "$R_URL" "$depth")
            stop_server
            T[$sys,$depth,$r,first]=$first T[$sys,$depth,$r,again]=$again T[$sys,$depth,$r,read]=$read
            printf 'depth %2d round %d %-4s first writes %7.3f s (%6.0f IOPS), already-copied %7.3f s (%6.0f IOPS)%s\n' \
                "$depth" "$r" "$sys" "$first" "$(echo "$COUNT / $first" | bc -l)" "$again" "$(echo "$COUNT / $again" | bc -l)" \
                "$([ -n "$read" ] && printf ', image reads %7.3f s (%6.0f IOPS)' "$read" "$(echo "$COUNT / $read" | bc -l)")"
        done
    done
done

echo
wb=$([ "${WRITE_BACK:-0}" = 1 ] && echo 1 || echo 0)
if [ "$wb" = 1 ]; then
    echo "| depth | figure | raw export IOPS | QEMU copy-before-write IOPS | timezero --write-through IOPS | timezero --write-back IOPS | timezero --write-through / QEMU | timezero --write-back / QEMU (speed, median of rounds [min..max]) |"
    echo "|---|---|---|---|---|---|---|---|"
else
    echo "| depth | figure | raw export IOPS | QEMU copy-before-write IOPS | timezero --write-through IOPS | timezero --write-through / QEMU (speed, median of rounds [min..max]) |"
    echo "|---|---|---|---|---|---|"
fi
for depth in $DEPTHS; do
    for fig in first again read; do
        raw=() qemu=() tz=() ratio=() tzwb=() ratiowb=()
        for r in $(seq 1 "$ROUNDS"); do
            [ -n "${T[raw,$depth,$r,$fig]}" ] && raw+=("$(echo "$COUNT / ${T[raw,$depth,$r,$fig]}" | bc -l)")
            qemu+=("$(echo "$COUNT / ${T[qemu,$depth,$r,$fig]}" | bc -l)")
            tz+=("$(echo "$COUNT / ${T[tz,$depth,$r,$fig]}" | bc -l)")
            ratio+=("$(echo "${T[qemu,$depth,$r,$fig]} / ${T[tz,$depth,$r,$fig]}" | bc -l)")
            if [ "$wb" = 1 ]; then
                tzwb+=("$(echo "$COUNT / ${T[tzwb,$depth,$r,$fig]}" | bc -l)")
                ratiowb+=("$(echo "${T[qemu,$depth,$r,$fig]} / ${T[tzwb,$depth,$r,$fig]}" | bc -l)")
            fi
        done
        name=$(case $fig in first) echo "first writes";; again) echo "already-copied writes";; read) echo "image reads";; esac)
        rawm=-; [ ${#raw[@]} -gt 0 ] && rawm=$(printf '%.0f' "$(med "${raw[@]}")")
        lo=$(printf '%s\n' "${ratio[@]}" | sort -g | head -1) hi=$(printf '%s\n' "${ratio[@]}" | sort -g | tail -1)
        if [ "$wb" = 1 ]; then
            lw=$(printf '%s\n' "${ratiowb[@]}" | sort -g | head -1) hw=$(printf '%s\n' "${ratiowb[@]}" | sort -g | tail -1)
            printf '| %d | %s | %s | %.0f | %.0f | %.0f | %.2fx [%.2f..%.2f] | %.2fx [%.2f..%.2f] |\n' "$depth" "$name" "$rawm" \
                "$(med "${qemu[@]}")" "$(med "${tz[@]}")" "$(med "${tzwb[@]}")" "$(med "${ratio[@]}")" "$lo" "$hi" \
                "$(med "${ratiowb[@]}")" "$lw" "$hw"
        else
            printf '| %d | %s | %s | %.0f | %.0f | %.2fx [%.2f..%.2f] |\n' "$depth" "$name" "$rawm" \
                "$(med "${qemu[@]}")" "$(med "${tz[@]}")" "$(med "${ratio[@]}")" "$lo" "$hi"
        fi
    done
done
