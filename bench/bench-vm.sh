#!/usr/bin/env bash
# bench-vm.sh: VM disks on imgfs (differential layers over a base) against a
# local raw file and a qcow2 overlay served by qemu-storage-daemon's FUSE export.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# One 2 GiB base of random (incompressible, never zero) data is published and
# its chunk cache warmed by one full read of bases/base.raw. Then:
#   1. VM creation: average of BENCH_CREATES (50) `imgfsctl vm create` on the
#      base, against `qemu-img create -f qcow2 -b base.raw` (same count) and one
#      `cp --reflink=never` full copy of the 2 GiB raw (plus fsync of the copy).
#   2. Writes with fio (libaio), buffered (direct=0) and O_DIRECT (direct=1),
#      on four targets side by side:
#        local   the full raw copy of the base from step 1
#        imgfs   MNT/vms/VM.raw on the base, default -o vm_cache=direct
#        imgfswb the same on a second daemon with -o vm_cache=writeback
#        qsd     a qcow2 overlay on base.raw exported by qemu-storage-daemon
#                as a FUSE file, writable
#        pass    FUSE passthrough: bench/fuse-null.c with a backing file,
#                a minimal libfuse server (16 workers, as imgfs) storing each
#                write with one pwrite into it (O_DIRECT for an O_DIRECT
#                client) and each fsync with one fdatasync, opened like an
#                imgfs VM disk (direct_io, parallel direct writes). Its
#                backing file is a second full copy of the base next to the
#                local one, used as the local file is: the same file in
#                every row, its page cache dropped before each job. What a
#                FUSE file system that stores data durably can do here.
#        null    bench/fuse-null.c without a backing file (one worker per
#                CPU): every write and fsync answered at once, nothing
#                stored; FUSE's request handling alone
#      rows: 4 KiB randwrite over 0-1 GiB with an fsync every 32 writes at
#      iodepth 1 and 16 on a fresh disk; 1 MiB sequential writes of 0-1 GiB
#      (fsync every 32); then, on that disk (every block of 0-1 GiB written
#      once), 4 KiB randwrite at iodepth 1 and 16 again; and a 70/30 4 KiB
#      random read/write mix over 0-2 GiB (iodepth 16, fsync every 32).
#      Rows run one after another, each on all targets in turn (load
#      from elsewhere falls on all alike). Every fresh row gets a new VM or
#      overlay. IOPS, or MiB/s for the
#      sequential row; reads count in the mix. fio invalidates each target's
#      page cache before a job, and the daemons' backing files stay in the
#      host page cache (but for the passthrough's, whose clean pages are
#      dropped before each job, as the local file's are).
#   2b. vm_cache=writeback and the FUSE bdi's dirty limit: 1 MiB sequential
#      buffered writes on the writeback mount with its bdi's max_ratio at the
#      kernel's 1% and raised to BENCH_MAX_RATIO (default 10).
#   2c. compaction behind guest writes: 4 KiB randwrite O_DIRECT over a
#      written 128 MiB (the layer compacts several times) and over 1 GiB (it
#      does not), with the compactions' duration and how long writes waited.
#   3. Read cost against chain depth: a VM gets 64 MiB of random 4 KiB writes
#      spread over the disk (depth 1), then snapshots, with 1 MiB of random
#      writes after each, up to depth 4 and 16; 4 KiB randread direct=1 over
#      the whole disk at each depth.
#
# Run as root. Environment:
#   BENCH_DIR       parent of the work directory (default /var/tmp; ~10 GB free)
#   BENCH_TIME      seconds per time-based fio run (default 10)
#   BENCH_MAX_RATIO max_ratio to try on the writeback mount's bdi (default 10)
#   BENCH_CREATES   VM creations to average (default 50)
#   BENCH_TARGETS   targets of step 2, in this order (default
#                   "local imgfs pass imgfswb qsd null"; local is always run)
#   BENCH_WRITES_ONLY=1  run steps 1 and 2 only (not 2b, 2c, 3)
#   BENCH_KEEP=1    keep the work directory
#   IMGFS_BIN_DIR   where imgfs and imgfsctl are (default <repo>/build)
# Output: Markdown on stdout, also written to bench/results/vm-<date>.md.
# Progress goes to stderr; fio logs are in the work directory.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}
RUNTIME=${BENCH_TIME:-10}
CREATES=${BENCH_CREATES:-50}
WRITES_ONLY=${BENCH_WRITES_ONLY:-0}
TARGETS=(local)
for tg in ${BENCH_TARGETS:-imgfs pass imgfswb qsd null}; do
    case $tg in
    local) ;;
    imgfs | pass | imgfswb | qsd | null) TARGETS+=("$tg") ;;
    *) echo "bench-vm: BENCH_TARGETS entry '$tg' is not one of local imgfs pass imgfswb qsd null." >&2; exit 1 ;;
    esac
