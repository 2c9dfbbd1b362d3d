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
#   mount      from starting imgfs until vms/ lists every disk, and the CPU
#              time the daemon used for it (user + system, 10 ms ticks: what
#              load on a shared machine does not stretch)
#   lookup     a stat of every disk (VM disks have no entry cache, so each
#              is one FUSE lookup), mean, best of 5 rounds
#   miss       a stat of 2,000 names that do not exist (each a FUSE lookup
#              that searches the whole directory: the old scan's worst case)
#   stats      a read of .imgfs/stats, best of 10
#   metrics    a read of .imgfs/metrics (what a Prometheus scrape reads), best of 10
#   ls -l vms  a listing with a stat of every entry, best of 5
#   control    a control command that names a VM (trace-stop of a VM that
#              is not traced: it finds the VM and does nothing else), written
#              to .imgfs/control as imgfsctl does, on the last-made VM and
#              on a name that is no VM (what a scan of every VM costs most
#              on), mean of 200, best of 5
#   vm create  `imgfsctl vm create` of one more VM on a base (it is removed
#              after each), best of 5
#   vm rm      `imgfsctl vm rm` of that VM, best of 5 (what goes with it is
#              decided from the VMs that share its layers, or from all)
#   size       of .imgfs/stats: what a read of it prints
#   CPU a read the server's CPU time (user + system) over 50 reads of
#              .imgfs/stats, and of .imgfs/metrics, per read: what load on a
#              shared machine stretches least
#   RSS        of the daemon (supervisor and server) after all that
# Each figure is the best of three mounts (the machine may be shared).
# With BASELINE_BIN_DIR (imgfs binaries of an older build, e.g. before the
# tree index) the same state is measured with those too, in the same run,
# each mount of one build followed by the same mount with the other.
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
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}

no_args_but_help "$@"

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

# Prints: mount_s lookup_us miss_us stats_ms ls_ms metrics_ms mount_cpu_ms
#         control_last_us control_missing_us create_ms stats_cpu_ms metrics_cpu_ms stats_kib rm_ms rss_mib
FIELDS=15
measure() { # bin_dir state vm_count
    local t0 rss
    t0=$(date +%s.%N)
    start "$1" "$2" "$WORK/mnt"
    python3 - "$WORK/mnt" "$3" "$t0" "$DAEMON" "$1/imgfsctl" <<'EOF'
import os, subprocess, sys, time
mnt, n, t0, daemon, imgfsctl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
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
def cpu_ms(pid): # user + system of every thread, living or gone
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
with open(f"/proc/{daemon}/task/{daemon}/children") as f:
    servers = [int(p) for p in f.read().split()]
mount_cpu_ms = cpu_ms(daemon) + sum(cpu_ms(p) for p in servers)
def mean_stat_us(names):
    best = None
    for _ in range(5):
        t = time.perf_counter()
        for p in names:
            try:
                os.stat(p)
            except FileNotFoundError:
                pass
        us = (time.perf_counter() - t) / len(names) * 1e6
        best = us if best is None else min(best, us)
    return best
# VM disks have no entry cache (entry_timeout 0): every stat is a lookup.
lookup_us = mean_stat_us([f"{mnt}/vms/vm{i}.raw" for i in range(n)])
miss_us = mean_stat_us([f"{mnt}/vms/none{i}.raw" for i in range(2000)])
def best_ms(fn, rounds):
    best = None
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        best = ms if best is None else min(best, ms)
    return best
def read_stats():
    with open(mnt + "/.imgfs/stats", "rb") as f:
        return len(f.read())
def read_metrics():
    with open(mnt + "/.imgfs/metrics", "rb") as f:
        f.read()
def ls_l():
    for e in os.scandir(mnt + "/vms"):
        e.stat(follow_symlinks=False)
def control(name): # what imgfsctl does: write the command, read the answer
    fd = os.open(mnt + "/.imgfs/control", os.O_RDWR)
    try:
        os.write(fd, f"trace-stop\t{name}".encode())
        os.pread(fd, 4096, 0)
    except OSError:
        pass # the answer to a name that is no VM
    finally:
        os.close(fd)
def control_us(name):
    return best_ms(lambda: [control(name) for _ in range(200)], 5) * 1e3 / 200
def create():
    subprocess.run([imgfsctl, "vm", "create", mnt, "bench-extra", "--base", "os0"], check=True,
                   stdout=subprocess.DEVNULL)
rm_best = None
def create_ms():
    global rm_best
    best = None
    for _ in range(5):
        t = time.perf_counter()
        create()
        ms = (time.perf_counter() - t) * 1e3
        best = ms if best is None else min(best, ms)
        t = time.perf_counter()
        subprocess.run([imgfsctl, "vm", "rm", mnt, "bench-extra"], check=True, stdout=subprocess.DEVNULL)
        ms = (time.perf_counter() - t) * 1e3
        rm_best = ms if rm_best is None else min(rm_best, ms)
    return best
def cpu_per_read_ms(fn, reads=50):
    before = sum(cpu_ms(p) for p in servers)
    for _ in range(reads):
        fn()
    return (sum(cpu_ms(p) for p in servers) - before) / reads
stats_ms = best_ms(read_stats, 10)
ls_ms = best_ms(ls_l, 5)
print(f"{mount_s:.3f} {lookup_us:.1f} {miss_us:.1f} {stats_ms:.2f} {ls_ms:.1f} {best_ms(read_metrics, 10):.2f} "
      f"{mount_cpu_ms:.0f} {control_us(f'vm{n - 1}'):.1f} {control_us('none'):.1f} {create_ms():.1f} "
      f"{cpu_per_read_ms(read_stats):.2f} {cpu_per_read_ms(read_metrics):.2f} {read_stats() / 1024:.0f} {rm_best:.1f}")
EOF
    # imgfs is a supervisor and the server it runs (supervisor.h): both count.
    rss=$(for p in "$DAEMON" $(pgrep -P "$DAEMON"); do cat "/proc/$p/status"; done |
        awk '/^VmRSS/ { kb += $2 } END { printf "%.1f", kb / 1024 }')
    stop "$WORK/mnt"
    echo "$rss"
}

