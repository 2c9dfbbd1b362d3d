#!/usr/bin/env bash
# bench-cold-read.sh: cold sequential read of a whole base, imgfs against the
# plain tools reading the same chunk files, side by side in one run.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# One random image (BENCH_SIZE, default 256M: every chunk stored) is
# published into a local repository, which is also served by nginx in a
# network namespace. With caches dropped before every run:
#   local      cat of bases/NAME.raw from a fresh cache, against cat of the
#              same chunk files with 4 readers at once (xargs -P4)
#   http       the same over HTTP (veth, unshaped), against curl fetching the
#              same chunks over 4 keep-alive connections (4 processes)
#   100mbit    the same with the server's egress at 100 Mbit/s (tc tbf)
#   rtt50      the same through bench/delay-proxy.py: +25 ms each way
#   cached     the base fully in the cache but the page cache dropped (a host
#              after a reboot): cat of bases/NAME.raw on a fresh mount over
#              that cache, against cat of the local raw file, of the same
#              image as qcow2 through qcowmount, and of the FUSE passthrough
#              ("pass": bench/fuse-null.c --base serving the local raw file
#              like an imgfs base, page cache and 1 MiB readahead, one pread
#              per request, 16 threads, what any FUSE file system reading
#              that disk can do); then, on another fresh mount, 4096 random
#              4 KiB O_DIRECT reads (fio, libaio, iodepth 16, the same
#              offsets on every target) against the same three. Both rows
#              also run "kernel": fuse-null.c --kernel, the local raw file
#              read by the kernel itself through FUSE passthrough (Linux
#              6.9; n/a where the kernel refuses it), what FUSE does when no
#              read goes to its server; and "imgfs base_passthrough": this
#              build with -o base_passthrough over a cache filled by imgfsctl
#              precopy, the kernel reading the version's checked flat file
# Ratio = the tool's time / imgfs's time (above 1: imgfs is faster).
# Also: requests per MiB (nginx access log), and the latency of one
# uncached 4 KiB read (O_DIRECT) against one GET of its chunk with curl.
#
# Run as root (FUSE, network namespace, tc). Environment:
#   BENCH_SIZE     image size (default 256M)
#   BENCH_CASES    which cases (default "local http 100mbit rtt50 cached")
#   BENCH_REPEAT   runs of each of the local and cached cases, interleaved (default 1)
#   BASELINE_BIN_DIR  another build: the local and cached cases also run it,
#                  interleaved with this one, for a before/after in one run
#   BENCH_DIR      parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1   keep the work directory
#   IMGFS_BIN_DIR  where imgfs and imgfsctl are (default <repo>/build)
# Output: a Markdown report on stdout, also in bench/results/cold-read-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}
BENCH_SIZE=${BENCH_SIZE:-256M}
CASES=${BENCH_CASES:-local http 100mbit rtt50 cached}
REPEAT=${BENCH_REPEAT:-1}
BASELINE_BIN_DIR=${BASELINE_BIN_DIR:-}

require_root "FUSE mounts, a network namespace and tc"
require_tools nginx curl ip tc nsenter python3 fusermount3 xargs
require_imgfs "$IMGFS_BIN_DIR"
SIZE_BYTES=$(to_bytes "$BENCH_SIZE" BENCH_SIZE)
[ "$SIZE_BYTES" -ge $((4 << 20)) ] || die "BENCH_SIZE must be at least 4M."
for c in $CASES; do
    case $c in local | http | 100mbit | rtt50 | cached) ;; *) die "unknown case $c in BENCH_CASES." ;; esac
done
require_count "$REPEAT" BENCH_REPEAT
[ -z "$BASELINE_BIN_DIR" ] || require_imgfs "$BASELINE_BIN_DIR"
[[ " $CASES " != *" cached "* ]] || require_tools qemu-img qcowmount fio cc pkg-config

