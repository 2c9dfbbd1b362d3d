#!/usr/bin/env bash
# bench-read-cost.sh: what one read of a fully cached base costs the serving
# process after a reboot (page cache dropped), for imgfs builds and for a
# FUSE passthrough of the same bytes side by side: per random 4 KiB read and
# per MiB of a sequential read, the server's CPU (perf stat task-clock),
# context switches, system calls (strace -c, in a run of its own since
# strace slows the server down) and the disk reads of the device under the
# work directory (/sys/block/DEV/stat: other processes' I/O is counted in).
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# Counts per read are steadier than throughput on a shared host. One random
# image (BENCH_SIZE) is published; the first build fills a cache with it
# (a cold read), which every build then reads a copy of. Each round, every
# file is read once untimed (the host's cache of this VM's disk is not
# dropped by drop_caches), then, for the passthrough and each build in turn
# (taking turns in going first), on a fresh mount with the page cache
# dropped: fio 4 KiB randread, libaio, iodepth BENCH_IODEPTH, O_DIRECT,
# BENCH_READS reads; then, on another fresh mount, cat of the whole base.
# The passthrough ("pass") is bench/fuse-null.c --base serving the raw image
# (one pread per read, the page cache and readahead of an imgfs base).
#
# Run as root. Environment:
#   BENCH_BUILDS   "NAME=DIR ..." (default "this=<repo>/build")
#   BENCH_ROUNDS   rounds (default 3)
#   BENCH_SIZE     image size (default 256M)
#   BENCH_READS    random reads a run (default 16384)
#   BENCH_IODEPTH  fio's --iodepth (default 16)
#   BENCH_STRACE=0 skip the strace runs
#   BENCH_DIR      parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1   keep the work directory
# Output: Markdown on stdout, also written to bench/results/read-cost-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

BUILDS=${BENCH_BUILDS:-this=$SRC_DIR/build}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=$(to_bytes "${BENCH_SIZE:-256M}" BENCH_SIZE)
READS=${BENCH_READS:-16384}
IODEPTH=${BENCH_IODEPTH:-16}
STRACE=${BENCH_STRACE:-1}
require_count "$ROUNDS" BENCH_ROUNDS
require_count "$READS" BENCH_READS
require_count "$IODEPTH" BENCH_IODEPTH
[ "$SIZE" -ge $((16 << 20)) ] || die "BENCH_SIZE must be at least 16M."

require_root "FUSE mounts"
require_tools fio perf strace python3 fusermount3 cc pkg-config findmnt
declare -A BIN
parse_builds "$BUILDS"

