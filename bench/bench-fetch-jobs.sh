#!/usr/bin/env bash
# bench-fetch-jobs.sh: the fetch engine with thousands of requests in flight,
# for two or more builds side by side, from a local repository and over HTTP
# through nginx.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# bench/fetch-jobs.c is built against each build's libimgfs_core.a (and the
# headers of that build's source tree). It asks the engine for N distinct
# 16 KiB chunks at once (fetch_start, demand class, one waiter each, every
# answer let go as it comes, as a FUSE reply does) with an empty cache, and
# reports the time to the last answer and the CPU the process used. The
# jobs wait for the engine's transfer slots, so N jobs are live at once:
# what grows faster than N is a cost per job paid per wake of the engine.
# Each round runs every count with every build in turn (the builds taking
# turns in going first), local then HTTP.
#
# Environment:
#   BENCH_BUILDS  "NAME=DIR ..." (default "this=<repo>/build"), each DIR a
#                 CMake build directory with libimgfs_core.a
#   BENCH_JOBS    the counts of requests (default "2000 20000")
#   BENCH_ROUNDS  rounds (default 3)
#   BENCH_DIR     parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1  keep the work directory
# Output: Markdown on stdout, also written to bench/results/fetch-jobs-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

BUILDS=${BENCH_BUILDS:-this=$SRC_DIR/build}
COUNTS=(${BENCH_JOBS:-2000 20000})
ROUNDS=${BENCH_ROUNDS:-3}
require_count "$ROUNDS" BENCH_ROUNDS
MAX=0
for n in "${COUNTS[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "BENCH_JOBS entry '$n' is not a positive count."
    [ "$n" -gt "$MAX" ] && MAX=$n
done
require_tools cc pkg-config nginx python3 curl

make_work imgfs-bench-fetch-jobs
on_exit cleanup_all

NAMES=()
declare -A TOOL
LIBS=$(pkg-config --libs libqcow libzstd libxxhash libcurl ext2fs libsodium libcrypto) ||
    die "the libraries imgfs links with are not all installed."
for b in $BUILDS; do
    [[ $b == *=* ]] || die "BENCH_BUILDS entry '$b' is not NAME=DIR."
    name=${b%%=*} dir=${b#*=}
    [ -f "$dir/libimgfs_core.a" ] || die "$dir has no libimgfs_core.a (build it first)."
    src=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$dir/CMakeCache.txt" 2>/dev/null)
    [ -d "$src/include" ] || die "cannot find the source tree of the build in $dir."
    cc -O2 -I"$src/include" -o "$WORK/fetch-jobs-$name" "$SCRIPT_DIR/fetch-jobs.c" "$dir/libimgfs_core.a" $LIBS \
        -lpthread 2>"$WORK/cc-$name.log" || die "cannot build fetch-jobs for $name: $(tail -n 1 "$WORK/cc-$name.log")"
    TOOL[$name]=$WORK/fetch-jobs-$name
    NAMES+=("$name")
done

log "writing $MAX chunks"
"${TOOL[${NAMES[0]}]}" make "$WORK" "$MAX" || die "cannot write the repository."

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
master_process off;
daemon off;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    server { listen 127.0.0.1:$PORT; root $WORK; }
}
EOF
nginx -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/stdout.log" 2>&1 &
PIDS+=($!)
URL=http://127.0.0.1:$PORT/repo
for _ in $(seq 100); do curl -sf -o /dev/null "$URL/imgfs-repo" && break; sleep 0.1; done
curl -sf -o /dev/null "$URL/imgfs-repo" || die "nginx does not answer on $URL."

declare -A RUNS
for round in $(seq "$ROUNDS"); do
    order=("${NAMES[@]}")
    [ $((round % 2)) -eq 0 ] && order=($(printf '%s\n' "${NAMES[@]}" | tac))
    for n in "${COUNTS[@]}"; do
        for where in local http; do
            repo=$WORK/repo
            [ "$where" = http ] && repo=$URL
            for name in "${order[@]}"; do
                log "round $round: $n requests, $where, $name"
                rm -rf "$WORK/cache"
                out=$("${TOOL[$name]}" run "$WORK" "$repo" "$n") || die "fetch-jobs failed ($name, $where, $n)."
                RUNS[$name,$where,$n]+="$out"$'\n'
            done
        done
    done
done

# median and range of field F (1: seconds, 2: CPU seconds) of runs
stat() { # runs field
    echo -n "$1" | awk -v f="$2" 'NF { print $f }' | sort -g | awk '{ v[NR] = $1 } END { n = NR;
        printf "%.2f (%.2f-%.2f)", n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2, v[1], v[n] }'
}
median() { stat "$1" "$2" | cut -d' ' -f1; }
{
    echo "# imgfs fetch engine with many jobs, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(nproc) CPUs, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg). N distinct 16 KiB chunks"
    echo "asked for at once; median (range) of $ROUNDS rounds. Command: \`BENCH_BUILDS=\"$BUILDS\" bash bench/bench-fetch-jobs.sh\`."
    echo
    head="| repository | requests |"
    sep="|---|---:|"
    for name in "${NAMES[@]}"; do
        head="$head $name s | $name CPU s |"
        sep="$sep---:|---:|"
    done
    [ ${#NAMES[@]} -ge 2 ] && head="$head ${NAMES[1]}/${NAMES[0]} s | CPU |" && sep="$sep---:|---:|"
    echo "$head"
    echo "$sep"
    for where in local http; do
        for n in "${COUNTS[@]}"; do
            line="| $where | $n |"
            for name in "${NAMES[@]}"; do
                line="$line $(stat "${RUNS[$name,$where,$n]}" 1) | $(stat "${RUNS[$name,$where,$n]}" 2) |"
            done
            if [ ${#NAMES[@]} -ge 2 ]; then
                a=${RUNS[${NAMES[0]},$where,$n]} b=${RUNS[${NAMES[1]},$where,$n]}
                line="$line $(awk -v x="$(median "$b" 1)" -v y="$(median "$a" 1)" 'BEGIN { printf "%.2fx", x / y }') |"
                line="$line $(awk -v x="$(median "$b" 2)" -v y="$(median "$a" 2)" 'BEGIN { printf "%.2fx", x / y }') |"
            fi
            echo "$line"
        done
    done
} | save_report fetch-jobs
