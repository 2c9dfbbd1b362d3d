#!/bin/bash
# Pre-copy inside a maintenance window: imgfsctl precopy --window starts
# nothing outside the window, and at its end has the daemon stop the copy,
# keeping the pin, and exits 0; the next run resumes where it stopped. The
# timer's script packaging/imgfs-precopy runs the entries of a list with its
# rate= and window= lines.
. "$(dirname "$0")/lib.sh"
SRC=${IMGFS_SOURCE_DIR:?}

head -c 24M /dev/urandom > "$T/img.raw"
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name win --level 0 > /dev/null
mount_imgfs "$T/repo" "$T/mnt"
total=$(stat_value "$T/mnt" "base win@1" chunks_total)

# A window that ended a minute ago (and began an hour before): nothing starts.
outside="$(date -d '-61 min' +%H:%M)-$(date -d '-1 min' +%H:%M)"
"$IMGFSCTL" precopy "$T/mnt" win --rate 4M --window "$outside" > "$T/out" || fail "precopy outside its window failed"
grep -q "outside the window $outside, nothing done" "$T/out" || { cat "$T/out"; fail "precopy ran outside its window"; }
[ "$(stat_value "$T/mnt" cache pinned_bytes)" = 0 ] || fail "something was pinned outside the window"
ok "outside the window ($outside) nothing starts"

# A window that ends in 2 seconds, at 4 MiB/s: the copy stops part-way.
window="$(date -d '-1 min' +%H:%M:%S)-$(date -d '+2 sec' +%H:%M:%S)"
"$IMGFSCTL" precopy "$T/mnt" win --rate 4M --window "$window" > "$T/out" || { cat "$T/out"; fail "precopy with a window failed"; }
cat "$T/out"
grep -q "stopped, [0-9]*/$total chunks, .*(the window ended; run again to resume)" "$T/out" ||
    fail "the copy did not stop at the window's end"
resident=$(stat_value "$T/mnt" "base win@1" chunks_resident)
[ "${resident%/*}" -gt 0 ] && [ "${resident%/*}" -lt "$total" ] || fail "after the window $resident chunks are resident"
[ "$(stat_value "$T/mnt" cache pinned_bytes)" -gt 0 ] || fail "the pin was dropped at the window's end"
sleep 1 # the daemon's copy has been told to stop: nothing more arrives
[ "$(stat_value "$T/mnt" "base win@1" chunks_resident)" = "$resident" ] || fail "the copy went on after the window"
ok "the window's end stops the daemon's copy at $resident chunks and keeps the pin"

# The timer's script: rate= and window= lines, then the entry; it resumes.
cat > "$T/precopy.list" <<EOT
# test list
rate=200M
window=$(date -d '-1 min' +%H:%M)-$(date -d '+30 min' +%H:%M)
$T/mnt win
EOT
IMGFSCTL=$IMGFSCTL bash "$SRC/packaging/imgfs-precopy" "$T/precopy.list" > "$T/out" 2>&1 || { cat "$T/out"; fail "imgfs-precopy failed"; }
grep -q "pre-copy of win@1: done, $total/$total chunks" "$T/out" || { cat "$T/out"; fail "the script did not finish the copy"; }
[ "$(stat_value "$T/mnt" "base win@1" chunks_resident)" = "$total/$total" ] || fail "not every chunk is resident"
ok "imgfs-precopy resumed and finished the listed base"

echo "$T/mnt win boot extra" > "$T/bad.list"
status=0
IMGFSCTL=$IMGFSCTL bash "$SRC/packaging/imgfs-precopy" "$T/bad.list" 2> "$T/err" || status=$?
[ "$status" = 1 ] && grep -q "line 1: expected MOUNTPOINT" "$T/err" || fail "a malformed list line is not reported"
expect_error "precopy with a malformed window" "$IMGFSCTL" precopy "$T/mnt" win --window 25:00-26:00
ok "malformed list lines and windows are refused"
umount_imgfs "$T/mnt"
finish
