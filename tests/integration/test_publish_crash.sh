#!/bin/bash
# A publish killed half-way (kill -9) leaves the repository valid: readers
# never see a partial version, the old versions still mount and read, and the
# next publish completes and reuses the chunks that were already written.
. "$(dirname "$0")/lib.sh"

make_image "$T/v1.raw" $((8 * 1048576))
"$IMGFSCTL" publish "$T/v1.raw" "$T/repo" --name p > /dev/null
index_before=$(cat "$T/repo/index")

# chunk_files: the stored chunk files of the repository, one per line.
chunk_files() { find "$T/repo/chunks" -type f ! -name '*.tmp.*' | sort; }
chunk_files > "$T/chunks.v1"

# A big second image (level 19 zstd on four threads keeps it busy), killed
# once it has stored chunks of its own. The test holds the repository's
# publish lock meanwhile: a publish takes it only after its last chunk, to
# number the version and write the manifest and index (publish.h), so the
# kill lands before step 3 however fast or slow the machine is, and the
# wait below ends on what is stored, not on a time.
head -c $((192 * 1048576)) /dev/urandom > "$T/v2.raw"
exec 8> "$T/repo/.publish.lock"
flock 8
"$IMGFSCTL" publish "$T/v2.raw" "$T/repo" --name p --level 19 --threads 4 > /dev/null 2> "$T/killed.err" 8>&- &
pid=$!
# Counted against v1's own chunks, which alone are often 20 or more.
deadline=$((SECONDS + 300)) # ends only a run that fails: it is stuck
while [ $(($(chunk_files | wc -l) - $(wc -l < "$T/chunks.v1"))) -lt 8 ]; do
    kill -0 "$pid" 2>/dev/null || fail "the publish to be killed exited first: $(cat "$T/killed.err")"
    [ "$SECONDS" -lt "$deadline" ] || fail "the publish stored no 8 chunks in 300 s"
    sleep 0.05
done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
exec 8>&-
chunk_files > "$T/chunks.killed"
written=$(comm -13 "$T/chunks.v1" "$T/chunks.killed" | wc -l)
[ "$written" -ge 8 ] || fail "the killed publish stored $written chunks"
[ "$(cat "$T/repo/index")" = "$index_before" ] || fail "a killed publish changed the index"
[ ! -e "$T/repo/bases/p/2.manifest" ] || fail "a killed publish left a version 2 manifest"
ok "publish killed after storing $written chunks: index and manifests untouched"

mount_imgfs "$T/repo" "$T/mnt"
[ "$(ls "$T/mnt/bases")" = "$(printf 'p.raw\np@1.raw')" ] || fail "unexpected bases after a killed publish: $(ls "$T/mnt/bases")"
cmp "$T/mnt/bases/p.raw" "$T/v1.raw" || fail "version 1 broken by a killed publish"
ok "repository still mounts and serves version 1"

# Alone, so that what it reuses is exactly what the killed publish left
# (random data: no chunk repeats within v2, none is zero, none is in v1).
"$IMGFSCTL" publish "$T/v2.raw" "$T/repo" --name p --level 1 > "$T/out" || fail "the re-publish failed"
grep -Eq "chunks +[0-9]+ new, $written reused" "$T/out" || { cat "$T/out"; fail "the re-publish did not reuse the $written chunks stored"; }
ok "re-publish reused the $written chunks the killed publish stored"

"$IMGFSCTL" publish "$T/v2.raw" "$T/repo" --name p --level 1 > /dev/null &
a=$!
"$IMGFSCTL" publish "$T/v2.raw" "$T/repo" --name p --level 1 > /dev/null &
b=$!
wait $a || fail "one of two concurrent publishes failed"
wait $b || fail "one of two concurrent publishes failed"
# A local repository is re-read at the opendir and lookup of bases/ (ops.c).
versions=$(ls "$T/mnt/bases" | tr '\n' ' ')
[ "$versions" = "p.raw p@1.raw p@2.raw p@3.raw p@4.raw " ] || fail "two concurrent publishes did not make versions 3 and 4: $versions"
for v in 2 3 4; do cmp "$T/mnt/bases/p@$v.raw" "$T/v2.raw" || fail "version $v wrong"; done
ok "two concurrent publishes got versions 3 and 4, each right"
umount_imgfs "$T/mnt"
finish
