#!/usr/bin/env bash
# bench-http.sh: cold read of a base over HTTP at a capped bandwidth, imgfs against curl.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
#
# Set-up (everything is torn down on exit, Ctrl-C or failure):
#   - a network namespace with a veth pair to the root namespace
#     (root side 10.213.0.1/30, namespace side 10.213.0.2/30);
#   - nginx inside the namespace, listening on 10.213.0.2:8080, serving the
#     repository directory, logging $msec $request_time $connection
#     $body_bytes_sent per request;
#   - tc tbf on the namespace side of the veth: the server's egress (the
#     download direction) is capped at each rate of BENCH_RATES (Mbit/s);
#     optionally netem adds BENCH_RTT_MS of delay in front of it.
# A generated mixed image (default 256 MiB, 1 MiB extents: random data or
# zero holes) is published once with imgfsctl. Zero chunks are not stored, so
# logical bytes (the image) and wire bytes (stored chunks) differ.
#
# For each rate, in this order, all clients in the root namespace:
#   1. curl big file   one file, the concatenation of every stored chunk file
#                      of the base (so exactly the same bytes): the line rate
#   2. curl chunks     every stored chunk file (from the manifest, deduplicated)
#                      in manifest order, one curl process, one kept-alive
#                      connection, sequential: what a naive client achieves
#   3. imgfs           a fresh mount with an empty cache (cold), then
#                      dd bs=1M of the whole bases/NAME.raw to /dev/null
# The server's page cache is warmed first, so the disk is never the limit.
# Reported per run: time, MB/s of wire bytes (HTTP bodies), logical MB/s,
# bytes (nginx body bytes, and veth rx bytes including headers and TCP/IP),
# requests and requests per MiB (from the nginx log), TCP connections, average
# requests in flight (curl: 1; imgfs: Little's law from its own request count
# and mean latency in .imgfs/stats), and ratios.
#
# Run as root (network namespace, tc, FUSE). Environment:
#   BENCH_RATES     space-separated caps in Mbit/s (default "100"; e.g. "100 20")
#   BENCH_RTT_MS    extra delay on the server's egress, ms (default 0: none)
#   BENCH_SIZE      image size, with K/M/G suffix (default 256M)
#   BENCH_DIR       parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1    keep the work directory (image, repository, logs)
#   IMGFS_BIN_DIR   where imgfs and imgfsctl are (default <repo>/build)
# Output: a Markdown report on stdout, also written to
# bench/results/http-<date>.md. Progress goes to stderr.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}
BENCH_RATES=${BENCH_RATES:-100}
RTT_MS=${BENCH_RTT_MS:-0}
BENCH_SIZE=${BENCH_SIZE:-256M}
NAME=base
NS_NAME=imgfsbench$$
VETH_ROOT=ibr$$ # interface names are limited to 15 characters
VETH_NS=ibn$$
IP_ROOT=10.213.0.1
IP_NS=10.213.0.2
PORT=8080
BASE_URL=http://$IP_NS:$PORT

require_root "network namespace, tc and FUSE"
require_tools nginx curl ip tc nsenter fusermount3 mountpoint awk
require_imgfs "$IMGFS_BIN_DIR"
for r in $BENCH_RATES; do
    [[ $r =~ ^[0-9]+$ && $r -gt 0 ]] || die "BENCH_RATES must be whole Mbit/s values like \"100 20\", not \"$r\"."
done
[[ $RTT_MS =~ ^[0-9]+$ ]] || die "BENCH_RTT_MS must be a whole number of milliseconds."
if ip -4 addr show | grep -q "inet 10\.213\.0\."; then
    die "10.213.0.0/30 is already in use here (another bench-http run?)."
fi

SIZE_BYTES=$(to_bytes "$BENCH_SIZE" BENCH_SIZE)
EXTENT=$((1024 * 1024))
[ "$SIZE_BYTES" -ge $((16 * EXTENT)) ] || die "BENCH_SIZE must be at least 16M."
SIZE_BYTES=$((SIZE_BYTES / EXTENT * EXTENT))

make_work imgfs-bench-http
MNT=$WORK/mnt

# ---- cleanup: runs on exit, Ctrl-C and failure ------------------------------
IMGFS_PID=
unmount_imgfs() {
    unmount_path "$MNT"
    if [ -n "$IMGFS_PID" ]; then
        local _
        for _ in $(seq 50); do kill -0 "$IMGFS_PID" 2>/dev/null || break; sleep 0.1; done
        stop_pid "$IMGFS_PID"
    fi
    IMGFS_PID=
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    unmount_imgfs
    stop_pid "$NGINX_PID"
    netns_delete "$NS_NAME" "$VETH_ROOT"
    remove_work
    exit "$rc"
}
on_exit cleanup

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
rx_bytes() { cat "/sys/class/net/$VETH_ROOT/statistics/rx_bytes"; }
log_lines() { wc -l <"$WORK/nginx/access.log"; }

