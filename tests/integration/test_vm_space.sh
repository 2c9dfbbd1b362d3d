#!/bin/bash
# Space on VM disks: discards (fallocate punch-hole and zero-range, aligned
# and not, over layer data and over base-only ranges) read as zeros and give
# layer space back; SEEK_DATA/SEEK_HOLE report exactly the data, as seen by
# python, qemu-img map, cp --sparse=always and qemu-img convert; and a full
# state directory makes writes fail with ENOSPC without losing fsync'd data,
# and writes work again once space is freed.
. "$(dirname "$0")/lib.sh"

MIB=1048576
M=$T/mnt

# The base: random bytes except a zero gap [12M, 16M), 32 chunks of 128K.
python3 - "$T/base.raw" <<'PY'
import random, sys
rng = random.Random(7)
MIB = 1 << 20
with open(sys.argv[1], "wb") as f:
    f.write(rng.randbytes(12 * MIB))
    f.write(bytes(4 * MIB))
    f.write(rng.randbytes(8 * MIB))
PY
"$IMGFSCTL" publish "$T/base.raw" "$T/repo" --name sp > /dev/null
head -c $((4 * MIB)) /dev/urandom > "$T/rand4m"
mkdir -p "$T/state"
mount_imgfs "$T/repo" "$M" "state=$T/state"

layer_bytes() { stat_value "$M" "vm $1" layer_bytes; }
# zero_shadow FILE OFF LEN: what a discard must do, done with dd.
zero_shadow() {
    head -c "$3" /dev/zero | dd of="$1" bs=64K seek="$2" oflag=seek_bytes conv=notrunc iflag=fullblock status=none
}
# is_zero FILE OFF LEN
is_zero() { cmp -n "$3" -i "$2:0" "$1" /dev/zero > /dev/null; }
# same FILE SHADOW WHAT: whole-file comparison, also after dropping caches.
# Unlike lib.sh's same: compares through the page cache and again after
# dropping it.
same() {
    cmp "$1" "$2" || fail "$3: VM differs from the shadow (page cache)"
    echo 3 > /proc/sys/vm/drop_caches
    cmp "$1" "$2" || fail "$3: VM differs from the shadow (after drop_caches)"
}

# ---- punch hole and zero range --------------------------------------------------
"$IMGFSCTL" vm create "$M" p --base sp > /dev/null
V=$M/vms/p.raw
cp "$T/base.raw" "$T/shadow"
dd if="$T/rand4m" of="$V" bs=1M seek=2 conv=notrunc,fsync status=none
dd if="$T/rand4m" of="$T/shadow" bs=1M seek=2 conv=notrunc status=none
same "$V" "$T/shadow" "4 MiB write at 2M"
l1=$(layer_bytes p)
[ "$l1" -ge $((4 * MIB)) ] || fail "layer_bytes $l1 after a 4 MiB write"

fallocate --punch-hole --offset $((3 * MIB)) --length $((2 * MIB)) "$V" || fail "punch-hole failed"
zero_shadow "$T/shadow" $((3 * MIB)) $((2 * MIB))
is_zero "$V" $((3 * MIB)) $((2 * MIB)) || fail "punched range [3M,5M) does not read as zeros"
cmp -n $((1 * MIB)) -i $((2 * MIB)):0 "$V" "$T/rand4m" || fail "data before the punched range changed"
cmp -n $((1 * MIB)) -i $((5 * MIB)):$((3 * MIB)) "$V" "$T/rand4m" || fail "data after the punched range changed"
same "$V" "$T/shadow" "aligned punch"
l2=$(layer_bytes p)
drop=$((l1 - l2))
[ "$drop" -ge $((2 * MIB - 64 * 1024)) ] && [ "$drop" -le $((2 * MIB + 64 * 1024)) ] ||
    fail "layer_bytes went from $l1 to $l2 after punching 2 MiB (drop $drop, want about 2 MiB)"
ok "aligned 2 MiB punch: zeros, neighbours intact, layer_bytes $l1 -> $l2"

