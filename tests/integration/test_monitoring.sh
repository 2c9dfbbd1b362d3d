#!/bin/bash
# Monitoring: .imgfs/metrics read by a real Prometheus parser
# (python3-prometheus-client), `imgfsctl status --json` parsed by jq and
# python, the readable summary, status files' sizes in stat, and the
# user.imgfs.* extended attributes listed by getfattr.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

make_image "$T/disk.img" $((8 << 20))
"$IMGFSCTL" publish "$T/disk.img" "$T/www/repo" --name mon --chunk-size 64K > /dev/null
nginx_start www "$T/www"
mkdir -p "$T/state"
# Two mirrors of one repository: the second is never tried while the first works.
mount_imgfs "${NGINX_URL[www]}/repo" "$T/mnt" "state=$T/state,mirror=${NGINX_URL[www]}/repo/"
M=$T/mnt
"$IMGFSCTL" vm create "$M" web1 --base mon > /dev/null
dd if="$M/bases/mon.raw" of=/dev/null bs=1M count=3 status=none
dd if="$M/vms/web1.raw" of=/dev/null bs=1M status=none
printf 'hello' | dd of="$M/vms/web1.raw" bs=4096 seek=10 conv=notrunc status=none
ok "a base and a VM were read"

# Status files report their real size, so read_file()-style readers (open,
# fstat, read st_size bytes) get all of it, and cat agrees.
for f in stats metrics status.json; do
    python3 - "$M/.imgfs/$f" <<'PY' || fail ".imgfs/$f: st_size is not the size of what is read"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
data = os.read(fd, size + 65536)
os.close(fd)
assert size > 100 and len(data) == size, (size, len(data))
PY
    [ "$(stat -c %s "$M/.imgfs/$f")" -gt 100 ] || fail "stat shows .imgfs/$f as empty"
done
[ "$(grep -c . <<<"$("$IMGFSCTL" status "$M")")" -gt 8 ] || fail "imgfsctl status printed (almost) nothing"
ok "status files report their size; imgfsctl status prints a summary"

# One snapshot per open: a status file read in 100-byte pieces, with a VM
# created between two of them, is the text of the open (its fstat size, no
# new VM); the next read shows the VM. A stat that opens nothing shows the
# size of the file's last read, not a fresh rendering (a stat renders no
# status file that was ever read: the LOOKUP and GETATTR of every open
# rendered it twice more), and a read after the stat is fresh again.
cat > "$T/pieces.py" <<'PY'
import os, subprocess, sys
path, imgfsctl, mnt, vm = sys.argv[1:]
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
data = os.read(fd, 100)
subprocess.run([imgfsctl, "vm", "create", mnt, vm, "--base", "mon"], check=True, stdout=subprocess.DEVNULL)
while True:
    piece = os.read(fd, 100)
    if not piece:
        break
    data += piece
assert os.fstat(fd).st_size == size, (os.fstat(fd).st_size, size)
os.close(fd)
assert len(data) == size and vm.encode() not in data, (len(data), size)
with open(path, "rb") as f:
    fresh = f.read()
assert vm.encode() in fresh, path + " does not show the new VM"
subprocess.run([imgfsctl, "vm", "create", mnt, vm + "-2", "--base", "mon"], check=True, stdout=subprocess.DEVNULL)
print(len(fresh))
PY
for f in stats metrics status.json; do
    last=$(python3 "$T/pieces.py" "$M/.imgfs/$f" "$IMGFSCTL" "$M" "piece-$f") ||
        fail ".imgfs/$f: a read in pieces is not one snapshot"
    [ "$(stat -c %s "$M/.imgfs/$f")" = "$last" ] ||
        fail ".imgfs/$f: stat shows $(stat -c %s "$M/.imgfs/$f") bytes, not the $last of its last read"
    grep -q "piece-$f-2" "$M/.imgfs/$f" || fail ".imgfs/$f: a read after a stat does not show the newest VM"
    [ "$(stat -c %s "$M/.imgfs/$f")" -gt "$last" ] || fail ".imgfs/$f: stat does not show the size of the newest read"
    "$IMGFSCTL" vm rm "$M" "piece-$f" > /dev/null && "$IMGFSCTL" vm rm "$M" "piece-$f-2" > /dev/null ||
        fail "vm rm piece-$f failed"
