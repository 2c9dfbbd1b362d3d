#!/bin/bash
# The HTTP repository misbehaves; imgfs never hangs and never serves wrong
# bytes:
#  - nginx stops mid-way: cached ranges keep reading, an uncached read fails
#    with EIO after the timeout, and works again once nginx is back, without a
#    remount. While a read is stuck on a mirror that accepts connections and
#    never answers, ls, the stats file and cached reads still answer.
#  - a mirror serving a corrupted or truncated chunk file, answering 500, or
#    cutting bodies short: a good second mirror serves the data, and errors
#    and retries are counted; with only the bad mirror, reads fail with EIO.
#  - an unreachable repository at mount time is a clear error; with -o offline
#    and a filled cache the mount serves what is cached.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
CS=131072
MiB=1048576
# 16 MiB of random data plus a short tail: every chunk stored, all different,
# raw (level 0) so that a flipped payload byte would be served as is if
# imgfs did not verify.
SIZE=$((16 * MiB + 12345))
head -c $SIZE /dev/urandom > "$T/img.raw"
mkdir -p "$T/www1"
"$IMGFSCTL" publish "$T/img.raw" "$T/www1/repo" --name x --level 0 > /dev/null
cp -a "$T/www1" "$T/www2"
MANIFEST=$T/www1/repo/bases/x/1.manifest

chunk_hash() { # INDEX: the hash of chunk INDEX of x@1
    awk -v i="$1" '/^chunks / { go = 1; n = 0; next } go { if (n == i) { print $1; exit } n++ }' "$MANIFEST"
}
chunk_file() { # ROOT INDEX: the stored file of chunk INDEX under ROOT
    local h
    h=$(chunk_hash "$2")
    echo "$1/repo/chunks/${h:0:2}/$h"
}
src_chunk() { dd if="$T/img.raw" bs=$CS skip="$1" count=1 status=none; }
# read_chunk MNT INDEX OUT: reads one chunk with O_DIRECT, so it reaches imgfs
read_chunk() { dd if="$1/bases/x.raw" of="$3" bs=$CS skip="$2" count=1 iflag=direct status=none; }
fresh_cache() { rm -rf "$T/cache"; }
# read_chunk_eventually MNT INDEX OUT: a read of chunk INDEX that must work,
# on a mount whose deadline is short (to keep the EIO checks short): a read
# that a loaded machine let run past the deadline is tried again, so the
# check is that the mount serves it, not how fast.
read_chunk_eventually() {
    local mnt=$1 idx=$2 out=$3
    wait_for "chunk $idx of $mnt never read" 'bounded $HANG_SECONDS dd if="$mnt/bases/x.raw" of="$out" bs=$CS skip="$idx" count=1 iflag=direct status=none 2> "$T/eventually.err"'
}
# A failed "never hang" check is recorded and the test goes on, so that one
# product bug does not hide the others; the test still fails at the end.
DEFERRED=()
defer_fail() { echo "not ok - $*" >&2; DEFERRED+=("$*"); }

# HANG_SECONDS: the bound on a read that must end (with EIO at its deadline
# or with its bytes). It only catches a real hang, so it is generous for a
# loaded machine; no check here depends on how fast the machine is.
HANG_SECONDS=120
# expect_eio WHAT MNT INDEX: a read of chunk INDEX fails with EIO (within
# HANG_SECONDS) and nothing is returned.
expect_eio() {
    local what=$1 mnt=$2 idx=$3 start status=0
    start=$(date +%s.%N)
    bounded $HANG_SECONDS dd if="$mnt/bases/x.raw" of="$T/eio.out" bs=$CS skip="$idx" count=1 iflag=direct status=none \
        2> "$T/eio.err" || status=$?
    local took
    took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    [ $status -ne 124 ] || fail "$what: the read hung for $HANG_SECONDS s"
    [ $status -ne 0 ] || fail "$what: the read succeeded"
    grep -q 'Input/output error' "$T/eio.err" || { cat "$T/eio.err"; fail "$what: not EIO"; }
    [ ! -s "$T/eio.out" ] || fail "$what: the failed read still returned bytes"
    ok "$what: EIO after $took s"
}

nginx_start www1 "$T/www1"
URL1=${NGINX_URL[www1]}/repo