# Unaligned discards, each compared byte for byte with the dd-zeroed shadow.
discard() { # MODE OFF LEN
    fallocate "--$1" --offset "$2" --length "$3" "$V" || fail "fallocate --$1 $2+$3 failed"
    zero_shadow "$T/shadow" "$2" "$3"
    is_zero "$V" "$2" "$3" || fail "fallocate --$1 $2+$3: range does not read as zeros"
    same "$V" "$T/shadow" "fallocate --$1 $2+$3"
}
discard punch-hole $((2 * MIB + 4096 * 3 + 100)) 10000   # in written data, both edges partial
discard punch-hole $((2 * MIB + 65536 + 100)) 200         # inside one block
discard punch-hole $((6 * MIB - 5000)) 9000               # across the written/base boundary
discard zero-range $((5 * MIB + 777)) 300000              # written data, unaligned
discard zero-range $((10 * MIB)) $((512 * 1024))          # base only, aligned
discard zero-range $((11 * MIB + 123)) 4567               # base only, unaligned
ok "unaligned punch-hole and zero-range zero exactly their bytes"

# A range that only the base holds reads as zeros, not base data, and costs
# (almost) no layer space.
before=$(layer_bytes p)
discard punch-hole $((8 * MIB)) $((1 * MIB))
is_zero "$T/base.raw" $((8 * MIB)) $((1 * MIB)) && fail "test bug: the base is zero at 8M"
after=$(layer_bytes p)
[ "$after" -le $((before + 64 * 1024)) ] || fail "punching a base-only 1 MiB grew layer_bytes $before -> $after"
ok "punch over base-only data reads zeros (layer_bytes $before -> $after)"

# seek: the discarded base range is a hole, the base around it is data.
seek() { # FILE OFF WHENCE(data|hole) -> offset or ENXIO
    python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    print(os.lseek(fd, int(sys.argv[2]), os.SEEK_DATA if sys.argv[3] == "data" else os.SEEK_HOLE))
except OSError as e:
    print("ENXIO" if e.errno == 6 else "error %d" % e.errno)' "$@"
}
[ "$(seek "$V" $((7 * MIB)) hole)" = $((8 * MIB)) ] || fail "SEEK_HOLE from 7M: $(seek "$V" $((7 * MIB)) hole), want 8M"
[ "$(seek "$V" $((8 * MIB)) data)" = $((9 * MIB)) ] || fail "SEEK_DATA from 8M: $(seek "$V" $((8 * MIB)) data), want 9M"
ok "a discarded base range is a hole for SEEK_HOLE/SEEK_DATA"

# Discards are durable: unmount, remount.
umount_imgfs "$M"
mount_imgfs "$T/repo" "$M" "state=$T/state"
same "$V" "$T/shadow" "after remount"
ok "all discards read the same after a remount"

# ---- SEEK_DATA / SEEK_HOLE --------------------------------------------------------
# extents OFF:LEN ... of a 64 MiB blank VM, 4K-aligned, in order, not touching.
EXTENTS="$((1 * MIB)):65536 $((5 * MIB)):4096 $((8 * MIB + 4096)):12288 $((20 * MIB)):$((1 * MIB)) $((64 * MIB - 8192)):8192"
"$IMGFSCTL" vm create "$M" s --size 64M > /dev/null
S=$M/vms/s.raw
truncate -s 64M "$T/s.shadow"
for e in $EXTENTS; do
    head -c "${e#*:}" /dev/urandom > "$T/piece"
    dd if="$T/piece" of="$S" bs=4K seek="${e%:*}" oflag=seek_bytes conv=notrunc,fsync status=none
    dd if="$T/piece" of="$T/s.shadow" bs=4K seek="${e%:*}" oflag=seek_bytes conv=notrunc status=none
done

