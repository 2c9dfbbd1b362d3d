#!/bin/bash
# A VM is bound to the exact base version it was created on: a new version of
# the base changes nothing for it; a VM whose base version is gone or
# different is not served (a clear load error instead) while other VMs work,
# and nothing of it is lost. Also: hostile names, missing bases and absurd
# sizes are refused with a clear error.
. "$(dirname "$0")/lib.sh"

M=$T/mnt
S=$T/state
mkdir -p "$S"
# Layers in the state directory (one ID.log each; see layer.h).
layer_files() { find "$S/layers" -type f -name '*.log' | wc -l; }
mnt() { mount_imgfs "$T/repo" "$M" "state=$S,refresh=0.01"; }
base_of() { stat_value "$M" "vm $1" base; }

make_image "$T/os1.raw" $((16 * 1048576))
make_image "$T/os2.raw" $((16 * 1048576 + 8192)) # a new version may have another size
make_image "$T/other.raw" $((4 * 1048576 + 512))
"$IMGFSCTL" publish "$T/os1.raw" "$T/repo" --name os > /dev/null
"$IMGFSCTL" publish "$T/other.raw" "$T/repo" --name other > /dev/null
mnt

# --- a new version of the base does not touch existing VMs -------------------------
"$IMGFSCTL" vm create "$M" vm1 --base os
[ "$(base_of vm1)" = os@1 ] || fail "vm1 is on $(base_of vm1), not os@1"
cp "$T/os1.raw" "$T/sh.vm1"
put 5000 100000 1 "$M/vms/vm1.raw" "$T/sh.vm1"
put $((16 * 1048576 - 777)) 777 2 "$M/vms/vm1.raw" "$T/sh.vm1"
"$IMGFSCTL" vm create "$M" vm3 --base os@1
same "$M/vms/vm3.raw" "$T/os1.raw" "a VM on os@1 does not read as os@1"
"$IMGFSCTL" vm create "$M" ov --base other
cp "$T/other.raw" "$T/sh.ov"
put 100 9000 3 "$M/vms/ov.raw" "$T/sh.ov"
cp "$M/vms/vm1.raw" "$T/vm1.before"

"$IMGFSCTL" publish "$T/os2.raw" "$T/repo" --name os > /dev/null
ls "$M/bases" > /dev/null
[ "$(readlink "$M/bases/os.raw")" = os@2.raw ] || fail "bases/os.raw points to $(readlink "$M/bases/os.raw") after publishing os@2"
drop_caches
same "$M/bases/os.raw" "$T/os2.raw" "bases/os.raw does not read as the new version"
same "$M/vms/vm1.raw" "$T/vm1.before" "publishing os@2 changed VM vm1"
same "$M/vms/vm1.raw" "$T/sh.vm1" "vm1 no longer reads os@1 plus its own writes"
same "$M/vms/vm3.raw" "$T/os1.raw" "vm3 no longer reads os@1 after os@2 was published"
[ "$(stat -c %s "$M/vms/vm1.raw")" -eq $((16 * 1048576)) ] || fail "vm1 changed size with the new base version"
[ "$(base_of vm1)" = os@1 ] || fail "vm1 moved to $(base_of vm1)"
ok "publishing os@2 leaves VMs on os@1 as they were; bases/os.raw -> os@2.raw"

"$IMGFSCTL" vm create "$M" vm2 --base os
[ "$(base_of vm2)" = os@2 ] || fail "a VM created on 'os' without a version is on $(base_of vm2), not the newest"
same "$M/vms/vm2.raw" "$T/os2.raw" "a VM on the newest version does not read as os@2"
cp "$T/os2.raw" "$T/sh.vm2"
put 0 4096 4 "$M/vms/vm2.raw" "$T/sh.vm2"
ok "vm create --base os uses the newest version (os@2, $(stat -c %s "$M/vms/vm2.raw") bytes)"

# --- creation time (information only) ---------------------------------------------
total=0
for i in $(seq 1 20); do
    t0=$(date +%s%N)
    "$IMGFSCTL" vm create "$M" "t$i" --base os
    t1=$(date +%s%N)
    total=$((total + t1 - t0))
