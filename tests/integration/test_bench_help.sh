#!/bin/bash
# Every benchmark script (bench/*.sh, bench/*/*.sh; bench/lib.sh is sourced,
# not run) answers -h and --help with its usage and exit status 0 before it
# does anything: its first line names the script and it lists the
# environment; nothing is left running (no process in the script's session),
# nothing is mounted under the test's directory, and nothing is written into
# TMPDIR, BENCH_DIR or bench/results. An unknown option prints the usage to
# stderr and exits 2, also doing nothing. Each script runs in a session of its
# own with IMGFS_BIN_DIR pointing at an empty directory, so that one that
# ignored --help stops at its first check instead of running a benchmark.
. "$(dirname "$0")/lib.sh"
SRC=${IMGFS_SOURCE_DIR:?}
mkdir -p "$T/tmp" "$T/work" "$T/nobin"
results() { ls -A "$SRC/bench/results" 2>/dev/null || true; }
results > "$T/results.before"

# run SCRIPT ARG: runs it in a new session (its pid is its session id),
# with stdout in $T/out and stderr in $T/err; sets STATUS and SID. The
# bound only ends a run that fails: a help that started a benchmark.
run() {
    rm -f "$T/sid"
    STATUS=0
    TMPDIR=$T/tmp BENCH_DIR=$T/work OUT_DIR=$T/work IMGFS_BIN_DIR=$T/nobin BENCH_KEEP= \
        timeout -k 5 120 setsid -w bash -c 'echo $$ > "$0"; exec bash "$@"' "$T/sid" "$1" "$2" \
        > "$T/out" 2> "$T/err" < /dev/null || STATUS=$?
    SID=$(cat "$T/sid" 2>/dev/null || echo none)
    # What is still running in its session is noted and stopped at once.
    LEFT=$(ps -eo sid=,pid=,args= | awk -v s="$SID" '$1 == s { $1 = ""; print }')
    ps -eo sid=,pid= | awk -v s="$SID" '$1 == s { print $2 }' | xargs -r kill -9 2>/dev/null || true
}

# did_nothing WHAT: nothing of the run is left behind.
did_nothing() {
    [ -z "$LEFT" ] || fail "$1 left processes running: $LEFT"
    grep -F " $T/" /proc/self/mountinfo && fail "$1 mounted something under $T"
    local made
    made=$(find "$T/tmp" "$T/work" -mindepth 1 | tr '\n' ' ')
    [ -z "$made" ] || fail "$1 wrote files: $made"
    [ "$(results)" = "$(cat "$T/results.before")" ] || fail "$1 wrote a report into bench/results"
}

scripts=()
for s in "$SRC"/bench/*.sh "$SRC"/bench/*/*.sh; do
    [ "$(basename "$s")" = lib.sh ] || scripts+=("$s")
done
[ ${#scripts[@]} -ge 19 ] || fail "only ${#scripts[@]} bench scripts found under $SRC/bench"

for s in "${scripts[@]}"; do
    name=${s#"$SRC"/bench/}
    for arg in --help -h; do
        run "$s" "$arg"
        [ "$STATUS" -ne 124 ] || fail "$name $arg did not exit within 120 s: it started a benchmark"
        [ "$STATUS" -eq 0 ] || fail "$name $arg exited with status $STATUS: $(head -n 3 "$T/err")"
        [ ! -s "$T/err" ] || fail "$name $arg wrote to stderr: $(head -n 3 "$T/err")"
        head -n 1 "$T/out" | grep -q "^$(basename "$s")[: ]" || fail "$name $arg: the usage does not start with the script's name: $(head -n 1 "$T/out")"
        grep -q 'Environment' "$T/out" || fail "$name $arg: the usage does not list the environment"
        did_nothing "$name $arg"
    done
    run "$s" --no-such-option
    [ "$STATUS" -eq 2 ] || fail "$name --no-such-option exited with status $STATUS, not 2: $(head -n 3 "$T/err")"
    grep -q -- "--no-such-option" "$T/err" || fail "$name --no-such-option: stderr does not name the argument"
    grep -q "^$(basename "$s")[: ]" "$T/err" || fail "$name --no-such-option: stderr has no usage"
    [ ! -s "$T/out" ] || fail "$name --no-such-option wrote to stdout"
    did_nothing "$name --no-such-option"
done
ok "${#scripts[@]} bench scripts: --help and -h print the usage and exit 0, an unknown option exits 2, none starts anything"
finish
