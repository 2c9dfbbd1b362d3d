#!/bin/bash
# Never hang, whatever the mirror does. The only mirror accepts every request
# and answers none while 64 uncached reads from 4 VM disks wait on it, and 32
# writes that must copy a block up from uncached base chunks (more than the
# 16 FUSE worker threads: a write that waited in a worker would starve the
# rest). Then
# ls, cat .imgfs/stats, imgfsctl vm create and a cached read of another base
# each answer (the bound is 1 s; the checks allow 3 s, well below the reads'
# 10 s deadline, so a lock or a FUSE worker held by a waiting read shows up
# as a timeout, not as a slow figure). The stuck reads fail with EIO at their
# deadline, and once the mirror answers again the same reads return the
# right bytes, without a remount.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
CS=131072
mkdir -p "$T/www" "$T/state"
head -c $((64 * CS)) /dev/urandom > "$T/a.raw"
head -c $((8 * CS)) /dev/urandom > "$T/b.raw"
"$IMGFSCTL" publish "$T/a.raw" "$T/www/repo" --name a > /dev/null
"$IMGFSCTL" publish "$T/b.raw" "$T/www/repo" --name b > /dev/null
FLAG=$T/stall
stall_server_start web "$T/www" "$FLAG"
mount_imgfs "${STALL_URL[web]}/repo" "$M" "state=$T/state,timeout=10,stall_timeout=60,refresh=1"
for v in 1 2 3 4; do
    "$IMGFSCTL" vm create "$M" "v$v" --base a > /dev/null || fail "cannot create v$v"
done
cat "$M/bases/b.raw" > /dev/null # base b is cached
ok "4 VM disks on base a; base b cached"

touch "$FLAG" # from here on the mirror answers nothing
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
start_reads stuck
start_writes stuck
for _ in $(seq 1 100); do # every read has reached the fetch engine
    waiting=$(($(stat_value "$M" fetch in_flight) + $(stat_value "$M" fetch queued)))
    [ "$waiting" -ge 64 ] && break
    sleep 0.1
done
[ "$waiting" -ge 64 ] || fail "only $waiting of 64 reads reached the fetch engine"
ok "64 uncached reads wait on a mirror that never answers ($(stat_value "$M" fetch in_flight) transfers in flight, the rest queued)"

timeout 3 ls "$M/bases" > "$T/ls" || fail "ls bases did not answer while 64 reads waited"
grep -qx 'b.raw' "$T/ls" || fail "ls bases misses b.raw"
ok "ls bases answers"
timeout 3 cat "$M/.imgfs/stats" > "$T/stats" || fail "cat .imgfs/stats did not answer while 64 reads waited"
grep -q '^\[fetch\]' "$T/stats" || fail "stats has no [fetch] section"
ok "cat .imgfs/stats answers"
timeout 3 "$IMGFSCTL" vm create "$M" v5 --base b > /dev/null || fail "imgfsctl vm create did not answer while 64 reads waited"
ok "imgfsctl vm create answers"
timeout 3 dd if="$M/bases/b.raw" of="$T/b.out" bs=$CS skip=5 count=1 iflag=direct status=none ||
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

wait_reads() { # TAG: waits up to 30 s for the 64 reads and 32 writes to end
    for _ in $(seq 1 300); do
        [ "$(ls "$T" | grep -c "^$1\.w*[0-9]*\.rc$")" -eq 96 ] && return 0
        sleep 0.1
    done
    fail "$(ls "$T" | grep -c "^$1\.w*[0-9]*\.rc$") of 64 reads and 32 writes ended within 30 s"
}
write_results() { # TAG: the 32 writes' exit codes, one per line, "chunk rc"
    for v in 1 2 3 4; do
        for k in $(seq 0 7); do
            local c=$(((v - 1) * 16 + k))
            echo "$c $(cat "$T/$1.w$c.rc")"
        done
    done
}
wait_reads stuck
for c in $(seq 0 63); do
    [ "$(cat "$T/stuck.$c.rc")" -ne 0 ] || fail "read $c succeeded although the mirror never answered"
    grep -q 'Input/output error' "$T/stuck.$c.err" || fail "read $c: not EIO: $(cat "$T/stuck.$c.err")"
done
ok "the 64 stuck reads failed with EIO at their deadline"
while read -r c rc; do
    [ "$rc" -ne 0 ] || fail "write $c succeeded although the mirror never answered"
    grep -q 'Input/output error' "$T/stuck.w$c.err" || fail "write $c: not EIO: $(cat "$T/stuck.w$c.err")"
done < <(write_results stuck)
ok "the 32 stuck copy-up writes failed with EIO at their deadline"

rm -f "$FLAG" # the mirror answers again
start_reads again
start_writes again
wait_reads again
for c in $(seq 0 63); do
    v=$((c / 16 + 1))
    [ "$(cat "$T/again.$c.rc")" -eq 0 ] || fail "read $c failed after the mirror recovered: $(cat "$T/again.$c.err")"
    cmp "$T/again.$c" <(dd if="$T/a.raw" bs=4096 count=1 skip=$((c * CS / 4096 + 3)) status=none) ||
        fail "read $c returned wrong bytes after the mirror recovered"
done
ok "once the mirror answers, the same 64 reads return the right bytes"
while read -r c rc; do
    v=$((c / 16 + 1))
    [ "$rc" -eq 0 ] || fail "write $c failed after the mirror recovered: $(cat "$T/again.w$c.err")"
    dd if="$T/a.raw" bs=4096 count=1 skip=$(((c * CS) / 4096 + 7)) status=none > "$T/want.$c"
    python3 - "$T/want.$c" "$T/again.w$c.data" <<'PY'
import sys
block = bytearray(open(sys.argv[1], "rb").read())
block[512:1024] = open(sys.argv[2], "rb").read()
open(sys.argv[1], "wb").write(block)
PY
    cmp "$T/want.$c" <(dd if="$M/vms/v$v.raw" bs=4096 count=1 skip=$(((c * CS) / 4096 + 7)) iflag=direct status=none) ||
        fail "block 7 of chunk $c of v$v is not the base's with the 512 written bytes"
done < <(write_results again)
ok "once the mirror answers, the 32 copy-up writes land: each block is the base's with the written bytes"
umount_imgfs "$M"
finish
