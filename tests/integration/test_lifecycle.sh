#!/bin/bash
# Life cycle of versions and snapshots:
#  1. imgfsctl versions lists every version with its date, size and stored
#     bytes; retire + gc remove exactly the chunks that no other version
#     references (and a killed publish's temp file); the newest version
#     cannot be retired; a fresh mount no longer shows a retired version,
#     while a host that had it keeps serving what it cached, and fails with
#     EIO on the rest;
#  2. a publish running while gc runs is not damaged: the publish is held in
#     the middle (its source is an imgfs mount of an nginx that is stopped),
#     gc waits for it, and the new version is complete afterwards;
#  3. vm rm VM@SNAP removes a snapshot; an open one, or the origin of a
#     clone, is refused; an implicit clone snapshot goes with its last clone.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

R=$T/repo
make_image "$T/a.img" $((8 << 20))
cp "$T/a.img" "$T/b.img"
put $((2 << 20)) $((2 << 20)) 11 "$T/b.img"   # os@2 shares 6 of 8 MiB with os@1
cp "$T/b.img" "$T/c.img"
put $((5 << 20)) $((1 << 20)) 12 "$T/c.img"
head -c $((1 << 20)) "$T/a.img" > "$T/d.img"  # other@1 shares os@1's first MiB
make_image "$T/d2.img" $((3 << 20))
cat "$T/d2.img" >> "$T/d.img"
for i in a b c; do "$IMGFSCTL" publish "$T/$i.img" "$R" --name os --chunk-size 64K > /dev/null; done
"$IMGFSCTL" publish "$T/d.img" "$R" --name other --chunk-size 64K > /dev/null

# chunk_refs MANIFEST...: the stored chunk hashes they reference, sorted.
chunk_refs() { cat "$@" | grep -E '^[0-9a-f]{32}$' | sort -u; }
chunk_files() { find "$R/chunks" -type f -printf '%f\n' | sort; }
chunk_files > "$T/files.before"
chunk_refs "$R"/bases/*/*.manifest > "$T/refs.all"
same "$T/files.before" "$T/refs.all" "the repository holds other chunks than its manifests reference"

"$IMGFSCTL" versions "$R" > "$T/versions.out"
[ "$(grep -cE '^os +[123] +20[0-9]{2}-[0-9]{2}-[0-9]{2} ' "$T/versions.out")" = 3 ] ||
    fail "versions does not list os@1..3 with dates: $(cat "$T/versions.out")"
grep -qE '^os +3 .* 8\.0 MiB .*latest$' "$T/versions.out" || fail "os@3 is not shown as the latest 8 MiB version: $(cat "$T/versions.out")"
[ "$("$IMGFSCTL" versions "$R" other | grep -c '^other ')" = 1 ] || fail "versions REPO other lists more than other"
ok "imgfsctl versions lists every version with date, size, chunks, stored and own bytes"

# A host that mounted os@1 before it was retired, and read its first MiB.
mkdir -p "$T/state1" "$T/state2" "$T/state3" "$T/state4"
mount_imgfs "$R" "$T/old" "state=$T/state1" "$T/cache1"
head -c $((1 << 20)) "$T/old/bases/os@1.raw" | cmp - <(head -c $((1 << 20)) "$T/a.img") || fail "os@1 reads wrong"

expect_error "retiring the newest version" "$IMGFSCTL" retire "$R" os@3
expect_error "retire without a version" "$IMGFSCTL" retire "$R" os
expect_error "retire of a hostile name" "$IMGFSCTL" retire "$R" ../os@1
expect_error "gc of an HTTP repository" "$IMGFSCTL" gc http://127.0.0.1:9/repo
expect_error "gc of a directory that is not a repository" "$IMGFSCTL" gc "$T"
expect_error "versions of a base that does not exist" "$IMGFSCTL" versions "$R" nosuch
expect_error "retiring a version that does not exist" "$IMGFSCTL" retire "$R" os@9
"$IMGFSCTL" retire "$R" os@1 > /dev/null || fail "retire os@1 failed"
expect_error "retiring a version twice" "$IMGFSCTL" retire "$R" os@1
[ ! -e "$R/bases/os/1.manifest" ] && [ -e "$R/bases/os/1.retired" ] || fail "retire left the manifest or no marker"
grep -qE '^os +1 +retired' <<<"$("$IMGFSCTL" versions "$R")" || fail "versions does not show os@1 as retired"
ok "retire removes os@1's manifest (the newest, a missing or a retired version is refused)"

mkdir -p "$R/chunks/ab" && echo junk > "$R/chunks/ab/abababababababababababababababab.tmp.4242"
chunk_refs "$R"/bases/*/*.manifest > "$T/refs.after"
comm -23 "$T/files.before" "$T/refs.after" > "$T/expect.removed"
[ -s "$T/expect.removed" ] || fail "the test images give os@1 no chunks of its own"
chunk_files > "$T/files.planted"
"$IMGFSCTL" gc "$R" --dry-run > "$T/dry.out"
chunk_files | same - "$T/files.planted" "gc --dry-run removed something"
"$IMGFSCTL" gc "$R" > "$T/gc.out" || fail "gc failed"
grep -q "^removed $(wc -l < "$T/expect.removed") chunks (.*), 1 temporary files" "$T/gc.out" ||
    fail "gc reports '$(cat "$T/gc.out")', expected $(wc -l < "$T/expect.removed") chunks"
