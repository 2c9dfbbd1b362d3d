#!/bin/bash
# Boot storm over HTTP: 16 VM disks on one base, 16 readers at once reading
# the same regions (as 16 VMs booting the same image would) through their own
# vms/VMi.raw. Every reader gets the right bytes, and nginx sends each touched
# chunk about once: its chunk bytes sent stay within 5% of the stored size of
# the distinct chunks the regions touch ("once per host").
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

M=$T/mnt
REPO=$T/www/repo
CS=131072
N=16
mkdir -p "$T/www" "$T/state"
SIZE=$((64 * 1048576 + 3 * 4096))
(cd "$T" && make_image img.raw $SIZE) # relative name: the same content every run
"$IMGFSCTL" publish "$T/img.raw" "$REPO" --name b > /dev/null
MANIFEST=$REPO/bases/b/1.manifest
[ "$(awk '$1 == "chunk-size" { print $2 }' "$MANIFEST")" -eq $CS ] || fail "unexpected chunk size"
# Chunk transfers are slowed (2 MiB/s per connection) so that the readers'
# misses on one chunk really overlap while it is in flight.
nginx_start www "$T/www" "location /repo/chunks/ { limit_rate 2m; }"
mount_imgfs "${NGINX_URL[www]}/repo" "$M" "state=$T/state"

for i in $(seq 1 $N); do
    "$IMGFSCTL" vm create "$M" "vm$i" --base b > /dev/null || fail "cannot create vm$i"
done
[ "$(ls "$M/vms" | grep -c '^vm[0-9]*\.raw$')" -eq $N ] || fail "not $N VM disks in vms/"
ok "$N VM disks on base b over HTTP"

# Regions (offset length, bytes, 4 KiB aligned, most not chunk aligned), about
# 7 MiB spread over the disk, including its short last chunk.
REGIONS="0 1048576
$((3 * 1048576 + 5 * 4096)) 655360
$((9 * 1048576 + 100 * 4096)) 1048576
$((17 * 1048576 - 4096)) 8192
$((23 * 1048576 + 7 * 4096)) 1310720
$((31 * 1048576)) 262144
$((40 * 1048576 + 33 * 4096)) 917504
$((47 * 1048576 + 4096)) 524288
$((55 * 1048576 + 9 * 4096)) 786432
$((SIZE - 200 * 4096)) $((200 * 4096))"

read_regions() { # FILE OUT [dd flags]: concatenates the regions of FILE into OUT
    local file=$1 out=$2 flags=${3:-} off len
    : > "$out"
    while read -r off len; do
        dd if="$file" bs=65536 skip="$off" count="$len" iflag=skip_bytes,count_bytes${flags:+,$flags} \
            status=none >> "$out" || return 1
    done <<< "$REGIONS"
}
read_regions "$T/img.raw" "$T/expected"

# The distinct stored chunks the regions touch, and their stored size.
awk '/^chunks / { go = 1; next } go && $1 != "end" { print $1 }' "$MANIFEST" > "$T/hashes"
touched=$(while read -r off len; do
    first=$((off / CS)) last=$(((off + len - 1) / CS))
    sed -n "$((first + 1)),$((last + 1))p" "$T/hashes"
done <<< "$REGIONS" | grep -vx 0 | sort -u)
DISTINCT=$(echo "$touched" | grep -c .)
STORED=0
for h in $touched; do STORED=$((STORED + $(stat -c %s "$REPO/chunks/${h:0:2}/$h"))); done
[ "$DISTINCT" -ge 20 ] || fail "the regions touch only $DISTINCT stored chunks"

sent_before=$(nginx_bytes_sent www /repo/chunks/)
asked_before=$(nginx_requests www /repo/chunks/)
pids=()
for i in $(seq 1 $N); do
    # O_DIRECT: every reader's reads reach imgfs, with no kernel readahead
    # pulling in chunks outside the regions.
    # All start together once $T/go exists.
    timeout 60 bash -c "$(declare -f read_regions); REGIONS='$REGIONS'
        while [ ! -e '$T/go' ]; do sleep 0.01; done
        read_regions \"\$1\" \"\$2\" direct" _ "$M/vms/vm$i.raw" "$T/out.$i" 2> "$T/err.$i" &
    pids+=($!)
done
sleep 0.5
touch "$T/go"
for i in $(seq 1 $N); do
    wait "${pids[$((i - 1))]}" || { cat "$T/err.$i"; fail "reader $i failed or hung"; }
done
for i in $(seq 1 $N); do
    cmp "$T/out.$i" "$T/expected" || fail "reader $i (vm$i) got wrong data"
done
ok "$N concurrent readers of $N VM disks all got the right $(stat -c %s "$T/expected") bytes"

sent=$(($(nginx_bytes_sent www /repo/chunks/) - sent_before))
asked=$(($(nginx_requests www /repo/chunks/) - asked_before))
limit=$((STORED * 105 / 100))
echo "# regions touch $DISTINCT distinct stored chunks, $STORED bytes; nginx sent $sent bytes in $asked chunk requests"
[ "$sent" -ge "$STORED" ] || fail "nginx sent $sent chunk bytes, less than the $STORED touched: the test read from elsewhere"
if [ "$sent" -gt "$limit" ]; then
    echo "# chunks asked for more than once, or outside the regions:"
    awk '$3 ~ "^/repo/chunks/" { n = split($3, p, "/"); print p[n] }' "${NGINX_DIR[www]}/access.log" | sort | uniq -c |
        awk '$1 > 1 { print "#   " $2 " x" $1 }'
    awk '$3 ~ "^/repo/chunks/" { n = split($3, p, "/"); print p[n] }' "${NGINX_DIR[www]}/access.log" | sort -u |
        comm -23 - <(echo "$touched" | sort -u) | sed 's/^/#   not touched: /'
    fail "nginx sent $sent chunk bytes for $STORED bytes of distinct touched chunks (limit $limit): chunks fetched more than once, or ones outside the regions"
fi
ok "nginx sent $sent chunk bytes for $STORED bytes of distinct touched chunks (<= 1.05x)"
[ "$(stat_value "$M" fetch verify_failures)" -eq 0 ] || fail "verify failures during the storm"
[ "$(stat_value "$M" fetch errors)" -eq 0 ] || fail "fetch errors during the storm"
ok "no fetch errors; $(stat_value "$M" fetch requests) fetch requests for $DISTINCT distinct chunks"
umount_imgfs "$M"
nginx_stop www
finish
