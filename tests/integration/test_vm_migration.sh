#!/bin/bash
# Migration of VMs between two hosts (two mounts with their own cache and
# state directories): an export holds only the VM's own data, an import on the
# other host gives a byte-identical disk, and truncated, altered or forged
# exports, and exports whose base the other host lacks, are refused with a
# clear error and leave nothing behind.
. "$(dirname "$0")/lib.sh"

A=$T/hostA
B=$T/hostB
mkdir -p "$T/cacheA" "$T/cacheB" "$T/stateA" "$T/stateB"

# mount_host REPO MNT CACHE STATE: a host with a cache and state of its own.
mount_host() { mount_imgfs "$1" "$2" "state=$4,refresh=0.01" "$3"; }
# What host B holds: VMs shown, VM files and layer files in its state.
b_state() { echo "$(ls "$B/vms" | tr '\n' ' ')| $(ls "$T/stateB/vms" | wc -l) vm files | $(ls "$T/stateB/layers" | wc -l) layer files"; }

SIZE=$((64 * 1048576))
make_image "$T/img.raw" $SIZE
"$IMGFSCTL" publish "$T/img.raw" "$T/repoA" --name deb > /dev/null
cp -a "$T/repoA" "$T/repoB" # host B's repository: a mirror of A's as it is now
mount_host "$T/repoA" "$A" "$T/cacheA" "$T/stateA"
mount_host "$T/repoB" "$B" "$T/cacheB" "$T/stateB"

# --- a VM with ~2 MiB of its own data ------------------------------------------------
"$IMGFSCTL" vm create "$A" v --base deb
cp "$T/img.raw" "$T/sh.v"
for i in $(seq 0 11); do # 12 x 128 KiB at unaligned places
    put $((i * 5 * 1048576 + i * 777)) 131072 $i "$A/vms/v.raw" "$T/sh.v"
done
for i in $(seq 20 59); do # 40 small writes
    put $(((i * 1234567) % (SIZE - 9000))) $((1 + (i * 331) % 8000)) $i "$A/vms/v.raw" "$T/sh.v"
done
dd if=/dev/zero of="$A/vms/v.raw" bs=1M seek=$((30 * 1048576 + 5)) oflag=seek_bytes count=256K iflag=count_bytes \
    conv=notrunc status=none
dd if=/dev/zero of="$T/sh.v" bs=1M seek=$((30 * 1048576 + 5)) oflag=seek_bytes count=256K iflag=count_bytes \
    conv=notrunc status=none
put $((SIZE - 100)) 100 99 "$A/vms/v.raw" "$T/sh.v"
same "$A/vms/v.raw" "$T/sh.v" "VM v on host A does not hold what was written"

"$IMGFSCTL" vm export "$A" v "$T/v.exp"
esize=$(stat -c %s "$T/v.exp")
[ "$esize" -lt $((4 * 1048576)) ] || fail "export of a VM with ~2 MiB of data is $esize bytes"
[ "$esize" -gt $((1536 * 1024)) ] || fail "export is only $esize bytes: it cannot hold the VM's data"
ok "export of a 64 MiB VM with ~2 MiB written: $esize bytes"
expect_error "export of a VM that does not exist" "$IMGFSCTL" vm export "$A" nosuch "$T/x.exp"
expect_error "export into a directory that does not exist" "$IMGFSCTL" vm export "$A" v "$T/no/dir/v.exp"
[ ! -e "$T/x.exp" ] || fail "a failed export left a file"

"$IMGFSCTL" vm import "$B" "$T/v.exp"
drop_caches
same "$B/vms/v.raw" "$T/sh.v" "the imported VM on host B differs from the original"
same "$B/vms/v.raw" "$A/vms/v.raw" "the VM differs between host A and host B"
[ "$(stat_value "$B" "vm v" base)" = deb@1 ] || fail "imported VM is not on deb@1"
ok "import on host B gives a byte-identical disk"
expect_error "import under a name that exists" "$IMGFSCTL" vm import "$B" "$T/v.exp"
"$IMGFSCTL" vm import "$B" "$T/v.exp" --name w
same "$B/vms/w.raw" "$T/sh.v" "import under another name differs"
ok "import --name w gives a second identical VM"

