#!/bin/bash
# Nothing leaks to a local user, and no user file can wedge or trick the
# daemon:
#  - a non-root user cannot read a new VM disk (mode 0600, with allow_other)
#    nor an export file (0600); the VM file and layers in the state
#    directory are 0600 too;
#  - vm import of a FIFO fails at once (imgfsctl refuses it) and does not
#    hold up a vm create run at the same time; an import takes no
#    setuid/setgid bit and no owner from the file;
#  - symlinks planted at the trace output's temp names (the old, predictable
#    ones) are not written through;
#  - a repository password comes from -o credentials=FILE and appears
#    nowhere: not in /proc/mounts, ps, the status files or the log; a URL
#    with a password in it is refused.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
chmod 711 "$T"   # so that user nobody reaches the mount (and nothing else)
mkdir -p "$T/state" "$T/www" "$T/cache"
SIZE=$((2 * 1048576))
head -c $SIZE /dev/urandom > "$T/img.raw"
REPO=$T/www/repo
"$IMGFSCTL" publish "$T/img.raw" "$REPO" --name x > /dev/null
as_nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups sh -c "$1" 2> "$T/as.err"; }

# --- private by default --------------------------------------------------------------
mount_imgfs "$REPO" "$M" "state=$T/state,allow_other"
"$IMGFSCTL" vm create "$M" web --base x > /dev/null
put 0 4096 1 "$M/vms/web.raw"
[ "$(stat -c '%U %a' "$M/vms/web.raw")" = "root 600" ] || fail "new VM disk is $(stat -c '%U %a' "$M/vms/web.raw")"
as_nobody "head -c 1 '$M/vms/web.raw'" && fail "user nobody read a new VM disk"
grep -q 'Permission denied' "$T/as.err" || { cat "$T/as.err"; fail "not EACCES for nobody on a VM disk"; }
as_nobody "head -c 1 '$M/bases/x.raw'" > /dev/null || fail "user nobody cannot read a base (they are public)"
for f in "$T"/state/vms/*.vm "$T"/state/layers/*; do
    [ "$(stat -c %a "$f")" = 600 ] || fail "$f is mode $(stat -c %a "$f"), not 600"
done
mkdir -m 755 "$T/out"
"$IMGFSCTL" vm export "$M" web "$T/out/web.export" > /dev/null
[ "$(stat -c %a "$T/out/web.export")" = 600 ] || fail "export file is mode $(stat -c %a "$T/out/web.export")"
as_nobody "head -c 1 '$T/out/web.export'" && fail "user nobody read an export file"
ok "a new VM disk, its VM file, layers and an export are 0600: user nobody reads none of them"

# --- import takes no setuid bit and no owner ---------------------------------------------
chown nobody:nogroup "$M/vms/web.raw"
chmod 6755 "$M/vms/web.raw"
"$IMGFSCTL" vm export "$M" web "$T/out/suid.export" > /dev/null
grep -aq '^owner 65534 65534 6755$' "$T/out/suid.export" || fail "the export does not carry the owner and mode"
"$IMGFSCTL" vm import "$M" "$T/out/suid.export" --name imported > /dev/null
[ "$(stat -c '%U %a' "$M/vms/imported.raw")" = "root 644" ] ||
    fail "imported disk is $(stat -c '%U %a' "$M/vms/imported.raw"): setuid bits or the owner came from the file"
cmp "$M/vms/imported.raw" "$M/vms/web.raw" || fail "the imported disk differs"
ok "vm import keeps rw bits only: no setuid/setgid bit and no owner from the file"

# --- a FIFO to vm import ------------------------------------------------------------------
mkfifo "$T/fifo"
start=$(date +%s)
timeout 60 "$IMGFSCTL" vm import "$M" "$T/fifo" --name fromfifo > /dev/null 2> "$T/fifo.err" &
import_pid=$!
timeout 60 "$IMGFSCTL" vm create "$M" during --size 16M > /dev/null || fail "vm create beside a FIFO import failed"
status=0
wait $import_pid || status=$?
[ $status -ne 124 ] || fail "vm import of a FIFO hung"
[ $status -ne 0 ] || fail "vm import of a FIFO succeeded"
grep -q 'not a regular file' "$T/fifo.err" || { cat "$T/fifo.err"; fail "the FIFO import does not say why"; }
[ -e "$M/vms/during.raw" ] || fail "the vm create beside the FIFO import did not happen"
[ ! -e "$M/vms/fromfifo.raw" ] || fail "a VM was made from a FIFO"
ok "vm import of a FIFO fails at once ($(head -n 1 "$T/fifo.err")); a vm create beside it works"

# --- symlinks at the trace output's temp names ----------------------------------------------
echo "precious" > "$T/victim"
pid=${DAEMON_PID[$M]}
"$IMGFSCTL" trace start "$M" web
head -c 262144 "$M/vms/web.raw" > /dev/null
# The old code wrote OUTPUT.tmp.TID with O_CREAT|O_TRUNC: plant one for every thread.
for tid in $(ls /proc/$pid/task); do ln -s "$T/victim" "$T/out/boot.list.tmp.$tid"; done
"$IMGFSCTL" trace stop "$M" web --output "$T/out/boot.list" > /dev/null
[ "$(cat "$T/victim")" = precious ] || fail "the trace was written through a planted symlink"
head -n 1 "$T/out/boot.list" | grep -q '^imgfs-list 1' || fail "the trace output is not a list"
[ ! -L "$T/out/boot.list" ] || fail "the trace output is a symlink"
ok "symlinks at the trace output's temp names are not written through"
umount_imgfs "$M"

# --- credentials from a file ------------------------------------------------------------------
PASSWORD=s3cret-$RANDOM$RANDOM
printf 'imgfs:%s\n' "$(openssl passwd -apr1 "$PASSWORD")" > "$T/htpasswd"
nginx_start www "$T/www" "auth_basic \"imgfs\"; auth_basic_user_file $T/htpasswd;"
URL=${NGINX_URL[www]}/repo
HOSTPORT=${URL#http://}; HOSTPORT=${HOSTPORT%%/*}
printf 'machine %s login imgfs password %s\n' "${HOSTPORT%%:*}" "$PASSWORD" > "$T/netrc"
chmod 644 "$T/netrc"
mkdir -p "$T/mnt2" "$T/c2"
expect_error "a credentials file others can read" \
    "$IMGFS" "$URL" "$T/mnt2" -f -o "cache=$T/c2,state=$T/state,insecure,credentials=$T/netrc"
chmod 600 "$T/netrc"
expect_error "a URL with a password in it" \
    "$IMGFS" "http://imgfs:$PASSWORD@$HOSTPORT/repo" "$T/mnt2" -f -o "cache=$T/c2,state=$T/state,insecure"
grep -q "$PASSWORD" "$T"/stderr.* && fail "the refusal of a URL with a password echoes the password"
expect_error "the repository without credentials (401)" \
    "$IMGFS" "$URL" "$T/mnt2" -f -o "cache=$T/c2,state=$T/state,insecure"
grep -q 'access denied (HTTP status 401).*credentials=FILE' "$T"/stderr.* || fail "a 401 is not explained"
mount_imgfs "$URL" "$M" "state=$T/state,insecure,credentials=$T/netrc" "$T/c3"
cmp "$M/bases/x.raw" "$T/img.raw" || fail "the repository does not read with credentials"
cat "$M/.imgfs/stats" "$M/.imgfs/status.json" "$M/.imgfs/metrics" > "$T/status.all" 2>/dev/null ||
    cat "$M/.imgfs/stats" > "$T/status.all"
ps -eo args > "$T/ps.out"
grep -q "credentials=$T/netrc" "$T/ps.out" || fail "the test did not see the daemon in ps; it proves nothing"
for f in /proc/mounts "$T/ps.out" "$T/status.all" "${DAEMON_LOG[$M]}"; do
    grep -q "$PASSWORD" "$f" && fail "the password appears in $f"
done
umount_imgfs "$M"
grep -q "$PASSWORD" "${DAEMON_LOG[$M]}" && fail "the password appears in the log"
ok "-o credentials=FILE works; the password appears in neither /proc/mounts, ps, the status files nor the log"
finish
