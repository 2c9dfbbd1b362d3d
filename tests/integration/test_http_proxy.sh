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

# repo.invalid never resolves: without the proxy the mount must fail.
expect_error "mount of an unresolvable repository without a proxy" \
    "$IMGFS" http://repo.invalid/ "$T/mnt" -f -o cache="$T/cache",state="$T/state",connect_timeout=2,insecure
mount_imgfs http://repo.invalid/ "$T/mnt" "proxy=${NGINX_URL[proxy]}"
cmp "$T/mnt/bases/p.raw" "$T/img.raw" || fail "base read through the proxy differs"
through=$(nginx_requests proxy /chunks/)
[ "$through" -gt 0 ] || fail "no chunk request went through the proxy"
[ "$(nginx_requests origin /chunks/)" -eq "$through" ] || fail "the origin saw requests that did not come through the proxy"
ok "all $through chunk requests went through the proxy; base identical"
umount_imgfs "$T/mnt"
finish
