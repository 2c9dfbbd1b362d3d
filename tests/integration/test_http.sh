#!/bin/bash
# A repository served by nginx: a mixed image reads back byte for byte over
# HTTP, each stored chunk is requested exactly once, a remount serves it all
# from the cache with no request, `imgfsctl versions URL` works, and a new
# publish shows up over HTTP through the background refresh.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
REPO=$T/www/repo
mkdir -p "$T/www"
# ~40 MiB, not a multiple of the 128 KiB chunk size nor of 4 KiB.
SIZE=$((40 * 1048576 + 54321))
make_image "$T/img.raw" $SIZE
"$IMGFSCTL" publish "$T/img.raw" "$REPO" --name deb > /dev/null
nginx_start www "$T/www"
URL=${NGINX_URL[www]}/repo

# Distinct stored (non-zero) chunks of a manifest, and their stored bytes.
manifest_hashes() {
    awk '/^chunks / { n = $2; go = 1; next } go && n > 0 { print $1; n-- }' "$1"
}
stored_bytes_of() { # MANIFEST: sum of the stored sizes of its distinct non-zero chunks
    local total=0 h
    for h in $(manifest_hashes "$1" | grep -vx 0 | sort -u); do
        total=$((total + $(stat -c %s "$REPO/chunks/${h:0:2}/$h")))
    done
    echo $total
}
DISTINCT=$(manifest_hashes "$REPO/bases/deb/1.manifest" | grep -vx 0 | sort -u | wc -l)
NONZERO=$(manifest_hashes "$REPO/bases/deb/1.manifest" | grep -vxc 0)  # with repeats
STORED=$(stored_bytes_of "$REPO/bases/deb/1.manifest")
[ "$DISTINCT" -gt 100 ] || fail "test image has only $DISTINCT distinct stored chunks"

# --- first pass: everything comes over HTTP ----------------------------------
mount_imgfs "$URL" "$M"
[ "$(stat_value "$M" daemon repository_kind)" = http ] || fail "mount is not using the HTTP repository"
[ "$(stat -L -c %s "$M/bases/deb.raw")" -eq $SIZE ] || fail "base size over HTTP is wrong"
[ "$(stat_value "$M" "base deb@1" chunks_resident)" = "0/$NONZERO" ] ||
    fail "an empty cache shows $(stat_value "$M" "base deb@1" chunks_resident) chunks resident"
cmp "$M/bases/deb.raw" "$T/img.raw" || fail "base read over HTTP differs from the source image"
# Written behind the replies: the count follows the cache, not the stats read before.
wait_stat "$M" "base deb@1" chunks_resident "$NONZERO/$NONZERO"
ok "stats count the chunks the cache got since they were last read"
qemu-img compare -f raw -F raw "$M/bases/deb.raw" "$T/img.raw" > "$T/qcmp" ||
    { cat "$T/qcmp"; fail "qemu-img compare finds a difference over HTTP"; }
ok "$SIZE-byte mixed image over HTTP is identical (cmp, qemu-img compare)"

requests=$(stat_value "$M" fetch requests)
transferred=$(stat_value "$M" fetch bytes_transferred)
[ "$requests" -eq "$DISTINCT" ] ||
    fail "fetch made $requests requests for $DISTINCT distinct stored chunks (each should be fetched once)"
[ "$transferred" -eq "$STORED" ] || fail "fetch transferred $transferred bytes, the stored chunks are $STORED"
sent=$(nginx_bytes_sent www /repo/chunks/)
[ "$sent" -eq "$STORED" ] || fail "nginx sent $sent chunk bytes, the stored chunks are $STORED"
[ "$(nginx_requests www /repo/chunks/)" -eq "$DISTINCT" ] || fail "nginx saw another number of chunk requests"
[ "$(stat_value "$M" fetch errors)" -eq 0 ] || fail "fetch errors on a healthy server"
[ "$(stat_value "$M" fetch verify_failures)" -eq 0 ] || fail "verify failures on a healthy server"
[ "$(stat_value "$M" "mirror 0" current)" = yes ] || fail "mirror 0 is not current"
[ "$(stat_value "$M" "mirror 0" requests)" -ge "$DISTINCT" ] || fail "mirror 0 requests not counted"
[ "$(stat_value "$M" "mirror 0" errors)" -eq 0 ] || fail "mirror 0 errors on a healthy server"
ok "each of $DISTINCT stored chunks fetched once: $transferred bytes, as nginx's log says"
umount_imgfs "$M"

