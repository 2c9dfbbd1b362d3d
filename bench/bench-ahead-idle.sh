#!/usr/bin/env bash
# bench-ahead-idle.sh: what VMs that stopped writing hold of the daemon's
# 1 GiB of zeros ahead (layer.h, Disk), for two or more builds side by side.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# Each build mounts an empty repository with its own state directory (all
# at once: each daemon has its own budget). In each, BENCH_VMS blank 1 GiB
# VM disks each get one small write and an fsync (what a guest that flushes
# little asks zeros for), then nothing. Reported per build: the daemon's
# zeroed_ahead_bytes ([vms] in .imgfs/stats) and the blocks its layer files
# take on disk (du), once the zeros are written, and again BENCH_IDLE
# seconds later with no write meanwhile; then one VM writes and flushes
# again, and what is held once its zeros came (or BENCH_IDLE seconds).
#
# Run as root (FUSE). Environment:
#   BENCH_BUILDS  "NAME=DIR ..." (default "this=<repo>/build"), each DIR
#                 with imgfs and imgfsctl
#   BENCH_VMS     VM disks per build (default 40)
#   BENCH_IDLE    seconds to stay idle (default 75: past the 60 s after which
#                 a layer gives its zeros back)
#   BENCH_DIR     parent of the work directory (default /var/tmp; not tmpfs,
#                 where nothing is zeroed ahead)
#   BENCH_KEEP=1  keep the work directory
# Output: Markdown on stdout, also written to bench/results/ahead-idle-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

BUILDS=${BENCH_BUILDS:-this=$SRC_DIR/build}
VMS=${BENCH_VMS:-40}
IDLE=${BENCH_IDLE:-75}
require_count "$VMS" BENCH_VMS
[[ $IDLE =~ ^[1-9][0-9]*$ ]] || die "BENCH_IDLE=$IDLE is not a number of seconds."
require_root "FUSE mounts"
require_tools python3 du
declare -A BIN
parse_builds "$BUILDS"

make_work imgfs-bench-ahead-idle
on_exit cleanup_all
[ "$(stat -f -c %T "$WORK")" != tmpfs ] || die "$WORK is on tmpfs, where nothing is zeroed ahead (set BENCH_DIR)."

mkdir -p "$WORK/repo"
first=${NAMES[0]}
truncate -s 4M "$WORK/empty.raw"
"${BIN[$first]}/imgfsctl" publish "$WORK/empty.raw" "$WORK/repo" --name empty >/dev/null ||
    die "cannot make the repository."

for name in "${NAMES[@]}"; do
    mkdir -p "$WORK/$name/mnt" "$WORK/$name/state" "$WORK/$name/cache"
    "${BIN[$name]}/imgfs" "$WORK/repo" "$WORK/$name/mnt" -f \
        -o "cache=$WORK/$name/cache,state=$WORK/$name/state" 2>>"$WORK/$name/imgfs.log" &
    PIDS+=($!)
    MOUNTS+=("$WORK/$name/mnt")
    wait_mounted "$WORK/$name/mnt" 20 || die "imgfs ($name) did not mount."
    for i in $(seq "$VMS"); do
        "${BIN[$name]}/imgfsctl" vm create "$WORK/$name/mnt" "vm$i" --size 1G >/dev/null || die "vm create failed."
    done
done

held() { # name: zeroed_ahead_bytes in MiB
    awk '/^\[vms\]/ { in_vms = 1; next } /^\[/ { in_vms = 0 }
        in_vms && $1 == "zeroed_ahead_bytes" { printf "%.0f", $2 / 1048576 }' "$WORK/$1/mnt/.imgfs/stats"
}
disk() { du -sm "$WORK/$1/state/layers" | cut -f1; } # name: MiB the layer files take
small_write() { # file seed
    python3 - "$1" "$2" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
os.pwrite(fd, bytes([int(sys.argv[2]) % 256]) * 16384, int(sys.argv[2]) * 16384)
os.fsync(fd)
os.close(fd)
EOF
}
# Waits up to $IDLE s for each build to hold what it asks for (its zeros
# come on a background thread).
wait_held() { # want_mib_per_build
    local end=$((SECONDS + IDLE)) name all
    while [ $SECONDS -lt $end ]; do
        all=1
        for name in "${NAMES[@]}"; do [ "$(held "$name")" -ge "$1" ] || all=0; done
        [ $all -eq 1 ] && return 0
        sleep 1
    done
}

log "one small write and fsync to each of $VMS VM disks per build"
for name in "${NAMES[@]}"; do
    for i in $(seq "$VMS"); do small_write "$WORK/$name/mnt/vms/vm$i.raw" "$i" || die "a write failed."; done
done
wait_held $((VMS * 4))
declare -A H0 D0 H1 D1 H2
for name in "${NAMES[@]}"; do H0[$name]=$(held "$name") D0[$name]=$(disk "$name"); done
log "idle for $IDLE s"
sleep "$IDLE"
for name in "${NAMES[@]}"; do H1[$name]=$(held "$name") D1[$name]=$(disk "$name"); done
log "one VM writes again"
for name in "${NAMES[@]}"; do small_write "$WORK/$name/mnt/vms/vm1.raw" 100 || die "a write failed."; done
sleep 2
wait_held 4
for name in "${NAMES[@]}"; do H2[$name]=$(held "$name"); done

{
    echo "# imgfs zeros ahead of idle VMs, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(nproc) CPUs, $(uname -r). $VMS blank VM disks per build, one 16 KiB write and fsync each, then $IDLE s"
    echo "with no write. Command: \`BENCH_BUILDS=\"$BUILDS\" bash bench/bench-ahead-idle.sh\`."
    echo
    echo "| build | zeroed ahead after the writes (MiB) | layer files (MiB) | after $IDLE s idle | layer files | after one VM writes again |"
    echo "|---|---:|---:|---:|---:|---:|"
    for name in "${NAMES[@]}"; do
        echo "| $name | ${H0[$name]} | ${D0[$name]} | ${H1[$name]} | ${D1[$name]} | ${H2[$name]} |"
    done
} | save_report ahead-idle