done
echo "    vm create: average $((total / 20 / 1000)) us over 20 creations (information, not a check)"
for i in $(seq 1 20); do "$IMGFSCTL" vm rm "$M" "t$i"; done
[ -z "$(ls "$M/vms" | grep '^t[0-9]')" ] || fail "timing VMs left behind"

# --- bad input ---------------------------------------------------------------------
before_vms=$(ls "$S/vms" | sort | tr '\n' ' ')
before_layers=$(layer_files)
for name in "../x" "a/b" "" "a b" "." ".." ".hidden" "-x" "x/../../y" $'a\tb' $'a\nb' "é" \
    "$(printf 'n%.0s' $(seq 1 65))" "x*" "vm1;rm"; do
    expect_error "vm create with the name '$name'" "$IMGFSCTL" vm create "$M" "$name" --base os
done
expect_error "vm create on a base that does not exist" "$IMGFSCTL" vm create "$M" n1 --base nosuch
expect_error "vm create on a version that does not exist" "$IMGFSCTL" vm create "$M" n1 --base os@99
expect_error "vm create on version 0" "$IMGFSCTL" vm create "$M" n1 --base os@0
expect_error "vm create on a hostile base name" "$IMGFSCTL" vm create "$M" n1 --base ../os
expect_error "vm create on a malformed version" "$IMGFSCTL" vm create "$M" n1 --base os@x
for size in 0 3 1000 2P 16E -1 abc "" 1x 18446744073709551616; do
    expect_error "vm create --size '$size'" "$IMGFSCTL" vm create "$M" n1 --size "$size"
done
expect_error "vm create with neither --base nor --size" "$IMGFSCTL" vm create "$M" n1
expect_error "vm create with a name that exists" "$IMGFSCTL" vm create "$M" vm1 --base other
expect_error "vm create --size with a name that exists" "$IMGFSCTL" vm create "$M" vm2 --size 1M
expect_error "vm snapshot of a VM that does not exist" "$IMGFSCTL" vm snapshot "$M" nosuch s1
for snap in "../s" "a/b" "" "a b" ".."; do
    expect_error "vm snapshot with the name '$snap'" "$IMGFSCTL" vm snapshot "$M" vm1 "$snap"
