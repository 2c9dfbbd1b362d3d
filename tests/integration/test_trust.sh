#!/bin/bash
# Signed repositories served by nginx, attacked the way a hostile mirror or
# proxy would:
#  - a signed repository mounts with -o trust= and reads byte-identical;
#  - an unsigned HTTP repository is refused without -o insecure, and with it
#    the mount says so in the log and the stats;
#  - a manifest with two chunk lines swapped and its checksum recomputed is
#    refused and no wrong byte reaches a reader (with -o insecure the same
#    manifest serves the swapped bytes: the check is what stops it);
#  - a chunk replaced on the mirror is refused and fetched from the next one;
#    a chunk that matches its name but not its signed digest (what an xxh3
#    collision would be) fails with EIO and is never cached;
#  - a repository signed by an untrusted key is refused;
#  - an older, validly signed copy of the whole repository does not take a
#    host back, while mounted or across a remount; the refusal is reported;
#  - a manifest mixed in from another signed state is refused;
#  - key rotation: re-signing with a new key keeps hosts that trust both;
#  - imgfsctl sign converts an unsigned repository without changing a chunk
#    or manifest, and a VM made before keeps working;
#  - max_index_age reports a frozen index.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
CS=131072
mkdir -p "$T/state" "$T/vstate" "$T/mnt2" "$T/cache" "$T"/c{2..16}
# tmount REPO MNT OPTIONS [CACHE]: mount_imgfs with this test's own state.
tmount() { mount_imgfs "$1" "$2" "state=$T/state,$3" "${4:-$T/cache}"; }
SIZE=$((4 * 1048576 + 777))
# Raw chunks (level 0), all different: a swapped or replaced chunk would be
# served as it is if nothing checked it.
head -c $SIZE /dev/urandom > "$T/img.raw"
head -c $SIZE /dev/urandom > "$T/img2.raw"
"$IMGFSCTL" key generate "$T/k1" > /dev/null
"$IMGFSCTL" key generate "$T/k2" > /dev/null
"$IMGFSCTL" key generate "$T/other" > /dev/null
[ "$(stat -c %a "$T/k1")" = 600 ] || fail "secret key is not mode 0600"
expect_error "key generate over an existing key" "$IMGFSCTL" key generate "$T/k1"
chmod 644 "$T/k1"
expect_error "publish with a key others can read" "$IMGFSCTL" publish "$T/img.raw" "$T/nowhere" --name x --key "$T/k1"
chmod 600 "$T/k1"

REPO=$T/www/repo
mkdir -p "$T/www"
"$IMGFSCTL" publish "$T/img.raw" "$REPO" --name x --level 0 --key "$T/k1" > /dev/null
grep -q '^+sig ' "$REPO/index" || fail "the index is not signed"
nginx_start www "$T/www"
URL=${NGINX_URL[www]}/repo
cp "$T/k1.pub" "$T/trust1"
cat "$T/k1.pub" "$T/k2.pub" > "$T/trust12"
cp "$T/k2.pub" "$T/trust2"

chunk_line() { # MANIFEST INDEX: the hash line of chunk INDEX
    awk -v i="$2" '/^chunks / { go = 1; n = 0; next } go { if (n == i) { print $1; exit } n++ }' "$1"
}
src_chunk() { dd if="$1" bs=$CS skip="$2" count=1 status=none; }
read_chunk() { dd if="$1" of="$3" bs=$CS skip="$2" count=1 iflag=direct status=none; }

# --- a signed repository over HTTP ---------------------------------------------
tmount "$URL" "$M" "trust=$T/trust1"
cmp "$M/bases/x.raw" "$T/img.raw" || fail "signed repository over HTTP does not read byte-identical"
[ "$(stat_value "$M" trust mode)" = signed ] || fail "stats do not say the mount is signed"
[ "$(stat_value "$M" trust index_sequence)" = 1 ] || fail "index sequence is not 1"
[ "$(stat_value "$M" trust chunk_digests)" -eq 33 ] || fail "not every chunk has its digest in the table"
umount_imgfs "$M"
ok "signed repository mounts with -o trust= and reads byte-identical (33 chunk digests)"

