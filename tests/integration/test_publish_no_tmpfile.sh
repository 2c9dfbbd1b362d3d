#!/bin/bash
# A publish stores each chunk as an unnamed file (O_TMPFILE) that it links
# into place through /proc/self/fd. Where it cannot (here an empty tmpfs
# mounted over the process's own /proc/PID/fd, in a private mount
# namespace; exec keeps the PID), it falls back to a temp name and a rename:
# the repository must hold exactly the chunk files of a normal publish, with
# no temp file left behind, and read back as the image.
. "$(dirname "$0")/lib.sh"
command -v unshare > /dev/null || fail "unshare (util-linux) is needed"

make_image "$T/img.raw" $((5 * 1048576 + 8192))
unshare -m sh -c "mount -t tmpfs none /proc/\$\$/fd && [ -z \"\$(ls /proc/\$\$/fd)\" ] &&
    exec '$IMGFSCTL' publish '$T/img.raw' '$T/repo' --name nb --threads 3" > "$T/out" 2>&1 ||
    { cat "$T/out"; fail "publish without /proc/self/fd failed"; }
[ -n "$(ls /proc/self/fd)" ] || fail "/proc/self/fd is hidden outside the namespace too"
"$IMGFSCTL" publish "$T/img.raw" "$T/repo-normal" --name nb > /dev/null
diff -r "$T/repo/chunks" "$T/repo-normal/chunks" > "$T/diff" || { cat "$T/diff"; fail "chunk files differ without /proc/self/fd"; }
[ -z "$(find "$T/repo/chunks" -name '*.tmp.*')" ] || fail "temp files left in the repository"
ok "without /proc/self/fd: $(find "$T/repo/chunks" -type f | wc -l) chunk files, the same as a normal publish, no temp file"

mount_imgfs "$T/repo" "$T/mnt"
same "$T/mnt/bases/nb.raw" "$T/img.raw" "the version published without /proc/self/fd reads back wrong"
ok "it reads back as the image"
umount_imgfs "$T/mnt"
finish