# ---- the image -------------------------------------------------------------
# 1 MiB extents with a fixed seed: ~75% random (incompressible, so stored
# chunks are as large as logical ones), ~25% zero holes (not stored).
gen_image() {
    local out=$1 n=$((SIZE_BYTES / EXTENT)) i
    N_RAND=0 N_ZERO=0
    truncate -s "$SIZE_BYTES" "$out" || return 1
    RANDOM=4243
    for ((i = 0; i < n; i++)); do
        if ((RANDOM % 100 < 75)); then
            N_RAND=$((N_RAND + 1))
            head -c $EXTENT /dev/urandom >"$WORK/extent" || return 1
            dd if="$WORK/extent" of="$out" bs=$EXTENT seek="$i" count=1 conv=notrunc status=none || return 1
        else
            N_ZERO=$((N_ZERO + 1))
        fi
    done
    rm -f "$WORK/extent"
}

START=$(date +%s)
log "work directory $WORK"
log "generating a $BENCH_SIZE mixed image"
gen_image "$WORK/image.raw" || die "cannot generate the image in $WORK."
log "publishing"
REPO=$WORK/repo
"$IMGFS_BIN_DIR/imgfsctl" publish "$WORK/image.raw" "$REPO" --name "$NAME" >"$WORK/publish.log" 2>&1 ||
    die "imgfsctl publish failed: $(tail -n 1 "$WORK/publish.log")"
MANIFEST=$(ls "$REPO/bases/$NAME/"*.manifest | sort -V | tail -n 1)
CHUNK_SIZE=$(awk '$1 == "chunk-size" { print $2; exit }' "$MANIFEST")
N_CHUNKS=$(tail -n +2 "$MANIFEST" | grep -cE '^(0|[0-9a-f]{32})$')
# Stored chunks: lines after the header that are 32 hex digits, deduplicated,
# in first-use order (mawk has no {32} interval, hence grep).
tail -n +2 "$MANIFEST" | grep -E '^[0-9a-f]{32}$' | awk '!seen[$1]++' >"$WORK/chunks.txt"
N_STORED=$(wc -l <"$WORK/chunks.txt")
[ "$N_STORED" -gt 0 ] || die "no stored chunks found in $MANIFEST."
: >"$WORK/curl-chunks.cfg"
while read -r h; do
    printf 'url = "%s/chunks/%s/%s"\noutput = "/dev/null"\n' "$BASE_URL" "${h:0:2}" "$h" >>"$WORK/curl-chunks.cfg"
    echo "$REPO/chunks/${h:0:2}/$h"
done <"$WORK/chunks.txt" >"$WORK/chunk-files.txt"
xargs cat <"$WORK/chunk-files.txt" >"$REPO/big.bin" || die "cannot build the big reference file."
STORED_BYTES=$(stat -c %s "$REPO/big.bin")
log "$N_STORED stored chunks of $N_CHUNKS, $STORED_BYTES bytes; chunk size $CHUNK_SIZE"

# ---- network namespace, nginx ---------------------------------------------
log "network namespace $NS_NAME, veth $VETH_ROOT <-> $VETH_NS"
netns_create "$NS_NAME" "$VETH_ROOT" "$VETH_NS" "$IP_ROOT" "$IP_NS"
nginx_start_in_ns "$WORK/nginx" "$REPO" "$IP_NS:$PORT" \
    '$msec $request_time $connection $connection_requests $status $body_bytes_sent $request_uri' "$BASE_URL/imgfs-repo"
xargs cat <"$WORK/chunk-files.txt" >/dev/null # warm the server's page cache
cat "$REPO/big.bin" >/dev/null

set_rate() { # mbit
    local args=(tbf rate "${1}mbit" burst 64kb latency 50ms)
    innet tc qdisc del dev "$VETH_NS" root 2>/dev/null
    if [ "$RTT_MS" -gt 0 ]; then
        innet tc qdisc add dev "$VETH_NS" root handle 1: netem delay "${RTT_MS}ms" limit 100000 &&
            innet tc qdisc add dev "$VETH_NS" parent 1:1 handle 10: "${args[@]}"
    else
        innet tc qdisc add dev "$VETH_NS" root "${args[@]}"
    fi
}

