#!/bin/bash
# Snapshots and clones: a snapshot freezes a VM's content; clones (of a
# snapshot, or of a live VM through an implicit snapshot) start identical and
# then diverge independently; everything survives a remount; `vm rm` refuses
# an open VM, and removing a VM deletes exactly the layers nothing else uses.
. "$(dirname "$0")/lib.sh"

M=$T/mnt
S=$T/state
mkdir -p "$S"
SIZE=$((8 * 1048576 + 5000))
make_image "$T/img.raw" $SIZE
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name s > /dev/null
mount_imgfs "$T/repo" "$M" "state=$S"

# put OFFSET LEN SEED FILE...: writes the same LEN pseudo-random bytes at
# OFFSET into every FILE (VM disks and their shadow copies).
# Layers in the state directory (one ID.log each; see layer.h).
layer_files() { find "$S/layers" -type f -name '*.log' | wc -l; }
# refuse PATTERN WHAT CMD...: like expect_error, and the one-line message
# must match PATTERN (it says why).
refuse() {
    local pattern=$1 what=$2
    shift 2
    local err=$T/refuse.err status=0
    timeout 120 "$@" > /dev/null 2> "$err" || status=$?
    [ "$status" -eq 0 ] && fail "$what: succeeded but should have failed"
    [ "$status" -eq 124 ] && fail "$what: hung (timeout)"
    grep -qiE 'segmentation|sanitizer|abort|core dumped' "$err" && { cat "$err" >&2; fail "$what: crashed"; }
    [ "$(wc -l < "$err")" -eq 1 ] || { cat "$err" >&2; fail "$what: expected one line on stderr"; }
    grep -qiE "$pattern" "$err" || { cat "$err" >&2; fail "$what: the message does not say /$pattern/"; }
    ok "$what -> $(cat "$err")"
}

V=$M/vms
"$IMGFSCTL" vm create "$M" a --base s
cp "$T/img.raw" "$T/sh.a"
put 100 5000 1 "$V/a.raw" "$T/sh.a"
put $((3 * 131072 - 7)) 300000 2 "$V/a.raw" "$T/sh.a"
put $((SIZE - 3000)) 3000 3 "$V/a.raw" "$T/sh.a"

# --- snapshots freeze content ------------------------------------------------------
cp "$T/sh.a" "$T/frozen.s1"
"$IMGFSCTL" vm snapshot "$M" a s1
[ -f "$V/a@s1.raw" ] || fail "no $V/a@s1.raw after the snapshot"
# Overwrite some of the same bytes, and new ones.
put 2000 10000 4 "$V/a.raw" "$T/sh.a"
put $((3 * 131072 + 100)) 4096 5 "$V/a.raw" "$T/sh.a"
put $((5 * 1048576 + 1)) 200000 6 "$V/a.raw" "$T/sh.a"
drop_caches
same "$V/a@s1.raw" "$T/frozen.s1" "snapshot s1 changed when its VM was written"
same "$V/a.raw" "$T/sh.a" "VM a does not show its writes after a snapshot"
ok "a snapshot keeps the content of the moment it was taken; the VM goes on"

cp "$T/sh.a" "$T/frozen.s2"
"$IMGFSCTL" vm snapshot "$M" a s2
put 0 70000 7 "$V/a.raw" "$T/sh.a"
put $((SIZE - 1)) 1 8 "$V/a.raw" "$T/sh.a"
drop_caches
same "$V/a@s1.raw" "$T/frozen.s1" "snapshot s1 changed after a second snapshot"
same "$V/a@s2.raw" "$T/frozen.s2" "snapshot s2 changed when its VM was written"
same "$V/a.raw" "$T/sh.a" "VM a wrong after two snapshots"
[ "$(stat_value "$M" "vm a" snapshots)" -eq 2 ] || fail "[vm a] snapshots is not 2"
[ "$(stat -c %s "$V/a@s2.raw")" -eq $SIZE ] || fail "a snapshot does not have the disk's size"
ok "two snapshots, each frozen; [vm a] snapshots = 2"

expect_error "writing into a snapshot" dd if=/dev/zero of="$V/a@s1.raw" bs=1 count=1 conv=notrunc status=none
expect_error "snapshot name already used" "$IMGFSCTL" vm snapshot "$M" a s1
expect_error "clone of a snapshot that does not exist" "$IMGFSCTL" vm clone "$M" a@nosuch z
[ ! -e "$V/z.raw" ] || fail "a failed clone left a VM behind"

# --- clones ----------------------------------------------------------------------
"$IMGFSCTL" vm clone "$M" a@s1 c1
same "$V/c1.raw" "$T/frozen.s1" "a clone of a@s1 does not start as s1"
cp "$T/frozen.s1" "$T/sh.c1"
"$IMGFSCTL" vm clone "$M" a c2
same "$V/c2.raw" "$T/sh.a" "a clone of the live VM a does not start as a"
cp "$T/sh.a" "$T/sh.c2"
[ "$(stat_value "$M" "vm a" snapshots)" -eq 3 ] || fail "cloning live VM a did not add an implicit snapshot"
implicit=$(ls "$V" | grep '^a@' | grep -v -e '^a@s1.raw$' -e '^a@s2.raw$')
[ -n "$implicit" ] || fail "the implicit snapshot of a is not listed in vms/"
same "$V/$implicit" "$T/sh.a" "the implicit snapshot $implicit is not a's state at clone time"
ok "clones of a snapshot and of the live VM (implicit snapshot $implicit) start identical"

