#!/bin/bash
# imgfs mounts from an fstab line through mount(8) and mount.fuse3, goes to
# the background, serves the base and unmounts cleanly with umount. The
# line names this build's binary ("fuse" type, PROGRAM#SOURCE), since
# mount(8) runs helpers with its own PATH; the fuse.imgfs type, found in
# /usr/bin, is what test_package.sh mounts with the installed package.
. "$(dirname "$0")/lib.sh"

make_image "$T/img.raw" 5000000
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name fs > /dev/null
mkdir -p "$T/mnt" "$T/cache" "$T/state"
chmod 755 "$T" # let user nobody reach the mount point
MOUNTS+=("$T/mnt")
cat > "$T/fstab" <<EOT
# imgfs test fstab
$IMGFS#$T/repo  $T/mnt  fuse  allow_other,nodev,nosuid,config=none,cache=$T/cache,state=$T/state,timeout=10,nofail,x-systemd.before=libvirtd.service  0  0
EOT
timeout 120 mount -T "$T/fstab" "$T/mnt" || fail "mount -T fstab failed"
mountpoint -q "$T/mnt" || fail "nothing mounted at $T/mnt"
grep " $T/mnt fuse.imgfs " /proc/mounts > /dev/null || fail "/proc/mounts does not show type fuse.imgfs"
grep " $T/mnt fuse.imgfs [^ ]*nosuid,nodev" /proc/mounts > /dev/null || fail "nodev,nosuid are not applied"
ok "mounted through fstab: $(grep " $T/mnt " /proc/mounts | cut -d' ' -f1-4)"
# The supervisor holds the mount; the serving process is its child.
pid=$(stat_value "$T/mnt" daemon supervisor_pid)
server=$(stat_value "$T/mnt" daemon pid)
kill -0 "$pid" 2>/dev/null || fail "no background imgfs process"
[ "$(ps -o ppid= -p "$pid" | tr -d ' ')" = 1 ] || fail "imgfs did not detach into the background"
[ "$(ps -o ppid= -p "$server" | tr -d ' ')" = "$pid" ] || fail "the server $server is not the supervisor's child"
ok "daemon detached (supervisor pid $pid, server pid $server)"
cmp "$T/mnt/bases/fs.raw" "$T/img.raw" || fail "base differs when mounted through fstab"
# allow_other: another user can read the base.
su nobody -s /bin/sh -c "cat '$T/mnt/bases/fs.raw'" > "$T/as-nobody" || fail "user nobody cannot read with allow_other"
cmp "$T/as-nobody" "$T/img.raw" || fail "user nobody got wrong data"
ok "base identical, also for another user (allow_other)"
umount "$T/mnt" || fail "umount failed"
wait_for "daemon still running after umount" '! kill -0 "$pid" 2>/dev/null'
kill -0 "$server" 2>/dev/null && fail "server still running after umount"
ok "umount stopped the daemon"
finish
