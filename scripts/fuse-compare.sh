#!/usr/bin/env bash
# Files over FUSE side by side, in one run, interleaved round by round: the source file of
# `timezero --write-through mount` (a whole-volume no-copy session, so every first write copies
# before it writes) vs `qemu-storage-daemon --export type=fuse` of a copy-before-write node over the same
# kind of files vs the raw source file. Figures: sequential 1 MiB reads and writes, 4 KiB random
# reads and writes, each with O_DIRECT opens at depth 1 (the way a loop device or a restore tool
# reads a file), by a small python3 program (fio is not needed). Writes are first writes (every
# 64 KiB grain is copied before it is written); "rewrite" repeats them on grains already copied.
# WRITE_BACK=1 adds a fourth side, `timezero --write-back mount`, the default of `mount` (first
# writes held until the file's next fsync, which each write phase ends with; `--write-through`
# is left out for a binary that predates the flag, whose mount was write-through by default).
# SERIAL_COPIES=1 runs both timezero sides with `--serial-copies`. The last lines are each
# timezero side's speed against QEMU's export.
# Needs root (FUSE mounts). Usage: scripts/fuse-compare.sh [DIR]
#   (env: SIZE_MIB=1024 ROUNDS=3 RANDOPS=4000 TIMEZERO=path WRITE_BACK=0 SERIAL_COPIES=0)
set -euo pipefail

for t in qemu-storage-daemon python3; do
    if ! command -v "$t" >/dev/null 2>&1; then
        echo "fuse-compare: $t not found; skipping"
        exit 0
    fi
done
TZ_SERIAL=
[ "${SERIAL_COPIES:-0}" = 1 ] && TZ_SERIAL=--serial-copies
TZ_BIN=${TIMEZERO:-$(dirname "$0")/../target/release/timezero}
if [ ! -x "$TZ_BIN" ]; then
    echo "fuse-compare: $TZ_BIN missing; run cargo build --release first" >&2
    exit 1
