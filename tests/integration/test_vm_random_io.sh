#!/bin/bash
# VM disks under random I/O: three VMs on one base take random unaligned
# writes concurrently (tests/tools/vmstress.c, checked byte for byte against
# shadow files); the data survives a remount; what was fsync'd survives a
# kill -9 of the daemon; and a kill -9 in the middle of unsynced writes leaves
# every byte those writes did not touch as it was at the last fsync.
. "$(dirname "$0")/lib.sh"

STRESS=$TOOLS/vmstress
[ -x "$STRESS" ] || fail "missing $STRESS (build the vmstress target)"
M=$T/mnt
mkdir -p "$T/state"
# With the writeback cache the kernel takes a write past the end of a disk
# and only its flush fails (checked at the end), so vmstress stays inside.
INSIDE=()
[[ ${IMGFS_TEST_MOUNT_OPTS:-} == *vm_cache=writeback* ]] && INSIDE=(--inside)

# Not a multiple of 128 KiB nor of 4 KiB: the disk ends in a short block.
SIZE=$((24 * 1048576 + 77777))
make_image "$T/img.raw" $SIZE
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name b > /dev/null
mount_imgfs "$T/repo" "$M" "state=$T/state"

# kill9 MNT: kills the daemon with SIGKILL (no unmount, no flush) and
# detaches its dead mount so that the path can be mounted again.
kill9() {
    local mnt=$1 pid=${DAEMON_PID[$1]}
    check_daemon_log "${DAEMON_LOG[$mnt]}"
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    unset "DAEMON_PID[$mnt]"
    fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt"
    ! mountpoint -q "$mnt" || fail "$mnt still mounted after kill -9 and lazy unmount"
}

verify_vm() { # verify_vm VM SHADOW WHAT
    "$STRESS" --verify "$M/vms/$1.raw" "$2" > "$T/verify.out" 2>&1 || { cat "$T/verify.out"; fail "$3"; }
}

for v in v1 v2 v3; do
    "$IMGFSCTL" vm create "$M" $v --base b
    cp "$T/img.raw" "$T/shadow.$v"
done
[ "$(stat -c %s "$M/vms/v1.raw")" -eq $SIZE ] || fail "VM disk size is not the base size"
ok "3 VMs on a $SIZE-byte base"

# --- concurrent random writes --------------------------------------------------
pids=()
seed=11
for v in v1 v2 v3; do
    "$STRESS" "$M/vms/$v.raw" "$T/shadow.$v" $seed 400 --fsync-every 37 "${INSIDE[@]}" > "$T/stress.$v" 2>&1 &
    pids+=($!)
    seed=$((seed + 11))
done
i=0
for v in v1 v2 v3; do
    wait "${pids[$i]}" || { cat "$T/stress.$v"; fail "vmstress on $v found a mismatch or an error"; }
    grep -q '^VERIFY OK' "$T/stress.$v" || { cat "$T/stress.$v"; fail "vmstress on $v did not verify"; }
    i=$((i + 1))
done
ok "400 random writes each on 3 VMs at once: $(grep '^DONE' "$T/stress.v1")"
for v in v1 v2 v3; do
    [ "$(stat_value "$M" "vm $v" open)" -eq 0 ] || fail "$v still counted open after its writer exited"
    [ "$(stat_value "$M" "vm $v" layer_bytes)" -gt 0 ] || fail "$v has no layer bytes after writes"
done
# The VMs did not leak into each other or into the base.
cmp "$M/bases/b.raw" "$T/img.raw" || fail "the base changed under its VMs"
! cmp -s "$T/shadow.v1" "$T/shadow.v2" || fail "two VMs got identical content"
ok "base unchanged, VMs closed, each VM has its own layer"

# --- remount -------------------------------------------------------------------
umount_imgfs "$M"
sync; echo 3 > /proc/sys/vm/drop_caches
mount_imgfs "$T/repo" "$M" "state=$T/state"
for v in v1 v2 v3; do verify_vm $v "$T/shadow.$v" "$v differs from its shadow after a remount"; done
[ "$(stat_value "$M" vms load_errors)" = none ] || fail "load errors after a clean remount"
ok "all 3 VMs read back exactly after unmount and remount"

# More writes over layers that already own blocks, on a fresh mount.
"$STRESS" "$M/vms/v1.raw" "$T/shadow.v1" 44 200 --fsync-every 50 "${INSIDE[@]}" > "$T/stress.v1b" 2>&1 ||
    { cat "$T/stress.v1b"; fail "second round of writes on v1 mismatched"; }
ok "second round on v1 over its existing layer: $(tail -n 1 "$T/stress.v1b")"

# --- kill -9 right after the final fsync -----------------------------------------
"$STRESS" "$M/vms/v2.raw" "$T/shadow.v2" 55 300 --fsync-every 25 --no-verify "${INSIDE[@]}" > "$T/stress.v2b" 2>&1 ||
    { cat "$T/stress.v2b"; fail "writes to v2 before the crash failed"; }
