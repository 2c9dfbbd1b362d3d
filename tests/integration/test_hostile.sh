#!/bin/bash
# A hostile repository or a hostile local user cannot wedge a host or read
# what is not theirs:
#  - an index claiming version 18446744073709551615: refused at mount with a
#    clear error; appearing while mounted, the mount keeps answering (ls,
#    stats, reads) and unmount completes;
#  - an index claiming 3000 versions of which one exists: the missing ones
#    are not fetched again on every refresh;
#  - absurd sizes are refused before anything is allocated: a qcow2 claiming
#    1 PiB, vm create --size 1P.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
mkdir -p "$T/state" "$T/www" "$T/cache"
SIZE=$((2 * 1048576))
head -c $SIZE /dev/urandom > "$T/img.raw"
REPO=$T/www/repo
"$IMGFSCTL" publish "$T/img.raw" "$REPO" --name x > /dev/null
cp "$REPO/index" "$T/index.good"

# --- the huge latest ---------------------------------------------------------------
printf 'imgfs-index 1\nx 18446744073709551615\n' > "$REPO/index"
mkdir -p "$T/mnt2"
expect_error "mount of an index claiming version 2^64-1" \
    "$IMGFS" "$REPO" "$T/mnt2" -f -o "cache=$T/cache,state=$T/state"
cp "$T/index.good" "$REPO/index"
mount_imgfs "$REPO" "$M" "state=$T/state,refresh=1"
printf 'imgfs-index 1\nx 18446744073709551615\n' > "$REPO/index"
wait_for "the hostile index is not reported" 'grep -q "refresh_error .*malformed" "$M/.imgfs/stats"'
bounded 60 ls "$M/bases" > /dev/null || fail "ls bases hangs after a hostile index"
bounded 60 ls "$M/bases/nosuch.raw" 2> /dev/null && fail "a lookup of a missing name succeeded"
bounded 60 cmp "$M/bases/x@1.raw" "$T/img.raw" || fail "x@1 does not read after a hostile index"
umount_imgfs "$M"
ok "the huge latest: refused at mount; while mounted the mount answers and unmount completes"

# --- 3000 claimed versions, one real ---------------------------------------------------
cp "$T/index.good" "$REPO/index"
printf 'imgfs-index 1\nx 3000\n' > "$REPO/index"
nginx_start www "$T/www"
URL=${NGINX_URL[www]}/repo
mount_imgfs "$URL" "$M" "state=$T/state,refresh=0.2" "$T/c2"
[ -e "$M/bases/x@1.raw" ] || fail "x@1 is not shown"
# After the first refresh (x@1 and a run of TREE_MAX_MISSING_RUN missing
# versions), ten more refreshes must not ask for any manifest again.
# Index requests 1 and 2 are the set-up of the supervisor's and the server's
# trees (each reads manifests right after); from the fourth on they are the
# server's refreshes, which come after all of that.
wait_for "the server's trees were not set up" '[ "$(nginx_requests www /repo/index)" -ge 4 ]'
first=$(nginx_requests www /repo/bases/x/)
index0=$(nginx_requests www /repo/index)
wait_for "fewer than 10 refreshes" '[ "$(nginx_requests www /repo/index)" -ge $((index0 + 10)) ]'
manifests=$(($(nginx_requests www /repo/bases/x/) - first))
[ "$first" -le 20 ] || fail "$first manifest requests for one refresh of an index claiming 3000 versions"
[ "$manifests" -eq 0 ] || fail "$manifests manifest requests over 10 more refreshes: missing versions are re-fetched"
bounded 60 cmp "$M/bases/x.raw" "$T/img.raw" 2>/dev/null || bounded 60 cmp "$M/bases/x@1.raw" "$T/img.raw" ||
    fail "x@1 does not read"
umount_imgfs "$M"
ok "an index claiming 3000 versions: $first manifest requests at mount, none over the next 10 refreshes"

# --- absurd sizes ---------------------------------------------------------------------------
qemu-img create -q -f qcow2 "$T/huge.qcow2" 1P
start=$(date +%s)
expect_error "publish of a qcow2 claiming 1 PiB" "$IMGFSCTL" publish "$T/huge.qcow2" "$T/repo2" --name h
grep -q 'with --chunk-size 16M' "$T"/stderr.* || fail "the 1 PiB refusal does not say what to do"
expect_error "publish of a qcow2 claiming 1 PiB with 16M chunks" \
    "$IMGFSCTL" publish "$T/huge.qcow2" "$T/repo2" --name h --chunk-size 16M
cp "$T/index.good" "$REPO/index"
mount_imgfs "$REPO" "$M" "state=$T/state" "$T/c3"
expect_error "vm create --size 1P" "$IMGFSCTL" vm create "$M" big --size 1P
"$IMGFSCTL" vm create "$M" ok --size 1G > /dev/null || fail "vm create --size 1G failed"
umount_imgfs "$M"
ok "absurd sizes are refused before allocation (qcow2 of 1 PiB, vm create --size 1P)"
finish
