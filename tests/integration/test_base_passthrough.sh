#!/bin/bash
# -o base_passthrough: a base version wholly held in the cache (imgfsctl
# precopy) gets a checked flat file, and opens of its base file are handed
# to the kernel (FUSE passthrough), which reads the flat file itself:
#  - cold sequential and random reads return exactly the image's bytes, and
#    the daemon serves no READ of them;
#  - a file held open with passthrough keeps reading right across imgfsctl
#    restart and kill -9 of the server; more opens of it during that pass
#    through too, and its release is handled by the new server;
#  - a takeover trusts the flat file that the last server of the mount
#    checked (flat_trusted, not read again); one touched between two
#    servers is read in full again, and one damaged after its check is not
#    trusted by the next server (rejected, rebuilt);
#  - unpin removes the flat file (and opens are served by the daemon again);
#  - a fresh mount checks the flat file in full;
#  - a flat file damaged while the daemon was down is rejected by the check
#    at start and never handed to the kernel (reads stay right);
#  - a kill -9 in the middle of a build leaves no flat file that is used;
#  - where passthrough is not offered (forced off with IMGFS_NO_PASSTHROUGH)
#    one line says so and base files are served as without the option.
. "$(dirname "$0")/lib.sh"

M=$T/mnt
IMG=$T/img.raw
make_image "$IMG" $((8 * 1048576 + 12345))
"$IMGFSCTL" publish "$IMG" "$T/repo" --name b > /dev/null
FILE=$M/bases/b@1.raw
FLAT=$T/cache/flat/b@1.raw

reads() { stat_value "$M" "base b@1" reads; }

# random_reads FILE: 64 random 4 KiB reads of FILE, each compared with IMG.
random_reads() {
    python3 - "$1" "$IMG" <<'PY'
import os, random, sys
f, ref = os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[2], os.O_RDONLY)
size = os.fstat(ref).st_size
rng = random.Random(7)
for _ in range(64):
    off = rng.randrange(0, size // 4096) * 4096
    if os.pread(f, 4096, off) != os.pread(ref, 4096, off):
        sys.exit("mismatch at %d" % off)
PY
}

mount_imgfs "$T/repo" "$M" base_passthrough
[ "$(stat_value "$M" passthrough kernel_offers)" = yes ] ||
    fail "the kernel offers no FUSE passthrough (Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH is needed here)"
wait_stat "$M" passthrough state active 30
[ "$(stat_value "$M" "base b@1" flat_file)" = none ] || fail "a flat file before the version is held"
before=$(reads)
same "$FILE" "$IMG" "the base differs before pre-copy"
[ "$(reads)" -gt "$before" ] || fail "the daemon served no READ of a base without a flat file"
ok "without a held version, base reads are served by the daemon"

exec 4< "$FILE" # a normal open, held while the flat file is made
"$IMGFSCTL" precopy "$M" b > /dev/null
wait_stat "$M" "base b@1" flat_file ready 60
[ -f "$FLAT" ] || fail "no flat file $FLAT"
same "$FLAT" "$IMG" "the flat file is not the image"
ok "pre-copy made a flat file equal to the image"
# The kernel refuses a passthrough open of an inode open without it: while
# the normal open is held, opens stay normal (and work).
drop_caches
before=$(reads)
same "$FILE" "$IMG" "an open beside a normal one differs"
[ "$(reads)" -gt "$before" ] || fail "an open beside a normal one was passed through"
exec 4<&-
wait_stat "$M" "base b@1" normal_open 0 10
ok "while the base is open without passthrough, more opens are normal too"

drop_caches
before=$(reads)
opens=$(stat_value "$M" passthrough opens)
same "$FILE" "$IMG" "a cold sequential read through passthrough differs from the image"
same "$M/bases/b.raw" "$IMG" "a read through the symlink differs from the image"
drop_caches
random_reads "$FILE" || fail "cold random 4 KiB reads through passthrough differ from the image"
[ "$(reads)" = "$before" ] || fail "the daemon served $(($(reads) - before)) READs of a passthrough base"
[ "$(stat_value "$M" passthrough opens)" -ge $((opens + 3)) ] || fail "the opens were not passthrough opens"
ok "cold sequential and random reads through passthrough are the image's bytes, with no READ in the daemon"


# A reader holds the base open with passthrough: reads half, waits for
# $T/go, reads the rest, compares everything.
for step in restart kill; do
    rm -f "$T/half" "$T/go"
    python3 - "$FILE" "$IMG" "$T/half" "$T/go" <<'PY' &
