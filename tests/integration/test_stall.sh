#!/bin/bash
# Never hang, whatever the mirror does. The only mirror accepts every request
# and answers none while 64 uncached reads from 4 VM disks wait on it, and 32
# writes that must copy a block up from uncached base chunks (more than the
# 16 FUSE worker threads: a write that waited in a worker would starve the
# rest).
#  1. With a read deadline far beyond the test (timeout=3600), ls, cat
#     .imgfs/stats, imgfsctl vm create and a cached read of another base each
#     answer while all 96 still wait. Nothing here depends on how fast the
#     machine is: a lock or a FUSE worker held by a waiting read would hold
#     the check for an hour, so the check's 60 s bound only ends a run that
#     fails. Once the mirror answers, the waiting reads return the right
#     bytes and the writes land.
#  2. On a fresh mount with timeout=3 the same reads and writes of a mirror
#     that never answers fail with EIO: the daemon's deadline fired (counted
#     in [fetch] errors, and no read ended before its deadline), within a
#     120 s bound that only catches a real hang. Once the mirror answers
#     again the same reads return the right bytes, without a remount.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
CS=131072
mkdir -p "$T/www"
head -c $((64 * CS)) /dev/urandom > "$T/a.raw"
head -c $((8 * CS)) /dev/urandom > "$T/b.raw"
"$IMGFSCTL" publish "$T/a.raw" "$T/www/repo" --name a > /dev/null
"$IMGFSCTL" publish "$T/b.raw" "$T/www/repo" --name b > /dev/null
FLAG=$T/stall
stall_server_start web "$T/www" "$FLAG"

# 64 reads, each of a different chunk: VM v reads chunks 16(v-1) .. 16v-1.
start_reads() { # TAG
    for v in 1 2 3 4; do
        for k in $(seq 0 15); do
            local c=$(((v - 1) * 16 + k))
            ( rc=0; dd if="$M/vms/v$v.raw" of="$T/$1.$c" bs=4096 count=1 skip=$((c * CS / 4096 + 3)) \
                iflag=direct status=none 2> "$T/$1.$c.err" || rc=$?; echo $rc > "$T/$1.$c.rc" ) &
        done
    done
}
# 32 writes of 512 bytes inside block 7 of chunks 16(v-1) .. 16(v-1)+7 of VM v:
# each needs its base chunk to copy the rest of the block up.
WB=$((7 * 4096 + 512))
start_writes() { # TAG
    for v in 1 2 3 4; do
        for k in $(seq 0 7); do
            local c=$(((v - 1) * 16 + k))
            ( rc=0; head -c 512 /dev/urandom > "$T/$1.w$c.data"
              dd if="$T/$1.w$c.data" of="$M/vms/v$v.raw" bs=512 seek=$((c * CS + WB)) oflag=direct,seek_bytes \
                conv=notrunc status=none 2> "$T/$1.w$c.err" || rc=$?; echo $rc > "$T/$1.w$c.rc" ) &
        done
    done
}
ended() { ls "$T" | grep -c "^$1\.w*[0-9]*\.rc$" || true; } # TAG: how many of the 96 ended
wait_reads() { # TAG: waits for the 64 reads and 32 writes to end
    local tag=$1
    wait_for "not all of the 64 reads and 32 writes ($tag) ended" '[ "$(ended "$tag")" -eq 96 ]'
}
write_results() { # TAG: the 32 writes' exit codes, one per line, "chunk rc"
    for v in 1 2 3 4; do
        for k in $(seq 0 7); do
            local c=$(((v - 1) * 16 + k))
            echo "$c $(cat "$T/$1.w$c.rc")"
        done
    done
}
# check_reads TAG WHAT: the 64 reads returned the right bytes
check_reads() {
    for c in $(seq 0 63); do
        [ "$(cat "$T/$1.$c.rc")" -eq 0 ] || fail "read $c failed $2: $(cat "$T/$1.$c.err")"
        cmp "$T/$1.$c" <(dd if="$T/a.raw" bs=4096 count=1 skip=$((c * CS / 4096 + 3)) status=none) ||
            fail "read $c returned wrong bytes $2"
    done
}
# check_writes TAG WHAT: each of the 32 written blocks is the base's with
# the 512 written bytes
check_writes() {
    local c rc v
    while read -r c rc; do
        v=$((c / 16 + 1))
        [ "$rc" -eq 0 ] || fail "write $c failed $2: $(cat "$T/$1.w$c.err")"
        dd if="$T/a.raw" bs=4096 count=1 skip=$(((c * CS) / 4096 + 7)) status=none > "$T/want.$c"
        python3 - "$T/want.$c" "$T/$1.w$c.data" <<'PY'
import sys
block = bytearray(open(sys.argv[1], "rb").read())
block[512:1024] = open(sys.argv[2], "rb").read()
open(sys.argv[1], "wb").write(block)
PY
        cmp "$T/want.$c" <(dd if="$M/vms/v$v.raw" bs=4096 count=1 skip=$(((c * CS) / 4096 + 7)) iflag=direct status=none) ||
            fail "block 7 of chunk $c of v$v is not the base's with the 512 written bytes ($2)"
    done < <(write_results "$1")
}
# waiting: transfers in flight plus fetches queued in the engine
waiting() { echo $(($(stat_value "$M" fetch in_flight) + $(stat_value "$M" fetch queued))); }
setup_vms() {
    for v in 1 2 3 4; do
        "$IMGFSCTL" vm create "$M" "v$v" --base a > /dev/null || fail "cannot create v$v"
    done
    cat "$M/bases/b.raw" > /dev/null # base b is cached
}

