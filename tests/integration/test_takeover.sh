#!/bin/bash
# The mount outlives its serving process. A client writes random 4 KiB
# blocks with O_DIRECT to a VM disk, fsyncs each and reads it back, while the
# serving process is killed with SIGKILL four times and replaced with
# imgfsctl restart twice: the client sees no error and no mismatch, inode
# numbers and the open file handle stay valid, `vm rm` still refuses the open
# disk; a write answered but not flushed before a kill is not lost; and after
# a clean remount the disk equals the client's shadow copy.
. "$(dirname "$0")/lib.sh"

CHECK=$TOOLS/blockcheck
[ -x "$CHECK" ] || fail "missing $CHECK (build the blockcheck target)"
M=$T/mnt
make_image "$T/img.raw" $((8 * 1048576))
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name b > /dev/null
mount_imgfs "$T/repo" "$M"
"$IMGFSCTL" vm create "$M" v --base b > /dev/null
cat "$M/vms/v.raw" > "$T/shadow"
ino_disk=$(stat -c %i "$M/vms/v.raw")
ino_base=$(stat -c %i "$M/bases/b@1.raw")
[ "$(stat_value "$M" daemon takeovers)" = 0 ] || fail "takeovers is not 0 at the start"

"$CHECK" "$M/vms/v.raw" "$T/shadow" 7 "$T/stop" > "$T/check.out" 2> "$T/check.err" &
client=$!
at_exit "touch '$T/stop'; kill $client 2>/dev/null"

# progress_after N: waits until the client has done N more blocks.
ops() { awk '/^OPS/ { n = $2 } END { print n + 0 }' "$T/check.out"; }
progress_after() {
    local want=$(($(ops) + $1))
    for _ in $(seq 600); do
        [ "$(ops)" -ge "$want" ] && return 0
        kill -0 "$client" 2>/dev/null || { cat "$T/check.err"; fail "the client stopped"; }
        sleep 0.1
    done
    fail "the client did no $1 blocks in 60 s (at $(ops))"
}

takeovers=0
for step in kill kill restart kill restart kill; do
    progress_after 40
    old=$(stat_value "$M" daemon pid)
    if [ "$step" = kill ]; then
        kill -9 "$old"
    else
        "$IMGFSCTL" restart "$M" > "$T/restart.out" || fail "imgfsctl restart failed"
    fi
    new=$(new_server "$M" "$old")
    takeovers=$((takeovers + 1))
    ok "$step: pid $old replaced by $new at block $(ops)"
done
progress_after 40
[ "$(stat_value "$M" daemon takeovers)" = "$takeovers" ] || fail "[daemon] takeovers is not $takeovers"
[ "$(stat -c %i "$M/vms/v.raw")" = "$ino_disk" ] || fail "the VM disk's inode number changed"
[ "$(stat -c %i "$M/bases/b@1.raw")" = "$ino_base" ] || fail "the base's inode number changed"
ok "inode numbers unchanged after $takeovers takeovers"
expect_error "vm rm of the disk the client holds open, after the takeovers" "$IMGFSCTL" vm rm "$M" v

touch "$T/stop"
wait "$client" || { cat "$T/check.err"; tail -n 1 "$T/check.out"; fail "the client saw errors or mismatches"; }
summary=$(tail -n 1 "$T/check.out")
[[ $summary == *" errors 0 mismatches 0 "* ]] || fail "client summary: $summary"
ok "client: $summary"

# A write answered but not yet flushed when the server dies is not lost:
# the next server has it (layer_share_pending), and a flush then keeps it.
head -c 65536 /dev/urandom > "$T/piece"
dd if="$T/piece" of="$T/shadow" bs=65536 seek=5 conv=notrunc status=none
dd if="$T/piece" of="$M/vms/v.raw" bs=65536 seek=5 oflag=direct conv=notrunc status=none ||
    fail "the unflushed write failed"
old=$(stat_value "$M" daemon pid)
kill -9 "$old"
new_server "$M" "$old" > /dev/null
cmp "$T/piece" <(dd if="$M/vms/v.raw" bs=65536 skip=5 count=1 iflag=direct status=none) ||
    fail "a write answered before the kill but not flushed is lost after the takeover"
ok "a write answered but not flushed before a kill -9 is there after the takeover"

log=${DAEMON_LOG[$M]}
umount_imgfs "$M"
grep -q "took over [0-9]* unflushed writes" "$log" || fail "the log does not say that unflushed writes were taken over"
grep -q "took over 1 open files (1 VM disks)" "$log" || fail "no takeover of the open disk in the log"
mount_imgfs "$T/repo" "$M"
same "$M/vms/v.raw" "$T/shadow" "the disk differs from the client's shadow copy after a clean remount"
ok "after a clean remount the disk equals the shadow copy"
umount_imgfs "$M"
finish