import os, sys, time
f, ref = os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[2], os.O_RDONLY)
size = os.fstat(ref).st_size
def check(lo, hi):
    off = lo
    while off < hi:
        n = min(1 << 20, hi - off)
        if os.pread(f, n, off) != os.pread(ref, n, off):
            sys.exit("mismatch at %d" % off)
        off += n
check(0, size // 2)
open(sys.argv[3], "w").close()
while not os.path.exists(sys.argv[4]):
    time.sleep(0.05)
check(size // 2, size)
PY
    reader=$!
    at_exit "kill $reader 2>/dev/null"
    for _ in $(seq 200); do [ -e "$T/half" ] && break; sleep 0.05; done
    [ -e "$T/half" ] || fail "the reader did not get half way"
    [ "$(stat_value "$M" passthrough open_files)" = 1 ] || fail "the reader's open is not a passthrough open"
    old=$(stat_value "$M" daemon pid)
    if [ $step = kill ]; then kill -9 "$old"; else "$IMGFSCTL" restart "$M" > /dev/null; fi
    new_server "$M" "$old" > /dev/null
    [ "$(stat_value "$M" passthrough open_files)" = 1 ] || fail "$step: the new server does not count the open file"
    [ "$(stat_value "$M" passthrough negotiated)" = yes ] || fail "$step: the new server does not know passthrough"
    # Another open of the same inode must pass through too (the kernel
    # refuses mixed modes), with the same backing file.
    same "$FILE" "$IMG" "$step: an open during the held one differs"
    [ "$(reads)" = 0 ] || fail "$step: the new server served READs of the passthrough base"
    drop_caches
    touch "$T/go"
    wait "$reader" || fail "$step: the file held open across the $step read wrong"
    wait_stat "$M" passthrough open_files 0 10
    ok "$step: a base held open with passthrough reads right across it; its release reached the new server"
done
# Opens after the last release register the flat file afresh.
wait_stat "$M" "base b@1" flat_file ready
same "$FILE" "$IMG" "an open after the takeovers differs"
[ "$(reads)" = 0 ] || fail "an open after the takeovers was not passthrough"

# The server that took over last found the flat file as the one before had
# checked it: taken without reading it.
[ "$(stat_value "$M" passthrough flat_trusted)" = 1 ] || fail "a takeover did not trust the unchanged flat file"
[ "$(stat_value "$M" passthrough flat_checked)" = 0 ] || fail "a takeover read the unchanged flat file again"
grep -q "flat file b@1: unchanged since this mount's last check of it, not read again" "${DAEMON_LOG[$M]}" ||
    fail "the trusted flat file is not in the log"
ok "a takeover trusts the flat file the last server checked: flat_trusted 1, flat_checked 0"

# Touched between two servers: the next one reads it in full.
touch "$FLAT"
old=$(stat_value "$M" daemon pid)
"$IMGFSCTL" restart "$M" > /dev/null
new_server "$M" "$old" > /dev/null
wait_stat "$M" "base b@1" flat_file ready
[ "$(stat_value "$M" passthrough flat_checked)" = 1 ] || fail "a flat file touched between servers was not checked again"
[ "$(stat_value "$M" passthrough flat_trusted)" = 0 ] || fail "a flat file touched between servers was trusted"
ok "a flat file touched between two servers is read in full again"

# Damaged after its check while a server runs (not caught by that server,
# see flat.h), then a kill -9: the next server does not trust it.
python3 - "$FLAT" <<'PY2'
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
at = os.fstat(fd).st_size // 2
b = os.pread(fd, 1, at)
os.pwrite(fd, bytes([b[0] ^ 0x08]), at)
PY2
old=$(stat_value "$M" daemon pid)
kill -9 "$old"
new_server "$M" "$old" > /dev/null
wait_stat "$M" passthrough flat_rejected 1
[ "$(stat_value "$M" passthrough flat_trusted)" = 0 ] || fail "a flat file damaged after its check was trusted"
wait_stat "$M" "base b@1" flat_file ready # rebuilt from the cache
same "$FLAT" "$IMG" "the flat file rebuilt after the takeover is not the image"
drop_caches
same "$FILE" "$IMG" "a read after the damaged flat file was found differs"
ok "a flat file damaged after its check is not trusted by the next server: rejected and rebuilt"

"$IMGFSCTL" unpin "$M" b > /dev/null
wait_stat "$M" passthrough flat_files 0 30
[ ! -e "$FLAT" ] || fail "unpin left the flat file"
before=$(reads)
same "$FILE" "$IMG" "after unpin the base differs"
[ "$(reads)" -gt "$before" ] || fail "after unpin the base is still read by passthrough"
ok "unpin removes the flat file; the daemon serves the base again"

"$IMGFSCTL" precopy "$M" b > /dev/null
wait_stat "$M" "base b@1" flat_file ready 60
log=${DAEMON_LOG[$M]}
umount_imgfs "$M"
check_daemon_log "$log"

# A fresh mount has no record of earlier checks: the file is read in full.
mount_imgfs "$T/repo" "$M" base_passthrough
wait_stat "$M" "base b@1" flat_file ready
[ "$(stat_value "$M" passthrough flat_checked)" = 1 ] || fail "a fresh mount did not check the flat file in full"
[ "$(stat_value "$M" passthrough flat_trusted)" = 0 ] || fail "a fresh mount trusted the flat file"
ok "a fresh mount checks the flat file in full"
log=${DAEMON_LOG[$M]}
umount_imgfs "$M"
check_daemon_log "$log"

# Damaged while no daemon ran: a byte near the end (the check reaches it last).
python3 - "$FLAT" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
at = os.fstat(fd).st_size - 100
b = os.pread(fd, 1, at)
os.pwrite(fd, bytes([b[0] ^ 0x20]), at)
PY
# The check is slowed down so that reads come while it runs: they must not
# get the file before it is checked.
export IMGFS_TEST_FLAT_DELAY_MS=100
mount_imgfs "$T/repo" "$M" base_passthrough
unset IMGFS_TEST_FLAT_DELAY_MS
wait_stat "$M" "base b@1" flat_file checking 60
drop_caches
before=$(reads)
same "$FILE" "$IMG" "a read while the damaged flat file was being checked differs"
random_reads "$FILE" || fail "random reads while the damaged flat file was being checked differ"
[ "$(reads)" -gt "$before" ] || fail "a base was passed through before its flat file was checked"
wait_stat "$M" passthrough flat_rejected 1 60
drop_caches
same "$FILE" "$IMG" "a read after the damaged flat file was found differs"
grep -q "flat file b@1: fails its check" "${DAEMON_LOG[$M]}" || fail "the rejection is not in the log"
wait_stat "$M" "base b@1" flat_file ready 60 # rebuilt from the cache
same "$FLAT" "$IMG" "the rebuilt flat file is not the image"
ok "a flat file damaged while the daemon was down is rejected at start, never served, and rebuilt"
umount_imgfs "$M"

# A kill -9 of the server in the middle of a build: no flat file is used.
rm -f "$FLAT"
export IMGFS_TEST_FLAT_DELAY_MS=100
mount_imgfs "$T/repo" "$M" base_passthrough
wait_stat "$M" "base b@1" flat_file building 60
sleep 0.5
[ -e "$T/cache/flat/b@1.tmp" ] || fail "no .tmp file while building"
old=$(stat_value "$M" daemon pid)
kill -9 "$old"
new_server "$M" "$old" > /dev/null
[ ! -e "$FLAT" ] || fail "a flat file after a kill -9 in the middle of its build"
before=$(reads)
same "$FILE" "$IMG" "a read after the killed build differs"
[ "$(reads)" -gt "$before" ] || fail "a base was passed through with no finished flat file"
unset IMGFS_TEST_FLAT_DELAY_MS
ok "a kill -9 in the middle of a build leaves no flat file that is used"
umount_imgfs "$M"

# Passthrough not offered: one line, and base files are served as before.
export IMGFS_NO_PASSTHROUGH=1
mount_imgfs "$T/repo" "$M" base_passthrough
unset IMGFS_NO_PASSTHROUGH
wait_stat "$M" passthrough state unavailable 30
[ "$(stat_value "$M" passthrough negotiated)" = no ] || fail "negotiated although forced off"
before=$(reads)
same "$FILE" "$IMG" "a read without passthrough differs"
[ "$(reads)" -gt "$before" ] || fail "no READ reached the daemon without passthrough"
[ "$(stat_value "$M" passthrough opens)" = 0 ] || fail "a passthrough open without passthrough"
[ "$(grep -c 'base_passthrough: IMGFS_NO_PASSTHROUGH is set' "${DAEMON_LOG[$M]}")" = 1 ] ||
    fail "not one log line saying why passthrough is off"
ok "without passthrough offered, one log line, and the daemon serves the base"
log=${DAEMON_LOG[$M]}
umount_imgfs "$M"
check_daemon_log "$log"
finish
