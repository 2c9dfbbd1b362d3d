#!/usr/bin/env bash
# bench-boot.sh: a real Debian guest boots (qemu TCG) from a VM disk whose
# image lives in an HTTP repository behind a capped link, five ways.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
#
# Set-up (everything is torn down on exit, Ctrl-C or failure):
#   - the guest image: a bootable Debian 12 raw disk from
#     tests/guest/build-debian-image.sh (BENCH_IMAGE, or the one the guest
#     boot test caches in /var/cache/imgfs-test, built if missing), copied
#     into the work directory as www/debian.raw;
#   - www/debian.qcow2: the same image as a compressed qcow2
#     (qemu-img convert -c -O qcow2), and www/repo: the image published
#     with imgfsctl publish (name "debian");
#   - a network namespace with a veth pair (root side 10.214.0.1/30, namespace
#     side 10.214.0.2/30) and nginx inside it serving www/ on port 8080,
#     logging $msec $status $body_bytes_sent per request; tc tbf on the
#     namespace side of the veth caps the server's egress (the download
#     direction) at each rate of BENCH_RATES Mbit/s (burst 64kb, latency 50ms).
#   - qemu, curl and imgfs all run in the root namespace: every byte of the
#     image crosses the shaped link.
#
# Once, before the rates (link not shaped, not timed): the boot prefetch list
# is recorded. A fresh mount (prefetch=none), `imgfsctl vm create`, `imgfsctl
# trace start`, boot, `imgfsctl trace stop --output` as soon as the marker is
# seen, `imgfsctl list publish REPO debian@1 boot LIST` into www/repo. The
# same boot is traced by qemu (virtio_blk_handle_read) to measure the guest
# working set: the distinct bytes the guest read up to the marker.
#
# Per rate (the first rate of BENCH_RATES first), each boot is
# tests/guest/boot-guest.sh (qemu-system-x86_64 -accel tcg, virtio disk,
# qemu's default cache=writeback), timed from qemu start to the
# IMGFS-GUEST-READY marker; every boot starts from a pristine disk:
#   local  a fresh sparse copy of the raw image on the local disk: no network;
#          booted first and again last in each rate, and the mean of the two
#          is the reference for the ratios (the host's load drifts)
#   a      curl downloads www/debian.qcow2, then qemu boots the downloaded
#          compressed qcow2 (time = download + boot)
#   b      qemu's curl driver: a local qcow2 overlay whose backing file is
#          json:{"file.driver":"http","file.url":".../debian.raw",
#          "file.readahead":READAHEAD,...} (format raw), booted with
#          -drive ...,format=qcow2,copy-on-read=on
#   c      imgfs cold, no list: fresh cache and state dirs, mount the HTTP
#          repository with -o prefetch=none, vm create, boot vms/VM.raw
#   d      imgfs cold with the recorded boot list: fresh cache and state
#          dirs (a new host), mount with the default prefetch=boot, vm create,
#          boot: the list replays when qemu opens the disk
#   e      imgfs pre-copied: fresh cache and state, mount, `imgfsctl precopy
#          MNT debian` (timed separately), vm create, boot
# Wire bytes: nginx $body_bytes_sent summed over the case (from just before
# the mount or download to the guest's power-off) and the veth rx counter
# (all bytes incl. headers and TCP/IP). For imgfs the .imgfs/stats counters
# are kept too.
#
# Run as root (network namespace, tc, FUSE). Environment:
#   BENCH_RATES      caps in Mbit/s, run in this order (default "20 100")
#   BENCH_CASES      subset of "local a b c d e" (default all)
#   BENCH_IMAGE      the Debian raw image to use (see above)
#   BENCH_READAHEAD  file.readahead of qemu's curl driver in case b
#                    (default 256K, qemu's own default)
#   BENCH_DIR        parent of the work directory (default /var/tmp; ~4 GB)
#   BENCH_KEEP=1     keep the work directory (logs, consoles, stats, lists)
#   IMGFS_BIN_DIR    where imgfs and imgfsctl are (default <repo>/build)
#   QEMU_MEM         guest memory in MiB (boot-guest.sh; default 1024)
# Output: Markdown on stdout, also written to bench/results/boot-<date>.md.
# Progress goes to stderr. Takes about 18 minutes with the defaults.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}
IMGFS=$IMGFS_BIN_DIR/imgfs
IMGFSCTL=$IMGFS_BIN_DIR/imgfsctl
BOOT_GUEST=$SRC_DIR/tests/guest/boot-guest.sh
BUILD_IMAGE=$SRC_DIR/tests/guest/build-debian-image.sh
BENCH_RATES=${BENCH_RATES:-20 100}
BENCH_CASES=${BENCH_CASES:-local a b c d e}
READAHEAD=${BENCH_READAHEAD:-256K}
NAME=debian
NS_NAME=imgfsboot$$
VETH_ROOT=ibbr$$ # interface names are limited to 15 characters
VETH_NS=ibbn$$
IP_ROOT=10.214.0.1
IP_NS=10.214.0.2
PORT=8080
URL=http://$IP_NS:$PORT

