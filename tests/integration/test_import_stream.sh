#!/bin/bash
# vm import: imgfsctl opens the export file itself, with its caller's
# permissions, and streams it to the daemon on its control handle
# (vm-import-stream); the daemon stages it in an unnamed file of its state
# directory and never opens a user's path:
#  - export then import under a new name gives a byte-identical disk, also
#    from a file that only imgfsctl's mount namespace can see;
#  - an old imgfsctl's path-based vm-import gets "unknown command"; a
#    stream answers "ok stream" before imgfsctl sends a byte;
#  - a FIFO, a device and a directory are refused by imgfsctl at once, and
#    a vm create meanwhile works;
#  - user nobody imports nothing: not a file it cannot read (directly or
#    through its own symlink), not one it can (the control file is root's);
#  - truncated and garbled exports, absurd sizes and a state directory
#    without room for the import are refused with nothing left behind;
#  - an imgfsctl stopped (SIGSTOP) mid-stream, its file's reads stalled,
#    holds up no other command (vm create, vm export, a second import);
#    SIGKILLed, it leaves no VM and no staged file.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
OUT=$T/out
STATE=$T/state
chmod 711 "$T" # so that user nobody reaches the mount and $OUT (and nothing else)
mkdir -p "$STATE" "$OUT"
chmod 755 "$OUT"
make_image "$T/img.raw" $((16 * 1048576))
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name deb > /dev/null
mount_imgfs "$T/repo" "$M" "state=$STATE,allow_other"
LOG=${DAEMON_LOG[$M]}
DPID=$(stat_value "$M" daemon pid) # the serving process (DAEMON_PID is its supervisor)
[ -d "/proc/$DPID/fd" ] || fail "no serving process $DPID"

# staged: the daemon's unnamed staging files (O_TMPFILE in the state directory, which /proc
# names DIR/#INODE; or the fallback's unlinked .stage-*), one "FD SIZE" a line.
staged() {
    local fd target
    for fd in /proc/$DPID/fd/*; do
        target=$(readlink "$fd" 2>/dev/null) || continue
        case $target in "$STATE/#"*" (deleted)" | "$STATE/.stage-"*" (deleted)") echo "${fd##*/} $(stat -L -c %s "$fd" 2>/dev/null || echo gone)" ;; esac
    done
}
# what_is_there: the VMs shown, VM files and layer files; nothing else may be in the state directory.
what_is_there() {
    echo "$(ls "$M/vms" | tr '\n' ' ')| $(ls "$STATE/vms" | wc -l) vm files | $(ls "$STATE/layers" | wc -l) layers |" \
        "$(ls -A "$STATE" | grep -vE '^(imgfs-state|imgfs.lock|vms|layers)$' | tr '\n' ' ')"
}
# no_trace BEFORE WHAT: nothing changed since BEFORE and nothing is staged.
no_trace() {
    [ "$(what_is_there)" = "$1" ] || fail "$2 left something behind: $(what_is_there) (was $1)"
    [ -z "$(staged)" ] || fail "$2 left a staged file in the daemon: $(staged)"
}
# control_raw LINE: writes LINE to a control handle as an imgfsctl would and prints
# "write OK|ERRNO-NAME" and the handle's answer.
control_raw() {
    python3 - "$M/.imgfs/control" "$1" <<'PY'
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    os.write(fd, sys.argv[2].encode())
    print("write OK")
except OSError as e:
    print("write " + errno.errorcode[e.errno])
print(os.pread(fd, 1024, 0).decode().strip())
PY
}