make_work imgfs-cold
VETH_ROOT=icr$$ VETH_NS=icn$$
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    stop_all
    wait 2>/dev/null
    [ -n "$NS" ] && netns_delete "$NS" "$VETH_ROOT"
    remove_work
    exit "$rc"
}
on_exit cleanup
NAME=cold
head -c "$SIZE_BYTES" /dev/urandom >"$WORK/img.raw"
"$IMGFS_BIN_DIR/imgfsctl" publish "$WORK/img.raw" "$WORK/www/repo" --name $NAME >/dev/null ||
    die "publish failed."
MANIFEST=$WORK/www/repo/bases/$NAME/1.manifest
awk '/^chunks / { go = 1; next } go && $1 != "end" && $1 != "0" { print $1 }' "$MANIFEST" >"$WORK/hashes"
CHUNKS=$(wc -l <"$WORK/hashes")
MIB=$((SIZE_BYTES / 1048576))
sed 's|^\(..\)\(.*\)$|'"$WORK/www/repo"'/chunks/\1/\1\2|' "$WORK/hashes" >"$WORK/files"

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
BIN=$IMGFS_BIN_DIR # the imgfs build under test (BASELINE_BIN_DIR for the baseline rows)
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }

# read_ms FILE OFFSET [direct]: milliseconds of one 4 KiB pread, timed inside
# one process (process start-up on a busy machine is tens of ms).
read_ms() {
    python3 - "$@" <<'PY'
import mmap, os, sys, time
flags = os.O_RDONLY | (os.O_DIRECT if len(sys.argv) > 3 else 0)
buf = mmap.mmap(-1, 4096)
start = time.perf_counter()
fd = os.open(sys.argv[1], flags)
n = os.preadv(fd, [buf], int(sys.argv[2]))
took = time.perf_counter() - start
os.close(fd)
sys.exit(1) if n != 4096 else print("%.1f" % (took * 1000))
PY
}

# imgfs_cold REPO [OPTIONS]: mounts with a fresh cache, reads the whole base
# cold; prints "SECONDS REQUESTS".
imgfs_cold() {
    local repo=$1 extra=${2:-} mnt=$WORK/mnt cache=$WORK/cache state=$WORK/state
    rm -rf "$cache" "$state"
    mkdir -p "$mnt" "$cache" "$state"
    "$BIN/imgfs" "$repo" "$mnt" -f -o "cache=$cache,state=$state,prefetch=none$extra" \
        2>"$WORK/imgfs.log" &
    local pid=$!
    wait_mounted "$mnt" 20 || die "imgfs did not mount: $(tail -n 2 "$WORK/imgfs.log")"
    MOUNTS+=("$mnt")
    drop
    local t0 t1
    t0=$(date +%s%N)
    cat "$mnt/bases/$NAME.raw" >/dev/null || die "imgfs read failed: $(tail -n 2 "$WORK/imgfs.log")"
    t1=$(date +%s%N)
    local req
    req=$(awk '$1 == "requests" { print $2; exit }' "$mnt/.imgfs/stats")
    # One uncached 4 KiB read (a chunk in the middle, far from the readahead
    # of the sequential read: the cache is emptied first by a remount).
    fusermount3 -u "$mnt"
    stop_pid "$pid"
    rm -rf "$cache"
    mkdir -p "$cache"
    "$BIN/imgfs" "$repo" "$mnt" -f -o "cache=$cache,state=$state,prefetch=none$extra" \
        2>>"$WORK/imgfs.log" &
    pid=$!
    wait_mounted "$mnt" 20 || die "imgfs did not mount again."
    cat "$mnt/.imgfs/stats" >/dev/null # the connection to the repository is up, as curl's below is not
    local lat
    lat=$(read_ms "$mnt/bases/$NAME.raw" $((SIZE_BYTES / 2 + 5 * 4096)) direct) || die "the 4 KiB read failed."
    fusermount3 -u "$mnt"
    stop_pid "$pid"
    echo "$(seconds "$t0" "$t1") $req $lat"
}

