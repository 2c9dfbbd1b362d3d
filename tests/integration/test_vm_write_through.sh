#!/usr/bin/env bash
# A guest's O_DIRECT writes reach the layer's log with O_DIRECT
# (layer_write_through in include/layer.h), through a real mount:
#   - small O_DIRECT writes with an fsync every few (the flushes that zero
#     the log ahead) are counted as written through, mixed with unaligned
#     O_DIRECT writes and buffered writes of the same blocks; every write
#     reads back at once, and the disk equals its shadow;
#   - what was fsync'd survives a kill -9 of the daemon;
#   - a kill -9 in the middle of unsynced O_DIRECT writes (counted as written
#     through) leaves every byte those writes did not touch as it was at the
#     last fsync, and the VM reads without error after the remount.
# On a state directory without O_DIRECT or zeroing ahead (tmpfs) the writes
# go through the page cache; then only the data is checked.
. "$(dirname "$0")/lib.sh"

STRESS=$TOOLS/vmstress
[ -x "$STRESS" ] || fail "missing $STRESS (build the vmstress target)"
M=$T/mnt
S=$T/state
mkdir -p "$S"
# Not a multiple of 4 KiB: the disk ends in a short block, which unaligned
# writes reach.
SIZE=$((16 * 1048576 + 5555))
make_image "$T/img.raw" $SIZE
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name b > /dev/null
mount_imgfs "$T/repo" "$M" "state=$S"
"$IMGFSCTL" vm create "$M" v --base b > /dev/null
cp "$T/img.raw" "$T/shadow"
THROUGH=1
[ "$(stat -f -c %T "$S")" = tmpfs ] && THROUGH=0

kill9() {
    local pid=${DAEMON_PID[$M]}
    check_daemon_log "${DAEMON_LOG[$M]}"
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    unset "DAEMON_PID[$M]"
    fusermount3 -uz "$M" 2>/dev/null || umount -l "$M"
    ! mountpoint -q "$M" || fail "$M still mounted after kill -9 and lazy unmount"
}

