#!/bin/bash
# Byte-for-byte identity between mounted base versions and their sources, for
# raw, qcow2, compressed qcow2 and qcow2-with-backing inputs, checked with cmp
# and with qemu-img compare as a real client.
. "$(dirname "$0")/lib.sh"

REPO=$T/repo
M=$T/mnt
MIB=1048576

# Raw, not a multiple of any chunk size, mixed zero/random/compressible data.
make_image "$T/mixed.raw" $((40 * MIB + 12345))
"$IMGFSCTL" publish "$T/mixed.raw" "$REPO" --name mixed > "$T/out"
grep -q 'published mixed@1' "$T/out" || fail "publish did not report mixed@1"

# qcow2 and zlib-compressed qcow2 of another image.
make_image "$T/q.raw" $((24 * MIB + 777))
qemu-img convert -q -f raw -O qcow2 "$T/q.raw" "$T/q.qcow2"
qemu-img convert -q -c -f raw -O qcow2 "$T/q.raw" "$T/qc.qcow2"
# qcow2 sizes are whole 512-byte sectors: the expected disk is qemu's view.
qemu-img convert -q -O raw "$T/q.qcow2" "$T/q.expected.raw"
"$IMGFSCTL" publish "$T/q.qcow2" "$REPO" --name q > /dev/null
"$IMGFSCTL" publish "$T/qc.qcow2" "$REPO" --name qc > /dev/null

# qcow2 whose backing file is qcow2: an overlay that rewrites some ranges.
qemu-img create -q -f qcow2 -b "$T/q.qcow2" -F qcow2 "$T/overlay.qcow2" > /dev/null
qemu-io -f qcow2 -c 'write -P 0xab 1M 3M' -c 'write -P 0x00 10M 64k' -c 'write -P 0x5c 23M 8k' "$T/overlay.qcow2" > /dev/null
qemu-img convert -q -O raw "$T/overlay.qcow2" "$T/overlay.expected.raw"
"$IMGFSCTL" publish "$T/overlay.qcow2" "$REPO" --name overlay > "$T/out"
grep -q 'qcow2+backing' "$T/out" || fail "publish did not say it followed the backing file"

# Small and large chunk sizes on the same raw image.
"$IMGFSCTL" publish "$T/mixed.raw" "$REPO" --name mixed4k --chunk-size 4K > /dev/null
"$IMGFSCTL" publish "$T/mixed.raw" "$REPO" --name mixed1m --chunk-size 1M > /dev/null

mount_imgfs "$REPO" "$M"

check_same() {
    local file=$1 source=$2
    [ "$(stat -L -c %s "$file")" = "$(stat -c %s "$source")" ] || fail "$file has the wrong size"
    cmp "$file" "$source" || fail "$file differs from $source"
    qemu-img compare -q -f raw -F raw "$file" "$source" || fail "qemu-img compare: $file differs"
    ok "$(basename "$file") is identical to $(basename "$source") (cmp, qemu-img compare)"
}
check_same "$M/bases/mixed.raw" "$T/mixed.raw"
check_same "$M/bases/q.raw" "$T/q.expected.raw"
check_same "$M/bases/qc.raw" "$T/q.expected.raw"
check_same "$M/bases/overlay.raw" "$T/overlay.expected.raw"
check_same "$M/bases/mixed4k.raw" "$T/mixed.raw"
check_same "$M/bases/mixed1m.raw" "$T/mixed.raw"

# Reads that start and end at odd places, across chunk boundaries and at EOF.
size=$(stat -c %s "$T/mixed.raw")
for spec in "0 1" "262143 2" "262144 262144" "1000 700000" "$((size - 5)) 5" "$((size - 1)) 100"; do
    set -- $spec
    a=$(dd if="$M/bases/mixed.raw" bs=1 skip="$1" count="$2" iflag=skip_bytes,count_bytes status=none | xxh128sum | cut -d' ' -f1)
    b=$(dd if="$T/mixed.raw" bs=1 skip="$1" count="$2" iflag=skip_bytes,count_bytes status=none | xxh128sum | cut -d' ' -f1)
    [ "$a" = "$b" ] || fail "range $1+$2 differs"
done
ok "unaligned ranges and EOF reads match"

# A later version sharing most blocks stores only what changed.
cp "$T/mixed.raw" "$T/mixed2.raw"
printf 'changed' | dd of="$T/mixed2.raw" bs=1 seek=$((5 * MIB)) conv=notrunc status=none
"$IMGFSCTL" publish "$T/mixed2.raw" "$REPO" --name mixed > "$T/out"
grep -q 'published mixed@2' "$T/out" || fail "second publish is not version 2"
grep -Eq 'chunks +1 new' "$T/out" || { cat "$T/out"; fail "a one-chunk change stored more than one chunk"; }
ok "a new version stores only the changed chunk"
# The mount re-reads a local repository's index at most every 2 s.
wait_for "bases/mixed.raw does not point at version 2" '[ "$(readlink "$M/bases/mixed.raw")" = "mixed@2.raw" ]'
check_same "$M/bases/mixed.raw" "$T/mixed2.raw"
check_same "$M/bases/mixed@1.raw" "$T/mixed.raw"

umount_imgfs "$M"
finish