local_cat() {
    drop
    local t0 t1
    t0=$(date +%s%N)
    xargs -P4 -n 64 cat <"$WORK/files" >/dev/null
    t1=$(date +%s%N)
    seconds "$t0" "$t1"
}

# curl_4 BASE_URL: the chunks over 4 keep-alive connections; prints seconds.
curl_4() {
    local base=$1 i
    for i in 0 1 2 3; do
        awk -v n=$i -v u="$base" 'NR % 4 == n { printf "url = \"%s/chunks/%s/%s\"\noutput = \"/dev/null\"\n", u, substr($1, 1, 2), $1 }' \
            "$WORK/hashes" >"$WORK/curl.$i"
    done
    local t0 t1
    t0=$(date +%s%N)
    for i in 0 1 2 3; do curl -s --noproxy '*' -K "$WORK/curl.$i" & done
    wait
    t1=$(date +%s%N)
    seconds "$t0" "$t1"
}

# One GET of the chunk of the 4 KiB read; prints milliseconds.
curl_one() {
    local base=$1 idx=$((SIZE_BYTES / 2 / 131072)) h
    h=$(awk '/^chunks / { go = 1; n = 0; next } go { if (n == i) { print $1; exit } n++ }' i="$idx" "$MANIFEST")
    curl -s --noproxy '*' -o /dev/null -w '%{time_total}\n' "$base/chunks/${h:0:2}/$h" |
        awk '{ printf "%.1f", $1 * 1000 }'
}

ROWS=()
row() { # CASE TOOL_S IMGFS_S REQ LAT_IMGFS LAT_TOOL TOOL
    local ratio
    ratio=$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.2f", a / b }')
    ROWS+=("| $1 | $7 | $2 s | $3 s ($(awk -v m=$MIB -v t="$3" 'BEGIN { printf "%.0f", m / t }') MiB/s) | **${ratio}x** | $(awk -v r="$4" -v m=$MIB 'BEGIN { printf "%.1f", r / m }') | $5 ms | $6 ms |")
    log "$1: $7 $2 s, imgfs $3 s (${ratio}x), $4 requests, 4 KiB read $5 ms vs $6 ms"
}

# The builds to compare: this one, and the baseline when given.
BUILDS=("$IMGFS_BIN_DIR")
[ -n "$BASELINE_BIN_DIR" ] && BUILDS+=("$BASELINE_BIN_DIR")
build_label() { [ "$1" = "$IMGFS_BIN_DIR" ] && echo "" || echo " (baseline build)"; }

if [[ " $CASES " == *" local "* ]]; then
    for ((run = 1; run <= REPEAT; run++)); do
        for BIN in "${BUILDS[@]}"; do
            log "local repository$(build_label "$BIN"), run $run"
            base_s=$(local_cat)
            read -r s req lat < <(imgfs_cold "$WORK/www/repo")
            drop
            row "local$(build_label "$BIN")" "$base_s" "$s" "$req" "$lat" "$(read_ms "$(head -n 1 "$WORK/files")" 0)" "cat, 4 readers"
        done
    done
    BIN=$IMGFS_BIN_DIR
fi

# rand_iops FILE: IOPS of 4096 random 4 KiB O_DIRECT reads of FILE (fixed
# seed: the same offsets every time), with the page cache dropped.
rand_iops() {
    drop
    fio --name=rand --filename="$1" --rw=randread --bs=4k --direct=1 --ioengine=libaio --iodepth=16 \
        --number_ios=4096 --randseed=4242 --norandommap --size="$SIZE_BYTES" --output-format=json 2>/dev/null |
        python3 -c 'import json, sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))' ||
        die "fio on $1 failed."
}