done
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }
GiB=$((1024 * 1024 * 1024))
BASE_SIZE=$((2 * GiB))
IMGFS=$IMGFS_BIN_DIR/imgfs
IMGFSCTL=$IMGFS_BIN_DIR/imgfsctl

require_root "FUSE mounts"
require_tools fio qemu-img qemu-storage-daemon python3 fusermount3 cc pkg-config
require_imgfs "$IMGFS_BIN_DIR"

make_work imgfs-bench-vm
on_exit cleanup_all # unmounts MOUNTS, stops PIDS, removes WORK

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

# ---- fio --------------------------------------------------------------------
# run_fio LOGNAME FILE RW DIRECT OFFSET SIZE [extra fio args]: prints IOPS
# (integer; read plus write for a mix) or MiB/s for a 1 MiB job, or "n/a"
# when fio failed (the reason is in $WORK/fio-LOGNAME.json).
run_fio() {
    local name=$1 file=$2 rw=$3 direct=$4 off=$5 size=$6
    shift 6
    local out="$WORK/fio-$name.json"
    local args=(--name="$name" --filename="$file" --rw="$rw" --bs=4k --ioengine=psync --numjobs=1
        --direct="$direct" --offset="$off" --size="$size" --randrepeat=0 --output-format=json
        --output="$out")
    [ "$rw" = randwrite ] && args+=(--fsync=32)
    # time based unless the caller gave an amount (--io_size=...) or --time_based=0
    [[ " $* " == *" --io_size="* || " $* " == *" --time_based=0 "* ]] || args+=(--time_based --runtime="$RUNTIME")
    local extra=()
    for a in "$@"; do [ "$a" = --time_based=0 ] || extra+=("$a"); done
    [ "$file" = "$WORK/mnt-pass/disk" ] && drop_cache "$PASS_BACKING" # what fio's invalidate does to the local file
    if ! fio "${args[@]}" "${extra[@]}" 2>"$WORK/fio-$name.err" >/dev/null; then
        echo "n/a"
        return 1
    fi
    python3 - "$out" "$rw" <<'PY' || { echo "n/a"; return 1; }
import json, sys
text = open(sys.argv[1]).read()
doc = json.loads(text[text.index("{"):])   # fio may print notes before the JSON
job = doc["jobs"][0]
if job.get("error"):
    sys.exit(1)
rw = sys.argv[2]
if job["job options"].get("bs") == "1M":
    print(round(job["write"]["bw_bytes"] / 1048576))
elif rw == "randrw":
    print(round(job["read"]["iops"] + job["write"]["iops"]))
else:
    print(round(job["write" if "write" in rw else "read"]["iops"]))
PY
}

# ---- the base, the repository, the mount ------------------------------------
START=$(date +%s)
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)
log "work directory $WORK"
BASE=$WORK/base.raw
log "generating a 2 GiB random base"
head -c "$BASE_SIZE" /dev/urandom >"$BASE" || die "cannot write $BASE."
log "publishing"
t0=$(now)
"$IMGFSCTL" publish "$BASE" "$WORK/repo" --name base >"$WORK/publish.log" 2>&1 ||
    die "imgfsctl publish failed: $(tail -n 1 "$WORK/publish.log")"
PUBLISH_TIME=$(elapsed "$t0")

MNT=$WORK/mnt
mkdir -p "$MNT" "$WORK/cache" "$WORK/state"
"$IMGFS" "$WORK/repo" "$MNT" -f -o "cache=$WORK/cache,state=$WORK/state" >"$WORK/imgfs.log" 2>&1 &
IMGFS_PID=$!
PIDS+=("$IMGFS_PID")
MOUNTS+=("$MNT")
wait_mounted "$MNT" 10 || die "imgfs did not mount: $(tail -n 2 "$WORK/imgfs.log")"
log "warming the chunk cache (full read of bases/base.raw)"
t0=$(now)
cmp "$MNT/bases/base.raw" "$BASE" || die "bases/base.raw differs from the published image."
WARM_TIME=$(elapsed "$t0")

