#!/bin/bash
# A chunk in the cache is never fetched again, including after a remount:
# the second pass over a base does no repository reads.
. "$(dirname "$0")/lib.sh"

make_image "$T/img.raw" $((20 * 1048576 + 999))
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name r > /dev/null
mount_imgfs "$T/repo" "$T/mnt"
cmp "$T/mnt/bases/r.raw" "$T/img.raw" || fail "first pass differs"
first=$(stat_value "$T/mnt" fetch requests)
[ "$first" -gt 0 ] || fail "first pass made no repository reads"
resident=$(stat_value "$T/mnt" "base r@1" chunks_resident)
[ "${resident%/*}" = "${resident#*/}" ] || fail "not all chunks resident after a full read: $resident"
ok "first pass: $first repository reads, chunks resident $resident"
umount_imgfs "$T/mnt"

# The page cache is dropped too, so every read really goes through imgfs.
sync; echo 3 > /proc/sys/vm/drop_caches
mount_imgfs "$T/repo" "$T/mnt"
cmp "$T/mnt/bases/r.raw" "$T/img.raw" || fail "second pass differs"
[ "$(stat_value "$T/mnt" fetch requests)" -eq 0 ] || fail "second pass read from the repository"
[ "$(stat_value "$T/mnt" "base r@1" cache_misses)" -eq 0 ] || fail "second pass had cache misses"
hits=$(stat_value "$T/mnt" "base r@1" cache_hits)
[ "$hits" -gt 0 ] || fail "second pass did not go through the cache"
ok "second pass after remount: 0 repository reads, $hits cache hits"

# With the repository gone entirely, the cached base is still served.
mv "$T/repo" "$T/repo.away"
sync; echo 3 > /proc/sys/vm/drop_caches
cmp "$T/mnt/bases/r.raw" "$T/img.raw" || fail "cached base not served while the repository is gone"
ls "$T/mnt/bases" > /dev/null || fail "ls fails while the repository is gone"
grep -q 'refresh_error' "$T/mnt/.imgfs/stats" || fail "stats unreadable while the repository is gone"
ok "repository gone: cached base, ls and stats still work"
umount_imgfs "$T/mnt"
finish