# A clone with a chain of layers, a snapshot and a discarded range: the
# export holds the whole chain's data over the base.
"$IMGFSCTL" vm clone "$A" v vc
cp "$T/sh.v" "$T/sh.vc"
put 777 200000 150 "$A/vms/vc.raw" "$T/sh.vc"
"$IMGFSCTL" vm snapshot "$A" vc snap
put 100000 5000 151 "$A/vms/vc.raw" "$T/sh.vc"
fallocate -p -o $((40 * 1048576)) -l $((3 * 131072)) "$A/vms/vc.raw" # base data there: must read as zeros
fallocate -p -o $((40 * 1048576)) -l $((3 * 131072)) "$T/sh.vc"
same "$A/vms/vc.raw" "$T/sh.vc" "clone vc on host A does not hold what was written and discarded"
"$IMGFSCTL" vm export "$A" vc "$T/vc.exp"
"$IMGFSCTL" vm import "$B" "$T/vc.exp"
drop_caches
same "$B/vms/vc.raw" "$T/sh.vc" "imported clone vc differs (chain of layers, discarded range)"
ok "a clone with a snapshot and a discarded range exports ($(stat -c %s "$T/vc.exp") bytes) and imports identically"

# --- damaged exports are refused and leave nothing behind -----------------------------
before=$(b_state)
refuse_import() { # refuse_import FILE WHAT
    expect_error "$2" "$IMGFSCTL" vm import "$B" "$1" --name bad
    [ "$(b_state)" = "$before" ] || fail "$2 left something behind: $(b_state) (was $before)"
}
for cut in 0 10 100 $((esize / 3)) $((esize / 2)) $((esize - 17)) $((esize - 16)) $((esize - 1)); do
    head -c $cut "$T/v.exp" > "$T/cut.exp"
    refuse_import "$T/cut.exp" "export truncated to $cut of $esize bytes"
done
cp "$T/v.exp" "$T/flip.exp"
python3 - "$T/flip.exp" << 'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[len(b) // 2] ^= 0x20
open(p, "wb").write(bytes(b))
PY
refuse_import "$T/flip.exp" "export with one byte flipped in the middle"
cp "$T/v.exp" "$T/long.exp"
head -c 4096 /dev/urandom >> "$T/long.exp"
refuse_import "$T/long.exp" "export with garbage appended"
refuse_import "$T/img.raw" "a disk image passed as an export"
expect_error "import of a file that does not exist" "$IMGFSCTL" vm import "$B" "$T/nosuch.exp"

# Forged exports: altered, with the checksum trailer recomputed, so that the
# import gets past the checksum and must still refuse the content (the
# rollback path: nothing may stay behind).
python3 - "$T/v.exp" "$T" << 'PY'
import struct, subprocess, sys
src, out = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
body = data[:-16]
def xxh128(b):
    r = subprocess.run(["xxh128sum", "-"], input=b, capture_output=True, check=True)
    return bytes.fromhex(r.stdout.split()[0].decode())
if xxh128(body) != data[-16:]:
    sys.exit("cannot reproduce the export's checksum with xxh128sum")
head_end = body.index(b"\ndata\n") + len(b"\ndata\n")
header, recs = body[:head_end], body[head_end:]
def write(name, b):
    open(f"{out}/{name}.exp", "wb").write(b + xxh128(b))
# Walk the records: (offset, length, kind).
pos, records = 0, []
while True:
    off, ln, kind = struct.unpack_from("<QQB", recs, pos)
    records.append((pos, off, ln, kind))
    if off == 2**64 - 1:
        break
    pos += 17 + (ln if kind == 0 else 0)
size = int(header.split(b"\nsize ")[1].split(b"\n")[0])
last = records[-2]  # the last data record
# 1. a record that runs past the disk's end
p, off, ln, kind = records[0]
write("past_end", header + recs[:p] + struct.pack("<QQB", size - 10, ln, kind) + recs[p + 17:])
# 2. no end record: the records stop short
write("no_end", header + recs[:records[-1][0]])
# 3. a size that is not the base's
write("bad_size", header.replace(b"\nsize %d\n" % size, b"\nsize %d\n" % (size + 4096)) + recs)
# 4. a hostile name in the header
write("bad_name", header.replace(b"\nname v\n", b"\nname ../evil\n") + recs)
# 5. an unknown record kind
write("bad_kind", header + recs[:p] + struct.pack("<QQB", off, ln, 7) + recs[p + 17:])
# 6. a record at an offset that is not block aligned
write("unaligned", header + recs[:p] + struct.pack("<QQB", off + 1, ln, kind) + recs[p + 17:])
PY
for forged in past_end no_end bad_size bad_name bad_kind unaligned; do
    refuse_import "$T/$forged.exp" "forged export ($forged) with a valid checksum"
