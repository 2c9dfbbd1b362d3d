#!/usr/bin/env bash
# bench-takeover.sh: the pause a client sees when the serving process of a
# mount is replaced, by kill -9 (crash takeover) and by imgfsctl restart.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# A 64 MiB base is published to a local repository and a VM made on it. One
# client (tests/tools/blockcheck) writes random 4 KiB blocks of the VM disk
# with O_DIRECT, fsyncs each and reads it back, and logs every block that took
# more than 5 ms (CLOCK_MONOTONIC start and duration). Meanwhile the serving
# process is killed BENCH_KILLS times (default 20) and replaced with imgfsctl
# restart BENCH_RESTARTS times (default 5), each after the client has done
# 50 more blocks. The pause of one replacement is the longest block that
# overlaps the time from the kill (or the start of imgfsctl restart) until
# the new process answers. Reported: median and maximum per kind, against
# the mean block time of the same run; and the client's errors and
# mismatches (both must be 0).
#
# With BENCH_BASELINE_BIN (the build directory of another imgfs, for example
# one from before the supervisor, whose libfuse loop used clone_fd), it also
# measures what the receive loop costs: fio 4 KiB random O_DIRECT reads on a
# VM disk (libaio, 2 jobs, iodepth 16, 5 s), three runs of each build,
# alternating, each on a fresh mount; reported as mean IOPS and their ratio.
#
# Run as root. Environment:
#   BENCH_KILLS, BENCH_RESTARTS   see above
#   BENCH_BASELINE_BIN            see above (default: none)
#   BENCH_DIR       parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1    keep the work directory
#   IMGFS_BIN_DIR   where imgfs, imgfsctl and tests/blockcheck are
#                   (default <repo>/build)
# Output: Markdown on stdout, also written to bench/results/takeover-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"
KILLS=${BENCH_KILLS:-20}
RESTARTS=${BENCH_RESTARTS:-5}
[[ $KILLS =~ ^[0-9]+$ && $RESTARTS =~ ^[0-9]+$ ]] || die "BENCH_KILLS and BENCH_RESTARTS must be numbers."
BIN=${IMGFS_BIN_DIR:-$SRC_DIR/build}
require_root "it mounts FUSE file systems"
require_imgfs "$BIN"
[ -x "$BIN/tests/blockcheck" ] || die "$BIN/tests/blockcheck not found (build the blockcheck target)."
require_tools python3 fusermount3

make_work takeover
on_exit cleanup_all
M=$WORK/mnt
mkdir -p "$M" "$WORK/state" "$WORK/cache"
head -c $((64 << 20)) /dev/urandom > "$WORK/base.raw"
"$BIN/imgfsctl" publish "$WORK/base.raw" "$WORK/repo" --name base > /dev/null || die "publish failed."
"$BIN/imgfs" "$WORK/repo" "$M" -f -o "state=$WORK/state,cache=$WORK/cache" 2> "$WORK/imgfs.log" &
PIDS+=($!)
MOUNTS+=("$M")
wait_mounted "$M" 10 || die "imgfs did not mount (see $WORK/imgfs.log)."
"$BIN/imgfsctl" vm create "$M" vm --base base > /dev/null || die "vm create failed."
cat "$M/vms/vm.raw" > "$WORK/shadow"

"$BIN/tests/blockcheck" "$M/vms/vm.raw" "$WORK/shadow" 1 "$WORK/stop" "$WORK/slow" > "$WORK/client.out" \
    2> "$WORK/client.err" &
CLIENT=$!
PIDS+=("$CLIENT")

ops() { awk '/^OPS/ { n = $2 } END { print n + 0 }' "$WORK/client.out"; }
progress() {
    local want=$(($(ops) + $1)) _
    for _ in $(seq 1200); do
        [ "$(ops)" -ge "$want" ] && return 0
        kill -0 "$CLIENT" 2>/dev/null || die "the client stopped: $(head -n 3 "$WORK/client.err")"
        sleep 0.05
    done
    die "the client made no progress in 60 s."
}
server_pid() { awk '/^\[daemon\]/ { d = 1; next } /^\[/ { d = 0 } d && $1 == "pid" { print $2; exit }' "$M/.imgfs/stats"; }
now_ms() { python3 -c 'import time; print("%.3f" % (time.monotonic() * 1000))'; }
wait_new() {
    local _
    for _ in $(seq 600); do
        [ "$(server_pid)" != "$1" ] && return 0
        sleep 0.05
    done
    die "no new serving process after pid $1."
}

