#!/usr/bin/env bash
# bench-compact.sh: how long layer compactions hold a VM's writes and
# flushes while the guest keeps writing, for one or more builds side by side.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# For each build in BENCH_BUILDS, in turn, BENCH_ROUNDS times (the builds
# interleaved, so that load from elsewhere falls on all alike): a new mount
# with its own state directory, a 1 GiB VM without a base whose first
# BENCH_REGION (default 128M) is written once with 1 MiB writes, then fio
# 4 KiB randwrite, O_DIRECT, libaio iodepth 16, an fsync every 32 writes,
# over that region for BENCH_TIME seconds (default 30). Dead space passes
# the live data again and again, so the layer compacts many times. Every
# compaction logs how long it held the layer's writes and its flushes; the
# report gives per build and round the number of compactions, the median,
# p90 and largest of both holds, and fio's IOPS and p99.9 and largest
# completion latency.
#
# A build from before the split of the two holds logs one figure ("writes
# paused"), which held writes and flushes alike; it is shown in both
# columns (its flushes also waited for a directory fsync after it, which
# that build did not log).
#
# Run as root. Environment:
#   BENCH_BUILDS   "NAME=DIR ..." (default "this=<repo>/build"), each DIR
#                  with imgfs and imgfsctl
#   BENCH_ROUNDS   rounds per build (default 3)
#   BENCH_TIME     seconds of fio per round (default 30)
#   BENCH_REGION   the written region that fio rewrites (default 128M)
#   BENCH_DIR      parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1   keep the work directory (daemon logs, fio JSON)
# Output: Markdown on stdout, also written to bench/results/compact-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

BUILDS=${BENCH_BUILDS:-this=$SRC_DIR/build}
ROUNDS=${BENCH_ROUNDS:-3}
RUNTIME=${BENCH_TIME:-30}
REGION=${BENCH_REGION:-128M}
to_bytes "$REGION" BENCH_REGION >/dev/null
require_count "$ROUNDS" BENCH_ROUNDS
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "BENCH_TIME=$RUNTIME is not a number of seconds."

require_root "FUSE mounts"
require_tools fio python3 fusermount3
declare -A BIN
parse_builds "$BUILDS"

make_work imgfs-bench-compact
on_exit cleanup_all
# A repository to mount (with a small base nobody reads: the VM has none).
head -c 1M /dev/urandom >"$WORK/small.raw"
"${BIN[${NAMES[0]}]}/imgfsctl" publish "$WORK/small.raw" "$WORK/repo" --name small >"$WORK/publish.log" 2>&1 ||
    die "cannot publish a base: $(tail -n 1 "$WORK/publish.log")"
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)

# one_round NAME ROUND: one mount of build NAME, its VM, the fio run; leaves
# $WORK/NAME-ROUND.log (the daemon's) and $WORK/NAME-ROUND.json (fio's).
one_round() {
    local name=$1 round=$2 dir=${BIN[$1]} tag=$1-$2
    local mnt=$WORK/mnt-$tag state=$WORK/state-$tag
    mkdir -p "$mnt" "$state" "$WORK/cache-$tag"
    "$dir/imgfs" "$WORK/repo" "$mnt" -f -o "cache=$WORK/cache-$tag,state=$state" 2>"$WORK/$tag.log" &
    local pid=$!
    PIDS+=("$pid")
    MOUNTS+=("$mnt")
    wait_mounted "$mnt" 10 || die "imgfs ($name) did not mount: $(tail -n 2 "$WORK/$tag.log")"
    "$dir/imgfsctl" vm create "$mnt" gc --size 1G >/dev/null || die "imgfsctl vm create failed ($name)."
    local disk=$mnt/vms/gc.raw
    fio --name=fill --filename="$disk" --rw=write --bs=1M --size="$REGION" --direct=1 --ioengine=libaio \
        --iodepth=16 --end_fsync=1 >"$WORK/$tag.fill" 2>&1 || die "fio could not fill the VM ($name)."
    log "$name round $round: 4K randwrite O_DIRECT iodepth 16 over $REGION for $RUNTIME s"
    fio --name=gc --filename="$disk" --rw=randwrite --bs=4k --offset=0 --size="$REGION" --direct=1 \
        --ioengine=libaio --iodepth=16 --fsync=32 --randrepeat=0 --time_based --runtime="$RUNTIME" \
        --output-format=json --output="$WORK/$tag.json" 2>"$WORK/$tag.err" >/dev/null ||
        log "fio failed ($name round $round): $(tail -n 1 "$WORK/$tag.err")"
    unmount_path "$mnt"
    stop_pid "$pid"
}

