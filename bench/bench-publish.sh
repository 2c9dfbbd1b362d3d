#!/usr/bin/env bash
# bench-publish.sh: how long `imgfsctl publish` takes on sparse, dense and
# qcow2 images, against the same data as a dense file and against zstd.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# The data is real file content (a tar of /usr, random bytes where /usr is
# short), so it compresses as system images do. In one run:
#   1. DATA (64 MiB) as a dense raw file, and the same DATA written at 8
#      places of a 100 GiB sparse raw file; also qemu-img convert of the
#      sparse file, for reference. Target: sparse <= 2 x dense + 0.5 s.
#   2. a dense raw image (BENCH_DENSE, default 2G): publish on every core
#      and `zstd -3 -T0` of the same file, taking turns BENCH_ROUNDS
#      (default 3) times, with a baseline build's publish in each round
#      when BASELINE_BIN_DIR is set (the two builds swap places every
#      round); then once on one thread. Target:
#      publish <= zstd in every round. Then a signed publish (--key) of the
#      same image, by this build and the baseline: what signing adds.
#   3. QDATA (BENCH_QCOW_DATA, default 1G) as a dense raw file, and as
#      qcow2 images of 20 GiB and 100 GiB virtual holding it. Target: the
#      qcow2 times follow the 1 GiB, not the virtual size.
# Every publish goes to a new repository and includes its syncfs; none is
# removed before the end (deleting thousands of chunk files just before a
# publish makes ext4 slower to allocate its inodes). Inputs are
# read once before they are timed (page cache warm), and `sync` runs before
# each timing. A publish ends with syncfs (its chunks are durable); zstd
# writes its output to a file on the same disk and is timed without and
# with an fsync of it.
#
# Environment:
#   BENCH_DENSE      size of the dense image (default 2G)
#   BENCH_ROUNDS     rounds of the dense comparison (default 3)
#   BASELINE_BIN_DIR another build's imgfsctl to publish the dense image with
#                    in the same rounds (optional; for example main's build)
#   BENCH_QCOW_DATA  data in the qcow2 images (default 1G)
#   BENCH_SCHED=1    record the scheduler's switches (perf, as root) during
#                    this build's dense publishes, and report per round how
#                    long its workers were runnable but off a CPU, and in D
#                    and S sleeps (bench/offcpu.py); perf's own time is in
#                    that build's rows then: for where the time goes, not ratios
#   BENCH_DIR        parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1     keep the work directory
#   IMGFS_BIN_DIR    where imgfsctl is (default <repo>/build)
# Output: a Markdown report on stdout, also written to
# bench/results/publish-<date>.md. Progress goes to stderr.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}

no_args_but_help "$@"

require_tools qemu-img zstd tar
[ -x "$IMGFS_BIN_DIR/imgfsctl" ] || die "imgfsctl not found in $IMGFS_BIN_DIR (build it, or set IMGFS_BIN_DIR)."
IMGFSCTL=$IMGFS_BIN_DIR/imgfsctl
BASELINE=
if [ -n "${BASELINE_BIN_DIR:-}" ]; then
    [ -x "$BASELINE_BIN_DIR/imgfsctl" ] || die "imgfsctl not found in BASELINE_BIN_DIR ($BASELINE_BIN_DIR)."
    BASELINE=$BASELINE_BIN_DIR/imgfsctl
fi
ROUNDS=${BENCH_ROUNDS:-3}
SCHED=${BENCH_SCHED:-0}
if [ "$SCHED" = 1 ]; then
    require_root "BENCH_SCHED=1 records every CPU's scheduler switches"
    require_tools perf python3
fi
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive number."
DENSE=$(to_bytes "${BENCH_DENSE:-2G}" BENCH_DENSE)
QDATA=$(to_bytes "${BENCH_QCOW_DATA:-1G}" BENCH_QCOW_DATA)
MIB=$((1024 * 1024))
[ "$DENSE" -ge $((64 * MIB)) ] && [ "$QDATA" -ge $((64 * MIB)) ] || die "sizes must be at least 64M."

make_work imgfs-bench-publish
on_exit cleanup_all
# imgfsctl under perf (BENCH_SCHED=1), its pid in $WORK/sched.pid.
cat >"$WORK/sched-imgfsctl" <<EOF
#!/bin/sh
exec perf record -q -a -e sched:sched_switch -g -o "$WORK/sched.data" -- \\
    sh -c 'echo \$\$ >"\$0"; exec "\$@"' "$WORK/sched.pid" "$IMGFSCTL" "\$@"
