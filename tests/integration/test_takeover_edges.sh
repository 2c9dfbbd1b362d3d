#!/bin/bash
# Takeover at the edges: while a read waits on a slow HTTP repository (kill -9
# and imgfsctl restart: the read completes with the right bytes); while a
# pre-copy runs (imgfsctl precopy fails with a sentence that says why); with
# prefetch replay of an open disk under way (it resumes in the new process);
# and with an upgrade to a binary that crashes at start-up (the supervisor
# backs off, gives up with one log line and ends the mount).
# The read and the pre-copy are held waiting by the test (their chunks come
# through a server that answers nothing while a flag file exists), not by a
# slow rate, so the takeover lands while they wait however slow the machine.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

CHUNK=131072
head -c $((64 * CHUNK)) /dev/urandom > "$T/img.raw"
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name d > /dev/null
# Three held chunks (index 7, 9 and 63): nginx takes them from a server that
# answers nothing while $HOLD exists, and then sends them at 16 KiB/s (about
# 8 s each), so a transfer is also under way, not only a request.
chunk_hash() { awk -v i="$1" '/^chunks / { n = NR } n && NR == n + 1 + i { print; exit }' "$T/repo/bases/d/1.manifest"; }
slow1=$(chunk_hash 7) slow2=$(chunk_hash 9) held=$(chunk_hash 63)
[[ $slow1 =~ ^[0-9a-f]{32}$ && $slow2 =~ ^[0-9a-f]{32}$ && $held =~ ^[0-9a-f]{32}$ ]] ||
    fail "cannot read chunk hashes from the manifest"
HOLD=$T/hold
stall_server_start hold "$T/repo" "$HOLD"
through_hold() { # HASH: an nginx location that takes the chunk from the holding server
    echo "location = /chunks/${1:0:2}/$1 { limit_rate 16k; proxy_pass ${STALL_URL[hold]}; proxy_read_timeout 3600s; }"
}
nginx_start web "$T/repo" "$(through_hold "$slow1") $(through_hold "$slow2") $(through_hold "$held")"
M=$T/mnt
# Deadlines beyond the test: the held fetches wait for as long as the test
# holds them (a run that fails is ended by ctest's timeout).
mount_imgfs "${NGINX_URL[web]}" "$M" "timeout=3600,stall_timeout=3600"

# slow_read INDEX HOW: reads chunk INDEX (uncached, slow) and replaces the
# serving process with HOW (kill or restart) while the read waits.
slow_read() {
    local index=$1 how=$2 out="$T/read.$1"
    local before
    before=$(stat_value "$M" fetch requests)
    touch "$HOLD"
    dd if="$M/bases/d@1.raw" of="$out" bs=4096 count=1 skip=$((index * CHUNK / 4096)) iflag=direct status=none &
    local reader=$!
    wait_for "the read of chunk $index did not start fetching" '[ "$(stat_value "$M" fetch requests)" -gt "$before" ]'
    local old
    old=$(stat_value "$M" daemon pid)
    if [ "$how" = kill ]; then
        kill -9 "$old"
    else
        "$IMGFSCTL" restart "$M" > /dev/null &
        local restarter=$!
    fi
    kill -0 "$reader" 2>/dev/null || fail "the held read ended before the $how (and before the chunk could come)"
    rm -f "$HOLD" # the chunk comes, slowly
    wait "$reader" || fail "the read waiting on the slow repository failed across a $how"
    cmp "$out" <(dd if="$T/img.raw" bs=4096 count=1 skip=$((index * CHUNK / 4096)) status=none) ||
        fail "the read across a $how returned wrong bytes"
    [ "$how" = kill ] || wait "$restarter" || fail "imgfsctl restart failed"
    [ "$(stat_value "$M" daemon pid)" != "$old" ] || fail "pid $old still serves after the $how"
    ok "a read waiting on a slow HTTP repository completes across a $how"
}
slow_read 7 kill
slow_read 9 restart

# A pre-copy cannot continue in a new process: imgfsctl says so. It is held
# on chunk 63, the last, and has every other when the daemon is killed.
touch "$HOLD"
"$IMGFSCTL" precopy "$M" d > "$T/precopy.out" 2> "$T/precopy.err" &
copier=$!
wait_for "the pre-copy did not cache every chunk but the held one" \
    '[ "$(stat_value "$M" "base d@1" chunks_resident)" = 63/64 ] || ! kill -0 "$copier" 2>/dev/null'
kill -0 "$copier" 2>/dev/null ||
    fail "the pre-copy ended although chunk 63 was held: $(cat "$T/precopy.out" "$T/precopy.err")"
kill -9 "$(stat_value "$M" daemon pid)"
status=0
wait "$copier" || status=$?
rm -f "$HOLD"
[ "$status" -ne 0 ] || fail "imgfsctl precopy succeeded although its daemon was killed"
grep -qE "replaced|does not survive" "$T/precopy.err" || { cat "$T/precopy.err"; fail "no clear error from imgfsctl precopy"; }
ok "a pre-copy cut by a takeover fails at imgfsctl: $(head -n 1 "$T/precopy.err")"

# A control file opened before a takeover is refused (EBADF), never taken
# for another's: the command it would carry is not run by the new process.
exec 4<> "$M/.imgfs/control"
old=$(stat_value "$M" daemon pid)
kill -9 "$old"
new_server "$M" "$old" > /dev/null
if printf 'vm-create\tstale\t-\t1048576\n' >&4 2> "$T/stale.err"; then
    fail "a control handle of the dead process was accepted"
