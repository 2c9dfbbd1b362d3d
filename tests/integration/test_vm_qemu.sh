#!/bin/bash
# qemu as a real client of VM disks: qemu-io with cache=none (O_DIRECT, also
# with aio=native and io_uring) and cache=writeback, discard and write-zeroes,
# qemu-img compare against a shadow, qemu-img info and map; qemu's image
# locking while qemu-system-x86_64 holds a disk; and owner and mode for the
# hypervisor's user (chown/chmod persist across a remount, with
# allow_other,default_permissions: user nobody may use the disk, another user
# may not).
. "$(dirname "$0")/lib.sh"

MIB=1048576
M=$T/mnt
OPTS="state=$T/state,allow_other,default_permissions"
chmod 755 "$T" # let users nobody and daemon reach the mount point
QEMU_PIDS=()
stop_qemus() {
    local pid
    for pid in "${QEMU_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}
at_exit stop_qemus

make_image "$T/base.raw" $((32 * MIB))
"$IMGFSCTL" publish "$T/base.raw" "$T/repo" --name qb > /dev/null
mkdir -p "$T/state"
mount_imgfs "$T/repo" "$M" "$OPTS"
"$IMGFSCTL" vm create "$M" q --base qb > /dev/null || fail "cannot create VM q"
Q=$M/vms/q.raw
cp "$T/base.raw" "$T/shadow"

# qio WHAT FILE QEMU-IO-ARGS...: qemu-io must succeed without complaints.
qio() {
    local what=$1 file=$2; shift 2
    local rc=0
    timeout 60 qemu-io -f raw "$@" "$file" > "$T/qio.out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ] || grep -qiE 'fail|error|mismatch|denied' "$T/qio.out"; then
        cat "$T/qio.out" >&2
        fail "$what: qemu-io exited with $rc or reported an error"
    fi
}
# both WHAT QEMU-IO-ARGS...: the same qemu-io commands on the VM and on the
# shadow (plain file, default cache mode).
both() {
    local what=$1; shift
    qio "$what" "$Q" "$@"
    local args=() a skip=0
    for a in "$@"; do # the shadow gets the commands without the cache/aio options
        if [ "$skip" = 1 ]; then skip=0; continue; fi
        case $a in -t | -i) skip=1 ;; *) args+=("$a") ;; esac
    done
    qio "$what (shadow)" "$T/shadow" "${args[@]}"
}

# ---- qemu-io: O_DIRECT, native AIO, io_uring, writeback, discard, zeroes -----------
both "cache=none write+read" -t none -c 'write -P 0x5a 1M 64k' -c 'read -P 0x5a 1M 64k'
both "cache=none unaligned write+read" -t none -c 'write -P 0x5b 5000 3000' -c 'read -P 0x5b 5000 3000' \
    -c 'read -P 0x5a 1M 64k'
both "cache=none aio=native" -t none -i native -c 'write -P 0x5c 2M 256k' -c 'aio_write -P 0x5d 3M 128k' \
    -c 'aio_flush' -c 'read -P 0x5c 2M 256k' -c 'read -P 0x5d 3M 128k'
if qemu-io -f raw -t none -i io_uring -c 'read 0 4k' "$T/shadow" > /dev/null 2>&1; then
    both "cache=none aio=io_uring" -t none -i io_uring -c 'write -P 0x5e 3700k 8k' -c 'read -P 0x5e 3700k 8k'
    iouring=", io_uring"
fi
both "cache=writeback write+flush+read" -t writeback -c 'write -P 0xa5 9M 512k' -c 'flush' \
    -c "write -P 0xa6 $((10 * MIB + 100)) 7000" -c 'read -P 0xa5 9M 512k' -c "read -P 0xa6 $((10 * MIB + 100)) 7000"
ok "qemu-io cache=none (psync, native$iouring) and cache=writeback: writes read back with their pattern"
# The shadow gets plain zeroes; the VM gets discard and write-zeroes requests.
qio "discard" "$Q" -t none -d unmap -c 'discard 4M 1M' -c 'read -P 0 4M 1M'
qio "write-zeroes" "$Q" -t none -d unmap -c 'write -z -u 6M 1M' -c "write -z $((7 * MIB + 512)) 3584" \
    -c 'read -P 0 6M 1M' -c "read -P 0 $((7 * MIB + 512)) 3584"
qio "shadow zeroes" "$T/shadow" -c 'write -P 0 4M 1M' -c 'write -P 0 6M 1M' -c "write -P 0 $((7 * MIB + 512)) 3584"
ok "qemu-io discard and write-zeroes (with and without unmap) read as zeros"

status=0
qemu-img compare -f raw -F raw "$Q" "$T/shadow" > "$T/cmp.out" 2>&1 || status=$?
[ "$status" -eq 0 ] || { cat "$T/cmp.out" >&2; fail "qemu-img compare: VM differs from the shadow (exit $status)"; }
status=0
qemu-img compare -q -f raw -F raw "$Q" "$T/base.raw" || status=$?
[ "$status" -eq 1 ] || fail "qemu-img compare of the VM with its unchanged base: exit $status, want 1 (different)"
cmp "$Q" "$T/shadow" || fail "cmp: VM differs from the shadow"
ok "qemu-img compare: VM identical to the shadow, and different from its base"