done
ok "a status file read in pieces is one snapshot; stat shows the size of the last read without rendering"

# The human view: one number or word per value, still.
[ "$(stat_value "$M" "base mon@1" resident_chunks)" -gt 0 ] || fail "no resident chunks in stats"
requests=$(stat_value "$M" fetch requests)
[ "$requests" -gt 0 ] || fail "no fetch requests in stats"
"$IMGFSCTL" status "$M" | grep -q '^  mon@1 ' || fail "the summary has no line for mon@1"
"$IMGFSCTL" status "$M" | grep -q '^  web1  *mon@1 ' || fail "the summary has no line for web1"
ok "stats and the summary name the base and the VM"

# Prometheus text exposition, read by the reference parser.
/usr/bin/python3 - "$M/.imgfs/metrics" "${NGINX_URL[www]}" <<'PY' || fail "metrics do not parse or miss figures"
import sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
url = sys.argv[2]
families = {f.name: f for f in text_string_to_metric_families(text)}
def samples(name):
    return families[name].samples
# Counters and gauges, each with HELP and TYPE.
assert families["imgfs_fetch_requests"].type == "counter", families["imgfs_fetch_requests"].type
assert families["imgfs_cache_bytes"].type == "gauge"
for f in families.values():
    assert f.documentation, f.name + " has no HELP"
# Labelled by base and version, VM and mirror.
hits = [s for s in samples("imgfs_base_cache_hits") if s.labels == {"base": "mon", "version": "1"}]
assert len(hits) == 1, samples("imgfs_base_cache_hits")
resident = [s.value for s in samples("imgfs_base_resident_bytes") if s.labels["base"] == "mon"]
assert resident and resident[0] > 0, resident
layer = [s.value for s in samples("imgfs_vm_layer_bytes") if s.labels == {"vm": "web1"}]
assert layer and layer[0] >= 4096, layer
mirrors = sorted(s.labels["mirror"] for s in samples("imgfs_mirror_requests"))
assert len(mirrors) == 2 and all(m.startswith(url) for m in mirrors), mirrors
requests = [s.value for s in samples("imgfs_mirror_requests")]
assert max(requests) > 0
info = samples("imgfs_daemon_info")[0].labels
assert info["repository_kind"] == "http", info
vm_info = [s.labels for s in samples("imgfs_vm_info")]
assert vm_info == [{"vm": "web1", "file": "vms/web1.raw", "base": "mon@1"}], vm_info
# Every sample line belongs to the family declared just before it (the parser
# would also accept interleaving; Prometheus does not).
seen, current = set(), None
for line in text.splitlines():
    if line.startswith("# TYPE "):
        current = line.split()[2]
        assert current not in seen, current + " declared twice"
        seen.add(current)
    elif line and not line.startswith("#"):
        name = line.split("{")[0].split(" ")[0]
        assert name == current or name == current + "_total" or current.endswith("_total") and name == current, line
print("families:", len(families))
PY
ok "python3-prometheus-client parses .imgfs/metrics: counters, gauges, labels base/version/vm/mirror"

