#!/usr/bin/env bash
# Background copy side by side with qemu-img convert, interleaved round by round:
#   O_DIRECT: `timezero --direct copy`  vs  qemu-img convert -n -t none -T none
#   buffered: `timezero copy`           vs  qemu-img convert -n -t writeback
# and, when BEFORE names another timezero binary, that binary's copy in the same rounds (to
# compare two builds). Every copy writes into a preallocated, zero-filled target of its own
# (written once, then overwritten in place each round), and each timing runs until the command
# has exited and a `sync` has returned, on both sides. The order of the contenders turns each
# round. Files go under DIR (default /var/tmp). With QEMU_C=1 the buffered rounds also run
# `qemu-img convert -n -C -t writeback` (QEMU's copy offloading, copy_file_range; timezero
# offloads by default, `--no-copy-offload` turns it off).
# Usage: scripts/copy-compare.sh [DIR]
#   (env: SIZE_MIB=2048 ROUNDS=3 TIMEZERO=path BEFORE=path QEMU_C=1)
set -euo pipefail
shopt -s inherit_errexit

if ! command -v qemu-img >/dev/null 2>&1; then
    echo "copy-compare: qemu-img not found (Debian: apt-get install qemu-utils); skipping"
    exit 0
fi
TZ_BIN=${TIMEZERO:-$(dirname "$0")/../target/release/timezero}
[ -x "$TZ_BIN" ] || { echo "copy-compare: $TZ_BIN missing; run cargo build --release first" >&2; exit 1; }
BEFORE=${BEFORE:-}
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-3}
DIR=$(mktemp -d "${1:-/var/tmp}/copy-compare.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
SRC=$DIR/src.img

now() { date +%s.%N; }
zero() { dd if=/dev/zero of="$1" bs=1M count="$SIZE_MIB" conv=fsync status=none; }

# contender name -> command runner
run_qemu() { # mode target [offload]
    if [ "${3:-}" = offload ]; then
        qemu-img convert -n -C -t writeback -f raw -O raw "$SRC" "$2"
    elif [ "$1" = direct ]; then
        qemu-img convert -n -t none -T none -f raw -O raw "$SRC" "$2"
    else
        qemu-img convert -n -t writeback -f raw -O raw "$SRC" "$2"
    fi
}
run_tz() { # binary mode target
    local tab=$3.tz flags=()
    [ "$2" = direct ] && flags=(--direct)
    rm -f "$tab" "$tab.holder"
    "$1" init "$tab" >/dev/null || return 1
    # --force: the target holds the previous round's copy (overwritten in place).
    "$1" establish --force "$tab" "$SRC" "$3" >/dev/null || return 1
    sync
    local t0; t0=$(now)
    "$1" "${flags[@]}" copy "$tab" >/dev/null 2>"$3.err" || { cat "$3.err" >&2; return 1; }
    sync
    echo "$(now) - $t0" | bc -l
}
timed() { # name mode target
    case $1 in
        qemu) sync; local t0; t0=$(now); run_qemu "$2" "$3"; sync; echo "$(now) - $t0" | bc -l ;;
        qemuC) sync; local t0; t0=$(now); run_qemu "$2" "$3" offload; sync; echo "$(now) - $t0" | bc -l ;;
        after) run_tz "$TZ_BIN" "$2" "$3" ;;
        before) run_tz "$BEFORE" "$2" "$3" ;;
    esac
}

dd if=/dev/urandom of="$SRC" bs=1M count="$SIZE_MIB" conv=fsync status=none
all=(qemu after)
[ -n "$BEFORE" ] && all+=(before)
[ "${QEMU_C:-0}" = 1 ] && all+=(qemuC)
for n in "${all[@]}"; do zero "$DIR/$n.img"; done
echo "copy-compare: ${SIZE_MIB} MiB, $ROUNDS rounds, in $DIR; $(qemu-img --version | head -1)"
echo "timezero (after): $TZ_BIN${BEFORE:+; before: $BEFORE}"
declare -A ratios
for r in $(seq 1 "$ROUNDS"); do
    for mode in direct buffered; do
        names=()
        for n in "${all[@]}"; do
            [ "$n" = qemuC ] && [ "$mode" = direct ] && continue
            names+=("$n")
        done
        declare -A secs=()
        k=$(( (r - 1) % ${#names[@]} ))
        order=("${names[@]:k}" "${names[@]:0:k}")
        for n in "${order[@]}"; do
            secs[$n]=$(timed "$n" "$mode" "$DIR/$n.img")
            if [ "$r" = 1 ] && ! cmp -s "$SRC" "$DIR/$n.img"; then
                echo "copy-compare: the $n copy ($mode) differs from the source" >&2
                exit 1
            fi
        done
        line="round $r $mode (order ${order[*]}):"
        for n in "${names[@]}"; do
            line+=$(printf ' %s %.2f s (%.0f MB/s)' "$n" "${secs[$n]}" "$(echo "$SIZE_MIB * 1.048576 / ${secs[$n]}" | bc -l)")
        done
        for n in after before; do
            [ -n "${secs[$n]:-}" ] || continue
            ratio=$(echo "${secs[qemu]} / ${secs[$n]}" | bc -l)
            ratios[$mode.$n]+="$ratio "
            line+=$(printf ', %s speed / qemu %.2fx' "$n" "$ratio")
            if [ -n "${secs[qemuC]:-}" ]; then
                ratio=$(echo "${secs[qemuC]} / ${secs[$n]}" | bc -l)
                ratios[$mode.$n.C]+="$ratio "
                line+=$(printf ', %s speed / qemu -C %.2fx' "$n" "$ratio")
            fi
        done
        echo "$line"
        unset secs
    done
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
for key in direct.after direct.before buffered.after buffered.before buffered.after.C buffered.before.C; do
    [ -n "${ratios[$key]:-}" ] || continue
    read -r -a v <<<"${ratios[$key]}"
    what="qemu-img convert"
    [ "${key%.C}" != "$key" ] && what="qemu-img convert -C"
    printf '%s: timezero speed / %s, median %.2fx [%s]\n' "$key" "$what" "$(med "${v[@]}")" \
        "$(printf '%.2f ' "${v[@]}" | sed 's/ $//')"
done
