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
umount_imgfs "$T/mnt"
finish