# ---- 1. VM creation ------------------------------------------------------------
log "VM creation: $CREATES x imgfsctl vm create"
t0=$(now)
for ((i = 1; i <= CREATES; i++)); do
    "$IMGFSCTL" vm create "$MNT" "c$i" --base base >/dev/null 2>>"$WORK/create.err" ||
        die "imgfsctl vm create c$i failed: $(tail -n 1 "$WORK/create.err")"
done
CREATE_IMGFS=$(awk -v t="$(elapsed "$t0")" -v n="$CREATES" 'BEGIN { printf "%.1f", t * 1000 / n }')
LAYER_FILES=$(du -cB1 --apparent-size "$WORK"/state/layers/*.log 2>/dev/null | tail -n1 | cut -f1)
LAYER_ALLOC=$(du -cB1 "$WORK"/state/layers 2>/dev/null | tail -n1 | cut -f1)
for ((i = 1; i <= CREATES; i++)); do "$IMGFSCTL" vm rm "$MNT" "c$i" >/dev/null 2>&1; done

log "VM creation: $CREATES x qemu-img create -f qcow2 -b"
mkdir -p "$WORK/qc"
t0=$(now)
for ((i = 1; i <= CREATES; i++)); do
    qemu-img create -q -f qcow2 -b "$BASE" -F raw "$WORK/qc/o$i.qcow2" >/dev/null ||
        die "qemu-img create failed."
done
CREATE_QCOW=$(awk -v t="$(elapsed "$t0")" -v n="$CREATES" 'BEGIN { printf "%.1f", t * 1000 / n }')
rm -rf "$WORK/qc"

log "full copy: cp --reflink=never + fsync (2 GiB)"
LOCAL=$WORK/local.raw
sync
t0=$(now)
cp --reflink=never "$BASE" "$LOCAL" || die "cp failed."
CP_TIME=$(elapsed "$t0")
sync "$LOCAL"
CP_SYNC_TIME=$(elapsed "$t0")
PASS_BACKING=$WORK/pass.raw # the passthrough's: a full copy too, on the same file system
if has_target pass; then
    cp --reflink=never "$BASE" "$PASS_BACKING" && sync "$PASS_BACKING" || die "cannot copy the base to $PASS_BACKING."
fi

# ---- 2. writes ------------------------------------------------------------------
declare -A R # R[target,row,direct] = IOPS or MiB/s
ROWS=(fresh-qd1 fresh-qd16 seq written-qd1 written-qd16 mix)
NOTES=()
IMGFS_LAYER_KIB=()

# A second daemon with -o vm_cache=writeback, its own cache (warmed) and state.
MNT_WB=$WORK/mnt-wb
if has_target imgfswb || [ "$WRITES_ONLY" != 1 ]; then
    mkdir -p "$MNT_WB" "$WORK/cache-wb" "$WORK/state-wb"
    "$IMGFS" "$WORK/repo" "$MNT_WB" -f -o "cache=$WORK/cache-wb,state=$WORK/state-wb,vm_cache=writeback" \
        >"$WORK/imgfs-wb.log" 2>&1 &
    PIDS+=("$!")
    MOUNTS+=("$MNT_WB")
    wait_mounted "$MNT_WB" 10 || die "imgfs (vm_cache=writeback) did not mount: $(tail -n 2 "$WORK/imgfs-wb.log")"
    cmp "$MNT_WB/bases/base.raw" "$BASE" || die "bases/base.raw (vm_cache=writeback) differs from the published image."
fi

# The FUSE ceilings (fuse-null.c, built here): null, and passthrough to PASS_BACKING.
# fuse_null_start NAME THREADS [BACKING]: mounts $WORK/mnt-NAME
fuse_null_start() {
    mkdir -p "$WORK/mnt-$1"
    "$WORK/fuse-null" "$WORK/mnt-$1" "$BASE_SIZE" "$2" ${3:+"$3"} >>"$WORK/fuse-$1.log" 2>&1 &
    PIDS+=("$!")
    MOUNTS+=("$WORK/mnt-$1")
    wait_mounted "$WORK/mnt-$1" 10 || die "fuse-null ($1) did not mount: $(tail -n 1 "$WORK/fuse-$1.log")"
}
if has_target null || has_target pass; then
    cc -O2 -Wall -Wextra -o "$WORK/fuse-null" "$SCRIPT_DIR/fuse-null.c" $(pkg-config --cflags --libs fuse3) \
        -lpthread 2>"$WORK/fuse-null-cc.log" || die "cannot build fuse-null.c: $(tail -n 1 "$WORK/fuse-null-cc.log")"
fi
has_target null && fuse_null_start null "$(nproc)"
has_target pass && fuse_null_start pass 16 "$PASS_BACKING"
# drop_cache FILE: drops FILE's clean pages (after starting writeback of the
# dirty ones), as fio's invalidate does for the file it is given
drop_cache() { python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"; }

declare -A QSD_PIDS # export path -> its qemu-storage-daemon
qsd_stop() { # export
    [ -n "${QSD_PIDS[$1]:-}" ] || return 0
    unmount_path "$1"
    stop_pid "${QSD_PIDS[$1]}"
    unset "QSD_PIDS[$1]"
    rm -f "$1" "$1.qcow2"
}
qsd_stop_all() {
    local e
    for e in "${!QSD_PIDS[@]}"; do qsd_stop "$e"; done
}
qsd_start() { # export: a new qcow2 overlay on base.raw, exported at the path
    qemu-img create -q -f qcow2 -b "$BASE" -F raw "$1.qcow2" >/dev/null || return 1
    : >"$1"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$1.qcow2" \
        --blockdev driver=qcow2,node-name=q,file=f \
        --export "type=fuse,id=e,node-name=q,mountpoint=$1,writable=on" \
        >"$WORK/qsd.log" 2>&1 &
    QSD_PIDS[$1]=$!
    PIDS+=("$!")
    MOUNTS+=("$1")
    wait_mounted "$1" 10
}

DISKS=0
DISK=
# fresh_disk TARGET: sets DISK to the path of a new, never written disk
# (not in a subshell: qsd_start keeps its daemon's PID here)
fresh_disk() {
    DISKS=$((DISKS + 1))
    case $1 in
    local) DISK=$LOCAL ;;
    imgfs | imgfswb)
        local mnt=$MNT
        [ "$1" = imgfswb ] && mnt=$MNT_WB
        "$IMGFSCTL" vm create "$mnt" "w$DISKS" --base base >/dev/null || return 1
        DISK=$mnt/vms/w$DISKS.raw
        ;;
    qsd)
        qsd_start "$WORK/export$DISKS.raw" || return 1
        DISK=$WORK/export$DISKS.raw
        ;;
    null) DISK=$WORK/mnt-null/disk ;;
    pass) DISK=$WORK/mnt-pass/disk ;;
    esac
}

# Row by row, each row on every target in turn, so that load from elsewhere
# on the host falls on all targets alike.
declare -A WRITTEN # target -> the disk its 1 MiB row wrote
for d in 0 1; do
    for qd in 1 16; do
        for tg in "${TARGETS[@]}"; do
            fresh_disk "$tg" || { NOTES+=("$tg: no fresh disk"); continue; }
            log "$tg direct=$d: fresh, randwrite 4K iodepth $qd"
            R[$tg,fresh-qd$qd,$d]=$(run_fio "$tg-fresh$qd-d$d" "$DISK" randwrite "$d" 0 1G --ioengine=libaio \
                --iodepth=$qd)
            [ "$tg" = qsd ] && qsd_stop "$DISK"
        done
    done
    for tg in "${TARGETS[@]}"; do
        fresh_disk "$tg" || { NOTES+=("$tg: no fresh disk"); continue; }
        WRITTEN[$tg]=$DISK
        log "$tg direct=$d: 1 MiB sequential writes of 0-1 GiB"
        R[$tg,seq,$d]=$(run_fio "$tg-seq-d$d" "$DISK" write "$d" 0 1G --bs=1M --ioengine=libaio --iodepth=16 \
            --fsync=32 --end_fsync=1 --time_based=0)
    done
    for qd in 1 16; do
        for tg in "${TARGETS[@]}"; do
            log "$tg direct=$d: written, randwrite 4K iodepth $qd"
            R[$tg,written-qd$qd,$d]=$(run_fio "$tg-written$qd-d$d" "${WRITTEN[$tg]}" randwrite "$d" 0 1G \
                --ioengine=libaio --iodepth=$qd)
        done
    done
    for tg in "${TARGETS[@]}"; do
        log "$tg direct=$d: 70/30 random read/write mix over 0-2 GiB"
        R[$tg,mix,$d]=$(run_fio "$tg-mix-d$d" "${WRITTEN[$tg]}" randrw "$d" 0 2G --rwmixread=70 --ioengine=libaio \
            --iodepth=16 --fsync=32)
    done
    qsd_stop_all
    for tg in "${TARGETS[@]}"; do
        log "direct=$d $tg: $(for r in "${ROWS[@]}"; do printf '%s %s, ' "$r" "${R[$tg,$r,$d]:-}"; done)"
    done
    IMGFS_LAYER_KIB[$d]=$(($(du -B1 "$WORK/state/layers" -c 2>/dev/null | tail -n1 | cut -f1) / 1024))
done
IMGFS_STATS_WRITES=$(cat "$MNT/.imgfs/stats" 2>/dev/null)

# ---- 2b. the writeback mount's bdi dirty limit ----------------------------------
MAX_RATIO=${BENCH_MAX_RATIO:-10}
declare -A WB_SEQ GC DEPTH_IOPS DEPTH_GOT # of 2b, 2c and 3, which BENCH_WRITES_ONLY=1 skips
if [ "$WRITES_ONLY" = 1 ]; then
    :
elif BDI=/sys/class/bdi/$(mountpoint -d "$MNT_WB") && [ -w "$BDI/max_ratio" ]; then
    ORIG_RATIO=$(cat "$BDI/max_ratio")
    for ratio in "$ORIG_RATIO" "$MAX_RATIO"; do
        echo "$ratio" >"$BDI/max_ratio" || NOTES+=("cannot set $BDI/max_ratio to $ratio")
        "$IMGFSCTL" vm create "$MNT_WB" "bdi$ratio" --base base >/dev/null || die "imgfsctl vm create failed."
        log "writeback, bdi max_ratio $ratio: 1 MiB sequential buffered writes"
        WB_SEQ[$ratio]=$(run_fio "wb-bdi$ratio" "$MNT_WB/vms/bdi$ratio.raw" write 0 0 1G --bs=1M --ioengine=libaio \
            --iodepth=16 --fsync=32 --end_fsync=1 --time_based=0)
    done
    echo "$ORIG_RATIO" >"$BDI/max_ratio"
else
    NOTES+=("$BDI/max_ratio is not writable: the bdi comparison was skipped")
fi

# ---- 2c. compaction behind guest writes -----------------------------------------
# vm_stat VM KEY: one value of the VM's section in the imgfs stats
vm_stat() { awk -v s="[vm $1]" -v k="$2" '/^\[/ { in_s = ($0 == s); next } in_s && $1 == k { print $2; exit }' \
    "$MNT/.imgfs/stats"; }
for region in 128M 1G; do
    [ "$WRITES_ONLY" = 1 ] && break
    "$IMGFSCTL" vm create "$MNT" "gc$region" --base base >/dev/null || die "imgfsctl vm create failed."
    f=$MNT/vms/gc$region.raw
    run_fio "gc$region-fill" "$f" write 1 0 "$region" --bs=1M --ioengine=libaio --iodepth=16 --end_fsync=1 \
        --time_based=0 >/dev/null
    log "compaction: 4K randwrite direct iodepth 16 over a written $region (compacts when overwrites pass it)"
    GC[$region,iops]=$(run_fio "gc$region" "$f" randwrite 1 0 "$region" --ioengine=libaio --iodepth=16)
    GC[$region,n]=$(vm_stat "gc$region" top_layer_compactions)
    GC[$region,t]=$(vm_stat "gc$region" top_layer_compact_seconds)
    GC[$region,p]=$(vm_stat "gc$region" top_layer_compact_pause_seconds)
    GC[$region,log]=$(($(vm_stat "gc$region" top_layer_log_blocks) * 4 / 1024))
    GC[$region,clat]=$(python3 -c '
import json, sys
t = open(sys.argv[1]).read(); j = json.loads(t[t.index("{"):])["jobs"][0]["write"]
print("%.2f" % (j["clat_ns"]["percentile"]["99.900000"] / 1e6))' "$WORK/fio-gc$region.json" 2>/dev/null || echo n/a)
done

# ---- 3. read cost against chain depth ------------------------------------------
depth_of() { # vm: layers in its live chain
    awk '$1 == "live" { print NF - 1; exit }' "$WORK/state/vms/$1.vm"
}
CHAIN=$MNT/vms/chain.raw
if [ "$WRITES_ONLY" != 1 ]; then
    log "chain: VM with 64 MiB of random 4K writes over the disk"
    "$IMGFSCTL" vm create "$MNT" chain --base base >/dev/null || die "imgfsctl vm create chain failed."
    run_fio chain-fill "$CHAIN" randwrite 1 0 2G --io_size=64M --end_fsync=1 \
        >/dev/null || NOTES+=("chain fill write failed (see $WORK/fio-chain-fill.err)")
fi
snaps=0
for want in 1 4 16; do
    [ "$WRITES_ONLY" = 1 ] && break
    while [ "$(depth_of chain)" -lt "$want" ]; do
        snaps=$((snaps + 1))
        "$IMGFSCTL" vm snapshot "$MNT" chain "s$snaps" >/dev/null || die "imgfsctl vm snapshot failed."
        run_fio "chain-top$snaps" "$CHAIN" randwrite 1 0 2G --io_size=1M --end_fsync=1 >/dev/null || true
    done
    got=$(depth_of chain)
    log "chain depth $got: randread direct=1 over the disk"
    DEPTH_IOPS[$want]=$(run_fio "chain-read-$want" "$CHAIN" randread 1 0 2G)
    DEPTH_GOT[$want]=$got
    log "chain depth $got: ${DEPTH_IOPS[$want]} IOPS"
done

IMGFS_STATS=$(cat "$MNT/.imgfs/stats" 2>/dev/null)
ELAPSED=$(($(date +%s) - START))
LOAD_END=$(cut -d" " -f1-3 /proc/loadavg)

# ---- report ------------------------------------------------------------------
ratio() { # value base
    if [[ $1 =~ ^[0-9]+$ && $2 =~ ^[0-9]+$ && $2 -gt 0 ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'
    else
        echo "-"
    fi
}
report() {
    local t d tg
    echo "# imgfs VM disk benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) CPUs ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r), work dir on $(df --output=source "$WORK" | tail -n1) ($(findmnt -no FSTYPE -T "$WORK"))"
    echo "- $(fio --version); $(qemu-storage-daemon --version | head -n 1); imgfs source $(git -C "$SRC_DIR" describe --always --dirty 2>/dev/null || echo '?'), binary built $(date -u -r "$IMGFS" '+%Y-%m-%d %H:%M UTC')"
    echo "- base: 2 GiB random data; publish ${PUBLISH_TIME}s, cache warm-up (full read) ${WARM_TIME}s; total run ${ELAPSED}s"
    echo "- load average (1/5/15 min) at start: $LOAD_START, at end: $LOAD_END (other work on the host skews the numbers)"
    echo
    echo "## VM creation"
    echo
    echo "| method | time |"
    echo "|---|---:|"
    echo "| imgfsctl vm create (avg of $CREATES) | $CREATE_IMGFS ms |"
    echo "| qemu-img create -f qcow2 -b base.raw (avg of $CREATES) | $CREATE_QCOW ms |"
    echo "| cp --reflink=never of the 2 GiB raw | ${CP_TIME} s (${CP_SYNC_TIME} s with fsync) |"
    echo
    echo "$CREATES new imgfs VMs: layer logs $((LAYER_FILES / CREATES / 1024)) KiB each (apparent; a new layer is its 4 KiB header), $((LAYER_ALLOC / 1024)) KiB allocated in all."
    echo
    echo "## Writes (fio libaio; IOPS, MiB/s for the 1 MiB row; ${RUNTIME}s per time-based run)"
    echo
    echo "| test | direct | local raw | imgfs VM | imgfs/local | FUSE passthrough | pass/local | imgfs/pass | imgfs vm_cache=writeback | wb/local | qcow2 via qsd FUSE | qsd/local | imgfs/qsd | FUSE null | null/local |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for d in 0 1; do
        for t in "${ROWS[@]}"; do
            case $t in
            fresh-qd1) label="4K randwrite, fresh disk, iodepth 1" ;;
            fresh-qd16) label="4K randwrite, fresh disk, iodepth 16" ;;
            seq) label="1M sequential write 0-1G (MiB/s)" ;;
            written-qd1) label="4K randwrite, written disk, iodepth 1" ;;
            written-qd16) label="4K randwrite, written disk, iodepth 16" ;;
            mix) label="4K 70/30 randrw, iodepth 16" ;;
            esac
            local l=${R[local,$t,$d]:-} i=${R[imgfs,$t,$d]:-} p=${R[pass,$t,$d]:-} w=${R[imgfswb,$t,$d]:-}
            local q=${R[qsd,$t,$d]:-} n=${R[null,$t,$d]:-}
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$d" \
                "$l" "$i" "$(ratio "$i" "$l")" "$p" "$(ratio "$p" "$l")" "$(ratio "$i" "$p")" \
                "$w" "$(ratio "$w" "$l")" "$q" "$(ratio "$q" "$l")" "$(ratio "$i" "$q")" "$n" "$(ratio "$n" "$l")"
        done
    done
    echo
    echo "Every write job has an fsync every 32 writes; fresh rows start from a new VM or overlay, written rows"
    echo "run on the disk the 1 MiB row wrote. The local file is the same full copy in every row. FUSE"
    echo "passthrough is bench/fuse-null.c storing each write with one pwrite (O_DIRECT for O_DIRECT jobs) and"
    echo "each fsync with one fdatasync into a second full copy of the base beside the local file, the same"
    echo "file in every row (its page cache dropped before each job, as fio does for the local file), 16"
    echo "workers; FUSE null is fuse-null.c without a backing file: every write and fsync answered at once,"
    echo "nothing stored."
    echo
    if [ "$WRITES_ONLY" = 1 ]; then # BENCH_WRITES_ONLY: no more sections
        for t in "${NOTES[@]}"; do echo "- $t"; done
        return
    fi
    echo "## vm_cache=writeback and the FUSE bdi's dirty limit (1 MiB sequential buffered writes, MiB/s)"
    echo
    echo "| bdi max_ratio | MiB/s |"
    echo "|---:|---:|"
    for ratio in "${!WB_SEQ[@]}"; do echo "| $ratio | ${WB_SEQ[$ratio]} |"; done | sort -t'|' -k2 -n
    echo
    echo "## Compaction behind guest writes (imgfs, 4K randwrite, O_DIRECT, iodepth 16, fsync every 32, ${RUNTIME}s)"
    echo
    echo "| written region | IOPS | p99.9 latency | compactions | last one took | writes held | log after |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for region in 128M 1G; do
        echo "| $region | ${GC[$region,iops]} | ${GC[$region,clat]} ms | ${GC[$region,n]:-?} | ${GC[$region,t]:-?} s | ${GC[$region,p]:-?} s | ${GC[$region,log]:-?} MiB |"
    done
    echo
    echo "A layer compacts when its dead (overwritten) log space exceeds its live data and 64 MiB: over a"
    echo "written 128 MiB the writes pass that every ~32k writes, over 1 GiB never in this run."
    echo
    echo "## imgfs read cost against chain depth (4 KiB randread, direct=1, whole disk)"
    echo
    echo "| depth | IOPS | vs depth 1 |"
    echo "|---:|---:|---:|"
    for d in 1 4 16; do
        echo "| ${DEPTH_GOT[$d]:-?} | ${DEPTH_IOPS[$d]:-n/a} | $(ratio "${DEPTH_IOPS[$d]:-}" "${DEPTH_IOPS[1]:-}") |"
    done
    echo
    echo "Notes:"
    echo "- fio invalidates the target's page cache before each job; the local file's reads then go to the"
    echo "  device, while imgfs (layer files, chunk cache) and qsd (qcow2, base.raw) read through the host page cache."
    echo "- imgfs layers held ${IMGFS_LAYER_KIB[0]:-?} KiB after the direct=0 suite and ${IMGFS_LAYER_KIB[1]:-?} KiB after both (all VMs)."
    echo "- imgfs layer compaction during the write suites (all VMs): $(awk '/top_layer_compactions/ { c += $NF }
        /top_layer_compact_pause_seconds/ { if ($NF > p) p = $NF } /top_layer_compact_seconds/ { if ($NF > t) t = $NF }
        END { printf "%d compactions, the longest %.3f s, writes held at most %.4f s", c, t, p }' <<<"$IMGFS_STATS_WRITES")"
    echo "- chain: 64 MiB of 4K writes at depth 1, 1 MiB more after each snapshot; reads cover the whole 2 GiB"
    echo "  (mostly base blocks, which check every layer's bitmap)."
    for t in "${NOTES[@]}"; do echo "- $t"; done
    echo "- imgfs after the runs: $(awk '/^(cache_hits|cache_misses|read_errors) / { printf "%s %s, ", $1, $2 }' <<<"$IMGFS_STATS" | sed 's/, $//')"
}

report | save_report vm