# --- unsigned HTTP ----------------------------------------------------------------
mkdir -p "$T/plain"
"$IMGFSCTL" publish "$T/img.raw" "$T/plain/repo" --name x --level 0 > /dev/null
nginx_start plain "$T/plain"
PLAIN=${NGINX_URL[plain]}/repo
mkdir -p "$T/mnt2"
expect_error "unsigned HTTP repository without trust= or insecure" "$IMGFS" "$PLAIN" "$T/mnt2" -f -o "cache=$T/c2,state=$T/state"
expect_error "unsigned HTTP repository with trust=" "$IMGFS" "$PLAIN" "$T/mnt2" -f -o "cache=$T/c2,state=$T/state,trust=$T/trust1"
tmount "$PLAIN" "$M" "insecure" "$T/c3"
[ "$(stat_value "$M" trust mode)" = insecure ] || fail "stats do not say insecure"
grep -q 'insecure' "${DAEMON_LOG[$M]}" || fail "the log does not say the mount is insecure"
cmp "$M/bases/x.raw" "$T/img.raw" || fail "insecure mount does not read right"
umount_imgfs "$M"
ok "unsigned HTTP is refused without -o insecure; with it the log and stats say so"

# --- swapped manifest lines with a recomputed checksum ------------------------------
swap_manifest() { # MANIFEST: swaps chunk lines 0 and 1 and recomputes the end line
    python3 - "$1" <<'PY'
import subprocess, sys
p = sys.argv[1]
lines = open(p, "rb").read().split(b"\n")[:-1]
start = next(i for i, l in enumerate(lines) if l.startswith(b"chunks ")) + 1
lines[start], lines[start + 1] = lines[start + 1], lines[start]
body = b"\n".join(lines[:-1]) + b"\n"
digest = subprocess.run(["xxh128sum", "-"], input=body, capture_output=True, check=True).stdout.split()[0]
open(p, "wb").write(body + b"end " + digest + b"\n")
PY
}
rm -rf "$T/evil" && cp -a "$T/www" "$T/evil"
swap_manifest "$T/evil/repo/bases/x/1.manifest"
cp -a "$T/plain" "$T/evilplain"
swap_manifest "$T/evilplain/repo/bases/x/1.manifest"
nginx_start evil "$T/evil"
nginx_start evilplain "$T/evilplain"
# The attack works on an unverified mount: that is what the check must stop.
tmount "${NGINX_URL[evilplain]}/repo" "$M" "insecure" "$T/c4"
read_chunk "$M/bases/x@1.raw" 0 "$T/got"
cmp -s "$T/got" <(src_chunk "$T/img.raw" 1) || fail "the swapped manifest did not swap bytes; the test proves nothing"
umount_imgfs "$M"
tmount "${NGINX_URL[evil]}/repo" "$M" "trust=$T/trust1" "$T/c5"
[ ! -e "$M/bases/x@1.raw" ] || fail "a manifest with swapped chunk lines was accepted"
grep -q 'refused manifest x@1' "${DAEMON_LOG[$M]}" || fail "the refusal of the swapped manifest is not logged"
[ "$(stat_value "$M" trust index_refusals)" -ge 1 ] || fail "the refusal is not counted"
[ -z "$(cache_index "$T/c5")" ] || fail "chunks were fetched for a refused manifest"
umount_imgfs "$M"
ok "swapped chunk lines with a recomputed checksum: refused, no byte served (insecure would serve them)"

