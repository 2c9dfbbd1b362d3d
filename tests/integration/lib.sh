# Shared helpers for the integration tests. Source it first thing:
#   . "$(dirname "$0")/lib.sh"
# Every test runs in its own temp dir, and everything it mounted or started is
# unmounted and stopped on exit, whatever happened.
set -euo pipefail

BUILD=${IMGFS_BUILD_DIR:?IMGFS_BUILD_DIR must point at the build directory}
IMGFS=$BUILD/imgfs
IMGFSCTL=$BUILD/imgfsctl
TOOLS=$BUILD/tests
T=$(mktemp -d /var/tmp/imgfs-test.XXXXXX)
MOUNTS=()
declare -A DAEMON_PID DAEMON_LOG
AT_EXIT=()
CHECKS=0

# at_exit CMD: runs CMD (through eval) first thing in cleanup, whatever
# happened; for things a test sets up beyond mounts and daemons.
at_exit() { AT_EXIT+=("$1"); }

cleanup() {
    local status=$?
    set +e
    for cmd in "${AT_EXIT[@]}"; do eval "$cmd"; done
    for m in "${MOUNTS[@]}"; do
        if mountpoint -q "$m" 2>/dev/null; then
            fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        fi
    done
    for pid in "${DAEMON_PID[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    if [ "$status" -ne 0 ]; then
        for log in "${DAEMON_LOG[@]}"; do
            [ -s "$log" ] && { echo "--- $log"; cat "$log"; } >&2
        done
    fi
    rm -rf "$T"
    exit "$status"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { CHECKS=$((CHECKS + 1)); echo "ok $CHECKS - $*"; }
# Ends a test: prints the closing line that ctest logs show.
finish() { echo "$CHECKS passed, 0 failed"; }

# make_image FILE SIZE_BYTES: mixed random data and zero runs, deterministic
# per file name, with the size given exactly (need not be chunk-aligned).
make_image() {
    python3 - "$1" "$2" <<'PY'
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(path)
with open(path, "wb") as f:
    left = size
    while left:
        n = min(left, rng.choice([4096, 65536, 300000, 1 << 20]))
        kind = rng.random()
        if kind < 0.35:
            f.write(b"\0" * n)
        elif kind < 0.5:
            f.write(bytes([rng.randrange(256)]) * n)   # compressible
        else:
            f.write(rng.randbytes(n))
        left -= n
PY
}

# mount_imgfs REPO MNT [EXTRA -o OPTIONS] [CACHE DIR]: mounts in the
# foreground mode in the background, so the daemon's stderr (and any
# sanitizer report) is kept. The cache is $T/cache unless given, and the
# state directory $T/state unless EXTRA names one: the default /var/lib/imgfs
# is shared by everything on the machine, and a daemon locks its state.
# $IMGFS_TEST_MOUNT_OPTS (set by ctest for the .writeback variants) is added.
mount_imgfs() {
    local repo=$1 mnt=$2 extra=${3:-} cache=${4:-$T/cache}
    mkdir -p "$mnt" "$cache"
    local log="$T/imgfs.$(basename "$mnt").$RANDOM.log"
    local opts="cache=$cache"
    if [[ ",$extra," != *,state=* ]]; then
        mkdir -p "$T/state"
        opts="$opts,state=$T/state"
    fi
    [ -n "$extra" ] && opts="$opts,$extra"
    [ -n "${IMGFS_TEST_MOUNT_OPTS:-}" ] && opts="$opts,$IMGFS_TEST_MOUNT_OPTS"
    # An http(s) repository needs trust= or insecure; the tests of unsigned
    # HTTP behaviour get insecure (test_trust checks the refusal without it).
    case "$repo,$opts" in
        *://*trust=* | *://*insecure*) ;;
        *://*) opts="$opts,insecure" ;;
    esac
    "$IMGFS" "$repo" "$mnt" -f -o "$opts" 2>"$log" &
    DAEMON_PID[$mnt]=$!
    DAEMON_LOG[$mnt]=$log
    MOUNTS+=("$mnt")
    wait_mounted "$mnt"
}

# MOUNT_WAIT_SECONDS: how long a daemon may take to mount. Generous: a
# sanitizer build on a machine loaded with guests can take seconds to start,
# and the wait ends at once when the mount is there or the daemon died.
MOUNT_WAIT_SECONDS=180
# wait_mounted MNT: waits until the daemon DAEMON_PID[MNT] serves MNT; fails
# (with its log) when it exits first or takes more than MOUNT_WAIT_SECONDS.
wait_mounted() {
    local mnt=$1 pid=${DAEMON_PID[$1]} log=${DAEMON_LOG[$1]}
    local deadline=$((SECONDS + MOUNT_WAIT_SECONDS))
    while [ "$SECONDS" -lt "$deadline" ]; do
        # statfs reaches the daemon, and must say FUSE: a dead mount left by
        # a crash is a mount point that does not answer, and once the new
        # daemon has detached it the plain directory below answers for a
        # moment, until the new mount is there.
        [ "$(stat -f -c %T "$mnt" 2>/dev/null)" = fuseblk ] && mountpoint -q "$mnt" && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "imgfs exited before mounting $mnt"; }
        sleep 0.05
    done
    fail "imgfs did not mount $mnt within $MOUNT_WAIT_SECONDS s"
}