# Diverge: the same ranges get different bytes in each disk.
put 1000 50000 10 "$V/c1.raw" "$T/sh.c1"
put 1000 50000 11 "$V/c2.raw" "$T/sh.c2"
put 1000 50000 12 "$V/a.raw" "$T/sh.a"
put $((4 * 1048576 - 3)) 131072 13 "$V/c2.raw" "$T/sh.c2"
put $((SIZE - 4096)) 4096 14 "$V/c1.raw" "$T/sh.c1"
"$IMGFSCTL" vm clone "$M" c1 c3 # a clone of a clone
cp "$T/sh.c1" "$T/sh.c3"
put 7000 9000 15 "$V/c3.raw" "$T/sh.c3"
put 7000 9000 16 "$V/c1.raw" "$T/sh.c1"
drop_caches
check_all() { # check_all WHEN
    same "$V/a.raw" "$T/sh.a" "VM a wrong $1"
    same "$V/a@s1.raw" "$T/frozen.s1" "snapshot a@s1 wrong $1"
    same "$V/a@s2.raw" "$T/frozen.s2" "snapshot a@s2 wrong $1"
    for c in c1 c2 c3; do same "$V/$c.raw" "$T/sh.$c" "clone $c wrong $1"; done
}
check_all "after the clones diverged"
! cmp -s "$V/c1.raw" "$V/c2.raw" || fail "clones c1 and c2 did not diverge"
cmp "$M/bases/s.raw" "$T/img.raw" || fail "the base changed"
ok "a, c1, c2 and c3 (a clone of a clone) diverge independently; snapshots and base unchanged"

# --- remount -------------------------------------------------------------------
umount_imgfs "$M"
drop_caches
mount_imgfs "$T/repo" "$M" "state=$S"
check_all "after a remount"
[ "$(stat_value "$M" vms load_errors)" = none ] || fail "load errors after remount"
[ -f "$V/$implicit" ] || fail "implicit snapshot $implicit is gone after remount"
ok "all VMs, snapshots and clones survive a remount"

# --- snapshots taken while the VM is being written ----------------------------------
# No write may be lost or land in a frozen layer when the chain switches.
"$IMGFSCTL" vm create "$M" busy --base s
cp "$T/img.raw" "$T/sh.busy"
"$TOOLS/vmstress" "$V/busy.raw" "$T/sh.busy" 5 300 --fsync-every 40 > "$T/busy.out" 2>&1 &
writer=$!
for i in $(seq 1 10); do "$IMGFSCTL" vm snapshot "$M" busy "b$i"; done
wait $writer || { cat "$T/busy.out"; fail "writes racing with snapshots were lost or misplaced"; }
[ "$(stat_value "$M" "vm busy" layers)" -eq 11 ] || fail "[vm busy] layers is not 11 after 10 snapshots"
for i in $(seq 1 10); do
    [ "$(cat "$V/busy@b$i.raw" | wc -c)" -eq $SIZE ] || fail "snapshot busy@b$i does not read whole"
done
cp "$V/busy@b5.raw" "$T/busy.b5"
umount_imgfs "$M"
drop_caches
mount_imgfs "$T/repo" "$M" "state=$S"
"$TOOLS/vmstress" --verify "$V/busy.raw" "$T/sh.busy" > "$T/busy.out" 2>&1 ||
    { cat "$T/busy.out"; fail "VM busy wrong after remount"; }
same "$V/busy@b5.raw" "$T/busy.b5" "snapshot busy@b5 changed across a remount"
ok "10 snapshots while 300 random writes ran: the VM has every write, snapshots read whole"
"$IMGFSCTL" vm rm "$M" busy
[ "$(layer_files)" -eq 8 ] || fail "removing busy (11 unshared layers) left $(layer_files) layer files, expected 8"

# --- vm rm -----------------------------------------------------------------------
# a: [A0 A1 A2 A3], snapshots s1 [A0], s2 [A0 A1], implicit [A0 A1 A2];
# c1: [A0 C1 C1'] and its implicit snapshot [A0 C1]; c2: [A0 A1 A2 C2];
# c3: [A0 C1 C3]. 8 layers, 2 files each.
[ "$(layer_files)" -eq 8 ] || fail "expected 8 layer files, found $(layer_files): $(ls "$S/layers")"

