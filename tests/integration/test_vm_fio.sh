#!/bin/bash
# fio --verify as a real client of VM disks on a base: two jobs on two VMs at
# once, one buffered and one O_DIRECT, with 512-byte-aligned block sizes from
# 512 bytes to 128 KiB (so most writes cover partial 4 KiB blocks and need a
# copy-up from the base). randwrite then a verify pass, randrw with verify,
# verify_only after dropping the page cache, and verify_only after an unmount
# and remount of data written with fsync. The bytes outside fio's range must
# still be the base's.
. "$(dirname "$0")/lib.sh"

MIB=1048576
M=$T/mnt
make_image "$T/base.raw" $((64 * MIB))
"$IMGFSCTL" publish "$T/base.raw" "$T/repo" --name fb > /dev/null
mkdir -p "$T/state"
mount_imgfs "$T/repo" "$M" "state=$T/state"
"$IMGFSCTL" vm create "$M" va --base fb > /dev/null || fail "cannot create VM va"
"$IMGFSCTL" vm create "$M" vb --base fb > /dev/null || fail "cannot create VM vb"

# fio ranges: [OFF, OFF+SIZE) of each 64 MiB disk; the rest stays the base's.
OFF=$((5 * MIB))
SIZE=$((48 * MIB))

# job_file NAME RW DIRECT_A DIRECT_B SEED [EXTRA GLOBAL LINES]: one fio job
# file with one job on each VM; the jobs run at the same time.
job_file() {
    local name=$1 rw=$2 da=$3 db=$4 seed=$5 extra=${6:-}
    cat > "$T/$name.fio" <<EOF
[global]
ioengine=psync
rw=$rw
bsrange=512-128k
offset=$OFF
size=$SIZE
verify=crc32c
do_verify=1
verify_fatal=1
verify_dump=0
randrepeat=1
$extra

[$name-va]
filename=$M/vms/va.raw
direct=$da
randseed=$seed

[$name-vb]
filename=$M/vms/vb.raw
direct=$db
randseed=$((seed + 1))
EOF
}

# run_fio NAME WHAT [fio options...]: runs the job file and fails on a
# non-zero exit, any job error, any "verify:" complaint, or a job that did not
# read (verify) at least what it wrote.
run_fio() {
    local name=$1 what=$2; shift 2
    local rc=0
    (cd "$T" && timeout 120 fio --output-format=json --output="$T/$name.json" "$@" "$T/$name.fio") \
        2> "$T/$name.err" || rc=$?
    if [ "$rc" -ne 0 ] || grep -qi 'verify:\|verify failed\|bad magic' "$T/$name.err"; then
        cat "$T/$name.err" >&2
        [ -s "$T/$name.json" ] && grep -E '"(jobname|error)"' "$T/$name.json" >&2
        fail "$what: fio exited with $rc or reported verify errors"
    fi
    python3 - "$T/$name.json" "$what" <<'PY' || fail "$what: fio results are wrong (see above)"
import json, sys
text = open(sys.argv[1]).read()
data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
bad = False
for job in data["jobs"]:
    name, err = job["jobname"], job["error"]
    rd, wr = job["read"]["io_bytes"], job["write"]["io_bytes"]
    print(f"  {name}: error={err} read={rd} written={wr}")
    if err != 0:
        print(f"{name}: fio job error {err}", file=sys.stderr); bad = True
    if rd == 0:
        print(f"{name}: nothing was read back (no verification happened)", file=sys.stderr); bad = True
    if wr > 0 and rd < wr:
        print(f"{name}: verified {rd} bytes of {wr} written", file=sys.stderr); bad = True
sys.exit(1 if bad else 0)
PY
    ok "$what"
}

# outside_is_base: the bytes before and after fio's range are the base's.
outside_is_base() {
    local vm
    for vm in va vb; do
        cmp -n "$OFF" "$M/vms/$vm.raw" "$T/base.raw" || fail "$vm: bytes before fio's range changed"
        cmp -i $((OFF + SIZE)) "$M/vms/$vm.raw" "$T/base.raw" || fail "$vm: bytes after fio's range changed"
    done
}

# 1. randwrite + verify pass: va buffered, vb O_DIRECT, both at once.
job_file w1 randwrite 0 1 1001
run_fio w1 "randwrite+verify, bs 512-128k, va buffered and vb O_DIRECT at once"
outside_is_base
ok "bytes outside fio's range are still the base's"

# The page cache is dropped: the data must come back from the daemon, also
# when read with the other I/O mode than it was written with.
sync; echo 3 > /proc/sys/vm/drop_caches
job_file w1x randwrite 1 0 1001
run_fio w1x "verify_only of the randwrite data after drop_caches, I/O modes swapped" --verify_only=1

# 2. randrw with verify, I/O modes swapped (va O_DIRECT, vb buffered).
job_file rw2 randrw 1 0 2002 "rwmixread=40"
run_fio rw2 "randrw+verify, va O_DIRECT and vb buffered at once"

# 3. Durable writes, then unmount, remount and verify_only of the same jobs.
job_file d3 randwrite 0 1 3003 "fsync=16
end_fsync=1"
run_fio d3 "randwrite with fsync=16,end_fsync=1, verified"
sum_a=$(sha256sum < "$M/vms/va.raw")
sum_b=$(sha256sum < "$M/vms/vb.raw")
umount_imgfs "$M"
sync; echo 3 > /proc/sys/vm/drop_caches
mount_imgfs "$T/repo" "$M" "state=$T/state"
run_fio d3 "verify_only after unmount and remount: fio's data survived" --verify_only=1
[ "$(sha256sum < "$M/vms/va.raw")" = "$sum_a" ] || fail "va reads differently after the remount"
[ "$(sha256sum < "$M/vms/vb.raw")" = "$sum_b" ] || fail "vb reads differently after the remount"
outside_is_base
ok "whole disks identical across the remount; outside fio's range still the base"

# Negative control: the verify_only pass does notice one changed block.
dd if=/dev/zero of="$M/vms/va.raw" bs=4096 count=1 seek=$(((OFF + 7 * MIB) / 4096)) conv=notrunc,fsync status=none
status=0
(cd "$T" && timeout 120 fio --output=/dev/null --verify_only=1 "$T/d3.fio") 2> "$T/neg.err" || status=$?
[ "$status" -ne 0 ] || fail "fio verify_only did not notice a zeroed 4 KiB block"
ok "negative control: verify_only fails on a zeroed block (fio exit $status)"
umount_imgfs "$M"
finish
