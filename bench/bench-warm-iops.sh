#!/usr/bin/env bash
# bench-warm-iops.sh: warm random-read IOPS of a base, this build against a
# baseline build of imgfs (for example the commit before a change), side by
# side in one run.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# One random image (BENCH_SIZE, default 256M) is published once; each build
# mounts it with its own cache, is warmed by one full read, and then fio
# reads 4 KiB at random: 2 jobs, libaio, iodepth 16, BENCH_TIME seconds,
# direct=1 (every read crosses FUSE) and direct=0 (the page cache). The two
# builds take turns, twice each, and the better run of each is kept.
#
# Run as root (FUSE). Environment:
#   BASELINE_BIN_DIR  the other build's imgfs and imgfsctl (required)
#   IMGFS_BIN_DIR     this build (default <repo>/build)
#   BENCH_SIZE        image size (default 256M)
#   BENCH_TIME        seconds per fio run (default 8)
#   BENCH_DIR, BENCH_KEEP=1 as in bench/lib.sh
# Output: a Markdown report on stdout, also in bench/results/warm-iops-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}
BENCH_SIZE=${BENCH_SIZE:-256M}
TIME=${BENCH_TIME:-8}

[ -n "${BASELINE_BIN_DIR:-}" ] || die "set BASELINE_BIN_DIR to the build to compare with (see --help)."
require_root "FUSE mounts"
require_tools fio fusermount3
require_imgfs "$IMGFS_BIN_DIR"
require_imgfs "$BASELINE_BIN_DIR"
SIZE_BYTES=$(to_bytes "$BENCH_SIZE" BENCH_SIZE)
[[ $TIME =~ ^[0-9]+$ ]] && [ "$TIME" -gt 0 ] || die "BENCH_TIME=$TIME is not a number of seconds."

make_work imgfs-iops
on_exit cleanup_all
head -c "$SIZE_BYTES" /dev/urandom >"$WORK/img.raw"
"$IMGFS_BIN_DIR/imgfsctl" publish "$WORK/img.raw" "$WORK/repo" --name w >/dev/null || die "publish failed."
rm -f "$WORK/img.raw"

declare -A MNT
for b in new base; do
    dir=$IMGFS_BIN_DIR
    [ $b = base ] && dir=$BASELINE_BIN_DIR
    MNT[$b]=$WORK/mnt-$b
    mount_build "$dir" "$b" "$WORK/repo" prefetch=none
    cat "${MNT[$b]}/bases/w.raw" >/dev/null || die "warming the $b build failed."
done

iops() { # FILE DIRECT
    fio --name=r --filename="$1" --rw=randread --bs=4k --numjobs=2 --ioengine=libaio --iodepth=16 \
        --direct="$2" --time_based --runtime="$TIME" --group_reporting --invalidate=0 --output-format=terse \
        --terse-version=3 2>/dev/null | awk -F';' '{ printf "%d\n", $8 }'
}

declare -A BEST
for direct in 1 0; do
    for round in 1 2; do
        for b in new base; do
            v=$(iops "${MNT[$b]}/bases/w.raw" $direct)
            log "direct=$direct round $round $b: $v IOPS"
            k=$b.$direct
            [ "${BEST[$k]:-0}" -lt "${v:-0}" ] && BEST[$k]=$v
        done
    done
done

{
    echo "# Warm random 4 KiB reads of a base ($(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg))"
    echo
    echo "- $((SIZE_BYTES >> 20)) MiB random image, warmed by one full read; fio randread 4k, 2 jobs, libaio iodepth 16, ${TIME} s; best of 2"
    echo
    echo "| reads | baseline IOPS | this build IOPS | ratio |"
    echo "|---|---:|---:|---:|"
    for direct in 1 0; do
        what="O_DIRECT (through FUSE)"
        [ $direct = 0 ] && what="page cache"
        echo "| $what | ${BEST[base.$direct]} | ${BEST[new.$direct]} | $(awk -v a="${BEST[new.$direct]}" -v b="${BEST[base.$direct]}" 'BEGIN { printf "%.2fx", a / b }') |"
    done
} | save_report warm-iops