# check_map FILE "OFF:LEN ...": python's SEEK_DATA/SEEK_HOLE walk and
# qemu-img map must both report exactly these data extents.
check_map() {
    local file=$1 want=$2
    python3 - "$file" "$want" <<'PY' || fail "SEEK_DATA/SEEK_HOLE extents of $file are wrong"
import errno, os, sys
path, want = sys.argv[1], [tuple(map(int, e.split(":"))) for e in sys.argv[2].split()]
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
got, pos = [], 0
while pos < size:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    if h <= d:
        sys.exit(f"SEEK_HOLE from data at {d} returned {h}")
    got.append((d, h - d))
    pos = h
if got != want:
    sys.exit(f"extents {got}, want {want}")
# Probes in the middle of extents and holes.
for off, length in want:
    mid = off + length // 2
    assert os.lseek(fd, mid, os.SEEK_DATA) == mid, f"SEEK_DATA inside data at {mid}"
    assert os.lseek(fd, mid, os.SEEK_HOLE) == off + length, f"SEEK_HOLE inside data at {mid}"
try:
    os.lseek(fd, size, os.SEEK_DATA)
    sys.exit("SEEK_DATA at EOF did not fail with ENXIO")
except OSError as e:
    assert e.errno == errno.ENXIO, e
PY
    qemu-img map --output=json -f raw "$file" > "$T/map.json" || fail "qemu-img map $file failed"
    python3 - "$T/map.json" "$want" <<'PY' || fail "qemu-img map of $file shows data elsewhere"
import json, sys
want = [tuple(map(int, e.split(":"))) for e in sys.argv[2].split()]
got = []
for m in json.load(open(sys.argv[1])):
    if m["data"]:
        if got and got[-1][0] + got[-1][1] == m["start"]:
            got[-1] = (got[-1][0], got[-1][1] + m["length"])
        else:
            got.append((m["start"], m["length"]))
if got != want:
    sys.exit(f"qemu-img map data extents {got}, want {want}")
PY
}
check_map "$S" "$EXTENTS"
cmp "$S" "$T/s.shadow" || fail "blank VM with extents differs from its shadow"
ok "SEEK_DATA/SEEK_HOLE and qemu-img map report exactly the 5 written extents"

# A discard inside an extent splits it.
fallocate --punch-hole --offset $((20 * MIB + 256 * 1024)) --length $((256 * 1024)) "$S"
zero_shadow "$T/s.shadow" $((20 * MIB + 256 * 1024)) $((256 * 1024))
SPLIT="$((1 * MIB)):65536 $((5 * MIB)):4096 $((8 * MIB + 4096)):12288 $((20 * MIB)):$((256 * 1024)) $((20 * MIB + 512 * 1024)):$((512 * 1024)) $((64 * MIB - 8192)):8192"
check_map "$S" "$SPLIT"
cmp "$S" "$T/s.shadow" || fail "VM differs from its shadow after the split"
ok "a punch inside an extent shows as a hole to SEEK_HOLE and qemu-img map"

cp --sparse=always "$S" "$T/s.copy" || fail "cp --sparse=always failed"
cmp "$T/s.copy" "$T/s.shadow" || fail "cp --sparse=always copy differs"
used=$(du -k "$T/s.copy" | cut -f1)
[ "$used" -le 2048 ] || fail "sparse copy uses $used KiB, want under 2 MiB"
qemu-img convert -f raw -O qcow2 "$S" "$T/s.qcow2" || fail "qemu-img convert failed"
qsize=$(stat -c %s "$T/s.qcow2")
[ "$qsize" -le $((3 * MIB)) ] || fail "qcow2 of the VM is $qsize bytes, want under 3 MiB"
qemu-img compare -q -f qcow2 -F raw "$T/s.qcow2" "$T/s.shadow" || fail "qcow2 of the VM differs from the shadow"
ok "cp --sparse=always (${used} KiB) and qemu-img convert -O qcow2 ($qsize bytes) are small and identical"