EOF
chmod +x "$WORK/sched-imgfsctl"

# Real file content, len bytes, into file (random bytes once /usr runs out).
content() { # file len
    { tar -cf - /usr 2>/dev/null; head -c "$2" /dev/urandom; } | head -c "$2" >"$1"
}

# Seconds (3 decimals) that a command takes; its output goes to
# $WORK/last.out and its CPU seconds (user + system) to $WORK/last.cpu.
seconds() {
    /usr/bin/time -o "$WORK/last.time" -f '%e %U %S' "$@" >"$WORK/last.out" 2>&1 ||
        { cat "$WORK/last.out" >&2; die "failed: $*"; }
    awk '{ printf "%.2f", $2 + $3 }' "$WORK/last.time" >"$WORK/last.cpu"
    awk '{ printf "%.3f", $1 }' "$WORK/last.time"
}
cpu() { cat "$WORK/last.cpu"; }

# Reads a dense input once; sparse ones were just written (and reading
# their holes would take minutes).
warm() {
    local used apparent
    used=$(du -k "$1" | cut -f1)
    apparent=$(du -k --apparent-size "$1" | cut -f1)
    [ "$used" -lt $((apparent / 2)) ] || cat "$1" >/dev/null
}

# Publishes into a new repository $WORK/repoN and sets VAR to the seconds it
# took. Dirty data of earlier steps is flushed first, so that the publish's
# syncfs pays for its own chunks only.
repo_n=0
publish() { # VAR image [options...]
    publish_with "$IMGFSCTL" "$@"
}
publish_with() { # IMGFSCTL VAR image [options...]
    local ctl=$1 var=$2 img=$3
    shift 3
    repo_n=$((repo_n + 1))
    warm "$img"
    sync
    printf -v "$var" '%s' "$(seconds "$ctl" publish "$img" "$WORK/repo$repo_n" --name b "$@")"
    printf -v "${var}_cpu" '%s' "$(cpu)"
}
# The bytes a publish stored (its "stored" line), from $WORK/last.out.
stored_bytes() { grep '^stored' "$WORK/last.out" | grep -o '([0-9]* bytes)' | tr -dc 0-9; }
mib() { echo "$1" | awk '{ printf "%.0f", $1 / 1048576 }'; }
ratio() { echo "$1 $2" | awk '{ printf "%.2fx", $1 / ($2 > 0 ? $2 : 0.001) }'; }
per_second() { echo "$1 $2" | awk '{ printf "%.2f", $1 / ($2 > 0 ? $2 : 0.001) }'; }

log "making the inputs in $WORK"
content "$WORK/data64.raw" $((64 * MIB))
truncate -s 100G "$WORK/sparse.raw"
for i in $(seq 0 7); do # 8 MiB at 8 places, 12.5 GiB apart
    dd if="$WORK/data64.raw" of="$WORK/sparse.raw" bs=1M count=8 skip=$((i * 8)) \
        seek=$((i * 12800)) conv=notrunc status=none
done
content "$WORK/dense.raw" "$DENSE"
content "$WORK/qdata.raw" "$QDATA"
# The qcow2 data at 64 places spread over the first 20 GiB.
piece=$((QDATA / 64 / MIB))
truncate -s 20G "$WORK/q20.raw"
for i in $(seq 0 63); do
    dd if="$WORK/qdata.raw" of="$WORK/q20.raw" bs=1M count=$piece skip=$((i * piece)) \
        seek=$((i * 320)) conv=notrunc status=none
done
qemu-img convert -q -f raw -O qcow2 "$WORK/q20.raw" "$WORK/q20.qcow2" || die "qemu-img convert failed."
rm -f "$WORK/q20.raw"
cp "$WORK/q20.qcow2" "$WORK/q100.qcow2" && qemu-img resize -q "$WORK/q100.qcow2" 100G ||
    die "qemu-img resize failed."

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
log "1. sparse against dense"
publish t_dense64 "$WORK/data64.raw"
publish t_sparse "$WORK/sparse.raw"
read_line=$(grep '^read' "$WORK/last.out")
sync
t_convert=$(seconds qemu-img convert -f raw -O raw "$WORK/sparse.raw" "$WORK/sparse-copy.raw")
t_convert_cpu=$(cpu)
rm -f "$WORK/sparse-copy.raw"
limit=$(echo "$t_dense64" | awk '{ printf "%.3f", 2 * $1 + 0.5 }')

