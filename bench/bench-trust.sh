#!/usr/bin/env bash
# bench-trust.sh: the cost of checking chunks against their signed digest
# (SHA-256 through OpenSSL in new records), on cold reads, side by side in
# one run.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
#
# One mixed image (default 256 MiB: 1 MiB extents, ~75% random, ~25% zero) is
# published and signed (imgfsctl key generate, publish --key). The same
# repository is then read cold (fresh cache, dropped page cache) four ways:
#   local, unsigned   the directory mounted without trust= (xxh3-128 only)
#   local, signed     the directory with -o trust=KEY.pub (SHA-256 only: a
#                     chunk with a signed digest is not checked by xxh3 too)
#   http, insecure    nginx in a network namespace, tc tbf at BENCH_RATE
#                     Mbit/s, mounted with -o insecure
#   http, signed      the same with -o trust=KEY.pub
# With BENCH_V1_BIN_DIR=DIR (a build from before SHA-256, e.g. main at
# 146a6bb), DIR/imgfsctl also publishes the image into a second repository,
# whose records carry BLAKE2b-256 chunk digests (record version 1), read by
# this build as a fifth case:
#   local, signed v1  that repository with -o trust=KEY.pub (BLAKE2b)
# With BASELINE_BIN_DIR=DIR (another build, e.g. main before a change), the
# daemon DIR/imgfs reads the same repository the same ways in the same
# rounds, right after this build's daemon (cases named base-...), and the
# report adds the ratio of this build to it.
# Each case runs BENCH_ROUNDS times, the cases alternating within a round;
# the report gives the median time, MB/s of logical bytes, the daemon's CPU
# seconds (user+sys, from /proc) and the ratio signed / unsigned, and after
# the rounds how fast this build hashes one chunk with each hash
# (IMGFS_BIN_DIR/tests/digestspeed, when built).
#
# Run as root. Environment: BENCH_SIZE (256M), BENCH_RATE (100), BENCH_ROUNDS
# (3), BENCH_DIR (/var/tmp), BENCH_KEEP=1, IMGFS_BIN_DIR (<repo>/build),
# BENCH_V1_BIN_DIR (unset), BASELINE_BIN_DIR (unset), BENCH_HTTP (1; 0
# leaves the HTTP cases out, for more local rounds in the same time).
# Output: a Markdown report on stdout and in bench/results/trust-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

IMGFS_BIN_DIR=${IMGFS_BIN_DIR:-$SRC_DIR/build}
BENCH_SIZE=${BENCH_SIZE:-256M}
BENCH_RATE=${BENCH_RATE:-100}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
NS_NAME=imgfstrust$$
VETH_ROOT=itr$$
VETH_NS=itn$$
IP_ROOT=10.214.0.1
IP_NS=10.214.0.2
URL=http://$IP_NS:8080

require_root "network namespace, tc, FUSE and drop_caches"
require_tools nginx curl ip tc nsenter fusermount3 mountpoint awk
require_imgfs "$IMGFS_BIN_DIR"
[ -z "${BASELINE_BIN_DIR:-}" ] || require_imgfs "$BASELINE_BIN_DIR"
[[ $BENCH_RATE =~ ^[0-9]+$ && $BENCH_ROUNDS =~ ^[0-9]+$ ]] || die "BENCH_RATE and BENCH_ROUNDS must be whole numbers."
SIZE_BYTES=$(to_bytes "$BENCH_SIZE" BENCH_SIZE)
EXTENT=1048576
SIZE_BYTES=$((SIZE_BYTES / EXTENT * EXTENT))
[ "$SIZE_BYTES" -ge $((16 * EXTENT)) ] || die "BENCH_SIZE must be at least 16M."