grep -q '^DONE' "$T/stress.v2b" || fail "vmstress did not report its final fsync"
kill9 "$M"
sync; echo 3 > /proc/sys/vm/drop_caches
mount_imgfs "$T/repo" "$M" "state=$T/state"
verify_vm v2 "$T/shadow.v2" "fsync'd writes to v2 were lost or damaged by kill -9"
verify_vm v1 "$T/shadow.v1" "v1 changed across the kill -9"
verify_vm v3 "$T/shadow.v3" "v3 changed across the kill -9"
[ "$(stat_value "$M" vms load_errors)" = none ] || fail "load errors after kill -9: $(grep load_errors "$M/.imgfs/stats")"
ok "kill -9 right after fsync: all fsync'd data intact ($(grep -c '^SYNCED' "$T/stress.v2b") intermediate fsyncs)"

# --- kill -9 in the middle of unsynced writes --------------------------------------
cp "$T/shadow.v3" "$T/synced.v3"
"$STRESS" "$M/vms/v3.raw" "$T/shadow.v3" 66 0 --unsynced "$T/ranges.v3" "${INSIDE[@]}" > "$T/stress.v3b" 2>&1 &
writer=$!
wait_for "the unsynced writer did not reach 50 writes" \
    'grep -q "^WROTE 50$" "$T/stress.v3b" 2>/dev/null || { kill -0 $writer 2>/dev/null || { cat "$T/stress.v3b"; fail "the unsynced writer stopped early"; }; false; }'
kill9 "$M"
status=0
timeout 120 tail --pid=$writer -f /dev/null || fail "the writer hung after the daemon was killed"
wait $writer || status=$?
[ "$status" -eq 3 ] || { cat "$T/stress.v3b"; fail "the writer should have stopped on a failed write (status $status)"; }
sync; echo 3 > /proc/sys/vm/drop_caches
mount_imgfs "$T/repo" "$M" "state=$T/state"
"$STRESS" --verify-except "$M/vms/v3.raw" "$T/synced.v3" "$T/ranges.v3" "$T/shadow.v3" > "$T/verify.v3" 2>&1 ||
    { cat "$T/verify.v3"; fail "kill -9 during unsynced writes damaged bytes those writes never touched"; }
ok "kill -9 during $(wc -l < "$T/ranges.v3") unsynced writes: v3 opens, reads without error, untouched bytes intact"
echo "    $(head -n 1 "$T/verify.v3")"
verify_vm v1 "$T/shadow.v1" "v1 changed across the second kill -9"
verify_vm v2 "$T/shadow.v2" "v2 changed across the second kill -9"
[ "$(stat_value "$M" vms load_errors)" = none ] || fail "load errors after kill -9: $(grep load_errors "$M/.imgfs/stats")"
ok "the other VMs are intact after the second kill -9"

# The crashed VM keeps working: take its current content as the new shadow.
cp "$M/vms/v3.raw" "$T/shadow.v3"
"$STRESS" "$M/vms/v3.raw" "$T/shadow.v3" 77 150 --fsync-every 30 "${INSIDE[@]}" > "$T/stress.v3c" 2>&1 ||
    { cat "$T/stress.v3c"; fail "writes to v3 after the crash mismatched"; }
umount_imgfs "$M"
sync; echo 3 > /proc/sys/vm/drop_caches
mount_imgfs "$T/repo" "$M" "state=$T/state"
verify_vm v3 "$T/shadow.v3" "v3 after crash recovery and more writes differs after a remount"
ok "v3 takes new writes after the crash and keeps them across a remount"

# A write across the end of a disk. With direct I/O it is cut at the end (a
# short write); with the writeback cache the kernel takes all of it and the
# fsync fails with ENOSPC. Either way the part inside lands and the disk does
# not grow.
mode=direct
[ ${#INSIDE[@]} -gt 0 ] && mode=writeback
python3 - "$M/vms/v1.raw" "$SIZE" "$mode" <<'PY' || fail "a write across the end of the disk ($mode) behaved wrongly"
import errno, os, sys
path, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_RDWR)
n = os.pwrite(fd, b"E" * 300, size - 100)
if mode == "writeback":
    assert n == 300, f"write returned {n}"
    try:
        os.fsync(fd)
        sys.exit("fsync after a write past the end succeeded")
    except OSError as e:
        assert e.errno == errno.ENOSPC, f"fsync failed with {e}, want ENOSPC"
else:
    assert n == 100, f"a write across the end returned {n}, want the 100 bytes inside"
    os.fsync(fd)
try:
    os.close(fd)
except OSError:
    pass
PY
printf 'E%.0s' $(seq 1 100) | dd of="$T/shadow.v1" bs=1 seek=$((SIZE - 100)) conv=notrunc status=none
drop_caches
[ "$(stat -c %s "$M/vms/v1.raw")" -eq "$SIZE" ] || fail "the disk grew after a write past its end"
verify_vm v1 "$T/shadow.v1" "after a write across the end, v1 is not its old content plus the part inside"
ok "a write across the end ($mode): the part inside landed, the rest was refused, the disk did not grow"
umount_imgfs "$M"
finish
