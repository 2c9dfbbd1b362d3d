#!/bin/bash
# Sequential readahead is per file. One VM disk read in order gets the next
# 4 MiB of chunks fetched ahead of it; two VM disks on one base whose reads,
# taken together, look like one sequential run fetch only what they read
# (16 VMs booting one base interleave like that; counted per base, their
# readahead fetched chunks none of them read: CI saw 71 chunk requests for
# 47 chunks in test_http_boot_storm). Over a base already in the cache,
# a damaged chunk ahead of the reader is fetched again, never served.
. "$(dirname "$0")/lib.sh"

M=$T/mnt
CS=131072
MIB=1048576
head -c $((64 * MIB)) /dev/urandom > "$T/img.raw" # no zero chunks: each read chunk is fetched
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name b > /dev/null
# z: other random data (no chunk shared with b) with a hole: chunks 20-27
# are zero (not stored, never fetched).
head -c $((64 * MIB)) /dev/urandom > "$T/holes.raw"
dd if=/dev/zero of="$T/holes.raw" bs=$CS seek=20 count=8 conv=notrunc status=none
"$IMGFSCTL" publish "$T/holes.raw" "$T/repo" --name z > /dev/null
[ "$(awk '$1 == "chunk-size" { print $2 }' "$T/repo/bases/b/1.manifest")" -eq $CS ] || fail "unexpected chunk size"
mount_imgfs "$T/repo" "$M"
"$IMGFSCTL" vm create "$M" a --base b > /dev/null || fail "cannot create VM a"
"$IMGFSCTL" vm create "$M" c --base b > /dev/null || fail "cannot create VM c"
"$IMGFSCTL" vm create "$M" d --base z > /dev/null || fail "cannot create VM d"
"$IMGFSCTL" vm create "$M" e --base z > /dev/null || fail "cannot create VM e"

# read_chunks VM FIRST COUNT: reads whole chunks, O_DIRECT (no kernel readahead).
read_chunks() {
    dd if="$M/vms/$1.raw" of=/dev/null bs=$CS skip="$2" count="$3" iflag=direct status=none ||
        fail "cannot read vms/$1.raw"
}
resident() { stat_value "$M" "base b@1" resident_chunks; }

# The window is 32 chunks; a read that starts a run is not counted in it.
# a reads chunks 0-15, then c reads 16-33: in order taken together (33
# counted), but neither is a whole window in order on its own.
read_chunks a 0 16
read_chunks c 16 18
sleep 1 # readahead, had it started, runs in the background
[ "$(resident)" -eq 34 ] || fail "$(resident) chunks resident, not the 34 that the two VMs read: readahead mixed their reads"
ok "two VM disks read 16 and 18 chunks in a row: 34 chunks fetched, no readahead"

# a goes on in order over 16-33 (cached by c): a window in order in one
# file, so the next 32 chunks (34-65) are fetched ahead.
read_chunks a 16 18
wait_stat "$M" "base b@1" resident_chunks 66
ok "one VM disk read 34 chunks in order: the next 32 were fetched ahead"

# Reading the hole goes on with the run: d reads chunks 0-33 of z in order,
# 26 of them stored, and gets the next 32 (34-65) fetched ahead. (The hole
# used to end the run: reads after it started a new one.)
read_chunks d 0 34
wait_stat "$M" "base z@1" resident_chunks 58
ok "a read in order across a hole of 8 zero chunks kept its readahead"

# Two neighbouring reads that arrive swapped (FUSE threads hand them over in
# parallel) do not end the run: e reads 100-115, 117, 116, then 118-134,
# and gets 135-166 fetched ahead. (The read past the gap counts nothing in
# the run: 101-115 and 118-134 are its 32.)
read_chunks e 100 16
read_chunks e 117 1
read_chunks e 116 1
read_chunks e 118 17
wait_stat "$M" "base z@1" resident_chunks $((58 + 35 + 32))
ok "a run with two reads swapped kept its readahead"

# A reader that reads every other chunk is not sequential: f reads 40
# chunks of b, one in two (200, 202, ... 278), and nothing is fetched ahead.
"$IMGFSCTL" vm create "$M" f --base b > /dev/null || fail "cannot create VM f"
before=$(resident)
for ((i = 0; i < 40; i++)); do read_chunks f $((200 + 2 * i)) 1; done
sleep 1 # readahead, had it started, runs in the background
[ "$(resident)" -eq $((before + 40)) ] ||
    fail "$(($(resident) - before)) chunks fetched for 40 read one in two: readahead took a strided reader for a sequential one"
ok "a reader of every other chunk gets no readahead"
[ "$(stat_value "$M" fetch errors)" -eq 0 ] || fail "fetch errors"
umount_imgfs "$M"

# Readahead over a base already in the cache, after a remount: the chunks
# ahead are only read into the page cache (cache_prefetch), and each is
# checked by its reader. A damaged one among them is dropped and fetched
# again when it is read, never served.
h=$(dd if="$T/img.raw" bs=$CS skip=40 count=1 status=none | xxh128sum | cut -d' ' -f1)
read -r pack off len <<< "$(cache_locate "$T/cache" "$h")" || fail "chunk 40 of b is not in the cache"
python3 -c 'import sys; f = open(sys.argv[1], "r+b"); f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([b[0] ^ 0x20]))' \
    "$pack" $((off + 70000))
mount_imgfs "$T/repo" "$M"
cmp <(dd if="$M/bases/b.raw" bs=$CS count=66 iflag=direct status=none) \
    <(dd if="$T/img.raw" bs=$CS count=66 status=none) || fail "a damaged chunk read ahead was served"
[ "$(stat_value "$M" cache damaged_dropped)" -eq 1 ] || fail "the damaged chunk ahead was not dropped"
cmp <(dd if="$M/bases/b.raw" bs=$CS count=66 status=none) <(dd if="$T/img.raw" bs=$CS count=66 status=none) ||
    fail "the base reads wrong after the damaged chunk was fetched again"
ok "readahead over a cached base: a damaged chunk ahead is fetched again, never served"
[ "$(stat_value "$M" fetch errors)" -eq 0 ] || fail "fetch errors"
umount_imgfs "$M"
finish