fi
WT=
grep -q -- --write-through <<<"$("$TZ_BIN" --help)" && WT=--write-through
SIZE_MIB=${SIZE_MIB:-1024}
ROUNDS=${ROUNDS:-3}
RANDOPS=${RANDOPS:-4000}
DIR=$(mktemp -d "${1:-${TMPDIR:-/var/tmp}}/fuse-compare.XXXXXX")
QSD_PID= TZ_PID=
cleanup() {
    [ -n "$TZ_PID" ] && { "$TZ_BIN" umount "$DIR/mnt" >/dev/null 2>&1 || true; wait "$TZ_PID" 2>/dev/null || true; }
    [ -n "$QSD_PID" ] && { kill "$QSD_PID" 2>/dev/null || true; wait "$QSD_PID" 2>/dev/null || true; }
    umount -l "$DIR/mnt" 2>/dev/null || true
    umount -l "$DIR/qemu.img" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

cat >"$DIR/io.py" <<'EOF'
import mmap, os, random, sys, time
path, op, size_mib, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
size = size_mib << 20
bs = (1 << 20) if op.startswith("seq") else 4096
buf = mmap.mmap(-1, bs)
buf.write(os.urandom(bs))
write = "write" in op
fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
if op.startswith("seq"):
    offs = [k * bs for k in range(min(count, size // bs))]
else:
    rng = random.Random(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    # one request per 64 KiB grain, in random order: every write is a first write
    lo = size // 2 // 65536 if write else 0  # random writes in the half no sequential write touched
    grains = range(lo, size // 65536)
    offs = [g * 65536 for g in rng.sample(grains, min(count, len(grains)))]
t0 = time.perf_counter()
for o in offs:
    n = os.pwritev(fd, [buf], o) if write else os.preadv(fd, [buf], o)
    assert n == bs, (o, n)
if write:
    os.fdatasync(fd)
dt = time.perf_counter() - t0
os.close(fd)
if bs == 4096:
    print("%.0f" % (len(offs) / dt))
else:
    print("%.1f" % (len(offs) * bs / dt / 1e6))
EOF

mkvol() { rm -f "$1"; dd if=/dev/urandom of="$1" bs=1M count="$SIZE_MIB" conv=fsync status=none; }
zero() { rm -f "$1"; truncate -s "${SIZE_MIB}M" "$1"; }

start_tz() {
    rm -f "$DIR/t.tzt" "$DIR/t.tzt".*
    zero "$DIR/tz-tgt.img"
    "$TZ_BIN" init "$DIR/t.tzt" >/dev/null
    "$TZ_BIN" establish "$DIR/t.tzt" "$DIR/src.img" "$DIR/tz-tgt.img" --nocopy --force >/dev/null
    mkdir -p "$DIR/mnt"
    # shellcheck disable=SC2086
    "$TZ_BIN" ${TZ_SERIAL:-} ${1:-} mount "$DIR/t.tzt" "$DIR/mnt" >"$DIR/mount.log" 2>&1 &
    TZ_PID=$!
    for _ in $(seq 200); do [ -e "$DIR/mnt/src.img" ] && return; sleep 0.05; done
    echo "fuse-compare: timezero mount did not come up" >&2; cat "$DIR/mount.log" >&2; exit 1
}
stop_tz() { "$TZ_BIN" umount "$DIR/mnt" >/dev/null; wait "$TZ_PID"; TZ_PID=; }

start_qsd() {
    zero "$DIR/q-tgt.img"
    : >"$DIR/qemu.img"
    qemu-storage-daemon \
        --blockdev file,node-name=src,filename="$DIR/src.img" \
        --blockdev file,node-name=tgt,filename="$DIR/q-tgt.img" \
        --blockdev copy-before-write,node-name=cbw,file=src,target=tgt \
        --export type=fuse,id=e,node-name=cbw,mountpoint="$DIR/qemu.img",writable=on \
        >"$DIR/qsd.log" 2>&1 &
    QSD_PID=$!
    for _ in $(seq 200); do
        [ "$(stat -c %s "$DIR/qemu.img")" = "$((SIZE_MIB << 20))" ] && return
        sleep 0.05
    done
    echo "fuse-compare: qemu-storage-daemon did not come up" >&2; cat "$DIR/qsd.log" >&2; exit 1
}
stop_qsd() { kill "$QSD_PID"; wait "$QSD_PID" 2>/dev/null || true; QSD_PID=; }

# One side's figures: seqread MB/s, randread IOPS, seqwrite MB/s (first), randwrite IOPS
# (first), randwrite IOPS (rewrite), on FILE.
figures() {
    local f=$1 seed=$2 half=$((SIZE_MIB / 2))
    local sr rr sw rw rw2
    sr=$(python3 "$DIR/io.py" "$f" seqread "$SIZE_MIB" 100000)
    rr=$(python3 "$DIR/io.py" "$f" randread "$SIZE_MIB" "$RANDOPS" "$seed")
    # sequential writes to the first half, random writes to the second (first writes each;
    # the source was just written, so every side reads it from the page cache alike)
    sw=$(python3 "$DIR/io.py" "$f" seqwrite "$half" 100000)
    rw=$(python3 "$DIR/io.py" "$f" randwrite-first "$SIZE_MIB" "$RANDOPS" "$seed")
    rw2=$(python3 "$DIR/io.py" "$f" randwrite-again "$SIZE_MIB" "$RANDOPS" "$seed")
    echo "$sr $rr $sw $rw $rw2"
}

echo "fuse-compare: ${SIZE_MIB} MiB volumes, $ROUNDS rounds, $RANDOPS random 4 KiB requests, in $DIR"
echo "qemu-storage-daemon: $(qemu-storage-daemon --version | head -1); timezero: $TZ_BIN; kernel $(uname -r)"
printf '%-6s %-9s %12s %12s %12s %14s %14s\n' round side "seqread MB/s" "randread IOPS" "seqwrite MB/s" "randwrite IOPS" "rewrite IOPS"
for r in $(seq 1 "$ROUNDS"); do
    sides=(raw timezero qemu)
    [ "${WRITE_BACK:-0}" = 1 ] && sides=(raw timezero tz-wb qemu)
    if [ $((r % 2)) -eq 0 ]; then
        rev=()
        for ((i = ${#sides[@]} - 1; i >= 0; i--)); do rev+=("${sides[$i]}"); done
        sides=("${rev[@]}")
    fi
    for side in "${sides[@]}"; do
        mkvol "$DIR/src.img"
        case $side in
        raw) out=$(figures "$DIR/src.img" "$r") ;;
        timezero) start_tz $WT; out=$(figures "$DIR/mnt/src.img" "$r"); stop_tz ;;
        tz-wb) start_tz --write-back; out=$(figures "$DIR/mnt/src.img" "$r"); stop_tz ;;
        qemu) start_qsd; out=$(figures "$DIR/qemu.img" "$r"); stop_qsd ;;
        esac
        read -r sr rr sw rw rw2 <<<"$out"
        printf '%-6s %-9s %12s %12s %12s %14s %14s\n' "$r" "$side" "$sr" "$rr" "$sw" "$rw" "$rw2" | tee -a "$DIR/rows"
    done
done

# Each timezero side against QEMU's export: the median of the per-round speed ratios (above 1 =
# timezero faster) with the spread over rounds.
python3 - "$DIR/rows" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
by = {(r[0], r[1]): [float(x) for x in r[2:]] for r in rows}
rounds = sorted({r[0] for r in rows})
names = ["seqread", "randread", "seqwrite", "randwrite", "rewrite"]
print()
print("| side / qemu | " + " | ".join(names) + " |")
print("|---|" + "---|" * len(names))
for side in ("timezero", "tz-wb"):
    if (rounds[0], side) not in by:
        continue
    cells = []
    for i in range(len(names)):
        v = sorted(by[(r, side)][i] / by[(r, "qemu")][i] for r in rounds)
        n = len(v)
        med = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
        cells.append(f"{med:.2f}x [{v[0]:.2f}..{v[-1]:.2f}]")
    print(f"| {side} | " + " | ".join(cells) + " |")
PY
