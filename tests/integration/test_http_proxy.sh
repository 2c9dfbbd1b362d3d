#!/bin/bash
# -o proxy=URL: every repository request goes through the HTTP proxy (here an
# nginx that forwards to the origin), for a repository host that only the
# proxy can reach.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nginx.sh"

make_image "$T/img.raw" $((6 * 1048576 + 333))
"$IMGFSCTL" publish "$T/img.raw" "$T/repo" --name p > /dev/null
nginx_start origin "$T/repo"
nginx_start proxy "$T/empty" "location / { proxy_pass ${NGINX_URL[origin]}; }"

# repo.invalid never resolves: without the proxy the mount must fail, on
# that (the mount point, cache and state exist, or it failed on them).
mkdir -p "$T/mnt" "$T/cache" "$T/state"
expect_error "mount of an unresolvable repository without a proxy" \
    "$IMGFS" http://repo.invalid/ "$T/mnt" -f -o cache="$T/cache",state="$T/state",connect_timeout=2,insecure
grep -qi 'resolve' "$(ls -t "$T"/stderr.* | head -n 1)" || fail "the mount without a proxy did not fail on the unresolvable host"
mount_imgfs http://repo.invalid/ "$T/mnt" "proxy=${NGINX_URL[proxy]}"
cmp "$T/mnt/bases/p.raw" "$T/img.raw" || fail "base read through the proxy differs"
through=$(nginx_requests proxy /chunks/)
[ "$through" -gt 0 ] || fail "no chunk request went through the proxy"
# nginx logs a request when it has sent the answer, so the proxy's line for
# the last one can come after imgfs has the bytes: wait until the two logs
# agree (a request that did not come through the proxy never lets them).
wait_for "the origin's and the proxy's logs never agreed: some chunk requests did not come through the proxy" \
    '[ "$(nginx_requests origin /chunks/)" -eq "$(nginx_requests proxy /chunks/)" ]'
through=$(nginx_requests proxy /chunks/)
ok "all $through chunk requests went through the proxy; base identical"
umount_imgfs "$T/mnt"
finish
