#!/bin/bash
# build-debian-image.sh — build a small bootable Debian 12 (bookworm) raw disk
# image for imgfs integration tests and benchmarks.
#
# Usage: build-debian-image.sh OUTPUT.raw [SIZE]      (SIZE default 2G, e.g. 4G, 1536M)
#
# Result: a sparse raw disk with an MBR partition table and one bootable ext4
# partition (starting at 1 MiB) holding a minimal Debian 12 (minbase +
# systemd-sysv + linux-image-amd64, with an initramfs of the virtio and ext4
# modules only, as cloud images have). GRUB (i386-pc) is written into the MBR and
# the 1 MiB gap, so the disk boots by itself under SeaBIOS; no -kernel/-initrd
# is needed:
#   qemu-system-x86_64 -accel tcg -m 1024 -nographic \
#       -drive file=OUTPUT.raw,format=raw,if=virtio
# (tests/guest/boot-guest.sh does this and waits for the ready marker.)
#
# Guest behaviour:
#  - kernel and getty on the serial console ttyS0 (115200); root has an empty
#    password and is logged in automatically on ttyS0.
#  - imgfs-guest-ready.service runs once multi-user.target is reached and
#    prints "IMGFS-GUEST-READY" on /dev/ttyS0.
#  - Extra kernel arguments without -kernel/-append: GRUB appends the first
#    SMBIOS OEM string (type 11) if it starts with "imgfs-cmdline:", e.g.
#      qemu ... -smbios type=11,value="imgfs-cmdline:imgfs.write=1 imgfs.poweroff=1"
#    (pass exactly one type-11 string). The marker script reads /proc/cmdline:
#      imgfs.write=1     before the marker, increment /var/lib/imgfs-boot-count,
#                        sync, and print "IMGFS-BOOT-COUNT=<n>" on ttyS0.
#      imgfs.poweroff=1  power off after the marker.
#
# How it is built (no loop device, no mount of the image):
#  1. debootstrap into a directory; the result is cached as a tarball in
#     $IMGFS_GUEST_CACHE (default /var/cache/imgfs-test/debootstrap), keyed by
#     suite, mirror and package list. A rebuild from the cache takes seconds.
#  2. The tree is configured (fstab, serial getty, marker unit, grub.cfg).
#  3. `mkfs.ext4 -d TREE` makes the filesystem in a separate file, which is
#     spliced into the disk after the MBR written by sfdisk.
#  4. grub-mkimage (run inside the guest tree, from its grub-pc-bin) makes
#     core.img; boot.img goes into the MBR code area and core.img at sector 1.
#
# Environment:
#   IMGFS_GUEST_CACHE   debootstrap cache directory (see above)
#   IMGFS_GUEST_MIRROR  Debian mirror URL (default: taken from apt sources)
#   IMGFS_GUEST_REFRESH=1  ignore and replace the cached debootstrap tarball
#   TMPDIR              where the work tree is made (default /var/tmp; ~1 GB)
#
# Needs root, debootstrap, sfdisk (fdisk), mkfs.ext4 (e2fsprogs >= 1.43), tar.
set -euo pipefail

SUITE=bookworm
ARCH=amd64
INCLUDE=systemd-sysv,udev,kmod,linux-image-amd64,initramfs-tools,grub-pc-bin
PART_START=2048        # sectors; partition starts at 1 MiB

log() { echo "build-debian-image: $*" >&2; }
die() { echo "build-debian-image: error: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 OUTPUT.raw [SIZE]" >&2; exit 2; }
OUTPUT=$1
SIZE=${2:-2G}
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"
for t in debootstrap sfdisk mkfs.ext4 tar chroot; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' not found; install debootstrap, fdisk and e2fsprogs"
done

size_bytes=$(numfmt --from=iec "${SIZE%B}" 2>/dev/null) || die "bad SIZE '$SIZE' (use e.g. 2G or 1536M)"
[ "$size_bytes" -ge $((512 * 1024 * 1024)) ] || die "SIZE '$SIZE' is too small (at least 512M)"
size_bytes=$(( size_bytes / 1048576 * 1048576 ))
part_bytes=$(( size_bytes - PART_START * 512 ))

# ---- mirror: first Debian (non-security) URI from the apt sources ----------
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
        [ -r "$f" ] || continue
        case $f in
        *.sources)
            awk 'tolower($1)=="uris:" { for (i = 2; i <= NF; i++) print $i }' "$f" ;;
        *)
            awk '$1=="deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "$f" ;;
        esac
    done | grep -E '/debian/?$' | grep -v -- '-security' | head -n1
}
MIRROR=${IMGFS_GUEST_MIRROR:-$(find_mirror || true)}
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
log "mirror $MIRROR, suite $SUITE, size $size_bytes bytes"