grep -q "^would remove $(wc -l < "$T/expect.removed") chunks" "$T/dry.out" || fail "dry run said: $(cat "$T/dry.out")"
chunk_files | same - "$T/refs.after" "after gc the chunk files are not exactly those the remaining manifests reference"
[ ! -e "$R/chunks/ab/abababababababababababababababab.tmp.4242" ] || fail "gc left a killed publish's temp file"
ok "gc removed exactly the $(wc -l < "$T/expect.removed") chunks only os@1 referenced, and a temp file"

mount_imgfs "$R" "$T/new" "state=$T/state2" "$T/cache2"
[ ! -e "$T/new/bases/os@1.raw" ] || fail "a fresh mount shows the retired os@1"
[ "$(stat_value "$T/new" daemon refresh_error)" = none ] || fail "a retired version is a refresh error"
same "$T/new/bases/os@2.raw" "$T/b.img" "os@2 is damaged after gc"
same "$T/new/bases/os.raw" "$T/c.img" "os@3 is damaged after gc"
same "$T/new/bases/other.raw" "$T/d.img" "other@1 is damaged after gc"
head -c $((1 << 20)) "$T/old/bases/os@1.raw" | cmp - <(head -c $((1 << 20)) "$T/a.img") ||
    fail "the old host no longer serves the part of os@1 it had cached"
! cat "$T/old/bases/os@1.raw" > /dev/null 2>"$T/eio" || fail "the old host served retired chunks it never had"
grep -q 'Input/output error' "$T/eio" || fail "reading gone chunks did not fail with EIO: $(cat "$T/eio")"
umount_imgfs "$T/old"
ok "fresh mounts skip os@1 and the other versions are intact; the old host serves its cache, EIO for the rest"