done
[ ! -e "$T/evil.vm" ] && [ ! -e "$T/stateB/evil.vm" ] || fail "a hostile name in an export created a file"
"$IMGFSCTL" vm import "$B" "$T/v.exp" --name bad
same "$B/vms/bad.raw" "$T/sh.v" "import under a name that failed imports used differs"
ok "after all the refused imports, the name is free and a good import works"
before=$(b_state)

# --- bases the other host does not have -------------------------------------------
make_image "$T/img2.raw" $((SIZE - 4096))
"$IMGFSCTL" publish "$T/img2.raw" "$T/repoA" --name deb > /dev/null # deb@2, on A's repository only
ls "$A/bases" > /dev/null
[ -f "$A/bases/deb@2.raw" ] || fail "host A does not show deb@2"
"$IMGFSCTL" vm create "$A" v2 --base deb@2
put 4096 10000 200 "$A/vms/v2.raw"
"$IMGFSCTL" vm export "$A" v2 "$T/v2.exp"
refuse_import "$T/v2.exp" "export of a VM on deb@2, which host B's repository lacks"
! "$IMGFSCTL" vm import "$B" "$T/v2.exp" --name v2 2> "$T/v2.err" || fail "import on a missing base succeeded"
grep -q 'deb@2' "$T/v2.err" || fail "the refusal does not name the missing base deb@2: $(cat "$T/v2.err")"

# Same name and version, different content: other@1 differs between the hosts.
make_image "$T/other.a" $((4 * 1048576))
make_image "$T/other.b" $((4 * 1048576))
"$IMGFSCTL" publish "$T/other.a" "$T/repoA" --name other > /dev/null
"$IMGFSCTL" publish "$T/other.b" "$T/repoB" --name other > /dev/null
ls "$A/bases" "$B/bases" > /dev/null
"$IMGFSCTL" vm create "$A" o --base other@1
put 0 5000 300 "$A/vms/o.raw"
"$IMGFSCTL" vm export "$A" o "$T/o.exp"
refuse_import "$T/o.exp" "export of a VM on other@1, which differs on host B"

# --- a blank VM ----------------------------------------------------------------
"$IMGFSCTL" vm create "$A" blank --size 16M
truncate -s 16M "$T/sh.blank"
put 0 4096 400 "$A/vms/blank.raw" "$T/sh.blank"
put 5000000 300000 401 "$A/vms/blank.raw" "$T/sh.blank"
put $((16 * 1048576 - 10)) 10 402 "$A/vms/blank.raw" "$T/sh.blank"
"$IMGFSCTL" vm export "$A" blank "$T/blank.exp"
bsize=$(stat -c %s "$T/blank.exp")
[ "$bsize" -lt $((1048576)) ] || fail "export of a blank VM with ~300 KiB written is $bsize bytes"
"$IMGFSCTL" vm import "$B" "$T/blank.exp"
drop_caches
same "$B/vms/blank.raw" "$T/sh.blank" "imported blank VM differs"
[ "$(stat_value "$B" "vm blank" base)" = none ] || fail "imported blank VM has a base"
ok "a blank --size VM exports ($bsize bytes) and imports identically"

# --- round trip and persistence ------------------------------------------------------
put 1000 3000 500 "$B/vms/v.raw" "$T/sh.v"
"$IMGFSCTL" vm export "$B" v "$T/v.back.exp"
"$IMGFSCTL" vm import "$A" "$T/v.back.exp" --name back
same "$A/vms/back.raw" "$T/sh.v" "a VM moved A -> B -> A differs"
ok "a VM changed on host B and moved back to host A is identical"

umount_imgfs "$B"
drop_caches
mount_host "$T/repoB" "$B" "$T/cacheB" "$T/stateB"
same "$B/vms/v.raw" "$T/sh.v" "imported VM v wrong after remount"
same "$B/vms/blank.raw" "$T/sh.blank" "imported blank VM wrong after remount"
[ "$(stat_value "$B" vms load_errors)" = none ] || fail "load errors on host B after remount"
ok "imported VMs survive a remount of host B"
umount_imgfs "$A"
umount_imgfs "$B"
finish
