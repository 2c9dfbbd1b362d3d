#!/bin/bash
# The files that vm export and trace stop --output write are written by
# imgfsctl, never by the daemon, so a destination that takes nothing (a FIFO
# nobody reads) holds up only that imgfsctl:
#  - while an export is stuck on a FIFO whose reader never reads, vm create,
#    another export, ls, cat .imgfs/stats and writes to the VM answer;
#  - the stuck export fails with one line at its --timeout, or at once when
#    interrupted; a FIFO without a reader fails at the deadline; nothing is
#    left behind (no temp file, nothing in the state directory);
#  - once a reader comes, the FIFO gets an export byte-identical to a
#    regular file's, which imports back to the same disk;
#  - trace stop --output to a FIFO without a reader fails before the trace
#    is stopped, so a second trace stop still gets the list;
#  - vm import reads its file in imgfsctl, which streams it to the daemon:
#    while it reads a file whose reads hang (a base on a mount whose mirror
#    answers nothing), the same commands answer (test_import_stream has
#    the rest);
#  - an export with no room to stage it in the state directory fails with
#    one line that says so, and frees what it took;
#  - /dev/null stays a device, a directory is refused, and a regular file
#    is replaced atomically with mode 0600.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
OUT=$T/out
mkdir -p "$T/state" "$OUT"
make_image "$T/img.raw" $((16 * 1048576))
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name deb > /dev/null
mount_imgfs "$T/repo" "$M" "state=$T/state"
LOG=${DAEMON_LOG[$M]}

"$IMGFSCTL" vm create "$M" v --base deb
for i in 0 1 2 3; do put $((i * 3 * 1048576 + 4096)) 1048576 $i "$M/vms/v.raw"; done # 4 MiB of its own
"$IMGFSCTL" vm export "$M" v "$OUT/ref.exp"
[ "$(stat -c %a "$OUT/ref.exp")" = 600 ] || fail "an export is mode $(stat -c %a "$OUT/ref.exp"), not 600"
ok "an export to a regular file: $(stat -c %s "$OUT/ref.exp") bytes, mode 600"

# leftovers: temp files next to the outputs, or staged exports in the state directory.
leftovers() { { ls -A "$OUT" | grep -E '\.tmp\.'; ls -A "$T/state" | grep -vE '^(imgfs-state|imgfs.lock|vms|layers)$'; } || true; }
# answers_meanwhile WHAT: control commands, lookups, status files and VM writes do not wait.
N=0
answers_meanwhile() {
    N=$((N + 1))
    timeout 60 "$IMGFSCTL" vm create "$M" during$N --size 16M || fail "vm create hung or failed while $1"
    timeout 60 "$IMGFSCTL" vm export "$M" during$N "$OUT/during$N.exp" || fail "another export hung or failed while $1"
    timeout 60 ls "$M/vms" | grep -q "^during$N.raw$" || fail "ls of vms/ hung or misses during$N while $1"
    timeout 60 cat "$M/.imgfs/stats" | grep -q '^\[vm v\]' || fail "cat .imgfs/stats hung while $1"
    timeout 60 dd if=/dev/zero of="$M/vms/v.raw" bs=4096 count=1 seek=4000 conv=notrunc status=none ||
        fail "a write to the VM hung while $1"
    ok "vm create, vm export, ls, cat .imgfs/stats and a VM write answer while $1"
}
# was_interrupted PID ERRFILE WHAT: PID, sent SIGINT or SIGTERM, failed with one line saying so.
was_interrupted() {
    local status=0
    wait "$1" || status=$?
    [ $status -ne 0 ] || fail "$3 succeeded"
    [ "$(wc -l < "$2")" = 1 ] && grep -q 'interrupted' "$2" || { cat "$2"; fail "$3 does not say so in one line"; }
}
# last_error: the stderr file of the newest expect_error.
last_error() { ls -t "$T"/stderr.* | head -n 1; }
# wait_log TEXT: the daemon's log says TEXT (the step under test has begun).
wait_log() {
    local text=$1
    wait_for "the daemon's log never said '$text'" 'grep -q "$text" "$LOG"'
}

