#!/bin/bash
# Chunk digests across the record versions: a repository signed before
# SHA-256 came in (its record is "imgfs-digests 1", BLAKE2b-256 chunk
# digests; checked in under data/trust-v1, made by the imgfsctl of that time
# with data/trust-v1/make-image.sh and the fixture's own signing.key) and
# served by nginx:
#  - it still mounts with -o trust= and reads byte-identical;
#  - publishing on top of it with --key writes a version 2 record (SHA-256)
#    that chains to the old one, leaves the old record as it is, and the host
#    that accepted the old index takes the new one (no history rewrite);
#  - both versions read right, also the chunk their records share (signed
#    under both algorithms);
#  - a chunk swapped on the mirror is refused under either algorithm, by its
#    signed digest, and fetched from the next mirror; the cache holds only the
#    right bytes;
#  - re-signing the mixed repository changes neither record.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

DATA=$(dirname "$0")/data/trust-v1
M=$T/mnt
CS=65536
mkdir -p "$T/www" "$T/state"
tmount() { mount_imgfs "$1" "$2" "state=$T/state,$3" "${4:-$T/cache}"; }
cp -r "$DATA/repo" "$T/www/repo"
REPO=$T/www/repo
cp "$DATA/signing.key" "$T/key" && chmod 600 "$T/key" # git keeps no 0600
cp "$DATA/signing.key.pub" "$T/trust"
bash "$DATA/make-image.sh" "$T/v1.raw"
bash "$DATA/make-image.sh" "$T/v2.raw" 2
chunk_line() { # MANIFEST INDEX: the hash line of chunk INDEX
    awk -v i="$2" '/^chunks / { go = 1; n = 0; next } go { if (n == i) { print $1; exit } n++ }' "$1"
}
chunk_file() { echo "chunks/${1:0:2}/$1"; }
src_chunk() { dd if="$1" bs=$CS skip="$2" count=1 status=none; }
read_chunk() { dd if="$1" of="$3" bs=$CS skip="$2" count=1 iflag=direct status=none; }

[ "$(head -n 1 "$REPO/bases/x/1.digests")" = "imgfs-digests 1" ] || fail "the fixture is not a version 1 record"
grep -q chunk-digest "$REPO/bases/x/1.digests" && fail "the fixture names an algorithm"
nginx_start www "$T/www"
URL=${NGINX_URL[www]}/repo

# --- the old repository as it was signed --------------------------------------------
tmount "$URL" "$M" "trust=$T/trust"
same "$M/bases/x.raw" "$T/v1.raw" "the version 1 repository does not read byte-identical"
[ "$(stat_value "$M" trust mode)" = signed ] || fail "the mount is not signed"
[ "$(stat_value "$M" trust chunk_digests)" = 3 ] || fail "not every chunk of the old record has its digest"
[ "$(stat_value "$M" trust chunks_refused)" = 0 ] || fail "a right chunk was refused"
umount_imgfs "$M"
ok "a repository signed with BLAKE2b chunk digests (record version 1) mounts and reads byte-identical"

# --- a new version on top of it -----------------------------------------------------
cp "$REPO/bases/x/1.digests" "$T/1.digests.before"
"$IMGFSCTL" publish "$T/v2.raw" "$REPO" --name x --chunk-size 64K --key "$T/key" > /dev/null
cmp -s "$REPO/bases/x/1.digests" "$T/1.digests.before" || fail "publishing rewrote the old record"
[ "$(head -n 1 "$REPO/bases/x/2.digests")" = "imgfs-digests 2" ] || fail "the new record is not version 2"
grep -qx 'chunk-digest sha256' "$REPO/bases/x/2.digests" || fail "the new record does not name sha256"
S0=$(chunk_line "$REPO/bases/x/2.manifest" 0)
[ "$S0" = "$(chunk_line "$REPO/bases/x/1.manifest" 0)" ] || fail "chunk 0 should be shared by both versions"
[ "$(python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())' < <(src_chunk "$T/v2.raw" 1))" = \
    "$(awk '/^chunks / { go = 1; n = 0; next } go { if (n == 1) { print $1; exit } n++ }' "$REPO/bases/x/2.digests")" ] ||
    fail "the new record's digest of chunk 1 is not its SHA-256"