for ((r = 1; r <= ROUNDS; r++)); do
    for name in "${NAMES[@]}"; do one_round "$name" "$r"; done
done

report() {
    echo "# Compaction holds under guest writes"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), load average $LOAD_START at the start, $(cut -d" " -f1-3 /proc/loadavg) at" \
        "the end. fio 4 KiB randwrite O_DIRECT, libaio iodepth 16, fsync every 32, over the first $REGION" \
        "(written once) of a 1 GiB VM without a base, $RUNTIME s per round; builds interleaved."
    echo "Reproduce: \`BENCH_BUILDS=\"$BUILDS\" BENCH_ROUNDS=$ROUNDS BENCH_TIME=$RUNTIME bash bench/bench-compact.sh\`"
    echo
    python3 - "$WORK" "$ROUNDS" "${NAMES[@]}" <<'PY'
import json, os, re, sys
work, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
new = re.compile(r"compacted, .* \(writes held ([0-9.]+) ms, flushes ([0-9.]+) ms\)")
old = re.compile(r"compacted, .* \(writes paused ([0-9.]+) ms\)")
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else None
def ms(x):
    return "-" if x is None else ("%.2f" % x if x < 10 else "%.0f" % x)
print("| build | round | compactions | writes held: median / p90 / max (ms) | flushes held: median / p90 / max (ms) "
      "| IOPS | p99.9 latency (ms) | max latency (ms) |")
print("|---|---:|---:|---|---|---:|---:|---:|")
for name in names:
    allw, allf = [], []
    for r in range(1, rounds + 1):
        tag = "%s-%d" % (name, r)
        w, f = [], []
        for line in open(os.path.join(work, tag + ".log"), errors="replace"):
            m = new.search(line)
            if m:
                w.append(float(m.group(1))); f.append(float(m.group(2)))
                continue
            m = old.search(line)
            if m:
                w.append(float(m.group(1))); f.append(float(m.group(1)))
        allw += w; allf += f
        try:
            t = open(os.path.join(work, tag + ".json")).read()
            j = json.loads(t[t.index("{"):])["jobs"][0]["write"]
            iops = "%.0f" % j["iops"]
            p999 = "%.1f" % (j["clat_ns"]["percentile"]["99.900000"] / 1e6)
            mx = "%.0f" % (j["clat_ns"]["max"] / 1e6)
        except (OSError, ValueError, KeyError):
            iops = p999 = mx = "n/a"
        print("| %s | %d | %d | %s / %s / %s | %s / %s / %s | %s | %s | %s |" % (
            name, r, len(w), ms(pct(w, 50)), ms(pct(w, 90)), ms(pct(w, 100)),
            ms(pct(f, 50)), ms(pct(f, 90)), ms(pct(f, 100)), iops, p999, mx))
    print("| %s | all | %d | %s / %s / %s | %s / %s / %s | | | |" % (
        name, len(allw), ms(pct(allw, 50)), ms(pct(allw, 90)), ms(pct(allw, 100)),
        ms(pct(allf, 50)), ms(pct(allf, 90)), ms(pct(allf, 100))))
PY
}
report | save_report compact