# ---- work area and cleanup -------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/imgfs-guest.XXXXXX")
ROOT=$WORK/root
cleanup() {
    local m
    # debootstrap may leave /proc, /sys ... mounted if it failed half way
    for m in $(awk -v r="$ROOT" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'die "interrupted"' INT TERM

# ---- 1. debootstrap (cached) -----------------------------------------------
CACHE=${IMGFS_GUEST_CACHE:-/var/cache/imgfs-test/debootstrap}
key=$(printf '%s\n' "$SUITE" "$ARCH" "$MIRROR" "$INCLUDE" minbase | sha256sum | cut -c1-12)
TARBALL=$CACHE/$SUITE-$ARCH-$key.tar
mkdir -p "$ROOT" "$CACHE" || die "cannot create $CACHE"

if [ -s "$TARBALL" ] && [ "${IMGFS_GUEST_REFRESH:-0}" != 1 ]; then
    log "reusing cached debootstrap $TARBALL"
    tar -C "$ROOT" --numeric-owner --xattrs --xattrs-include='*' -xpf "$TARBALL" \
        || die "cannot unpack $TARBALL (delete it to rebuild)"
else
    log "debootstrap $SUITE (minbase + $INCLUDE); takes a few minutes"
    debootstrap --variant=minbase --arch="$ARCH" --include="$INCLUDE" \
        "$SUITE" "$ROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log" >&2
        die "debootstrap failed (log above)"
    }
    apt_clean() { rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages; }
    apt_clean
    log "saving debootstrap cache $TARBALL"
    tar -C "$ROOT" --numeric-owner --xattrs --xattrs-include='*' -cf "$TARBALL.tmp" . \
        && mv "$TARBALL.tmp" "$TARBALL" || { rm -f "$TARBALL.tmp"; log "warning: could not save cache"; }
fi

kver=$(ls "$ROOT"/boot | sed -n 's/^vmlinuz-//p' | sort -V | tail -n1)
[ -n "$kver" ] && [ -f "$ROOT/boot/initrd.img-$kver" ] || die "no kernel/initrd in the debootstrap tree"
[ -f "$ROOT/usr/lib/grub/i386-pc/boot.img" ] || die "grub-pc-bin missing from the debootstrap tree"
log "kernel $kver"

# ---- 2. configure the guest ------------------------------------------------
UUID=$(cat /proc/sys/kernel/random/uuid)
CMDLINE="root=UUID=$UUID ro console=ttyS0,115200n8"

echo imgfs-guest > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\timgfs-guest\n' > "$ROOT/etc/hosts"
printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$UUID" > "$ROOT/etc/fstab"
: > "$ROOT/etc/machine-id"        # each VM made from the base gets its own id
rm -f "$ROOT/var/lib/dbus/machine-id"
chroot "$ROOT" passwd -d root >/dev/null

mkdir -p "$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF

mkdir -p "$ROOT/usr/local/sbin"
cat > "$ROOT/usr/local/sbin/imgfs-guest-ready" <<'EOF'
#!/bin/sh
# Prints the imgfs test marker on the serial console; see
# tests/guest/build-debian-image.sh in the imgfs source tree.
tty=/dev/ttyS0
args=$(cat /proc/cmdline)
has() { case " $args " in *" $1 "*) return 0 ;; esac; return 1; }

if has imgfs.write=1; then
    f=/var/lib/imgfs-boot-count
    n=$(cat "$f" 2>/dev/null || true)
    case $n in ''|*[!0-9]*) n=0 ;; esac
    n=$((n + 1))
    echo "$n" > "$f.tmp" && sync "$f.tmp" && mv "$f.tmp" "$f" && sync
    echo "IMGFS-BOOT-COUNT=$n" > "$tty"
fi
echo "IMGFS-GUEST-READY" > "$tty"
if has imgfs.poweroff=1; then
    systemctl --no-block poweroff
fi
exit 0
EOF
chmod 755 "$ROOT/usr/local/sbin/imgfs-guest-ready"

cat > "$ROOT/etc/systemd/system/imgfs-guest-ready.service" <<'EOF'
[Unit]
Description=Print the imgfs test marker once multi-user.target is reached
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/imgfs-guest-ready

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/imgfs-guest-ready.service \
    "$ROOT/etc/systemd/system/multi-user.target.wants/imgfs-guest-ready.service"