# ---- measurements ----------------------------------------------------------
# Each run sets ROW[key] fields: time, body, veth, reqs, conns, inflight, note.
declare -A ROW
ROWS=()

# Summarises nginx log lines [from, to] (1-based) for chunk or big-file requests:
# "requests body_bytes connections".
log_summary() { # from to
    sed -n "${1},${2}p" "$WORK/nginx/access.log" | awk '
        $7 ~ /^\/(chunks\/|big\.bin)/ {
            n++; bytes += $6; conn[$3] = 1
        }
        END {
            c = 0; for (k in conn) c++
            printf "%d %d %d\n", n, bytes, c
        }'
}

record() { # key label t0 t1 rx0 rx1 line0 line1
    local key=$1 s
    sleep 0.2 # let nginx write the last log line
    s=$(log_summary "$(($7 + 1))" "$(log_lines)")
    read -r "ROW[$key.reqs]" "ROW[$key.body]" "ROW[$key.conns]" <<<"$s"
    ROW[$key.label]=$2
    ROW[$key.time]=$(elapsed "$3" "$4")
    ROW[$key.veth]=$(($6 - $5))
    ROWS+=("$key")
    log "$2: ${ROW[$key.time]} s, ${ROW[$key.body]} body bytes, ${ROW[$key.reqs]} requests, ${ROW[$key.conns]} connections"
}

run_curl() { # key label curl-args...
    local key=$1 label=$2 t0 t1 rx0 rx1 l0 out
    shift 2
    l0=$(log_lines) rx0=$(rx_bytes) t0=$(now)
    out=$(curl -s --noproxy '*' -w '%{http_code} %{size_download} %{num_connects}\n' "$@")
    t1=$(now) rx1=$(rx_bytes)
    record "$key" "$label" "$t0" "$t1" "$rx0" "$rx1" "$l0"
    ROW[$key.logical]=-
    ROW[$key.inflight]=1
    local bad
    bad=$(awk '$1 != 200' <<<"$out" | wc -l)
    [ "$bad" -gt 0 ] && ROW[$key.note]="$bad responses not 200"
}