# --- a chunk replaced on a mirror -------------------------------------------------------
H0=$(chunk_line "$REPO/bases/x/1.manifest" 0)
H1=$(chunk_line "$REPO/bases/x/1.manifest" 1)
rm -rf "$T/bad" && cp -a "$T/www" "$T/bad"
cp "$T/bad/repo/chunks/${H1:0:2}/$H1" "$T/bad/repo/chunks/${H0:0:2}/$H0"
nginx_start bad "$T/bad"
tmount "${NGINX_URL[bad]}/repo" "$M" "trust=$T/trust1,mirror=$URL,timeout=5" "$T/c6"
read_chunk "$M/bases/x.raw" 0 "$T/got" || fail "the replaced chunk was not fetched from the next mirror"
cmp "$T/got" <(src_chunk "$T/img.raw" 0) || fail "the replaced chunk: wrong bytes served"
[ "$(nginx_requests bad "/repo/chunks/${H0:0:2}/$H0")" -ge 1 ] || fail "the bad mirror was never asked"
[ "$(stat_value "$M" fetch verify_failures)" -ge 1 ] || fail "the replaced chunk was not counted as a verify failure"
cmp <(cache_chunk "$T/c6" "$H0") <(src_chunk "$T/img.raw" 0) || fail "the cache holds the replaced chunk"
umount_imgfs "$M"
ok "a chunk replaced on the first mirror is refused and fetched from the next mirror"

# What an xxh3 collision would be: the chunk matches its name, not its signed
# digest. Made by editing the record and re-signing, as only a key holder can.
rm -rf "$T/coll" && cp -a "$T/www" "$T/coll"
python3 - "$T/coll/repo/bases/x/1.digests" <<'PY'
import sys
p = sys.argv[1]
lines = open(p).read().split("\n")
start = next(i for i, l in enumerate(lines) if l.startswith("chunks ")) + 1
lines[start + 2] = "ab" * 32
open(p, "w").write("\n".join(lines))
PY
"$IMGFSCTL" sign "$T/coll/repo" --key "$T/k1" > /dev/null
nginx_start coll "$T/coll"
tmount "${NGINX_URL[coll]}/repo" "$M" "trust=$T/trust1,timeout=3" "$T/c7"
H2=$(chunk_line "$REPO/bases/x/1.manifest" 2)
if read_chunk "$M/bases/x.raw" 2 "$T/got" 2> "$T/err"; then fail "a chunk failing its signed digest was served"; fi
grep -q 'Input/output error' "$T/err" || fail "not EIO for a chunk failing its digest"
[ "$(stat_value "$M" trust chunks_refused)" -ge 1 ] || fail "chunks_refused not counted"
! cache_locate "$T/c7" "$H2" > /dev/null || fail "a chunk failing its digest entered the cache"
grep -q 'signed digest' "${DAEMON_LOG[$M]}" || fail "the log does not name the signed digest"
read_chunk "$M/bases/x.raw" 3 "$T/got" && cmp "$T/got" <(src_chunk "$T/img.raw" 3) || fail "other chunks broke"
umount_imgfs "$M"
ok "a chunk that matches its xxh3 name but not its signed digest: EIO, not cached, counted"

# --- untrusted key ------------------------------------------------------------------------
cp "$T/other.pub" "$T/trust_other"
expect_error "a repository signed by an untrusted key" "$IMGFS" "$URL" "$T/mnt2" -f -o "cache=$T/c8,state=$T/state,trust=$T/trust_other"
mkdir -p "$T/c9"
"$IMGFS" "$URL" "$T/mnt2" -f -o "cache=$T/c9,state=$T/state,trust=$T/trust_other" 2> "$T/err" && fail "untrusted key mounted"
grep -q 'not in the trust file' "$T/err" || { cat "$T/err"; fail "the refusal does not name the untrusted key"; }
ok "a repository signed by an untrusted key is refused"

