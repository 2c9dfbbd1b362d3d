#!/bin/bash
# A publish killed half-way (kill -9) leaves the repository valid: readers
# never see a partial version, the old versions still mount and read, and the
# next publish completes and reuses the chunks that were already written.
. "$(dirname "$0")/lib.sh"

make_image "$T/v1.raw" $((8 * 1048576))
"$IMGFSCTL" publish "$T/v1.raw" "$T/repo" --name p > /dev/null
index_before=$(cat "$T/repo/index")

# A big, slow-to-publish second image (level 19 zstd makes it slow), on
# four threads, so the kill lands while several chunks are in flight.
head -c $((192 * 1048576)) /dev/urandom > "$T/v2.raw"
"$IMGFSCTL" publish "$T/v2.raw" "$T/repo" --name p --level 19 --threads 4 > /dev/null 2>&1 &
pid=$!
# Kill it once it has stored some chunks but long before it can finish.
for _ in $(seq 1 200); do
    n=$(find "$T/repo/chunks" -type f | wc -l)
    [ "$n" -ge 20 ] && break
    sleep 0.05
done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
written=$(find "$T/repo/chunks" -type f ! -name '*.tmp.*' | wc -l)
[ "$written" -ge 20 ] || fail "publish was killed before it stored anything ($written chunks)"
[ "$(cat "$T/repo/index")" = "$index_before" ] || fail "a killed publish changed the index"
[ ! -e "$T/repo/bases/p/2.manifest" ] || fail "a killed publish left a version 2 manifest"
ok "publish killed after storing $written chunks: index and manifests untouched"

mount_imgfs "$T/repo" "$T/mnt"
[ "$(ls "$T/mnt/bases")" = "$(printf 'p.raw\np@1.raw')" ] || fail "unexpected bases after a killed publish: $(ls "$T/mnt/bases")"
cmp "$T/mnt/bases/p.raw" "$T/v1.raw" || fail "version 1 broken by a killed publish"
ok "repository still mounts and serves version 1"

"$IMGFSCTL" publish "$T/v2.raw" "$T/repo" --name p --level 1 > "$T/out" &
"$IMGFSCTL" publish "$T/v2.raw" "$T/repo" --name p --level 1 > /dev/null 2>&1 &
wait %2 %3 2>/dev/null || true
grep -Eq 'chunks +[0-9]+ new, [1-9][0-9]* reused' "$T/out" || { cat "$T/out"; fail "the re-publish did not reuse chunks"; }
sleep 2.1
versions=$(ls "$T/mnt/bases" | tr '\n' ' ')
[ "$versions" = "p.raw p@1.raw p@2.raw p@3.raw " ] || fail "two concurrent publishes did not make versions 2 and 3: $versions"
cmp "$T/mnt/bases/p@2.raw" "$T/v2.raw" || fail "version 2 wrong"
cmp "$T/mnt/bases/p@3.raw" "$T/v2.raw" || fail "version 3 wrong"
ok "re-publish reused stored chunks; two concurrent publishes got versions 2 and 3"
umount_imgfs "$T/mnt"
finish