# A VM over the base: the base's zero chunks are holes; a write in the gap is data.
"$IMGFSCTL" vm create "$M" g --base sp > /dev/null
G=$M/vms/g.raw
check_map "$G" "0:$((12 * MIB)) $((16 * MIB)):$((8 * MIB))"
ok "VM on a base: SEEK_HOLE finds the base's zero gap [12M,16M)"
head -c 4096 /dev/urandom | dd of="$G" bs=4K seek=$((13 * MIB / 4096)) conv=notrunc,fsync status=none
check_map "$G" "0:$((12 * MIB)) $((13 * MIB)):4096 $((16 * MIB)):$((8 * MIB))"
ok "a write inside the base's zero gap is data, the rest of the gap stays a hole"

umount_imgfs "$M"

# ---- ENOSPC ---------------------------------------------------------------------
SMALL=$T/small
small_tmpfs "$SMALL" 24M
mkdir -p "$SMALL/state"
M2=$T/mnt2
mount_imgfs "$T/repo" "$M2" "state=$SMALL/state"
"$IMGFSCTL" vm create "$M2" e --size 256M > /dev/null || fail "cannot create a VM on the small state dir"
E=$M2/vms/e.raw
truncate -s 256M "$T/e.shadow"
head -c $((3 * MIB)) /dev/zero > "$SMALL/filler"
head -c $((6 * MIB)) /dev/urandom > "$T/first"
dd if="$T/first" of="$E" bs=1M conv=notrunc,fsync status=none || fail "6 MiB write on an empty state dir failed"
dd if="$T/first" of="$T/e.shadow" bs=1M conv=notrunc status=none

head -c $((40 * MIB)) /dev/urandom > "$T/big"
status=0
timeout 60 dd if="$T/big" of="$E" bs=1M seek=32 conv=notrunc,fsync 2> "$T/dd.err" || status=$?
[ "$status" -ne 124 ] || fail "writing past the free space hung"
[ "$status" -ne 0 ] || fail "writing 40 MiB into a 24 MiB state dir succeeded"
grep -q 'No space left on device' "$T/dd.err" || { cat "$T/dd.err" >&2; fail "write failed without ENOSPC"; }
copied=$(grep -oE '^[0-9]+ bytes' "$T/dd.err" | cut -d' ' -f1)
ok "40 MiB write on a 24 MiB state dir: ENOSPC after $copied bytes"
kill -0 "${DAEMON_PID[$M2]}" 2>/dev/null || fail "daemon died on ENOSPC"
ls "$M2/vms" > /dev/null && grep -q '^\[vm e\]' "$M2/.imgfs/stats" || fail "mount unusable after ENOSPC"
cmp -n $((6 * MIB)) "$E" "$T/first" || fail "fsync'd data before the ENOSPC changed"
[ -n "$copied" ] && [ "$copied" -gt 0 ] && { cmp -n "$copied" -i $((32 * MIB)):0 "$E" "$T/big" ||
    fail "the $copied bytes acknowledged before ENOSPC read back wrong"; }
ok "daemon up; fsync'd data and the acknowledged part of the failed write intact"
# Still full: an O_DIRECT write and a 1-byte write (copy-up) fail the same way.
status=0
timeout 60 dd if="$T/big" of="$E" bs=1M count=1 seek=200 oflag=direct conv=notrunc 2> "$T/dd.err" || status=$?
[ "$status" -ne 0 ] && [ "$status" -ne 124 ] && grep -q 'No space left on device' "$T/dd.err" ||
    { cat "$T/dd.err" >&2; fail "O_DIRECT write on a full state dir: status $status, want ENOSPC"; }
status=0
printf x | timeout 60 dd of="$E" bs=1 seek=$((210 * MIB + 5)) conv=notrunc 2> "$T/dd.err" || status=$?
[ "$status" -ne 0 ] && [ "$status" -ne 124 ] && grep -q 'No space left on device' "$T/dd.err" ||
    { cat "$T/dd.err" >&2; fail "1-byte write on a full state dir: status $status, want ENOSPC"; }
