#!/bin/bash
# One owner: a second imgfs naming a state or cache directory in use is
# refused with the owner's pid and mount point; a mount on top of a live
# imgfs mount is refused; SIGTERM is refused while a VM disk is open and
# unmounts once none is; SIGHUP never unmounts; the dead mount that a
# crash leaves is recognised and replaced by the next mount.
. "$(dirname "$0")/lib.sh"

make_image "$T/img.raw" $((4 * 1048576))
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name b > /dev/null
M=$T/mnt
mount_imgfs "$T/repo" "$M"
pid=${DAEMON_PID[$M]}
log=${DAEMON_LOG[$M]}
mkdir -p "$T/other" "$T/cache2" "$T/state2"

# second NAME EXPECTED-SENTENCE-PART OPTIONS: a second daemon is refused.
second() {
    local what=$1 expect=$2 opts=$3
    expect_error "$what" "$IMGFS" "$T/repo" "$T/other" -f -o "$opts"
    grep -qF -- "$expect" "$T"/stderr.* || { cat "$T"/stderr.*; fail "$what: the message does not say '$expect'"; }
    rm -f "$T"/stderr.*
    mountpoint -q "$T/other" && fail "$what: it mounted anyway"
    return 0
}
second "same state directory" "state directory $T/state is in use by imgfs pid $pid mounted on $M" \
    "state=$T/state,cache=$T/cache2"
second "same cache directory" "cache directory $T/cache is in use by imgfs pid $pid mounted on $M" \
    "state=$T/state2,cache=$T/cache"
expect_error "a mount on top of a live imgfs mount" "$IMGFS" "$T/repo" "$M" -f -o "state=$T/state2,cache=$T/cache2"
cmp "$M/bases/b.raw" "$T/img.raw" || fail "the first mount does not serve after the refusals"
ok "the first mount still serves"

# SIGHUP: a log line, no unmount.
kill -HUP "$pid"
wait_for "no log line for SIGHUP" 'grep -q "SIGHUP ignored" "$log"'
mountpoint -q "$M" && cmp "$M/bases/b.raw" "$T/img.raw" || fail "SIGHUP unmounted"
ok "SIGHUP is logged and ignored"

# SIGTERM while a VM disk is open: refused, the disk keeps working.
"$IMGFSCTL" vm create "$M" v --base b > /dev/null
exec 3<> "$M/vms/v.raw"
kill -TERM "$pid"
wait_for "no refusal logged for SIGTERM" 'grep -q "refused: 1 VM disk(s) open (v)" "$log"'
echo hello | dd of=/dev/fd/3 bs=4096 conv=sync,notrunc status=none || fail "the open disk broke after SIGTERM"
dd if="$M/vms/v.raw" bs=5 count=1 status=none | grep -q hello || fail "the write through the open disk is not there"
ok "SIGTERM with a VM disk open is refused and the disk keeps working"
exec 3>&-
# The kernel sends the release after close(2) returns: wait for it.
wait_stat "$M" "vm v" open 0

# ... and with no disk open it unmounts, and the daemon exits 0.
kill -TERM "$pid"
wait_for "SIGTERM with no disk open did not end the daemon" '! kill -0 "$pid" 2>/dev/null'
wait "$pid" || fail "imgfs exited with status $? after SIGTERM"
unset "DAEMON_PID[$M]"
mountpoint -q "$M" && fail "still mounted after SIGTERM"
check_daemon_log "$log"
ok "SIGTERM with no disk open unmounts"

# A crash leaves a dead mount: the next mount recognises and replaces it.
mount_imgfs "$T/repo" "$M"
pid=${DAEMON_PID[$M]}
server=$(stat_value "$M" daemon pid)
# Killing the supervisor takes its server with it (PR_SET_PDEATHSIG).
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
wait_for "the server outlived its supervisor's kill -9" '! kill -0 "$server" 2>/dev/null'
unset "DAEMON_PID[$M]"
stat "$M" > /dev/null 2> "$T/stat.err" && fail "the mount still answers after kill -9"
grep -q "Transport endpoint is not connected" "$T/stat.err" || { cat "$T/stat.err"; fail "no dead mount after kill -9"; }
mount_imgfs "$T/repo" "$M"
wait_for "the dead mount was not reported" 'grep -q "held a dead FUSE mount" "${DAEMON_LOG[$M]}"'
cmp "$M/vms/v.raw" <(dd if="$M/vms/v.raw" bs=1M status=none) || fail "cannot read the VM disk after the new mount"
dd if="$M/vms/v.raw" bs=5 count=1 status=none | grep -q hello || fail "the VM disk lost its data"
[ "$(grep -c " $M " /proc/self/mountinfo)" = 1 ] || fail "the dead mount is still stacked under the new one"
ok "a dead mount is detached and replaced by the next mount"
umount_imgfs "$M"
finish