# === 1. nginx stops and starts again =========================================
# The first half is cached on a mount whose deadline a slow machine cannot
# miss; the mount that then loses nginx has a short one (timeout=3), so its
# EIO comes soon.
mount_imgfs "$URL1" "$M" "timeout=600"
dd if="$M/bases/x.raw" of="$T/half" bs=$MiB count=8 status=none
cmp "$T/half" <(head -c $((8 * MiB)) "$T/img.raw") || fail "first half differs"
umount_imgfs "$M"
mount_imgfs "$URL1" "$M" "timeout=3"
nginx_stop www1
# A cached read that waited for the repository would fail at the deadline.
bounded $HANG_SECONDS dd if="$M/bases/x.raw" of="$T/half2" bs=$MiB count=8 iflag=direct status=none ||
    fail "cached first half did not read with nginx down"
cmp "$T/half" "$T/half2" || fail "cached first half differs with nginx down"
ok "cached half reads with nginx stopped"
expect_eio "uncached chunk with nginx stopped (timeout=3)" "$M" 100
[ "$(stat_value "$M" fetch errors)" -ge 1 ] || fail "fetch errors not counted"
[ "$(stat_value "$M" "base x@1" read_errors)" -ge 1 ] || fail "base read_errors not counted"
[ "$(stat_value "$M" "mirror 0" errors)" -ge 1 ] || fail "mirror 0 errors not counted"
grep -A8 '^\[fetch\]' "$M/.imgfs/stats" | grep -q '^last_error  *chunk ' ||
    fail "[fetch] last_error does not name the chunk: $(grep -A8 '^\[fetch\]' "$M/.imgfs/stats")"
ok "errors counted: fetch $(stat_value "$M" fetch errors), mirror 0 $(stat_value "$M" "mirror 0" errors)"
nginx_restart www1
read_chunk_eventually "$M" 100 "$T/c100"
cmp "$T/c100" <(src_chunk 100) || fail "chunk 100 is wrong after nginx came back"
ok "after nginx restarts the uncached chunk reads, without a remount"
umount_imgfs "$M"

# --- a read stuck on a mirror that never answers ------------------------------
# nginx is down and mirror 1 accepts connections and never answers. The read
# deadline and stall_timeout (3600 s) are beyond the test, so the read below
# waits on that mirror until the test ends it, and with refresh=1 the index
# refresher is stuck on it too. Meanwhile ls, the stats file and cached reads
# must each answer: one that waited for a lock held across that network I/O
# would wait for an hour, so the 60 s bound on each only catches that, and
# nothing depends on how fast the machine is.
blackhole_start hole
mount_imgfs "$URL1" "$M" "timeout=3600,stall_timeout=3600,refresh=1,mirror=${BLACKHOLE_URL[hole]}"
nginx_stop www1
( rc=0; dd if="$M/bases/x.raw" of="$T/c110" bs=$CS skip=110 count=1 iflag=direct status=none \
    2> "$T/c110.err" || rc=$?; echo $rc > "$T/c110.rc" ) &
reader=$!
# Wait until the read has gone to the dead mirror (it connects, then waits).
wait_for "the read never went to the dead mirror" '[ "$(stat_value "$M" "mirror 1" requests)" -ge 1 ]'
hung_ls=0 hung_stats=0 hung_read=0
for round in 1 2 3; do
    bounded 60 ls "$M/bases" > "$T/ls" || hung_ls=$round
    [ $hung_ls -ne 0 ] || grep -qx 'x@1.raw' "$T/ls" || fail "ls bases misses x@1.raw"
    bounded 60 cat "$M/.imgfs/stats" > "$T/stats" || hung_stats=$round
    bounded 60 dd if="$M/bases/x.raw" of="$T/c3" bs=$MiB skip=3 count=1 iflag=direct status=none || hung_read=$round
    [ $hung_read -ne 0 ] || cmp "$T/c3" <(dd if="$T/img.raw" bs=$MiB skip=3 count=1 status=none) ||
        fail "cached range differs while a read is blocked"
    [ $((hung_ls + hung_stats + hung_read)) -eq 0 ] || break
done
# The read waits for as long as the mirror does not answer: it was still
# waiting after the checks, so they ran while it was blocked.
[ ! -e "$T/c110.rc" ] || fail "test precondition: the read on the dead mirror ended before the checks: $(cat "$T/c110.err")"
[ $hung_ls -eq 0 ] && ok "ls bases answers while a read is blocked on a dead mirror" ||
    defer_fail "ls bases hung (round $hung_ls) while a read was blocked on a dead mirror"
[ $hung_stats -eq 0 ] && ok "cat .imgfs/stats answers while a read is blocked on a dead mirror" ||
    defer_fail "cat .imgfs/stats hung (round $hung_stats) while the refresher was stuck on a dead mirror"
[ $hung_read -eq 0 ] && ok "a cached read answers while a read is blocked on a dead mirror" ||
    defer_fail "a cached read hung (round $hung_read) while a read was blocked on a dead mirror"