make_work imgfs-bench-trust
MNT=$WORK/mnt
IMGFS_PID=
unmount_imgfs() {
    unmount_path "$MNT"
    [ -n "$IMGFS_PID" ] && stop_pid "$IMGFS_PID"
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

log "generating a $BENCH_SIZE image"
truncate -s "$SIZE_BYTES" "$WORK/image.raw"
RANDOM=4244
for ((i = 0; i < SIZE_BYTES / EXTENT; i++)); do
    if ((RANDOM % 100 < 75)); then
        head -c $EXTENT /dev/urandom | dd of="$WORK/image.raw" bs=$EXTENT seek="$i" count=1 iflag=fullblock conv=notrunc status=none
    fi
done
REPO=$WORK/www/repo
"$IMGFS_BIN_DIR/imgfsctl" key generate "$WORK/key" >/dev/null || die "key generate failed."
log "publishing (signed)"
"$IMGFS_BIN_DIR/imgfsctl" publish "$WORK/image.raw" "$REPO" --name base --key "$WORK/key" >"$WORK/publish.log" 2>&1 ||
    die "publish failed: $(tail -n 1 "$WORK/publish.log")"
[ "$(head -n 1 "$REPO/bases/base/1.digests")" = "imgfs-digests 2" ] || die "this build did not write a SHA-256 record."
REPO_V1=$WORK/www/repo-v1
if [ -n "${BENCH_V1_BIN_DIR:-}" ]; then
    log "publishing (signed, BLAKE2b records) with $BENCH_V1_BIN_DIR/imgfsctl"
    "$BENCH_V1_BIN_DIR/imgfsctl" publish "$WORK/image.raw" "$REPO_V1" --name base --key "$WORK/key" >"$WORK/publish-v1.log" 2>&1 ||
        die "publish with $BENCH_V1_BIN_DIR failed: $(tail -n 1 "$WORK/publish-v1.log")"
    [ "$(head -n 1 "$REPO_V1/bases/base/1.digests")" = "imgfs-digests 1" ] ||
        die "$BENCH_V1_BIN_DIR/imgfsctl did not write a version 1 (BLAKE2b) record."
fi

netns_create "$NS_NAME" "$VETH_ROOT" "$VETH_NS" "$IP_ROOT" "$IP_NS"
nginx_start_in_ns "$WORK/nginx" "$WORK/www" "$IP_NS:8080" '$status $body_bytes_sent $request_uri' "$URL/repo/imgfs-repo"
innet tc qdisc add dev "$VETH_NS" root tbf rate "${BENCH_RATE}mbit" burst 64kb latency 50ms ||
    die "cannot shape $VETH_NS with tc tbf."

declare -A TIMES CPU
# CPU seconds (user + sys) of the daemon and its children (the serving
# process is a child of the supervisor).
cpu_seconds() {
    local pids="$1 $(ps -o pid= --ppid "$1" | tr '\n' ' ')" p total=0
    for p in $pids; do
        total=$(awk -v t="$total" -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", t + ($12 + $13) / hz }' \
            "/proc/$p/stat" 2>/dev/null || echo "$total")
    done
    echo "$total"
}
run_case() { # key repo options [bin-dir]
    local key=$1 repo=$2 opts=$3 bin=${4:-$IMGFS_BIN_DIR} t0 t1 cpu
    unmount_imgfs
    rm -rf "$WORK/cache" "$WORK/state" && mkdir -p "$WORK/cache" "$WORK/state" "$MNT"
    sync && echo 3 >/proc/sys/vm/drop_caches
    "$bin/imgfs" "$repo" "$MNT" -f -o "cache=$WORK/cache,state=$WORK/state,$opts" >"$WORK/imgfs-$key.log" 2>&1 &
    IMGFS_PID=$!
    wait_mounted "$MNT" 10 && [ -e "$MNT/bases/base.raw" ] || die "$key did not mount: $(tail -n 1 "$WORK/imgfs-$key.log")"
    t0=$EPOCHREALTIME
    dd if="$MNT/bases/base.raw" of=/dev/null bs=1M status=none || die "$key: the read failed"
    t1=$EPOCHREALTIME
    cpu=$(cpu_seconds "$IMGFS_PID")
    grep -q "^mode *$( [[ $opts == trust=* ]] && echo signed || echo '[ui]n')" "$MNT/.imgfs/stats" ||
        die "$key: the mount is not in the expected trust mode"
    cmp -s "$MNT/bases/base.raw" "$WORK/image.raw" || die "$key: content differs"
    unmount_imgfs
    TIMES[$key]="${TIMES[$key]:-} $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
    CPU[$key]="${CPU[$key]:-} $cpu"
    log "$key: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s, daemon CPU $cpu s"
}
CASES=(local-unsigned local-signed)
[ -n "${BASELINE_BIN_DIR:-}" ] && CASES+=(base-local-unsigned base-local-signed)
[ -n "${BENCH_V1_BIN_DIR:-}" ] && CASES+=(local-signed-v1)
[ "${BENCH_HTTP:-1}" = 0 ] || CASES+=(http-insecure http-signed)
[ "${BENCH_HTTP:-1}" = 0 ] || [ -z "${BASELINE_BIN_DIR:-}" ] || CASES+=(base-http-insecure base-http-signed)
# both_builds KEY REPO OPTIONS: this build's case, then the baseline's.
both_builds() {
    run_case "$1" "$2" "$3"
    [ -z "${BASELINE_BIN_DIR:-}" ] || run_case "base-$1" "$2" "$3" "$BASELINE_BIN_DIR"
}
for ((round = 1; round <= BENCH_ROUNDS; round++)); do
    log "round $round of $BENCH_ROUNDS"
    both_builds local-unsigned "$REPO" "prefetch=none"
    both_builds local-signed "$REPO" "trust=$WORK/key.pub,prefetch=none"
    [ -n "${BENCH_V1_BIN_DIR:-}" ] && run_case local-signed-v1 "$REPO_V1" "trust=$WORK/key.pub,prefetch=none"
    [ "${BENCH_HTTP:-1}" = 0 ] && continue
    both_builds http-insecure "$URL/repo" "insecure,prefetch=none"
    both_builds http-signed "$URL/repo" "trust=$WORK/key.pub,prefetch=none"
done

SPEED=
if [ -x "$IMGFS_BIN_DIR/tests/digestspeed" ]; then
    log "hashing speed of one 128 KiB chunk"
    SPEED=$("$IMGFS_BIN_DIR/tests/digestspeed" 131072 5) || die "digestspeed failed."
fi

median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
report() {
    echo "# Cold reads with and without signed chunk digests, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) CPUs, kernel $(uname -r); image $((SIZE_BYTES / 1048576)) MiB (75% random, 25% zero extents);"
    echo "  signed: SHA-256 (OpenSSL EVP) chunk digests, no xxh3-128 check; unsigned: xxh3-128;"
    [ -n "${BENCH_V1_BIN_DIR:-}" ] && echo "  signed-v1: BLAKE2b-256 (libsodium) records written by $BENCH_V1_BIN_DIR/imgfsctl;"
    [ "${BENCH_HTTP:-1}" = 0 ] || echo "  http: nginx in a netns, tc tbf ${BENCH_RATE} Mbit/s;"
    [ -z "${BASELINE_BIN_DIR:-}" ] || echo "  base-...: the same case read by $BASELINE_BIN_DIR/imgfs, right after this build's;"
    echo "  $BENCH_ROUNDS rounds, cases alternating, page cache dropped and cache emptied before each read; median of the rounds"
    echo
    echo "| case | median s | logical MB/s | daemon CPU s | all runs (s) | signed / unsigned time | this build / baseline time |"
    echo "|---|---:|---:|---:|---|---:|---:|"
    local k med base other
    for k in "${CASES[@]}"; do
        med=$(median <<<"${TIMES[$k]}")
        case $k in
        local-signed | local-signed-v1 | base-local-signed) base=$(median <<<"${TIMES[${k%-signed*}-unsigned]}") ;;
        http-signed | base-http-signed) base=$(median <<<"${TIMES[${k%-signed}-insecure]}") ;;
        *) base= ;;
        esac
        other=
        [[ $k != base-* && -n ${TIMES[base-$k]:-} ]] && other=$(median <<<"${TIMES[base-$k]}")
        printf '| %s | %s | %.1f | %s | %s | %s | %s |\n' "$k" "$med" "$(awk -v s="$SIZE_BYTES" -v t="$med" 'BEGIN { print s / t / 1e6 }')" \
            "$(median <<<"${CPU[$k]}")" "${TIMES[$k]# }" \
            "$([ -n "$base" ] && awk -v a="$med" -v b="$base" 'BEGIN { printf "%.3fx", a / b }' || echo -)" \
            "$([ -n "$other" ] && awk -v a="$med" -v b="$other" 'BEGIN { printf "%.3fx", a / b }' || echo -)"
    done
    if [ -n "$SPEED" ]; then
        echo
        echo "Hashing one 128 KiB chunk in this build (tests/digestspeed, median of 5 rounds of 256 MiB):"
        echo
        sed 's/^/    /' <<<"$SPEED"
    fi
}
report | save_report trust
