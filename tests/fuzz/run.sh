#!/bin/sh
# One libFuzzer run of a harness, replayable: run.sh NAME HARNESS WORK ARTIFACTS SECONDS INPUT_DIR...
# The seed of libFuzzer's random choices is IMGFS_FUZZ_SEED when set (1 to
# 4294967295), else a random one; it is printed first, with the command that
# replays the run. Each run starts from the input directories alone (WORK,
# where libFuzzer adds what it finds, is emptied first), so that a seed and
# the tree it ran on replay it. IMGFS_FUZZ_RUNS, when set, bounds the run by
# inputs instead of SECONDS (a run bounded by time stops at a point that
# depends on the machine).
set -eu
[ $# -ge 6 ] || { echo "usage: run.sh NAME HARNESS WORK ARTIFACTS SECONDS INPUT_DIR..." >&2; exit 2; }
name=$1 harness=$2 work=$3 artifacts=$4 seconds=$5
shift 5

if [ -n "${IMGFS_FUZZ_SEED:-}" ]; then
    seed=$IMGFS_FUZZ_SEED
    case $seed in
    *[!0-9]* | 0*) seed= ;; # not a number, or 0 (libFuzzer's "pick one") or with leading zeros
    esac
    if [ -z "$seed" ] || [ ${#seed} -gt 10 ] || [ "$seed" -gt 4294967295 ]; then
        echo "fuzz.$name: IMGFS_FUZZ_SEED must be a number from 1 to 4294967295, not '$IMGFS_FUZZ_SEED'" >&2
        exit 2
    fi
else
    seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' \n')
    [ "$seed" -ne 0 ] || seed=1
fi
bound="-max_total_time=$seconds"
[ -z "${IMGFS_FUZZ_RUNS:-}" ] || bound="-runs=$IMGFS_FUZZ_RUNS"
echo "fuzz.$name: seed $seed (replay: IMGFS_FUZZ_SEED=$seed ctest -R '^fuzz.$name\$' in this build)"

rm -rf "$work"
mkdir -p "$work" "$artifacts"
exec "$harness" -seed="$seed" "$bound" -timeout=10 -rss_limit_mb=2560 -max_len=65536 -print_final_stats=1 \
    "-artifact_prefix=$artifacts/$name-" "$work" "$@"