# nginx comes back and the dead mirror goes away (its connections close):
# the blocked read fails over to nginx and returns the right bytes.
nginx_restart www1
server_stop blackhole:hole
WAIT_SECONDS=$HANG_SECONDS wait_for "the blocked read did not end after the mirrors recovered" '[ -s "$T/c110.rc" ]'
wait $reader || true
rc=$(cat "$T/c110.rc")
[ "$rc" -eq 0 ] || fail "the blocked read failed after the mirrors recovered: $(cat "$T/c110.err")"
cmp "$T/c110" <(src_chunk 110) || fail "the blocked read returned wrong bytes"
[ "$(stat_value "$M" "mirror 1" errors)" -ge 1 ] || fail "dead mirror errors not counted"
ok "the blocked read completed with the right bytes once nginx was back"
# An uncached chunk reads without a remount.
bounded $HANG_SECONDS dd if="$M/bases/x.raw" of="$T/c111" bs=$CS skip=111 count=1 iflag=direct status=none 2> "$T/c111.err" ||
    fail "uncached chunk fails after nginx came back: $(cat "$T/c111.err")"
cmp "$T/c111" <(src_chunk 111) || fail "chunk 111 is wrong after nginx came back"
ok "with nginx back an uncached chunk reads right, without a remount"
umount_imgfs "$M"

# === 2. corrupted and truncated chunk files on mirror 0 ======================
FLIP=37
CUT=81
python3 - "$(chunk_file "$T/www1" $FLIP)" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[16 + 5000] ^= 0x01   # one payload byte, after the 16-byte header
open(p, "wb").write(bytes(b))
PY
truncate -s $((16 + CS / 2)) "$(chunk_file "$T/www1" $CUT)"
nginx_start www2 "$T/www2"
URL2=${NGINX_URL[www2]}/repo
# Each damaged chunk is read first on a fresh mount, so mirror 0 (current) is
# asked for it; after the failure mirror 1 becomes current.
for idx in $FLIP $CUT; do
    [ $idx = $FLIP ] && what=corrupted || what=truncated
    h=$(chunk_hash $idx)
    asked=$(nginx_requests www1 "/repo/chunks/${h:0:2}/$h")
    fresh_cache
    mount_imgfs "$URL1" "$M" "timeout=600,mirror=$URL2"
    read_chunk "$M" $idx "$T/got" || fail "$what chunk on mirror 0 not served from mirror 1"
    cmp "$T/got" <(src_chunk $idx) || fail "$what chunk on mirror 0: wrong bytes returned"
    [ "$(nginx_requests www1 "/repo/chunks/${h:0:2}/$h")" -gt "$asked" ] ||
        fail "the $what chunk was never asked of mirror 0; the check proves nothing"
    cmp <(cache_chunk "$T/cache" "$h") <(src_chunk $idx) || fail "the cache holds a bad copy of the $what chunk"
    vf=$(stat_value "$M" fetch verify_failures)
    [ "$vf" -ge 1 ] || fail "$what chunk: fetch verify_failures is $vf"
    [ "$(stat_value "$M" "base x@1" verify_failures)" -ge 1 ] || fail "$what chunk: base verify_failures not counted"
    e0=$(stat_value "$M" "mirror 0" errors)
    [ "$e0" -ge 1 ] || fail "$what chunk: mirror 0 errors not counted"
    [ "$(stat_value "$M" "mirror 1" requests)" -ge 1 ] || fail "$what chunk: mirror 1 was never asked"
    if [ $idx = $FLIP ]; then
        cmp "$M/bases/x.raw" "$T/img.raw" || fail "full read with a corrupted first mirror differs"
    fi
    [ "$(stat_value "$M" "base x@1" read_errors)" -eq 0 ] || fail "$what chunk: read errors although mirror 1 is good"
    ok "$what chunk on mirror 0 served right from mirror 1 (verify_failures $vf, mirror 0 errors $e0)"
    umount_imgfs "$M"
done
ok "full read with the corrupted mirror first is identical; the cache holds only good bytes"

# Only the damaged mirror: those chunks fail, nothing wrong is returned.
fresh_cache
mount_imgfs "$URL1" "$M" "timeout=3"
expect_eio "corrupted chunk with only the bad mirror" "$M" $FLIP
expect_eio "truncated chunk file with only the bad mirror" "$M" $CUT
read_chunk_eventually "$M" $((FLIP + 1)) "$T/next"
cmp "$T/next" <(src_chunk $((FLIP + 1))) || fail "the good neighbour is wrong"
[ "$(stat_value "$M" fetch verify_failures)" -ge 2 ] || fail "verify failures not counted with one mirror"
ok "with only the bad mirror: damaged chunks fail, good ones read"
umount_imgfs "$M"