qemu-img info --output=json -f raw "$Q" > "$T/info.json" || fail "qemu-img info failed"
python3 - "$T/info.json" $((32 * MIB)) <<'PY' || fail "qemu-img info is wrong"
import json, sys
info = json.load(open(sys.argv[1]))
assert info["format"] == "raw", info
assert info["virtual-size"] == int(sys.argv[2]), info
assert info["actual-size"] > 0, info
PY
qemu-img map --output=json -f raw "$Q" > "$T/map.json" || fail "qemu-img map failed"
python3 - "$T/map.json" $((32 * MIB)) $((4 * MIB)) $((1 * MIB)) <<'PY' || fail "qemu-img map is wrong"
import json, sys
size, hole, hole_len = map(int, sys.argv[2:])
m = json.load(open(sys.argv[1]))
pos = 0
for e in m:
    assert e["start"] == pos, f"map not contiguous at {pos}: {e}"
    pos += e["length"]
assert pos == size, f"map covers {pos} bytes, want {size}"
# The discarded 1 MiB is not data; the written 64K at 1M is.
for e in m:
    if e["start"] <= hole and hole + hole_len <= e["start"] + e["length"]:
        assert not e["data"] and e["zero"], f"discarded range is mapped as {e}"
        break
else:
    sys.exit(f"no single map entry covers the discarded range: {m}")
assert any(e["data"] and e["start"] <= (1 << 20) < e["start"] + e["length"] for e in m), "written range not data"
PY
ok "qemu-img info (raw, 32 MiB) and qemu-img map (discarded range is a zero hole)"

# ---- image locking with qemu-system-x86_64 holding the disk --------------------------
# /proc/locks names a file by MAJOR:MINOR:INODE (hex, hex, decimal).
lock_id=$(python3 -c 'import os, sys; s = os.stat(sys.argv[1]); print("%02x:%02x:%d" % (os.major(s.st_dev), os.minor(s.st_dev), s.st_ino))' "$Q")
holds_lock() { grep -q " $lock_id " /proc/locks; }
# qemu takes its locks in steps while it starts; the one that refuses a
# second writer is on byte 201 (it does not share the write permission).
refuses_writers() { awk -v id="$lock_id" '$0 ~ " " id " " && $(NF-1) <= 201 && ($NF == "EOF" || $NF >= 201) { f = 1 } END { exit !f }' /proc/locks; }
holds_lock && fail "test bug: $Q is locked before qemu started"
qemu-system-x86_64 -accel tcg -nodefaults -display none -S -monitor none -serial none \
    -drive file="$Q",format=raw,if=virtio,cache=none > "$T/qemu.log" 2>&1 < /dev/null &
QEMU=$!
QEMU_PIDS+=("$QEMU")
wait_for "qemu-system-x86_64 took no write lock on the VM disk" \
    'refuses_writers || { kill -0 "$QEMU" 2>/dev/null || { cat "$T/qemu.log" >&2; fail "qemu-system-x86_64 exited early"; }; false; }'
ok "qemu-system-x86_64 holds the VM disk: $(grep -c " $lock_id " /proc/locks) lock(s) in /proc/locks"
status=0
timeout 120 qemu-io -f raw -c 'write -P 0xee 0 4k' "$Q" > "$T/lock.out" 2>&1 || status=$?
[ "$status" -ne 0 ] && [ "$status" -ne 124 ] || { cat "$T/lock.out" >&2; fail "a second writer opened the disk while qemu held it (exit $status)"; }
grep -q 'Failed to get "write" lock' "$T/lock.out" || { cat "$T/lock.out" >&2; fail "second writer failed, but not with a lock error"; }
ok "a second qemu-io writer is refused: $(head -n 1 "$T/lock.out" | sed 's/.*: //')"
status=0
timeout 120 qemu-system-x86_64 -accel tcg -nodefaults -display none -S -monitor none -serial none \
    -drive file="$Q",format=raw,if=virtio,cache=none > "$T/qemu2.log" 2>&1 < /dev/null || status=$?
[ "$status" -ne 0 ] && [ "$status" -ne 124 ] && grep -q 'Failed to get "write" lock' "$T/qemu2.log" ||
    { cat "$T/qemu2.log" >&2; fail "a second qemu-system-x86_64 on the same disk: exit $status, want a lock error"; }