# small_tmpfs DIR SIZE: a tmpfs of SIZE mounted at DIR (a disk that fills
# up), unmounted at exit after the imgfs mounts that may use it.
small_tmpfs() {
    mkdir -p "$1"
    mount -t tmpfs -o size="$2" tmpfs "$1" || fail "cannot mount a tmpfs at $1"
    at_exit "for m in \"\${MOUNTS[@]}\"; do fusermount3 -uz \"\$m\" 2>/dev/null; done; umount -l '$1' 2>/dev/null"
}

# put OFFSET LEN SEED FILE...: the same pseudo-random bytes into each FILE.
put() {
    local off=$1 len=$2 seed=$3
    shift 3
    python3 -c "import random, sys; sys.stdout.buffer.write(random.Random($seed).randbytes($len))" > "$T/piece"
    for f in "$@"; do
        dd if="$T/piece" of="$f" bs=1M seek="$off" oflag=seek_bytes conv=notrunc status=none ||
            fail "cannot write $len bytes at $off to $f"
    done
}

# same FILE REFERENCE WHAT: fails with WHAT unless the two files are equal.
same() { cmp "$1" "$2" > "$T/cmp.out" 2>&1 || { cat "$T/cmp.out"; fail "$3"; }; }

# The chunks resident in the pack cache CACHE (cache.h), one "HASH PACK
# OFFSET LENGTH" line each. Replays the index logs the way cache_open does
# (records are not checksummed here: tests that garble them use imgfs).
cache_index() { # CACHE
    python3 - "$1" <<'PY'
import os, struct, sys
packs = os.path.join(sys.argv[1], "packs")
where = {}
for name in sorted(os.listdir(packs)) if os.path.isdir(packs) else []:
    if not name.endswith(".idx"):
        continue
    pack = os.path.join(packs, name[:-4] + ".pack")
    data = open(os.path.join(packs, name), "rb").read()
    size = os.path.getsize(pack) if os.path.exists(pack) else 0
    for i in range(0, len(data) - 63, 64):
        magic, kind, h, off, length = struct.unpack_from("<4sI16sQI", data, i)
        if magic != b"ICR1":
            break
        if kind == 2 and where.get(h, (None, None))[0:2] == (pack, off):
            del where[h]
        elif kind == 1 and h not in where and off + length <= size:
            where[h] = (pack, off, length)
for h, (pack, off, length) in where.items():
    print(h.hex(), pack, off, length)
PY
}
# Where chunk HASH is in the cache: "PACK OFFSET LENGTH"; fails when absent.
cache_locate() { # CACHE HASH
    cache_index "$1" | awk -v h="$2" '$1 == h { print $2, $3, $4; found = 1 } END { exit !found }'
}
# The bytes of chunk HASH in the pack cache CACHE, on stdout.
cache_chunk() { # CACHE HASH
    local at pack off len
    at=$(cache_locate "$1" "$2") || return 1
    read -r pack off len <<< "$at"
    python3 -c 'import sys; f = open(sys.argv[1], "rb"); f.seek(int(sys.argv[2])); sys.stdout.buffer.write(f.read(int(sys.argv[3])))' "$pack" "$off" "$len"
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# Fails the test when the daemon's log holds a sanitizer report.
check_daemon_log() {
    local log=$1
    if grep -qE 'ERROR: (Address|Leak|Thread|Memory)Sanitizer|runtime error:|WARNING: ThreadSanitizer' "$log"; then
        cat "$log" >&2
        fail "sanitizer report in $log"
    fi
}

umount_imgfs() {
    local mnt=$1 pid=${DAEMON_PID[$1]:-}
    fusermount3 -u "$mnt" || fail "cannot unmount $mnt"
    if [ -n "$pid" ]; then
        # Generous: a loaded CI machine (TCG guests) can be slow to schedule it.
        for _ in $(seq 1 1200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        if kill -0 "$pid" 2>/dev/null; then
            # Leave the evidence: where every thread of the daemon is stuck.
            command -v gdb > /dev/null &&
                timeout 60 gdb -batch -p "$pid" -ex 'thread apply all bt' 2>&1 | grep -E '^(Thread|#)' >&2
            fail "imgfs for $mnt did not exit within 60 s after unmount"
        fi
        wait "$pid" || fail "imgfs for $mnt exited with status $?"
        check_daemon_log "${DAEMON_LOG[$mnt]}"
        unset "DAEMON_PID[$mnt]"
    fi
}

# stat_value MNT SECTION KEY: one value from .imgfs/stats, e.g.
#   stat_value "$M" fetch requests;  stat_value "$M" "base deb@1" cache_misses
stat_value() {
    awk -v section="[$2]" -v key="$3" '
        /^\[/ { in_section = ($0 == section); next }
        in_section && $1 == key { print $2; found = 1; exit }
        END { if (!found) exit 1 }' "$1/.imgfs/stats" || fail "no '$3' in section [$2] of $1/.imgfs/stats"
}

# new_server MNT OLD: waits until a serving process other than pid OLD
# answers on MNT (after a kill or imgfsctl restart) and prints its pid.
new_server() {
    local pid
    for _ in $(seq 600); do
        pid=$(stat_value "$1" daemon pid)
        [ "$pid" != "$2" ] && { echo "$pid"; return 0; }
        sleep 0.1
    done
    fail "no new serving process after pid $2"
}

# wait_stat MNT SECTION KEY VALUE [SECONDS]: waits (default 120 s: the
# bound only ends a run that fails, so it is generous for a loaded machine)
# until the stat reads VALUE, and fails if it never does.
wait_stat() {
    local deadline=$((SECONDS + ${5:-120}))
    while [ "$SECONDS" -lt "$deadline" ]; do
        [ "$(stat_value "$1" "$2" "$3")" = "$4" ] && return 0
        sleep 0.1
    done
    fail "[$2] $3 is $(stat_value "$1" "$2" "$3"), not $4, after ${5:-120} s"
}

# WAIT_SECONDS: the bound of wait_for. Like wait_stat's, it only ends a run
# that fails, so it is generous for a loaded machine (a sanitizer build
# beside other tests at a load of 20).
WAIT_SECONDS=120
# wait_for WHAT CONDITION: evaluates the shell CONDITION every 0.1 s until it
# holds; fails with WHAT when it does not within WAIT_SECONDS. CONDITION is
# evaluated in here: it may use the caller's variables, not its "$1".
wait_for() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    until eval "$2"; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$1 (waited $WAIT_SECONDS s)"
        sleep 0.1
    done
}

# EXPECT_ERROR_SECONDS: the bound of expect_error. It only catches a command
# that hangs (a failing command normally ends at once, or after a timeout the
# test gave it, such as a stall_timeout=3 mount), so it is generous for a
# sanitizer build on a loaded machine.
EXPECT_ERROR_SECONDS=120
# bounded SECONDS CMD...: runs CMD and returns its status, or 124 when it
# has not ended after SECONDS. For commands on a mount: unlike timeout(1)
# it also ends the wait for a command stuck in a FUSE request, which no
# signal ends (O_DIRECT reads wait in D state); such a command is left to
# the cleanup, whose end of the daemon ends the request. The bound only
# catches a hang, so callers make it generous.
bounded() {
    local secs=$1
    shift
    "$@" &
    local pid=$! deadline=$((SECONDS + secs))
    while kill -0 "$pid" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || { kill -9 "$pid" 2>/dev/null; return 124; }
        sleep 0.05
    done
    wait "$pid"
}

# expect_error DESCRIPTION CMD...: the command must fail with a non-zero exit
# and one clear line on stderr, within EXPECT_ERROR_SECONDS.
expect_error() {
    local what=$1; shift
    local err="$T/stderr.$RANDOM"
    local status=0
    timeout $EXPECT_ERROR_SECONDS "$@" >/dev/null 2>"$err" || status=$?
    [ "$status" -eq 0 ] && fail "$what: succeeded but should have failed"
    [ "$status" -eq 124 ] && fail "$what: hung (timeout)"
    [ -s "$err" ] || fail "$what: failed without an error message"
    grep -qiE 'segmentation|sanitizer|abort|core dumped' "$err" && { cat "$err" >&2; fail "$what: crashed"; }
    ok "$what -> $(head -n 1 "$err")"
}

# guest_image: sets IMG to the Debian guest disk that
# tests/guest/build-debian-image.sh builds, cached between runs in
# $IMGFS_GUEST_IMAGE_DIR (default /var/cache/imgfs-test) under a hash of the
# build script, and built only when missing (~15 s from debootstrap's
# tarball cache, ~1.5 min on a fresh machine). No network on a fresh machine
# is a failure, not a skip.
guest_image() {
    local src=${IMGFS_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
    local guest=$src/tests/guest dir=${IMGFS_GUEST_IMAGE_DIR:-/var/cache/imgfs-test} t0 key
    [ "$(id -u)" = 0 ] || fail "must run as root (FUSE mounts, debootstrap)"
    for t in qemu-system-x86_64 debootstrap sfdisk mkfs.ext4 e2fsck flock; do
        command -v "$t" > /dev/null || fail "'$t' is not installed; this test needs it"
    done
    mkdir -p "$dir" || fail "cannot create $dir"
    key=$(sha256sum "$guest/build-debian-image.sh" | cut -c1-12)
    IMG=$dir/debian-$key.raw
    t0=$(date +%s.%N)
    (
        # one builder at a time (a release and an ASan ctest may run together)
        flock 9
        [ -s "$IMG" ] && exit 0
        rm -f "$dir"/debian-*.raw   # images of an older build script
        echo "# building the Debian guest image $IMG (cached for later runs)"
        if ! TMPDIR=$T bash "$guest/build-debian-image.sh" "$IMG" 2G >"$T/build.log" 2>&1; then
            tail -n 40 "$T/build.log" >&2
            rm -f "$IMG"
            exit 1
        fi
    ) 9>"$dir/.debian-image.lock" ||
        fail "cannot build the Debian guest image (is the Debian mirror reachable? debootstrap needs network on the first run; log above)"
    ok "guest image $IMG ($(du -h "$IMG" | cut -f1) allocated, ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s)"
}