# --- rollback and freeze -------------------------------------------------------------------
cp -a "$T/www" "$T/old"        # the whole repository at sequence 1, validly signed
"$IMGFSCTL" publish "$T/img2.raw" "$REPO" --name x --level 0 --key "$T/k1" > /dev/null
tmount "$URL" "$M" "trust=$T/trust1,refresh=1" "$T/c10"
cmp "$M/bases/x@2.raw" "$T/img2.raw" || fail "x@2 does not read right"
[ "$(stat_value "$M" trust index_sequence)" = 2 ] || fail "index sequence is not 2"
# Serve the old copy in place of the repository.
mv "$T/www" "$T/new" && mv "$T/old" "$T/www"
wait_stat "$M" trust index_refusals 1
[ "$(readlink "$M/bases/x.raw")" = "x@2.raw" ] || fail "the host went back to x@1"
cmp "$M/bases/x@2.raw" "$T/img2.raw" || fail "x@2 no longer reads after the rollback attempt"
umount_imgfs "$M"
tmount "$URL" "$M" "trust=$T/trust1" "$T/c10"
[ "$(readlink "$M/bases/x.raw")" = "x@2.raw" ] || fail "after a remount the host went back to x@1"
[ "$(stat_value "$M" trust index_sequence)" = 2 ] || fail "after a remount the accepted sequence is not 2"
[ "$(stat_value "$M" trust index_refusals)" -ge 1 ] || fail "the refused old index is not reported after a remount"
grep -q 'sequence number 1, but this host already accepted 2' "${DAEMON_LOG[$M]}" || fail "the log does not explain"
cmp "$M/bases/x@2.raw" "$T/img2.raw" || fail "x@2 does not read after the remount"
umount_imgfs "$M"
mv "$T/www" "$T/old" && mv "$T/new" "$T/www"
ok "an older, validly signed copy of the repository takes the host back neither mounted nor remounted"

# Mix and match: x@1 from another signed state (a repository made again).
rm -rf "$T/other_state"
"$IMGFSCTL" publish "$T/img2.raw" "$T/other_state" --name x --level 0 --key "$T/k1" > /dev/null
rm -rf "$T/mix" && cp -a "$T/www" "$T/mix"
cp "$T/other_state/bases/x/1.manifest" "$T/other_state/bases/x/1.digests" "$T/mix/repo/bases/x/"
cp -an "$T/other_state/chunks/." "$T/mix/repo/chunks/"
nginx_start mix "$T/mix"
tmount "${NGINX_URL[mix]}/repo" "$M" "trust=$T/trust1" "$T/c11"
[ ! -e "$M/bases/x@1.raw" ] || fail "a version mixed in from another signed state was accepted"
cmp "$M/bases/x@2.raw" "$T/img2.raw" || fail "x@2 of the mixed repository does not read"
umount_imgfs "$M"
ok "a manifest mixed in from another signed state is refused; the rest serves"

# Freeze: the index is older than max_index_age.
signed_at=$(awk '/^\+time / { print $2 }' "$REPO/index")
while [ "$(date +%s)" -le $((signed_at + 1)) ]; do sleep 0.2; done
tmount "$URL" "$M" "trust=$T/trust1,max_index_age=1" "$T/c12"
[ "$(stat_value "$M" trust index_stale)" = yes ] || fail "a stale index is not reported"
grep -q 'max_index_age' "${DAEMON_LOG[$M]}" || fail "a stale index is not logged"
umount_imgfs "$M"
ok "an index older than max_index_age is reported in the stats and the log"

# --- key rotation ---------------------------------------------------------------------------
tmount "$URL" "$M" "trust=$T/trust12,refresh=1" "$T/c13"
"$IMGFSCTL" sign "$REPO" --key "$T/k2" > /dev/null           # the new key only
wait_stat "$M" trust index_sequence 3
"$IMGFSCTL" publish "$T/img.raw" "$REPO" --name x --level 0 --key "$T/k2" > /dev/null
wait_stat "$M" trust index_sequence 4
wait_for "x@3 (signed by the new key) never appeared" '[ -e "$M/bases/x@3.raw" ]'
cmp "$M/bases/x@3.raw" "$T/img.raw" || fail "x@3 (signed by the new key) does not read"
[ "$(stat_value "$M" trust index_refusals)" = 0 ] || fail "a host trusting both keys refused something"
umount_imgfs "$M"
expect_error "a host that trusts only the old key, after rotation" \
    "$IMGFS" "$URL" "$T/mnt2" -f -o "cache=$T/c14,state=$T/state,trust=$T/trust1"