ok "a second qemu-system-x86_64 on the same disk is refused with a lock error"
qio "force-share read while locked" "$Q" -U -r -c 'read -P 0x5a 1M 64k'
ok "qemu-io -U (force-share) still reads while the disk is locked"
kill "$QEMU"
wait "$QEMU" || true
QEMU_PIDS=()
# The kernel drops the locks when qemu's last reference to the file goes,
# which can trail its exit by a moment under load: bounded wait.
wait_for "locks remain after qemu-system-x86_64 exited" '! holds_lock'
both "write after qemu exited" -c 'write -P 0x77 0 4k' -c 'read -P 0x77 0 4k'
ok "after qemu-system-x86_64 exits, a writer opens the disk"

# ---- owner and mode for the hypervisor's user -------------------------------------------
# run_as USER CMD: runs CMD with /bin/sh as USER; its stderr is left in $T/as.err.
run_as() { su "$1" -s /bin/sh -c "$2" 2> "$T/as.err"; }
[ "$(stat -c '%U:%G %a' "$Q")" = "root:root 600" ] || fail "new VM disk is $(stat -c '%U:%G %a' "$Q"), want root:root 600 (private by default)"
chown nobody:nogroup "$Q" || fail "chown nobody:nogroup failed"
chmod 600 "$Q" || fail "chmod 600 failed"
[ "$(stat -c '%U:%G %a' "$Q")" = "nobody:nogroup 600" ] || fail "after chown/chmod: $(stat -c '%U:%G %a' "$Q")"
ok "chown nobody:nogroup and chmod 600 show in stat"

head -c 8192 /dev/urandom > "$T/pat"
chmod 644 "$T/pat"
run_as nobody "dd if='$T/pat' of='$Q' bs=4096 seek=$((12 * MIB / 4096)) conv=notrunc,fsync status=none" ||
    { cat "$T/as.err" >&2; fail "user nobody cannot write its disk"; }
dd if="$T/pat" of="$T/shadow" bs=4096 seek=$((12 * MIB / 4096)) conv=notrunc status=none
run_as nobody "dd if='$Q' bs=4096 skip=$((12 * MIB / 4096)) count=2 status=none" > "$T/back" ||
    { cat "$T/as.err" >&2; fail "user nobody cannot read its disk"; }
cmp "$T/back" "$T/pat" || fail "user nobody read back other data"
run_as nobody "qemu-io -f raw -t none -c 'write -P 0x3c 13M 64k' -c 'read -P 0x3c 13M 64k' '$Q'" > "$T/qio.out" ||
    { cat "$T/as.err" "$T/qio.out" >&2; fail "qemu-io as user nobody (cache=none) failed"; }
grep -qiE 'fail|error' "$T/qio.out" && { cat "$T/qio.out" >&2; fail "qemu-io as user nobody reported an error"; }
qio "shadow" "$T/shadow" -c 'write -P 0x3c 13M 64k'
ok "user nobody reads and writes its disk (dd, qemu-io cache=none)"

# expect_denied WHAT USER CMD: CMD as USER must fail with EACCES/EPERM.
expect_denied() {
    if run_as "$2" "$3" > /dev/null; then fail "$1: succeeded for user $2"; fi
    grep -qE 'Permission denied|Operation not permitted' "$T/as.err" ||
        { cat "$T/as.err" >&2; fail "$1: failed for user $2, but not with EACCES/EPERM"; }
}
expect_denied "read" daemon "cat '$Q'"
expect_denied "write" daemon "printf x | dd of='$Q' bs=1 seek=100 conv=notrunc status=none"
expect_denied "chmod" daemon "chmod 666 '$Q'"
expect_denied "chown" nobody "chown daemon '$Q'"
[ "$(stat -c '%U:%G %a' "$Q")" = "nobody:nogroup 600" ] || fail "denied changes changed the disk: $(stat -c '%U:%G %a' "$Q")"
ok "user daemon cannot read, write or chmod the disk; nobody cannot give it away"
run_as nobody "chmod 640 '$Q'" || { cat "$T/as.err" >&2; fail "the owner (nobody) cannot chmod its disk"; }
[ "$(stat -c %a "$Q")" = 640 ] || fail "owner's chmod 640 gave $(stat -c %a "$Q")"
run_as nobody "chmod 600 '$Q'" || fail "the owner (nobody) cannot chmod its disk back"
ok "the owner may chmod its disk"

umount_imgfs "$M"
mount_imgfs "$T/repo" "$M" "$OPTS"
[ "$(stat -c '%U:%G %a' "$Q")" = "nobody:nogroup 600" ] || fail "after remount: $(stat -c '%U:%G %a' "$Q"), want nobody:nogroup 600"
run_as nobody "dd if='$Q' bs=4096 skip=$((12 * MIB / 4096)) count=2 status=none" > "$T/back" ||
    { cat "$T/as.err" >&2; fail "user nobody cannot read its disk after remount"; }
cmp "$T/back" "$T/pat" || fail "user nobody reads other data after remount"
expect_denied "read after remount" daemon "cat '$Q'"
qemu-img compare -q -f raw -F raw "$Q" "$T/shadow" || fail "VM differs from the shadow after remount"
ok "owner, mode and data survive a remount; daemon still denied; qemu-img compare identical"
umount_imgfs "$M"
finish
