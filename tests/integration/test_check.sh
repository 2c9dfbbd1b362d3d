#!/bin/bash
# imgfsctl check says in plain lines what is right and wrong: for a mount
# (the daemon's repository and directories) and for a repository (the
# options, else the config file). A problem is a FAIL line and exit 1.
. "$(dirname "$0")/lib.sh"
export IMGFS_CONFIG=none

make_image "$T/img.raw" 1000000
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name chk > /dev/null
mkdir -p "$T/state"
mount_imgfs "$T/repo" "$T/mnt" "state=$T/state,cache_size=1000T"

"$IMGFSCTL" check "$T/mnt" > "$T/out" || { cat "$T/out"; fail "check of a healthy mount failed"; }
cat "$T/out"
grep -q "^ok    repository  $T/repo is reachable, 1 base" "$T/out" || fail "the mount's repository is not checked"
grep -q "^ok    state       $T/state has .* free" "$T/out" || fail "the mount's state directory is not checked"
grep -q "^warn  cache       $T/cache: cache_size 1000.0 TiB is more than" "$T/out" ||
    fail "a cache_size the disk cannot hold is not reported"
grep -qE "^(ok    |warn  )kernel      $(uname -r): FUSE protocol 7\.[0-9]+" "$T/out" || fail "no FUSE protocol line"
major=$(uname -r | cut -d. -f1) minor=$(uname -r | cut -d. -f2)
if [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 9 ]; }; then
    grep -q "FUSE_NOTIFY_RESEND supported" "$T/out" || fail "kernel $(uname -r) should have FUSE_NOTIFY_RESEND"
fi
grep -q "^ok    trust       the mount checks chunks by hash only" "$T/out" || fail "the mount's trust mode is not reported"
grep -q "^0 problems" "$T/out" || fail "the summary line is missing"
ok "a mount: repository, space, cache_size, kernel protocol and the summary"
grep -q "imgfs-check" /proc/mounts && fail "the kernel probe left its mount behind"
ok "the kernel probe's private mount is gone"

# A repository with options; a trust file that cannot be read is a problem.
status=0
"$IMGFSCTL" check "$T/repo" --cache "$T/cache" --state "$T/state" --trust "$T/no-such-keys" > "$T/out" || status=$?
cat "$T/out"
[ "$status" -eq 1 ] || fail "check with an unreadable trust file exited $status, not 1"
grep -q "^FAIL  trust       cannot read trust file $T/no-such-keys" "$T/out" || fail "no trust FAIL line"
echo "ed25519 0123" > "$T/badkeys"
status=0
"$IMGFSCTL" check "$T/repo" --cache "$T/cache" --state "$T/state" --trust "$T/badkeys" > "$T/out" || status=$?
[ "$status" -eq 1 ] || fail "check with a malformed trust file exited $status, not 1"
grep -q "^FAIL  trust       .*line 1 is not" "$T/out" || { cat "$T/out"; fail "no FAIL line for a malformed trust file"; }
"$IMGFSCTL" key generate "$T/key" > /dev/null
cp "$T/key.pub" "$T/keys"
"$IMGFSCTL" check "$T/repo" --cache "$T/cache" --state "$T/state" --trust "$T/keys" > "$T/out" ||
    { cat "$T/out"; fail "check with a readable trust file failed"; }
grep -q "^ok    trust       the trust file $T/keys holds 1 public key" "$T/out" || fail "no trust ok line"
ok "the trust file: FAIL when unreadable or malformed, ok with a key from imgfsctl key generate"

# The directories of a repository check come from the config file.
printf 'cache=%s\nstate=%s/state\n' "$T/cache" "$T" > "$T/imgfs.conf"
IMGFS_CONFIG=$T/imgfs.conf "$IMGFSCTL" check "$T/repo" > "$T/out" || { cat "$T/out"; fail "check with a config failed"; }
grep -q "^ok    cache       $T/cache has" "$T/out" || fail "the cache directory of the config file is not checked"
grep -q "^ok    config      2 options from $T/imgfs.conf" "$T/out" || fail "the config file is not reported"
ok "a repository check takes its directories from the config file"

# An unreachable repository and a missing directory are problems.
status=0
"$IMGFSCTL" check http://127.0.0.1:9/repo --cache "$T/cache" --state "$T/no-state" > "$T/out" || status=$?
cat "$T/out"
[ "$status" -eq 1 ] || fail "check of an unreachable repository exited $status"
grep -q "^FAIL  repository  " "$T/out" || fail "no repository FAIL line"
grep -q "^FAIL  state       $T/no-state: No such file or directory" "$T/out" || fail "no state FAIL line"
ok "an unreachable repository and a missing state directory are FAIL lines, exit 1"

expect_error "check without arguments" "$IMGFSCTL" check
expect_error "check with an unknown option" "$IMGFSCTL" check "$T/repo" --frobnicate
"$IMGFSCTL" check --help | grep -q "usage: imgfsctl check" || fail "check --help"
umount_imgfs "$T/mnt"
finish
