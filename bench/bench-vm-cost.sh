#!/usr/bin/env bash
# bench-vm-cost.sh: what one VM write costs the serving process, for two or
# more imgfs builds side by side: CPU microseconds and context switches per
# write (perf stat on the server's threads) and system calls per write
# (strace -c, in a run of its own since strace slows the server down).
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# Counts per write are stable where throughput is not: they do not depend
# on the load from elsewhere on the host, except the context switches a
# little. Each build mounts a repository of one tiny base with its own cache and
# state; a blank 1 GiB VM disk is written once with 1 MiB writes (so the
# rows below run on a written disk, as bench-vm.sh's "written" rows), then
# each round runs, for each build in turn (taking turns in going first):
# fio 4 KiB randwrite, libaio, iodepth 1 (BENCH_IODEPTH), an fsync every 32
# writes, a fixed number of writes, buffered or O_DIRECT (BENCH_DIRECT),
# under perf stat (and the server's user and system time from
# /proc/PID/stat, in clock ticks: coarse, for the split between the two);
# then once more under strace -c -f. Per-write figures divide the server's
# counts by fio's write count (the flushes' cost is counted in, 1/32 each).
#
# Run as root. Environment:
#   BENCH_BUILDS   "NAME=DIR ..." (default "this=<repo>/build")
#   BENCH_ROUNDS   rounds (default 3)
#   BENCH_WRITES   writes per fio run (default 20000)
#   BENCH_DIRECT   0 (default) or 1: fio's --direct
#   BENCH_IODEPTH  fio's --iodepth (default 1)
#   BENCH_STRACE=0 skip the strace runs
#   BENCH_DIR      parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1   keep the work directory
# Output: Markdown on stdout, also written to bench/results/vm-cost-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

BUILDS=${BENCH_BUILDS:-this=$SRC_DIR/build}
ROUNDS=${BENCH_ROUNDS:-3}
WRITES=${BENCH_WRITES:-20000}
DIRECT=${BENCH_DIRECT:-0}
IODEPTH=${BENCH_IODEPTH:-1}
STRACE=${BENCH_STRACE:-1}
require_count "$ROUNDS" BENCH_ROUNDS
require_count "$WRITES" BENCH_WRITES
[[ $DIRECT =~ ^[01]$ ]] || die "BENCH_DIRECT=$DIRECT is not 0 or 1."
require_count "$IODEPTH" BENCH_IODEPTH

require_root "FUSE mounts"
require_tools fio perf strace python3 fusermount3
declare -A BIN
parse_builds "$BUILDS"

make_work imgfs-bench-vm-cost
on_exit cleanup_all

server_pid() { # the serving process of build $1's mount
    awk '/^\[/ { d = ($0 == "[daemon]"); next } d && $1 == "pid" { print $2; exit }' "$WORK/mnt-$1/.imgfs/stats"
}

# fio_writes NAME FILE: runs the measured job, prints fio's write count
fio_writes() {
    local out="$WORK/fio-$1.json"
    fio --name="$1" --filename="$2" --rw=randwrite --bs=4k --direct="$DIRECT" --ioengine=libaio --iodepth="$IODEPTH" \
        --offset=0 --size=1G --randrepeat=0 --fsync=32 --number_ios="$WRITES" --output-format=json \
        --output="$out" >/dev/null 2>"$WORK/fio-$1.err" || { echo 0; return; }
    python3 - "$out" <<'PY' || echo 0
import json, sys
text = open(sys.argv[1]).read()
print(json.loads(text[text.index("{"):])["jobs"][0]["write"]["total_ios"])
PY
}

head -c 1M /dev/urandom >"$WORK/tiny.raw" # a repository needs a base; the VMs are blank
"${BIN[${NAMES[0]}]}/imgfsctl" publish "$WORK/tiny.raw" "$WORK/repo" --name tiny >"$WORK/publish.log" 2>&1 ||
    die "imgfsctl publish failed: $(tail -n 1 "$WORK/publish.log")"
for n in "${NAMES[@]}"; do
    mount_build "${BIN[$n]}" "$n" "$WORK/repo"
    "${BIN[$n]}/imgfsctl" vm create "$WORK/mnt-$n" cost --size 1G >/dev/null || die "build $n: vm create failed."
    fio --name=fill --filename="$WORK/mnt-$n/vms/cost.raw" --rw=write --bs=1M --direct=1 --ioengine=libaio \
        --iodepth=16 --size=1G --end_fsync=1 >/dev/null 2>&1 || die "build $n: the 1 GiB fill failed."
done

