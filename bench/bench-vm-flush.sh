#!/usr/bin/env bash
# bench-vm-flush.sh: the O_DIRECT 4 KiB iodepth 16 VM-write row of
# bench-vm.sh for one or more imgfs builds beside the FUSE passthrough
# (bench/fuse-null.c with a backing file), with and without fsyncs, to tell
# the flush path from the write path.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# A repository holds a 1 MiB base (the VMs are blank: 4 KiB-aligned writes
# copy nothing up); each build mounts it with its own cache and state. The
# passthrough stores into a written 1 GiB file of random data (its clean
# pages dropped before each job, as fio does to a local file). Each round
# runs, for each fsync interval of BENCH_FSYNCS, fio libaio 4 KiB randwrite,
# O_DIRECT, iodepth BENCH_IODEPTH over 0-1 GiB of a new blank VM per build
# (fsync=0: no fsync at all, the write path alone) and of the passthrough's
# disk, the targets taking turns in going first. Reported per job: writes/s,
# fio's mean write and fsync latency; with BENCH_PERF=1 also the server's CPU
# microseconds and context switches per write (perf stat), with
# BENCH_OFFCPU=1 where its threads spent their time (perf sched_switch
# record and bench/offcpu.py: on a CPU, runnable, D, S, and the top stacks).
# Then the ratios to the passthrough (and to the first build), median and
# range over the rounds. BENCH_BS=1M runs bench-vm.sh's 1 MiB row instead:
# fio libaio 1 MiB sequential writes of 0-1 GiB (a fill, not time based, with
# an fsync at the end), reported in MiB/s. Every job also reports the MiB the
# device under the work directory wrote meanwhile (its /sys/block/DEV/stat:
# the data, the logs' records, zeros written ahead, the journal and whatever
# else the host wrote then).
#
# Run as root. Environment:
#   BENCH_BUILDS   "NAME=DIR ..." (default "this=<repo>/build")
#   BENCH_ROUNDS   rounds (default 5)
#   BENCH_TIME     seconds per fio job (default 6)
#   BENCH_FSYNCS   fsync intervals (default "32 0")
#   BENCH_IODEPTH  fio's --iodepth (default 16)
#   BENCH_BS       4k (default) or 1M (the sequential fill above)
#   BENCH_PERF=1 / BENCH_OFFCPU=1  the per-write costs / off-CPU times above
#   BENCH_DIR      parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1   keep the work directory (daemon logs, fio JSON, perf data)
# Output: Markdown on stdout, also written to bench/results/vm-flush-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

BUILDS=${BENCH_BUILDS:-this=$SRC_DIR/build}
ROUNDS=${BENCH_ROUNDS:-5}
RUNTIME=${BENCH_TIME:-6}
FSYNCS=(${BENCH_FSYNCS:-32 0})
IODEPTH=${BENCH_IODEPTH:-16}
BS=${BENCH_BS:-4k}
PERF=${BENCH_PERF:-0}
OFFCPU=${BENCH_OFFCPU:-0}
require_count "$ROUNDS" BENCH_ROUNDS
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "BENCH_TIME=$RUNTIME is not a number of seconds."
require_count "$IODEPTH" BENCH_IODEPTH
case $BS in
4k) FIO_RW=(--rw=randwrite --bs=4k --randrepeat=0 --time_based --runtime="$RUNTIME") UNIT=writes/s ;;
1M) FIO_RW=(--rw=write --bs=1M --end_fsync=1) UNIT=MiB/s ;;
*) die "BENCH_BS=$BS is neither 4k nor 1M." ;;
esac
for f in "${FSYNCS[@]}"; do [[ $f =~ ^[0-9]+$ ]] || die "BENCH_FSYNCS entry '$f' is not a count."; done

require_root "FUSE mounts"
require_tools fio python3 fusermount3 cc pkg-config
[ "$PERF" = 1 ] || [ "$OFFCPU" = 1 ] && require_tools perf
declare -A BIN
parse_builds "$BUILDS"

make_work imgfs-bench-vm-flush
on_exit cleanup_all

head -c 1M /dev/urandom >"$WORK/tiny.raw" # a repository needs a base; the VMs are blank
"${BIN[${NAMES[0]}]}/imgfsctl" publish "$WORK/tiny.raw" "$WORK/repo" --name tiny >"$WORK/publish.log" 2>&1 ||
    die "imgfsctl publish failed: $(tail -n 1 "$WORK/publish.log")"
