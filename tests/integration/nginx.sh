# nginx (and other small servers) for the HTTP integration tests. Source it
# after lib.sh:
#   . "$(dirname "$0")/nginx.sh"
#
#   nginx_start NAME ROOT [EXTRA]   serves ROOT on 127.0.0.1 at a free port; EXTRA
#                                   is put into the server block (for example
#                                   "location /r/chunks/ { return 500; }").
#                                   Sets NGINX_URL[NAME] (http://127.0.0.1:PORT).
#   nginx_stop NAME                 stops it (the port stays reserved for it)
#   nginx_restart NAME              starts it again on the same port, same config
#   nginx_bytes_sent NAME PREFIX    sum of body bytes sent for URIs starting with PREFIX
#   nginx_requests NAME PREFIX      number of requests for URIs starting with PREFIX
#   blackhole_start NAME            a TCP server that accepts and never answers;
#                                   sets BLACKHOLE_URL[NAME]; registered as blackhole:NAME
#   server_stop KEY                 stops any server registered in DAEMON_PID as KEY
#
# nginx runs in the foreground as a single process (master_process off), so
# one pid is all there is to stop; every server started here is registered in
# lib.sh's DAEMON_PID and so killed by its cleanup, whatever happened.
command -v nginx > /dev/null || fail "nginx is not installed"
declare -A NGINX_URL NGINX_PORT NGINX_DIR BLACKHOLE_URL

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# HTTP_WAIT_SECONDS: how long a server just started may take to answer.
# Like lib.sh's WAIT_SECONDS it only ends a run that fails (the wait ends as
# soon as the server answers, or when it exits), so it is generous for a
# loaded machine, where a 10 s limit made a slow start a failed test.
HTTP_WAIT_SECONDS=60
# wait_http URL [PID]: waits up to HTTP_WAIT_SECONDS for anything to answer
# HTTP at URL; returns 1 then, or at once when process PID has exited.
wait_http() {
    local deadline=$((SECONDS + HTTP_WAIT_SECONDS))
    until curl -s -o /dev/null --max-time 5 "$1"; do
        [ -z "${2:-}" ] || kill -0 "$2" 2>/dev/null || return 1
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

_nginx_write_conf() { # NAME ROOT PORT EXTRA
    local dir=${NGINX_DIR[$1]}
    cat > "$dir/nginx.conf" <<EOF
master_process off;
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
    types { }
    default_type application/octet-stream;
    log_format imgfs '\$status \$body_bytes_sent \$request_uri';
    access_log $dir/access.log imgfs;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    sendfile on;
    keepalive_timeout 60s;
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:$3;
        root $2;
        location = /imgfs-test-ping { return 204; }
        $4
    }
}
EOF
}

_nginx_run() { # NAME: starts nginx with its config, waits until it answers
    local name=$1 dir=${NGINX_DIR[$1]}
    nginx -c "$dir/nginx.conf" -e "$dir/error.log" 2>> "$dir/error.log" &
    local pid=$!
    DAEMON_PID["nginx:$name"]=$pid
    DAEMON_LOG["nginx:$name"]=$dir/error.log
    if ! wait_http "${NGINX_URL[$name]}/imgfs-test-ping" "$pid"; then
        kill -0 "$pid" 2>/dev/null && kill "$pid"
        return 1
    fi
}

nginx_start() {
    local name=$1 root=$2 extra=${3:-}
    NGINX_DIR[$name]=$T/nginx-$name
    mkdir -p "${NGINX_DIR[$name]}/tmp"
    for _ in 1 2 3; do # another process may take the free port before nginx binds it
        local port
        port=$(free_port)
        NGINX_PORT[$name]=$port
        NGINX_URL[$name]=http://127.0.0.1:$port
        _nginx_write_conf "$name" "$root" "$port" "$extra"
        _nginx_run "$name" && return 0
    done
    cat "${NGINX_DIR[$name]}/error.log" >&2
    fail "nginx $name did not start"
}

server_stop() {
    local pid=${DAEMON_PID[$1]:-}
    [ -n "$pid" ] || fail "server $1 is not running"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "DAEMON_PID[$1]"
}

nginx_stop() {
    local name=$1
    server_stop "nginx:$name"
    curl -s -o /dev/null --max-time 2 "${NGINX_URL[$name]}/imgfs-test-ping" && fail "nginx $name still answers after stop"
    return 0
}

nginx_restart() {
    _nginx_run "$1" || { cat "${NGINX_DIR[$1]}/error.log" >&2; fail "nginx $1 did not restart"; }
}

nginx_bytes_sent() {
    awk -v p="$2" 'index($3, p) == 1 { s += $2 } END { printf "%d\n", s }' "${NGINX_DIR[$1]}/access.log"
}

nginx_requests() {
    awk -v p="$2" 'index($3, p) == 1 { n++ } END { printf "%d\n", n }' "${NGINX_DIR[$1]}/access.log"
}

# A server that accepts TCP connections (so connecting succeeds) and then
# never sends a byte: the worst kind of dead mirror.
blackhole_start() {
    local name=$1 port
    port=$(free_port)
    python3 - "$port" > "$T/blackhole-$name.log" 2>&1 <<'PY' &
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
held = []
while True:
    c, _ = s.accept()
    held.append(c)   # keep it open, never answer
PY
    local pid=$!
    DAEMON_PID["blackhole:$name"]=$pid
    local deadline=$((SECONDS + HTTP_WAIT_SECONDS))
    until python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5).close()' "$port" \
        2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { cat "$T/blackhole-$name.log" >&2; fail "blackhole $name exited before it listened"; }
        [ "$SECONDS" -lt "$deadline" ] || fail "blackhole $name did not accept connections within $HTTP_WAIT_SECONDS s"
        sleep 0.1
    done
    BLACKHOLE_URL[$name]=http://127.0.0.1:$port
}

# stall_server_start NAME ROOT FLAGFILE: an HTTP/1.1 keep-alive server of
# ROOT that, while FLAGFILE exists, accepts every request and answers none
# (each waits until the file is gone, then is answered). Sets
# STALL_URL[NAME]; registered as stall:NAME.
declare -A STALL_URL STALL_PORT
stall_server_start() {
    local name=$1 root=$2 flag=$3 port
    port=$(free_port)
    python3 - "$port" "$root" "$flag" > "$T/stall-$name.log" 2>&1 <<'PY' &
import functools, http.server, os, sys, time
port, root, flag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        while os.path.exists(flag):
            time.sleep(0.05)
        super().do_GET()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=root))
server.daemon_threads = True
server.request_queue_size = 256
server.serve_forever()
PY
    DAEMON_PID["stall:$name"]=$!
    STALL_PORT[$name]=$port
    STALL_URL[$name]=http://127.0.0.1:$port
    wait_http "${STALL_URL[$name]}/" "${DAEMON_PID["stall:$name"]}" ||
        { cat "$T/stall-$name.log" >&2; fail "stall server $name did not start"; }
}