require_root "network namespace, tc and FUSE"
require_tools nginx curl ip tc nsenter fusermount3 mountpoint awk qemu-img qemu-system-x86_64
require_imgfs "$IMGFS_BIN_DIR"
[ -r "$BOOT_GUEST" ] || die "$BOOT_GUEST is missing."
for r in $BENCH_RATES; do
    [[ $r =~ ^[0-9]+$ && $r -gt 0 ]] || die "BENCH_RATES must be whole Mbit/s values like \"20 100\", not \"$r\"."
done
for c in $BENCH_CASES; do
    case $c in local | a | b | c | d | e) ;; *) die "BENCH_CASES may only hold local, a, b, c, d and e, not \"$c\"." ;; esac
done
[[ $READAHEAD =~ ^[0-9]+[KMG]?$ ]] || die "BENCH_READAHEAD must be a size like 256K, not \"$READAHEAD\"."
if ip -4 addr show | grep -q "inet 10\.214\.0\."; then
    die "10.214.0.0/30 is already in use here (another bench-boot run?)."
fi
qemu-system-x86_64 -trace help 2>/dev/null | grep -qx virtio_blk_handle_read ||
    die "this qemu has no virtio_blk_handle_read trace event (needed to measure the guest working set)."
has_case() { [[ " $BENCH_CASES " == *" $1 "* ]]; }

# ---- the guest image --------------------------------------------------------
# The image of the current build script, cached where the guest boot test
# keeps it (the same key: a hash of the script).
GUEST_CACHE=/var/cache/imgfs-test
find_image() {
    [ -n "${BENCH_IMAGE:-}" ] && { echo "$BENCH_IMAGE"; return; }
    echo "$GUEST_CACHE/debian-$(sha256sum "$BUILD_IMAGE" | cut -c1-12).raw"
}

make_work imgfs-bench-boot
WWW=$WORK/www
REPO=$WWW/repo
MNT=$WORK/mnt
mkdir -p "$WWW" "$MNT" "$WORK/logs"

