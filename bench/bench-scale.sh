#!/usr/bin/env bash
# bench-scale.sh: a host with thousands of VM disks. How mount, `ls -l vms`,
# a lookup and a stats read grow from 200 to 2,000 VM disks over 200 base
# versions, and what the daemon's memory costs.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# One repository with 200 versions (10 bases of 20 versions, 1 GiB virtual
# each, 1 MiB of data). Two state directories: 200 VM disks and 2,000 VM
# disks (every tenth with a snapshot), created with `imgfsctl vm create`.
# For each, with a fresh mount:
#   mount      from starting imgfs until vms/ lists every disk
#   lookup     a first stat of 200 different disks (each one FUSE lookup), mean
#   stats      a read of .imgfs/stats, mean of 20
#   ls -l vms  the first listing (lookups of every entry), then a second one
#   RSS        of the daemon after all that
# With BASELINE_BIN_DIR (imgfs binaries of an older build, e.g. before the
# tree index) the same state is measured with those too, in the same run.
#
# Run as root (FUSE). Environment:
#   BENCH_VMS        the large VM count (default 2000; the small one is a tenth)
#   BENCH_DIR        parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1     keep the work directory
#   IMGFS_BIN_DIR    where imgfs and imgfsctl are (default <repo>/build)
#   BASELINE_BIN_DIR optional older imgfs binaries to compare with
# Output: a Markdown report on stdout, also written to
# bench/results/scale-<date>.md. Progress goes to stderr.
set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_DIR=$(dirname "$SCRIPT_DIR")
IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}
BENCH_NAME=bench-scale
. "$SCRIPT_DIR/lib.sh"

case ${1:-} in
-h | --help)
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
"") ;;
*) die "takes no arguments (see --help)." ;;
esac

require_root "FUSE mounts"
require_tools python3 qemu-img
require_imgfs "$IMGFS_BIN_DIR"
[ -z "${BASELINE_BIN_DIR:-}" ] || require_imgfs "$BASELINE_BIN_DIR"
LARGE=${BENCH_VMS:-2000}
[[ $LARGE =~ ^[0-9]+$ ]] && [ "$LARGE" -ge 20 ] || die "BENCH_VMS must be a number of at least 20."
SMALL=$((LARGE / 10))
IMGFSCTL=$IMGFS_BIN_DIR/imgfsctl

make_work imgfs-bench-scale
on_exit cleanup_all

log "publishing 200 versions"
truncate -s 1G "$WORK/base.raw"
for b in $(seq 0 9); do
    for v in $(seq 1 20); do
        head -c 1M /dev/urandom | dd of="$WORK/base.raw" conv=notrunc status=none
        "$IMGFSCTL" publish "$WORK/base.raw" "$WORK/repo" --name "os$b" --threads 1 >/dev/null ||
            die "publish failed."
    done
done

DAEMON=
start() { # bin_dir state mountpoint
    mkdir -p "$3" "$WORK/cache"
    "$1/imgfs" "$WORK/repo" "$3" -f -o "cache=$WORK/cache,state=$2" 2>>"$WORK/imgfs.log" &
    DAEMON=$!
    PIDS+=("$DAEMON")
    MOUNTS+=("$3")
}
stop() { # mountpoint
    unmount_path "$1"
    stop_pid "$DAEMON"
}

log "creating $LARGE VM disks"
for n in "$SMALL" "$LARGE"; do
    mkdir -p "$WORK/state$n"
    start "$IMGFS_BIN_DIR" "$WORK/state$n" "$WORK/mnt"
    wait_mounted "$WORK/mnt" 20 || die "imgfs did not mount."
    for i in $(seq 0 $((n - 1))); do
        "$IMGFSCTL" vm create "$WORK/mnt" "vm$i" --base "os$((i % 10))" >/dev/null || die "vm create failed."
        [ $((i % 10)) -eq 0 ] && { "$IMGFSCTL" vm snapshot "$WORK/mnt" "vm$i" s1 >/dev/null || die "vm snapshot failed."; }
    done
    stop "$WORK/mnt"
done

# Prints: mount_s lookup_us stats_ms ls_first_ms ls_second_ms rss_mib
measure() { # bin_dir state vm_count
    local t0 rss
    t0=$(date +%s.%N)
    start "$1" "$2" "$WORK/mnt"
    python3 - "$WORK/mnt" "$3" "$t0" <<'EOF'
import os, sys, time
mnt, n, t0 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.time() + 120
want = n + (n + 9) // 10
while True:
    try:
        if len(os.listdir(mnt + "/vms")) >= want:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("the mount did not show every disk")
    time.sleep(0.005)
mount_s = time.time() - t0
names = [f"{mnt}/vms/vm{i}.raw" for i in range(1, n, max(1, n // 200))][:200]
t = time.perf_counter()
for p in names:
    os.stat(p)
lookup_us = (time.perf_counter() - t) / len(names) * 1e6
t = time.perf_counter()
for _ in range(20):
    with open(mnt + "/.imgfs/stats", "rb") as f:
        f.read()
stats_ms = (time.perf_counter() - t) / 20 * 1e3
def ls_l():
    t = time.perf_counter()
    for e in os.scandir(mnt + "/vms"):
        e.stat(follow_symlinks=False)
    return (time.perf_counter() - t) * 1e3
print(f"{mount_s:.3f} {lookup_us:.0f} {stats_ms:.2f} {ls_l():.1f} {ls_l():.1f}")
EOF
    rss=$(awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$DAEMON/status")
    stop "$WORK/mnt"
    echo "$rss"
}

declare -A R
for bin in new ${BASELINE_BIN_DIR:+old}; do
    dir=$IMGFS_BIN_DIR
    [ "$bin" = old ] && dir=$BASELINE_BIN_DIR
    for n in "$SMALL" "$LARGE"; do
        log "measuring $n disks ($bin)"
        out=$(measure "$dir" "$WORK/state$n" "$n") || die "measuring $n disks failed."
        R[$bin,$n]=$(echo $out)
    done
done

row() { # label field(1-6) unit
    local line="| $1 |" bin v s l
    for bin in new ${BASELINE_BIN_DIR:+old}; do
        s=$(echo "${R[$bin,$SMALL]}" | cut -d' ' -f"$2")
        l=$(echo "${R[$bin,$LARGE]}" | cut -d' ' -f"$2")
        v=$(awk -v a="$l" -v b="$s" 'BEGIN { printf "%.2fx", a / (b > 0 ? b : 0.001) }')
        line="$line $s | $l | $v |"
    done
    echo "$line"
}
{
    echo "# imgfs scale benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(nproc) CPUs, $(uname -r). 200 base versions; $SMALL and $LARGE VM disks (a tenth with a snapshot)."
    echo "Command: \`bash bench/bench-scale.sh\`${BASELINE_BIN_DIR:+ with BASELINE_BIN_DIR (the older build, right columns)}."
    echo
    head="| | $SMALL disks | $LARGE disks | growth |"
    sep="|---|---:|---:|---:|"
    if [ -n "${BASELINE_BIN_DIR:-}" ]; then
        head="$head baseline $SMALL | baseline $LARGE | growth |"
        sep="$sep---:|---:|---:|"
    fi
    echo "$head"
    echo "$sep"
    row "mount until vms/ is complete (s)" 1
    row "one lookup, first stat of a disk (us)" 2
    row "read of .imgfs/stats (ms)" 3
    row "ls -l vms, first (ms)" 4
    row "ls -l vms, again (ms)" 5
    row "daemon RSS (MiB)" 6
} | save_report scale