# imgfs_cached [pt]: fills a cache with the whole base, then mounts afresh
# over it and reads the base with the page cache dropped, then mounts afresh
# again for random reads; prints "SECONDS IOPS". With pt: -o
# base_passthrough, the cache filled and pinned by imgfsctl precopy (a flat
# file is kept only for a held version), and each timed read waits until
# the new daemon has checked the flat file (the check reads it, so the page
# cache is dropped after it).
imgfs_cached() {
    local mnt=$WORK/mnt cache=$WORK/cache state=$WORK/state pid t0 t1 opts="prefetch=none" pt=${1:-}
    [ -n "$pt" ] && opts="$opts,base_passthrough"
    rm -rf "$cache" "$state"
    mkdir -p "$mnt" "$cache" "$state"
    "$BIN/imgfs" "$WORK/www/repo" "$mnt" -f -o "cache=$cache,state=$state,$opts" 2>"$WORK/imgfs.log" &
    pid=$!
    wait_mounted "$mnt" 20 || die "imgfs did not mount: $(tail -n 2 "$WORK/imgfs.log")"
    MOUNTS+=("$mnt")
    if [ -n "$pt" ]; then
        "$BIN/imgfsctl" precopy "$mnt" $NAME >/dev/null || die "imgfsctl precopy failed."
        flat_ready "$mnt"
    else
        cat "$mnt/bases/$NAME.raw" >/dev/null || die "imgfs read failed."
    fi
    fusermount3 -u "$mnt"
    stop_pid "$pid"
    host_warm "$cache"/packs/* # as warm on the host as the other targets' files
    [ -z "$pt" ] || host_warm "$cache"/flat/*
    "$BIN/imgfs" "$WORK/www/repo" "$mnt" -f -o "cache=$cache,state=$state,$opts" 2>>"$WORK/imgfs.log" &
    pid=$!
    wait_mounted "$mnt" 20 || die "imgfs did not mount again."
    local flat_before=n/a
    if [ -n "$pt" ]; then
        flat_ready "$mnt"
        flat_before=$(timed_cat "$cache/flat/$NAME@1.raw") # the same file read directly, just before
    fi
    drop
    t0=$(date +%s%N)
    cat "$mnt/bases/$NAME.raw" >/dev/null || die "imgfs read of the cached base failed."
    t1=$(date +%s%N)
    [ "$(awk '$1 == "requests" { print $2; exit }' "$mnt/.imgfs/stats")" = 0 ] ||
        die "the cached read fetched chunks: the cache did not hold the base."
    local flat_s=n/a
    if [ -n "$pt" ]; then
        passed_through "$mnt"
        flat_s=$(timed_cat "$cache/flat/$NAME@1.raw") # and just after: the mean of the two
        flat_s=$(awk -v a="$flat_before" -v b="$flat_s" 'BEGIN { printf "%.3f", (a + b) / 2 }')
    fi
    fusermount3 -u "$mnt"
    stop_pid "$pid"
    "$BIN/imgfs" "$WORK/www/repo" "$mnt" -f -o "cache=$cache,state=$state,$opts" 2>>"$WORK/imgfs.log" &
    pid=$!
    wait_mounted "$mnt" 20 || die "imgfs did not mount a third time."
    [ -z "$pt" ] || flat_ready "$mnt"
    local iops
    iops=$(rand_iops "$mnt/bases/$NAME.raw")
    [ "$(awk '$1 == "requests" { print $2; exit }' "$mnt/.imgfs/stats")" = 0 ] ||
        die "the cached random read fetched chunks."
    [ -z "$pt" ] || passed_through "$mnt"
    fusermount3 -u "$mnt"
    stop_pid "$pid"
    echo "$(seconds "$t0" "$t1") $iops $flat_s"
}

# flat_ready MNT: waits (60 s at most) until the base's flat file is ready.
flat_ready() {
    local i
    for i in $(seq 600); do
        awk -v s="[base $NAME@1]" '/^\[/ { in_s = ($0 == s) } in_s && $1 == "flat_file" && $2 == "ready" { ok = 1 } END { exit !ok }' \
            "$1/.imgfs/stats" && return 0
        sleep 0.1
    done
    die "the flat file of $NAME@1 did not get ready: $(tail -n 2 "$WORK/imgfs.log")"
}

# passed_through MNT: dies unless the daemon served no READ of the base.
passed_through() {
    awk -v s="[base $NAME@1]" '/^\[/ { in_s = ($0 == s) } in_s && $1 == "reads" { r = $2 } END { exit r != 0 }' \
        "$1/.imgfs/stats" || die "the base_passthrough read reached the daemon: $(grep -A3 passthrough "$1/.imgfs/stats")"
}

# drop_caches empties this VM's page cache, not the cache that its disk has
# on the host: there a file read a while ago is cold (a 2 GiB file took 7.0
# s, then 1.8-2.9 s), and the target that reads it first in a round would
# pay for the others. So every file is read once, untimed, before the timed
# reads of a round (imgfs's packs in imgfs_cached).
host_warm() { cat "$@" >/dev/null || die "cannot read $*."; }

timed_cat() { # FILE: seconds of a cat of FILE with the page cache dropped
    local t0 t1
    drop
    t0=$(date +%s%N)
    cat "$1" >/dev/null || die "cat $1 failed."
    t1=$(date +%s%N)
    seconds "$t0" "$t1"
}

CACHED_ROWS=()
CACHED_RAND_ROWS=()
if [[ " $CASES " == *" cached "* ]]; then
    qemu-img convert -O qcow2 "$WORK/img.raw" "$WORK/img.qcow2" || die "qemu-img convert failed."
    mkdir -p "$WORK/qcow"
    qcowmount "$WORK/img.qcow2" "$WORK/qcow" >"$WORK/qcowmount.log" 2>&1 &
    PIDS+=($!)
    wait_mounted "$WORK/qcow" 20 || die "qcowmount did not mount: $(cat "$WORK/qcowmount.log")"
    MOUNTS+=("$WORK/qcow")
    mkdir -p "$WORK/null"
    cc -O2 -o "$WORK/fuse-null" "$SCRIPT_DIR/fuse-null.c" $(pkg-config --cflags --libs fuse3) -lpthread \
        2>"$WORK/fuse-null.log" || die "cannot build fuse-null.c: $(tail -n 1 "$WORK/fuse-null.log")"
    "$WORK/fuse-null" --base "$WORK/null" "$SIZE_BYTES" 16 "$WORK/img.raw" >>"$WORK/fuse-null.log" 2>&1 &
    PIDS+=($!)
    wait_mounted "$WORK/null" 10 || die "fuse-null did not mount: $(tail -n 1 "$WORK/fuse-null.log")"
    MOUNTS+=("$WORK/null")
    mkdir -p "$WORK/kernel"
    "$WORK/fuse-null" --kernel "$WORK/kernel" "$SIZE_BYTES" 16 "$WORK/img.raw" >>"$WORK/fuse-null.log" 2>&1 &
    PIDS+=($!)
    wait_mounted "$WORK/kernel" 10 || die "fuse-null --kernel did not mount: $(tail -n 1 "$WORK/fuse-null.log")"
    MOUNTS+=("$WORK/kernel")
    KERNEL_PT=1
    head -c 4096 "$WORK/kernel/disk" >/dev/null 2>&1 || {
        KERNEL_PT=
        log "no FUSE passthrough here: $(tail -n 1 "$WORK/fuse-null.log")"
    }
    mbps() { [ "$1" = n/a ] && echo n/a || awk -v m=$MIB -v t="$1" 'BEGIN { printf "%.0f", m * 1.048576 / t }'; }
    ratio() { [ "$1" = n/a ] || [ "$2" = n/a ] && echo n/a || awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
    : >"$WORK/ratios"
    : >"$WORK/vs-local"
    : >"$WORK/vs-flat"
    for ((run = 1; run <= REPEAT; run++)); do
        # One local and one qcowmount figure per run for every build, and the
        # builds in turn first, so that neither always follows the other.
        log "cached base, page cache dropped, run $run"
        host_warm "$WORK/img.raw" "$WORK/img.qcow2"
        local_s=$(timed_cat "$WORK/img.raw")
        qcow_s=$(timed_cat "$WORK/qcow/qcow1")
        pass_s=$(timed_cat "$WORK/null/disk")
        local_iops=$(rand_iops "$WORK/img.raw")
        qcow_iops=$(rand_iops "$WORK/qcow/qcow1")
        pass_iops=$(rand_iops "$WORK/null/disk")
        kernel_s=n/a kernel_iops=n/a
        if [ -n "$KERNEL_PT" ]; then
            kernel_s=$(timed_cat "$WORK/kernel/disk")
            kernel_iops=$(rand_iops "$WORK/kernel/disk")
        fi
        order=("${BUILDS[@]}")
        ((run % 2 == 0 && ${#BUILDS[@]} == 2)) && order=("${BUILDS[1]}" "${BUILDS[0]}")
        for BIN in "${order[@]}"; do
            read -r s iops _ <<<"$(imgfs_cached)"
            label="cached$(build_label "$BIN")"
            CACHED_ROWS+=("| $label, run $run | $local_s s ($(mbps "$local_s") MB/s) | $qcow_s s ($(mbps "$qcow_s") MB/s) | $pass_s s ($(mbps "$pass_s") MB/s) | $s s ($(mbps "$s") MB/s) | **$(ratio "$local_s" "$s")x** | **$(ratio "$qcow_s" "$s")x** | **$(ratio "$pass_s" "$s")x** | $(ratio "$local_s" "$pass_s")x | $kernel_s s ($(mbps "$kernel_s") MB/s) | $(ratio "$local_s" "$kernel_s")x |")
            CACHED_RAND_ROWS+=("| $label, run $run | $local_iops | $qcow_iops | $pass_iops | $iops | **$(ratio "$iops" "$local_iops")x** | **$(ratio "$iops" "$qcow_iops")x** | **$(ratio "$iops" "$pass_iops")x** | $(ratio "$pass_iops" "$local_iops")x | $kernel_iops | $(ratio "$kernel_iops" "$local_iops")x |")
            # Per build, one line per round: the six ratios of the summary.
            echo "$label $(ratio "$local_s" "$s") $(ratio "$qcow_s" "$s") $(ratio "$pass_s" "$s") $(ratio "$iops" "$local_iops") $(ratio "$iops" "$qcow_iops") $(ratio "$iops" "$pass_iops")" >>"$WORK/ratios"
            log "$label: sequential local $local_s s, qcowmount $qcow_s s, pass $pass_s s, imgfs $s s; random 4K: local $local_iops, qcowmount $qcow_iops, pass $pass_iops, imgfs $iops IOPS"
            [ "$BIN" = "$IMGFS_BIN_DIR" ] && imgfs_s=$s imgfs_iops=$iops
        done
        # This build again with -o base_passthrough (the kernel reads the
        # flat file), before or after the rest in turn.
        BIN=$IMGFS_BIN_DIR
        read -r pt_s pt_iops flat_s <<<"$(imgfs_cached pt)"
        label="cached, base_passthrough"
        CACHED_ROWS+=("| $label, run $run | $local_s s ($(mbps "$local_s") MB/s) | $qcow_s s ($(mbps "$qcow_s") MB/s) | $pass_s s ($(mbps "$pass_s") MB/s) | $pt_s s ($(mbps "$pt_s") MB/s) | **$(ratio "$local_s" "$pt_s")x** | **$(ratio "$qcow_s" "$pt_s")x** | **$(ratio "$pass_s" "$pt_s")x** | $(ratio "$local_s" "$pass_s")x | $kernel_s s ($(mbps "$kernel_s") MB/s) | $(ratio "$local_s" "$kernel_s")x |")
        CACHED_RAND_ROWS+=("| $label, run $run | $local_iops | $qcow_iops | $pass_iops | $pt_iops | **$(ratio "$pt_iops" "$local_iops")x** | **$(ratio "$pt_iops" "$qcow_iops")x** | **$(ratio "$pt_iops" "$pass_iops")x** | $(ratio "$pass_iops" "$local_iops")x | $kernel_iops | $(ratio "$kernel_iops" "$local_iops")x |")
        echo "$label $(ratio "$local_s" "$pt_s") $(ratio "$qcow_s" "$pt_s") $(ratio "$pass_s" "$pt_s") $(ratio "$pt_iops" "$local_iops") $(ratio "$pt_iops" "$qcow_iops") $(ratio "$pt_iops" "$pass_iops")" >>"$WORK/ratios"
        log "$label: imgfs $pt_s s (its flat file read directly just before and after: $flat_s s on average); random 4K: imgfs $pt_iops IOPS"
        echo "$(ratio "$flat_s" "$pt_s")" >>"$WORK/vs-flat"
        # Every target's ratio to the local file in this round (local time /
        # its time; its IOPS / local IOPS).
        echo "$(ratio "$local_s" "$qcow_s") $(ratio "$local_s" "$pass_s") $(ratio "$local_s" "$kernel_s") $(ratio "$local_s" "$imgfs_s") $(ratio "$local_s" "$pt_s") $(ratio "$qcow_iops" "$local_iops") $(ratio "$pass_iops" "$local_iops") $(ratio "$kernel_iops" "$local_iops") $(ratio "$imgfs_iops" "$local_iops") $(ratio "$pt_iops" "$local_iops")" >>"$WORK/vs-local"
    done
    BIN=$IMGFS_BIN_DIR
fi

NET_CASES=$(for c in $CASES; do [ "$c" != local ] && [ "$c" != cached ] && echo "$c"; done)
if [ -n "$NET_CASES" ]; then
    netns_create "imgfs-cold-$$" "$VETH_ROOT" "$VETH_NS" 10.214.0.1 10.214.0.2
    nginx_start_in_ns "$WORK/nginx" "$WORK/www" 10.214.0.2:8080 '$status $request_uri' \
        "http://10.214.0.2:8080/repo/imgfs-repo"
    PIDS+=("$NGINX_PID")
    URL=http://10.214.0.2:8080/repo
    for c in $NET_CASES; do
        url=$URL
        innet tc qdisc del dev "$VETH_NS" root 2>/dev/null
        proxy=
        case $c in
        100mbit)
            innet tc qdisc add dev "$VETH_NS" root tbf rate 100mbit burst 64kb latency 50ms ||
                die "cannot set up tc tbf."
            ;;
        rtt50)
            port=$((20000 + $$ % 20000))
            python3 "$SCRIPT_DIR/delay-proxy.py" $port 10.214.0.2 8080 25 &
            proxy=$!
            PIDS+=("$proxy")
            sleep 0.5
            url=http://127.0.0.1:$port/repo
            ;;
        esac
        log "$c"
        drop
        tool_s=$(curl_4 "$url")
        tool_lat=$(curl_one "$url")
        : >"$WORK/nginx/access.log"
        read -r s req lat < <(imgfs_cold "$url" ",insecure")
        row "$c" "$tool_s" "$s" "$req" "$lat" "$tool_lat" "curl, 4 keep-alive connections"
        [ -n "$proxy" ] && stop_pid "$proxy"
    done
    innet tc qdisc del dev "$VETH_NS" root 2>/dev/null
fi

{
    echo "# Cold sequential read of a whole base ($(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs)"
    echo
    echo "- image: $MIB MiB of random data, $CHUNKS stored chunks of 128 KiB; caches dropped before each run"
    echo "- imgfs: fresh cache, \`cat bases/$NAME.raw\`, prefetch=none; ratio = tool time / imgfs time"
    echo "- http: nginx in a network namespace over a veth; rtt50: through bench/delay-proxy.py (+25 ms each way)"
    echo
    echo "| case | tool | tool | imgfs | ratio | requests/MiB | one uncached 4 KiB read (imgfs) | one GET (curl) / 4 KiB of a chunk file |"
    echo "|---|---|---|---|---|---|---|---|"
    [ ${#ROWS[@]} -eq 0 ] || printf '%s\n' "${ROWS[@]}"
    if [ ${#CACHED_ROWS[@]} -gt 0 ]; then
        echo
        echo "Cached base, page cache dropped: cat of the whole base on a fresh mount over a full cache"
        echo "(every chunk verified on its first use), against cat of the local raw file, qcowmount of the qcow2"
        echo "and the FUSE passthrough (pass: bench/fuse-null.c --base, one pread per request of the local raw file)."
        echo "Ratios: the other's time / imgfs's time (above 1: imgfs is faster). kernel: fuse-null.c --kernel, the local"
        echo "raw file read by the kernel through FUSE passthrough, no request to the server (not a design imgfs has)."
        echo
        echo "| case | local raw file | qcowmount (qcow2) | pass | imgfs | imgfs vs local | imgfs vs qcowmount | imgfs vs pass | pass vs local | kernel | kernel vs local |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        printf '%s\n' "${CACHED_ROWS[@]}"
        echo
        echo "Cached base, page cache dropped, on another fresh mount: 4096 random 4 KiB O_DIRECT reads"
        echo "(fio libaio, iodepth 16, the same offsets everywhere), IOPS; a cached chunk is checked by the 4 KiB blocks read."
        echo
        echo "| case | local raw file | qcowmount (qcow2) | pass | imgfs | imgfs vs local | imgfs vs qcowmount | imgfs vs pass | pass vs local | kernel | kernel vs local |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        printf '%s\n' "${CACHED_RAND_ROWS[@]}"
        echo
        echo "Summary over the rounds: median (range) of imgfs's ratio to each."
        echo
        echo "| build | rounds | sequential vs local | vs qcowmount | vs pass | random 4 KiB vs local | vs qcowmount | vs pass |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        python3 - "$WORK/ratios" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    label, vals = " ".join(f[:-6]), [float(v) for v in f[-6:]]
    rows.setdefault(label, []).append(vals)
for label, runs in rows.items():
    cols = ["%.2fx (%.2f-%.2f)" % (statistics.median(c), min(c), max(c)) for c in zip(*runs)]
    print("| %s | %d | %s |" % (label, len(runs), " | ".join(cols)))
PY
        echo
        echo "Every target against the local raw file: median (range) over the rounds of local time / its time"
        echo "(sequential) and its IOPS / local IOPS (random 4 KiB); above 1: faster than the local file."
        echo
        echo "| read | rounds | qcowmount | pass | kernel (fuse-null) | imgfs | imgfs base_passthrough |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        python3 - "$WORK/vs-local" <<'PY'
import statistics, sys
runs = [line.split() for line in open(sys.argv[1]) if line.strip()]
def cell(vals):
    vals = [float(v) for v in vals if v != "n/a"]
    return "%.2fx (%.2f-%.2f)" % (statistics.median(vals), min(vals), max(vals)) if vals else "n/a"
for name, lo in (("sequential 1 MiB (cat)", 0), ("random 4 KiB", 5)):
    cols = [cell([r[lo + i] for r in runs]) for i in range(5)]
    print("| %s | %d | %s |" % (name, len(runs), " | ".join(cols)))
PY
        echo
        python3 - "$WORK/vs-flat" <<'PY'
import statistics, sys
v = [float(l) for l in open(sys.argv[1]) if l.strip() and l.strip() != "n/a"]
if v:
    print("imgfs base_passthrough's sequential read against a cat of its flat file itself just before and after"
          " it (mean flat file time / passthrough time): median %.2fx (%.2f-%.2f) over %d rounds."
          % (statistics.median(v), min(v), max(v), len(v)))
PY
    fi
} | save_report cold-read