# === 1. everything else answers while 96 operations wait ======================
mkdir -p "$T/state1"
mount_imgfs "${STALL_URL[web]}/repo" "$M" "state=$T/state1,timeout=3600,stall_timeout=3600,refresh=1" "$T/cache1"
setup_vms
ok "4 VM disks on base a; base b cached"

touch "$FLAG" # from here on the mirror answers nothing
start_reads stuck
start_writes stuck
wait_for "not all 64 reads reached the fetch engine" '[ "$(waiting)" -ge 64 ]'
ok "64 uncached reads wait on a mirror that never answers ($(stat_value "$M" fetch in_flight) transfers in flight, the rest queued)"

bounded 60 ls "$M/bases" > "$T/ls" || fail "ls bases did not answer while 64 reads waited"
grep -qx 'b.raw' "$T/ls" || fail "ls bases misses b.raw"
ok "ls bases answers"
bounded 60 cat "$M/.imgfs/stats" > "$T/stats" || fail "cat .imgfs/stats did not answer while 64 reads waited"
grep -q '^\[fetch\]' "$T/stats" || fail "stats has no [fetch] section"
ok "cat .imgfs/stats answers"
bounded 60 "$IMGFSCTL" vm create "$M" v5 --base b > /dev/null || fail "imgfsctl vm create did not answer while 64 reads waited"
ok "imgfsctl vm create answers"
bounded 60 dd if="$M/bases/b.raw" of="$T/b.out" bs=$CS skip=5 count=1 iflag=direct status=none ||
    fail "a cached read of base b did not answer while 64 reads waited"
cmp "$T/b.out" <(dd if="$T/b.raw" bs=$CS skip=5 count=1 status=none) || fail "cached read of b differs"
ok "a cached read of another base answers"
for c in $(seq 0 63); do
    [ ! -e "$T/stuck.$c.rc" ] || fail "test precondition: read $c ended before the checks ($(cat "$T/stuck.$c.err"))"
done
for c in $(seq 0 31); do
    c=$(((c / 8) * 16 + c % 8))
    [ ! -e "$T/stuck.w$c.rc" ] || fail "test precondition: write $c ended before the checks ($(cat "$T/stuck.w$c.err"))"
done
ok "meanwhile all 64 reads and 32 copy-up writes were still waiting"

rm -f "$FLAG" # the mirror answers
wait_reads stuck
check_reads stuck "once the mirror answered"
ok "once the mirror answers, the 64 waiting reads return the right bytes"
check_writes stuck "once the mirror answered"
ok "once the mirror answers, the 32 waiting copy-up writes land: each block is the base's with the written bytes"
umount_imgfs "$M"

# === 2. the deadline fires: EIO, and no hang ===================================
mkdir -p "$T/state2"
mount_imgfs "${STALL_URL[web]}/repo" "$M" "state=$T/state2,timeout=3,stall_timeout=60,refresh=1" "$T/cache2"
setup_vms
touch "$FLAG" # the mirror answers nothing again
t0=$(date +%s.%N)
start_reads failed
start_writes failed
wait_reads failed
for c in $(seq 0 63); do
    [ "$(cat "$T/failed.$c.rc")" -ne 0 ] || fail "read $c succeeded although the mirror never answered"
    grep -q 'Input/output error' "$T/failed.$c.err" || fail "read $c: not EIO: $(cat "$T/failed.$c.err")"
    [ ! -s "$T/failed.$c" ] || fail "the failed read $c returned bytes"
done
ok "the 64 stuck reads failed with EIO"
while read -r c rc; do
    [ "$rc" -ne 0 ] || fail "write $c succeeded although the mirror never answered"
    grep -q 'Input/output error' "$T/failed.w$c.err" || fail "write $c: not EIO: $(cat "$T/failed.w$c.err")"
done < <(write_results failed)
ok "the 32 stuck copy-up writes failed with EIO"
# It was the deadline that ended them: none ended before it (a machine that
# is slow only makes them end later), and the daemon counted the failures.
first=$(python3 -c 'import glob, os, sys; print("%.1f" % (min(os.path.getmtime(p) for p in glob.glob(sys.argv[1] + "/failed.*rc")) - float(sys.argv[2])))' "$T" "$t0")
awk -v f="$first" 'BEGIN { exit !(f >= 2.9) }' || fail "an operation ended $first s after the start, before its 3 s deadline"
errors=$(stat_value "$M" fetch errors)
[ "$errors" -ge 96 ] || fail "[fetch] errors is $errors after 96 operations failed at their deadline"
[ "$(waiting)" -eq 0 ] || fail "$(waiting) fetches still in the engine after every waiter's deadline"
ok "they ended at the 3 s deadline or later (the first after $first s), and [fetch] errors counts $errors"

rm -f "$FLAG" # the mirror answers again
start_reads again
start_writes again
wait_reads again
check_reads again "after the mirror recovered"
ok "once the mirror answers again, the same 64 reads return the right bytes, without a remount"
check_writes again "after the mirror recovered"
ok "once the mirror answers again, the 32 copy-up writes land"
umount_imgfs "$M"
finish
