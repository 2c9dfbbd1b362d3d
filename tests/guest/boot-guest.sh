#!/bin/bash
# boot-guest.sh — boot a disk made by build-debian-image.sh under qemu (TCG),
# wait for the IMGFS-GUEST-READY marker and report the boot time.
#
# Usage: boot-guest.sh DISK [extra kernel args...]
#   e.g. boot-guest.sh /mnt/imgfs/vms/vm1.raw imgfs.write=1
#
# Prints on stdout: any "IMGFS-BOOT-COUNT=<n>" line from the guest, then
# "BOOT-TIME=<seconds>" (qemu start to marker, wall clock).
# Exit status: 0 marker seen; 1 timeout or qemu died first; 2 usage error.
#
# Extra kernel args reach the guest without -kernel: they are passed as an
# SMBIOS OEM string that the guest's GRUB appends to the kernel command line.
# "imgfs.poweroff=1" is always added, so the guest shuts itself down after
# the marker; the helper waits for that (BOOT_SHUTDOWN_TIMEOUT) and then
# kills qemu if it is still running.
#
# Environment:
#   BOOT_TIMEOUT=300           seconds to wait for the marker
#   BOOT_SHUTDOWN_TIMEOUT=60   seconds to wait for the guest to power off
#   QEMU_DRIVE_OPTS            appended to -drive, e.g. "cache=none" or
#                              "snapshot=on" (needed for a read-only file)
#   QEMU_MEM=1024              guest memory in MiB
#   QEMU_EXTRA                 more qemu arguments (word-split)
#   QEMU=qemu-system-x86_64
#   GUEST_LOG                  keep the serial console log in this file
#                              (default: a temp file, shown on failure)
set -uo pipefail

usage() { echo "usage: $0 DISK [extra kernel args...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
DISK=$1; shift
[ -e "$DISK" ] || { echo "boot-guest: error: disk '$DISK' does not exist" >&2; exit 2; }

TIMEOUT=${BOOT_TIMEOUT:-300}
SHUTDOWN_TIMEOUT=${BOOT_SHUTDOWN_TIMEOUT:-60}
QEMU=${QEMU:-qemu-system-x86_64}
MEM=${QEMU_MEM:-1024}
ARGS="$* imgfs.poweroff=1"
ARGS=${ARGS# }

# qemu option values: a literal comma is written as ",,"
qesc() { printf '%s' "${1//,/,,}"; }
drive="file=$(qesc "$DISK"),format=raw,if=virtio"
[ -n "${QEMU_DRIVE_OPTS:-}" ] && drive="$drive,$QEMU_DRIVE_OPTS"

own_log=0
if [ -n "${GUEST_LOG:-}" ]; then
    LOG=$GUEST_LOG; : > "$LOG" || exit 2
else
    LOG=$(mktemp /tmp/boot-guest.XXXXXX.log); own_log=1
fi

# shellcheck disable=SC2086   # QEMU_EXTRA is meant to be word-split
"$QEMU" -accel tcg -m "$MEM" -nographic -no-reboot \
    -serial "file:$LOG" -monitor none -display none -parallel none \
    -drive "$drive" \
    -smbios "type=11,value=imgfs-cmdline:$(qesc "$ARGS")" \
    ${QEMU_EXTRA:-} </dev/null >"$LOG.qemu" 2>&1 &
qpid=$!
start=$(date +%s.%N)

finish() {
    if kill -0 "$qpid" 2>/dev/null; then
        kill "$qpid" 2>/dev/null; sleep 1; kill -9 "$qpid" 2>/dev/null
    fi
    wait "$qpid" 2>/dev/null
    rm -f "$LOG.qemu"
    [ "$own_log" = 1 ] && rm -f "$LOG"
}
trap finish EXIT
trap 'exit 1' INT TERM

fail() {
    echo "boot-guest: error: $*" >&2
    own_log=0    # keep the console log for the post-mortem
    echo "---- qemu output ----" >&2; tail -n 20 "$LOG.qemu" >&2
    echo "---- last serial console lines ($LOG) ----" >&2; tail -n 40 "$LOG" >&2
    exit 1
}

ready=0
while :; do
    if grep -aq 'IMGFS-GUEST-READY' "$LOG" 2>/dev/null; then ready=1; break; fi
    kill -0 "$qpid" 2>/dev/null || break
    now=$(date +%s.%N)
    if awk -v a="$start" -v b="$now" -v t="$TIMEOUT" 'BEGIN { exit !(b - a >= t) }'; then break; fi
    sleep 0.2
done
end=$(date +%s.%N)

if [ "$ready" != 1 ]; then
    kill -0 "$qpid" 2>/dev/null && fail "no IMGFS-GUEST-READY marker within ${TIMEOUT}s"
    wait "$qpid"; rc=$?
    fail "qemu exited (status $rc) before the guest was ready"
fi

grep -a -o 'IMGFS-BOOT-COUNT=[0-9]*' "$LOG" | tail -n1
awk -v a="$start" -v b="$end" 'BEGIN { printf "BOOT-TIME=%.1f\n", b - a }'

# let the guest power off cleanly so its writes reach the disk
deadline=$(( $(date +%s) + SHUTDOWN_TIMEOUT ))
while kill -0 "$qpid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
if kill -0 "$qpid" 2>/dev/null; then
    echo "boot-guest: warning: guest did not power off within ${SHUTDOWN_TIMEOUT}s; killing qemu" >&2
fi
exit 0