done
expect_error "vm clone to a name that exists" "$IMGFSCTL" vm clone "$M" vm2 ov
expect_error "vm clone to a hostile name" "$IMGFSCTL" vm clone "$M" vm2 ../c
expect_error "vm clone of a VM that does not exist" "$IMGFSCTL" vm clone "$M" nosuch c1
expect_error "vm clone of a hostile source" "$IMGFSCTL" vm clone "$M" ../vm2 c1
expect_error "vm rm of a hostile name" "$IMGFSCTL" vm rm "$M" ../vm1
expect_error "vm on a directory that is not a mount" "$IMGFSCTL" vm create "$T" n1 --size 1M
mountpoint -q "$M" || fail "the daemon died on bad input"
[ "$(ls "$S/vms" | sort | tr '\n' ' ')" = "$before_vms" ] || fail "bad input changed the VM files: $(ls "$S/vms")"
[ "$(layer_files)" -eq "$before_layers" ] || fail "bad input left layer files ($(layer_files), was $before_layers)"
[ "$(stat_value "$M" "vm vm1" snapshots)" -eq 0 ] || fail "a refused snapshot was recorded"
[ "$(stat_value "$M" "vm vm2" snapshots)" -eq 0 ] || fail "a refused clone left an implicit snapshot on vm2"
[ -z "$(find "$T" -name '*.vm' -not -path "$S/vms/*")" ] || fail "a .vm file was created outside $S/vms"
ls "$M/vms" | sort > "$T/vms.list"
[ "$(cat "$T/vms.list" | tr '\n' ' ')" = "ov.raw vm1.raw vm2.raw vm3.raw " ] || fail "vms/ holds $(cat "$T/vms.list")"
ok "all bad input refused; no file created, the daemon still up"
same "$M/vms/vm1.raw" "$T/sh.vm1" "vm1 changed by refused commands"

umount_imgfs "$M"
cp -a "$S" "$T/state.saved" # each scenario below starts from this state
cp "$T/sh.ov" "$T/sh.ov.saved"
layers_saved=$(layer_files)

# --- the base version is gone ---------------------------------------------------------
# The repository loses os@1, and this host has no kept copy of its manifest.
mv "$T/repo/bases/os/1.manifest" "$T/os1.manifest"
rm -f "$T/cache/meta/os@1.manifest"
mnt
[ ! -e "$M/vms/vm1.raw" ] && [ ! -e "$M/vms/vm3.raw" ] || fail "VMs on a base version that is gone are served"
errors=$(grep '^load_errors' "$M/.imgfs/stats")
echo "$errors" | grep -q 'vm1' && echo "$errors" | grep -q 'vm3' && echo "$errors" | grep -q 'os@1' ||
    fail "[vms] load_errors does not name vm1, vm3 and os@1: $errors"
grep -q 'vm1.*os@1' "${DAEMON_LOG[$M]}" || fail "the daemon log does not report vm1's missing base"
! grep -q '^\[vm vm1\]' "$M/.imgfs/stats" || fail "vm1 still in stats"
same "$M/vms/vm2.raw" "$T/sh.vm2" "vm2 (on os@2) wrong while os@1 is gone"
same "$M/vms/ov.raw" "$T/sh.ov" "ov (on other) wrong while os@1 is gone"
put 20000 5000 5 "$M/vms/ov.raw" "$T/sh.ov"
same "$M/vms/ov.raw" "$T/sh.ov" "ov does not take writes while os@1 is gone"
ok "os@1 gone: vm1 and vm3 absent, clear load error ($(echo "$errors" | cut -c1-100)...); vm2 and ov work"
umount_imgfs "$M"
layers_after_gone=$(layer_files)
rm -rf "$S" && cp -a "$T/state.saved" "$S"
cp "$T/sh.ov.saved" "$T/sh.ov"

# --- the base version is different -------------------------------------------------
# os@1 now names another image: a manifest published elsewhere under the same
# name and version replaces the original, with its chunks.
make_image "$T/os1.other" $((16 * 1048576))
"$IMGFSCTL" publish "$T/os1.other" "$T/repo.other" --name os > /dev/null
cp "$T/repo.other/bases/os/1.manifest" "$T/repo/bases/os/1.manifest"
cp -rn "$T/repo.other/chunks/." "$T/repo/chunks/"
rm -f "$T/cache/meta/os@1.manifest"
mnt
same "$M/bases/os@1.raw" "$T/os1.other" "the replaced os@1 is not served as the repository has it"
[ ! -e "$M/vms/vm1.raw" ] && [ ! -e "$M/vms/vm3.raw" ] || fail "VMs on a base version that changed are served"
errors=$(grep '^load_errors' "$M/.imgfs/stats")
echo "$errors" | grep -q 'vm1' && echo "$errors" | grep -q 'vm3' && echo "$errors" | grep -q 'os@1' ||
    fail "[vms] load_errors does not name vm1, vm3 and os@1: $errors"
echo "$errors" | grep -qiE 'differ|not the one|mismatch' || fail "the load error does not say the base differs: $errors"
grep -q 'vm1.*os@1' "${DAEMON_LOG[$M]}" || fail "the daemon log does not report vm1's changed base"
same "$M/vms/vm2.raw" "$T/sh.vm2" "vm2 (on os@2) wrong while os@1 is different"
ok "os@1 different: vm1 and vm3 absent, clear load error; vm2 works"
umount_imgfs "$M"
layers_after_diff=$(layer_files)
# Back to the original os@1 (the kept copy of the impostor's manifest goes too).
mv "$T/os1.manifest" "$T/repo/bases/os/1.manifest"
rm -f "$T/cache/meta/os@1.manifest"

# --- nothing of an unloaded VM is lost -------------------------------------------------
[ "$layers_after_diff" -eq "$layers_saved" ] ||
    fail "mounting while os@1 differed deleted layer files of the VMs that could not load ($layers_saved -> $layers_after_diff)"
[ "$layers_after_gone" -eq "$layers_saved" ] ||
    fail "mounting while os@1 was gone deleted layer files of the VMs that could not load ($layers_saved -> $layers_after_gone)"
ok "the layers of VMs that could not load are kept"

# While vm1 cannot load, its name is not free: creating or importing a VM
# under it would replace vm1's VM file.
mv "$T/repo/bases/os/1.manifest" "$T/os1.manifest"
rm -f "$T/cache/meta/os@1.manifest"
mnt
[ ! -e "$M/vms/vm1.raw" ] || fail "vm1 served while os@1 is gone"
status=0
"$IMGFSCTL" vm create "$M" vm1 --base other 2> "$T/create.err" || status=$?
[ "$status" -ne 0 ] ||
    fail "vm create vm1 succeeded while vm1 exists but could not load; its VM file was replaced"
ok "the name of a VM that could not load is refused: $(cat "$T/create.err")"
umount_imgfs "$M"
mv "$T/os1.manifest" "$T/repo/bases/os/1.manifest"
rm -f "$T/cache/meta/os@1.manifest"

# --- with the base back, the VMs are back, whole ------------------------------------------
mnt
[ "$(stat_value "$M" vms load_errors)" = none ] || fail "load errors with os@1 back: $(grep load_errors "$M/.imgfs/stats")"
drop_caches
same "$M/vms/vm1.raw" "$T/sh.vm1" "vm1 lost data while its base was gone"
same "$M/vms/vm3.raw" "$T/os1.raw" "vm3 wrong after its base came back"
same "$M/vms/vm2.raw" "$T/sh.vm2" "vm2 wrong after os@1 came back"
ok "os@1 back: vm1 and vm3 are served again with all their data"
umount_imgfs "$M"

# --- a VM that cannot load can still be removed ----------------------------------------
# vm rm of vm3 while os@1 is gone: its VM file and its own layer go; vm1's
# layers stay, and vm1 comes back whole with its base.
vm3_layers=$(awk '$1 == "live" { for (i = 2; i <= NF; i++) print $i }' "$S/vms/vm3.vm")
[ -n "$vm3_layers" ] || fail "cannot read vm3's layers from its VM file"
mv "$T/repo/bases/os/1.manifest" "$T/os1.manifest"
rm -f "$T/cache/meta/os@1.manifest"
mnt
layers_before=$(layer_files)
"$IMGFSCTL" vm rm "$M" vm3 || fail "vm rm of vm3, which could not load, failed"
[ ! -e "$S/vms/vm3.vm" ] || fail "vm rm left vm3's VM file"
for id in $vm3_layers; do
    [ ! -e "$S/layers/$id.data" ] || fail "vm rm left vm3's layer $id"
done
[ "$(layer_files)" -eq $((layers_before - $(echo "$vm3_layers" | wc -w))) ] ||
    fail "vm rm of vm3 removed other layers too ($layers_before -> $(layer_files) files)"
errors=$(grep "^load_errors" "$M/.imgfs/stats")
! echo "$errors" | grep -q 'vm3' || fail "load_errors still names the removed vm3: $errors"
echo "$errors" | grep -q 'vm1' || fail "load_errors no longer names vm1: $errors"
expect_error "vm rm of vm3 again" "$IMGFSCTL" vm rm "$M" vm3
umount_imgfs "$M"
mv "$T/os1.manifest" "$T/repo/bases/os/1.manifest"
rm -f "$T/cache/meta/os@1.manifest"
mnt
[ ! -e "$M/vms/vm3.raw" ] || fail "vm3 is back after vm rm"
same "$M/vms/vm1.raw" "$T/sh.vm1" "vm1 lost data when vm3 was removed"
ok "vm rm of a VM whose base is gone removes it and only its layers; vm1 intact"
umount_imgfs "$M"
finish