ok "publish --key on it writes a version 2 record (SHA-256) and leaves the old record as it is"

# The same host (cache and trust state kept) moves on to the new index.
tmount "$URL" "$M" "trust=$T/trust"
[ "$(stat_value "$M" trust index_sequence)" = 2 ] || fail "the host did not take the new index"
same "$M/bases/x@1.raw" "$T/v1.raw" "version 1 does not read right next to version 2"
same "$M/bases/x@2.raw" "$T/v2.raw" "version 2 does not read right"
[ "$(stat_value "$M" trust chunk_digests)" = 6 ] || fail "digests of both records are not in the tables"
[ "$(stat_value "$M" trust chunks_refused)" = 0 ] || fail "a right chunk was refused"
umount_imgfs "$M"
ok "the host that accepted the old index takes the new one; both versions read byte-identical"

# --- chunks swapped on a mirror, one under each algorithm ---------------------------------
B1=$(chunk_line "$REPO/bases/x/1.manifest" 1) # in the old record only: BLAKE2b
S1=$(chunk_line "$REPO/bases/x/2.manifest" 1) # in the new record only: SHA-256
S3=$(chunk_line "$REPO/bases/x/2.manifest" 3)
rm -rf "$T/bad" && cp -a "$T/www" "$T/bad"
cp "$T/bad/repo/$(chunk_file "$S3")" "$T/bad/repo/$(chunk_file "$B1")"
cp "$T/bad/repo/$(chunk_file "$S3")" "$T/bad/repo/$(chunk_file "$S1")"
cp "$T/bad/repo/$(chunk_file "$S3")" "$T/bad/repo/$(chunk_file "$S0")"
nginx_start bad "$T/bad"
# One mount per chunk: after a refusal the mount turns to the next mirror.
n=0
for c in "x@1.raw 1 v1 $B1" "x@2.raw 1 v2 $S1" "x@2.raw 0 v2 $S0"; do
    set -- $c
    n=$((n + 1))
    tmount "${NGINX_URL[bad]}/repo" "$M" "trust=$T/trust,mirror=$URL,timeout=10" "$T/c$n"
    read_chunk "$M/bases/$1" "$2" "$T/got" || fail "swapped chunk $2 of $1 was not fetched from the next mirror"
    cmp "$T/got" <(src_chunk "$T/$3.raw" "$2") || fail "swapped chunk $2 of $1: wrong bytes served"
    [ "$(nginx_requests bad "/repo/$(chunk_file "$4")")" -ge 1 ] || fail "the bad mirror was never asked for $4"
    cmp <(cache_chunk "$T/c$n" "$4") <(src_chunk "$T/$3.raw" "$2") || fail "the cache holds a swapped chunk"
    [ "$(stat_value "$M" trust chunks_refused)" = 1 ] || fail "swapped chunk $2 of $1 was not refused by its digest"
    [ "$(stat_value "$M" fetch verify_failures)" = 1 ] || fail "swapped chunk $2 of $1 was not counted"
    grep -q 'failed verification against its signed digest' "${DAEMON_LOG[$M]}" ||
        fail "the log does not say the signed digest refused chunk $2 of $1"
    same "$M/bases/${1%.raw}.raw" "$T/$3.raw" "$1 after the swap"
    umount_imgfs "$M"
done
ok "chunks swapped on the mirror are refused by their BLAKE2b, SHA-256 or both digests and fetched from the next mirror"

# --- re-signing changes no record ---------------------------------------------------------
cp "$REPO/bases/x/2.digests" "$T/2.digests.before"
"$IMGFSCTL" sign "$REPO" --key "$T/key" > /dev/null
cmp -s "$REPO/bases/x/1.digests" "$T/1.digests.before" && cmp -s "$REPO/bases/x/2.digests" "$T/2.digests.before" ||
    fail "imgfsctl sign rewrote a record"
tmount "$URL" "$M" "trust=$T/trust"
[ "$(stat_value "$M" trust index_sequence)" = 3 ] || fail "the re-signed index was not taken"
same "$M/bases/x@1.raw" "$T/v1.raw" "version 1 after re-signing"
umount_imgfs "$M"
ok "imgfsctl sign on the mixed repository keeps both records; the host takes the re-signed index"
finish
