#!/bin/bash
# The config file layer: imgfs.conf, then imgfs.conf.d/*.conf in name order,
# then -o, each overriding the one before; chosen with -o config= or
# $IMGFS_CONFIG (so no test touches /etc). Any -o option works in a file,
# libfuse's too. Errors name the option, and the file and line it came from.
. "$(dirname "$0")/lib.sh"

make_image "$T/img.raw" 1000000
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name cfg > /dev/null
mkdir -p "$T/mnt" "$T/c1" "$T/c2" "$T/c3" "$T/state" "$T/conf.d"
cat > "$T/conf" <<EOT
# imgfs defaults for this test
cache = $T/c1
state=$T/state
refresh=5
allow_other
EOT
cat > "$T/conf.d/20-late.conf" <<EOT
cache=$T/c2
EOT
cat > "$T/conf.d/10-early.conf" <<EOT
cache=$T/nonexistent
timeout=7
EOT
echo "cache=$T/nonexistent" > "$T/conf.d/30-ignored.conf.off"

# Mounts with only the given options (no cache= from mount_imgfs) and checks
# which cache directory the daemon took.
mount_bare() { # OPTIONS [ENV...]
    local opts=$1; shift
    env "$@" "$IMGFS" "$T/repo" "$T/mnt" -f -o "$opts" 2> "$T/daemon.log" &
    DAEMON_PID[$T/mnt]=$!
    DAEMON_LOG[$T/mnt]=$T/daemon.log
    MOUNTS+=("$T/mnt")
    wait_mounted "$T/mnt"
}

mount_bare "config=$T/conf"
[ "$(stat_value "$T/mnt" cache directory)" = "$T/c2" ] || fail "conf.d/20-late.conf did not override the main file"
[ "$(stat_value "$T/mnt" vms state_directory)" = "$T/state" ] || fail "state= from the file was not used"
grep " $T/mnt fuse.imgfs .*allow_other" /proc/mounts > /dev/null || fail "allow_other from the file did not reach libfuse"
cmp "$T/mnt/bases/cfg.raw" "$T/img.raw" || fail "base differs"
ok "imgfs.conf then conf.d in name order; libfuse options work in the file"
umount_imgfs "$T/mnt"

mount_bare "cache=$T/c3" "IMGFS_CONFIG=$T/conf"
[ "$(stat_value "$T/mnt" cache directory)" = "$T/c3" ] || fail "-o cache= did not override the config files"
ok "\$IMGFS_CONFIG names the file, and -o overrides it"
umount_imgfs "$T/mnt"

# The options of fstab lines for mount(8) and systemd do not upset imgfs.
mount_bare "config=none,cache=$T/c1,state=$T/state,nodev,nosuid,nofail,_netdev,x-systemd.requires=network-online.target"
grep " $T/mnt fuse.imgfs [^ ]*nosuid,nodev" /proc/mounts > /dev/null || fail "nodev,nosuid not applied"
ok "nodev,nosuid apply; nofail, _netdev and x-systemd.* are taken and dropped"
umount_imgfs "$T/mnt"

# Errors name the option, and for a file its path and line.
expect_error "imgfs with an unknown -o option" "$IMGFS" "$T/repo" "$T/mnt" -f -o config=none,cache="$T/c1",frobnicate=2
grep -q "unknown option 'frobnicate'" "$T"/stderr.* || fail "the unknown option is not named"
rm -f "$T"/stderr.*
echo "frobnicate" > "$T/conf.d/40-bad.conf"
expect_error "imgfs with an unknown option in a config file" "$IMGFS" "$T/repo" "$T/mnt" -f -o config="$T/conf"
grep -q "unknown option 'frobnicate' in $T/conf.d/40-bad.conf line 1" "$T"/stderr.* || fail "file and line not named"
rm -f "$T"/stderr.* "$T/conf.d/40-bad.conf"
echo "mirror=http://a,http://b" > "$T/conf.d/40-bad.conf"
expect_error "a config value with a comma" "$IMGFS" "$T/repo" "$T/mnt" -f -o config="$T/conf"
rm -f "$T/conf.d/40-bad.conf"
expect_error "a named config file that is missing" "$IMGFS" "$T/repo" "$T/mnt" -f -o config="$T/missing.conf"
expect_error "imgfsctl publish with an unknown option" "$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name x --frobnicate
grep -q "'--frobnicate'" "$T"/stderr.* || fail "imgfsctl does not name the unknown option"
rm -f "$T"/stderr.*
expect_error "imgfsctl publish with an option lacking its value" "$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name
grep -q "option --name needs a value" "$T"/stderr.* || fail "imgfsctl does not name the option lacking a value"
rm -f "$T"/stderr.*
expect_error "imgfsctl precopy with an unknown option" "$IMGFSCTL" precopy "$T/mnt" cfg --rat 5M
grep -q "'--rat'" "$T"/stderr.* || fail "imgfsctl precopy does not name the unknown option"
mountpoint -q "$T/mnt" && fail "a failed imgfs left a mount behind"

# Relative paths in argv and in a config file still hold when the mount is
# handed to a new server (which runs the same argv after the daemon went to /).
echo "cache=c1" > "$T/rel.conf"
(cd "$T" && "$IMGFS" repo mnt -o config=rel.conf,state=state) || fail "a mount with relative paths failed"
MOUNTS+=("$T/mnt")
"$IMGFSCTL" restart "$T/mnt" > /dev/null || fail "imgfsctl restart of a mount made with relative paths failed"
cmp "$T/mnt/bases/cfg.raw" "$T/img.raw" || fail "the base differs after the restart"
[ "$(stat_value "$T/mnt" cache directory)" = "$T/c1" ] || fail "the new server took another cache directory"
umount "$T/mnt"
ok "relative REPO, MOUNTPOINT, config= and cache= survive imgfsctl restart"
finish
