#!/bin/bash
# 8 threads read random, unaligned ranges of a cold base at once; every byte
# must match. Then 8 processes race for the same cold chunks: each chunk is
# fetched from the repository once.
. "$(dirname "$0")/lib.sh"

make_image "$T/img.raw" $((48 * 1048576 + 4321))
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name c --chunk-size 64K > /dev/null
mount_imgfs "$T/repo" "$T/mnt"

"$TOOLS/randread" "$T/mnt/bases/c.raw" "$T/img.raw" 8 400 7 || fail "random concurrent reads returned wrong data"
ok "8 threads x 400 random reads, all bytes correct"

# Single flight: many readers of the same cold chunks at the same time.
head -c $((16 * 1048576)) /dev/urandom > "$T/b.raw" # all chunks distinct
"$IMGFSCTL" publish "$T/b.raw" "$T/repo" --name b --chunk-size 64K > /dev/null
# The mount re-reads a local repository's index at most every 2 s.
wait_for "base b never appeared in the mount" '[ -e "$T/mnt/bases/b@1.raw" ]'
before=$(stat_value "$T/mnt" fetch requests)
resident_before=$(stat_value "$T/mnt" "base b@1" chunks_resident)
resident_before=${resident_before%/*} # chunks shared with base c are cached already
readers=()
for i in $(seq 1 8); do
    cat "$T/mnt/bases/b.raw" > "$T/out.$i" &
    readers+=($!)
done
wait "${readers[@]}" # not a bare wait: the daemon is a child too
for i in $(seq 1 8); do cmp "$T/out.$i" "$T/b.raw" || fail "reader $i got wrong data"; done
after=$(stat_value "$T/mnt" fetch requests)
resident=$(stat_value "$T/mnt" "base b@1" chunks_resident)
total=${resident#*/}
[ "${resident%/*}" -eq "$total" ] || fail "not every chunk is resident after reading: $resident"
missing=$((total - resident_before))
[ "$missing" -gt 100 ] || fail "test image shares too much with the first one ($missing chunks to fetch)"
[ "$((after - before))" -eq "$missing" ] || fail "8 concurrent readers caused $((after - before)) fetches for $missing missing chunks"
ok "8 concurrent readers of a cold base: $missing missing chunks fetched exactly once each"
umount_imgfs "$T/mnt"
finish