make_work imgfs-bench-read-cost
on_exit cleanup_all
DEV=$(basename "$(findmnt -no SOURCE -T "$WORK")")
[ -r "/sys/class/block/$DEV/stat" ] || die "no /sys/class/block/$DEV/stat for the work directory's device."
disk_reads() { awk '{ print $1 }' "/sys/class/block/$DEV/stat"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

head -c "$SIZE" /dev/urandom >"$WORK/img.raw"
"${BIN[${NAMES[0]}]}/imgfsctl" publish "$WORK/img.raw" "$WORK/repo" --name cost >"$WORK/publish.log" 2>&1 ||
    die "imgfsctl publish failed: $(tail -n 1 "$WORK/publish.log")"
cc -O2 -o "$WORK/fuse-null" "$SCRIPT_DIR/fuse-null.c" $(pkg-config --cflags --libs fuse3) -lpthread \
    2>"$WORK/fuse-null-cc.log" || die "cannot build fuse-null.c: $(tail -n 1 "$WORK/fuse-null-cc.log")"

# up TARGET: a fresh mount of the passthrough or of a build over its cache;
# sets FILE (what to read) and SERVER (the serving process).
up() {
    if [ "$1" = pass ]; then
        mkdir -p "$WORK/mnt-pass"
        "$WORK/fuse-null" --base "$WORK/mnt-pass" "$SIZE" 16 "$WORK/img.raw" 2>>"$WORK/fuse-null.log" &
        SERVER=$!
        PIDS+=("$SERVER")
        wait_mounted "$WORK/mnt-pass" 10 || die "fuse-null did not mount: $(tail -n 1 "$WORK/fuse-null.log")"
        MOUNTS+=("$WORK/mnt-pass")
        FILE=$WORK/mnt-pass/disk
    else
        mount_build "${BIN[$1]}" "$1" "$WORK/repo" prefetch=none
        SERVER=$(awk '/^\[/ { d = ($0 == "[daemon]"); next } d && $1 == "pid" { print $2; exit }' \
            "$WORK/mnt-$1/.imgfs/stats")
        [ -n "$SERVER" ] || die "build $1: no server pid in .imgfs/stats."
        FILE=$WORK/mnt-$1/bases/cost.raw
    fi
    stat "$FILE" >/dev/null || die "$1: cannot stat $FILE."
}
down() { # TARGET
    unmount_path "$WORK/mnt-$1"
    stop_pid "${PIDS[-1]}"
}

# The first build fills a cache; every build reads a copy of it.
up "${NAMES[0]}"
cat "$FILE" >/dev/null || die "the cold read that fills the cache failed."
down "${NAMES[0]}"
for n in "${NAMES[@]:1}"; do
    rm -rf "$WORK/cache-$n"
    cp -a "$WORK/cache-${NAMES[0]}" "$WORK/cache-$n" || die "cannot copy the cache."
done

# measure TARGET KIND: one run on a fresh mount, page cache dropped;
# prints "UNITS RATE CPU_MS CSW DISK_READS" (UNITS: reads, or MiB; RATE per second).
measure() {
    local what=$2 units t0 t1 d0 d1
    up "$1"
    drop
    perf stat -x, -e task-clock,context-switches -p "$SERVER" -o "$WORK/perf.csv" 2>/dev/null &
    local perf_pid=$!
    sleep 0.2
    d0=$(disk_reads)
    t0=$(date +%s.%N)
    if [ "$what" = random ]; then
        fio --name=r --filename="$FILE" --rw=randread --bs=4k --direct=1 --ioengine=libaio --iodepth="$IODEPTH" \
            --number_ios="$READS" --randseed=$((4242 + round)) --norandommap --size="$SIZE" \
            --output-format=json --output="$WORK/fio.json" >/dev/null 2>"$WORK/fio.log" ||
            die "$1: fio failed: $(tail -n 1 "$WORK/fio.log")"
        units=$READS
    else
        cat "$FILE" >/dev/null || die "$1: cat failed."
        units=$((SIZE >> 20))
    fi
    t1=$(date +%s.%N)
    d1=$(disk_reads)
    kill -INT "$perf_pid"
    wait "$perf_pid"
    down "$1"
    # fio's own rate, without its start-up; cat's from the wall clock
    local rate
    if [ "$what" = random ]; then
        rate=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' \
            "$WORK/fio.json") || die "$1: cannot read fio's report."
    else
        rate=$(awk -v u="$units" -v a="$t0" -v b="$t1" 'BEGIN { print u / (b - a) }')
    fi
    awk -F, -v u="$units" -v rate="$rate" -v d=$((d1 - d0)) '
        $3 == "task-clock" { c = $1 } $3 == "context-switches" { s = $1 }
        END { printf "%d %.1f %.1f %d %d\n", u, rate, c, s, d }' "$WORK/perf.csv"
}

TARGETS=(pass "${NAMES[@]}")
declare -A ROW
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)
for ((round = 1; round <= ROUNDS; round++)); do
    cat "$WORK/img.raw" "$WORK"/cache-*/packs/* >/dev/null # host-warm, see above
    k=$(((round - 1) % ${#TARGETS[@]}))
    for t in "${TARGETS[@]:k}" "${TARGETS[@]:0:k}"; do
        for what in random sequential; do
            log "round $round, $t, $what (load $(cut -d' ' -f1 /proc/loadavg))"
            read -r units rate cpu csw reads < <(measure "$t" "$what")
            # per read (random) or per MiB (sequential)
            ROW[$t,$what,$round]=$(awk -v u="$units" -v rate="$rate" -v c="$cpu" -v w="$csw" -v r="$reads" \
                'BEGIN { printf "%d | %.1f | %.2f | %.2f", rate, c * 1000 / u, w / u, r / u }')
        done
    done
done
if [ "$STRACE" = 1 ]; then
    declare -A SYS
    for t in "${TARGETS[@]}"; do
        log "$t under strace -c"
        up "$t"
        drop
        strace -qq -c -f -p "$SERVER" -o "$WORK/strace-$t.txt" &
        strace_pid=$!
        sleep 0.5
        fio --name=r --filename="$FILE" --rw=randread --bs=4k --direct=1 --ioengine=libaio --iodepth="$IODEPTH" \
            --number_ios="$READS" --randseed=4242 --norandommap --size="$SIZE" >/dev/null 2>&1 ||
            die "$t: fio under strace failed."
        kill -INT "$strace_pid"
        wait "$strace_pid"
        down "$t"
        # strace -c: % time, seconds, usecs/call, calls, [errors,] syscall
        SYS[$t]=$(awk -v n="$READS" '$NF == "total" { t = $4 } END { printf "%.2f", t / n }' "$WORK/strace-$t.txt")
        SYS[$t,calls]=$(awk -v n="$READS" '$1 ~ /^[0-9.]+$/ && $NF != "total" {
            if ($4 / n >= 0.01) printf "%s %.2f, ", $NF, $4 / n }' "$WORK/strace-$t.txt")
    done
fi
LOAD_END=$(cut -d" " -f1-3 /proc/loadavg)

# A table of ROW[target,KIND,round], a row per round and target: its title
# and the header of its four columns after "target | round".
round_table() {
    local title=$1 columns=$2 kind=$3 t round
    echo "$title"
    echo
    echo "| target | round | $columns |"
    echo "|---|---:|---:|---:|---:|---:|"
    for ((round = 1; round <= ROUNDS; round++)); do
        for t in "${TARGETS[@]}"; do echo "| $t | $round | ${ROW[$t,$kind,$round]} |"; done
    done
}

report() {
    local t
    echo "# imgfs: what one read of a cached base costs the server after a reboot, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- $(nproc) CPUs, kernel $(uname -r), work dir on $(findmnt -no FSTYPE -T "$WORK") ($DEV); $(fio --version)"
    echo "- builds: $BUILDS; pass: bench/fuse-null.c --base over the raw image"
    echo "- load average at start: $LOAD_START, at end: $LOAD_END"
    echo "- $((SIZE >> 20)) MiB random base, fully cached, page cache dropped before each run, a fresh mount each"
    echo
    round_table "Random 4 KiB O_DIRECT reads (fio libaio, iodepth $IODEPTH, $READS reads a run), per read:" \
        "reads/s | server CPU us/read | context switches/read | disk reads/read" random
    echo
    round_table "Sequential cat of the whole base, per MiB:" \
        "MiB/s | server CPU us/MiB | context switches/MiB | disk reads/MiB" sequential
    if [ "$STRACE" = 1 ]; then
        echo
        echo "| target | system calls/random read (strace -c -f) | by call |"
        echo "|---|---:|---|"
        for t in "${TARGETS[@]}"; do echo "| $t | ${SYS[$t]} | ${SYS[$t,calls]%, } |"; done
    fi
}

report | save_report read-cost
