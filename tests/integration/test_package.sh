#!/bin/bash
# The Debian package, as an operator meets it: packaging/setup.sh deb builds
# imgfs_VERSION_ARCH.deb (lintian: no errors), apt installs it with its
# dependencies, an fstab line of type fuse.imgfs mounts with the packaged
# /usr/bin/imgfs (found by mount.fuse3 through mount(8)'s own PATH), a base
# reads back, the packaged imgfsctl check, pre-copy script, man pages and
# completion work, and apt-get remove leaves no mount and no process: it
# refuses while a disk is open and unmounts otherwise. The package is purged
# at the end whatever happened. Other engineers' mounts and daemons run
# their own builds by full path and are never touched.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"
SRC=${IMGFS_SOURCE_DIR:?}
export DEBIAN_FRONTEND=noninteractive

exec 9> /tmp/imgfs-package-test.lock
flock -n 9 || fail "another package test is running"
dpkg-query -W -f '${Status}' imgfs 2>/dev/null | grep -q "installed" &&
    fail "an imgfs package is installed already; this test installs and purges its own"
[ -e /usr/bin/imgfs ] && fail "/usr/bin/imgfs exists but belongs to no package"

# mount(8)'s PATH puts /usr/local before /usr: a `cmake --install` copy there
# would serve the fstab line instead of the package's. It is moved aside for
# the test and put back at the end.
for shadow in /usr/local/sbin/imgfs /usr/local/bin/imgfs; do
    if [ -e "$shadow" ]; then
        mv "$shadow" "$shadow.moved-by-test-package"
        at_exit "mv '$shadow.moved-by-test-package' '$shadow'"
        echo "# $shadow moved aside while the package is tested"
    fi
done

bash "$SRC/packaging/setup.sh" deb "$T/deb" > "$T/deb.log" 2>&1 || { cat "$T/deb.log"; fail "setup.sh deb failed"; }
deb=$(ls "$T"/deb/imgfs_*_"$(dpkg --print-architecture)".deb)
version=$(sed -n 's/^project(imgfs VERSION \([0-9.]*\).*/\1/p' "$SRC/CMakeLists.txt")
[ "${deb##*/}" = "imgfs_${version}_$(dpkg --print-architecture).deb" ] || fail "unexpected package name ${deb##*/}"
lintian "$deb" > "$T/lintian.out" 2>&1 || true
grep -E '^E: ' "$T/lintian.out" && fail "lintian reports errors"
ok "built ${deb##*/}; lintian: $(grep -c '^E: ' "$T/lintian.out") errors, $(grep -c '^W: ' "$T/lintian.out") warnings"

# Whatever happened: let go of the mount (fd 8 holds a disk open below), then purge.
at_exit 'exec 8<&-; flock /tmp/imgfs-apt.lock apt-get purge -y -qq imgfs > "$T/purge.log" 2>&1 || cat "$T/purge.log" >&2'

flock /tmp/imgfs-apt.lock apt-get install -y -qq "$deb" > "$T/apt.log" 2>&1 || { cat "$T/apt.log"; fail "apt-get install failed"; }
dpkg-query -W -f '${Status}' imgfs | grep -q "install ok installed" || fail "the package is not installed"
for f in /usr/bin/imgfs /usr/bin/imgfsctl /etc/imgfs/imgfs.conf /etc/imgfs/precopy.list \
    /lib/systemd/system/imgfs-precopy.service /lib/systemd/system/imgfs-precopy.timer /usr/lib/imgfs/imgfs-precopy \
    /usr/lib/imgfs/imgfs-mounts /usr/lib/imgfs/imgfs-metrics-http \
    /usr/share/bash-completion/completions/imgfsctl /usr/share/doc/imgfs/design.md.gz; do
    [ -e "$f" ] || fail "the package did not install $f"
done
for page in imgfs.8 imgfsctl.8 imgfs.conf.5; do
    man -w "${page%.*}" > /dev/null 2>&1 || [ -e "/usr/share/man/man${page##*.}/$page.gz" ] || fail "no man page $page"
done
zcat /usr/share/man/man8/imgfs.8.gz | grep -q 'allow_other,nodev,nosuid' || fail "imgfs(8) lacks the fstab line"
for dir in /var/cache/imgfs /var/lib/imgfs; do
    [ -d "$dir" ] || fail "the package did not create $dir"
done
ok "installed with apt: binaries in /usr/bin, config, units, man pages, completion, $(stat -c '%n %a' /var/cache/imgfs)"