# --- second pass: the cache answers everything -------------------------------
sync
echo 3 > /proc/sys/vm/drop_caches
before=$(nginx_requests www /repo/chunks/)
mount_imgfs "$URL" "$M" "refresh=1"
cmp "$M/bases/deb.raw" "$T/img.raw" || fail "second pass differs from the source image"
[ "$(stat_value "$M" fetch requests)" -eq 0 ] || fail "second pass after a remount made fetch requests"
[ "$(nginx_requests www /repo/chunks/)" -eq "$before" ] || fail "second pass asked nginx for chunks"
misses=$(stat_value "$M" "base deb@1" cache_misses)
[ "$misses" -eq 0 ] || fail "second pass had $misses cache misses"
[ "$(stat_value "$M" "base deb@1" chunks_resident)" = "$NONZERO/$NONZERO" ] ||
    fail "not every stored chunk is resident: $(stat_value "$M" "base deb@1" chunks_resident)"
ok "after a remount the whole base reads from the cache with 0 requests"

# --- imgfsctl versions over HTTP ---------------------------------------------
"$IMGFSCTL" versions "$URL" > "$T/versions" || { cat "$T/versions"; fail "imgfsctl versions over HTTP failed"; }
awk '$1 == "deb" && $2 == 1 && $NF == "latest" { found = 1 } END { exit !found }' "$T/versions" ||
    { cat "$T/versions"; fail "imgfsctl versions does not list deb@1 as the latest version"; }
expect_error "imgfsctl versions of a URL that is not a repository" "$IMGFSCTL" versions "${NGINX_URL[www]}/nothing"
ok "imgfsctl versions lists deb 1 $SIZE 131072 over HTTP"

# --- a new publish appears over HTTP -----------------------------------------
cp "$T/img.raw" "$T/img2.raw"
printf 'version two' | dd of="$T/img2.raw" bs=1 seek=$((SIZE - 5000)) conv=notrunc status=none
head -c 1048576 /dev/urandom | dd of="$T/img2.raw" bs=1M seek=7 conv=notrunc status=none
"$IMGFSCTL" publish "$T/img2.raw" "$REPO" --name deb > /dev/null
# refresh=1: the bounds (60 s) only end a run that fails, on a loaded machine.
seen=0
for _ in $(seq 1 600); do
    if ls "$M/bases" | grep -qx 'deb@2.raw'; then seen=1; break; fi
    sleep 0.1
done
[ $seen -eq 1 ] || { ls -l "$M/bases"; fail "deb@2.raw did not appear within 60 s with refresh=1"; }
ok "a new publish appears over HTTP through the background refresh"
for _ in $(seq 1 600); do
    [ "$(readlink "$M/bases/deb.raw")" = deb@2.raw ] && break
    sleep 0.1
done
[ "$(readlink "$M/bases/deb.raw")" = deb@2.raw ] || fail "deb.raw points to $(readlink "$M/bases/deb.raw"), not deb@2.raw"
cmp "$M/bases/deb@2.raw" "$T/img2.raw" || fail "deb@2 over HTTP differs from its source"
cmp "$M/bases/deb@1.raw" "$T/img.raw" || fail "deb@1 changed after deb@2 was published"
# Only what changed is fetched: the 1 MiB of new data and the chunk with the tail.
new=$(stat_value "$M" fetch requests)
[ "$new" -ge 2 ] && [ "$new" -le 10 ] || fail "reading deb@2 fetched $new chunks; expected only the changed ones"
ok "deb.raw -> deb@2.raw, deb@2 identical, only $new changed chunks fetched, deb@1 unchanged"
umount_imgfs "$M"
nginx_stop www
finish
