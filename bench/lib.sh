# bench/lib.sh: helpers shared by the benchmark scripts, sourced first
# (after "set -uo pipefail"). It sets SCRIPT_DIR (bench/), SRC_DIR (the
# source tree) and BENCH_NAME (the script's name, the prefix of messages).
#
#   log MSG / die MSG            progress on stderr / an error and exit 1
#   require_root WHY             die unless root
#   require_tools TOOL...        die unless every TOOL is on PATH
#   require_imgfs DIR            die unless DIR has imgfs and imgfsctl
#   parse_builds "NAME=DIR ..."  for runs that compare builds: NAMES in order and
#                                BIN[NAME]=DIR (declare -A BIN first); dies on a
#                                bad entry or a DIR without the binaries
#   usage                        the script's header comment (what it measures,
#                                its environment and defaults), on stdout
#   no_args_but_help "$@"        -h or --help prints the usage and exits 0, before
#                                the script does anything; any other argument
#                                prints it to stderr and exits 2 (bad_argument)
#   help_option "$@"             the same for a script that takes plain arguments:
#                                only options (-...) are handled
#   to_bytes SIZE WHAT           512M, 1G, ... to bytes (WHAT names it in errors)
#   require_count VALUE WHAT     die unless VALUE is a positive count (WHAT: the
#                                variable it came from, for the message)
#   stop_pid PID                 TERM, wait up to 10 s, then KILL, and reap
#   unmount_path PATH            unmount a FUSE mount, lazily if it is busy
#   wait_mounted PATH SECONDS    until PATH is a mount point (status 1 if never)
#   netns_create NS VETH_ROOT VETH_NS IP_ROOT IP_NS
#                                a namespace joined to this one by a veth pair
#                                (/30 addresses); sets NS_CREATED=1
#   netns_delete NS VETH_ROOT    undoes netns_create (safe to call always)
#   innet CMD...                 runs CMD in $NS's network namespace only
#   make_work NAME              WORK=a new directory $BENCH_DIR/NAME.XXXXXX
#                               (BENCH_DIR defaults to /var/tmp)
#   stop_all                    unmount MOUNTS (newest first), then stop PIDS
#   cleanup_all                 stop_all and remove_work: an on_exit handler
#   on_exit FN                  FN runs once on exit, Ctrl-C (status 130) and TERM
#   remove_work                 rm -rf $WORK, unless BENCH_KEEP=1
#   save_report KIND            stdin to stdout and to results/KIND-<date>[-n].md
#   nginx_start_in_ns DIR ROOT LISTEN LOG_FORMAT CHECK_URL
#                                nginx serving ROOT on LISTEN inside $NS, its
#                                files in DIR, access log DIR/access.log in
#                                LOG_FORMAT; waits for CHECK_URL; sets NGINX_PID

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_DIR=$(dirname "$SCRIPT_DIR")
BENCH_NAME=$(basename "$0" .sh)

log() { printf '[%s %s] %s\n' "$BENCH_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '%s: %s\n' "$BENCH_NAME" "$*" >&2; exit 1; }

# Every bench script's header comment is its usage: lines 2 up to its first
# "set -" line.
usage() { sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
bad_argument() {
    { printf '%s: unexpected argument '\''%s'\''.\n\n' "$BENCH_NAME" "$1"; usage; } >&2
    exit 2
}
help_option() {
    case ${1:-} in
    -h | --help)
        usage
        exit 0
        ;;
    -*) bad_argument "$1" ;;
    esac
}
no_args_but_help() {
    help_option "$@"
    [ $# -eq 0 ] || bad_argument "$1"
}
require_root() { [ "$(id -u)" -eq 0 ] || die "must run as root ($1)."; }
require_tools() {
    local t
    for t in "$@"; do command -v "$t" >/dev/null || die "$t is not installed."; done
}
require_imgfs() {
    [ -x "$1/imgfs" ] && [ -x "$1/imgfsctl" ] ||
        die "imgfs binaries not found in $1 (build them, or set IMGFS_BIN_DIR)."
}

parse_builds() {
    local b
    NAMES=()
    for b in $1; do
        [[ $b == *=* ]] || die "BENCH_BUILDS entry '$b' is not NAME=DIR."
        require_imgfs "${b#*=}"
        BIN[${b%%=*}]=${b#*=}
        NAMES+=("${b%%=*}")
    done
}

require_count() { [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2=$1 is not a positive count."; }

to_bytes() {
    local v=${1^^} m=1
    case $v in
    *K) m=1024 ;; *M) m=$((1024 ** 2)) ;; *G) m=$((1024 ** 3)) ;; *T) m=$((1024 ** 4)) ;;
    esac
    v=${v%[KMGT]}
    [[ $v =~ ^[0-9]+$ ]] || die "$2=$1 is not a size like 512M or 1G."
    echo $((v * m))
}

stop_pid() {
    local p=$1 _
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
    kill "$p" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
}

unmount_path() {
    mountpoint -q "$1" 2>/dev/null || return 0
    fusermount3 -u "$1" 2>/dev/null || umount "$1" 2>/dev/null || umount -l "$1" 2>/dev/null ||
        log "warning: could not unmount $1"
}

wait_mounted() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        mountpoint -q "$1" && return 0
        sleep 0.1
    done
    return 1
}

