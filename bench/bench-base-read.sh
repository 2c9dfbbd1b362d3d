#!/usr/bin/env bash
# bench-base-read.sh: read throughput of a warm base image, imgfs against its peers.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# One generated image (default 1 GiB, mixed content) is served by
#   1. the local raw file (baseline)
#   2. imgfs                      bases/NAME.raw on an imgfs mount
#   3. qcowmount (libqcow-utils)  the qcow2 version, as MNT/qcow1
#   4. qemu-storage-daemon        FUSE export of the qcow2 onto a regular file
#   5. xmount 0.7.6               --in raw (this build has no qcow input library)
# Each target is warmed by one full sequential read, then measured with fio:
#   seq 1M     rw=read, bs=1M, 1 job, psync, direct=0, time based  -> MB/s
#   rand 4K    rw=randread, bs=4k, 2 jobs, libaio iodepth 16, direct=0,
#              time based, group_reporting                          -> IOPS
#   rand 4K    the same with direct=1 (O_DIRECT: no page cache on the mount,
#              so every read crosses the FUSE path; skipped where refused)
# fio runs with invalidate=0 so that it does not drop the warm page cache.
#
# Run as root (FUSE mounts, allow_other). Environment:
#   BENCH_SIZE      image size, with K/M/G suffix (default 1G)
#   BENCH_DIR       parent of the work directory (default /var/tmp)
#   BENCH_SEQ_TIME  seconds per sequential run (default 5)
#   BENCH_RAND_TIME seconds per random run (default 10)
#   BENCH_KEEP=1    keep the work directory (image, repository, cache)
#   IMGFS_BIN_DIR   where imgfs and imgfsctl are (default <repo>/build)
# Output: a Markdown report on stdout, also written to
# bench/results/base-read-<date>.md. Progress goes to stderr.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}
BENCH_SIZE=${BENCH_SIZE:-1G}
SEQ_TIME=${BENCH_SEQ_TIME:-5}
RAND_TIME=${BENCH_RAND_TIME:-10}
NAME=base

require_root "FUSE mounts with allow_other"
require_tools fio qemu-img
require_imgfs "$IMGFS_BIN_DIR"

SIZE_BYTES=$(to_bytes "$BENCH_SIZE" BENCH_SIZE)
EXTENT=$((1024 * 1024))
[ "$SIZE_BYTES" -ge $((16 * EXTENT)) ] || die "BENCH_SIZE must be at least 16M."
SIZE_BYTES=$((SIZE_BYTES / EXTENT * EXTENT))

make_work imgfs-bench
on_exit cleanup_all # unmounts MOUNTS, stops PIDS, removes WORK

# The pid of a daemonizing FUSE server, found by its (unique) mount point.
pid_of_mount() { # program mountpoint
    local p
    for p in $(pgrep -x "$1"); do
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$2" && echo "$p"
    done
}

# ---- the image -------------------------------------------------------------
# 1 MiB extents drawn with a fixed seed: ~70% random (incompressible) data,
# ~10% text-like (base64, compressible), ~20% left as zero holes. Random
# extents repeat nothing, so no target gets help from deduplication.
gen_image() {
    local out=$1 n=$((SIZE_BYTES / EXTENT)) i r
    N_RAND=0 N_TEXT=0 N_ZERO=0
    truncate -s "$SIZE_BYTES" "$out" || return 1
    RANDOM=4242
    for ((i = 0; i < n; i++)); do
        r=$((RANDOM % 100))
        if ((r < 70)); then
            N_RAND=$((N_RAND + 1))
            head -c $EXTENT /dev/urandom
        elif ((r < 80)); then
            N_TEXT=$((N_TEXT + 1))
            head -c $((EXTENT * 3 / 4)) /dev/urandom | base64 -w 0 # exactly 1 MiB
        else
            N_ZERO=$((N_ZERO + 1))
            continue
        fi >"$WORK/extent" || return 1
        dd if="$WORK/extent" of="$out" bs=$EXTENT seek="$i" count=1 conv=notrunc status=none || return 1
    done
}

