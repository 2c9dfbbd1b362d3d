#!/bin/bash
# Nothing wrong is served: a chunk corrupted in the repository makes the read
# fail with EIO and raises the failure counter; once repaired, the read works.
# A chunk damaged inside a cache pack is dropped and fetched again.
. "$(dirname "$0")/lib.sh"

CS=65536
head -c $((CS * 16)) /dev/urandom > "$T/img.raw"
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name x --chunk-size 64K --level 0 > /dev/null

# Chunk 5's stored file, found by hashing its bytes the way publish does.
hash=$(dd if="$T/img.raw" bs=$CS skip=5 count=1 status=none | xxh128sum | cut -d' ' -f1)
chunk="$T/repo/chunks/${hash:0:2}/$hash"
[ -f "$chunk" ] || fail "cannot find chunk 5 in the repository at $chunk"
cp "$chunk" "$T/chunk.good"
# Flip one byte in the payload (after the 16-byte header).
python3 - "$chunk" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[16 + 1000] ^= 0x01
open(p, "wb").write(bytes(b))
PY

mount_imgfs "$T/repo" "$T/mnt" "timeout=5"
F=$T/mnt/bases/x.raw
if dd if="$F" of="$T/out" bs=$CS skip=5 count=1 iflag=direct status=none 2>"$T/err"; then
    fail "read of a corrupted chunk succeeded"
fi
grep -q 'Input/output error' "$T/err" || { cat "$T/err"; fail "corrupted chunk did not give EIO"; }
ok "read of the corrupted chunk fails with EIO"
failures=$(stat_value "$T/mnt" "base x@1" verify_failures)
[ "$failures" -ge 1 ] || fail "verify_failures is $failures after a corrupted chunk"
ok "verify_failures counted ($failures)"
# The neighbours still read fine and the bad chunk never reached the cache.
dd if="$F" bs=$CS skip=4 count=1 status=none | cmp - <(dd if="$T/img.raw" bs=$CS skip=4 count=1 status=none) ||
    fail "neighbouring chunk is wrong"
! cache_locate "$T/cache" "$hash" > /dev/null || fail "a corrupted chunk was stored in the cache"
ok "neighbouring chunks still served; nothing corrupt cached"
# Whole-file read never returns the wrong bytes: it fails instead.
if cat "$F" > "$T/whole" 2>/dev/null; then fail "full read succeeded despite corruption"; fi
ok "full read fails rather than return wrong data"

cp "$T/chunk.good" "$chunk"
cmp "$F" "$T/img.raw" || fail "read after repair is wrong"
ok "after repairing the chunk, the whole base reads correctly"

# Damage a chunk in the cache while unmounted: it is dropped and refetched.
umount_imgfs "$T/mnt"
at=$(cache_locate "$T/cache" "$hash") || fail "chunk not in the cache after reading"
read -r pack off _ <<< "$at"
printf '\xff' | dd of="$pack" bs=1 seek=$((off + 123)) conv=notrunc status=none
mount_imgfs "$T/repo" "$T/mnt"
cmp "$T/mnt/bases/x.raw" "$T/img.raw" || fail "damaged cache file was served"
[ "$(stat_value "$T/mnt" cache damaged_dropped)" -eq 1 ] || fail "damaged cache file not counted"
[ "$(stat_value "$T/mnt" fetch requests)" -eq 1 ] || fail "expected exactly one refetch"
ok "a damaged cache file is dropped and fetched again"

# Reads of part of a cached chunk are checked by 4 KiB block: with block 9
# of chunk 5 damaged, other blocks of it are served from the cache (nothing
# dropped or fetched), and the read that reaches block 9 gets the right bytes
# from the repository.
umount_imgfs "$T/mnt"
at=$(cache_locate "$T/cache" "$hash") || fail "chunk not in the cache after refetching"
read -r pack off _ <<< "$at"
printf '\xff' | dd of="$pack" bs=1 seek=$((off + 9 * 4096 + 77)) conv=notrunc status=none
mount_imgfs "$T/repo" "$T/mnt"
block() { dd if="$F" bs=4096 skip=$((5 * CS / 4096 + $1)) count=1 iflag=direct status=none; }
for b in 3 14 0 11 8 15; do
    cmp <(block $b) <(dd if="$T/img.raw" bs=4096 skip=$((5 * CS / 4096 + b)) count=1 status=none) ||
        fail "block $b of chunk 5 read wrong"
done
[ "$(stat_value "$T/mnt" cache damaged_dropped)" -eq 0 ] || fail "good blocks of a chunk with one damaged block made it drop"
[ "$(stat_value "$T/mnt" fetch requests)" -eq 0 ] || fail "good blocks of a cached chunk were fetched"
cmp <(block 9) <(dd if="$T/img.raw" bs=4096 skip=$((5 * CS / 4096 + 9)) count=1 status=none) ||
    fail "the damaged block was served"
[ "$(stat_value "$T/mnt" cache damaged_dropped)" -eq 1 ] || fail "the damaged block was not caught"
[ "$(stat_value "$T/mnt" fetch requests)" -eq 1 ] || fail "the damaged chunk was not fetched again"
cmp "$F" "$T/img.raw" || fail "the base reads wrong after the block check"
ok "a cached chunk is checked by the blocks read: a damaged block is caught, the others are served"
umount_imgfs "$T/mnt"
finish
