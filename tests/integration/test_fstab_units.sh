#!/bin/bash
# The documented fstab lines (packaging/fstab.example, the same as in the
# README and imgfs(8)) give systemd the right mount units: the local one is
# wanted by local-fs.target, the HTTP one (_netdev) by remote-fs.target, and
# both are ordered before libvirtd.service. The example mount unit and the
# pre-copy timer pass systemd-analyze verify.
. "$(dirname "$0")/lib.sh"
SRC=${IMGFS_SOURCE_DIR:?}
GEN=/lib/systemd/system-generators/systemd-fstab-generator
[ -x "$GEN" ] || fail "systemd-fstab-generator is not installed"

# The local line as it is, the HTTP line uncommented (on another mount point).
grep '^/' "$SRC/packaging/fstab.example" > "$T/fstab"
grep '^#http' "$SRC/packaging/fstab.example" | sed 's/^#//; s| /var/lib/libvirt/images | /var/lib/libvirt/remote |' >> "$T/fstab"
[ "$(wc -l < "$T/fstab")" = 2 ] || fail "fstab.example does not hold one local and one HTTP line"
for line in "$(sed -n 1p "$T/fstab")" "$(sed -n 2p "$T/fstab" | sed 's|/remote |/images |')"; do
    grep -qF -- "$(echo "$line" | tr -s ' ' | cut -d' ' -f4)" <(tr -s ' ' < "$SRC/README.md") ||
        fail "the README does not show the options of: $line"
done
mkdir -p "$T/gen"
SYSTEMD_FSTAB=$T/fstab SYSTEMD_PROC_CMDLINE="" "$GEN" "$T/gen" "$T/gen" "$T/gen" || fail "the generator failed"
local_unit=$T/gen/var-lib-libvirt-images.mount remote_unit=$T/gen/var-lib-libvirt-remote.mount
[ -e "$T/gen/local-fs.target.wants/var-lib-libvirt-images.mount" ] || fail "the local mount is not wanted by local-fs.target"
[ -e "$T/gen/remote-fs.target.wants/var-lib-libvirt-remote.mount" ] || fail "the HTTP mount is not wanted by remote-fs.target"
for unit in "$local_unit" "$remote_unit"; do
    grep -q '^Before=libvirtd.service' "$unit" || { cat "$unit"; fail "${unit##*/} is not ordered before libvirtd"; }
    grep -q '^Type=fuse.imgfs' "$unit" || fail "${unit##*/} is not of type fuse.imgfs"
    grep -q '^Options=.*nodev,nosuid' "$unit" || fail "${unit##*/} lacks nodev,nosuid"
done
grep -q '^Options=.*_netdev' "$remote_unit" || fail "the HTTP mount lacks _netdev"
ok "fstab.example: local -> local-fs.target, HTTP (_netdev) -> remote-fs.target, both Before=libvirtd.service"

cp "$SRC/packaging/systemd/var-lib-libvirt-images.mount" "$T/"
# verify runs man for the unit's Documentation=: it must find this build's
# page, whether or not a package installed one.
mkdir -p "$T/man/man8"
ln -s "${IMGFS_BUILD_DIR:?}/man/imgfs.8" "$T/man/man8/imgfs.8"
export MANPATH=$T/man
systemd-analyze verify "$T/var-lib-libvirt-images.mount" > "$T/verify.out" 2>&1 || { cat "$T/verify.out"; fail "the example mount unit does not verify"; }
grep -q '^Before=libvirtd.service' "$T/var-lib-libvirt-images.mount" || fail "the example unit is not ordered before libvirtd"
ok "the example mount unit verifies"
finish
