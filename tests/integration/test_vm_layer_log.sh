#!/usr/bin/env bash
# The layer log (include/layer.h) through a real mount:
#   - a layer in the old format (ID.data + ID.map bitmap) is converted when
#     the daemon opens it: the VM reads the same, discarded blocks stay holes,
#     and the old files are gone;
#   - a garbled last record (a torn write of it) is dropped at open: the VM
#     reads as after the fsync before it;
#   - O_DIRECT writes complete while a compaction is paused between its
#     switch to ID.log.new and the rename, and survive a kill -9 once fsync'd;
#   - a kill -9 while a compaction has written ID.log.new but not renamed it
#     loses nothing that was fsync'd, and the next daemon compacts the layer
#     in the background, after which the VM still reads the same.
. "$(dirname "$0")/lib.sh"

STRESS=$TOOLS/vmstress
[ -x "$STRESS" ] || fail "missing $STRESS (build the vmstress target)"
M=$T/mnt
S=$T/state
MIB=$((1024 * 1024))
mkdir -p "$T/repo" "$S"
make_image "$T/base.raw" $((16 * MIB))
"$IMGFSCTL" publish "$T/base.raw" "$T/repo" --name base > /dev/null
live_layer() { awk '$1 == "live" { print $NF }' "$S/vms/$1.vm"; }
kill9() {
    local pid=${DAEMON_PID[$M]}
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    fusermount3 -uz "$M" 2>/dev/null || umount -l "$M" 2>/dev/null || true
}