log "2. dense: every core against zstd -3 -T0${BASELINE:+ and the baseline}, $ROUNDS rounds taking turns"
dense_rows=()
met=0
# The three take turns: this build first in odd rounds, the baseline first
# in even ones, zstd between them, so that neither build always follows
# the other's writes.
# With BENCH_SCHED=1, this build's publish under a system-wide record of
# scheduler switches; sched_all gets its workers' off-CPU split.
dense_ours() {
    sched_all=
    if [ "$SCHED" = 1 ]; then
        publish_with "$WORK/sched-imgfsctl" t_all "$WORK/dense.raw"
        sched_all=$(perf script -i "$WORK/sched.data" -F pid,tid,time,event,trace,ip,sym 2>/dev/null |
            python3 "$SCRIPT_DIR/offcpu.py" "$(cat "$WORK/sched.pid")" |
            awk '{ printf "%s / %s / %s", $7, $10, $13 }')
        rm -f "$WORK/sched.data"
    else
        publish t_all "$WORK/dense.raw"
    fi
    threads=$(grep -o 'on [0-9]* threads' "$WORK/last.out" | grep -o '[0-9]*')
    s_all=$(stored_bytes)
    sync_all=$(grep '^synced' "$WORK/last.out" | grep -o '[0-9.]* s' | tr -dc 0-9.)
    # The workers' thread seconds in their stages against their CPU seconds.
    wait_all=$(awk '/^workers/ { gsub(/,|;/, ""); printf "%.1f", $3 + $6 + $9 + $12 - $14 }' "$WORK/last.out")
    dense_repo=$WORK/repo$repo_n
    cp "$WORK/last.out" "$WORK/last-dense.out"
}
dense_zstd() {
    sync
    t_zstd=$(seconds zstd -3 -T0 -q -f "$WORK/dense.raw" -o "$WORK/dense.zst")
    t_zstd_cpu=$(cpu)
    t_zsync=$(seconds sync "$WORK/dense.zst") # fsync: durable, as a publish is
    t_zstd_durable=$(echo "$t_zstd $t_zsync" | awk '{ printf "%.3f", $1 + $2 }')
    s_zstd=$(stat -c %s "$WORK/dense.zst")
    rm -f "$WORK/dense.zst"
}
dense_base() {
    [ -n "$BASELINE" ] || return 0
    publish_with "$BASELINE" t_base "$WORK/dense.raw"
    s_base=$(stored_bytes)
}
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        dense_ours; dense_zstd; dense_base
    else
        dense_base; dense_zstd; dense_ours
    fi
    base_cells="| | | |"
    [ -n "$BASELINE" ] && base_cells="| $t_base | $t_base_cpu | $(ratio "$t_base" "$t_zstd") |"
    awk -v a="$t_all" -v b="$t_zstd" 'BEGIN { exit !(a <= b) }' && met=$((met + 1))
    dense_rows+=("| $round | $t_all | ${sync_all:-?} | $t_all_cpu | ${wait_all:-?} | ${sched_all:-} | $t_zstd | $t_zstd_cpu | $(ratio "$t_all" "$t_zstd") | $(ratio "$t_all_cpu" "$t_zstd_cpu") | $(per_second "$t_all_cpu" "$t_all") | $(per_second "$t_zstd_cpu" "$t_zstd") | $(ratio "$t_all" "$t_zstd_durable") $base_cells")
done
publish t_one "$WORK/dense.raw" --threads 1
"$IMGFSCTL" key generate "$WORK/signing.key" >/dev/null || die "imgfsctl key generate failed."
publish t_signed "$WORK/dense.raw" --key "$WORK/signing.key"
[ -n "$BASELINE" ] && publish_with "$BASELINE" t_base_signed "$WORK/dense.raw" --key "$WORK/signing.key"
sync
t_republish=$(seconds "$IMGFSCTL" publish "$WORK/dense.raw" "$dense_repo" --name b)
t_republish_cpu=$(cpu)
republish_line=$(grep '^chunks' "$WORK/last.out")

