#!/bin/bash
# measure.sh — record the block reads of one Debian guest boot and compute,
# for each candidate chunk size, how much a chunked lazy fetch would transfer.
#
# Usage: bench/chunk-size/measure.sh [IMAGE.raw]
#   Without IMAGE, a 2G Debian 12 image is built with
#   tests/guest/build-debian-image.sh into $TMPDIR/imgfs-chunk-bench/.
#
# The guest boots once under qemu TCG with -snapshot (the image is not
# modified, so every measured boot is the first boot of a fresh VM, as with
# a new VM on a base image) until it prints IMGFS-GUEST-READY; qemu is then
# stopped. Every read the guest issues (virtio_blk_handle_read trace event:
# the guest's requests as it sent them, firmware and GRUB included) up to the
# marker is kept in OUT_DIR/boot-trace.txt as "ms R|W offset length" lines.
# analyze.py turns the trace into OUT_DIR/table.md.
#
# Environment: OUT_DIR (default: this directory), BOOT_TIMEOUT (300),
#   QEMU_MEM (1024), TMPDIR.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
. "$HERE/../lib.sh" # usage, help_option and bad_argument
help_option "$@"
[ $# -le 1 ] || bad_argument "$2"
OUT_DIR=${OUT_DIR:-$HERE}
TIMEOUT=${BOOT_TIMEOUT:-300}
die() { echo "measure: error: $*" >&2; exit 1; }

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"
qemu-system-x86_64 -trace help 2>/dev/null | grep -qx virtio_blk_handle_read \
    || die "this qemu has no virtio_blk_handle_read trace event (needs the log trace backend)"

IMAGE=${1:-}
if [ -z "$IMAGE" ]; then
    d=${TMPDIR:-/var/tmp}/imgfs-chunk-bench
    mkdir -p "$d"
    IMAGE=$d/debian.raw
    echo "measure: building $IMAGE" >&2
    "$TOP/tests/guest/build-debian-image.sh" "$IMAGE" 2G
fi
[ -r "$IMAGE" ] || die "cannot read image '$IMAGE'"
mkdir -p "$OUT_DIR"

W=$(mktemp -d "${TMPDIR:-/tmp}/imgfs-measure.XXXXXX")
qpid=
cleanup() {
    [ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

echo "measure: booting $IMAGE (qemu tcg, -snapshot, tracing reads)" >&2
qemu-system-x86_64 -accel tcg -m "${QEMU_MEM:-1024}" -nographic -no-reboot \
    -serial "file:$W/console.log" -monitor none -display none -parallel none \
    -drive "file=${IMAGE//,/,,},format=raw,if=virtio,snapshot=on" \
    -trace enable=virtio_blk_handle_read -trace enable=virtio_blk_handle_write \
    -D "$W/qemu-trace.log" -msg timestamp=on </dev/null >"$W/qemu.out" 2>&1 &
qpid=$!
start=$(date +%s.%N)
marker_t=
while kill -0 "$qpid" 2>/dev/null; do
    if grep -aq IMGFS-GUEST-READY "$W/console.log" 2>/dev/null; then
        marker_t=$(date +%s.%N); break
    fi
    awk -v a="$start" -v b="$(date +%s.%N)" -v t="$TIMEOUT" 'BEGIN { exit !(b - a >= t) }' && break
    sleep 0.05
done
kill "$qpid" 2>/dev/null || true     # SIGTERM: qemu flushes its trace log
wait "$qpid" 2>/dev/null || true
qpid=
if [ -z "$marker_t" ]; then
    tail -n 30 "$W/console.log" "$W/qemu.out" >&2 || true
    die "guest did not reach IMGFS-GUEST-READY within ${TIMEOUT}s"
fi
boot_s=$(awk -v a="$start" -v b="$marker_t" 'BEGIN { printf "%.1f", b - a }')
echo "measure: marker after ${boot_s}s" >&2

# qemu log lines: PID@SEC.USEC:virtio_blk_handle_read vdev X req Y sector S nsectors N
{
    echo "# imgfs boot read trace: one guest boot to IMGFS-GUEST-READY"
    echo "# image: $(basename "$IMAGE") size $(stat -c %s "$IMAGE")"
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  qemu: $(qemu-system-x86_64 --version | head -n1)"
    echo "# boot to marker: ${boot_s}s (tcg)"
    echo "# format: ms-since-first-request R|W byte-offset byte-length"
    awk -v cut="$marker_t" '
        /virtio_blk_handle_(read|write)/ {
            # "-msg timestamp=on" gives "PID@SECONDS.MICROS:event"
            if (split($1, a, "[@:]") < 3) { print "measure: trace lines have no timestamp" > "/dev/stderr"; exit 1 }
            t = a[2] + 0
            if (t > cut) next
            if (t0 == "") t0 = t
            for (i = 1; i <= NF; i++) { if ($i == "sector") s = $(i+1); if ($i == "nsectors") n = $(i+1) }
            op = ($1 ~ /write/) ? "W" : "R"
            printf "%d %s %.0f %.0f\n", (t - t0) * 1000, op, s * 512, n * 512
        }' "$W/qemu-trace.log"
} > "$OUT_DIR/boot-trace.txt"
echo "measure: $(grep -c ' R ' "$OUT_DIR/boot-trace.txt") reads recorded in $OUT_DIR/boot-trace.txt" >&2

python3 "$HERE/analyze.py" "$OUT_DIR/boot-trace.txt" "$IMAGE" | tee "$OUT_DIR/table.md"