for n in "${NAMES[@]}"; do mount_build "${BIN[$n]}" "$n" "$WORK/repo"; done
cc -O2 -Wall -Wextra -o "$WORK/fuse-null" "$SCRIPT_DIR/fuse-null.c" $(pkg-config --cflags --libs fuse3) -lpthread \
    2>"$WORK/fuse-null-cc.log" || die "cannot build fuse-null.c: $(tail -n 1 "$WORK/fuse-null-cc.log")"
head -c 1G /dev/urandom >"$WORK/pass.raw" && sync "$WORK/pass.raw" || die "cannot write $WORK/pass.raw."
mkdir -p "$WORK/mnt-pass"
"$WORK/fuse-null" "$WORK/mnt-pass" $((1 << 30)) 16 "$WORK/pass.raw" 2>"$WORK/fuse-pass.log" &
PASS_PID=$!
PIDS+=("$PASS_PID")
wait_mounted "$WORK/mnt-pass" 10 || die "fuse-null did not mount: $(tail -n 1 "$WORK/fuse-pass.log")"
MOUNTS+=("$WORK/mnt-pass")
TARGETS=("${NAMES[@]}" pass)

server_pid() { # the serving process of target $1
    [ "$1" = pass ] && { echo "$PASS_PID"; return; }
    awk '/^\[/ { d = ($0 == "[daemon]"); next } d && $1 == "pid" { print $2; exit }' "$WORK/mnt-$1/.imgfs/stats"
}
# Sectors written by the device that holds the work directory (its whole disk).
DEV=$(lsblk -no PKNAME "$(findmnt -no SOURCE -T "$WORK")" 2>/dev/null | head -n 1)
[ -n "$DEV" ] || DEV=$(basename "$(findmnt -no SOURCE -T "$WORK")")
dev_written() { awk '{ print $7 }' "/sys/block/$DEV/stat" 2>/dev/null || echo 0; }
drop_cache() { python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"; }

# job TARGET FSYNC NAME: one fio job; prints "rate write_us fsync_us device_MiB [cpu_us csw] [offcpu...]"
VMS=0
job() {
    local t=$1 f=$2 name=$3 disk pid perf_pid= off_pid= out=$WORK/fio-$3.json
    if [ "$t" = pass ]; then
        disk=$WORK/mnt-pass/disk
        drop_cache "$WORK/pass.raw"
    else
        VMS=$((VMS + 1))
        "${BIN[$t]}/imgfsctl" vm create "$WORK/mnt-$t" "v$VMS" --size 2G >/dev/null || die "build $t: vm create failed."
        disk=$WORK/mnt-$t/vms/v$VMS.raw
    fi
    pid=$(server_pid "$t")
    if [ "$PERF" = 1 ]; then
        perf stat -x, -e task-clock,context-switches -p "$pid" -o "$WORK/perf-$name.csv" &
        perf_pid=$!
    fi
    if [ "$OFFCPU" = 1 ]; then
        perf record -q -a -e sched:sched_switch -g -o "$WORK/off-$name.data" -- sleep $((RUNTIME - 1)) \
            >/dev/null 2>&1 &
        off_pid=$!
    fi
    sleep 0.2
    local dev_before
    dev_before=$(dev_written)
    fio --name="$name" --filename="$disk" "${FIO_RW[@]}" --direct=1 --ioengine=libaio --iodepth="$IODEPTH" \
        --offset=0 --size=1G --fsync="$f" --output-format=json \
        --output="$out" >/dev/null 2>"$WORK/fio-$name.err"
    local res dev_mib=$((($(dev_written) - dev_before) / 2048))
    res=$(python3 - "$out" "$BS" <<'PY' || echo "0 0 0 0 0"
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
w, s = job["write"], job.get("sync", {})
rate = w["bw_bytes"] / 1048576 if sys.argv[2] == "1M" else w["iops"]
print(round(rate), round(w["clat_ns"]["mean"] / 1000), round(s.get("lat_ns", {}).get("mean", 0) / 1000),
      w["total_ios"], job["job_runtime"] / 1000)
PY
)
    local ios
    read -r _ _ _ ios _ <<<"$res"
    res="$(cut -d' ' -f1-3 <<<"$res") $dev_mib"
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid"
        wait "$perf_pid"
        res+=" $(awk -F, -v n="$ios" '$3 == "task-clock" { c = $1 } $3 == "context-switches" { s = $1 }
            END { if (n > 0) printf "%.1f %.2f", c * 1000 / n, s / n; else print "- -" }' "$WORK/perf-$name.csv")"
    fi
    if [ -n "$off_pid" ]; then
        wait "$off_pid"
        res+=" $(perf script -i "$WORK/off-$name.data" -F pid,tid,time,event,trace,ip,sym 2>/dev/null |
            python3 "$SCRIPT_DIR/offcpu.py" "$pid" 4 | tr '\n' ' ')"
    fi
    [ "$t" = pass ] || "${BIN[$t]}/imgfsctl" vm rm "$WORK/mnt-$t" "v$VMS" >/dev/null 2>&1
    echo "$res"
}

