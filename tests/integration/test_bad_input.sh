#!/bin/bash
# Bad input gets one clear sentence on stderr and a non-zero exit; nothing
# crashes, and the repository stays valid.
. "$(dirname "$0")/lib.sh"

make_image "$T/img.raw" 2000000
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name good > /dev/null
mkdir -p "$T/mnt" "$T/cache" "$T/state" "$T/notrepo" "$T/emptydir"
echo hello > "$T/notrepo/file"

# --- imgfs ---
expect_error "imgfs without arguments" "$IMGFS"
expect_error "imgfs with a missing repository" "$IMGFS" "$T/nope" "$T/mnt" -f -o cache="$T/cache",state="$T/state"
expect_error "imgfs with a directory that is not a repository" "$IMGFS" "$T/notrepo" "$T/mnt" -f -o cache="$T/cache",state="$T/state"
expect_error "imgfs with a missing cache directory" "$IMGFS" "$T/repo" "$T/mnt" -f -o cache="$T/nocache",state="$T/state"
expect_error "imgfs with a missing mount point" "$IMGFS" "$T/repo" "$T/nomnt" -f -o cache="$T/cache",state="$T/state"
expect_error "imgfs with an unknown option" "$IMGFS" "$T/repo" "$T/mnt" -f -o cache="$T/cache",state="$T/state",bogus_option=1
expect_error "imgfs with a bad timeout" "$IMGFS" "$T/repo" "$T/mnt" -f -o cache="$T/cache",state="$T/state",timeout=soon
expect_error "imgfs with a bad vm_cache mode" "$IMGFS" "$T/repo" "$T/mnt" -f -o cache="$T/cache",state="$T/state",vm_cache=sometimes
expect_error "imgfs with a bad prefetch_ahead" "$IMGFS" "$T/repo" "$T/mnt" -f -o cache="$T/cache",state="$T/state",prefetch_ahead=far
expect_error "imgfs with an unreachable http repository" "$IMGFS" http://127.0.0.1:9/repo "$T/mnt" -f -o cache="$T/cache",state="$T/state"
mountpoint -q "$T/mnt" && fail "a failed imgfs left a mount behind"
grep -q 'cache=DIR' <<<"$("$IMGFS" --help)" || fail "imgfs --help does not document cache=" # no pipe: grep -q would SIGPIPE imgfs
ok "imgfs --help documents its options"

cp -a "$T/repo" "$T/badindex"
printf 'imgfs-index 1\n../evil 1\n' > "$T/badindex/index"
expect_error "imgfs with a hostile name in the index" "$IMGFS" "$T/badindex" "$T/mnt" -f -o cache="$T/cache",state="$T/state"
cp -a "$T/repo" "$T/garbage"
head -c 5000 /dev/urandom > "$T/garbage/index"
expect_error "imgfs with a garbage index" "$IMGFS" "$T/garbage" "$T/mnt" -f -o cache="$T/cache",state="$T/state"

# --- imgfsctl publish ---
expect_error "publish of a missing image" "$IMGFSCTL" publish "$T/missing.raw" "$T/repo" --name a
: > "$T/empty.raw"
expect_error "publish of an empty image" "$IMGFSCTL" publish "$T/empty.raw" "$T/repo" --name a
expect_error "publish without --name" "$IMGFSCTL" publish "$T/img.raw" "$T/repo"
for name in "../x" "a/b" "." ".." "-rf" "a b" "$(printf 'x%.0s' $(seq 1 65))"; do
    expect_error "publish with hostile name '$name'" "$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name "$name"
done
expect_error "publish with a 3K chunk size" "$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name a --chunk-size 3K
expect_error "publish with a 64M chunk size" "$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name a --chunk-size 64M
expect_error "publish with a chunk size of garbage" "$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name a --chunk-size lots
expect_error "publish into a non-empty directory that is not a repository" "$IMGFSCTL" publish "$T/img.raw" "$T/notrepo" --name a
expect_error "publish with an unknown option" "$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name a --frobnicate

# Random data throughout, so that a cut at 200,000 bytes always loses
# clusters (img.raw's layout is random: it can be mostly zeros, whose qcow2
# then fits in 200,000 bytes whole and publishes fine).
head -c 2000000 /dev/urandom > "$T/dense.raw"
qemu-img convert -q -f raw -O qcow2 "$T/dense.raw" "$T/img.qcow2"
[ "$(stat -c %s "$T/img.qcow2")" -gt 400000 ] || fail "the qcow2 to cut is too small"
head -c 200000 "$T/img.qcow2" > "$T/truncated.qcow2"
expect_error "publish of a truncated qcow2" "$IMGFSCTL" publish "$T/truncated.qcow2" "$T/repo" --name a
head -c 100 "$T/img.qcow2" > "$T/header-only.qcow2"
expect_error "publish of a qcow2 cut inside its header" "$IMGFSCTL" publish "$T/header-only.qcow2" "$T/repo" --name a
qemu-img create -q -f qcow2 -b "$T/img.raw" -F raw "$T/rawbacked.qcow2"
expect_error "publish of a qcow2 with a raw backing file" "$IMGFSCTL" publish "$T/rawbacked.qcow2" "$T/repo" --name a
qemu-img create -q -f qcow2 -b "$T/gone.qcow2" -F qcow2 -u "$T/orphan.qcow2" 1M
expect_error "publish of a qcow2 whose backing file is missing" "$IMGFSCTL" publish "$T/orphan.qcow2" "$T/repo" --name a
qemu-img create -q -f vmdk "$T/disk.vmdk" 1M
expect_error "publish of a VMDK" "$IMGFSCTL" publish "$T/disk.vmdk" "$T/repo" --name a
if qemu-img create -q -f qcow2 "$T/huge.qcow2" 4P 2>/dev/null; then
    expect_error "publish of a qcow2 with an absurd 4 PiB size" "$IMGFSCTL" publish "$T/huge.qcow2" "$T/repo" --name a
fi
expect_error "imgfsctl unknown subcommand" "$IMGFSCTL" frobnicate
expect_error "imgfsctl status of a directory that is not a mount" "$IMGFSCTL" status "$T/emptydir"
for sub in publish status versions retire gc vm precopy unpin trace list; do
    grep -q "usage: imgfsctl $sub" <<<"$("$IMGFSCTL" "$sub" --help)" || fail "imgfsctl $sub --help"
done
ok "every imgfsctl subcommand answers --help"

# A malformed manifest hides only its own version, and says why.
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name other > /dev/null
sed -i 's/^size .*/size 12/' "$T/repo/bases/other/1.manifest"
mount_imgfs "$T/repo" "$T/mnt"
[ -e "$T/mnt/bases/other@1.raw" ] && fail "a malformed manifest was mounted"
cmp "$T/mnt/bases/good.raw" "$T/img.raw" || fail "good base broken by a bad neighbour"
grep -q 'refresh_error .*other@1.*malformed' "$T/mnt/.imgfs/stats" || fail "stats do not name the malformed manifest"
ok "malformed manifest: that version is hidden and reported, the rest works"
umount_imgfs "$T/mnt"
finish