# ---- 2. gc while a publish is held in its middle -------------------------------
# Its first 2 MiB are all data, so that publish's first batches (1 MiB of
# consecutive chunks each) are all cached and get stored.
head -c $((2 << 20)) /dev/urandom > "$T/big.img"
make_image "$T/big.tail" $((6 << 20))
cat "$T/big.tail" >> "$T/big.img"
"$IMGFSCTL" publish "$T/big.img" "$T/www/src" --name big --chunk-size 64K > /dev/null
nginx_start www "$T/www"
mount_imgfs "${NGINX_URL[www]}/src" "$T/src" "state=$T/state3,timeout=300" "$T/cache3"
head -c $((2 << 20)) "$T/src/bases/big.raw" > /dev/null  # cached: the publish gets this far
nginx_stop www
# os@2 as a retire killed after its marker: the manifest is still there.
printf 'imgfs-retired 1\ntime 0\n' > "$R/bases/os/2.retired"
printf 'imgfs-retired 1\ntime 0\n' > "$R/bases/other/1.retired" # a stray marker on a newest version
before=$(chunk_files | wc -l)
"$IMGFSCTL" publish "$T/src/bases/big.raw" "$R" --name os --chunk-size 64K > "$T/publish.out" 2>&1 &
publisher=$!
for _ in $(seq 1 600); do [ "$(chunk_files | wc -l)" -gt "$before" ] && break; sleep 0.1; done
[ "$(chunk_files | wc -l)" -gt "$before" ] || fail "the publish stored no chunk"
kill -0 "$publisher" 2>/dev/null || fail "the publish ended although its source is unreachable: $(cat "$T/publish.out")"
"$IMGFSCTL" gc "$R" > "$T/gc2.out" 2> "$T/gc2.err" &
collector=$!
for _ in $(seq 1 600); do grep -q waiting "$T/gc2.err" && break; sleep 0.1; done
grep -q 'waiting for a publish to finish' "$T/gc2.err" || fail "gc did not wait for the running publish: $(cat "$T/gc2.err")"
kill -0 "$collector" 2>/dev/null || fail "gc ended while a publish held the repository"
ok "gc waits for a publish that has stored chunks but no manifest yet"
nginx_restart www
wait "$publisher" || fail "the publish failed: $(cat "$T/publish.out")"
wait "$collector" || fail "gc failed after the publish: $(cat "$T/gc2.err")"
grep -q '^published os@4' "$T/publish.out" || fail "the publish made no os@4: $(cat "$T/publish.out")"
[ ! -e "$R/bases/os/2.manifest" ] || fail "gc did not finish the killed retire of os@2"
[ -e "$R/bases/other/1.manifest" ] || fail "gc removed the newest version of other for a stray marker"
chunk_refs "$R"/bases/*/*.manifest | same - <(chunk_files) "after gc the chunks are not exactly the referenced ones"
mount_imgfs "$R" "$T/new2" "state=$T/state4" "$T/cache4"
same "$T/new2/bases/os@4.raw" "$T/big.img" "the version published during gc is damaged"
same "$T/new2/bases/os@3.raw" "$T/c.img" "os@3 is damaged after the second gc"
same "$T/new2/bases/other@1.raw" "$T/d.img" "other@1 is damaged after the second gc"
ok "the concurrent publish is complete and intact; gc finished a killed retire and ignored a stray marker"

# ---- 3. snapshots ------------------------------------------------------------------
M=$T/new2
V=$M/vms
"$IMGFSCTL" vm create "$M" web --base os@3 > /dev/null
printf one | dd of="$V/web.raw" bs=4096 seek=1 conv=notrunc status=none
"$IMGFSCTL" vm snapshot "$M" web s1 > /dev/null
"$IMGFSCTL" vm snapshot "$M" web s2 > /dev/null
"$IMGFSCTL" vm rm "$M" web@s1 > /dev/null || fail "vm rm web@s1 failed"
[ ! -e "$V/web@s1.raw" ] && [ -e "$V/web@s2.raw" ] || fail "vm rm web@s1 did not remove exactly web@s1"
[ "$(stat_value "$M" "vm web" snapshots)" = 1 ] || fail "web still counts $(stat_value "$M" "vm web" snapshots) snapshots"
exec 7<"$V/web@s2.raw"
expect_error "removing an open snapshot" "$IMGFSCTL" vm rm "$M" web@s2
exec 7<&-
wait_stat "$M" "vm web" open 0
rm "$V/web@s2.raw" || fail "rm of the closed snapshot web@s2 failed"
expect_error "removing a snapshot that does not exist" "$IMGFSCTL" vm rm "$M" web@nope
ok "vm rm VM@SNAP and rm remove snapshots; an open one is refused"

"$IMGFSCTL" vm clone "$M" web copy > /dev/null
implicit=$(cd "$V" && ls | grep '^web@clone-copy') || fail "vm clone of a live VM made no implicit snapshot"
expect_error "removing the origin of a clone" "$IMGFSCTL" vm rm "$M" "${implicit%.raw}"
"$IMGFSCTL" vm snapshot "$M" web kept > /dev/null
"$IMGFSCTL" vm rm "$M" copy > /dev/null || fail "vm rm copy failed"
[ ! -e "$V/$implicit" ] || fail "the implicit snapshot $implicit outlived its last clone"
[ -e "$V/web@kept.raw" ] || fail "an explicit snapshot went with the clone"
umount_imgfs "$M"
mount_imgfs "$R" "$M" "state=$T/state4" "$T/cache4"
[ "$(stat_value "$M" vms load_errors)" = none ] || fail "load errors after the snapshot removals"
[ "$(cd "$V" && ls)" = "$(printf 'web.raw\nweb@kept.raw')" ] || fail "after a remount vms/ holds: $(ls "$V")"
same <(head -c 8192 "$V/web.raw" | tail -c 4096 | head -c 3) <(printf one) "web lost its data"
ok "an implicit clone snapshot goes with its last clone (the origin of a clone is refused); it all survives a remount"

umount_imgfs "$M"
umount_imgfs "$T/new"
umount_imgfs "$T/src"
finish
