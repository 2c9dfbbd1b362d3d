#!/bin/bash
# The imgfs demo: publish a small generated disk image to a local repository,
# mount it, create a VM disk on it, write to it, and look at everything with
# ls, cat and qemu-img. Uses the installed imgfs and imgfsctl. Run as root.
set -euo pipefail
DEMO=${IMGFS_DEMO_DIR:-/var/tmp/imgfs-demo}
MNT=$DEMO/mnt

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }

if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT"; fi
rm -rf "$DEMO"
mkdir -p "$DEMO/mnt" "$DEMO/cache" "$DEMO/state"

# A small disk with a real ext4 filesystem full of files.
mkdir -p "$DEMO/rootfs/etc" "$DEMO/rootfs/data"
cp -r /etc/ssl /etc/apt "$DEMO/rootfs/etc/" 2>/dev/null || true
head -c 8M /dev/urandom > "$DEMO/rootfs/data/random.bin"
run mkfs.ext4 -q -F -L demo -d "$DEMO/rootfs" "$DEMO/demo.raw" 256M

run imgfsctl publish "$DEMO/demo.raw" "$DEMO/repo" --name demo
run imgfs "$DEMO/repo" "$MNT" -o cache="$DEMO/cache",state="$DEMO/state"
run ls -l "$MNT" "$MNT/bases"
run cmp "$MNT/bases/demo.raw" "$DEMO/demo.raw"
echo "identical"

# A VM disk on the shared base: it appears at once and takes writes into
# its own layer, while the base stays untouched.
run imgfsctl vm create "$MNT" vm1 --base demo
run ls -l "$MNT/vms"
run qemu-io -f raw -c 'write -P 0x42 1M 64k' "$MNT/vms/vm1.raw"
# qemu reads the whole VM disk through imgfs into a qcow2 image and checks it.
run qemu-img convert -O qcow2 "$MNT/vms/vm1.raw" "$DEMO/vm1.qcow2"
run qemu-img check "$DEMO/vm1.qcow2"
run qemu-img compare "$MNT/vms/vm1.raw" "$DEMO/vm1.qcow2"
run cat "$MNT/.imgfs/stats"
run umount "$MNT"
echo
echo "demo done: repository $DEMO/repo, cache $DEMO/cache, VM layers in $DEMO/state"
