#!/usr/bin/env bash
# bench-vm-builds.sh: the write rows of bench-vm.sh for two or more imgfs
# builds side by side, against the local raw file, interleaved, in rounds.
#
# A benchmark, not a test: it reports numbers and never fails on timing.
# One base of random data (BENCH_BASE_SIZE, default 2G) is published; each
# build mounts it with its own cache (warmed by one full read) and state
# directory. Each round runs every row on every target in turn (the local
# raw file, a full copy of the base, then each build, the builds taking
# turns in going first): load from elsewhere on the host falls on all alike. A fresh row gets a new VM; the seq row
# writes a new VM's 0-1 GiB with 1 MiB writes, and the written rows that
# follow it in the round run on that disk. fio libaio 4 KiB, an fsync every
# 32 writes in every job, as in bench-vm.sh. Rows (BENCH_ROWS, in order):
#   fresh1/fresh16     randwrite over 0-1 GiB of a new VM, iodepth 1 / 16
#   seq                1 MiB sequential writes of 0-1 GiB, iodepth 16
#   written1/written16 randwrite over 0-1 GiB of the seq row's disk
# each with a suffix :0 (buffered) or :1 (O_DIRECT).
#
# Run as root. Environment:
#   BENCH_BUILDS    "NAME=DIR ..." (default "this=<repo>/build"), each DIR
#                   with imgfs and imgfsctl
#   BENCH_ROWS      default "fresh16:1 seq:1 written16:1 fresh1:0 written1:0"
#   BENCH_ROUNDS    rounds (default 3)
#   BENCH_TIME      seconds per time-based fio run (default 6)
#   BENCH_BASE_SIZE the base's size (default 2G; at least 1G)
#   BENCH_DIR       parent of the work directory (default /var/tmp)
#   BENCH_KEEP=1    keep the work directory (daemon logs, fio JSON)
# Output: Markdown on stdout, also written to bench/results/vm-builds-<date>.md.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # SCRIPT_DIR, SRC_DIR, BENCH_NAME and the helpers

no_args_but_help "$@"

BUILDS=${BENCH_BUILDS:-this=$SRC_DIR/build}
ROWS=(${BENCH_ROWS:-fresh16:1 seq:1 written16:1 fresh1:0 written1:0})
ROUNDS=${BENCH_ROUNDS:-3}
RUNTIME=${BENCH_TIME:-6}
BASE_SIZE=$(to_bytes "${BENCH_BASE_SIZE:-2G}" BENCH_BASE_SIZE)
require_count "$ROUNDS" BENCH_ROUNDS
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "BENCH_TIME=$RUNTIME is not a number of seconds."
[ "$BASE_SIZE" -ge $((1 << 30)) ] || die "BENCH_BASE_SIZE must be at least 1G (the rows write 0-1 GiB)."
for r in "${ROWS[@]}"; do
    [[ $r =~ ^(fresh1|fresh16|seq|written1|written16):[01]$ ]] || die "BENCH_ROWS entry '$r' is not ROW:0 or ROW:1."
done

require_root "FUSE mounts"
require_tools fio python3 fusermount3
declare -A BIN
parse_builds "$BUILDS"

make_work imgfs-bench-vm-builds
on_exit cleanup_all

# run_fio NAME FILE RW DIRECT [fio args]: IOPS, MiB/s for 1 MiB jobs, or n/a
run_fio() {
    local name=$1 file=$2 rw=$3 direct=$4
    shift 4
    local out="$WORK/fio-$name.json"
    if ! fio --name="$name" --filename="$file" --rw="$rw" --bs=4k --direct="$direct" --ioengine=libaio \
        --offset=0 --size=1G --randrepeat=0 --fsync=32 --output-format=json --output="$out" "$@" \
        2>"$WORK/fio-$name.err" >/dev/null; then
        echo n/a
        return
    fi
    python3 - "$out" <<'PY' || echo n/a
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
if job.get("error"):
    sys.exit(1)
w = job["write"]
print(round(w["bw_bytes"] / 1048576) if job["job options"].get("bs") == "1M" else round(w["iops"]))
PY
}

LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)
log "work directory $WORK"
head -c "$BASE_SIZE" /dev/urandom >"$WORK/base.raw" || die "cannot write the base."
IMGFSCTL=${BIN[${NAMES[0]}]}/imgfsctl
"$IMGFSCTL" publish "$WORK/base.raw" "$WORK/repo" --name base >"$WORK/publish.log" 2>&1 ||
    die "imgfsctl publish failed: $(tail -n 1 "$WORK/publish.log")"
for n in "${NAMES[@]}"; do
    mount_build "${BIN[$n]}" "$n" "$WORK/repo"
    cmp "$WORK/mnt-$n/bases/base.raw" "$WORK/base.raw" || die "build $n: bases/base.raw differs."
done
cp --reflink=never "$WORK/base.raw" "$WORK/local.raw" && sync "$WORK/local.raw" || die "cannot copy the base."

