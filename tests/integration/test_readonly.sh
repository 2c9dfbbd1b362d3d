#!/bin/bash
# Base versions are read-only: every way of writing fails with EROFS or
# EACCES and changes nothing.
. "$(dirname "$0")/lib.sh"

make_image "$T/img.raw" 3000000
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name ro > /dev/null
mount_imgfs "$T/repo" "$T/mnt"
F=$T/mnt/bases/ro@1.raw
before=$(xxh128sum < "$F")

writes_fail() {
    local what=$1; shift
    local err="$T/err"
    if "$@" 2>"$err"; then fail "$what succeeded on a base"; fi
    grep -qE 'Read-only file system|Permission denied' "$err" || { cat "$err"; fail "$what: wrong error"; }
    ok "$what fails: $(head -n1 "$err")"
}
writes_fail "dd write" dd if=/dev/zero of="$F" bs=4k count=1 conv=notrunc status=none
writes_fail "append" sh -c "echo x >> '$F'"
writes_fail "truncate" truncate -s 0 "$F"
writes_fail "chmod" chmod 666 "$F"
writes_fail "rm" rm -f "$F"
writes_fail "create in bases/" touch "$T/mnt/bases/new.raw"
writes_fail "mkdir" mkdir "$T/mnt/bases/dir"
writes_fail "rename" mv "$F" "$T/mnt/bases/other.raw"
writes_fail "qemu-io write" qemu-io -f raw -c 'write 0 4k' "$F"
# Python's open for writing checks the errno, not just the message.
python3 - "$F" <<'PY' || fail "open(O_RDWR) did not fail with EROFS/EACCES"
import errno, os, sys
try:
    os.open(sys.argv[1], os.O_RDWR)
except OSError as e:
    sys.exit(0 if e.errno in (errno.EROFS, errno.EACCES) else 1)
sys.exit(1)
PY
ok "open(O_RDWR) fails with EROFS/EACCES"
[ "$(xxh128sum < "$F")" = "$before" ] || fail "base contents changed"
cmp "$F" "$T/img.raw" || fail "base differs from its source"
ok "base unchanged after all write attempts"
umount_imgfs "$T/mnt"
finish