# One mount of each state first, unmeasured: whatever a first mount after
# the creations does (page cache, layer files) is not charged to one build.
for n in "$SMALL" "$LARGE"; do
    start "$IMGFS_BIN_DIR" "$WORK/state$n" "$WORK/mnt"
    wait_mounted "$WORK/mnt" 20 || die "imgfs did not mount."
    ls -l "$WORK/mnt/vms" >/dev/null
    stop "$WORK/mnt"
done

# Three rounds; in each, every state is mounted with each build in turn
# (interleaved: what the machine does meanwhile falls on both).
declare -A R RUNS
for round in 1 2 3; do
    for n in "$SMALL" "$LARGE"; do
        for bin in new ${BASELINE_BIN_DIR:+old}; do
            dir=$IMGFS_BIN_DIR
            [ "$bin" = old ] && dir=$BASELINE_BIN_DIR
            log "measuring $n disks ($bin, round $round)"
            RUNS[$bin,$n]+=$(measure "$dir" "$WORK/state$n" "$n")$'\n' || die "measuring $n disks failed."
        done
    done
done
# The best of three mounts, field by field (this machine is shared).
for key in "${!RUNS[@]}"; do
    R[$key]=$(echo "${RUNS[$key]}" | tr -s ' \n' ' ' | awk -v f=$FIELDS '{ for (i = 1; i <= f; i++) { m = $i;
        for (j = i + f; j <= NF; j += f) if ($j < m) m = $j; printf "%s ", m } }')
done

row() { # label field(1-$FIELDS)
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
    row "CPU the daemon used to mount (ms)" 7
    row "one lookup: stat of a disk (us)" 2
    row "one lookup of a name that does not exist (us)" 3
    row "read of .imgfs/stats (ms)" 4
    row "ls -l vms (ms)" 5
    row "read of .imgfs/metrics (ms)" 6
    row "control command on the last-made VM (us)" 8
    row "control command on a name that is no VM (us)" 9
    row "imgfsctl vm create of one more VM (ms)" 10
    row "imgfsctl vm rm of that VM (ms)" 14
    row "server CPU per read of .imgfs/stats (ms)" 11
    row "server CPU per read of .imgfs/metrics (ms)" 12
    row "size of .imgfs/stats (KiB)" 13
    row "daemon RSS (MiB)" 15
} | save_report scale