# --- an export stuck on a FIFO whose reader never reads ------------------------------------------
# The export stays the same from here on; the VM writes below go to block 4000.
dd if=/dev/zero of="$M/vms/v.raw" bs=4096 count=1 seek=4000 conv=notrunc status=none
"$IMGFSCTL" vm export "$M" v "$OUT/ref.exp"
mkfifo "$OUT/pipe"
sleep 600 < "$OUT/pipe" &  # opens the FIFO for reading, never reads
sleeper=$!
at_exit "kill $sleeper 2>/dev/null"
"$IMGFSCTL" vm export "$M" v "$OUT/pipe" --timeout 600 2> "$T/stuck.err" &
stuck=$!
wait_log 'vm-export v staged'  # the daemon's part is done; imgfsctl waits on the FIFO
answers_meanwhile "an export is stuck on a FIFO nobody reads"
kill -INT $stuck
was_interrupted $stuck "$T/stuck.err" "an interrupted export"
ok "the stuck export, interrupted, fails at once: $(cat "$T/stuck.err")"
kill $sleeper; wait $sleeper 2>/dev/null || true

sleep 600 < "$OUT/pipe" &
sleeper=$!
at_exit "kill $sleeper 2>/dev/null"
expect_error "an export to a FIFO nobody reads, --timeout 1" "$IMGFSCTL" vm export "$M" v "$OUT/pipe" --timeout 1
grep -q 'took no data for 1 s' "$(last_error)" || fail "the stuck export's error does not name its deadline"
kill $sleeper; wait $sleeper 2>/dev/null || true
expect_error "an export to a FIFO without a reader, --timeout 1" "$IMGFSCTL" vm export "$M" v "$OUT/pipe" --timeout 1
grep -q 'no reader opened the FIFO' "$(last_error)" || fail "the export does not say that the FIFO had no reader"
[ -p "$OUT/pipe" ] || fail "the FIFO was replaced"
[ -z "$(leftovers)" ] || fail "failed exports left files behind: $(leftovers)"
ok "failed exports leave no temp file and nothing in the state directory"

# --- a FIFO whose reader comes later gets the whole export ---------------------------------------
"$IMGFSCTL" vm export "$M" v "$OUT/pipe" 2> "$T/late.err" &
late=$!
answers_meanwhile "an export waits for a FIFO's reader"
timeout 60 cat "$OUT/pipe" > "$OUT/fifo.exp" || fail "reading the export from the FIFO failed"
wait $late || { cat "$T/late.err"; fail "the export to a FIFO failed once read"; }
same "$OUT/fifo.exp" "$OUT/ref.exp" "the export through a FIFO differs from the one to a regular file"
"$IMGFSCTL" vm import "$M" "$OUT/fifo.exp" --name back
same "$M/vms/back.raw" "$M/vms/v.raw" "the export through a FIFO does not import back to the same disk"
ok "once a reader comes, the FIFO gets the same bytes as a regular file, and they import back to the same disk"

# --- trace stop --output to a FIFO without a reader -----------------------------------------------
"$IMGFSCTL" trace start "$M" v
head -c 3M "$M/vms/v.raw" > /dev/null
"$IMGFSCTL" trace stop "$M" v --output "$OUT/pipe" 2> "$T/trace.err" &
tracer=$!
answers_meanwhile "a trace stop waits for a FIFO's reader"
kill -TERM $tracer
was_interrupted $tracer "$T/trace.err" "an interrupted trace stop"
# imgfsctl opens the output before it asks the daemon: the trace goes on.
grep -q 'trace-stop' "$LOG" && fail "trace stop reached the daemon with no reader on its output"
ok "trace stop to a FIFO without a reader, interrupted: $(cat "$T/trace.err")"
"$IMGFSCTL" trace stop "$M" v --output "$OUT/pipe" &
tracer=$!
timeout 60 cat "$OUT/pipe" > "$OUT/boot.list"
wait $tracer || fail "trace stop to a FIFO with a reader failed"
head -n 1 "$OUT/boot.list" | grep -q '^imgfs-list 1' || fail "the trace through a FIFO is not a list"
"$IMGFSCTL" list publish "$T/repo" deb boot "$OUT/boot.list" > /dev/null || fail "the trace through a FIFO does not publish"
ok "the trace survived the interrupted stop: the next one wrote a list through the FIFO ($(wc -l < "$OUT/boot.list") lines)"