# ---- fio -------------------------------------------------------------------
# Prints "value" or "n/a"; fio's output is kept in $WORK/fio-*.log.
FIO_COMMON=(--readonly --invalidate=0 --thread=0 --output-format=terse --terse-version=3)
run_fio() { # label file kind(seq|rand|rand-direct)
    local label=$1 file=$2 kind=$3 logf="$WORK/fio-$1-$3.log" line err
    local args=(--name="$label-$kind" --filename="$file" "${FIO_COMMON[@]}")
    case $kind in
    seq) args+=(--rw=read --bs=1M --numjobs=1 --ioengine=psync --direct=0 --time_based --runtime="$SEQ_TIME") ;;
    rand) args+=(--rw=randread --bs=4k --numjobs=2 --ioengine=libaio --iodepth=16 --direct=0
        --time_based --runtime="$RAND_TIME" --group_reporting --randrepeat=0) ;;
    rand-direct) args+=(--rw=randread --bs=4k --numjobs=2 --ioengine=libaio --iodepth=16 --direct=1
        --time_based --runtime="$RAND_TIME" --group_reporting --randrepeat=0) ;;
    esac
    if ! fio "${args[@]}" >"$logf" 2>&1; then
        echo "n/a"
        return 1
    fi
    line=$(grep '^3;' "$logf" | tail -n 1)
    err=$(cut -d';' -f5 <<<"$line")
    if [ -z "$line" ] || [ "$err" != 0 ]; then
        echo "n/a"
        return 1
    fi
    if [ "$kind" = seq ]; then # field 7: read bandwidth in KiB/s
        awk -F';' '{ printf "%.0f", $7 * 1024 / 1e6 }' <<<"$line"
    else # field 8: read IOPS
        awk -F';' '{ printf "%.0f", $8 }' <<<"$line"
    fi
}

warm() { # file
    dd if="$1" of=/dev/null bs=1M status=none
}

# ---- targets ---------------------------------------------------------------
declare -A SEQ RAND DIRECT NOTE
TARGETS=()

measure() { # label file
    local label=$1 file=$2 t0 t1
    log "$label: warming ($file)"
    t0=$(date +%s.%N)
    if ! warm "$file"; then
        NOTE[$label]="warm-up read failed; not measured"
        SEQ[$label]=n/a RAND[$label]=n/a DIRECT[$label]=n/a
        return
    fi
    t1=$(date +%s.%N)
    log "$label: warm-up read took $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
    log "$label: seq 1M"
    SEQ[$label]=$(run_fio "$label" "$file" seq) ||
        NOTE[$label]="${NOTE[$label]:+${NOTE[$label]}; }seq run failed (see fio log)"
    log "$label: rand 4K (page cache)"
    RAND[$label]=$(run_fio "$label" "$file" rand) ||
        NOTE[$label]="${NOTE[$label]:+${NOTE[$label]}; }page-cache rand run failed (see fio log)"
    log "$label: rand 4K (O_DIRECT)"
    if ! DIRECT[$label]=$(run_fio "$label" "$file" rand-direct); then
        local why
        why=$(grep -m1 -iE 'error|invalid' "$WORK/fio-$label-rand-direct.log" | sed 's/^ *//' | cut -c1-100)
        NOTE[$label]="${NOTE[$label]:+${NOTE[$label]}; }O_DIRECT run failed${why:+: $why}"
    fi
    log "$label: seq ${SEQ[$label]} MB/s, rand ${RAND[$label]} IOPS, O_DIRECT ${DIRECT[$label]} IOPS"
}

skip() { # label reason
    TARGETS+=("$1")
    SEQ[$1]=skipped RAND[$1]=skipped DIRECT[$1]=skipped
    NOTE[$1]=$2
    log "$1: skipped: $2"
}