# ---- an old-format layer is converted at open ----------------------------------
mount_imgfs "$T/repo" "$M" "state=$S"
"$IMGFSCTL" vm create "$M" old --base base > /dev/null
V=$M/vms/old.raw
put $((1 * MIB)) $((3 * MIB)) 11 "$V"
put $((9 * MIB + 100)) 5000 12 "$V"
fallocate --punch-hole --offset $((2 * MIB)) --length $((1 * MIB)) "$V"
sync "$V"
cp "$V" "$T/old.shadow"
id=$(live_layer old)
umount_imgfs "$M"
[ -f "$S/layers/$id.log" ] || fail "the VM's layer $id has no log file"
# Rebuild the layer in the old format from what the VM shows: owned blocks
# [1M, 4M) (of which [2M, 3M) discarded: owned, a hole) and the two blocks
# the unaligned write touched.
python3 - "$T/old.shadow" "$S/layers/$id" $((16 * MIB)) <<'PY'
import os, sys
shadow, prefix, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
BS = 4096
owned = set(range(256, 1024)) | set(range((9 << 20) // BS, ((9 << 20) + 100 + 5000 - 1) // BS + 1))
holes = set(range(512, 768))
data = open(shadow, "rb").read()
with open(prefix + ".data", "wb") as f:
    f.truncate(size)
    for b in sorted(owned - holes):
        f.seek(b * BS)
        f.write(data[b * BS:(b + 1) * BS])
bits = bytearray((size // BS + 7) // 8 + 4096)
for b in owned:
    bits[b // 8] |= 1 << (b % 8)
header = ("imgfs-layer-map 1\n%d\n" % size).encode().ljust(64, b"\0")
with open(prefix + ".map", "wb") as f:
    f.write(header + bits)
os.unlink(prefix + ".log")
PY
mount_imgfs "$T/repo" "$M" "state=$S"
same "$V" "$T/old.shadow" "the converted layer reads differently"
[ -f "$S/layers/$id.log" ] || fail "no log after the conversion"
[ ! -e "$S/layers/$id.data" ] && [ ! -e "$S/layers/$id.map" ] || fail "the old layer files are still there"
hole=$(python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); print(os.lseek(fd, 2 << 20, os.SEEK_HOLE))" "$V")
[ "$hole" = $((2 * MIB)) ] || fail "the discarded range is not a hole after the conversion (SEEK_HOLE from 2M: $hole)"
put $((5 * MIB)) 8192 13 "$V" "$T/old.shadow"
sync "$V"
umount_imgfs "$M"
mount_imgfs "$T/repo" "$M" "state=$S"
same "$V" "$T/old.shadow" "the converted layer after a write and a remount"
ok "an old-format layer is converted at open: same bytes, the discarded range a hole, old files removed"
umount_imgfs "$M"

# ---- a torn last record ------------------------------------------------------------
# Two fsync'd writes, then the record of the second one is garbled on disk
# (as a torn write of it would leave it): the VM opens, without repair, at
# the first fsync.
mount_imgfs "$T/repo" "$M" "state=$S"
"$IMGFSCTL" vm create "$M" torn --size 8M > /dev/null
TV=$M/vms/torn.raw
put $((1 * MIB)) 20000 21 "$TV"
sync "$TV"
cp "$TV" "$T/torn.first"
put $((3 * MIB)) 9000 22 "$TV"
sync "$TV"
tid=$(live_layer torn)
umount_imgfs "$M"
# The records chain from block 1, each naming the next (layer.h); garble
# the last valid one, byte 100 (an entry).
python3 - "$S/layers/$tid.log" <<'PY'
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    data = f.read()
    at, last, seq = 1, None, 1
    while (at + 1) * 4096 <= len(data):
        rec = data[at * 4096:(at + 1) * 4096]
        magic, n, s = struct.unpack_from("<IIQ", rec, 0)
        if magic != 0x31434572 or s != seq:
            break
        last, at, seq = at, struct.unpack_from("<Q", rec, 24)[0], seq + 1
    assert last is not None and seq > 2, "expected at least two records"
    f.seek(last * 4096 + 100)
    f.write(bytes([data[last * 4096 + 100] ^ 0x55]))
PY
mount_imgfs "$T/repo" "$M" "state=$S"
same "$TV" "$T/torn.first" "a garbled last record: the VM does not read as after the first fsync"
put $((5 * MIB)) 4096 23 "$TV" "$T/torn.first"
sync "$TV"
umount_imgfs "$M"
mount_imgfs "$T/repo" "$M" "state=$S"
same "$TV" "$T/torn.first" "after a garbled last record, a new write and a remount"
ok "a garbled last record: the VM opens at the fsync before it, and takes writes again"
umount_imgfs "$M"

# ---- writes go on while a compaction finishes ------------------------------------
# A compaction paused after its switch to the new log, before its sync and
# rename, for as long as $PAUSE exists (IMGFS_TEST_COMPACT_PAUSE_FILE): every
# O_DIRECT write issued then completes while ID.log.new is still there
# (before the rename, so nothing held them for the compaction) and reads back
# right; an fsync issued then does not return while the compaction is
# paused, and returns once ID.log.new is gone (renamed: the log a crash
# opens holds it); the writes survive a kill -9 and read the same after a
# remount.
PAUSE=$T/compaction.pause
export IMGFS_LAYER_COMPACT_MIN=1M IMGFS_TEST_COMPACT_PAUSE_FILE=$PAUSE
touch "$PAUSE"
mount_imgfs "$T/repo" "$M" "state=$S"
"$IMGFSCTL" vm create "$M" p --size 16M > /dev/null
P=$M/vms/p.raw
pid_layer=$(live_layer p)
python3 - "$P" "$S/layers/$pid_layer.log.new" "${DAEMON_LOG[$M]}" "$T/p.shadow" "$PAUSE" <<'PY' || fail "writes during a compaction's pause"
import mmap, os, random, sys, threading, time
disk, new_log, daemon_log, shadow_path, pause = sys.argv[1:]
MIB, BS = 1 << 20, 4096
shadow = bytearray(16 * MIB)
buf = mmap.mmap(-1, 2 * MIB)  # page aligned, for O_DIRECT
fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
rnd = random.Random(5)
def write(off, data):
    buf[:len(data)] = data
    assert os.pwritev(fd, [memoryview(buf)[:len(data)]], off) == len(data)
    shadow[off:off + len(data)] = data
# 2 MiB written four times, then one fsync: its flush starts a compaction
# (dead space 6 MiB, live 2 MiB).
for _ in range(4):
    write(0, rnd.randbytes(2 * MIB))
os.fsync(fd)
deadline = time.monotonic() + 120  # only so that a failing run ends
while b"compaction switched" not in open(daemon_log, "rb").read():
    if time.monotonic() > deadline:
        sys.exit("no compaction reached its switch after the fsync")
    time.sleep(0.05)
# The compaction is paused after its switch until the pause file goes.
if not os.path.exists(new_log):
    sys.exit("ID.log.new is gone while the compaction is paused after its switch")
for i in range(64):
    off = rnd.randrange(0, 4 * MIB // BS) * BS
    write(off, rnd.randbytes(BS))
if not os.path.exists(new_log):
    sys.exit("an O_DIRECT write waited for the paused compaction's rename")
got = os.preadv(fd, [buf], 0)
if buf[:2 * MIB] != shadow[:2 * MIB]:
    sys.exit("the writes made during the pause read back wrong")
synced = threading.Event()
new_log_at_return = []
def flush():
    os.fsync(fd)
    new_log_at_return.append(os.path.exists(new_log))
    synced.set()
threading.Thread(target=flush, daemon=True).start()
# While paused the fsync cannot return: a slow machine only makes this
# check see less, never fail.
if synced.wait(1):
    sys.exit("an fsync returned while the compaction was paused before its rename")
os.unlink(pause)
if not synced.wait(120):
    sys.exit("the fsync did not return once the compaction went on")
if new_log_at_return[0]:
    sys.exit("an fsync returned before the compacted log was renamed")
os.close(fd)
open(shadow_path, "wb").write(shadow)
print("64 O_DIRECT writes completed during the paused compaction")
PY
kill9
IMGFS_LAYER_COMPACT_MIN=1T mount_imgfs "$T/repo" "$M" "state=$S"
same "$P" "$T/p.shadow" "the writes made during a compaction's pause, fsync'd after it, after a kill -9"
ok "O_DIRECT writes complete while a compaction is paused after its switch; its fsync waits for the rename; all survive a kill -9"
umount_imgfs "$M"

# ---- kill -9 during a compaction ------------------------------------------------
# Compact as soon as dead space passes 1 MiB and the live data (1500 random
# writes of up to 300 KiB on a 16 MiB disk get there). Then, with $PAUSE
# there, rewrite the disk with the bytes it already holds until a compaction
# reaches its switch and pauses before its rename, and kill the daemon
# there: the kill lands between the switch and the rename, however long
# anything took.
mount_imgfs "$T/repo" "$M" "state=$S"
"$IMGFSCTL" vm create "$M" c --base base > /dev/null
C=$M/vms/c.raw
cp "$T/base.raw" "$T/c.shadow"
"$STRESS" "$C" "$T/c.shadow" 7 1500 --fsync-every 20 > "$T/stress.c" 2>&1 ||
    { cat "$T/stress.c"; fail "vmstress on c failed"; }
grep -q '^DONE' "$T/stress.c" || fail "vmstress did not report its final fsync"
cid=$(live_layer c)
switched_before=$(grep -c "layer $cid: compaction switched" "${DAEMON_LOG[$M]}" || true)
touch "$PAUSE"
# Same bytes: whether these writes are durable changes nothing of what the
# disk must read. A flush waits while a compaction is paused, so the loop
# stops at the first one that starts a compaction, or when the daemon dies.
( for _ in $(seq 1 20); do
      dd if="$T/c.shadow" of="$C" bs=1M oflag=direct conv=notrunc,fsync status=none 2>/dev/null || break
  done ) &
rewriter=$!
at_exit "kill $rewriter 2>/dev/null"
for _ in $(seq 1 1200); do
    [ "$(grep -c "layer $cid: compaction switched" "${DAEMON_LOG[$M]}" || true)" -gt "$switched_before" ] && break
    kill -0 "$rewriter" 2>/dev/null || break
    sleep 0.05
done
[ "$(grep -c "layer $cid: compaction switched" "${DAEMON_LOG[$M]}" || true)" -gt "$switched_before" ] ||
    fail "no compaction paused at its switch after 1500 overwrites and rewrites ($(grep -A3 '^top_layer_blocks' "$M/.imgfs/stats" | tr '\n' ' '))"
[ -e "$S/layers/$cid.log.new" ] || fail "the paused compaction's $cid.log.new is not there"
before=$(stat -c %s "$S/layers/$cid.log")
kill9
wait "$rewriter" 2>/dev/null || true
rm -f "$PAUSE"
# This daemon does not compact (so that a new ID.log.new cannot appear).
IMGFS_LAYER_COMPACT_MIN=1T mount_imgfs "$T/repo" "$M" "state=$S"
[ ! -e "$S/layers/$cid.log.new" ] || fail "the interrupted compaction's file is still there after the remount"
"$STRESS" --verify "$C" "$T/c.shadow" > "$T/verify.c" 2>&1 || { cat "$T/verify.c"; fail "fsync'd data lost across a kill -9 during compaction"; }
ok "kill -9 during a compaction (ID.log.new written, not renamed): every fsync'd byte intact"
umount_imgfs "$M"

# Without the pause the next daemon compacts the layer on its own.
unset IMGFS_TEST_COMPACT_PAUSE_FILE
mount_imgfs "$T/repo" "$M" "state=$S"
wait_stat "$M" "vm c" top_layer_compactions 1
after=$(stat -c %s "$S/layers/$cid.log")
[ "$after" -lt "$before" ] || fail "compaction did not shrink the log ($before -> $after bytes)"
"$STRESS" --verify "$C" "$T/c.shadow" > "$T/verify.c" 2>&1 || { cat "$T/verify.c"; fail "c reads wrong after compaction"; }
umount_imgfs "$M"
mount_imgfs "$T/repo" "$M" "state=$S"
"$STRESS" --verify "$C" "$T/c.shadow" > "$T/verify.c" 2>&1 || { cat "$T/verify.c"; fail "c reads wrong after compaction and a remount"; }
ok "a background compaction shrinks the log ($before -> $after bytes) and the VM reads the same, also after a remount"
umount_imgfs "$M"
finish
