#!/usr/bin/env bash
# bench-export.sh: how long `imgfsctl vm export` and `vm import` take, this
# build against a baseline build of imgfs (for example the commit before
# imgfsctl wrote the export, or read the import, itself), side by side in
# one run.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# Each build mounts a small repository with its own state directory and
# makes a blank VM disk (BENCH_VM, default 1G) with BENCH_DATA (default 256M)
# of random data written into it. Then each exports it to a regular file in
# the work directory, taking turns, BENCH_ROUNDS (default 3) times each, and
# imports that file back under a new name (removed after); the page cache
# is dropped before every export and import. The median of each is kept.
# This build stages the export in its state directory and imgfsctl copies it
# through the control file, and imgfsctl streams an import the same way;
# the baseline wrote and read the file in the daemon.
#
# Run as root (FUSE). Environment:
#   BASELINE_BIN_DIR  the other build's imgfs and imgfsctl (required)
#   IMGFS_BIN_DIR     this build (default <repo>/build)
#   BENCH_VM, BENCH_DATA, BENCH_ROUNDS as above
#   BENCH_DIR, BENCH_KEEP=1 as in bench/lib.sh
# Output: a Markdown report on stdout, also in bench/results/export-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}

no_args_but_help "$@"
[ -n "${BASELINE_BIN_DIR:-}" ] || die "set BASELINE_BIN_DIR to the build to compare with (see --help)."
require_root "FUSE mounts"
require_tools fusermount3
require_imgfs "$IMGFS_BIN_DIR"
require_imgfs "$BASELINE_BIN_DIR"
VM_BYTES=$(to_bytes "${BENCH_VM:-1G}" BENCH_VM)
DATA_BYTES=$(to_bytes "${BENCH_DATA:-256M}" BENCH_DATA)
ROUNDS=${BENCH_ROUNDS:-3}
[[ $ROUNDS =~ ^[0-9]+$ ]] && [ "$ROUNDS" -gt 0 ] || die "BENCH_ROUNDS=$ROUNDS is not a positive number."
[ "$DATA_BYTES" -le "$VM_BYTES" ] || die "BENCH_DATA must fit in BENCH_VM."

make_work imgfs-export
on_exit cleanup_all
head -c 1048576 /dev/urandom >"$WORK/small.raw" # the mount needs a repository; the VM is blank
"$IMGFS_BIN_DIR/imgfsctl" publish "$WORK/small.raw" "$WORK/repo" --name small >/dev/null || die "publish failed."
head -c "$DATA_BYTES" /dev/urandom >"$WORK/data"

declare -A MNT
for b in new base; do
    dir=$IMGFS_BIN_DIR
    [ $b = base ] && dir=$BASELINE_BIN_DIR
    MNT[$b]=$WORK/mnt-$b
    mount_build "$dir" "$b" "$WORK/repo" config=none
    "$dir/imgfsctl" vm create "${MNT[$b]}" v --size "$VM_BYTES" || die "vm create failed on the $b build."
    dd if="$WORK/data" of="${MNT[$b]}/vms/v.raw" bs=1M conv=notrunc,fsync status=none || die "writing the VM failed."
done
rm -f "$WORK/data"

# seconds_of CMD...: runs CMD (its stdout to stderr) and prints how long it took.
seconds_of() {
    local t0
    t0=$(date +%s.%N)
    "$@" >&2 || return 1
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }'
}
declare -A TIMES ITIMES
for round in $(seq 1 "$ROUNDS"); do
    for b in new base; do
        dir=$IMGFS_BIN_DIR
        [ $b = base ] && dir=$BASELINE_BIN_DIR
        rm -f "$WORK/out.exp"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        t=$(seconds_of "$dir/imgfsctl" vm export "${MNT[$b]}" v "$WORK/out.exp") || die "the $b build's export failed."
        SIZE=$(stat -c %s "$WORK/out.exp")
        log "round $round $b: export $t s"
        TIMES[$b]="${TIMES[$b]:-} $t"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        t=$(seconds_of "$dir/imgfsctl" vm import "${MNT[$b]}" "$WORK/out.exp" --name back) ||
            die "the $b build's import failed."
        log "round $round $b: import $t s"
        ITIMES[$b]="${ITIMES[$b]:-} $t"
        "$dir/imgfsctl" vm rm "${MNT[$b]}" back || die "vm rm failed on the $b build."
    done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
# times_table BASE_TIMES NEW_TIMES: the Markdown table of both builds' runs, medians and ratio.
times_table() {
    local mb mn
    mb=$(median "$1")
    mn=$(median "$2")
    echo "| build | seconds (each run) | median | ratio to baseline |"
    echo "|---|---|---:|---:|"
    echo "| baseline build | $1 | $mb | 1.00x |"
    echo "| this build | $2 | $mn | $(awk -v a="$mn" -v b="$mb" 'BEGIN { printf "%.2fx", a / b }') |"
}

{
    echo "# vm export of a VM with $((DATA_BYTES >> 20)) MiB of its own data ($(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg))"
    echo
    echo "- blank $((VM_BYTES >> 20)) MiB VM disk; export to a regular file (${SIZE} bytes), page cache dropped before each; median of $ROUNDS, taking turns"
    echo
    times_table "${TIMES[base]}" "${TIMES[new]}"
    echo
    echo "vm import of that file, under a new name:"
    echo
    times_table "${ITIMES[base]}" "${ITIMES[new]}"
} | save_report export
