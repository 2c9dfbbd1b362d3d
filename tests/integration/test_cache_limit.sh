#!/bin/bash
# The cache never exceeds -o cache_size: least recently used chunks are
# evicted while 4 VMs read, and nothing wrong is served. A full cache file
# system makes imgfs evict and retry instead of failing the read.
. "$(dirname "$0")/lib.sh"

head -c $((48 * 1048576)) /dev/urandom > "$T/img.raw"
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name b --chunk-size 64K > /dev/null
mkdir -p "$T/state" "$T/cachefs" "$T/small"
# The cache gets a file system of its own, so that its usage can be sampled
# atomically (a find over the files races with evictions).
mount -t tmpfs -o size=64M tmpfs "$T/cachefs"
at_exit 'umount -l "$T/cachefs" "$T/small" 2>/dev/null'
LIMIT=$((8 * 1048576))
mount_imgfs "$T/repo" "$T/mnt" "state=$T/state,cache=$T/cachefs,cache_size=8M"
[ "$(stat_value "$T/mnt" cache limit)" -eq "$LIMIT" ] || fail "stats do not show the cache limit"

# Watch the cache's size on disk while the VMs read.
fs_used() { stat -f -c '%b %f %S' "$T/cachefs" | awk '{print ($1 - $2) * $3}'; }
baseline=$(fs_used)
chunk_bytes() { echo $(($(fs_used) - baseline)); }
(
    max=0
    while [ ! -e "$T/stop" ]; do
        b=$(chunk_bytes)
        [ "$b" -gt "$max" ] && max=$b && echo "$max" > "$T/max"
        sleep 0.02
    done
) &
watcher=$!
readers=()
for i in 1 2 3 4; do
    "$IMGFSCTL" vm create "$T/mnt" "v$i" --base b
    "$TOOLS/randread" "$T/mnt/vms/v$i.raw" "$T/img.raw" 2 150 "$i" > "$T/randread.$i" 2>&1 &
    readers+=($!)
done
cmp "$T/mnt/bases/b.raw" "$T/img.raw" || fail "sequential read under eviction returned wrong data"
for pid in "${readers[@]}"; do wait "$pid" || fail "a VM reader got wrong data under eviction: $(cat "$T"/randread.*)"; done
touch "$T/stop"
wait "$watcher"
ok "4 VMs and a full sequential pass read correct data with an 8 MiB cache for a 48 MiB base"

max=$(cat "$T/max")
used=$(stat_value "$T/mnt" cache bytes)
evictions=$(stat_value "$T/mnt" cache evictions)
[ "$max" -le "$LIMIT" ] || fail "cache files reached $max bytes, over the $LIMIT limit"
[ "$used" -le "$LIMIT" ] || fail "cache reports $used bytes, over the limit"
[ "$evictions" -gt 0 ] || fail "no evictions although the base is 6x the limit"
ok "cache stayed within its limit (max seen $max, now $used of $LIMIT; $evictions evictions)"
umount_imgfs "$T/mnt"

# The index survives a restart: the cache is re-scanned and still capped.
mount_imgfs "$T/repo" "$T/mnt" "state=$T/state,cache=$T/cachefs,cache_size=4M"
[ "$(stat_value "$T/mnt" cache bytes)" -le $((4 * 1048576)) ] || fail "a smaller limit at mount was not enforced"
cmp "$T/mnt/vms/v1.raw" "$T/img.raw" || fail "wrong data after remount with a smaller limit"
ok "remount with a smaller limit evicts down to it and serves correct data"
umount_imgfs "$T/mnt"

# A cache file system that is full: no cap given, the disk itself runs out.
mount -t tmpfs -o size=6M tmpfs "$T/small"
mkdir -p "$T/small/cache"
"$IMGFS" "$T/repo" "$T/mnt" -f -o "cache=$T/small/cache,state=$T/state" 2> "$T/full.log" &
DAEMON_PID[$T/mnt]=$!
DAEMON_LOG[$T/mnt]=$T/full.log
MOUNTS+=("$T/mnt")
wait_mounted "$T/mnt"
cmp "$T/mnt/bases/b.raw" "$T/img.raw" || fail "a full cache file system caused a wrong or failed read"
[ "$(stat_value "$T/mnt" cache evictions)" -gt 0 ] || fail "a full cache file system did not evict"
[ "$(stat_value "$T/mnt" "base b@1" read_errors)" -eq 0 ] || fail "read errors with a full cache file system"
ok "full cache file system: evicted and retried, all 48 MiB read correctly through a 6 MiB tmpfs"
umount_imgfs "$T/mnt"
finish