# --- round trip -------------------------------------------------------------------------------
"$IMGFSCTL" vm create "$M" v --base deb
for i in 0 1 2 3 4 5; do put $((i * 2 * 1048576 + 777)) 300000 $i "$M/vms/v.raw"; done
dd if=/dev/zero of="$M/vms/v.raw" bs=4096 count=64 seek=1000 conv=notrunc status=none
"$IMGFSCTL" vm export "$M" v "$OUT/v.exp"
"$IMGFSCTL" vm import "$M" "$OUT/v.exp" --name w
grep -q "vm-import-stream w: staging $(stat -c %s "$OUT/v.exp") bytes" "$LOG" || fail "the import did not stream the file"
drop_caches
same "$M/vms/w.raw" "$M/vms/v.raw" "export then import under a new name differs"
[ "$(stat -c '%U %a' "$M/vms/w.raw")" = "root 600" ] || fail "the imported disk is $(stat -c '%U %a' "$M/vms/w.raw")"
"$IMGFSCTL" vm create "$M" blank --size 8M
put 4096 100000 9 "$M/vms/blank.raw"
"$IMGFSCTL" vm export "$M" blank "$OUT/blank.exp"
"$IMGFSCTL" vm import "$M" "$OUT/blank.exp" --name blank2
same "$M/vms/blank2.raw" "$M/vms/blank.raw" "a blank VM exported and imported differs"
[ -z "$(staged)" ] || fail "an import left a staged file in the daemon: $(staged)"
ok "export, then import under a new name: byte-identical ($(stat -c %s "$OUT/v.exp") bytes streamed), mode 600, nothing staged after"

# A file that only imgfsctl sees: a tmpfs in a mount namespace of its own.
mkdir -p "$T/private"
unshare -m sh -c "mount -t tmpfs tmpfs '$T/private' && cp '$OUT/v.exp' '$T/private/v.exp' &&
    '$IMGFSCTL' vm import '$M' '$T/private/v.exp' --name private" || fail "an import from a private mount failed"
[ -z "$(ls -A "$T/private")" ] || fail "the test's private tmpfs is visible outside its namespace: it proves nothing"
same "$M/vms/private.raw" "$M/vms/v.raw" "the import from a file the daemon cannot see differs"
ok "an import from a file on a mount the daemon cannot see works: the daemon never opens the user's path"

before=$(what_is_there)
answer=$(control_raw "vm-import	$OUT/v.exp	old
")
echo "$answer" | grep -q "^error unknown or malformed command 'vm-import'" || fail "the old vm-import got: $answer"
no_trace "$before" "the old vm-import command"
ok "an old imgfsctl's vm-import PATH gets: $(echo "$answer" | tail -n 1)"

# --- what imgfsctl refuses to read ----------------------------------------------------------------
mkfifo "$OUT/fifo"
timeout 60 "$IMGFSCTL" vm import "$M" "$OUT/fifo" --name fromfifo 2> "$T/fifo.err" &
fifo_pid=$!
timeout 60 "$IMGFSCTL" vm create "$M" during --size 1M || fail "vm create beside a FIFO import failed"
status=0; wait $fifo_pid || status=$?
[ $status -ne 124 ] || fail "vm import of a FIFO hung"
[ $status -ne 0 ] || fail "vm import of a FIFO succeeded"
[ "$(wc -l < "$T/fifo.err")" = 1 ] && grep -q 'is a FIFO, not a regular file' "$T/fifo.err" ||
    { cat "$T/fifo.err"; fail "the FIFO import does not say why in one line"; }
grep -q 'vm-import-stream fromfifo' "$LOG" && fail "a FIFO reached the daemon"
ok "a FIFO is refused by imgfsctl before the daemon hears of it: $(cat "$T/fifo.err")"
before=$(what_is_there)
expect_error "vm import of a character device" "$IMGFSCTL" vm import "$M" /dev/zero --name z
grep -q 'is a character device, not a regular file' "$(ls -t "$T"/stderr.* | head -n 1)" || fail "/dev/zero: not said why"
expect_error "vm import of a directory" "$IMGFSCTL" vm import "$M" "$OUT" --name d
expect_error "vm import of a file that does not exist" "$IMGFSCTL" vm import "$M" "$OUT/nosuch.exp"
expect_error "vm import under an invalid name" "$IMGFSCTL" vm import "$M" "$OUT/v.exp" --name ../x
expect_error "vm import under a name that exists" "$IMGFSCTL" vm import "$M" "$OUT/v.exp" --name w
no_trace "$before" "the refused imports"

# --- user nobody ------------------------------------------------------------------------------------
as_nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; }
cp "$OUT/v.exp" "$OUT/public.exp" && chmod 644 "$OUT/public.exp"
[ "$(stat -c %a "$OUT/v.exp")" = 600 ] || fail "the export is not 600"
mkdir -m 777 "$T/nobody"
as_nobody ln -s "$OUT/v.exp" "$T/nobody/link.exp"
for f in "$OUT/v.exp" "$T/nobody/link.exp"; do
    as_nobody "$IMGFSCTL" vm import "$M" "$f" --name stolen 2> "$T/nobody.err" && fail "user nobody imported $f"
    grep -q "cannot open $f: Permission denied" "$T/nobody.err" || { cat "$T/nobody.err"; fail "nobody: not EACCES on $f"; }