START=$(date +%s)
log "work directory $WORK"
log "generating a $BENCH_SIZE mixed-content image"
RAW=$WORK/image.raw
QCOW=$WORK/image.qcow2
gen_image "$RAW" || die "cannot generate the image in $WORK."
log "converting to qcow2"
qemu-img convert -f raw -O qcow2 "$RAW" "$QCOW" || die "qemu-img convert failed."

# 1. local raw file
TARGETS+=("local raw file")
measure "local raw file" "$RAW"

# 2. imgfs
label=imgfs
log "imgfs: publishing"
if ! "$IMGFS_BIN_DIR/imgfsctl" publish "$RAW" "$WORK/repo" --name "$NAME" >"$WORK/publish.log" 2>&1; then
    skip "$label" "imgfsctl publish failed: $(tail -n 1 "$WORK/publish.log")"
else
    mkdir -p "$WORK/imgfs-mnt" "$WORK/imgfs-cache"
    MOUNTS+=("$WORK/imgfs-mnt")
    "$IMGFS_BIN_DIR/imgfs" "$WORK/repo" "$WORK/imgfs-mnt" -o "cache=$WORK/imgfs-cache" -f \
        >"$WORK/imgfs.log" 2>&1 &
    PIDS+=($!)
    if ! wait_mounted "$WORK/imgfs-mnt" 10; then
        skip "$label" "imgfs did not mount: $(tail -n 1 "$WORK/imgfs.log")"
    else
        TARGETS+=("$label")
        measure "$label" "$WORK/imgfs-mnt/bases/$NAME.raw"
        IMGFS_STATS=$(cat "$WORK/imgfs-mnt/.imgfs/stats" 2>/dev/null)
        if ! cmp -s "$RAW" "$WORK/imgfs-mnt/bases/$NAME.raw"; then
            NOTE[$label]="${NOTE[$label]:+${NOTE[$label]}; }CONTENT DIFFERS from the raw image"
        fi
    fi
fi

# 3. qcowmount
label=qcowmount
if ! command -v qcowmount >/dev/null; then
    skip "$label" "qcowmount not installed (package libqcow-utils)"
else
    mkdir -p "$WORK/qcow-mnt"
    MOUNTS+=("$WORK/qcow-mnt")
    qcowmount -X allow_root "$QCOW" "$WORK/qcow-mnt" >"$WORK/qcowmount.log" 2>&1
    if ! wait_mounted "$WORK/qcow-mnt" 10; then
        skip "$label" "qcowmount did not mount: $(tail -n 1 "$WORK/qcowmount.log")"
    else
        read -ra found <<<"$(pid_of_mount qcowmount "$WORK/qcow-mnt" | xargs)"
        PIDS+=("${found[@]}")
        TARGETS+=("$label")
        measure "$label" "$WORK/qcow-mnt/qcow1"
    fi
fi

# 4. qemu-storage-daemon FUSE export
label=qemu-storage-daemon
if ! command -v qemu-storage-daemon >/dev/null; then
    skip "$label" "qemu-storage-daemon not installed (package qemu-system-common)"
else
    EXPORT=$WORK/qsd-export.raw
    : >"$EXPORT"
    MOUNTS+=("$EXPORT")
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file,filename=$QCOW" \
        --blockdev driver=qcow2,node-name=qcow2,file=file \
        --export "type=fuse,id=exp,node-name=qcow2,mountpoint=$EXPORT,writable=off" \
        >"$WORK/qsd.log" 2>&1 &
    PIDS+=($!)
    if ! wait_mounted "$EXPORT" 10; then
        skip "$label" "FUSE export did not appear: $(tail -n 1 "$WORK/qsd.log")"
    else
        TARGETS+=("$label")
        measure "$label" "$EXPORT"
    fi
fi

# 5. xmount (0.7.6 as packaged in Debian 12 has no qcow input: use --in raw)
label=xmount
if ! command -v xmount >/dev/null; then
    skip "$label" "xmount not installed"