make_image "$T/img.raw" 3000000
/usr/bin/imgfsctl publish "$T/img.raw" "$T/repo" --name pkg > /dev/null
mkdir -p "$T/mnt" "$T/cache" "$T/state"
cat > "$T/imgfs.conf" <<EOT
cache=$T/cache
state=$T/state
EOT
MOUNTS+=("$T/mnt")
cat > "$T/fstab" <<EOT
$T/repo  $T/mnt  fuse.imgfs  allow_other,nodev,nosuid,nofail,config=$T/imgfs.conf,x-systemd.before=libvirtd.service  0  0
EOT
timeout 30 mount -T "$T/fstab" "$T/mnt" || fail "mount through the fstab line failed"
grep " $T/mnt fuse.imgfs [^ ]*nosuid,nodev" /proc/mounts > /dev/null || fail "not mounted as fuse.imgfs with nodev,nosuid"
daemon=$(stat_value "$T/mnt" cache directory)
[ "$daemon" = "$T/cache" ] || fail "the mount did not take cache= from its config file ($daemon)"
pid=$(awk '/^pid/ { print $2 }' "$T/state/imgfs.lock")
[ "$(readlink "/proc/$pid/exe")" = /usr/bin/imgfs ] || fail "the daemon is $(readlink "/proc/$pid/exe"), not /usr/bin/imgfs"
cmp "$T/mnt/bases/pkg.raw" "$T/img.raw" || fail "the base reads back wrong"
ok "fstab line mounted by /usr/bin/imgfs (pid $pid) with its config file; the base reads back"

# The HTTP line: a signed repository behind nginx, _netdev and trust=.
/usr/bin/imgfsctl key generate "$T/key" > /dev/null
/usr/bin/imgfsctl sign "$T/repo" --key "$T/key" > /dev/null || fail "imgfsctl sign failed"
nginx_start repo "$T/repo"
mkdir -p "$T/web" "$T/cache2" "$T/state2"
MOUNTS+=("$T/web")
cat >> "$T/fstab" <<EOT
${NGINX_URL[repo]}  $T/web  fuse.imgfs  allow_other,nodev,nosuid,nofail,_netdev,config=none,cache=$T/cache2,state=$T/state2,trust=$T/key.pub  0  0
EOT
timeout 30 mount -T "$T/fstab" "$T/web" || fail "mount of the HTTP fstab line failed"
cmp "$T/web/bases/pkg.raw" "$T/img.raw" || fail "the base reads back wrong over HTTP"
[ "$(stat_value "$T/web" trust mode)" = signed ] || fail "the HTTP mount does not verify signatures"
/usr/bin/imgfsctl check "$T/web" > "$T/check.out" || { cat "$T/check.out"; fail "imgfsctl check of the HTTP mount failed"; }
grep -q "^ok    trust       the mount accepts only metadata signed by its 1 trusted key" "$T/check.out" ||
    { cat "$T/check.out"; fail "check does not report the signed mode"; }
ok "HTTP fstab line (_netdev, trust=) mounted by /usr/bin/imgfs; the base reads back, signed"

/usr/bin/imgfsctl check "$T/mnt" > "$T/check.out" || { cat "$T/check.out"; fail "imgfsctl check of the mount failed"; }
grep -q "^ok    repository  $T/repo is reachable" "$T/check.out" || fail "check did not find the repository"
grep -q "^0 problems" "$T/check.out" || fail "check found problems"
ok "imgfsctl check: $(grep -c '^ok' "$T/check.out") ok, $(tail -n 1 "$T/check.out")"

# The pre-copy script of the timer, with a window around now.
/usr/bin/imgfsctl vm create "$T/mnt" web1 --base pkg > /dev/null
start=$(date -d '-1 min' +%H:%M) end=$(date -d '+10 min' +%H:%M)
printf 'rate=100M\nwindow=%s-%s\n%s pkg\n' "$start" "$end" "$T/mnt" > "$T/precopy.list"
/usr/lib/imgfs/imgfs-precopy "$T/precopy.list" > "$T/precopy.out" 2>&1 || { cat "$T/precopy.out"; fail "imgfs-precopy failed"; }
grep -q "pre-copy of pkg@1: done" "$T/precopy.out" || { cat "$T/precopy.out"; fail "the listed base was not pre-copied"; }
[ "$(stat_value "$T/mnt" cache pinned_bytes)" -gt 0 ] || fail "nothing is pinned after the pre-copy"
if command -v systemd-analyze > /dev/null; then
    systemd-analyze verify /lib/systemd/system/imgfs-precopy.timer > "$T/verify.out" 2>&1 ||
        { cat "$T/verify.out"; fail "systemd-analyze verify of the timer failed"; }