declare -A R WRITTEN WRITTEN_VM
VMS=0
new_disk() { # target: DISK, a new VM (the local file for local), and VM its name
    if [ "$1" = local ]; then
        DISK=$WORK/local.raw VM=
        return 0
    fi
    VMS=$((VMS + 1))
    VM=v$VMS
    "${BIN[$1]}/imgfsctl" vm create "$WORK/mnt-$1" "$VM" --base base >/dev/null || return 1
    DISK=$WORK/mnt-$1/vms/$VM.raw
}
drop_disk() { # target vm: removes a VM once its rows ran (a fresh row writes up to a GiB of log)
    [ -n "$2" ] && "${BIN[$1]}/imgfsctl" vm rm "$WORK/mnt-$1" "$2" >/dev/null 2>&1
}

for ((round = 1; round <= ROUNDS; round++)); do
    # The builds take turns in going first (what runs just before a target
    # can leave it writeback and compaction to compete with).
    k=$(((round - 1) % ${#NAMES[@]}))
    ORDER=(local "${NAMES[@]:k}" "${NAMES[@]:0:k}")
    for row in "${ROWS[@]}"; do
        kind=${row%:*} d=${row#*:}
        for t in "${ORDER[@]}"; do
            log "round $round, $t: $kind direct=$d (load $(cut -d' ' -f1 /proc/loadavg))"
            case $kind in
            fresh*)
                new_disk "$t" || { R[$t,$row,$round]=n/a; continue; }
                R[$t,$row,$round]=$(run_fio "$t-$kind-d$d-r$round" "$DISK" randwrite "$d" \
                    --iodepth="${kind#fresh}" --time_based --runtime="$RUNTIME")
                drop_disk "$t" "$VM"
                ;;
            seq)
                drop_disk "$t" "${WRITTEN_VM[$t]:-}"
                new_disk "$t" || { R[$t,$row,$round]=n/a; continue; }
                WRITTEN[$t]=$DISK WRITTEN_VM[$t]=$VM
                R[$t,$row,$round]=$(run_fio "$t-seq-d$d-r$round" "$DISK" write "$d" --bs=1M --iodepth=16 \
                    --end_fsync=1)
                ;;
            written*)
                [ -n "${WRITTEN[$t]:-}" ] || die "a written row needs a seq row before it in BENCH_ROWS."
                R[$t,$row,$round]=$(run_fio "$t-$kind-d$d-r$round" "${WRITTEN[$t]}" randwrite "$d" \
                    --iodepth="${kind#written}" --time_based --runtime="$RUNTIME")
                ;;
            esac
        done
    done
    R[load,$round]=$(cut -d" " -f1 /proc/loadavg)
done
LOAD_END=$(cut -d" " -f1-3 /proc/loadavg)

ratio() {
    if [[ $1 =~ ^[0-9]+$ && $2 =~ ^[0-9]+$ && $2 -gt 0 ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    else
        echo -
    fi
}
report() {
    local row t round
    echo "# imgfs VM writes, builds side by side, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- $(nproc) CPUs, kernel $(uname -r), work dir on $(findmnt -no FSTYPE -T "$WORK"); $(fio --version)"
    echo "- builds: $BUILDS"
    echo "- load average at start: $LOAD_START, at end: $LOAD_END; after each round: $(for ((round = 1; round <= ROUNDS; round++)); do printf '%s ' "${R[load,$round]}"; done)"
    echo "- fio libaio, 4 KiB (1 MiB for seq), an fsync every 32 writes, ${RUNTIME}s per time-based run"
    echo
    printf '| row | direct | local |'
    for t in "${NAMES[@]}"; do printf ' %s | %s/local |' "$t" "$t"; done
    for t in "${NAMES[@]:1}"; do printf ' %s/%s |' "$t" "${NAMES[0]}"; done
    echo
    printf '|---|---:|---:|'
    for t in "${NAMES[@]}"; do printf -- '---:|---:|'; done
    for t in "${NAMES[@]:1}"; do printf -- '---:|'; done
    echo
    for row in "${ROWS[@]}"; do
        for ((round = 1; round <= ROUNDS; round++)); do
            printf '| %s (round %d) | %s | %s |' "${row%:*}" "$round" "${row#*:}" "${R[local,$row,$round]}"
            for t in "${NAMES[@]}"; do
                printf ' %s | %s |' "${R[$t,$row,$round]}" "$(ratio "${R[$t,$row,$round]}" "${R[local,$row,$round]}")"
            done
            for t in "${NAMES[@]:1}"; do
                printf ' %s |' "$(ratio "${R[$t,$row,$round]}" "${R[${NAMES[0]},$row,$round]}")"
            done
            echo
        done
    done
    echo
    echo "IOPS (MiB/s for seq). Rows ending in 1 (fresh1, written1) run at iodepth 1, the others at 16."
}

report | save_report vm-builds
