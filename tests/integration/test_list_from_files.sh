#!/bin/bash
# `imgfsctl list from-files`: a readahead-style list of files inside a guest's
# ext4 filesystem (in an MBR partition) becomes a prefetch list of the base
# version. The stored list must parse, name the version it belongs to, and
# hold exactly the chunks where debugfs says the files' blocks are, in the
# order of the files. A disk without an ext filesystem, or a list whose paths
# all miss, is refused with one clear sentence.
. "$(dirname "$0")/lib.sh"
export PATH=$PATH:/usr/sbin:/sbin

CS=65536
PART_START=2048 # sectors: the filesystem starts at 1 MiB

# Files of known content at known paths, a nested directory and a symlink.
mkdir -p "$T/src/usr/lib/deep/er" "$T/src/etc"
head -c 307200 /dev/urandom > "$T/src/usr/lib/libfoo.so"
head -c 1048576 /dev/urandom > "$T/src/usr/lib/deep/er/big.bin"
head -c 5120 /dev/urandom > "$T/src/etc/small.conf"
head -c 200000 /dev/urandom > "$T/src/unlisted.bin"
ln -s ../usr/lib/libfoo.so "$T/src/etc/link"
mkfs.ext4 -q -F -b 4096 -d "$T/src" "$T/fs.img" 64M > /dev/null

# The disk: an MBR with the filesystem in partition 1 at 1 MiB.
truncate -s 72M "$T/disk.img"
printf 'label: dos\nstart=%d, type=83\n' "$PART_START" | sfdisk -q --no-reread --no-tell-kernel "$T/disk.img"
dd if="$T/fs.img" of="$T/disk.img" bs=1M seek=1 conv=notrunc status=none

REPO=$T/repo
"$IMGFSCTL" publish "$T/disk.img" "$REPO" --name guest --chunk-size "$CS" > /dev/null
ok "published an ext4-in-MBR disk as guest@1"

# The paths, as readahead lists them: counts, a comment, a blank line, a
# missing file (a warning, not an error) and a repeated file.
cat > "$T/paths" <<'EOF'
# recorded at boot
/etc/small.conf 3
/usr/lib/libfoo.so	12

/usr/lib/deep/er/big.bin 1
/no/such/file 2
/etc/small.conf 5
EOF

"$IMGFSCTL" list from-files "$REPO" guest@1 boot "$T/paths" > "$T/out" 2> "$T/err" ||
    { cat "$T/err" >&2; fail "list from-files failed"; }
ok "list from-files guest@1 boot succeeded"
grep -q '/no/such/file' "$T/err" || { cat "$T/err" >&2; fail "no warning about the missing path"; }
ok "the missing path is reported: $(grep -m1 '/no/such/file' "$T/err")"

LIST=$REPO/bases/guest/1.lists/boot
[ -f "$LIST" ] || fail "no list at $LIST"
ok "the list is stored at bases/guest/1.lists/boot"

# The header names the version and the exact manifest; the list checks out.
MANIFEST_ID=$(xxhsum -H2 "$REPO/bases/guest/1.manifest" | cut -d' ' -f1)
python3 - "$LIST" "$MANIFEST_ID" "$CS" <<'PY' || fail "the stored list is malformed"
import subprocess, sys
path, manifest_id, cs = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(path, "rb").read()
lines = data.decode().splitlines()
assert lines[0] == "imgfs-list 1", lines[0]
assert lines[1] == f"base guest 1 {manifest_id}", lines[1]
assert lines[2] == f"chunk-size {cs}", lines[2]
n = int(lines[3].split()[1])
assert lines[3] == f"chunks {n}" and len(lines) == 4 + n + 1, "chunk count"
end = lines[-1].split()
body = data[: data.rindex(b"end ")]
want = subprocess.run(["xxhsum", "-H2", "-"], input=body, capture_output=True, check=True).stdout.split()[0].decode()
assert end == ["end", want], f"checksum {end} != {want}"
PY
ok "the list parses: base guest 1 $MANIFEST_ID, chunk size $CS, checksum right"

# The chunks must be exactly where debugfs puts the files' blocks: blocks in
# logical order, files in list order, each chunk once, all-zero chunks out.
python3 - "$LIST" "$REPO/bases/guest/1.manifest" "$T/fs.img" "$CS" "$PART_START" <<'PY' || fail "wrong chunks in the list"
import subprocess, sys
lst, manifest, fs, cs, start = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
got = [int(x) for x in open(lst).read().splitlines()[4:-1]]
mlines = open(manifest).read().splitlines()
i = next(k for k, l in enumerate(mlines) if l.startswith("chunks "))
hashes = mlines[i + 1 : i + 1 + int(mlines[i].split()[1])]
bs = next(int(l.split(":")[1]) for l in subprocess.run(["dumpe2fs", "-h", fs], capture_output=True, text=True).stdout.splitlines() if l.startswith("Block size:"))
want, seen = [], set()
for p in ["/etc/small.conf", "/usr/lib/libfoo.so", "/usr/lib/deep/er/big.bin"]:
    out = subprocess.run(["debugfs", "-R", f"blocks {p}", fs], capture_output=True, text=True, check=True).stdout
    blocks = [int(b) for b in out.split()]
    assert blocks, f"debugfs found no blocks for {p}"
    for b in blocks:
        c = (start * 512 + b * bs) // cs
        if c not in seen:
            seen.add(c)
            if hashes[c] != "0":
                want.append(c)
if got != want:
    print(f"list: {got}\ndebugfs: {want}", file=sys.stderr)
    sys.exit(1)
print(f"{len(got)} chunks match debugfs")
PY
ok "the list's chunks are debugfs's blocks of the three files, mapped to chunks, in order"

# Without @VERSION the newest version is meant.
"$IMGFSCTL" list from-files "$REPO" guest latest "$T/paths" > /dev/null 2>&1 || fail "list from-files guest (no version) failed"
cmp -s <(tail -n +2 "$LIST") <(tail -n +2 "$REPO/bases/guest/1.lists/latest") ||
    fail "the list for 'guest' differs from the one for 'guest@1'"
ok "NAME without @VERSION writes the same list for the newest version"

# Refusals: no ext filesystem on the disk; no path that resolves.
head -c 8388608 /dev/urandom > "$T/junk.img"
"$IMGFSCTL" publish "$T/junk.img" "$REPO" --name junk --chunk-size "$CS" > /dev/null
expect_error "list from-files on a disk without an ext filesystem" \
    "$IMGFSCTL" list from-files "$REPO" junk@1 boot "$T/paths"
[ -e "$REPO/bases/junk/1.lists/boot" ] && fail "a list was stored for the refused disk"
printf '/no/such/file\n/nor/this 3\n' > "$T/missing"
expect_error "list from-files where no path exists" "$IMGFSCTL" list from-files "$REPO" guest@1 none "$T/missing"
[ -e "$REPO/bases/guest/1.lists/none" ] && fail "a list was stored although no path resolved"
expect_error "list from-files of a version that does not exist" \
    "$IMGFSCTL" list from-files "$REPO" guest@7 boot "$T/paths"
ok "nothing was stored for the refused requests"
finish
