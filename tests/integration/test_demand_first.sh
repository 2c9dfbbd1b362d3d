#!/bin/bash
# Demand reads go first. nginx takes one chunk from a server that answers
# nothing while $HOLD exists (then it sends it at 8 KiB/s). While a guest
# read waits for that chunk, a pre-copy of the same base starts no fetch of
# its own (unthrottled over loopback it would finish in well under a
# second); when the read is done, the pre-copy runs to the end. The test
# holds the read for as long as it looks (it used to rely on the 16 s that
# limit_rate took, which a stalled machine could use up first), and it looks
# at the chunks brought in while the read is still in flight.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

CHUNK=131072
head -c $((64 * CHUNK)) /dev/urandom > "$T/img.raw"
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name d > /dev/null
# The slow chunk: index 7 (the 8th hash after the "chunks" line).
slow=$(awk '/^chunks / { n = NR } n && NR == n + 8 { print; exit }' "$T/repo/bases/d/1.manifest")
[[ $slow =~ ^[0-9a-f]{32}$ ]] || fail "cannot read chunk 7's hash from the manifest"
HOLD=$T/hold
stall_server_start hold "$T/repo" "$HOLD"
nginx_start web "$T/repo" "location = /chunks/${slow:0:2}/$slow { limit_rate 8k; proxy_pass ${STALL_URL[hold]}; proxy_read_timeout 3600s; }"

mkdir -p "$T/state"
mount_imgfs "${NGINX_URL[web]}" "$T/mnt" "state=$T/state,timeout=3600,stall_timeout=3600"
touch "$HOLD"
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
wait_for "the pre-copy did not start (no pin set)" '[ -e "$T/cache/pins/d@1" ] || ! kill -0 "$copier" 2>/dev/null'
sleep 2 # the pre-copy's chance to fetch, had it not yielded to the read
kill -0 "$reader" 2>/dev/null || fail "the held guest read ended before its chunk could come"
resident=$(stat_value "$T/mnt" "base d@1" chunks_resident)
[ "${resident%/*}" -eq 0 ] || fail "pre-copy fetched ${resident%/*} chunks while a guest read was fetching"
ok "while the guest read waits for its chunk, the pre-copy has fetched nothing ($resident resident)"

rm -f "$HOLD" # the chunk comes, slowly
wait "$reader" || fail "the slow guest read failed"
cmp "$T/slow.out" <(dd if="$T/img.raw" bs=4096 count=1 skip=$((7 * CHUNK / 4096)) status=none) ||
    fail "the slow read returned wrong bytes"
wait "$copier" || fail "pre-copy failed: $(cat "$T/precopy.out")"
grep -q 'done, 64/64 chunks' "$T/precopy.out" || fail "pre-copy did not finish: $(cat "$T/precopy.out")"
cmp "$T/mnt/bases/d@1.raw" "$T/img.raw" || fail "base differs after the pre-copy"
ok "after the read, the pre-copy ran to the end: $(tail -n 1 "$T/precopy.out")"
umount_imgfs "$T/mnt"
finish
