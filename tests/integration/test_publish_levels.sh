#!/bin/bash
# Chunks stored at any zstd level read back the same: a repository holding a
# version published at level 3 (the default before level 1), one at the
# default level and one stored raw (level 0) mounts, and every version reads
# back as its image. The levels must really store different bytes for the
# same chunk, or this would test one level three times.
. "$(dirname "$0")/lib.sh"

make_image "$T/a.raw" $((6 * 1048576 + 4096))
make_image "$T/b.raw" $((5 * 1048576))
make_image "$T/c.raw" $((3 * 1048576))
"$IMGFSCTL" publish "$T/a.raw" "$T/repo" --name lv --level 3 > /dev/null
"$IMGFSCTL" publish "$T/b.raw" "$T/repo" --name lv > /dev/null
"$IMGFSCTL" publish "$T/c.raw" "$T/repo" --name lv --level 0 > /dev/null
ok "published versions at level 3, the default level and level 0"

# The same image at the default level, in a repository of its own: chunk
# files of the same name (the hash of the raw bytes) must differ somewhere.
"$IMGFSCTL" publish "$T/a.raw" "$T/repo-default" --name lv > /dev/null
differ=0
for f in "$T"/repo-default/chunks/*/*; do
    cmp -s "$f" "$T/repo/chunks/$(basename "$(dirname "$f")")/$(basename "$f")" || differ=$((differ + 1))
done
[ "$differ" -gt 0 ] || fail "level 3 and the default level stored the same bytes for every chunk"
ok "level 3 and the default level store $differ chunks differently"

mount_imgfs "$T/repo" "$T/mnt"
same "$T/mnt/bases/lv@1.raw" "$T/a.raw" "the level-3 version reads back wrong"
same "$T/mnt/bases/lv@2.raw" "$T/b.raw" "the default-level version reads back wrong"
same "$T/mnt/bases/lv@3.raw" "$T/c.raw" "the raw (level 0) version reads back wrong"
ok "versions stored at levels 3, default and 0 read back as their images"
umount_imgfs "$T/mnt"
finish