MOUNTS=() # mount points (directories, or export files) to unmount at the end
PIDS=()   # daemons to stop at the end
stop_all() {
    local i p
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do unmount_path "${MOUNTS[i]}"; done
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
}

# mount_build BIN_DIR TAG REPO [OPTIONS]: mounts REPO with BIN_DIR's imgfs at
# $WORK/mnt-TAG, with its own cache and state directories and log
# ($WORK/imgfs-TAG.log), for runs that compare builds side by side; registered
# for stop_all. Dies when it does not mount within 20 s.
mount_build() {
    local dir=$1 tag=$2 repo=$3 extra=${4:+,$4}
    mkdir -p "$WORK/mnt-$tag" "$WORK/cache-$tag" "$WORK/state-$tag"
    "$dir/imgfs" "$repo" "$WORK/mnt-$tag" -f -o "cache=$WORK/cache-$tag,state=$WORK/state-$tag$extra" \
        2>"$WORK/imgfs-$tag.log" &
    PIDS+=($!)
    wait_mounted "$WORK/mnt-$tag" 20 || die "the $tag build did not mount: $(tail -n 1 "$WORK/imgfs-$tag.log")"
    MOUNTS+=("$WORK/mnt-$tag")
}

make_work() {
    mkdir -p "${BENCH_DIR:-/var/tmp}" || die "cannot create ${BENCH_DIR:-/var/tmp}."
    WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/$1.XXXXXX") || die "cannot create a work directory."
}

cleanup_all() {
    local rc=$?
    trap - EXIT INT TERM HUP
    stop_all
    wait 2>/dev/null
    remove_work
    exit "$rc"
}

on_exit() {
    trap "$1" EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'exit 143' TERM HUP
}

remove_work() {
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}

save_report() {
    local dir day out n=1
    dir=$(dirname "${BASH_SOURCE[0]}")/results
    day=$(date -u +%Y-%m-%d)
    mkdir -p "$dir" || die "cannot create $dir."
    out=$dir/$1-$day.md
    while [ -e "$out" ]; do
        n=$((n + 1))
        out=$dir/$1-$day-$n.md
    done
    tee "$out"
    log "report written to $out"
}

NS_CREATED=0
NS=
# nsenter joins only the network namespace: "ip netns exec" would also give
# the command a private copy of every mount on the host, which keeps FUSE
# daemons (ours and anybody else's) alive after they are unmounted.
innet() { nsenter --net="/run/netns/$NS" "$@"; }

netns_create() {
    NS=$1
    local veth_root=$2 veth_ns=$3 ip_root=$4 ip_ns=$5
    ip netns add "$NS" || die "cannot create network namespace $NS."
    NS_CREATED=1
    ip link add "$veth_root" type veth peer name "$veth_ns" || die "cannot create the veth pair."
    ip link set "$veth_ns" netns "$NS" || die "cannot move $veth_ns into $NS."
    ip addr add "$ip_root/30" dev "$veth_root" && ip link set "$veth_root" up || die "cannot configure $veth_root."
    innet ip link set lo up &&
        innet ip addr add "$ip_ns/30" dev "$veth_ns" &&
        innet ip link set "$veth_ns" up || die "cannot configure $veth_ns."
}

netns_delete() {
    if [ "$NS_CREATED" = 1 ]; then
        ip netns delete "$1" 2>/dev/null || log "warning: could not delete network namespace $1"
        NS_CREATED=0
    fi
    ip link show "$2" >/dev/null 2>&1 && ip link delete "$2" 2>/dev/null
    return 0
}

NGINX_PID=
nginx_start_in_ns() {
    local dir=$1 root=$2 listen=$3 format=$4 check=$5 _
    mkdir -p "$dir" || die "cannot create $dir."
    cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 2;
user root;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    log_format bench '$format';
    access_log $dir/access.log bench;
    server {
        listen $listen;
        root $root;
    }
}
EOF
    : >"$dir/access.log"
    # Not through innet: $! must be nginx itself (nsenter execs it).
    nsenter --net="/run/netns/$NS" nginx -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
    NGINX_PID=$!
    for _ in $(seq 50); do
        curl -s --noproxy '*' -o /dev/null "$check" && return 0
        kill -0 "$NGINX_PID" 2>/dev/null ||
            die "nginx did not start: $(tail -n 1 "$dir/error.log" "$dir/stdout.log" 2>/dev/null | tail -n 1)"
        sleep 0.1
    done
    die "nginx in $NS does not answer on $check."
}