# A cloud-style initramfs with only what a virtio disk with ext4 needs.
# Debian's default (MODULES=most) makes a 36 MB initrd, which GRUB reads in
# full before the kernel starts: most of the boot's early reads.
mkdir -p "$ROOT/etc/initramfs-tools/conf.d"
echo MODULES=list > "$ROOT/etc/initramfs-tools/conf.d/imgfs-guest.conf"
printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic >> "$ROOT/etc/initramfs-tools/modules"
chroot "$ROOT" update-initramfs -u -k "$kver" > "$WORK/initramfs.log" 2>&1 ||
    { tail -n 20 "$WORK/initramfs.log" >&2; die "update-initramfs failed"; }
log "initrd $(du -h "$ROOT/boot/initrd.img-$kver" | cut -f1)"

# GRUB: modules plus a config that boots the kernel at once on the serial console
mkdir -p "$ROOT/boot/grub/i386-pc"
cp "$ROOT"/usr/lib/grub/i386-pc/*.mod "$ROOT"/usr/lib/grub/i386-pc/*.lst "$ROOT/boot/grub/i386-pc/"
cat > "$ROOT/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry 'Debian 12 (imgfs test guest)' {
    search --no-floppy --fs-uuid --set=root $UUID
    # extra kernel arguments from the host:
    #   qemu -smbios type=11,value=imgfs-cmdline:ARGS
    set imgfs_args=
    if smbios --type 11 --get-string 4 --set imgfs_oem; then
        regexp --set=1:imgfs_args '^imgfs-cmdline:(.*)\$' "\$imgfs_oem"
    fi
    linux /boot/vmlinuz-$kver $CMDLINE \$imgfs_args
    initrd /boot/initrd.img-$kver
}
EOF
cat > "$WORK/early.cfg" <<EOF
search.fs_uuid $UUID root hd0,msdos1
set prefix=(\$root)/boot/grub
EOF
cp "$WORK/early.cfg" "$ROOT/tmp/imgfs-early.cfg"
chroot "$ROOT" grub-mkimage -O i386-pc -o /tmp/imgfs-core.img -c /tmp/imgfs-early.cfg \
    -p /boot/grub biosdisk part_msdos ext2 search search_fs_uuid normal linux \
    configfile serial terminal echo test smbios regexp \
    || die "grub-mkimage failed"
mv "$ROOT/tmp/imgfs-core.img" "$WORK/core.img"
rm -f "$ROOT/tmp/imgfs-early.cfg"
cp "$ROOT/usr/lib/grub/i386-pc/boot.img" "$WORK/boot.img"
core_bytes=$(stat -c %s "$WORK/core.img")
[ "$core_bytes" -lt $(( (PART_START - 1) * 512 )) ] || die "core.img ($core_bytes bytes) does not fit before the partition"

# ---- 3. filesystem and disk ------------------------------------------------
log "mkfs.ext4 -d ($((part_bytes / 1048576)) MiB, uuid $UUID)"
truncate -s "$part_bytes" "$WORK/root.ext4"
# no orphan_file / metadata_csum_seed: GRUB 2.06 cannot read those
mkfs.ext4 -q -F -L imgfs-root -U "$UUID" -O ^orphan_file,^metadata_csum_seed \
    -E root_owner=0:0 -d "$ROOT" "$WORK/root.ext4" 2> "$WORK/mkfs.log" \
 || mkfs.ext4 -q -F -L imgfs-root -U "$UUID" -O ^metadata_csum_seed \
    -E root_owner=0:0 -d "$ROOT" "$WORK/root.ext4" 2>> "$WORK/mkfs.log" \
 || { cat "$WORK/mkfs.log" >&2; die "mkfs.ext4 -d failed (e2fsprogs >= 1.43 needed)"; }

log "writing disk $OUTPUT"
tmpout=$OUTPUT.tmp.$$
rm -f "$tmpout"
truncate -s "$size_bytes" "$tmpout" || die "cannot create $tmpout"
printf 'label: dos\nstart=%d, type=83, bootable\n' "$PART_START" \
    | sfdisk --quiet --no-reread --no-tell-kernel "$tmpout" >/dev/null \
    || { rm -f "$tmpout"; die "sfdisk failed"; }
dd if="$WORK/root.ext4" of="$tmpout" bs=1M seek=$((PART_START / 2048)) conv=notrunc,sparse status=none \
    || { rm -f "$tmpout"; die "cannot write the filesystem into $tmpout"; }
# MBR code area only (440 bytes): keep the disk signature and partition table
dd if="$WORK/boot.img" of="$tmpout" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/core.img" of="$tmpout" bs=512 seek=1 conv=notrunc status=none
mv "$tmpout" "$OUTPUT"

used=$(du -B1 "$OUTPUT" | cut -f1)
log "done: $OUTPUT ($size_bytes bytes, $used allocated, root UUID $UUID, kernel $kver)"
