#!/bin/bash
# A libvirt qemu (TCG) domain boots a real Debian guest from a pool volume:
# the VM disk vms/vm1.raw on the debootstrap base, in a dir pool over vms/,
# attached as <disk type='volume'>. libvirt runs qemu as its own user and
# chowns the disk to it (dynamic ownership) and back; the guest's writes reach
# the VM's layer. Slow (one TCG boot, ~30-60 s); labelled guest and slow.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/libvirt.sh"

guest_image
"$IMGFSCTL" publish "$IMG" "$T/repo" --name deb > /dev/null || fail "publish of the guest image failed"
mkdir -p "$T/state"
chmod 711 "$T" # qemu runs as libvirt-qemu and must reach the mount
mount_imgfs "$T/repo" "$T/mnt" "state=$T/state,allow_other"
M=$T/mnt
"$IMGFSCTL" vm create "$M" vm1 --base deb > /dev/null || fail "vm create vm1 failed"
ok "published deb@1 and created vm1"

libvirt_start
$VIRSH pool-create-as imgfs dir --target "$M/vms" > /dev/null || fail "pool-create-as over vms/ failed"
grep -qE '^ *vm1.raw ' <<<"$($VIRSH vol-list imgfs)" || fail "the pool does not list vm1.raw"

# The guest's GRUB appends an SMBIOS OEM string "imgfs-cmdline:..." to the
# kernel command line (tests/guest/build-debian-image.sh).
cat > "$T/domain.xml" <<XML
<domain type='qemu'>
  <name>imgfs-test-vm1</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <sysinfo type='smbios'>
    <oemStrings><entry>imgfs-cmdline:imgfs.write=1 imgfs.poweroff=1</entry></oemStrings>
  </sysinfo>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/><smbios mode='sysinfo'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source pool='imgfs' volume='vm1.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$T/console.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
start=$(date +%s)
$VIRSH create "$T/domain.xml" > /dev/null || fail "virsh create of the domain failed: $(tail -5 "$T/libvirtd.log")"
owner=$(stat -c %U "$M/vms/vm1.raw")
ok "domain started on the pool volume (disk owned by $owner while it runs)"
[ "$owner" != root ] || fail "libvirt did not hand the disk to qemu's user"

# The guest powers itself off after its marker; wait for that (bounded).
for _ in $(seq 1 600); do
    [ -n "$($VIRSH list --name | grep -x imgfs-test-vm1)" ] || break
    sleep 1
done
[ -z "$($VIRSH list --name | grep -x imgfs-test-vm1)" ] || { tail -20 "$T/console.log" >&2; fail "the guest did not power off within 10 min"; }
grep -aq IMGFS-GUEST-READY "$T/console.log" || { tail -30 "$T/console.log" >&2; fail "the guest did not boot to its marker"; }
count=$(grep -a -o 'IMGFS-BOOT-COUNT=[0-9]*' "$T/console.log" | tail -n1)
[ "$count" = IMGFS-BOOT-COUNT=1 ] || fail "guest printed '$count', expected IMGFS-BOOT-COUNT=1"
ok "the guest booted from the pool volume and wrote its boot count ($(($(date +%s) - start)) s, informational)"

[ "$(stat -c %U "$M/vms/vm1.raw")" = root ] || fail "libvirt did not give the disk back to root after the domain stopped"
[ "$(stat_value "$M" "vm vm1" layer_bytes)" -gt 0 ] || fail "the guest's writes are not in vm1's layer"
cmp "$M/bases/deb@1.raw" "$IMG" || fail "the base changed"
e2fsck -fn "$M/vms/vm1.raw?offset=1048576" > "$T/fsck.log" 2>&1 || { cat "$T/fsck.log" >&2; fail "e2fsck finds errors in vm1"; }
ok "writes are in vm1's layer, the base is unchanged, the guest filesystem is clean"

libvirt_stop
umount_imgfs "$M"
finish
