#!/bin/bash
# The pack-file cache (cache.h) across crashes and upgrades:
#  - kill -9 of the daemon in the middle of cache fills, twice: the remount
#    serves only the right bytes (compared with the source image), and only
#    what was missing is fetched again;
#  - a garbled chunk inside a pack is dropped and fetched again, never served;
#  - a cache in the old layout (one file per chunk, imgfs-cache 1) is
#    imported at mount: its chunks are served without a fetch, a damaged one
#    is fetched again, and meta/ is left alone.
. "$(dirname "$0")/lib.sh"

CS=131072
N=384
head -c $((N * CS)) /dev/urandom > "$T/img.raw"
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name b --level 1 > /dev/null
chunk_hash() { dd if="$T/img.raw" bs=$CS skip="$1" count=1 status=none | xxh128sum | cut -d' ' -f1; }

# --- kill -9 during fills -----------------------------------------------------------
# Four readers, each over its quarter chunk by chunk, keep fills in flight
# while the serving process is killed twice; the supervisor's next server
# takes the mount over (takeover.h) and opens the cache the dead one was
# filling. Every byte the readers got must be the image's. Each reader
# waits half-way through its quarter until both kills are done, so that
# the kills always land before the fills are over, however fast the readers
# run against the test's polling.
mount_imgfs "$T/repo" "$T/mnt"
M=$T/mnt
Q=$((N / 4))
KILLED=$T/killed
at_exit "touch '$KILLED'" # a failing run lets its readers go on, and end
readers=()
for q in 0 1 2 3; do
    (
        for i in $(seq $((q * Q)) $((q * Q + Q - 1))); do
            if [ "$i" -eq $((q * Q + Q / 2)) ]; then
                for _ in $(seq 1 3000); do [ -e "$KILLED" ] || [ ! -d "$T" ] && break; sleep 0.1; done
            fi
            dd if="$M/bases/b.raw" bs=$CS skip="$i" count=1 status=none || exit 1
            sleep 0.01
        done > "$T/quarter.$q"
    ) &
    readers+=($!)
done
killed=0
for want in 24 96; do
    for _ in $(seq 1 1000); do
        [ "$(cache_index "$T/cache" | wc -l)" -ge $want ] && break
        sleep 0.01
    done
    old=$(stat_value "$M" daemon pid)
    have=$(cache_index "$T/cache" | wc -l)
    [ "$have" -lt "$N" ] || fail "kill -9 came after the fills ($have of $N chunks cached)"
    kill -9 "$old"
    wait_for "no server took over after the kill -9" \
        'pid=$(stat_value "$M" daemon pid 2>/dev/null || true); [ -n "$pid" ] && [ "$pid" != "$old" ]'
    killed=$((killed + 1))
    ok "server killed (-9) with $have of $N chunks in the cache; pid $pid took over"
done
touch "$KILLED"
for q in 0 1 2 3; do
    wait "${readers[q]}" || fail "reader $q failed across the kills"
    cmp "$T/quarter.$q" <(dd if="$T/img.raw" bs=$CS skip=$((q * Q)) count=$Q status=none) ||
        fail "reader $q got wrong bytes across kill -9 during fills"
done
[ "$(stat_value "$M" cache damaged_dropped)" -eq 0 ] || fail "a chunk of a killed fill was indexed"
umount_imgfs "$M"
ok "readers across two kills got the right bytes"
# A chunk is answered from memory before its cache write (fetch.h: reply
# first, write behind), so a kill may cost the cache a chunk a reader got;
# the remount must fetch exactly the chunks the index does not hold.
indexed=$(cache_index "$T/cache" | wc -l)
mount_imgfs "$T/repo" "$M"
cmp "$M/bases/b.raw" "$T/img.raw" || fail "after kill -9 during fills, the remount served wrong bytes"
[ "$(stat_value "$M" cache damaged_dropped)" -eq 0 ] || fail "the remount found a damaged chunk"
fetched=$(stat_value "$M" fetch requests)
[ "$fetched" -eq $((N - indexed)) ] ||
    fail "the remount fetched $fetched chunks, but $((N - indexed)) of $N were missing from the cache's index"
umount_imgfs "$M"
ok "the remount serves every byte right and fetches only the $((N - indexed)) chunks missing from the index"

# --- a garbled chunk inside a pack --------------------------------------------------
h=$(chunk_hash 7)
read -r pack off len <<< "$(cache_locate "$T/cache" "$h")" || fail "chunk 7 is not in the cache"
[ "$len" -eq $CS ] || fail "chunk 7 is $len bytes in its pack"
printf '\x55\xaa' | dd of="$pack" bs=1 seek=$((off + 4000)) conv=notrunc status=none
mount_imgfs "$T/repo" "$T/mnt"
dd if="$T/mnt/bases/b.raw" bs=$CS skip=7 count=1 status=none | cmp - <(dd if="$T/img.raw" bs=$CS skip=7 count=1 status=none) ||
    fail "a garbled chunk in a pack was served"
[ "$(stat_value "$T/mnt" cache damaged_dropped)" -eq 1 ] || fail "the garbled chunk was not counted as damaged"
[ "$(stat_value "$T/mnt" fetch requests)" -eq 1 ] || fail "the garbled chunk was not fetched again (once)"
cmp "$T/mnt/bases/b.raw" "$T/img.raw" || fail "the base reads wrong after the refetch"
umount_imgfs "$T/mnt"
cmp <(cache_chunk "$T/cache" "$h") <(dd if="$T/img.raw" bs=$CS skip=7 count=1 status=none) ||
    fail "the cache does not hold the refetched chunk"
ok "a garbled chunk inside a pack is detected, fetched again and never served"

# --- the old layout -----------------------------------------------------------------
# What imgfs-cache 1 left: chunks/XY/HASH files holding decoded chunks, a
# leftover temp file, and meta/ with the trust state.
OLD=$T/oldcache
mkdir -p "$OLD/meta"
echo "imgfs-cache 1" > "$OLD/imgfs-cache"
echo "trust state" > "$OLD/meta/keep"
for i in $(seq 0 $((N - 1))); do
    h=$(chunk_hash "$i")
    mkdir -p "$OLD/chunks/${h:0:2}"
    dd if="$T/img.raw" of="$OLD/chunks/${h:0:2}/$h" bs=$CS skip="$i" count=1 status=none
done
bad=$(chunk_hash 11)
printf '\x01' | dd of="$OLD/chunks/${bad:0:2}/$bad" bs=1 seek=99 conv=notrunc status=none
echo junk > "$OLD/chunks/${bad:0:2}/$bad.tmp.4242"
mount_imgfs "$T/repo" "$T/mnt" "" "$OLD"
[ ! -e "$OLD/chunks" ] || fail "the old chunk files are still there after the import"
[ "$(cat "$OLD/imgfs-cache")" = "imgfs-cache 2" ] || fail "the cache marker was not upgraded"
[ "$(cat "$OLD/meta/keep")" = "trust state" ] || fail "the import touched meta/"
[ "$(stat_value "$T/mnt" cache chunks)" -eq "$N" ] || fail "not every old chunk file was imported"
cmp "$T/mnt/bases/b.raw" "$T/img.raw" || fail "an imported cache served wrong bytes"
[ "$(stat_value "$T/mnt" fetch requests)" -eq 1 ] || fail "an imported cache fetched other than the damaged chunk"
[ "$(stat_value "$T/mnt" cache damaged_dropped)" -eq 1 ] || fail "the damaged old chunk file was not dropped"
umount_imgfs "$T/mnt"
ok "an old-layout cache is imported at mount: served without fetching, its damaged chunk refetched, meta/ kept"
finish