# --- vm import of a regular file whose reads hang ----------------------------------------------------
# A base on a second mount whose repository answers nothing: reading it waits
# up to that mount's timeout (60 s), in imgfsctl, which streams the file.
mkdir -p "$T/www" "$T/state2"
head -c $((4 * 131072)) /dev/urandom > "$T/a.raw"
"$IMGFSCTL" publish "$T/a.raw" "$T/www/repo" --name a > /dev/null
FLAG=$T/stall
stall_server_start web "$T/www" "$FLAG"
M2=$T/mnt2
mount_imgfs "${STALL_URL[web]}/repo" "$M2" "state=$T/state2,timeout=60,stall_timeout=120" "$T/cache2"
touch "$FLAG"
"$IMGFSCTL" vm import "$M" "$M2/bases/a.raw" --name hung 2> "$T/hung.err" &
hung=$!
wait_for "the import never read its file" '[ $(($(stat_value "$M2" fetch in_flight) + $(stat_value "$M2" fetch queued))) -ge 1 ]'
answers_meanwhile "an import reads a file whose reads hang"
rm "$FLAG"
status=0; wait $hung || status=$?
[ $status -ne 0 ] || fail "a disk image was imported as an export"
grep -q 'not a complete imgfs export' "$T/hung.err" || { cat "$T/hung.err"; fail "the import's error does not say why"; }
[ ! -e "$M/vms/hung.raw" ] || fail "a VM was made from a file that is no export"
ok "the import, its file readable again, is refused: $(cat "$T/hung.err")"
umount_imgfs "$M2"

# --- no room in the state directory to stage an export ----------------------------------------------
SMALL=$T/small
small_tmpfs "$SMALL" 12M
mkdir -p "$SMALL/state"
M3=$T/mnt3
mount_imgfs "$T/repo" "$M3" "state=$SMALL/state" "$T/cache3"
"$IMGFSCTL" vm create "$M3" big --size 64M
head -c $((7 * 1048576)) /dev/urandom | dd of="$M3/vms/big.raw" bs=1M conv=notrunc,fsync iflag=fullblock status=none ||
    fail "cannot write 7 MiB into a VM on a 12 MiB state directory"
expect_error "an export with no room to stage it" "$IMGFSCTL" vm export "$M3" big "$OUT/big.exp"
grep -q 'has no room to stage it' "$(last_error)" || fail "the export does not say that the state directory is full"
[ "$(df --output=used -B1 "$SMALL" | tail -n 1)" -lt $((9 * 1048576)) ] || fail "the failed staging kept its space"
[ -z "$(leftovers)" ] || fail "files left behind: $(leftovers)"
timeout 60 "$IMGFSCTL" vm create "$M3" after --size 1M || fail "the mount does not take commands after a failed staging"
ok "a failed staging frees its space and leaves nothing; the mount goes on"
umount_imgfs "$M3"

# --- what the destination may be ------------------------------------------------------------------
"$IMGFSCTL" vm export "$M" v /dev/null || fail "an export to /dev/null failed"
[ -c /dev/null ] || fail "/dev/null is no longer a device"
expect_error "an export to a directory" "$IMGFSCTL" vm export "$M" v "$OUT"
expect_error "an export into a directory that does not exist" "$IMGFSCTL" vm export "$M" v "$OUT/no/such/v.exp"
expect_error "an export of a VM that does not exist" "$IMGFSCTL" vm export "$M" nosuch "$OUT/nosuch.exp"
expect_error "a bad --timeout" "$IMGFSCTL" vm export "$M" v "$OUT/x.exp" --timeout soon
echo old > "$OUT/old.exp"
ln -s "$T/victim" "$OUT/link.exp"
echo precious > "$T/victim"
"$IMGFSCTL" vm export "$M" v "$OUT/old.exp"
"$IMGFSCTL" vm export "$M" v "$OUT/link.exp"
same "$OUT/old.exp" "$OUT/ref.exp" "an export over an old file differs"
[ ! -L "$OUT/link.exp" ] && [ "$(cat "$T/victim")" = precious ] || fail "an export wrote through a symlink at its path"
[ -z "$(leftovers)" ] || fail "files left behind: $(leftovers)"
ok "/dev/null stays a device; an old file and a symlink at the path are replaced, not written through"

umount_imgfs "$M"
finish