# writer MODE: writes to the VM and its shadow (in the shadow first).
#   synced    small O_DIRECT writes with an fsync every 8 until at least
#             1000 blocks were written through (THROUGH=1; a bound ends a
#             failing run), mixed with unaligned O_DIRECT and buffered
#             writes, each read back at once; a final fsync
#   unsynced  no fsync: O_DIRECT 4 KiB writes, each range "OFF LEN" appended
#             to $T/ranges first; once 64 blocks more are written through
#             prints READY, then goes on until a write fails (exit 3)
writer() {
    python3 - "$1" "$M/vms/v.raw" "$T/shadow" "$M/.imgfs/stats" "$T/ranges" $SIZE $THROUGH <<'PY'
import mmap, os, random, sys, time
mode, disk, shadow_path, stats, ranges_path = sys.argv[1:6]
size, through = int(sys.argv[6]), sys.argv[7] == "1"
BS = 4096
buf = mmap.mmap(-1, 1 << 20)  # page aligned, for O_DIRECT
dfd = os.open(disk, os.O_RDWR | os.O_DIRECT)
bfd = os.open(disk, os.O_RDWR)
shadow = os.open(shadow_path, os.O_RDWR)
rnd = random.Random(mode)

def through_blocks():
    section = False
    for line in open(stats):
        if line.startswith("["):
            section = line.strip() == "[vm v]"
        elif section and line.startswith("top_layer_through_blocks "):
            return int(line.split()[1])
    sys.exit("no top_layer_through_blocks in [vm v] of the stats")

def write(fd, off, data, check=True):
    os.pwrite(shadow, data, off)
    if fd == dfd:
        buf[:len(data)] = data
        n = os.pwritev(fd, [memoryview(buf)[:len(data)]], off)
    else:
        n = os.pwrite(fd, data, off)
    if n != len(data):
        sys.exit("short write at %d: %d of %d" % (off, n, len(data)))
    if check and os.pread(bfd, len(data), off) != data:
        sys.exit("the write at %d (%d bytes) reads back wrong" % (off, len(data)))

start = through_blocks()
if mode == "synced":
    for i in range(20000):
        kind = i % 6
        if kind < 4:    # aligned O_DIRECT, 4-32 KiB
            n = BS * rnd.randint(1, 8)
            write(dfd, rnd.randrange(0, size // BS - 8) * BS, rnd.randbytes(n))
        elif kind == 4:  # unaligned O_DIRECT, some to the disk's end
            if rnd.random() < 0.1:
                off = size - rnd.randint(1, 3 * BS)
            else:
                off = rnd.randrange(0, size - 1)
            write(dfd, off, rnd.randbytes(min(rnd.randint(1, 3 * BS), size - off)))
        else:            # buffered
            off = rnd.randrange(0, size - 1)
            write(bfd, off, rnd.randbytes(min(rnd.randint(1, 2 * BS), size - off)))
        if i % 8 == 7:
            os.fsync(dfd)
            if i >= 400 and (not through or through_blocks() - start >= 1000):
                break
    os.fsync(dfd)
    got = through_blocks() - start
    if through and got < 1000:
        sys.exit("only %d blocks written through after %d writes" % (got, i + 1))
    print("%d writes, %d blocks written through" % (i + 1, got))
else:
    ranges = os.open(ranges_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    ready = False
    for i in range(1000000):
        off = rnd.randrange(0, size // BS - 1) * BS
        os.write(ranges, b"%d %d\n" % (off, BS))
        try:
            write(dfd, off, rnd.randbytes(BS), check=not ready)
        except OSError:
            if ready:
                sys.exit(3)  # the daemon is gone: expected
            raise
        if not ready and i >= 64 and (not through or through_blocks() - start >= 64):
            print("READY", flush=True)
            ready = True
        if not ready and i > 20000:
            sys.exit("no unsynced write was written through")
        if ready:
            time.sleep(0.001)
PY
}

# ---- fsync'd writes through, then a kill -9 -------------------------------------
writer synced > "$T/synced.out" || { cat "$T/synced.out"; fail "O_DIRECT writes with fsyncs"; }
same "$M/vms/v.raw" "$T/shadow" "the VM differs from its shadow after writes through"
ok "O_DIRECT writes through the log, with unaligned and buffered ones: $(cat "$T/synced.out"), all read back"
kill9
mount_imgfs "$T/repo" "$M" "state=$S"
same "$M/vms/v.raw" "$T/shadow" "fsync'd writes through were lost or damaged by a kill -9"
ok "kill -9 after the fsync: every fsync'd byte written through is intact"

# ---- a kill -9 in the middle of unsynced writes through -----------------------------
# The flushes of the writes above were small: the log is zeroed ahead again.
writer synced > "$T/synced2.out" || { cat "$T/synced2.out"; fail "O_DIRECT writes with fsyncs after the remount"; }
cp "$T/shadow" "$T/synced"
writer unsynced > "$T/unsynced.out" 2>&1 &
w=$!
wait_for "the unsynced writer did not get ready" \
    'grep -q "^READY" "$T/unsynced.out" 2>/dev/null || { kill -0 $w 2>/dev/null || { cat "$T/unsynced.out"; fail "the unsynced writer stopped early"; }; false; }'
kill9
status=0
timeout 120 tail --pid=$w -f /dev/null || fail "the writer hung after the daemon was killed"
wait $w || status=$?
[ "$status" -eq 3 ] || { cat "$T/unsynced.out"; fail "the writer should have stopped on a failed write (status $status)"; }
mount_imgfs "$T/repo" "$M" "state=$S"
"$STRESS" --verify-except "$M/vms/v.raw" "$T/synced" "$T/ranges" "$T/shadow" > "$T/verify.out" 2>&1 ||
    { cat "$T/verify.out"; fail "kill -9 during unsynced writes through damaged bytes those writes never touched"; }
ok "kill -9 during $(wc -l < "$T/ranges") unsynced writes through: the VM opens, reads, untouched bytes intact"
echo "    $(head -n 1 "$T/verify.out")"
umount_imgfs "$M"
finish
