#!/bin/bash
# A real Debian 12 guest boots from an imgfs VM disk (vms/VM.raw) and writes
# to it; the writes survive a remount, go to the VM's layer and never to the
# base, and a second VM on the same base starts from the pristine base.
#
#  1. The guest image is built by tests/guest/build-debian-image.sh into a
#     cache that survives between runs ($IMGFS_GUEST_IMAGE_DIR, default
#     /var/cache/imgfs-test), keyed by a hash of the build script, and rebuilt
#     only when missing (~15 s from the debootstrap tarball cache, ~1.5 min on
#     a fresh machine). No network on a fresh machine is a FAILURE, not a skip.
#  2. publish, mount with a state dir, `imgfsctl vm create vm1 --base deb`.
#  3. boot vm1 (qemu cache=writeback, kernel arg imgfs.write=1) -> count 1.
#  4. unmount, remount, boot vm1 again with cache=none (O_DIRECT) -> count 2.
#  5. vm2 on the same base boots -> count 1 (isolation from vm1's layer).
#  6. the guest filesystem of vm1 passes e2fsck; the base is byte-identical
#     to the published image, served by the remounted daemon.
# Each boot is ~30 s under TCG; the whole test ~2-3 min on a warm cache.
# Boot times are printed for information only; nothing fails on timing.
. "$(dirname "$0")/lib.sh"

SRC=${IMGFS_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
GUEST=$SRC/tests/guest
# ---- 1. guest image, cached between runs -----------------------------------
guest_image

# ---- 2. publish, mount, create the VM --------------------------------------
"$IMGFSCTL" publish "$IMG" "$T/repo" --name deb > "$T/publish.out" || fail "publish of the guest image failed"
mkdir -p "$T/state"
mount_imgfs "$T/repo" "$T/mnt" "state=$T/state"
"$IMGFSCTL" vm create "$T/mnt" vm1 --base deb || fail "vm create vm1 failed"
[ -f "$T/mnt/vms/vm1.raw" ] || fail "vms/vm1.raw does not exist after vm create"
[ "$(stat -c %s "$T/mnt/vms/vm1.raw")" = "$(stat -c %s "$IMG")" ] ||
    fail "vms/vm1.raw is $(stat -c %s "$T/mnt/vms/vm1.raw") bytes, the base $(stat -c %s "$IMG")"
ok "published deb@1 and created vm1"

# boot VM EXPECTED_COUNT LABEL: boots MNT/vms/VM.raw with imgfs.write=1 and
# checks the boot counter the guest prints. QEMU_DRIVE_OPTS comes from the caller.
BOOT_TIMES=()
boot() {
    local vm=$1 want=$2 label=$3 out
    out=$(GUEST_LOG="$T/console.$vm.$want.log" bash "$GUEST/boot-guest.sh" "$T/mnt/vms/$vm.raw" imgfs.write=1) ||
        { tail -n 30 "$T/console.$vm.$want.log" >&2; fail "$label: the guest did not boot"; }
    local count time
    count=$(sed -n 's/^IMGFS-BOOT-COUNT=//p' <<<"$out")
    time=$(sed -n 's/^BOOT-TIME=//p' <<<"$out")
    [ -n "$count" ] || { tail -n 30 "$T/console.$vm.$want.log" >&2; fail "$label: no IMGFS-BOOT-COUNT from the guest"; }
    [ "$count" = "$want" ] || fail "$label: guest boot count is $count, expected $want"
    BOOT_TIMES+=("$label ${time}s")
    ok "$label: IMGFS-BOOT-COUNT=$count, boot time ${time} s"
}

# ---- 3. first boot, qemu page cache on (writeback) --------------------------
QEMU_DRIVE_OPTS=cache=writeback boot vm1 1 "vm1 boot 1 (cache=writeback)"
layer_bytes=$(du -cB1 "$T"/state/layers/*.log 2>/dev/null | tail -n1 | cut -f1) || true
[ "${layer_bytes:-0}" -gt 0 ] || fail "the guest's writes left no data in the state dir's layers"
ok "vm1's writes are in its layer ($((layer_bytes / 1024)) KiB allocated)"

# ---- 4. remount, second boot with O_DIRECT (cache=none) ---------------------
umount_imgfs "$T/mnt"
mount_imgfs "$T/repo" "$T/mnt" "state=$T/state"
[ -f "$T/mnt/vms/vm1.raw" ] || fail "vms/vm1.raw is gone after the remount"
QEMU_DRIVE_OPTS=cache=none boot vm1 2 "vm1 boot 2 after remount (cache=none)"

# ---- 5. a second VM on the same base starts from the clean base -------------
"$IMGFSCTL" vm create "$T/mnt" vm2 --base deb || fail "vm create vm2 failed"
QEMU_DRIVE_OPTS=cache=writeback boot vm2 1 "vm2 boot 1 (same base)"

# ---- 6. guest filesystem and base integrity --------------------------------
# The root filesystem starts at 1 MiB (build-debian-image.sh); e2fsprogs
# opens a partition inside a disk file with the "?offset=" I/O option.
e2fsck -fn "$T/mnt/vms/vm1.raw?offset=1048576" > "$T/fsck.log" 2>&1 ||
    { cat "$T/fsck.log" >&2; fail "e2fsck finds errors in vm1's guest filesystem"; }
ok "vm1's guest filesystem is clean (e2fsck -fn)"

cmp "$T/mnt/bases/deb@1.raw" "$IMG" || fail "base deb@1 differs from the published image after the VMs wrote"
ok "base deb@1 is byte-identical to the published image"
umount_imgfs "$T/mnt"

echo "# boot times (TCG, informational): ${BOOT_TIMES[*]/%/;}"
finish