# A scrape target of its own: socat and packaging/imgfs-metrics-http, as the
# README documents, scraped with curl and read by the same parser.
SRC=${IMGFS_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
port=$(free_port)
socat TCP-LISTEN:"$port",bind=127.0.0.1,reuseaddr,fork EXEC:"$SRC/packaging/imgfs-metrics-http $M" 2>"$T/socat.err" &
DAEMON_PID[socat]=$!
wait_for "the metrics endpoint never answered: $T/socat.err" 'curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$port/"'
curl -sf "http://127.0.0.1:$port/metrics" > "$T/scraped" || fail "no scrape answer: $(cat "$T/socat.err")"
/usr/bin/python3 -c '
import sys
from prometheus_client.parser import text_string_to_metric_families
names = {f.name for f in text_string_to_metric_families(open(sys.argv[1]).read())}
assert "imgfs_base_cache_hits" in names and "imgfs_vm_layer_bytes" in names, names' "$T/scraped" ||
    fail "the scraped metrics do not parse"
server_stop socat
ok "a scrape through socat and imgfs-metrics-http returns parseable metrics"

# JSON: jq and python read it, and it carries the same figures as stats.
"$IMGFSCTL" status --json "$M" > "$T/status.json"
jq -e '.base["mon@1"].cache_misses > 0 and .vm.web1.base == "mon@1" and (.mirror | length) == 2' \
    "$T/status.json" > /dev/null || fail "status --json lacks figures: $(cat "$T/status.json")"
[ "$(jq -r .fetch.requests "$T/status.json")" -ge "$requests" ] || fail "JSON fetch.requests is behind stats"
python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["cache"]["bytes"] > 0 and d["daemon"]["repository_kind"] == "http"' \
    "$T/status.json" || fail "python cannot read status --json"
expect_error "status of a directory that is not a mount" "$IMGFSCTL" status "$T"
expect_error "status with an unknown option" "$IMGFSCTL" status "$M" --yaml
ok "imgfsctl status --json parses with jq and python"

# Extended attributes, listed with getfattr.
getfattr -d -m user.imgfs "$M/bases/mon@1.raw" > "$T/base.xattr" || fail "getfattr failed on a base"
for a in base manifest resident_bytes hit_rate fetch_errors; do
    grep -q "^user.imgfs.$a=" "$T/base.xattr" || fail "no user.imgfs.$a on a base: $(cat "$T/base.xattr")"
done
grep -q '^user.imgfs.base="mon@1"' "$T/base.xattr" || fail "base identity: $(cat "$T/base.xattr")"
resident=$(getfattr --only-values -n user.imgfs.resident_bytes "$M/bases/mon@1.raw")
[ "$resident" = "$(jq -r '.base["mon@1"].resident_bytes' "$M/.imgfs/status.json")" ] ||
    fail "user.imgfs.resident_bytes $resident differs from status.json"
getfattr -d -m user.imgfs "$M/vms/web1.raw" > "$T/vm.xattr" || fail "getfattr failed on a VM disk"
grep -q '^user.imgfs.layer_bytes="[1-9]' "$T/vm.xattr" || fail "no layer bytes on a VM: $(cat "$T/vm.xattr")"
grep -q '^user.imgfs.base="mon@1"' "$T/vm.xattr" || fail "no base identity on a VM: $(cat "$T/vm.xattr")"
getfattr -d -m user.imgfs "$M" | grep -q '^user.imgfs.fetch_errors="0"' || fail "no fetch_errors on the mount root"
! setfattr -n user.imgfs.hit_rate -v 1 "$M/vms/web1.raw" 2>/dev/null || fail "a user.imgfs attribute could be set"
ok "getfattr lists user.imgfs.* (resident bytes, hit rate, base identity, layer bytes, fetch errors)"

# Status, metrics and xattrs read while a VM disk is written and a base read
# (the TSan build runs this test: the figures are read without stopping I/O).
(
    for _ in $(seq 1 40); do
        cat "$M/.imgfs/metrics" "$M/.imgfs/status.json" > /dev/null
        getfattr -d -m user.imgfs "$M/vms/web1.raw" "$M/bases/mon@1.raw" > /dev/null
        "$IMGFSCTL" status "$M" > /dev/null
    done
) &
reader=$!
dd if=/dev/urandom of="$M/vms/web1.raw" bs=64k count=64 conv=notrunc,fsync status=none
cat "$M/bases/mon.raw" > /dev/null
wait "$reader" || fail "reading the status during I/O failed"
ok "status files and xattrs read during VM and base I/O"

umount_imgfs "$M"
finish