# ---- cleanup: runs on exit, Ctrl-C and failure ------------------------------
IMGFS_PID=
BOOT_PID=
CURL_PID=
unmount_imgfs() {
    unmount_path "$MNT"
    if [ -n "$IMGFS_PID" ]; then
        local _
        for _ in $(seq 100); do kill -0 "$IMGFS_PID" 2>/dev/null || break; sleep 0.1; done
        stop_pid "$IMGFS_PID"
    fi
    IMGFS_PID=
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    stop_pid "$BOOT_PID" # boot-guest.sh kills its qemu on TERM
    stop_pid "$CURL_PID"
    unmount_imgfs
    stop_pid "$NGINX_PID"
    netns_delete "$NS_NAME" "$VETH_ROOT"
    remove_work
    exit "$rc"
}
on_exit cleanup

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
rx_bytes() { cat "/sys/class/net/$VETH_ROOT/statistics/rx_bytes"; }
log_lines() { wc -l <"$WORK/nginx/access.log"; }
loadavg() { cut -d' ' -f1 /proc/loadavg; }
mib() { awk -v b="$1" 'BEGIN { if (b ~ /^[0-9]+$/) printf "%.1f", b / 1048576; else printf "-" }'; }
# stat_value SECTION KEY: one value from MNT/.imgfs/stats
stat_value() {
    awk -v section="[$1]" -v key="$2" '
        /^\[/ { in_section = ($0 == section); next }
        in_section && $1 == key { print $2; exit }' "$MNT/.imgfs/stats" 2>/dev/null
}

START=$(date +%s)
log "work directory $WORK"
SRC_IMAGE=$(find_image)
if [ ! -s "$SRC_IMAGE" ]; then
    log "building the Debian guest image $SRC_IMAGE with $BUILD_IMAGE (about a minute with a cached debootstrap)"
    mkdir -p "$GUEST_CACHE" || die "cannot create $GUEST_CACHE."
    TMPDIR=$WORK bash "$BUILD_IMAGE" "$SRC_IMAGE" 2G >"$WORK/logs/build-image.log" 2>&1 ||
        { rm -f "$SRC_IMAGE"; die "building the guest image failed: $(tail -n 1 "$WORK/logs/build-image.log")"; }
fi
[ -s "$SRC_IMAGE" ] || die "guest image $SRC_IMAGE is missing or empty."
log "guest image $SRC_IMAGE"
cp --sparse=always "$SRC_IMAGE" "$WWW/debian.raw" || die "cannot copy $SRC_IMAGE into $WWW."
IMAGE=$WWW/debian.raw
IMAGE_SIZE=$(stat -c %s "$IMAGE")
IMAGE_ALLOC=$(du -B1 "$IMAGE" | cut -f1)

CONVERT_S=- QCOW2_SIZE=-
if has_case a; then
    log "qemu-img convert -c -O qcow2 (compressed qcow2 for case a)"
    t0=$(now)
    qemu-img convert -c -O qcow2 "$IMAGE" "$WWW/debian.qcow2" || die "qemu-img convert -c failed."
    CONVERT_S=$(elapsed "$t0" "$(now)")
    QCOW2_SIZE=$(stat -c %s "$WWW/debian.qcow2")
fi

log "imgfsctl publish"
t0=$(now)
"$IMGFSCTL" publish "$IMAGE" "$REPO" --name "$NAME" >"$WORK/logs/publish.log" 2>&1 ||
    die "imgfsctl publish failed: $(tail -n 1 "$WORK/logs/publish.log")"
PUBLISH_S=$(elapsed "$t0" "$(now)")
VERSION=$(sed -n "s/^published $NAME@\([0-9]*\).*/\1/p" "$WORK/logs/publish.log" | head -n 1)
[ -n "$VERSION" ] || die "cannot find the published version in: $(head -n 1 "$WORK/logs/publish.log")"
MANIFEST=$REPO/bases/$NAME/$VERSION.manifest
[ -f "$MANIFEST" ] || die "manifest $MANIFEST not found."
MANIFEST_BYTES=$(stat -c %s "$MANIFEST")
CHUNK_SIZE=$(awk '$1 == "chunk-size" { print $2; exit }' "$MANIFEST")
# chunk i of the base = the i-th hash line ("0" = all-zero, not stored)
tail -n +2 "$MANIFEST" | grep -E '^(0|[0-9a-f]{32})$' >"$WORK/hashes.txt"
N_CHUNKS=$(wc -l <"$WORK/hashes.txt")
N_STORED=$(grep -cv '^0$' "$WORK/hashes.txt")
REPO_CHUNK_BYTES=$(du -sb --apparent-size "$REPO/chunks" | cut -f1)
[ "$N_CHUNKS" -gt 0 ] && [[ $CHUNK_SIZE =~ ^[0-9]+$ ]] || die "cannot read chunks from $MANIFEST."
log "$NAME@$VERSION: $N_STORED of $N_CHUNKS chunks stored ($(mib "$REPO_CHUNK_BYTES") MiB); qcow2 $(mib "$QCOW2_SIZE") MiB"

# ---- network namespace, nginx ---------------------------------------------
log "network namespace $NS_NAME, veth $VETH_ROOT <-> $VETH_NS"
netns_create "$NS_NAME" "$VETH_ROOT" "$VETH_NS" "$IP_ROOT" "$IP_NS"
nginx_start_in_ns "$WORK/nginx" "$WWW" "$IP_NS:$PORT" \
    '$msec $status $body_bytes_sent $connection $request_method $request_uri' "$URL/repo/imgfs-repo"
# the server's page cache: the disk is never the limit
cat "$IMAGE" >/dev/null
[ -f "$WWW/debian.qcow2" ] && cat "$WWW/debian.qcow2" >/dev/null
find "$REPO" -type f -exec cat {} + >/dev/null

set_rate() { # mbit, or "none"
    innet tc qdisc del dev "$VETH_NS" root 2>/dev/null
    [ "$1" = none ] && return 0
    innet tc qdisc add dev "$VETH_NS" root tbf rate "${1}mbit" burst 64kb latency 50ms
}

# ---- helpers: imgfs mounts and guest boots -----------------------------------
# fresh_mount LABEL [OPTIONS]: empty cache and state, mount the HTTP repository.
fresh_mount() {
    local label=$1 extra=${2:-} _
    unmount_imgfs
    rm -rf "$WORK/cache" "$WORK/state"
    mkdir -p "$WORK/cache" "$WORK/state"
    "$IMGFS" "$URL/repo" "$MNT" -f -o "cache=$WORK/cache,state=$WORK/state,insecure${extra:+,$extra}" \
        >"$WORK/logs/imgfs-$label.log" 2>&1 &
    IMGFS_PID=$!
    for _ in $(seq 200); do
        mountpoint -q "$MNT" && [ -e "$MNT/bases/$NAME.raw" ] && return 0
        kill -0 "$IMGFS_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "imgfs did not mount for $label: $(tail -n 1 "$WORK/logs/imgfs-$label.log")"
    return 1
}

# boot DISK LABEL [ON_READY]: boots DISK with boot-guest.sh (QEMU_DRIVE_OPTS
# and QEMU_EXTRA from the caller) and waits for the guest to power off.
# Sets BOOT_TIME (empty on failure), MARKER_AT (epoch seconds when the marker
# was seen here, within 0.1 s), BOOT_START (MARKER_AT - BOOT_TIME), BOOT_LOAD
# (1-min load average at start) and BOOT_CPU (CPU seconds, user + system, of
# the qemu process up to the marker). ON_READY is run as soon as the marker
# is seen.
qemu_cpu() { # pid: CPU seconds used so far
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.1f", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null
}
boot() {
    local disk=$1 label=$2 on_ready=${3:-} out=$WORK/logs/boot-$2.out qpid='' p
    BOOT_TIME='' MARKER_AT='' BOOT_START='' BOOT_CPU='' BOOT_LOAD=$(loadavg)
    : >"$out"
    GUEST_LOG=$WORK/logs/console-$label.log bash "$BOOT_GUEST" "$disk" >"$out" 2>"$WORK/logs/boot-$label.err" &
    BOOT_PID=$!
    while kill -0 "$BOOT_PID" 2>/dev/null; do
        if [ -z "$qpid" ]; then
            for p in $(pgrep -P "$BOOT_PID"); do
                [ "$(cat "/proc/$p/comm" 2>/dev/null)" = qemu-system-x86 ] && qpid=$p
            done
        fi
        if grep -q '^BOOT-TIME=' "$out"; then
            MARKER_AT=$(now)
            [ -n "$qpid" ] && BOOT_CPU=$(qemu_cpu "$qpid")
            [ -n "$on_ready" ] && $on_ready
            break
        fi
        sleep 0.1
    done
    wait "$BOOT_PID"
    local rc=$?
    BOOT_PID=
    BOOT_TIME=$(sed -n 's/^BOOT-TIME=//p' "$out")
    if [ "$rc" != 0 ] || [ -z "$BOOT_TIME" ]; then
        log "$label: the guest did not boot (status $rc): $(grep -m1 'error' "$WORK/logs/boot-$label.err")"
        BOOT_TIME=
        return 1
    fi
    [ -z "$MARKER_AT" ] && MARKER_AT=$(now)
    BOOT_START=$(awk -v a="$MARKER_AT" -v b="$BOOT_TIME" 'BEGIN { printf "%.3f", a - b }')
    return 0
}

# ---- measurements ----------------------------------------------------------
# Each case sets ROW[key.field]: time, total (time incl. download), ratio,
# body, body_marker, reqs, conns, veth, load, note. Keys are RATE.CASE.
declare -A ROW
ROWS=()

# mark: remember the log position and veth counter before a case
mark() { M_LINE=$(log_lines) M_RX=$(rx_bytes); }
# wire KEY [MARKER_EPOCH BOOT_START]: HTTP body bytes, requests and
# connections since mark; with the marker, also the body bytes up to it and
# when (seconds after qemu started) 99% of those had arrived.
wire() {
    local key=$1 cut=${2:-} start=${3:-} s
    sleep 0.3 # let nginx write its last log lines
    s=$(tail -n +"$((M_LINE + 1))" "$WORK/nginx/access.log" | awk -v cut="$cut" -v start="$start" '
        { n++; b += $3; c[$4] = 1
          if (cut == "" || $1 <= cut) { bm += $3; m++; t[m] = $1; cum[m] = bm } }
        END {
            k = 0; for (x in c) k++
            w = "-"
            if (cut != "" && start != "" && bm > 0)
                for (i = 1; i <= m; i++) if (cum[i] >= 0.99 * bm) { w = sprintf("%.1f", t[i] - start); break }
            printf "%d %d %d %d %s\n", n, b, k, bm, w
        }')
    read -r "ROW[$key.reqs]" "ROW[$key.body]" "ROW[$key.conns]" "ROW[$key.body_marker]" "ROW[$key.wire99]" <<<"$s"
    ROW[$key.veth]=$(($(rx_bytes) - M_RX))
}
note() { local key=$1; shift; ROW[$key.note]="${ROW[$key.note]:+${ROW[$key.note]}; }$*"; }
save_stats() { cp "$MNT/.imgfs/stats" "$WORK/logs/stats-$1.txt" 2>/dev/null; }
# imgfs_notes KEY: the stats counters worth showing
imgfs_notes() {
    local key=$1 b="base $NAME@$VERSION"
    ROW[$key.fetched]=$(stat_value "$b" bytes_fetched)
    ROW[$key.transferred]=$(stat_value fetch bytes_transferred)
    ROW[$key.freqs]=$(stat_value fetch requests)
    ROW[$key.misses]=$(stat_value "$b" cache_misses)
    ROW[$key.plist]=$(stat_value "$b" prefetch_list)
    ROW[$key.phits]=$(stat_value "$b" prefetch_hits)
    ROW[$key.pmisses]=$(stat_value "$b" prefetch_misses)
    ROW[$key.resident]=$(stat_value "$b" chunks_resident)
    ROW[$key.cached]=$(stat_value cache chunks)
    local errs
    errs=$(stat_value fetch errors)
    [ "${errs:-0}" != 0 ] && note "$key" "fetch errors $errs"
    errs=$(stat_value "$b" read_errors)
    [ "${errs:-0}" != 0 ] && note "$key" "READ ERRORS $errs"
}
new_row() { # key label
    ROWS+=("$1")
    ROW[$1.label]=$2
}

run_local() { # rate key-suffix label
    local key=$1.$2
    new_row "$key" "$3"
    cp --sparse=always "$IMAGE" "$WORK/local.raw" || { note "$key" "cannot copy the image"; return; }
    cat "$WORK/local.raw" >/dev/null
    mark
    boot "$WORK/local.raw" "$key" || note "$key" "did not boot"
    wire "$key"
    ROW[$key.time]=$BOOT_TIME ROW[$key.load]=$BOOT_LOAD ROW[$key.cpu]=$BOOT_CPU
    rm -f "$WORK/local.raw"
}

run_a() {
    local key=$1.a t0 t1 rc
    new_row "$key" "(a) curl download of the qcow2, then local boot"
    rm -f "$WORK/dl.qcow2"
    mark
    t0=$(now)
    curl -sf --noproxy '*' -o "$WORK/dl.qcow2" "$URL/debian.qcow2" &
    CURL_PID=$!
    wait "$CURL_PID"
    rc=$?
    CURL_PID=
    t1=$(now)
    ROW[$key.dl]=$(elapsed "$t0" "$t1")
    if [ "$rc" != 0 ] || [ "$(stat -c %s "$WORK/dl.qcow2" 2>/dev/null)" != "$QCOW2_SIZE" ]; then
        note "$key" "download failed (curl status $rc)"
        wire "$key"
        return
    fi
    QEMU_DRIVE_OPTS=format=qcow2 boot "$WORK/dl.qcow2" "$key" || note "$key" "did not boot"
    wire "$key"
    ROW[$key.load]=$BOOT_LOAD ROW[$key.cpu]=$BOOT_CPU
    if [ -n "$BOOT_TIME" ]; then
        ROW[$key.boot]=$BOOT_TIME
        ROW[$key.time]=$(awk -v a="${ROW[$key.dl]}" -v b="$BOOT_TIME" 'BEGIN { printf "%.1f", a + b }')
        note "$key" "download ${ROW[$key.dl]} s + boot $BOOT_TIME s; the boot reads the compressed qcow2"
    fi
    rm -f "$WORK/dl.qcow2"
}

run_b() {
    local key=$1.b backing
    new_row "$key" "(b) qemu curl driver, qcow2 overlay, copy-on-read"
    rm -f "$WORK/overlay.qcow2"
    backing="json:{\"file.driver\":\"http\",\"file.url\":\"$URL/debian.raw\",\"file.readahead\":\"$READAHEAD\",\"file.timeout\":60}"
    mark
    if ! qemu-img create -q -f qcow2 -b "$backing" -F raw "$WORK/overlay.qcow2" >"$WORK/logs/qemu-img-$key.log" 2>&1; then
        note "$key" "qemu-img create failed: $(tail -n 1 "$WORK/logs/qemu-img-$key.log")"
        wire "$key"
        return
    fi
    QEMU_DRIVE_OPTS=format=qcow2,copy-on-read=on boot "$WORK/overlay.qcow2" "$key" || note "$key" "did not boot"
    wire "$key" "$MARKER_AT" "$BOOT_START"
    ROW[$key.time]=$BOOT_TIME ROW[$key.load]=$BOOT_LOAD ROW[$key.cpu]=$BOOT_CPU
    note "$key" "readahead $READAHEAD; overlay holds $(mib "$(du -B1 "$WORK/overlay.qcow2" | cut -f1)") MiB after the boot"
    rm -f "$WORK/overlay.qcow2"
}

# run_imgfs KEY LABEL MOUNT-OPTIONS PRECOPY(0|1)
run_imgfs() {
    local key=$1 label=$2 opts=$3 precopy=$4 t0
    new_row "$key" "$label"
    mark
    fresh_mount "$key" "$opts" || { note "$key" "imgfs did not mount"; wire "$key"; return; }
    if [ "$precopy" = 1 ]; then
        t0=$(now)
        if ! "$IMGFSCTL" precopy "$MNT" "$NAME@$VERSION" >"$WORK/logs/precopy-$key.log" 2>&1; then
            note "$key" "precopy failed: $(tail -n 1 "$WORK/logs/precopy-$key.log")"
        fi
        ROW[$key.precopy_s]=$(elapsed "$t0" "$(now)")
        wire "$key"
        ROW[$key.precopy_body]=${ROW[$key.body]}
        ROW[$key.precopy_veth]=${ROW[$key.veth]}
        ROW[$key.precopy_resident]=$(stat_value "base $NAME@$VERSION" chunks_resident)
        mark
    fi
    if ! "$IMGFSCTL" vm create "$MNT" vm --base "$NAME@$VERSION" >"$WORK/logs/vm-create-$key.log" 2>&1; then
        note "$key" "vm create failed: $(tail -n 1 "$WORK/logs/vm-create-$key.log")"
        unmount_imgfs
        wire "$key"
        return
    fi
    boot "$MNT/vms/vm.raw" "$key" || note "$key" "did not boot"
    wire "$key" "$MARKER_AT" "$BOOT_START"
    ROW[$key.time]=$BOOT_TIME ROW[$key.load]=$BOOT_LOAD ROW[$key.cpu]=$BOOT_CPU
    save_stats "$key"
    imgfs_notes "$key"
    unmount_imgfs
}

# ---- once: record the boot list, and the guest working set ------------------
RECORD_OK=0
record_list() {
    log "recording the boot list (link not shaped, not timed)"
    set_rate none
    mark
    fresh_mount record prefetch=none || return 1
    "$IMGFSCTL" vm create "$MNT" rec --base "$NAME@$VERSION" >"$WORK/logs/vm-create-record.log" 2>&1 ||
        { log "vm create failed: $(tail -n 1 "$WORK/logs/vm-create-record.log")"; return 1; }
    "$IMGFSCTL" trace start "$MNT" rec >"$WORK/logs/trace-start.log" 2>&1 ||
        { log "trace start failed: $(tail -n 1 "$WORK/logs/trace-start.log")"; return 1; }
    trace_stop() {
        "$IMGFSCTL" trace stop "$MNT" rec --output "$WORK/boot.list" >"$WORK/logs/trace-stop.log" 2>&1 ||
            log "trace stop failed: $(tail -n 1 "$WORK/logs/trace-stop.log")"
    }
    QEMU_EXTRA="-trace enable=virtio_blk_handle_read -D $WORK/qemu-trace.log -msg timestamp=on" \
        boot "$MNT/vms/rec.raw" record trace_stop || return 1
    RECORD_TIME=$BOOT_TIME
    wire record "$MARKER_AT" "$BOOT_START"
    save_stats record
    imgfs_notes record
    unmount_imgfs
    [ -s "$WORK/boot.list" ] || { log "trace stop wrote no list"; return 1; }
    "$IMGFSCTL" list publish "$REPO" "$NAME@$VERSION" boot "$WORK/boot.list" >"$WORK/logs/list-publish.log" 2>&1 ||
        { log "list publish failed: $(tail -n 1 "$WORK/logs/list-publish.log")"; return 1; }
    LIST_CHUNKS=$(sed -n 's/^chunks //p' "$WORK/boot.list" | head -n 1)
    LIST_BYTES=$((LIST_CHUNKS * CHUNK_SIZE))
    # the listed chunks' stored (compressed) size: what replaying them costs
    LIST_STORED=$(awk '/^chunks /{go = 1; next} go && /^[0-9]+$/' "$WORK/boot.list" |
        awk 'NR == FNR { h[NR - 1] = $1; next } { x = h[$1]; if (x != "0") print x }' "$WORK/hashes.txt" - |
        while read -r h; do echo "$REPO/chunks/${h:0:2}/$h"; done | xargs -r stat -c %s | awk '{ s += $1 } END { print s + 0 }')
    # guest reads up to the marker: "PID@SECONDS.MICROS:virtio_blk_handle_read ... sector S nsectors N"
    read -r GUEST_READS GUEST_REQ_BYTES GUEST_WS <<<"$(awk -v cut="$MARKER_AT" '
        /virtio_blk_handle_read/ {
            split($1, a, "[@:]"); if (a[2] + 0 > cut) next
            for (i = 1; i <= NF; i++) { if ($i == "sector") s = $(i + 1); if ($i == "nsectors") n = $(i + 1) }
            print s, s + n
        }' "$WORK/qemu-trace.log" | sort -n -k1,1 | awk '
        { reads++; req += $2 - $1
          if (reads == 1 || $1 > e) { if (reads > 1) ws += e - s; s = $1; e = $2 } else if ($2 > e) e = $2 }
        END { if (reads) ws += e - s; printf "%d %d %d\n", reads, req * 512, ws * 512 }')"
    RECORD_OK=1
    log "boot list: $LIST_CHUNKS chunks ($(mib "$LIST_BYTES") MiB, $(mib "$LIST_STORED") MiB stored); guest read $(mib "$GUEST_WS") MiB distinct in $GUEST_READS requests"
}

if has_case d || has_case c || has_case e; then
    record_list || log "warning: no boot list recorded; case d will run without one"
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2fx", a / b; else printf "-" }'; }
declare -A LOCAL_TIME_OF KEYS
for rate in $BENCH_RATES; do
    log "rate $rate Mbit/s"
    set_rate "$rate" || die "cannot set up tc tbf on $VETH_NS (sch_tbf missing?)."
    # the local reference boots first and last, to show the drift of the host
    order=
    has_case local && order=local
    for c in $BENCH_CASES; do [ "$c" != local ] && order="$order $c"; done
    has_case local && order="$order local2"
    KEYS[$rate]=
    for c in $order; do
        KEYS[$rate]="${KEYS[$rate]} $c"
        log "$rate Mbit/s case $c"
        case $c in
        local) run_local "$rate" local "local raw file, no network (first boot of the rate)" ;;
        local2) run_local "$rate" local2 "local raw file, no network (last boot of the rate)" ;;
        a) run_a "$rate" ;;
        b) run_b "$rate" ;;
        c) run_imgfs "$rate.c" "(c) imgfs cold, no list (prefetch=none)" prefetch=none 0 ;;
        d) run_imgfs "$rate.d" "(d) imgfs cold, boot list replayed" "" 0 ;;
        e) run_imgfs "$rate.e" "(e) imgfs pre-copied (precopy not in boot time)" "" 1 ;;
        esac
        k=$rate.$c
        log "$rate Mbit/s case $c: ${ROW[$k.time]:--} s, ${ROW[$k.body]:--} body bytes${ROW[$k.note]:+; ${ROW[$k.note]}}"
    done
    # reference: the mean of the two local boots
    LOCAL_TIME_OF[$rate]=$(awk -v a="${ROW[$rate.local.time]:-}" -v b="${ROW[$rate.local2.time]:-}" '
        BEGIN { n = 0; s = 0; if (a != "") { s += a; n++ } if (b != "") { s += b; n++ } if (n) printf "%.1f", s / n }')
    for c in ${KEYS[$rate]}; do
        k=$rate.$c
        ROW[$k.ratio]=$(ratio "${ROW[$k.time]:-}" "${LOCAL_TIME_OF[$rate]}")
    done
done
ELAPSED=$(($(date +%s) - START))

# ---- report ----------------------------------------------------------------
report() {
    local rate c k n
    echo "# Guest boot over an HTTP repository at a capped bandwidth, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) CPUs, kernel $(uname -r); $(qemu-system-x86_64 --version | head -n 1 | sed 's/ Copyright.*//');" \
        "$(nginx -v 2>&1 | sed 's/.*: //'); $(curl --version | head -n 1 | cut -d' ' -f1-2);" \
        "imgfs $("$IMGFS" --version 2>&1 | head -n 1 | grep -o '[0-9][0-9.]*' | head -n 1)"
    echo "- guest: Debian 12 from tests/guest/build-debian-image.sh, $(mib "$IMAGE_SIZE") MiB raw disk," \
        "$(mib "$IMAGE_ALLOC") MiB allocated; qemu -accel tcg, $(nproc) host CPUs shared with whatever else runs," \
        "${QEMU_MEM:-1024} MiB, virtio disk, cache=writeback; boot time = qemu start to IMGFS-GUEST-READY (after multi-user.target)"
    echo "- compressed qcow2 (qemu-img convert -c): $QCOW2_SIZE bytes ($(mib "$QCOW2_SIZE") MiB), made in $CONVERT_S s"
    echo "- imgfs repository: $NAME@$VERSION, chunk size $CHUNK_SIZE, $N_STORED of $N_CHUNKS chunks stored," \
        "$REPO_CHUNK_BYTES bytes ($(mib "$REPO_CHUNK_BYTES") MiB) of chunk files (zstd); manifest $MANIFEST_BYTES bytes; published in $PUBLISH_S s"
    echo "- link: veth into a network namespace, nginx there, server egress shaped by tc tbf (burst 64kb, latency 50ms), no added delay"
    echo "- bytes over the wire: nginx \$body_bytes_sent summed over the case, from just before the download, overlay creation" \
        "or mount to the guest's power-off (imgfs: includes index, manifest and list; pre-copy bytes are reported apart);" \
        "veth rx: every byte received by the host side, headers and TCP/IP included"
    echo "- load = 1-min load average when the boot started (TCG is CPU-bound: a busy host slows every boot);" \
        "qemu CPU s = user + system CPU time of qemu up to the marker; 99% of bytes in at s = seconds after qemu started" \
        "when 99% of the HTTP body bytes received by the marker had arrived (the network part of the boot)"
    echo "- total run ${ELAPSED}s; readahead of qemu's curl driver in (b): $READAHEAD"
    echo
    if [ "$RECORD_OK" = 1 ]; then
        echo "## Guest working set (one boot, recorded once; link not shaped)"
        echo
        echo "| measure | bytes | MiB | vs guest distinct bytes |"
        echo "|---|---:|---:|---:|"
        echo "| guest reads to the marker (qemu virtio_blk_handle_read): $GUEST_READS requests, requested bytes | $GUEST_REQ_BYTES | $(mib "$GUEST_REQ_BYTES") | $(ratio "$GUEST_REQ_BYTES" "$GUEST_WS") |"
        echo "| **guest working set: distinct bytes read** | **$GUEST_WS** | **$(mib "$GUEST_WS")** | 1.00x |"
        echo "| trace list (imgfsctl trace): $LIST_CHUNKS chunks x $CHUNK_SIZE | $LIST_BYTES | $(mib "$LIST_BYTES") | $(ratio "$LIST_BYTES" "$GUEST_WS") |"
        echo "| the listed chunks as stored in the repository (zstd, 16-byte headers) | $LIST_STORED | $(mib "$LIST_STORED") | $(ratio "$LIST_STORED" "$GUEST_WS") |"
        echo "| recording boot (imgfs cold, prefetch=none, unshaped, ${RECORD_TIME}s): bytes_fetched (decoded chunks) | ${ROW[record.fetched]:-} | $(mib "${ROW[record.fetched]:-}") | $(ratio "${ROW[record.fetched]:-}" "$GUEST_WS") |"
        echo "| recording boot: HTTP body bytes to the marker | ${ROW[record.body_marker]:-} | $(mib "${ROW[record.body_marker]:-}") | $(ratio "${ROW[record.body_marker]:-}" "$GUEST_WS") |"
        echo
    else
        echo "No boot list could be recorded (see the log); case d ran without one."
        echo
    fi
    for rate in $BENCH_RATES; do
        echo "## $rate Mbit/s"
        echo
        [ -n "${LOCAL_TIME_OF[$rate]:-}" ] && echo "Local boot reference: ${LOCAL_TIME_OF[$rate]} s (mean of the first and last boot of this rate)." && echo
        echo "| case | boot time s | ratio to local boot | bytes over the wire | veth rx bytes | requests | 99% of bytes in at s | qemu CPU s | load | notes |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        for c in ${KEYS[$rate]}; do
            k=$rate.$c
            n=${ROW[$k.note]:-}
            case $c in
            b) n="$n; ${ROW[$k.body_marker]:-?} body bytes by the marker" ;;
            c | d | e)
                [ "$c" != e ] && n="$n${n:+; }chunks cached after the boot ${ROW[$k.cached]:-?} x $CHUNK_SIZE = $(mib "$(( ${ROW[$k.cached]:-0} * CHUNK_SIZE ))") MiB ($(ratio "$(( ${ROW[$k.cached]:-0} * CHUNK_SIZE ))" "${GUEST_WS:-}") of the working set), wire $(ratio "${ROW[$k.body]:-}" "${GUEST_WS:-}") of it; stats: [fetch] requests ${ROW[$k.freqs]:-?}, bytes_transferred ${ROW[$k.transferred]:-?}, [base] bytes_fetched (demand only) ${ROW[$k.fetched]:-?}; body bytes by the marker ${ROW[$k.body_marker]:-?}"
                [ "$c" = e ] && n="$n${n:+; }stats: [fetch] requests ${ROW[$k.freqs]:-?} (all by the precopy), [base] bytes_fetched (demand) ${ROW[$k.fetched]:-?}; body bytes by the marker ${ROW[$k.body_marker]:-?}"
                [ "$c" != c ] && n="$n; prefetch_list ${ROW[$k.plist]:-?}, prefetch_hits ${ROW[$k.phits]:-?}, prefetch_misses ${ROW[$k.pmisses]:-?}"
                [ "$c" = e ] && n="$n; precopy ${ROW[$k.precopy_s]:-?} s, ${ROW[$k.precopy_body]:-?} body bytes (veth ${ROW[$k.precopy_veth]:-?}), chunks resident after it ${ROW[$k.precopy_resident]:-?}; precopy + boot $(awk -v a="${ROW[$k.precopy_s]:-0}" -v b="${ROW[$k.time]:-0}" 'BEGIN { printf "%.1f", a + b }') s ($(ratio "$(awk -v a="${ROW[$k.precopy_s]:-0}" -v b="${ROW[$k.time]:-0}" 'BEGIN { print a + b }')" "${LOCAL_TIME_OF[$rate]:-}"))"
                ;;
            esac
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${ROW[$k.label]}" "${ROW[$k.time]:--}" "${ROW[$k.ratio]:--}" \
                "${ROW[$k.body]:--}$([ -n "${ROW[$k.body]:-}" ] && echo " ($(mib "${ROW[$k.body]}") MiB)")" \
                "${ROW[$k.veth]:--}" "${ROW[$k.reqs]:--}" "${ROW[$k.wire99]:--}" "${ROW[$k.cpu]:--}" "${ROW[$k.load]:--}" "${n#; }"
        done
        echo
    done
    echo "Targets (from the issue), at 20 Mbit/s: (c) within 1.6x of the local boot, (d) within 1.2x," \
        "bytes fetched for the boot within 1.3x of the working set. These are reported, not enforced."
}

report | save_report boot
