#!/bin/bash
# libvirt storage pools work both ways over vms/: a dir pool lists the VM
# disks, vol-create-as makes a blank VM disk of the size asked (O_CREAT, then
# ftruncate), vol-delete removes it with vm rm's rules (refused while open),
# and a VM disk's mtime follows its writes while touch sets it honestly.
# libvirtd is started by the test and stopped at its end.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/libvirt.sh"

make_image "$T/disk.img" $((4 << 20))
"$IMGFSCTL" publish "$T/disk.img" "$T/repo" --name os > /dev/null
mkdir -p "$T/state"
mount_imgfs "$T/repo" "$T/mnt" "state=$T/state,allow_other"
M=$T/mnt
"$IMGFSCTL" vm create "$M" web1 --base os > /dev/null
layers() { find "$T/state/layers" -name '*.log' | wc -l; }

libvirt_start
$VIRSH pool-create-as imgfs dir --target "$M/vms" > /dev/null || fail "pool-create-as over vms/ failed"
grep -q "web1.raw  *$M/vms/web1.raw" <<<"$($VIRSH vol-list imgfs)" || fail "the pool does not list web1.raw: $($VIRSH vol-list imgfs)"
ok "a dir pool over vms/ lists the VM disks"

# vol-create-as: a blank disk of exactly that size, owned by the creator.
before=$(layers)
$VIRSH vol-create-as imgfs new.raw 16M --format raw > /dev/null || fail "vol-create-as failed"
[ "$(stat -c %s "$M/vms/new.raw")" = $((16 << 20)) ] || fail "new.raw is $(stat -c %s "$M/vms/new.raw") bytes, not 16M"
[ "$(stat_value "$M" "vm new" size)" = $((16 << 20)) ] || fail "[vm new] size is not 16M"
[ "$(stat_value "$M" "vm new" base)" = none ] || fail "new.raw is not a blank disk"
grep -q 'Capacity: *16.00 MiB' <<<"$($VIRSH vol-info new.raw --pool imgfs)" || fail "vol-info: $($VIRSH vol-info new.raw --pool imgfs)"
cmp -n $((16 << 20)) "$M/vms/new.raw" /dev/zero || fail "a new volume does not read as zeros"
qemu-io -f raw -c 'write -P 0x5a 1M 64k' "$M/vms/new.raw" > /dev/null || fail "cannot write to the new volume"
grep -q '^read' <<<"$(qemu-io -f raw -c 'read -P 0x5a 1M 64k' "$M/vms/new.raw")" || fail "the new volume does not keep its data"
ok "vol-create-as makes a blank VM disk of 16M that takes writes"

# qemu-img create -f raw does the same (O_CREAT, ftruncate); a disk's size is
# fixed once it has data.
qemu-img create -q -f raw "$M/vms/img.raw" 8M || fail "qemu-img create -f raw in vms/ failed"
[ "$(stat -c %s "$M/vms/img.raw")" = $((8 << 20)) ] || fail "qemu-img create made $(stat -c %s "$M/vms/img.raw") bytes"
! truncate -s 32M "$M/vms/new.raw" 2>/dev/null || fail "a disk with data changed its size"
! truncate -s 1M "$M/vms/web1.raw" 2>/dev/null || fail "a disk on a base changed its size"
! touch "$M/vms/notadisk.txt" 2>/dev/null || fail "a file that is not NAME.raw was created in vms/"
! touch "$M/bases/x.raw" 2>/dev/null || fail "a file was created in bases/"
ok "qemu-img create -f raw works; sizes of disks with data or a base are fixed; other names are refused"

# vol-delete is vm rm: refused while the disk is open, then removes it and
# its layer.
exec 7<>"$M/vms/new.raw"
! $VIRSH vol-delete new.raw --pool imgfs > "$T/delete.out" 2>&1 || fail "vol-delete removed an open disk"
grep -qi 'busy' "$T/delete.out" || fail "vol-delete of an open disk did not say it is busy: $(cat "$T/delete.out")"
[ -e "$M/vms/new.raw" ] || fail "the open disk is gone"
! rm "$M/vms/new.raw" 2>/dev/null || fail "rm removed an open disk"
exec 7>&-
$VIRSH vol-delete new.raw --pool imgfs > /dev/null || fail "vol-delete of a closed disk failed"
rm "$M/vms/img.raw" || fail "rm of vms/img.raw failed"
[ ! -e "$M/vms/new.raw" ] && [ ! -e "$M/vms/img.raw" ] || fail "deleted volumes are still there"
! grep -q '^\[vm new\]' "$M/.imgfs/stats" || fail "the deleted VM is still in stats"
[ "$(layers)" = "$before" ] || fail "the deleted disks' layers are still in the state directory"
$VIRSH pool-refresh imgfs > /dev/null
[ "$($VIRSH vol-list imgfs | grep -c raw)" = 1 ] || fail "the pool lists $($VIRSH vol-list imgfs)"
ok "vol-delete and rm are vm rm: refused (busy) while open, then the disk and its layer go"

# mtime: touch sets it, a write moves it, and it survives a remount.
touch -d '2020-01-02 03:04:05' "$M/vms/web1.raw" || fail "touch -d on a VM disk failed"
[ "$(stat -c %Y "$M/vms/web1.raw")" = "$(date -d '2020-01-02 03:04:05' +%s)" ] ||
    fail "touch -d did not set the mtime: $(stat -c %y "$M/vms/web1.raw")"
umount_imgfs "$M"
mount_imgfs "$T/repo" "$M" "state=$T/state,allow_other"
[ "$(stat -c %Y "$M/vms/web1.raw")" = "$(date -d '2020-01-02 03:04:05' +%s)" ] || fail "the mtime did not survive a remount"
qemu-io -f raw -c 'write -P 1 0 4k' "$M/vms/web1.raw" > /dev/null || fail "write to web1 failed"
[ "$(stat -c %Y "$M/vms/web1.raw")" -ge "$(date -d '2021-01-01' +%s)" ] ||
    fail "a write did not move the mtime: $(stat -c %y "$M/vms/web1.raw")"
"$IMGFSCTL" vm snapshot "$M" web1 s1 > /dev/null
! touch "$M/vms/web1@s1.raw" 2>/dev/null || fail "touch of a snapshot succeeded"
! touch "$M/bases/os@1.raw" 2>/dev/null || fail "touch of a base succeeded"
ok "touch sets a VM disk's mtime (kept across remounts), writes move it, snapshots and bases refuse touch"

libvirt_stop
umount_imgfs "$M"
finish