started=$(now_ms)
progress 200 # a baseline before the first replacement
: > "$WORK/events"
for ((i = 0; i < KILLS + RESTARTS; i++)); do
    progress 50
    old=$(server_pid)
    t=$(now_ms)
    if ((i < KILLS)); then
        kind=kill
        kill -9 "$old"
    else
        kind=restart
        "$BIN/imgfsctl" restart "$M" > /dev/null || die "imgfsctl restart failed."
    fi
    wait_new "$old"
    echo "$kind $t $(now_ms)" >> "$WORK/events"
    log "$((i + 1))/$((KILLS + RESTARTS)): pid $old replaced"
done
progress 50
touch "$WORK/stop"
ended=$(now_ms)
wait "$CLIENT"
client_status=$?
summary=$(tail -n 1 "$WORK/client.out")
ops_total=$(awk '{ print $2 }' <<< "$summary")

# fio_iops BIN N: mean 4 KiB random O_DIRECT read IOPS on a fresh mount of BIN.
fio_iops() {
    local bin=$1 n=$2
    local w=$WORK/fio.$n
    mkdir -p "$w/mnt" "$w/state" "$w/cache"
    "$bin/imgfs" "$WORK/repo" "$w/mnt" -f -o "state=$w/state,cache=$w/cache" 2> "$w/imgfs.log" &
    local pid=$!
    wait_mounted "$w/mnt" 10 || die "$bin/imgfs did not mount."
    "$bin/imgfsctl" vm create "$w/mnt" vm --base base > /dev/null || die "vm create failed."
    cat "$w/mnt/vms/vm.raw" > /dev/null # the base in the cache
    fio --name=r --filename="$w/mnt/vms/vm.raw" --direct=1 --rw=randread --bs=4k --ioengine=libaio --iodepth=16 \
        --numjobs=2 --runtime=5 --time_based --group_reporting --output-format=json 2> /dev/null |
        python3 -c 'import json, sys; print("%.0f" % json.load(sys.stdin)["jobs"][0]["read"]["iops"])'
    fusermount3 -u "$w/mnt"
    wait "$pid" 2> /dev/null
}
compare=""
if [ -n "${BENCH_BASELINE_BIN:-}" ]; then
    require_imgfs "$BENCH_BASELINE_BIN"
    require_tools fio
    base_iops=() new_iops=()
    for r in 1 2 3; do
        base_iops+=("$(fio_iops "$BENCH_BASELINE_BIN" "b$r")")
        new_iops+=("$(fio_iops "$BIN" "n$r")")
        log "fio run $r: baseline ${base_iops[-1]}, this build ${new_iops[-1]} IOPS"
    done
    compare="${base_iops[*]}/${new_iops[*]}"
fi

python3 - "$WORK/events" "$WORK/slow" "$ops_total" "$summary" "$client_status" "$KILLS" "$RESTARTS" \
    "$started" "$ended" "$compare" <<'PY' | save_report takeover
import statistics, sys
events_path, slow_path, ops_total, summary, status, kills, restarts, started, ended, compare = sys.argv[1:]
events = [(l.split()[0], float(l.split()[1]), float(l.split()[2])) for l in open(events_path)]
slow = [tuple(map(float, l.split())) for l in open(slow_path)]
def pause(t0, t1):
    # The longest block that overlaps [t0, t1]: from the kill (or the start
    # of imgfsctl restart) until the new process was seen serving.
    hit = [d for s, d in slow if s <= t1 and s + d >= t0]
    return max(hit) if hit else 0.0
by_kind = {}
for kind, t0, t1 in events:
    by_kind.setdefault(kind, []).append(pause(t0, t1))
print("# Takeover pause, %s kills and %s restarts\n" % (kills, restarts))
print("One client: random 4 KiB O_DIRECT write + fsync + read-back on a VM disk of a local repository.")
print("Pause: the longest client block overlapping a replacement, from the kill (or the start of")
print("imgfsctl restart) until the new process answered.\n")
print("| replacement | count | median ms | max ms |")
print("|---|---|---|---|")
for kind in ("kill", "restart"):
    p = by_kind.get(kind, [])
    if p:
        print("| %s | %d | %.0f | %.0f |" % ({"kill": "kill -9 (crash takeover)", "restart": "imgfsctl restart"}[kind],
                                           len(p), statistics.median(p), max(p)))
print("\nClient: %s (exit status %s)." % (summary, status))
print("Mean block time over the whole run: %.2f ms; blocks over 5 ms: %d of %s." %
      ((float(ended) - float(started)) / max(int(ops_total), 1), len(slow), ops_total))
if compare:
    base, new = ([float(x) for x in part.split()] for part in compare.split("/"))
    b, n = statistics.mean(base), statistics.mean(new)
    print("\nReceive loop: fio 4 KiB random O_DIRECT reads on a VM disk (libaio, 2 jobs, iodepth 16),")
    print("three alternating runs: baseline %s IOPS, this build %s IOPS; mean %.0f vs %.0f, ratio %.2f." %
          (" ".join("%.0f" % x for x in base), " ".join("%.0f" % x for x in new), b, n, n / b))
PY