done
as_nobody "$IMGFSCTL" vm import "$M" "$OUT/public.exp" --name stolen 2> "$T/nobody.err" && fail "user nobody imported a file"
grep -q 'not writable by you (Permission denied)' "$T/nobody.err" || { cat "$T/nobody.err"; fail "nobody reached the control file"; }
no_trace "$before" "user nobody's imports"
ok "user nobody imports neither a file it cannot read (directly or through its symlink) nor one it can (the control file is root's)"

# --- damaged exports, absurd sizes ---------------------------------------------------------------------
esize=$(stat -c %s "$OUT/v.exp")
for cut in 20 $((esize / 2)) $((esize - 1)); do
    head -c $cut "$OUT/v.exp" > "$OUT/cut.exp"
    expect_error "an export truncated to $cut of $esize bytes" "$IMGFSCTL" vm import "$M" "$OUT/cut.exp" --name bad
    no_trace "$before" "an export truncated to $cut bytes"
done
cp "$OUT/v.exp" "$OUT/flip.exp"
# The byte at esize/3 is replaced by its complement, so it always changes
# (writing a fixed value leaves the export intact where the byte already
# has it).
python3 - "$OUT/flip.exp" $((esize / 3)) <<'PY'
import sys
path, at = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(at)
    b = f.read(1)[0]
    f.seek(at)
    f.write(bytes([b ^ 0xFF]))