"$IMGFSCTL" sign "$REPO" --key "$T/k1" --key "$T/k2" > /dev/null  # both, for the transition
for tf in trust1 trust2 trust12; do
    tmount "$URL" "$M" "trust=$T/$tf" "$T/c15.$tf"
    cmp "$M/bases/x@3.raw" "$T/img.raw" || fail "signed by both keys: $tf host does not read"
    umount_imgfs "$M"
done
ok "key rotation: a host trusting old and new follows a re-sign; signing with both serves every host"

# --- imgfsctl sign converts an existing repository; a VM made before keeps working --------
LOCAL=$T/local
"$IMGFSCTL" publish "$T/img.raw" "$LOCAL" --name v --level 0 > /dev/null
"$IMGFSCTL" publish "$T/img2.raw" "$LOCAL" --name v --level 0 > /dev/null
mount_imgfs "$LOCAL" "$M" "state=$T/vstate" "$T/c16"
"$IMGFSCTL" vm create "$M" web --base v@1 > /dev/null
put 4096 65536 7 "$M/vms/web.raw"
cp "$T/img.raw" "$T/web.expect" && put 4096 65536 7 "$T/web.expect"
sync
umount_imgfs "$M"
before=$(cd "$LOCAL" && find bases chunks -type f | sort | xargs sha256sum | sha256sum)
"$IMGFSCTL" sign "$LOCAL" --key "$T/k1" > "$T/sign.out"
grep -q 'signed .*2 versions' "$T/sign.out" || { cat "$T/sign.out"; fail "sign does not report the versions"; }
after=$(cd "$LOCAL" && find bases chunks -type f ! -name '*.digests' | sort | xargs sha256sum | sha256sum)
[ "$before" = "$after" ] || fail "imgfsctl sign changed a chunk or a manifest"
mount_imgfs "$LOCAL" "$M" "state=$T/vstate,trust=$T/trust1" "$T/c16"
[ "$(stat_value "$M" trust mode)" = signed ] || fail "the converted local repository is not verified"
cmp "$M/vms/web.raw" "$T/web.expect" || fail "the VM made before signing does not read right"
cmp "$M/bases/v@2.raw" "$T/img2.raw" || fail "v@2 of the converted repository does not read"
umount_imgfs "$M"
ok "imgfsctl sign converts a repository without changing a chunk or manifest; the VM made before works"

# --- lists: signed by list publish --key; an unsigned one is refused -----------------------
body=$(printf 'imgfs-list 1\nbase v 1 %s\nchunk-size 131072\nchunks 2\n0\n1\n' "$(xxh128sum < "$LOCAL/bases/v/1.manifest" | cut -d' ' -f1)")
printf '%s\n' "$body" > "$T/body"
printf '%s\nend %s\n' "$body" "$(xxh128sum < "$T/body" | cut -d' ' -f1)" > "$T/boot.list"
expect_error "an unsigned list publish into a signed repository" "$IMGFSCTL" list publish "$LOCAL" v@1 boot "$T/boot.list"
"$IMGFSCTL" list publish "$LOCAL" v@1 boot "$T/boot.list" --key "$T/k1" > /dev/null || fail "list publish --key failed"
grep -q '^+sig ' "$LOCAL/bases/v/1.lists/boot" || fail "the list is not signed"
mount_imgfs "$LOCAL" "$M" "state=$T/vstate,trust=$T/trust1" "$T/c16"
"$IMGFSCTL" precopy "$M" v@1 --list boot > /dev/null || fail "a signed list is not accepted"
sed -i '$d' "$LOCAL/bases/v/1.lists/boot"   # drop the signature line
expect_error "precopy with an unsigned list on a signed mount" "$IMGFSCTL" precopy "$M" v@1 --list boot
umount_imgfs "$M"
ok "lists: list publish --key signs them, a signed mount refuses an unsigned one"
finish