is_zero "$E" $((200 * MIB)) $((11 * MIB)) || fail "failed writes left data behind"
ok "on the full state dir O_DIRECT and 1-byte writes fail with ENOSPC and change nothing"
# Metadata changes on the full state dir fail cleanly too.
status=0
chmod 640 "$E" 2> "$T/chmod.err" || status=$?
[ "$status" -ne 0 ] || fail "chmod succeeded on a full state dir (where was the VM file written?)"
[ "$(stat -c %a "$E")" = 600 ] || fail "failed chmod changed the mode to $(stat -c %a "$E")"
expect_error "vm create on a full state dir" "$IMGFSCTL" vm create "$M2" f --size 16M
[ ! -e "$M2/vms/f.raw" ] || fail "a failed vm create left vms/f.raw"

# Free space by removing the filler: writes work again.
rm "$SMALL/filler"
head -c $((1 * MIB)) /dev/urandom > "$T/p1"
dd if="$T/p1" of="$E" bs=1M seek=100 conv=notrunc,fsync status=none || fail "write after freeing 3 MiB failed"
dd if="$T/p1" of="$T/e.shadow" bs=1M seek=100 conv=notrunc status=none
# Free space by punching the failed write's range: its layer space comes back.
fallocate --punch-hole --offset $((32 * MIB)) --length $((40 * MIB)) "$E" || fail "punch on the full state dir failed"
head -c $((10 * MIB)) /dev/urandom > "$T/p2"
dd if="$T/p2" of="$E" bs=1M seek=120 conv=notrunc,fsync status=none ||
    fail "10 MiB write after punching 40 MiB failed (punch did not free space?)"
dd if="$T/p2" of="$T/e.shadow" bs=1M seek=120 conv=notrunc status=none
same "$E" "$T/e.shadow" "after freeing space"
ok "after freeing space (rm filler, punch) writes succeed and the VM reads right"

umount_imgfs "$M2"
mount_imgfs "$T/repo" "$M2" "state=$SMALL/state"
same "$E" "$T/e.shadow" "after remount of the small state dir"
grep -q '^load_errors *none$' "$M2/.imgfs/stats" || { grep load_errors "$M2/.imgfs/stats" >&2; fail "VMs fail to load after ENOSPC"; }
[ ! -e "$M2/vms/f.raw" ] || fail "the VM whose create failed exists after the remount"
[ "$(ls "$SMALL/state/vms")" = e.vm ] || fail "state vms/ holds $(ls "$SMALL/state/vms" | tr '\n' ' ')"
[ "$(ls "$SMALL/state/layers" | wc -l)" = 1 ] || fail "state layers/ holds leftovers: $(ls "$SMALL/state/layers" | tr '\n' ' ')"
ok "after a remount the VM still reads right"
umount_imgfs "$M2"

# ---- a disk whose size is not a multiple of 4 KiB: discards up to its end ----------
mount_imgfs "$T/repo" "$M" "state=$T/state"
"$IMGFSCTL" vm create "$M" u --size 41472 > /dev/null
U=$M/vms/u.raw
head -c 41472 /dev/urandom > "$T/u.shadow"
dd if="$T/u.shadow" of="$U" bs=4K conv=notrunc,fsync status=none
cmp "$U" "$T/u.shadow" || fail "41472-byte VM reads wrong"
cp "$T/u.shadow" "$T/shadow.u"
fallocate --punch-hole --offset 40472 --length 1000 "$U"
zero_shadow "$T/shadow.u" 40472 1000
same "$U" "$T/shadow.u" "punch of the last 1000 bytes"
fallocate --punch-hole --offset 36864 --length 4608 "$U"
zero_shadow "$T/shadow.u" 36864 4608
same "$U" "$T/shadow.u" "punch of the last 4608 bytes"
[ "$(stat -c %s "$U")" = 41472 ] || fail "punch changed the size of a VM"
check_map "$U" "0:36864"
lu=$(layer_bytes u)
# The log (layer.h) adds its header and a record per flush, and keeps the
# blocks that the partial punches rewrote before a flush until compaction.
[ "$lu" -le $((36864 + 6 * 4096)) ] || fail "layer_bytes of u is $lu after punching all but its first 36864 bytes"
ok "41472-byte disk: punches to its end zero exactly, size kept, tail is a hole"
umount_imgfs "$M"
finish