else
    XIN=raw XIMG=$RAW
    if xmount --info 2>&1 | grep -q 'supporting "qcow'; then XIN=qcow XIMG=$QCOW; fi
    mkdir -p "$WORK/xmount-mnt"
    MOUNTS+=("$WORK/xmount-mnt")
    xmount --in "$XIN" "$XIMG" "$WORK/xmount-mnt" >"$WORK/xmount.log" 2>&1
    XFILE=$WORK/xmount-mnt/$(basename "${XIMG%.*}").dd
    if ! wait_mounted "$WORK/xmount-mnt" 10 || [ ! -e "$XFILE" ]; then
        skip "$label" "xmount did not mount: $(tail -n 1 "$WORK/xmount.log")"
    else
        read -ra found <<<"$(pid_of_mount xmount "$WORK/xmount-mnt" | xargs)"
        PIDS+=("${found[@]}")
        TARGETS+=("$label")
        NOTE[$label]="--in $XIN (of the $( [ "$XIN" = raw ] && echo "raw image" || echo qcow2))"
        measure "$label" "$XFILE"
    fi
fi
ELAPSED=$(($(date +%s) - START))

# ---- report ----------------------------------------------------------------
ratio() { # value base
    if [[ $1 =~ ^[0-9]+$ && $2 =~ ^[0-9]+$ && $2 -gt 0 ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    else
        echo "-"
    fi
}
BASE="local raw file"
report() {
    echo "# imgfs base read benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) CPUs ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r)"
    echo "- fio: $(fio --version); imgfs: $("$IMGFS_BIN_DIR/imgfs" --version 2>&1 | head -n 1)"
    echo "- peers: $(qcowmount -V 2>&1 | head -n 1); $(qemu-storage-daemon --version 2>&1 | head -n 1); $(xmount --version 2>&1 | grep -m1 -o 'xmount v[0-9.]*')"
    echo "- image: $((SIZE_BYTES / 1048576)) MiB in 1 MiB extents: $N_RAND random, $N_TEXT text-like, $N_ZERO zero;" \
        "qcow2 $(du -m "$QCOW" | cut -f1) MiB allocated; imgfs chunk size $(sed -n 's/.*chunk size \([0-9]*\)).*/\1/p' "$WORK/publish.log" 2>/dev/null)"
    echo "- each target warmed by one full sequential read; fio invalidate=0, seq ${SEQ_TIME}s (bs=1M, 1 job, psync)," \
        "rand ${RAND_TIME}s (bs=4k, 2 jobs, libaio iodepth 16, group_reporting); total run ${ELAPSED}s"
    echo
    echo "| target | seq 1M MB/s | rand 4K IOPS (page cache) | rand 4K IOPS (O_DIRECT) | ratio to local file |"
    echo "|---|---:|---:|---:|---|"
    local t
    for t in "${TARGETS[@]}"; do
        printf '| %s | %s | %s | %s | seq %s, rand %s, O_DIRECT %s |\n' "$t" "${SEQ[$t]}" "${RAND[$t]}" "${DIRECT[$t]}" \
            "$(ratio "${SEQ[$t]}" "${SEQ[$BASE]}")" "$(ratio "${RAND[$t]}" "${RAND[$BASE]}")" \
            "$(ratio "${DIRECT[$t]}" "${DIRECT[$BASE]}")"
    done
    echo
    echo "Notes:"
    echo "- O_DIRECT on the local file reads the disk; on a FUSE target it bypasses the mount's page cache, so every"
    echo "  4K read is a FUSE request, while the daemon may still be served from its own page cache."
    for t in "${TARGETS[@]}"; do
        [ -n "${NOTE[$t]:-}" ] && echo "- $t: ${NOTE[$t]}"
    done
    if [ -n "${IMGFS_STATS:-}" ]; then
        echo "- imgfs after the runs: $(awk '/^(cache_hits|cache_misses|read_errors|chunks_resident) / { printf "%s %s, ", $1, $2 }' <<<"$IMGFS_STATS" | sed 's/, $//')"
    fi
}

report | save_report base-read
