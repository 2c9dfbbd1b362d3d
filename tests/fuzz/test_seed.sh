#!/bin/sh
# The fuzz runs are replayable (run.sh): test_seed.sh RUN_SH HARNESS SEEDS TMP.
# A run prints the seed it used, which is IMGFS_FUZZ_SEED when that is set;
# two runs with one seed and the same bound make the same choices (the same
# coverage, features and corpus at the end); a bad seed is refused with one
# sentence.
set -u
run_sh=$1 harness=$2 seeds=$3 tmp=$4
failed=0
fail() { echo "FAIL: $*" >&2; failed=1; }
rm -rf "$tmp" && mkdir -p "$tmp" || exit 1

run() { # run OUT: the manifest harness for 2000 inputs
    IMGFS_FUZZ_RUNS=2000 sh "$run_sh" seedtest "$harness" "$tmp/work" "$tmp/artifacts" 30 "$seeds" > "$1" 2>&1
}
# The last "#N DONE cov: ... ft: ... corp: ..." line, without the timing columns.
final() { sed -n 's/^#\([0-9]*\)[[:space:]]*DONE[[:space:]]*\(cov: [0-9]* ft: [0-9]* corp: [0-9]*\).*/\1 \2/p' "$1" | tail -n 1; }

IMGFS_FUZZ_SEED=424242 run "$tmp/a" || fail "the first run with a seed failed: $(tail -n 5 "$tmp/a")"
IMGFS_FUZZ_SEED=424242 run "$tmp/b" || fail "the second run with a seed failed: $(tail -n 5 "$tmp/b")"
grep -q "^fuzz.seedtest: seed 424242 (replay: IMGFS_FUZZ_SEED=424242 " "$tmp/a" || fail "the seed given is not printed"
grep -q "Seed: 424242$" "$tmp/a" || fail "libFuzzer did not run with the seed given"
[ -n "$(final "$tmp/a")" ] || fail "no final stats in the run: $(tail -n 5 "$tmp/a")"
[ "$(final "$tmp/a")" = "$(final "$tmp/b")" ] ||
    fail "two runs with one seed differ: '$(final "$tmp/a")' and '$(final "$tmp/b")'"

(unset IMGFS_FUZZ_SEED; run "$tmp/c") || fail "a run without a seed failed: $(tail -n 5 "$tmp/c")"
printed=$(sed -n 's/^fuzz.seedtest: seed \([0-9]*\) .*/\1/p' "$tmp/c")
[ -n "$printed" ] || fail "a run without a seed printed none"
grep -q "Seed: $printed\$" "$tmp/c" || fail "the seed printed ($printed) is not the one libFuzzer used"

for bad in abc 0 4294967296 -1; do
    if IMGFS_FUZZ_SEED=$bad run "$tmp/d"; then
        fail "IMGFS_FUZZ_SEED=$bad was accepted"
    fi
    [ "$(wc -l < "$tmp/d")" -eq 1 ] && grep -q "IMGFS_FUZZ_SEED must be a number" "$tmp/d" ||
        fail "IMGFS_FUZZ_SEED=$bad: not one sentence: $(cat "$tmp/d")"
done
rm -rf "$tmp"
[ "$failed" -eq 0 ] && echo "fuzz seeds: printed, taken from IMGFS_FUZZ_SEED, replayed, bad ones refused"
exit "$failed"
