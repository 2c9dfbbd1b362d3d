#!/bin/bash
# A real Debian guest lives through a kill -9 of the serving process and an
# imgfsctl restart while it boots from vms/VM.raw (qemu, O_DIRECT, TCG), and
# finishes with no I/O error in its kernel log: it boots to its marker,
# writes its boot counter, powers off, and its filesystem is clean.
#
# The kill comes when the guest's root filesystem is mounted (its kernel has
# said so on the serial console), the restart when systemd has started; both
# are moments of guest disk I/O. Nothing depends on how fast anything is.
. "$(dirname "$0")/lib.sh"

SRC=${IMGFS_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
guest_image
"$IMGFSCTL" publish "$IMG" "$T/repo" --name deb > /dev/null || fail "publish of the guest image failed"
M=$T/mnt
mount_imgfs "$T/repo" "$M"
"$IMGFSCTL" vm create "$M" g --base deb > /dev/null || fail "vm create failed"
CONSOLE=$T/console.log
QEMU_DRIVE_OPTS=cache=none GUEST_LOG=$CONSOLE bash "$SRC/tests/guest/boot-guest.sh" "$M/vms/g.raw" imgfs.write=1 \
    > "$T/boot.out" 2> "$T/boot.err" &
guest=$!
at_exit "kill $guest 2>/dev/null"

# wait_console PATTERN: until the guest's console shows PATTERN (<= 300 s).
wait_console() {
    for _ in $(seq 3000); do
        grep -qE "$1" "$CONSOLE" 2>/dev/null && return 0
        kill -0 "$guest" 2>/dev/null || { cat "$T/boot.err" >&2; fail "the guest ended before '$1'"; }
        sleep 0.1
    done
    fail "the guest's console never showed '$1'"
}

wait_console "EXT4-fs \(vda[0-9]\): mounted"
old=$(stat_value "$M" daemon pid)
kill -9 "$old"
new_server "$M" "$old" > /dev/null
ok "kill -9 of pid $old while the guest mounted its root filesystem: taken over"

wait_console "systemd\[1\]|Welcome to"
old=$(stat_value "$M" daemon pid)
"$IMGFSCTL" restart "$M" > /dev/null || fail "imgfsctl restart failed"
ok "imgfsctl restart while systemd starts: pid $old replaced by $(stat_value "$M" daemon pid)"

wait "$guest" || { cat "$T/boot.err" >&2; tail -n 40 "$CONSOLE" >&2; fail "the guest did not boot to its marker"; }
grep -q "IMGFS-BOOT-COUNT=1" "$T/boot.out" || fail "the guest did not write its boot counter"
if grep -iE "I/O error|blk_update_request|print_req_error|Buffer I/O|EXT4-fs error|EXT4-fs warning|journal.*abort|Remounting filesystem read-only" \
    "$CONSOLE" > "$T/errors"; then
    cat "$T/errors" >&2
    fail "the guest's kernel log shows I/O errors"
fi
ok "the guest booted, wrote its counter and powered off; no I/O error in its kernel log"
[ "$(stat_value "$M" daemon takeovers)" = 2 ] || fail "[daemon] takeovers is not 2"
umount_imgfs "$M"
mount_imgfs "$T/repo" "$M"
e2fsck -fn "$M/vms/g.raw?offset=1048576" > "$T/fsck.log" 2>&1 ||
    { cat "$T/fsck.log" >&2; fail "e2fsck finds errors in the guest's filesystem"; }
ok "the guest's filesystem is clean after a remount (e2fsck -fn)"
umount_imgfs "$M"
finish
