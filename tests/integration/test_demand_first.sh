#!/bin/bash
# Demand reads go first. nginx serves one chunk slowly (limit_rate 8k: about
# 16 s for 128 KiB). While a guest read waits for that chunk, a pre-copy of
# the same base starts no fetch of its own (unthrottled over loopback it
# would finish in well under a second); when the read is done, the pre-copy
# runs to the end. The check does not depend on how fast anything is: it
# looks at the chunks brought in while the read is still in flight.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

CHUNK=131072
head -c $((64 * CHUNK)) /dev/urandom > "$T/img.raw"
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name d > /dev/null
# The slow chunk: index 7 (the 8th hash after the "chunks" line).
slow=$(awk '/^chunks / { n = NR } n && NR == n + 8 { print; exit }' "$T/repo/bases/d/1.manifest")
[[ $slow =~ ^[0-9a-f]{32}$ ]] || fail "cannot read chunk 7's hash from the manifest"
nginx_start web "$T/repo" "location = /chunks/${slow:0:2}/$slow { limit_rate 8k; }"

mkdir -p "$T/state"
mount_imgfs "${NGINX_URL[web]}" "$T/mnt" "state=$T/state,timeout=120"
dd if="$T/mnt/bases/d@1.raw" of="$T/slow.out" bs=4096 count=1 skip=$((7 * CHUNK / 4096)) iflag=direct \
    status=none &
reader=$!
for _ in $(seq 1 1200); do # the read's request is at nginx (60 s: only a failing run waits that long)
    [ "$(stat_value "$T/mnt" fetch requests)" -ge 1 ] && break
    sleep 0.05
done
[ "$(stat_value "$T/mnt" fetch requests)" -ge 1 ] || fail "the guest read did not start fetching"
"$IMGFSCTL" precopy "$T/mnt" d > "$T/precopy.out" 2>&1 &
copier=$!
sleep 2
kill -0 "$reader" 2>/dev/null || fail "test precondition: the slow read ended within 2 s (nginx limit_rate not applied?)"
resident=$(stat_value "$T/mnt" "base d@1" chunks_resident)
[ "${resident%/*}" -eq 0 ] || fail "pre-copy fetched ${resident%/*} chunks while a guest read was fetching"
ok "while the guest read waits for its chunk, the pre-copy has fetched nothing ($resident resident)"

wait "$reader" || fail "the slow guest read failed"
cmp "$T/slow.out" <(dd if="$T/img.raw" bs=4096 count=1 skip=$((7 * CHUNK / 4096)) status=none) ||
    fail "the slow read returned wrong bytes"
wait "$copier" || fail "pre-copy failed: $(cat "$T/precopy.out")"
grep -q 'done, 64/64 chunks' "$T/precopy.out" || fail "pre-copy did not finish: $(cat "$T/precopy.out")"
cmp "$T/mnt/bases/d@1.raw" "$T/img.raw" || fail "base differs after the pre-copy"
ok "after the read, the pre-copy ran to the end: $(tail -n 1 "$T/precopy.out")"
umount_imgfs "$T/mnt"
finish