declare -A R
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)
for ((round = 1; round <= ROUNDS; round++)); do
    k=$(((round - 1) % ${#TARGETS[@]}))
    for f in "${FSYNCS[@]}"; do
        for t in "${TARGETS[@]:k}" "${TARGETS[@]:0:k}"; do
            log "round $round, fsync=$f, $t (load $(cut -d' ' -f1 /proc/loadavg))"
            R[$t,$f,$round]=$(job "$t" "$f" "$t-$f-$round")
        done
    done
done
LOAD_END=$(cut -d" " -f1-3 /proc/loadavg)

report() {
    if [ "$BS" = 1M ]; then
        echo "# imgfs: O_DIRECT 1 MiB sequential writes of 0-1 GiB, $(date -u '+%Y-%m-%d %H:%M UTC')"
    else
        echo "# imgfs: O_DIRECT 4 KiB random writes, flush path and write path, $(date -u '+%Y-%m-%d %H:%M UTC')"
    fi
    echo
    echo "- $(nproc) CPUs, kernel $(uname -r), work dir on $(findmnt -no FSTYPE -T "$WORK"); $(fio --version)"
    echo "- builds: $BUILDS; pass: bench/fuse-null.c passthrough onto a written 1 GiB file"
    echo "- load average at start: $LOAD_START, at end: $LOAD_END"
    echo "- fio libaio ${FIO_RW[*]}, direct=1, iodepth $IODEPTH, a new blank VM per imgfs job; device: $DEV"
    echo
    echo "| fsync every | round | target | $UNIT | write latency, us | fsync latency, us | device MiB written |$([ "$PERF" = 1 ] && echo " CPU us/write | context switches/write |")$([ "$OFFCPU" = 1 ] && echo " off-CPU (offcpu.py) |")"
    echo "|---:|---:|---|---:|---:|---:|---:|$([ "$PERF" = 1 ] && echo "---:|---:|")$([ "$OFFCPU" = 1 ] && echo "---|")"
    local f round t
    for f in "${FSYNCS[@]}"; do
        for ((round = 1; round <= ROUNDS; round++)); do
            for t in "${TARGETS[@]}"; do
                read -r -a v <<<"${R[$t,$f,$round]}"
                local line="| $f | $round | $t | ${v[0]} | ${v[1]} | ${v[2]} | ${v[3]} |"
                [ "$PERF" = 1 ] && line+=" ${v[4]:-} | ${v[5]:-} |"
                [ "$OFFCPU" = 1 ] && line+=" ${v[*]:$([ "$PERF" = 1 ] && echo 6 || echo 4)} |"
                echo "$line"
            done
        done
    done
    echo
    echo "| fsync every | ratio | median | range | per round |"
    echo "|---:|---|---:|---|---|"
    for f in "${FSYNCS[@]}"; do
        local pairs=() n
        for n in "${NAMES[@]}"; do pairs+=("$n/pass"); done
        for n in "${NAMES[@]:1}"; do pairs+=("$n/${NAMES[0]}"); done
        for p in "${pairs[@]}"; do
            local a=${p%/*} b=${p#*/} vals=()
            for ((round = 1; round <= ROUNDS; round++)); do
                vals+=("${R[$a,$f,$round]%% *}" "${R[$b,$f,$round]%% *}")
            done
            python3 - "$f" "$p" "${vals[@]}" <<'PY'
import statistics, sys
f, p, v = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]]
r = [a / b for a, b in zip(v[::2], v[1::2]) if b > 0]
if r:
    print("| %s | %s | %.2f | %.2f-%.2f | %s |" % (f, p, statistics.median(r), min(r), max(r), " ".join("%.2f" % x for x in r)))
PY
        done
    done
}

report | save_report vm-flush