fi
ok "imgfs-precopy pins the listed base inside its window; the units verify"

# Completion of VM and base names on the mount.
out=$(bash -c "source /usr/share/bash-completion/bash_completion; source /usr/share/bash-completion/completions/imgfsctl
    COMP_WORDS=(imgfsctl vm rm '$T/mnt' w); COMP_CWORD=4; _imgfsctl; echo \"\${COMPREPLY[*]}\"
    COMP_WORDS=(imgfsctl precopy '$T/mnt' ''); COMP_CWORD=3; _imgfsctl; echo \"\${COMPREPLY[*]}\"")
[ "$out" = "$(printf 'web1\npkg pkg@1')" ] || fail "completion gave '$out'"
ok "bash completion names the VMs and bases of the mount"

# An upgrade (here a reinstall) hands both mounts to the new binary while a
# VM disk stays open and readable.
exec 8< "$T/mnt/vms/web1.raw"
server_pid=$(stat_value "$T/mnt" daemon pid)
flock /tmp/imgfs-apt.lock apt-get install -y -qq --reinstall "$deb" > "$T/upgrade.log" 2>&1 ||
    { cat "$T/upgrade.log"; fail "apt-get install --reinstall failed"; }
grep -q "imgfs: $T/mnt is served by the new imgfs" "$T/upgrade.log" || { cat "$T/upgrade.log"; fail "the mount was not handed over"; }
grep -q "imgfs: $T/web is served by the new imgfs" "$T/upgrade.log" || fail "the HTTP mount was not handed over"
new_pid=$(stat_value "$T/mnt" daemon pid)
[ "$new_pid" != "$server_pid" ] || fail "the same process (pid $server_pid) serves after the upgrade"
[ "$(readlink "/proc/$new_pid/exe")" = /usr/bin/imgfs ] || fail "the new server runs $(readlink "/proc/$new_pid/exe")"
cmp <(cat <&8) "$T/img.raw" || fail "the VM disk that stayed open reads wrong after the upgrade"
exec 8<&-
exec 8< "$T/mnt/vms/web1.raw"
ok "upgrade: both mounts handed to a new /usr/bin/imgfs (pid $new_pid); an open VM disk kept reading"

# Removal refuses while a disk is open, then unmounts and leaves nothing.
if flock /tmp/imgfs-apt.lock apt-get remove -y -qq imgfs > "$T/remove.log" 2>&1; then
    fail "apt-get remove succeeded while a VM disk was open"
fi
grep -q "cannot unmount $T/mnt (" "$T/remove.log" || { cat "$T/remove.log"; fail "removal did not say which mount is busy"; }
mountpoint -q "$T/mnt" || fail "a refused removal lost the mount"
mountpoint -q "$T/web" || fail "a refused removal unmounted another mount of the package"
exec 8<&-
ok "apt-get remove refuses while a VM disk is open: $(grep -m1 'cannot unmount' "$T/remove.log")"
flock /tmp/imgfs-apt.lock apt-get remove -y -qq imgfs > "$T/remove.log" 2>&1 || { cat "$T/remove.log"; fail "apt-get remove failed"; }
mountpoint -q "$T/mnt" && fail "the mount is still there after apt-get remove"
mountpoint -q "$T/web" && fail "the HTTP mount is still there after apt-get remove"
# Gone, or a zombie that only waits for its parent (here PID 1) to reap it.
for p in "$pid" "$new_pid"; do
    state=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | cut -c1 || true)
    [ -z "$state" ] || [ "$state" = Z ] || fail "imgfs (pid $p) still runs after apt-get remove (state $state)"
done
for exe in /proc/[0-9]*/exe; do
    case $(readlink "$exe" 2>/dev/null) in /usr/bin/imgfs*) fail "a packaged imgfs still runs: $exe" ;; esac
done
[ -e /usr/bin/imgfs ] && fail "/usr/bin/imgfs is still there"
ok "apt-get remove unmounted both mounts and stopped their daemons; no packaged process is left"
flock /tmp/imgfs-apt.lock apt-get purge -y -qq imgfs > /dev/null 2>&1 || fail "apt-get purge failed"
[ -e /etc/imgfs/imgfs.conf ] && fail "/etc/imgfs/imgfs.conf is still there after purge"
ok "apt-get purge removed the config"
finish