PY
cmp -s "$OUT/v.exp" "$OUT/flip.exp" && fail "test precondition: the garbled export equals the good one"
[ "$(cmp -l "$OUT/v.exp" "$OUT/flip.exp" | wc -l)" -eq 1 ] || fail "test precondition: the garble changed more than one byte"
expect_error "an export with a garbled byte" "$IMGFSCTL" vm import "$M" "$OUT/flip.exp" --name bad
grep -q 'not a complete imgfs export' "$(ls -t "$T"/stderr.* | head -n 1)" || fail "the garbled export: not said why"
no_trace "$before" "a garbled export"
answer=$(control_raw "vm-import-stream	-	99999999999999999
")
echo "$answer" | grep -q '^error a file of 99999999999999999 bytes cannot be an imgfs export' || fail "an absurd SIZE: $answer"
no_trace "$before" "an absurd SIZE"
answer=$(control_raw "vm-import-stream	opened	100
")
[ "$answer" = "$(printf 'write OK\nok stream')" ] || fail "an import stream does not answer 'ok stream' before its bytes: $answer"
no_trace "$before" "an import stream closed before its bytes"
ok "truncated and garbled exports and an absurd size are refused; nothing is left, nothing stays staged"

# A state directory with no room for the import: refused before a byte is sent.
SMALL=$T/small
small_tmpfs "$SMALL" 12M
mkdir -p "$SMALL/state"
M3=$T/mnt3
mount_imgfs "$T/repo" "$M3" "state=$SMALL/state" "$T/cache3"
head -c $((7 * 1048576)) /dev/urandom > "$T/7m"
"$IMGFSCTL" vm create "$M" seven --size 8M
dd if="$T/7m" of="$M/vms/seven.raw" bs=1M conv=notrunc status=none
"$IMGFSCTL" vm export "$M" seven "$OUT/seven.exp"
expect_error "an import with no room for it in the state directory" "$IMGFSCTL" vm import "$M3" "$OUT/seven.exp"
grep -q 'importing this .* export needs twice that' "$(ls -t "$T"/stderr.* | head -n 1)" || fail "no room: not said why"
grep -q 'vm-import-stream' "${DAEMON_LOG[$M3]}" && fail "the import with no room was staged"
[ -z "$(ls -A "$SMALL/state/vms")" ] || fail "the import with no room left a VM"
timeout 60 "$IMGFSCTL" vm create "$M3" after --size 1M || fail "the mount takes no command after a refused import"
ok "an import with no room in the state directory is refused before anything is sent"
umount_imgfs "$M3"
before=$(what_is_there)

# --- an imgfsctl stopped mid-stream, then killed -----------------------------------------------------------
# Its file is a base on a second mount whose repository stalls: imgfsctl
# streams what that mount has cached, then waits for the rest, and is
# stopped (SIGSTOP) as that read returns.
mkdir -p "$T/www" "$T/state2"
head -c $((32 * 1048576)) /dev/urandom > "$T/s.raw"
"$IMGFSCTL" publish "$T/s.raw" "$T/www/repo" --name s > /dev/null
FLAG=$T/stall
stall_server_start web "$T/www" "$FLAG"
M2=$T/mnt2
mount_imgfs "${STALL_URL[web]}/repo" "$M2" "state=$T/state2,timeout=60,stall_timeout=120" "$T/cache2"
head -c 1048576 "$M2/bases/s.raw" > /dev/null # cached: streamed before the stall
touch "$FLAG"
"$IMGFSCTL" vm import "$M" "$M2/bases/s.raw" --name stalled 2> "$T/stalled.err" &
stalled=$!
at_exit "kill -9 $stalled 2>/dev/null"
# The stream has begun, and the rest of the file waits on the mirror.
wait_for "the stalled import never reached the daemon" '[ -n "$(staged)" ] && [ "$(staged | awk "{print \$2}")" != 0 ] &&
    [ $(($(stat_value "$M2" fetch in_flight) + $(stat_value "$M2" fetch queued))) -ge 1 ]'
kill -STOP $stalled
rm "$FLAG"
wait_for "imgfsctl did not stop" '[ "$(awk "{print \$3}" /proc/$stalled/stat)" = T ]'
got=$(staged | awk '{print $2}')
[ "$got" -gt 0 ] && [ "$got" -lt $((32 * 1048576)) ] || fail "the stopped stream had staged $got bytes: not mid-stream"
timeout 60 "$IMGFSCTL" vm create "$M" beside --size 1M || fail "vm create hung or failed beside a stopped import"
timeout 60 "$IMGFSCTL" vm export "$M" v "$OUT/beside.exp" || fail "vm export hung or failed beside a stopped import"
timeout 60 "$IMGFSCTL" vm import "$M" "$OUT/v.exp" --name beside2 || fail "a second import hung or failed beside a stopped one"
same "$M/vms/beside2.raw" "$M/vms/v.raw" "the import beside a stopped one differs"
ok "imgfsctl stopped mid-stream ($got of $((32 * 1048576)) bytes staged): vm create, vm export and another import answer"
kill -9 $stalled
wait $stalled 2>/dev/null || true
wait_for "the killed import's staged file stayed" '[ -z "$(staged)" ]'
[ ! -e "$M/vms/stalled.raw" ] && [ ! -e "$STATE/vms/stalled.vm" ] || fail "the killed import made a VM"
"$IMGFSCTL" vm rm "$M" beside
"$IMGFSCTL" vm rm "$M" beside2
no_trace "$before" "the killed import"
timeout 60 "$IMGFSCTL" vm create "$M" after --size 1M || fail "the mount takes no command after the killed import"
ok "SIGKILLed mid-stream, the import leaves no VM and no staged file, and the daemon goes on"
umount_imgfs "$M2"

umount_imgfs "$M"
finish