ticks() { awk '{ print $14 + 0, $15 + 0 }' "/proc/$1/stat"; } # utime stime
declare -A CPU CSW SYS IOPS USR KRN
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)
for ((round = 1; round <= ROUNDS; round++)); do
    k=$(((round - 1) % ${#NAMES[@]}))
    for t in "${NAMES[@]:k}" "${NAMES[@]:0:k}"; do
        pid=$(server_pid "$t")
        [ -n "$pid" ] || die "build $t: no server pid in .imgfs/stats."
        log "round $round, $t (server $pid, load $(cut -d' ' -f1 /proc/loadavg))"
        perf stat -x, -e task-clock,context-switches -p "$pid" -o "$WORK/perf-$t-$round.csv" &
        perf_pid=$!
        sleep 0.2
        read -r u0 s0 < <(ticks "$pid")
        start=$(date +%s.%N)
        writes=$(fio_writes "$t-$round" "$WORK/mnt-$t/vms/cost.raw")
        end=$(date +%s.%N)
        read -r u1 s1 < <(ticks "$pid")
        hz=$(getconf CLK_TCK)
        USR[$t,$round]=$(awk -v d=$((u1 - u0)) -v hz="$hz" -v w="$writes" 'BEGIN { printf "%.1f", w ? d * 1e6 / hz / w : 0 }')
        KRN[$t,$round]=$(awk -v d=$((s1 - s0)) -v hz="$hz" -v w="$writes" 'BEGIN { printf "%.1f", w ? d * 1e6 / hz / w : 0 }')
        kill -INT "$perf_pid"
        wait "$perf_pid"
        read -r cpu csw < <(awk -F, '$3 == "task-clock" { c = $1 } $3 == "context-switches" { s = $1 }
            END { print c, s }' "$WORK/perf-$t-$round.csv")
        CPU[$t,$round]=$(awk -v c="$cpu" -v w="$writes" 'BEGIN { printf "%.1f", w ? c * 1000 / w : 0 }')
        CSW[$t,$round]=$(awk -v c="$csw" -v w="$writes" 'BEGIN { printf "%.2f", w ? c / w : 0 }')
        IOPS[$t,$round]=$(awk -v w="$writes" -v a="$start" -v b="$end" 'BEGIN { printf "%d", w / (b - a) }')
    done
done
if [ "$STRACE" = 1 ]; then
    for t in "${NAMES[@]}"; do
        pid=$(server_pid "$t")
        log "$t under strace -c"
        strace -qq -c -f -p "$pid" -o "$WORK/strace-$t.txt" &
        strace_pid=$!
        sleep 0.5
        writes=$(fio_writes "$t-strace" "$WORK/mnt-$t/vms/cost.raw")
        kill -INT "$strace_pid"
        wait "$strace_pid"
        # strace -c: % time, seconds, usecs/call, calls, [errors,] syscall
        SYS[$t]=$(awk -v w="$writes" '$NF == "total" { t = $4 } END { printf "%.2f", w ? t / w : 0 }' \
            "$WORK/strace-$t.txt")
        SYS[$t,calls]=$(awk -v w="$writes" '$1 ~ /^[0-9.]+$/ && $NF != "total" && w {
            if ($4 / w >= 0.01) printf "%s %.2f, ", $NF, $4 / w }' "$WORK/strace-$t.txt")
    done
fi
LOAD_END=$(cut -d" " -f1-3 /proc/loadavg)

report() {
    local t round
    echo "# imgfs: what one VM write costs the server, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- $(nproc) CPUs, kernel $(uname -r), work dir on $(findmnt -no FSTYPE -T "$WORK"); $(fio --version)"
    echo "- builds: $BUILDS"
    echo "- load average at start: $LOAD_START, at end: $LOAD_END"
    echo "- fio libaio 4 KiB randwrite, direct=$DIRECT, iodepth $IODEPTH, an fsync every 32, $WRITES writes a run, on a written 1 GiB VM disk"
    echo
    echo "| build | round | writes/s | CPU us/write | of it user / system (/proc, ticks) | context switches/write |"
    echo "|---|---:|---:|---:|---:|---:|"
    for ((round = 1; round <= ROUNDS; round++)); do
        for t in "${NAMES[@]}"; do
            echo "| $t | $round | ${IOPS[$t,$round]} | ${CPU[$t,$round]} | ${USR[$t,$round]} / ${KRN[$t,$round]} | ${CSW[$t,$round]} |"
        done
    done
    if [ "$STRACE" = 1 ]; then
        echo
        echo "| build | system calls/write (strace -c -f) | by call |"
        echo "|---|---:|---|"
        for t in "${NAMES[@]}"; do echo "| $t | ${SYS[$t]} | ${SYS[$t,calls]%, } |"; done
    fi
}

report | save_report vm-cost