run_imgfs() { # key
    local key=$1 t0 t1 rx0 rx1 l0 stats
    unmount_imgfs
    rm -rf "$WORK/cache" && mkdir -p "$WORK/cache" "$MNT"
    "$IMGFS_BIN_DIR/imgfs" "$BASE_URL" "$MNT" -f -o "cache=$WORK/cache,insecure" >"$WORK/imgfs-$key.log" 2>&1 &
    IMGFS_PID=$!
    for i in $(seq 100); do
        mountpoint -q "$MNT" && break
        kill -0 "$IMGFS_PID" 2>/dev/null || break
        sleep 0.1
    done
    if ! mountpoint -q "$MNT" || [ ! -e "$MNT/bases/$NAME.raw" ]; then
        ROW[$key.label]=imgfs ROW[$key.note]="did not mount: $(tail -n 1 "$WORK/imgfs-$key.log")"
        ROWS+=("$key")
        return
    fi
    l0=$(log_lines) rx0=$(rx_bytes) t0=$(now)
    dd if="$MNT/bases/$NAME.raw" of=/dev/null bs=1M status=none || ROW[$key.note]="read failed"
    t1=$(now) rx1=$(rx_bytes)
    stats=$(cat "$MNT/.imgfs/stats")
    record "$key" "imgfs (cold cache)" "$t0" "$t1" "$rx0" "$rx1" "$l0"
    ROW[$key.logical]=$SIZE_BYTES
    # Little's law: mean requests in flight = requests * mean latency / elapsed.
    ROW[$key.inflight]=$(awk -v t="${ROW[$key.time]}" '
        /^\[/ { sec = $0 } sec == "[mirror 0]" && $1 == "requests" { n = $2 }
        sec == "[mirror 0]" && $1 == "avg_latency_ms" { l = $2 }
        END { if (t > 0) printf "%.2f", n * l / 1000 / t; else print "-" }' <<<"$stats")
    ROW[$key.stats_reqs]=$(awk '/^\[fetch\]/ { f = 1 } f && $1 == "requests" { print $2; exit }' <<<"$stats")
    ROW[$key.stats_bytes]=$(awk '/^\[fetch\]/ { f = 1 } f && $1 == "bytes_transferred" { print $2; exit }' <<<"$stats")
    ROW[$key.latency]=$(awk '/^\[mirror 0\]/ { f = 1 } f && $1 == "avg_latency_ms" { print $2; exit }' <<<"$stats")
    ROW[$key.errors]=$(awk '/^\[fetch\]/ { f = 1 } f && $1 == "errors" { print $2; exit }' <<<"$stats")
    cmp -s "$WORK/image.raw" "$MNT/bases/$NAME.raw" ||
        ROW[$key.note]="${ROW[$key.note]:+${ROW[$key.note]}; }CONTENT DIFFERS from the image"
    unmount_imgfs
}

for rate in $BENCH_RATES; do
    log "rate $rate Mbit/s, +$RTT_MS ms delay"
    set_rate "$rate" || die "cannot set up tc on $VETH_NS (sch_tbf or sch_netem missing?)."
    run_curl "$rate.big" "curl big file" -o /dev/null "$BASE_URL/big.bin"
    run_curl "$rate.chunks" "curl chunks, 1 conn" --config "$WORK/curl-chunks.cfg"
    run_imgfs "$rate.imgfs"
done
ELAPSED=$(($(date +%s) - START))

# ---- report ----------------------------------------------------------------
fmt() { awk -v a="$1" -v b="$2" -v s="${3:-1}" -v f="${4:-%.1f}" \
    'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf f, a / b / s; else printf "-" }'; }
report() {
    echo "# imgfs over HTTP at a capped bandwidth, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) CPUs, kernel $(uname -r); $(nginx -v 2>&1 | sed 's/.*: //'); $(curl --version | head -n 1 | cut -d' ' -f1-2);" \
        "imgfs $("$IMGFS_BIN_DIR/imgfs" --version 2>&1 | head -n 1 | grep -o '[0-9][0-9.]*' | head -n 1)"
    echo "- image: $((SIZE_BYTES / 1048576)) MiB logical in 1 MiB extents ($N_RAND random, $N_ZERO zero);" \
        "chunk size $CHUNK_SIZE; $N_STORED of $N_CHUNKS chunks stored, $STORED_BYTES bytes" \
        "($(fmt "$STORED_BYTES" 1048576 1) MiB) on the wire"
    echo "- link: veth into a network namespace, server egress shaped by tc tbf (burst 64kb, latency 50ms)" \
        "$([ "$RTT_MS" -gt 0 ] && echo "behind netem delay ${RTT_MS} ms" || echo "with no added delay"); nginx in the namespace; total run ${ELAPSED}s"
    echo "- MB/s = HTTP body bytes / time (10^6); logical MB/s = image bytes / time; veth rx = all bytes received incl. headers and TCP/IP;"
    echo "  req/MiB per MiB of body bytes; in flight = mean concurrent requests (curl: 1; imgfs: its request count x mean latency / time)"
    echo
    echo "| Mbit/s | client | time s | MB/s | logical MB/s | body bytes | veth rx bytes | requests | req/MiB | conns | in flight | vs curl chunks | vs big file |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local k rate t
    for k in "${ROWS[@]}"; do
        rate=${k%%.*}
        t=${ROW[$k.time]:-}
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$rate" "${ROW[$k.label]}" \
            "${t:--}" "$(fmt "${ROW[$k.body]:-}" "$t" 1e6)" \
            "$(fmt "${ROW[$k.logical]:-}" "$t" 1e6)" "${ROW[$k.body]:--}" "${ROW[$k.veth]:--}" \
            "${ROW[$k.reqs]:--}" "$(fmt "${ROW[$k.reqs]:-}" "${ROW[$k.body]:-}" "$(awk 'BEGIN { print 1 / 1048576 }')" %.2f)" \
            "${ROW[$k.conns]:--}" "${ROW[$k.inflight]:--}" \
            "$(fmt "${ROW[$rate.chunks.time]:-}" "$t" 1 %.2fx)" "$(fmt "${ROW[$rate.big.time]:-}" "$t" 1 %.2fx)"
    done
    echo
    echo "Notes:"
    echo "- ratios are time ratios (curl time / this time) for the same body bytes: >= 0.90x of curl chunks is the target."
    for k in "${ROWS[@]}"; do
        if [ -n "${ROW[$k.stats_reqs]:-}" ]; then
            echo "- ${k%%.*} Mbit/s imgfs stats: [fetch] requests ${ROW[$k.stats_reqs]}, bytes_transferred ${ROW[$k.stats_bytes]}," \
                "errors ${ROW[$k.errors]}; [mirror 0] avg_latency_ms ${ROW[$k.latency]}"
        fi
        [ -n "${ROW[$k.note]:-}" ] && echo "- ${k%%.*} Mbit/s ${ROW[$k.label]}: ${ROW[$k.note]}"
    done
    return 0
}

report | save_report http