fi
exec 4>&-
grep -q "Bad file descriptor" "$T/stale.err" || { cat "$T/stale.err"; fail "the stale control handle did not fail with EBADF"; }
[ ! -e "$M/vms/stale.raw" ] || fail "the command written to a stale control handle was run"
ok "a control handle from before a takeover fails with EBADF and runs nothing"

# A new server that finds the repository's index malformed serves the index
# kept from the last contact, as it does when the repository is unreachable.
cp "$T/repo/index" "$T/index.good"
printf 'garbage\n' > "$T/repo/index"
old=$(stat_value "$M" daemon pid)
kill -9 "$old"
new_server "$M" "$old" > /dev/null
[ -e "$M/bases/d.raw" ] || fail "bases/d.raw is gone after a takeover with a malformed index"
dd if="$M/bases/d.raw" of="$T/first" bs=$CHUNK count=1 status=none || fail "cannot read bases/d.raw"
cmp "$T/first" <(head -c $CHUNK "$T/img.raw") || fail "wrong bytes after a takeover with a malformed index"
grep -q "malformed; using the index kept from the last contact" "${DAEMON_LOG[$M]}" ||
    fail "the new server did not say that it uses the kept index"
cp "$T/index.good" "$T/repo/index"
ok "a takeover while the repository's index is malformed serves the kept index"
umount_imgfs "$M"

# Prefetch replay of an open VM disk resumes in the new process. A list of
# every chunk in disk order, replayed at most 1M (8 chunks) ahead of a
# guest that reads nothing, on an empty cache.
mount_imgfs "$T/repo" "$M"
"$IMGFSCTL" vm create "$M" v --base d > /dev/null
"$IMGFSCTL" trace start "$M" v
dd if="$M/vms/v.raw" of=/dev/null bs=128k status=none
"$IMGFSCTL" trace stop "$M" v --output "$T/seq.list"
"$IMGFSCTL" list publish "$T/repo" d@1 seq "$T/seq.list" > /dev/null || fail "list publish seq"
umount_imgfs "$M"
rm -rf "$T/cache"
mount_imgfs "$T/repo" "$M" "prefetch=seq,prefetch_ahead=1M"
exec 3< "$M/vms/v.raw"
wait_stat "$M" "base d@1" prefetch_list 8/64
old=$(stat_value "$M" daemon pid)
kill -9 "$old"
new_server "$M" "$old" > /dev/null
# The new process replays for the disk opened before it started ...
wait_stat "$M" "base d@1" prefetch_started yes
wait_stat "$M" "base d@1" prefetch_list 8/64
# ... and follows the guest: a read of list chunk 20 lets it go on to 28.
dd if="$M/vms/v.raw" of=/dev/null bs=128k skip=20 count=1 iflag=direct status=none
wait_stat "$M" "base d@1" prefetch_list 29/64
ok "prefetch replay of a disk opened before a kill -9 resumes in the new process"
exec 3<&-
umount_imgfs "$M"

# An upgrade to a binary that crashes at start-up: back off, then give up.
mkdir -p "$T/bin"
cp "$IMGFS" "$T/bin/imgfs"
IMGFS=$T/bin/imgfs mount_imgfs "$T/repo" "$M" "" "$T/cache2"
sup=${DAEMON_PID[$M]}
# First a working upgrade: a new file at the same path is what serves next.
cp "$IMGFS" "$T/bin/imgfs.new"
mv "$T/bin/imgfs.new" "$T/bin/imgfs"
old=$(stat_value "$M" daemon pid)
"$IMGFSCTL" restart "$M" > /dev/null || fail "imgfsctl restart onto an upgraded binary failed"
new=$(stat_value "$M" daemon pid)
[ "$new" != "$old" ] || fail "pid $old still serves after imgfsctl restart"
[ "$(stat -L -c %i "/proc/$new/exe")" = "$(stat -c %i "$T/bin/imgfs")" ] ||
    fail "the new serving process does not run the binary now on disk"
ok "imgfsctl restart runs the binary now on disk (pid $new)"
printf '#!/bin/sh\nkill -SEGV $$\n' > "$T/bin/imgfs.new"
chmod +x "$T/bin/imgfs.new"
mv "$T/bin/imgfs.new" "$T/bin/imgfs"
expect_error "imgfsctl restart onto a binary that crashes at start-up" "$IMGFSCTL" restart "$M"
wait_for "the supervisor did not give up on a crashing binary" '! kill -0 "$sup" 2>/dev/null'
status=0
wait "$sup" || status=$?
unset "DAEMON_PID[$M]"
[ "$status" -ne 0 ] || fail "the supervisor exited 0 after giving up"
log=${DAEMON_LOG[$M]}
grep -q "died 6 times in a row before finishing a request.*giving up" "$log" || { cat "$log"; fail "no give-up line"; }
[ "$(grep -c "starting a new one in" "$log")" -ge 4 ] || fail "no back-off before giving up"
mountpoint -q "$M" && fail "the mount is still there after giving up"
ok "a crash-looping binary: back-off, then $(grep -o "died 6 times.*" "$log" | head -c 80)..."
finish