exec 3<> "$V/c1.raw"
[ "$(stat_value "$M" "vm c1" open)" -ge 1 ] || fail "[vm c1] open does not count an open descriptor"
refuse 'open|busy|in use' "vm rm of a VM open read-write" "$IMGFSCTL" vm rm "$M" c1
exec 3>&-
# A VM closed by the shell is removable at once.
"$IMGFSCTL" vm create "$M" t --size 1M
exec 3<> "$V/t.raw"
refuse 'open|busy|in use' "vm rm of a blank VM held open" "$IMGFSCTL" vm rm "$M" t
exec 3>&-
"$IMGFSCTL" vm rm "$M" t || fail "vm rm right after the VM was closed failed"
[ ! -e "$V/t.raw" ] || fail "removed VM t still listed"
[ "$(layer_files)" -eq 8 ] || fail "removing VM t left $(layer_files) layer files, expected 8"
sleep 1000 < "$V/a@s2.raw" &
holder=$!
refuse 'open|busy|in use' "vm rm of a VM whose snapshot is open" "$IMGFSCTL" vm rm "$M" a
[ -f "$S/vms/a.vm" ] && [ "$(layer_files)" -eq 8 ] || fail "a refused vm rm changed the state directory"
same "$V/a.raw" "$T/sh.a" "VM a changed by a refused vm rm"
kill $holder
wait $holder 2>/dev/null || true
# Closing is asynchronous in FUSE (RELEASE); [vm a] open shows when it landed.
wait_stat "$M" "vm a" open 0

"$IMGFSCTL" vm rm "$M" a || fail "vm rm of a closed VM failed"
[ ! -e "$V/a.raw" ] && [ ! -e "$V/a@s1.raw" ] && [ ! -e "$V/$implicit" ] || fail "a's files still shown after vm rm"
[ ! -e "$S/vms/a.vm" ] || fail "a's VM file is still in the state directory"
! grep -q '^\[vm a\]' "$M/.imgfs/stats" || fail "a still in stats after vm rm"
# Only A3 (a's own top layer) was referenced by nothing else.
[ "$(layer_files)" -eq 7 ] || fail "after rm a: expected 7 layer files (only a's top layer deleted), found $(layer_files)"
drop_caches
for c in c1 c2 c3; do same "$V/$c.raw" "$T/sh.$c" "clone $c wrong after its source VM was removed"; done
ok "vm rm a: its unshared top layer deleted, layers used by clones kept, clones read right"

"$IMGFSCTL" vm rm "$M" c2
# A1, A2 (only c2 still used them) and C2.
[ "$(layer_files)" -eq 4 ] || fail "after rm c2: expected 4 layer files, found $(layer_files)"
"$IMGFSCTL" vm rm "$M" c1
# Only C1' : A0 and C1 are still c3's.
[ "$(layer_files)" -eq 3 ] || fail "after rm c1: expected 3 layer files, found $(layer_files)"
drop_caches
same "$V/c3.raw" "$T/sh.c3" "clone c3 wrong after c1 and c2 were removed"
[ "$(stat_value "$M" "vm c3" layers)" -eq 3 ] || fail "[vm c3] layers is not 3"
ok "removing c2 and c1 deletes exactly their unshared layers; c3 still reads right"
expect_error "vm rm of a VM that no longer exists" "$IMGFSCTL" vm rm "$M" c1

# A new VM under a removed name starts from the base, not from old data.
"$IMGFSCTL" vm create "$M" a --base s
drop_caches
same "$V/a.raw" "$T/img.raw" "a re-created VM a shows data of the removed one"
ok "a VM re-created under a removed name reads as its base"

umount_imgfs "$M"
drop_caches
mount_imgfs "$T/repo" "$M" "state=$S"
same "$V/c3.raw" "$T/sh.c3" "clone c3 wrong after remount"
same "$V/a.raw" "$T/img.raw" "re-created a wrong after remount"
for gone in c1 c2 a@s1 "$implicit"; do [ ! -e "$V/${gone%.raw}.raw" ] || fail "removed $gone is back after remount"; done
[ "$(layer_files)" -eq 4 ] || fail "expected 4 layer files after remount (c3's 3 + new a's 1), found $(layer_files)"
[ "$(stat_value "$M" vms load_errors)" = none ] || fail "load errors after remount"
ok "removals survive a remount"

# Cloning a live VM again under the name of a removed clone must work (the
# implicit snapshot of the first clone still exists on a).
"$IMGFSCTL" vm clone "$M" a x
"$IMGFSCTL" vm rm "$M" x
"$IMGFSCTL" vm clone "$M" a x 2> "$T/reclone.err" ||
    fail "re-cloning live VM a to the name of a removed clone fails: $(cat "$T/reclone.err")"
same "$V/x.raw" "$T/img.raw" "re-clone x is not a's content"
ok "a live VM can be cloned again under the name of a removed clone"
"$IMGFSCTL" vm rm "$M" x
"$IMGFSCTL" vm rm "$M" c3
"$IMGFSCTL" vm rm "$M" a
[ "$(layer_files)" -eq 0 ] || fail "layer files left after every VM was removed: $(ls "$S/layers")"
[ -z "$(ls "$S/vms")" ] || fail "VM files left after every VM was removed: $(ls "$S/vms")"
ok "removing every VM leaves no layer files"
umount_imgfs "$M"
finish