# === 3. a mirror answering 500, and one cutting bodies short =================
nginx_start e500 "$T/www2" "location /repo/chunks/ { return 500; }"
URL500=${NGINX_URL[e500]}/repo
# A server that promises the whole chunk file in Content-Length, sends half
# of it and closes the connection; other files are served whole.
SHORT_PORT=$(free_port)
python3 - "$T/www2" "$SHORT_PORT" > "$T/short.log" 2>&1 <<'PY' &
import http.server, os, sys
root, port = sys.argv[1], int(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        path = os.path.normpath(os.path.join(root, self.path.lstrip("/")))
        if not path.startswith(root + "/") or not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if "/chunks/" in self.path:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.wfile.write(data)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
PY
DAEMON_PID[short]=$!
URLSHORT=http://127.0.0.1:$SHORT_PORT/repo
wait_http "$URLSHORT/imgfs-repo" || fail "the short-body server did not start"

for bad in 500 short; do
    [ $bad = 500 ] && BAD=$URL500 || BAD=$URLSHORT
    fresh_cache
    mount_imgfs "$BAD" "$M" "timeout=600,mirror=$URL2"
    cmp "$M/bases/x.raw" "$T/img.raw" || fail "full read with a $bad mirror first differs"
    e0=$(stat_value "$M" "mirror 0" errors)
    r1=$(stat_value "$M" "mirror 1" retries)
    [ "$e0" -ge 1 ] || fail "$bad mirror: mirror 0 errors not counted"
    [ "$r1" -ge 1 ] || fail "$bad mirror: mirror 1 retries not counted"
    [ "$(stat_value "$M" "mirror 1" current)" = yes ] || fail "$bad mirror: failover did not make mirror 1 current"
    [ "$(stat_value "$M" "base x@1" read_errors)" -eq 0 ] || fail "$bad mirror: read errors despite a good mirror"
    ok "$bad mirror first, good second: full read correct, mirror 0 errors $e0, mirror 1 retries $r1"
    umount_imgfs "$M"

    fresh_cache
    mount_imgfs "$BAD" "$M" "timeout=3"
    expect_eio "only the $bad mirror" "$M" 5
    [ "$(stat_value "$M" "mirror 0" errors)" -ge 1 ] || fail "only $bad mirror: errors not counted"
    umount_imgfs "$M"
done
nginx_stop e500

# === 4. unreachable repository at mount time; offline ========================
# Fill the cache (and its copies of index and manifest) over HTTP.
fresh_cache
mount_imgfs "$URL2" "$M"
cmp "$M/bases/x.raw" "$T/img.raw" || fail "filling the cache: wrong data"
umount_imgfs "$M"
nginx_stop www1
nginx_stop www2
# Each with a state directory of its own: the default, /var/lib/imgfs, is
# the machine's, and another daemon holding it (a test running beside this
# one) makes the mount fail on that instead.
mkdir -p "$T/mnt2" "$T/state2"
expect_error "mount of an unreachable repository" "$IMGFS" "$URL2" "$T/mnt2" -f -o "cache=$T/cache,state=$T/state2,insecure"
grep -qi 'reach\|connect' "$(ls -t "$T"/stderr.* | head -n 1)" || fail "the error does not say the repository cannot be reached"
mountpoint -q "$T/mnt2" && fail "$T/mnt2 is mounted after a failed mount"
blackhole_start hole
expect_error "mount of a repository that never answers" \
    "$IMGFS" "${BLACKHOLE_URL[hole]}/repo" "$T/mnt2" -f -o "cache=$T/cache,state=$T/state2,stall_timeout=3,insecure"
mount_imgfs "$URL2" "$M" "offline,timeout=3"
bounded 60 ls "$M/bases" > "$T/ls" || fail "ls bases hung offline"
grep -qx 'x@1.raw' "$T/ls" && grep -qx 'x.raw' "$T/ls" || { cat "$T/ls"; fail "offline ls bases misses x.raw or x@1.raw"; }
bounded $HANG_SECONDS cmp "$M/bases/x.raw" "$T/img.raw" || fail "offline mount does not serve the cached base"
[ "$(stat_value "$M" fetch requests)" -eq 0 ] || fail "offline read of a fully cached base made requests"
ok "offline mount with a filled cache: ls bases works and the whole base reads from the cache"
umount_imgfs "$M"
server_stop blackhole:hole
server_stop short
if [ ${#DEFERRED[@]} -gt 0 ]; then
    printf 'FAIL: %s\n' "${DEFERRED[@]}" >&2
    echo "$CHECKS passed, ${#DEFERRED[@]} failed"
    exit 1
fi
finish