log "3. qcow2, 1 GiB allocated"
publish t_qraw "$WORK/qdata.raw"
publish t_q20 "$WORK/q20.qcow2"
publish t_q100 "$WORK/q100.qcow2"

{
    echo "# imgfs publish benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(nproc) CPUs, $(uname -r), zstd $(zstd -V | grep -o 'v[0-9.]*' | head -1), load average $LOAD."
    echo "Command: \`bash bench/bench-publish.sh\`"
    echo "(BENCH_DENSE=${BENCH_DENSE:-2G}, BENCH_QCOW_DATA=${BENCH_QCOW_DATA:-1G}). Seconds, page cache warm."
    echo
    echo "| input | seconds | CPU seconds | against | target |"
    echo "|---|---:|---:|---|---|"
    echo "| 64 MiB of data, dense raw file | $t_dense64 | $t_dense64_cpu | | |"
    echo "| the same 64 MiB in a 100 GiB sparse raw file | $t_sparse | $t_sparse_cpu | $(ratio "$t_sparse" "$t_dense64") of dense | <= $limit s (2 x dense + 0.5 s): $(awk -v a="$t_sparse" -v b="$limit" 'BEGIN { print (a <= b) ? "met" : "missed" }') |"
    echo "| (qemu-img convert of the sparse file) | $t_convert | $t_convert_cpu | | |"
    echo "| $((DENSE / MIB)) MiB dense raw, $threads threads (last round) | $t_all | $t_all_cpu | $(ratio "$t_all" "$t_zstd") of zstd | <= zstd: met in $met of $ROUNDS rounds |"
    echo "| the same, --threads 1 | $t_one | $t_one_cpu | $(ratio "$t_one" "$t_zstd") of zstd | |"
    echo "| the same, signed (--key) | $t_signed | $t_signed_cpu | $(ratio "$t_signed" "$t_all") of unsigned (last round) | |"
    [ -n "$BASELINE" ] &&
        echo "| the same, signed, baseline build | $t_base_signed | $t_base_signed_cpu | $(ratio "$t_base_signed" "$t_base") of its unsigned (last round) | |"
    echo "| zstd -3 -T0 of the same file (last round) | $t_zstd | $t_zstd_cpu | | |"
    echo "| the same image published again (unchanged) | $t_republish | $t_republish_cpu | $(ratio "$t_republish" "$t_all") of the first | no chunk written |"
    echo "| $((QDATA / MIB)) MiB of data, dense raw file | $t_qraw | $t_qraw_cpu | | |"
    echo "| qcow2 of 20 GiB virtual holding it | $t_q20 | $t_q20_cpu | $(ratio "$t_q20" "$t_qraw") of dense | proportional to the data |"
    echo "| qcow2 of 100 GiB virtual holding it | $t_q100 | $t_q100_cpu | $(ratio "$t_q100" "$t_qraw") of dense | |"
    echo
    echo "Dense image, taking turns: this build's publish, \`zstd -3 -T0\`${BASELINE:+, the baseline build (the two builds swap places in even rounds)}."
    echo "Stored: publish $(mib "$s_all") MiB, zstd $(mib "$s_zstd") MiB${BASELINE:+, baseline $(mib "$s_base") MiB} (of $((DENSE / MIB)) MiB)."
    echo
    echo "| round | publish s | of it syncfs | CPU s | workers waited s | runnable / D / S s | zstd s | CPU s | publish / zstd | CPU | CPU/s publish | CPU/s zstd | publish / (zstd + sync) | baseline s | CPU s | baseline / zstd |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${dense_rows[@]}"
    echo
    echo "Workers waited: the thread seconds of the workers' stages less their CPU seconds (the \`workers\` line"
    echo "of the publish). Runnable / D / S (BENCH_SCHED=1): thread seconds off a CPU, runnable (preempted),"
    echo "in D and in S sleeps. CPU/s: CPU seconds per second of wall time, the share of the 2 CPUs each got."
    echo "Last dense publish: \`$(grep '^workers' "$WORK/last-dense.out" 2>/dev/null)\`."
    echo
    echo "Sparse publish: \`$read_line\`. Unchanged re-publish: \`$republish_line\`."
} | save_report publish
