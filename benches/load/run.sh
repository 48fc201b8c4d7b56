#!/usr/bin/env bash
# Side-by-side L4 load benchmark, loopback only: direct vs HAProxy (mode tcp, nbthread 1) vs
# nginx stream (1 worker) vs switchyard; row 5 (HTTP mode) without nginx stream, row 6 (UDP)
# without HAProxy, row 8 (TLS termination, HTTP mode) HAProxy vs switchyard only.
# See benches/load/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

DURATION=${DURATION:-5}             # seconds per wrk run
WARMUP=${WARMUP:-1}                 # seconds of unmeasured wrk warm-up before each run (0 = none)
ROUNDS=${ROUNDS:-3}                 # every row runs ROUNDS times, targets in rotating order; median reported
CONNS=${CONNS:-50}                  # wrk connections (and redis-benchmark clients, row 7)
WRK_THREADS=${WRK_THREADS:-1}
IPERF_DURATION=${IPERF_DURATION:-$DURATION}
IPERF_STREAMS=${IPERF_STREAMS:-4}   # row 3b: iperf3 -P
IDLE_CONNS=${IDLE_CONNS:-5000}
REDIS_CONNS=${REDIS_CONNS:-$CONNS}  # row 7: redis-benchmark -c
REDIS_USER=${REDIS_USER:-}          # row 7: run redis-server as this user (default: as we are; nobody if it refuses root)
PROXY_CPU=${PROXY_CPU:-0}           # proxy under test: a CPU or a list (taskset -c), e.g. 0,1
PROXY_THREADS=${PROXY_THREADS:-1}   # HAProxy nbthread / nginx worker_processes; switchyard runs a worker per CPU of PROXY_CPU
LOAD_CPU=${LOAD_CPU:-1}             # load generators and backends
ROWS=${ROWS:-1 2 3 4 5 6 7 8}       # which rows to run (3 = 3a and 3b; 8 = 8a-8d, TLS)
ROW5_STICKY=${ROW5_STICKY:-1}       # row 5: also run wrk with the sticky cookie (0 = only without cookie)
UDP_SOCKETS=${UDP_SOCKETS:-256}     # row 6: client sockets (source ports) of the UDP load generator
UDP_OUTSTANDING=${UDP_OUTSTANDING:-64} # row 6: datagrams kept outstanding (at most one per socket)
UDP_SIZE=${UDP_SIZE:-80}            # row 6: bytes per datagram (a DNS query's size)
UDP_TIMEOUT_MS=${UDP_TIMEOUT_MS:-1000} # row 6: a reply later than this is a lost datagram
SWITCHYARD_BIN=${SWITCHYARD_BIN:-}  # set to skip `cargo build --release` and use this binary
UDPLOAD_BIN=${UDPLOAD_BIN:-}        # row 6: set to skip building benches/load/udpload.rs and use this binary
TLS_CONNS=${TLS_CONNS:-$CONNS}      # row 8a-8c: concurrent connections of the handshake client (tlsload --conns)
TLS_REQUEST=${TLS_REQUEST:-1}       # row 8a-8c: 1 = one GET per TLS connection, 0 = handshake and close_notify only
TLSLOAD_BIN=${TLSLOAD_BIN:-}        # row 8: set to skip building benches/load/tlsload and use this binary

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# want ROW : is ROW selected? Row 3 has sub-rows 3a (1 stream) and 3b (IPERF_STREAMS streams):
# ROWS=3 selects both, ROWS=3b only the second; `want 3` is true when either is selected.
want() {
    local r
    for r in $ROWS; do
        [[ $r == "$1" || $r == "$1"[a-z] || $1 == "$r"[a-z] ]] && return 0
    done
    return 1
}
for r in $ROWS; do
    [[ $r =~ ^([124567]|3[ab]?|8[a-d]?)$ ]] || die "ROWS: unknown row '$r' (rows: 1 2 3 3a 3b 4 5 6 7 8 8a 8b 8c 8d)"
done

# ---------------------------------------------------------------- tools
need=()
tools=(haproxy nginx wrk iperf3 taskset ss python3)
! want 7 || tools+=(redis-server redis-benchmark)
! want 8 || tools+=(openssl curl)
for b in "${tools[@]}"; do
    command -v "$b" >/dev/null 2>&1 || need+=("$b")
done
if ((${#need[@]})); then
    pkgs=()
    for b in "${need[@]}"; do
        case $b in
            taskset) pkgs+=(util-linux) ;;
            ss) pkgs+=(iproute2) ;;
            redis-benchmark) pkgs+=(redis-tools) ;;
            *) pkgs+=("$b") ;;
        esac
    done
    log "installing missing: ${pkgs[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
# Debian's nginx package may start a system instance; ours is separate (own prefix and port).
# nginx stream is a proxy target in every row but 5; Debian builds the stream module as a
# module in its own package.
NGX_STREAM=""   # "load_module ...;" line for the nginx stream configs, or empty when built in
if want 1 || want 2 || want 3 || want 4 || want 6 || want 7; then
    if nginx -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
        ngx_mods=$(nginx -V 2>&1 | tr ' ' '\n' | sed -n 's/^--modules-path=//p')
        ngx_mod=${ngx_mods:-/usr/lib/nginx/modules}/ngx_stream_module.so
        if [ ! -f "$ngx_mod" ]; then
            log "installing missing: libnginx-mod-stream (nginx stream module)"
            SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libnginx-mod-stream >/dev/null
        fi
        [ -f "$ngx_mod" ] || die "no nginx stream module at $ngx_mod"
        NGX_STREAM="load_module $ngx_mod;"
    elif ! nginx -V 2>&1 | grep -q -- '--with-stream'; then
        die "this nginx has no stream module (every row but 5 needs it)"
    fi
fi

TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
SY_GIVEN=${SWITCHYARD_BIN:+1}
if [ -z "$SWITCHYARD_BIN" ]; then
    log "building switchyard (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
    SWITCHYARD_BIN=$TARGET_DIR/release/switchyard
fi
if want 8 && [ -z "$TLSLOAD_BIN" ]; then
    # Its own package (benches/load/tlsload/Cargo.toml: rustls, tokio), built into its own
    # directory of the target dir so that it shares no lock file with switchyard's build.
    log "building the TLS load generator (cargo build --release --manifest-path benches/load/tlsload/Cargo.toml)"
    (cd "$ROOT" && cargo build --release --quiet --manifest-path "$HERE/tlsload/Cargo.toml" --target-dir "$TARGET_DIR/tlsload") ||
        die "cargo build of benches/load/tlsload failed"
    TLSLOAD_BIN=$TARGET_DIR/tlsload/release/tlsload
fi
if want 6 && [ -z "$UDPLOAD_BIN" ]; then
    log "building the UDP load generator (cargo build --release --example udpload)"
    (cd "$ROOT" && cargo build --release --quiet --example udpload) || die "cargo build --release --example udpload failed"
    UDPLOAD_BIN=$TARGET_DIR/release/examples/udpload
fi
# The commit, read when the binary is built (the tree may move on during the run).
rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo none)
if [ -n "$SY_GIVEN" ]; then
    rev="(SWITCHYARD_BIN given; the repository is at $rev)"
elif [ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock build.rs 2>/dev/null)" ]; then
    rev="$rev+uncommitted changes"
fi
[ -x "$SWITCHYARD_BIN" ] || die "no switchyard binary at $SWITCHYARD_BIN"
! want 6 || [ -x "$UDPLOAD_BIN" ] || die "no udpload binary at $UDPLOAD_BIN"
! want 8 || [ -x "$TLSLOAD_BIN" ] || die "no tlsload binary at $TLSLOAD_BIN"
[[ $TLS_REQUEST =~ ^[01]$ ]] || die "TLS_REQUEST: '$TLS_REQUEST' is not 0 or 1"

# CPU pinning (needs 2 CPUs; otherwise run unpinned and say so)
ncpu=$(nproc)
cpus_ok() { # cpus_ok LIST : every CPU of a comma-separated list exists
    local c
    for c in ${1//,/ }; do
        [[ $c =~ ^[0-9]+$ ]] && ((c < ncpu)) || return 1
    done
}
[[ $PROXY_THREADS =~ ^[1-9][0-9]*$ ]] || die "PROXY_THREADS: '$PROXY_THREADS' is not a positive number"
proxy_cpus=$(tr ',' '\n' <<<"$PROXY_CPU" | wc -l)
((proxy_cpus >= PROXY_THREADS)) || die "PROXY_THREADS=$PROXY_THREADS needs as many CPUs in PROXY_CPU (now '$PROXY_CPU'): switchyard sizes its runtime by them"
if ((ncpu >= 2)) && cpus_ok "$PROXY_CPU" && cpus_ok "$LOAD_CPU"; then
    PIN_PROXY=(taskset -c "$PROXY_CPU")
    PIN_LOAD=(taskset -c "$LOAD_CPU")
    pinning="proxy on CPU $PROXY_CPU ($PROXY_THREADS thread(s)), load generator and backends on CPU $LOAD_CPU"
else
    PIN_PROXY=()
    PIN_LOAD=()
    LOAD_CPU=$(seq -s, 0 $((ncpu - 1))) # load CPU busy then means the whole machine
    pinning="unpinned ($ncpu CPUs; pinning needs 2 and valid PROXY_CPU/LOAD_CPU)"
fi

# File descriptors: as many as we may have (65536 wanted; the hard limit may be lower).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
# HAProxy needs ~2 fds per connection and refuses to start if maxconn does not fit.
HAP_MAXCONN=20000
if ((NOFILE < 2 * HAP_MAXCONN + 200)); then
    HAP_MAXCONN=$(((NOFILE - 200) / 2))
    log "fd limit is $NOFILE: HAProxy maxconn lowered to $HAP_MAXCONN"
fi
((NOFILE >= 2 * IDLE_CONNS + 200)) || die "fd limit $NOFILE too low for IDLE_CONNS=$IDLE_CONNS"
# nginx counts a proxied connection twice (client and upstream side) against worker_connections,
# and warns when worker_connections exceeds its fd limit (worker_rlimit_nofile = NOFILE).
NGX_CONNS=$((2 * IDLE_CONNS + 1000))
((NGX_CONNS >= 10000)) || NGX_CONNS=10000
((NGX_CONNS <= NOFILE)) || NGX_CONNS=$NOFILE

# ---------------------------------------------------------------- processes
TMP=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-load.XXXXXX")
PIDS=()

alive() { # alive PID : running and not a zombie
    kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //; s/ .*//' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    if [ "${KEEP_TMP:-0}" = 1 ] || ((rc != 0)); then
        log "logs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD... : run in its own session (so its children can be killed too), log to $TMP/NAME.log
start() {
    local name=$1; shift
    setsid "$@" >"$TMP/$name.log" 2>&1 </dev/null &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# wait_listen PORT PID NAME : poll until something listens on 127.0.0.1:PORT (deadline 30 s)
wait_listen() {
    local port=$1 pid=$2 name=$3 deadline=$((SECONDS + 30))
    until ss -Hltn "sport = :$port" | grep -q .; do
        alive "$pid" || { tail -n 20 "$TMP/$name.log" >&2; die "$name exited during start-up"; }
        ((SECONDS < deadline)) || { tail -n 20 "$TMP/$name.log" >&2; die "$name did not listen on :$port within 30 s"; }
        sleep 0.05
    done
}

free_ports() { # free_ports N [udp] -> N distinct free TCP (or UDP) ports on 127.0.0.1
    python3 - "$1" "${2:-tcp}" <<'EOF'
import socket, sys
kind = socket.SOCK_DGRAM if sys.argv[2] == "udp" else socket.SOCK_STREAM
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, kind); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# wait_udp PORT PID NAME : poll until a UDP socket is bound to 127.0.0.1:PORT (deadline 30 s);
# returns 1 when NAME exited because the port was taken since free_ports saw it free (on a
# machine where tests open UDP sockets by the thousand, an ephemeral port can be)
wait_udp() {
    local port=$1 pid=$2 name=$3 deadline=$((SECONDS + 30))
    until ss -Hlun "sport = :$port" | grep -q .; do
        if ! alive "$pid"; then
            grep -q 'Address already in use' "$TMP/$name.log" && { log "$name: udp :$port was taken; another port"; return 1; }
            tail -n 20 "$TMP/$name.log" >&2; die "$name exited during start-up"
        fi
        ((SECONDS < deadline)) || { tail -n 20 "$TMP/$name.log" >&2; die "$name did not bind udp :$port within 30 s"; }
        sleep 0.05
    done
}

# start_nginx NAME PORT... : one nginx (1 worker) with a server block per port, all serving
# the same 128-byte static file. With more than one port, block N adds `X-Backend: sN`
# so that row 5 can check which backend answered.
start_nginx() {
    local name=$1; shift
    local dir=$TMP/$name port servers="" i=0 tag
    mkdir -p "$dir/www" "$dir/logs"
    printf '%0127d\n' 0 >"$dir/www/index.html"
    chmod -R a+rX "$TMP"
    for port in "$@"; do
        i=$((i + 1)); tag=""
        (($# > 1)) && tag=$'\n        add_header X-Backend s'$i' always;'
        servers+="
    server {
        listen 127.0.0.1:$port backlog=4096;
        root $dir/www;$tag
        location / { }
    }"
    done
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections 10000; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 3600s;
    client_body_temp_path $dir/body;
    default_type text/html;$servers
}
EOF
    start "$name" "${PIN_LOAD[@]}" nginx -p "$dir" -c "$dir/nginx.conf"
    local pid=$LAST_PID
    for port in "$@"; do wait_listen "$port" "$pid" "$name"; done
}

start_backend() { # start_backend KIND PORT ; KIND = nginx | iperf3 | hold | redis
    local kind=$1 port=$2
    case $kind in
        redis)
            start_redis "$port" ;;
        nginx)
            start_nginx nginx "$port" ;;
        iperf3)
            start iperf3-server "${PIN_LOAD[@]}" iperf3 -s -p "$port" -B 127.0.0.1
            wait_listen "$port" "$LAST_PID" iperf3-server ;;
        hold)
            start hold "${PIN_LOAD[@]}" python3 "$HERE/idle.py" serve "$port"
            wait_listen "$port" "$LAST_PID" hold ;;
    esac
}

# start_redis PORT : redis-server on 127.0.0.1:PORT, no persistence, in $TMP/redis, pinned to
# the load CPU, with one key for `redis-benchmark -t get` to read. Run as REDIS_USER if set;
# otherwise as we are, and as `nobody` if it refuses to run as root.
start_redis() {
    local port=$1 dir=$TMP/redis user=${REDIS_USER:-} deadline
    local args=(--port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no
        --dir "$dir" --maxclients 10000)
    mkdir -p "$dir"
    while :; do
        local as=()
        if [ -n "$user" ] && [ "$user" != "$(id -un)" ]; then
            chown "$user" "$dir"; chmod a+x "$TMP"
            as=(setpriv --reuid="$user" --regid="$(id -g "$user")" --clear-groups)
        fi
        start redis "${PIN_LOAD[@]}" "${as[@]}" redis-server "${args[@]}"
        deadline=$((SECONDS + 30))
        until ss -Hltn "sport = :$port" | grep -q .; do
            alive "$LAST_PID" || break
            ((SECONDS < deadline)) || { tail -n 20 "$TMP/redis.log" >&2; die "redis-server did not listen on :$port within 30 s"; }
            sleep 0.05
        done
        alive "$LAST_PID" && break
        if [ -z "$user" ] && [ "$(id -u)" = 0 ]; then
            log "redis-server exited when started as root: $(tail -n 1 "$TMP/redis.log"); again as nobody"
            NOTES+=("row 7: redis-server refused to run as root ($(tail -n 1 "$TMP/redis.log" | cut -c1-200)); it ran as nobody")
            user=nobody
            continue
        fi
        tail -n 20 "$TMP/redis.log" >&2; die "redis-server exited during start-up"
    done
    REDIS_RAN_AS=${user:-$(id -un)}
    redis-benchmark -h 127.0.0.1 -p "$port" -c 1 -n 1 -t set -q >/dev/null 2>&1 ||
        die "redis-benchmark -t set against redis-server failed"
}

start_haproxy() { # start_haproxy LISTEN_PORT BACKEND_PORT -> HAP_PID
    cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread $PROXY_THREADS
    maxconn $HAP_MAXCONN
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:$1
    default_backend be
backend be
    server b1 127.0.0.1:$2
EOF
    start haproxy "${PIN_PROXY[@]}" haproxy -db -f "$TMP/haproxy.cfg"
    HAP_PID=$LAST_PID
    wait_listen "$1" "$HAP_PID" haproxy
}

SY_HEALTH=""   # health_check table for the switchyard config, decided on first start
start_switchyard() { # start_switchyard LISTEN_PORT BACKEND_PORT -> SY_PID
    local cfg=$TMP/switchyard.toml
    write_cfg() {
        cat >"$cfg" <<EOF
[[listener]]
name = "bench"
bind = "127.0.0.1:$1"
algorithm = "roundrobin"
$3
[[listener.backend]]
name = "b1"
address = "127.0.0.1:$2"
EOF
    }
    if [ -z "$SY_HEALTH" ]; then
        # Health checks turned down to one an hour: HAProxy runs without `check`,
        # and a TCP probe every 2 s would disturb iperf3's server. Older builds
        # without health checks reject the table; then run without it.
        SY_HEALTH=$'[listener.health_check]\ninterval = "1h"'
        write_cfg "$1" "$2" "$SY_HEALTH"
        if ! "$SWITCHYARD_BIN" check --config "$cfg" >"$TMP/switchyard-check.log" 2>&1; then
            SY_HEALTH="# (no [listener.health_check]: this build rejects it)"
            write_cfg "$1" "$2" "$SY_HEALTH"
            "$SWITCHYARD_BIN" check --config "$cfg" >"$TMP/switchyard-check.log" 2>&1 ||
                { cat "$TMP/switchyard-check.log" >&2; die "switchyard rejects the bench config"; }
            log "note: switchyard rejects [listener.health_check]; running without it"
            NOTES+=("switchyard ran without a [listener.health_check] table (this build rejects it)")
        fi
    fi
    write_cfg "$1" "$2" "$SY_HEALTH"
    start switchyard "${PIN_PROXY[@]}" "$SWITCHYARD_BIN" run --config "$cfg"
    SY_PID=$LAST_PID
    wait_listen "$1" "$SY_PID" switchyard
}

# start_checked_switchyard NAME CFG ROW WHAT : `switchyard check` the config, then start
# it pinned to the proxy CPU (SY_PID); a rejected config is logged and noted for ROW.
start_checked_switchyard() {
    local log_file="$TMP/$1-check.log"
    if ! "$SWITCHYARD_BIN" check --config "$2" >"$log_file" 2>&1; then
        log "switchyard rejects the $4 config:"; sed 's/^/    /' "$log_file" >&2
        NOTES+=("$3: switchyard rejects the $4 config: $(grep -m1 . "$log_file")")
        return 1
    fi
    start "$1" "${PIN_PROXY[@]}" "$SWITCHYARD_BIN" run --config "$2"
    SY_PID=$LAST_PID
}

# start_nginx_stream LISTEN_PORT BACKEND_PORT -> NGX_PID : nginx's stream module as a TCP proxy,
# one worker pinned (by taskset, inherited from the master) to the proxy CPU, as HAProxy is.
# Timeouts as HAProxy's (connect 5s, idle 1h), no access log, the listen backlog HAProxy and
# switchyard get from somaxconn, worker_connections for IDLE_CONNS proxied connections (two
# each). Error log lines end up in the notes.
start_nginx_stream() {
    local dir=$TMP/nginx-stream
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<EOF
$NGX_STREAM
worker_processes $PROXY_THREADS;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $NGX_CONNS; }
stream {
    access_log off;
    server {
        listen 127.0.0.1:$1 backlog=4096;
        proxy_pass 127.0.0.1:$2;
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }
}
EOF
    start nginx-stream "${PIN_PROXY[@]}" nginx -p "$dir" -c "$dir/nginx.conf"
    NGX_PID=$LAST_PID
    wait_listen "$1" "$NGX_PID" nginx-stream
}

# start_proxies BACKEND_PORT -> PORT_<target> and PID_<target> (the process whose session's
# CPU time is the proxy's; empty for direct) for every target in TARGETS
start_proxies() {
    local hp np sp
    read -r hp np sp < <(free_ports 3)
    start_haproxy "$hp" "$1"
    start_nginx_stream "$np" "$1"
    start_switchyard "$sp" "$1"
    PORT_direct=$1 PORT_haproxy=$hp PORT_nginx=$np PORT_switchyard=$sp
    PID_direct="" PID_haproxy=$HAP_PID PID_nginx=$NGX_PID PID_switchyard=$SY_PID
}

# ---- row 5: HTTP mode with cookie stickiness, two backends
start_haproxy_http() { # start_haproxy_http LISTEN_PORT BACKEND_PORT1 BACKEND_PORT2 -> HAP_PID
    cat >"$TMP/haproxy-http.cfg" <<EOF
global
    nbthread $PROXY_THREADS
    maxconn $HAP_MAXCONN
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:$1
    default_backend be
backend be
    balance roundrobin
    cookie SERVERID insert indirect nocache
    server s1 127.0.0.1:$2 cookie s1
    server s2 127.0.0.1:$3 cookie s2
EOF
    start haproxy-http "${PIN_PROXY[@]}" haproxy -db -f "$TMP/haproxy-http.cfg"
    HAP_PID=$LAST_PID
    wait_listen "$1" "$HAP_PID" haproxy-http
}

# start_switchyard_http LISTEN_PORT BACKEND_PORT1 BACKEND_PORT2 -> SY_PID; returns 1 (and
# adds a note) when this build rejects the config. stderr goes to $TMP/switchyard-http.log.
start_switchyard_http() {
    local cfg=$TMP/switchyard-http.toml
    cat >"$cfg" <<EOF
[[listener]]
name = "web"
bind = "127.0.0.1:$1"
mode = "http"
algorithm = "roundrobin"
[listener.health_check]
interval = "1h"
timeout = "1s"
[listener.sticky]
method = "lbcookie"
cookie = "SERVERID"
[[listener.backend]]
name = "s1"
address = "127.0.0.1:$2"
[[listener.backend]]
name = "s2"
address = "127.0.0.1:$3"
EOF
    start_checked_switchyard switchyard-http "$cfg" "row 5" "HTTP-mode" || return 1
    wait_listen "$1" "$SY_PID" switchyard-http
}

# probe_http PORT [CURL_ARGS...] : 4 GETs on one keep-alive connection (curl reuses it);
# prints one line per response: "STATUS X-BACKEND SERVERID-COOKIE" ("-" when absent).
probe_http() {
    local port=$1; shift
    local u=http://127.0.0.1:$port/
    curl -sSi --max-time 5 "$@" "$u" "$u" "$u" "$u" 2>&1 | tr -d '\r' | awk '
        /^HTTP\// { if (n++) print s, b, c; s = $2; b = "-"; c = "-"; next }
        tolower($1) == "x-backend:" { b = $2 }
        tolower($0) ~ /^set-cookie: *serverid=/ { sub(/^[^=]*=/, ""); sub(/;.*/, ""); c = $0 }
        END { if (n) print s, b, c; else print "no-response - -" }'
}

# check_http TARGET PORT -> sets CK (cookie value that routes to s1, or "") and HTTP_OK (0/1);
# adds a note with what the probe saw, with and without the cookie.
check_http() {
    local t=$1 port=$2 a b nck st
    a=$(probe_http "$port")
    nck=$(awk '$1 == 200 && $3 != "-"' <<<"$a" | wc -l)
    CK=$(awk '$2 == "s1" && $3 != "-" { print $3; exit }' <<<"$a")
    [ -n "$CK" ] || CK=$(awk '$3 != "-" { print $3; exit }' <<<"$a")
    HTTP_OK=1
    if ((nck == 0)) || [ -z "$CK" ]; then
        HTTP_OK=0
        NOTES+=("row 5 / $t: no SERVERID Set-Cookie in the responses (status backend cookie: $(paste -sd, <<<"$a")): not measured")
        log "row 5: $t inserts no SERVERID cookie: $(paste -sd, <<<"$a")"
        return
    fi
    b=$(probe_http "$port" -H "Cookie: SERVERID=$CK")
    st="ok"
    [ "$(awk '$1 == 200 { print $2 }' <<<"$b" | sort -u | wc -l)" = 1 ] &&
        [ "$(awk '$1 == 200' <<<"$b" | wc -l)" = 4 ] || st="NOT STICKY"
    NOTES+=("row 5 / $t: 4 requests on one connection without cookie -> $(awk '{ print $1 "/" $2 "/" ($3 == "-" ? "no-cookie" : "cookie") }' <<<"$a" | paste -sd' '); with \`Cookie: SERVERID=$CK\` -> $(awk '{ print $1 "/" $2 "/" ($3 == "-" ? "no-cookie" : "cookie") }' <<<"$b" | paste -sd' ') ($st)")
    log "row 5: $t: cookie $CK; sticky check $st"
}

# ---- row 6: UDP request/response (DNS-like), nginx stream instead of HAProxy (no UDP there)
start_udp_echo() { # start_udp_echo -> ECHO_PORT : the UDP echo backend (benches/load/udpload.rs) on a port of its own choosing
    local deadline=$((SECONDS + 30))
    start udp-echo "${PIN_LOAD[@]}" "$UDPLOAD_BIN" echo 127.0.0.1:0
    until ECHO_PORT=$(sed -n 's/^bound 127\.0\.0\.1://p' "$TMP/udp-echo.log") && [ -n "$ECHO_PORT" ]; do
        alive "$LAST_PID" || { tail -n 20 "$TMP/udp-echo.log" >&2; die "udp-echo exited during start-up"; }
        ((SECONDS < deadline)) || die "udp-echo did not bind within 30 s"
        sleep 0.05
    done
}

start_nginx_udp() { # start_nginx_udp BACKEND_PORT -> NGX_PID NGX_PORT (3 tries at a free port)
    for _ in 1 2 3; do
        read -r NGX_PORT < <(free_ports 1 udp)
        start_nginx_udp_at "$NGX_PORT" "$1" && return 0
    done
    die "nginx-udp: no free udp port in 3 tries"
}
start_nginx_udp_at() { # start_nginx_udp_at LISTEN_PORT BACKEND_PORT -> NGX_PID
    local dir=$TMP/nginx-udp
    mkdir -p "$dir/logs"
    # proxy_responses 1: a session ends with its one reply (a DNS query); proxy_timeout as
    # switchyard's idle_timeout, for sessions whose reply never comes.
    cat >"$dir/nginx.conf" <<EOF
$NGX_STREAM
worker_processes $PROXY_THREADS;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections 10000; }
stream {
    server {
        listen 127.0.0.1:$1 udp;
        proxy_pass 127.0.0.1:$2;
        proxy_responses 1;
        proxy_timeout 5s;
    }
}
EOF
    start nginx-udp "${PIN_PROXY[@]}" nginx -p "$dir" -c "$dir/nginx.conf"
    NGX_PID=$LAST_PID
    wait_udp "$1" "$NGX_PID" nginx-udp
}

# start_switchyard_udp BACKEND_PORT -> SY_PID SY_PORT (3 tries at a free port); returns 1 (and
# adds a note) when this build rejects the config.
start_switchyard_udp() {
    for _ in 1 2 3; do
        read -r SY_PORT < <(free_ports 1 udp)
        start_switchyard_udp_at "$SY_PORT" "$1" && return 0
        (($? == 2)) && return 1
    done
    die "switchyard-udp: no free udp port in 3 tries"
}
start_switchyard_udp_at() { # start_switchyard_udp_at LISTEN_PORT BACKEND_PORT -> SY_PID; 2 = config rejected
    local cfg=$TMP/switchyard-udp.toml
    cat >"$cfg" <<EOF
[[listener]]
name = "dns"
bind = "127.0.0.1:$1"
mode = "udp"
algorithm = "roundrobin"
udp_replies = 1
idle_timeout = "5s"
[[listener.backend]]
name = "b1"
address = "127.0.0.1:$2"
EOF
    start_checked_switchyard switchyard-udp "$cfg" "row 6" "UDP" || return 2
    wait_udp "$1" "$SY_PID" switchyard-udp
}

# ---- row 8: TLS termination in HTTP mode, HAProxy and switchyard, one nginx backend
# make_certs -> $TMP/tls/{ec,rsa}.{crt,key} and .pem (certificate + key, as HAProxy's `crt`
# wants it): self-signed for bench.test, ECDSA P-256 and RSA 2048, valid for a week
make_certs() {
    local d=$TMP/tls k
    mkdir -p "$d"
    for k in ec rsa; do
        local newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)
        [ "$k" = ec ] || newkey=(-newkey rsa:2048)
        openssl req -x509 "${newkey[@]}" -nodes -keyout "$d/$k.key" -out "$d/$k.crt" -days 7 \
            -subj "/CN=bench.test" -addext "subjectAltName=DNS:bench.test" >"$d/$k.log" 2>&1 ||
            { cat "$d/$k.log" >&2; die "openssl req ($k) failed"; }
        cat "$d/$k.crt" "$d/$k.key" >"$d/$k.pem"
    done
}

# start_haproxy_tls EC_PORT RSA_PORT BACKEND_PORT -> HAP_PID : `mode http`, one frontend per key
# type. `curves X25519:P-256`: HAProxy's default for TLS 1.2 is P-256 alone (`ecdhe
# prime256v1`), rustls prefers X25519 in both versions; so both use X25519 everywhere.
# `http-reuse always`: a backend connection left idle by one client connection may carry
# the first request of the next, as switchyard's idle pool does (HAProxy's default `safe`
# opens one per client connection for its first request, which with one request per
# connection in rows 8a-8c would be a backend connect per handshake that switchyard does not make).
start_haproxy_tls() {
    cat >"$TMP/haproxy-tls.cfg" <<CFG
global
    nbthread $PROXY_THREADS
    maxconn $HAP_MAXCONN
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe_ec
    bind 127.0.0.1:$1 ssl crt $TMP/tls/ec.pem alpn http/1.1 curves X25519:P-256
    default_backend be
frontend fe_rsa
    bind 127.0.0.1:$2 ssl crt $TMP/tls/rsa.pem alpn http/1.1 curves X25519:P-256
    default_backend be
backend be
    server s1 127.0.0.1:$3
CFG
    start haproxy-tls "${PIN_PROXY[@]}" haproxy -db -f "$TMP/haproxy-tls.cfg"
    HAP_PID=$LAST_PID
    wait_listen "$1" "$HAP_PID" haproxy-tls
    wait_listen "$2" "$HAP_PID" haproxy-tls
}

# start_switchyard_tls EC_PORT RSA_PORT BACKEND_PORT -> SY_PID : two `mode = "http"` listeners
# with [listener.tls] (min_version the default "1.2"), one per key type; returns 1 (and adds a
# note) when this build rejects the config (one without TLS termination).
start_switchyard_tls() {
    local cfg=$TMP/switchyard-tls.toml k port
    : >"$cfg"
    for k in ec rsa; do
        port=$1; [ "$k" = ec ] || port=$2
        cat >>"$cfg" <<CFG
[[listener]]
name = "tls-$k"
bind = "127.0.0.1:$port"
mode = "http"
algorithm = "roundrobin"
[listener.health_check]
interval = "1h"
timeout = "1s"
[listener.tls]
certificates = [ { cert = "$TMP/tls/$k.crt", key = "$TMP/tls/$k.key" } ]
[[listener.backend]]
name = "s1"
address = "127.0.0.1:$3"
CFG
    done
    start_checked_switchyard switchyard-tls "$cfg" "row 8" "TLS" || return 1
    wait_listen "$1" "$SY_PID" switchyard-tls
    wait_listen "$2" "$SY_PID" switchyard-tls
}

# probe_tls TARGET PORT WHAT : a note with what `openssl s_client` (the library wrk uses, with
# its defaults: what row 8d negotiates) and curl see: protocol, suite, group, signature, status
probe_tls() {
    local t=$1 port=$2 what=$3 s c
    s=$(timeout 10 openssl s_client -brief -connect "127.0.0.1:$port" -servername bench.test </dev/null 2>&1 |
        awk -F': *' '/^(Protocol version|Ciphersuite|Signature type|Server Temp Key|Negotiated TLS1.3 group)/ { printf "%s%s", sep, $2; sep = ", " }') || true
    c=$(curl -sk --max-time 5 -o /dev/null -w '%{http_code}' --resolve "bench.test:$port:127.0.0.1" "https://bench.test:$port/" 2>&1) || true
    NOTES+=("row 8 / $t / $what: openssl s_client with its defaults: ${s:-no handshake}; curl GET: ${c:-failed}")
    log "row 8: $t $what: ${s:-no handshake}; curl $c"
}

session_pids() { # session_pids SID -> the pids of the processes in session SID (nginx: master and worker)
    ps -o pid= -s "$1" | awk '{ print $1 }'
}

run_udp() { # run_udp TARGET PORT [PROXY_PID] : udpload against PORT; proxy CPU = PROXY_PID's session
    local t=$1 port=$2 out=$TMP/udp-$1-r$ROUND.txt cpu=() pid
    if [ -n "${3:-}" ]; then
        for pid in $(session_pids "$3"); do cpu+=(--cpu-pid "$pid"); done
    fi
    "${PIN_LOAD[@]}" "$UDPLOAD_BIN" load "127.0.0.1:$port" --sockets "$UDP_SOCKETS" --outstanding "$UDP_OUTSTANDING" \
        --size "$UDP_SIZE" --duration "$DURATION" --warmup "$WARMUP" --timeout-ms "$UDP_TIMEOUT_MS" "${cpu[@]}" \
        >"$out" 2>&1 || true
    # one line: replies=N sent=N lost=N late=N bad=N refused=N send_err=N seconds=S rate=N ... cpu_s=S
    local -A u=()
    local kv
    for kv in $(grep -m1 '^replies=' "$out" || true); do u[${kv%%=*}]=${kv#*=}; done
    if [ -z "${u[rate]:-}" ]; then
        log "udpload against $t failed:"; sed 's/^/    /' "$out" >&2
        add udp-rate "$t" err; add udp-cpu "$t" err; add udp-busy "$t" err; add udp-wait "$t" err; add udp-lost "$t" err
        return
    fi
    add udp-rate "$t" "${u[rate]}"
    add udp-lost "$t" "${u[lost]}"
    if [ -n "${3:-}" ]; then
        add udp-cpu "$t" "$(awk -v c="${u[cpu_s]}" -v n="${u[replies]}" 'BEGIN { if (n > 0) printf "%.2f", c * 1e6 / n; else print "err" }')"
        add udp-busy "$t" "$(awk -v c="${u[cpu_s]}" -v s="${u[seconds]}" 'BEGIN { printf "%.0f", 100 * c / s }')"
        add udp-wait "$t" "$(awk -v w="${u[wait_s]}" -v s="${u[seconds]}" 'BEGIN { printf "%.0f", 100 * w / s }')"
    else
        add udp-cpu "$t" n/a; add udp-busy "$t" n/a; add udp-wait "$t" n/a
    fi
    ((u[lost] + u[late] + u[bad] + u[refused] + u[send_err] == 0)) ||
        NOTES+=("udp / $t / round $ROUND: ${u[lost]} lost (no reply within $UDP_TIMEOUT_MS ms), ${u[late]} late, ${u[bad]} bad, ${u[refused]} refused (ICMP), ${u[send_err]} send errors")
    log "  udp $t: ${u[rate]} replies/s, ${u[lost]} lost${3:+, proxy CPU ${u[cpu_s]} s, waited for it ${u[wait_s]} s}"
}

# log_problems NAME : add a note with the ERROR/WARN (switchyard) or ALERT/WARNING (HAProxy)
# lines of $TMP/NAME.log
log_problems() {
    local f=$TMP/$1.log n
    [ -f "$f" ] || return 0
    n=$(grep -cE ' (ERROR|WARN) |\[(ALERT|WARNING)\]' "$f" || true)
    ((n > 0)) || return 0
    NOTES+=("$1: $n ERROR/WARN lines in $f, first: $(grep -m3 -E ' (ERROR|WARN) |\[(ALERT|WARNING)\]' "$f" | cut -c1-300 | paste -sd'|')")
}

# ngx_stream_log ROW : a note with the lines nginx stream's error log got since the last call.
# In row 3 `iperf3 -s` resets its data connections at the end of each test; nginx logs that
# (a `recv()`/`writev()` failed (104: Connection reset by peer) ... upstream line per stream,
# the other proxies see the same resets and log nothing): counted there, not listed.
NGX_LOG_SEEN=0
ngx_stream_log() {
    local f=$TMP/nginx-stream/logs/error.log new n r=0 rst='\(104: Connection reset by peer\) while proxying and (reading from|sending to) upstream'
    [ -s "$f" ] || return 0
    new=$(tail -n +"$((NGX_LOG_SEEN + 1))" "$f")
    NGX_LOG_SEEN=$(wc -l <"$f")
    [ -n "$new" ] || return 0
    if [ "$1" = 3 ]; then
        r=$(grep -cE "$rst" <<<"$new" || true)
        new=$(grep -vE "$rst" <<<"$new" || true)
        ((r == 0)) || NOTES+=("row 3 / nginx stream: $r \`Connection reset by peer ... upstream\` lines in its error log: iperf3's server resetting its data connections at the end of each test")
    fi
    [ -n "$new" ] || return 0
    n=$(wc -l <<<"$new")
    NOTES+=("row $1 / nginx stream: $n lines in its error log ($f), first: $(head -n 3 <<<"$new" | cut -c1-300 | paste -sd'|')")
}

# ---------------------------------------------------------------- workloads
TARGETS=(direct haproxy nginx switchyard)
declare -A R   # R[metric,target] = values, one per round, space-separated
add() { R[$1,$2]="${R[$1,$2]:-}${R[$1,$2]:+ }$3"; }

# in_order ROUND [TARGET...] -> the targets (default TARGETS) rotated by ROUND (so no target always runs first or last)
in_order() {
    local r=$1 i; shift
    local ts=("$@"); ((${#ts[@]})) || ts=("${TARGETS[@]}")
    for ((i = 0; i < ${#ts[@]}; i++)); do echo "${ts[(i + r) % ${#ts[@]}]}"; done
}

to_ms() { # wrk latency "812.00us" / "1.20ms" / "1.01s" -> ms
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
        printf "%.3f", n }'
}

# ---- proxy CPU: utime+stime (all threads) of the processes in the proxy's session, as row 6
CLK_TCK=$(getconf CLK_TCK)
ticks() { # ticks PID... -> "ALL SYS": utime+stime and stime alone summed over the PIDs, in clock ticks
    local pid st f sum=0 sys=0
    for pid in "$@"; do
        read -r st 2>/dev/null <"/proc/$pid/stat" || continue
        read -ra f <<<"${st##*) }"   # f[0] = state (field 3): utime, stime = fields 14, 15
        sum=$((sum + f[11] + f[12])) sys=$((sys + f[12]))
    done
    echo "$sum $sys"
}
# cpus_jiffies LIST -> "BUSY TOTAL": jiffies of the CPUs of a comma-separated list (/proc/stat),
# busy = user, nice, system, irq, softirq; total adds idle, iowait and steal (guest time is
# already inside user)
cpus_jiffies() {
    awk -v list="$1" 'BEGIN { n = split(list, c, ","); for (i = 1; i <= n; i++) want["cpu" c[i]] = 1 }
        $1 in want { b += $2 + $3 + $4 + $7 + $8; t += $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }
        END { printf "%d %d\n", b, t }' /proc/stat
}
waited() { # waited PID... -> ns their threads spent runnable, waiting for a CPU (schedstat field 2)
    local pid f st sum=0
    for pid in "$@"; do
        for f in /proc/"$pid"/task/*/schedstat; do
            read -r st 2>/dev/null <"$f" || continue
            st=${st#* }; sum=$((sum + ${st%% *}))
        done
    done
    echo "$sum"
}
# cpu_start TARGET : start counting the CPU time of TARGET's proxy (PID_<TARGET>'s session;
# nothing for direct); cpu_stop -> CPU_S (seconds of CPU), SYS_S (of which in the kernel),
# WAIT_S (seconds runnable but not running: other work on the proxy CPU), WALL_S (seconds since
# cpu_start) and LOAD_BUSY (% of LOAD_CPU's time busy: load generators, backends, their kernel work)
cpu_start() {
    local p=PID_$1
    CPU_PIDS=()
    [ -z "${!p:-}" ] || mapfile -t CPU_PIDS < <(session_pids "${!p}")
    read -r CPU_T0 SYS_T0 < <(ticks "${CPU_PIDS[@]}")
    read -r LOAD_B0 LOAD_T0 < <(cpus_jiffies "$LOAD_CPU")
    CPU_W0=$(waited "${CPU_PIDS[@]}") WALL_T0=$EPOCHREALTIME
}
cpu_stop() {
    local t1 s1 q1 lb lt w1=$EPOCHREALTIME
    read -r t1 s1 < <(ticks "${CPU_PIDS[@]}")
    read -r lb lt < <(cpus_jiffies "$LOAD_CPU")
    q1=$(waited "${CPU_PIDS[@]}")
    CPU_S=$(awk -v a="$CPU_T0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", (b - a) / hz }')
    SYS_S=$(awk -v a="$SYS_T0" -v b="$s1" -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", (b - a) / hz }')
    WAIT_S=$(awk -v a="$CPU_W0" -v b="$q1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    WALL_S=$(awk -v a="$WALL_T0" -v b="$w1" 'BEGIN { printf "%.3f", b - a }')
    LOAD_BUSY=$(awk -v b0="$LOAD_B0" -v t0="$LOAD_T0" -v b1="$lb" -v t1="$lt" 'BEGIN { printf "%.0f", (t1 > t0 ? 100 * (b1 - b0) / (t1 - t0) : 0) }')
}
# add_busy KEY TARGET : add KEY-busy, "B/W": the proxy's CPU time (B) and its time waiting for
# its CPU (W) in % of the measured seconds (n/a for direct), and KEY-load: LOAD_BUSY
add_busy() {
    add "$1-load" "$2" "$LOAD_BUSY"
    if ((${#CPU_PIDS[@]} == 0)); then add "$1-busy" "$2" n/a; return; fi
    add "$1-busy" "$2" "$(awk -v c="$CPU_S" -v w="$WAIT_S" -v s="$WALL_S" 'BEGIN { printf "%.0f/%.0f", 100 * c / s, 100 * w / s }')"
}
# add_cpu KEY TARGET N : add KEY-cpu (µs of proxy CPU per each of N requests), KEY-sys (of which
# in the kernel), KEY-busy and KEY-load; n/a for direct
add_cpu() {
    add_busy "$1" "$2"
    if ((${#CPU_PIDS[@]} == 0)); then add "$1-cpu" "$2" n/a; add "$1-sys" "$2" n/a; return; fi
    add "$1-cpu" "$2" "$(awk -v c="$CPU_S" -v n="$3" 'BEGIN { if (n > 0) printf "%.2f", c * 1e6 / n; else print "err" }')"
    add "$1-sys" "$2" "$(awk -v c="$SYS_S" -v n="$3" 'BEGIN { if (n > 0) printf "%.2f", c * 1e6 / n; else print "err" }')"
}

WRK_SCHEME=http WRK_HOST=127.0.0.1 # row 8d: https, and a name for wrk to send as SNI
run_wrk() { # run_wrk KEY TARGET PORT [extra wrk args...] : KEY-rps, KEY-p99, KEY-cpu, KEY-busy
    local key=$1 t=$2 port=$3; shift 3
    local out=$TMP/wrk-$key-$t-r$ROUND.txt url=$WRK_SCHEME://$WRK_HOST:$port/
    if ((WARMUP > 0)); then
        "${PIN_LOAD[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${WARMUP}s" "$@" "$url" >/dev/null 2>&1 || true
    fi
    cpu_start "$t"
    "${PIN_LOAD[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DURATION}s" --latency "$@" "$url" >"$out" 2>&1 || true
    cpu_stop
    local rps p99 errs non2xx n
    rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
    p99=$(awk '$1 == "99%" {print $2}' "$out")
    n=$(awk '$2 == "requests" && $3 == "in" {print $1}' "$out")
    errs=$(awk '/Socket errors:/ {gsub(",", ""); print "connect " $4 ", read " $6 ", write " $8 ", timeout " $10}' "$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$out")
    if [ -z "$rps" ] || [ -z "$p99" ] || [ -z "$n" ]; then
        log "wrk $key against $t failed:"; sed 's/^/    /' "$out" >&2
        add "$key-rps" "$t" err; add "$key-p99" "$t" err; add "$key-cpu" "$t" err; add "$key-busy" "$t" err
        return
    fi
    add "$key-rps" "$t" "$rps"
    add "$key-p99" "$t" "$(to_ms "$p99")"
    add_cpu "$key" "$t" "$n"
    [ -z "$errs" ] || NOTES+=("$key / $t / round $ROUND: wrk socket errors: $errs")
    [ -z "$non2xx" ] || NOTES+=("$key / $t / round $ROUND: $non2xx non-2xx responses")
    log "  $key $t: $rps req/s, p99 $p99${CPU_PIDS[0]:+, proxy CPU $CPU_S s, waited $WAIT_S s}"
}

run_iperf() { # run_iperf KEY TARGET PORT [iperf3 args...] : KEY (Gbit/s), KEY-cpu (proxy CPU ms per GB) and KEY-busy
    local key=$1 t=$2 port=$3; shift 3
    local out=$TMP/$key-$t-r$ROUND.json
    cpu_start "$t"
    "${PIN_LOAD[@]}" iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_DURATION" --connect-timeout 5000 -J "$@" >"$out" 2>&1 || true
    cpu_stop
    local g bytes
    read -r g bytes < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d: sys.exit(d["error"])
r = d["end"]["sum_received"]
print("%.2f %d" % (r["bits_per_second"] / 1e9, r["bytes"]))' "$out" 2>>"$TMP/$key-$t.err") || true
    if [ -z "${bytes:-}" ]; then
        log "iperf3 against $t failed:"; sed 's/^/    /' "$TMP/$key-$t.err" >&2
        add "$key" "$t" err; add "$key-cpu" "$t" err; add "$key-busy" "$t" err; return
    fi
    add "$key" "$t" "$g"
    # per GB received (1e9 bytes); the proxy moved each byte in and out once
    add_cpu "$key" "$t" "$(awk -v b="$bytes" 'BEGIN { printf "%.6f", b / 1e9 * 1000 }')"
    log "  $key $t: $g Gbit/s${CPU_PIDS[0]:+, proxy CPU $CPU_S s, waited $WAIT_S s}"
}

run_idle() { # run_idle TARGET PORT PID BACKEND_PORT : PID = the process whose VmRSS grows
    local t=$1 out=$TMP/idle-$1-r$ROUND.json
    if ! "${PIN_LOAD[@]}" python3 "$HERE/idle.py" measure --port "$2" --pid "$3" \
            --backend-port "$4" -n "$IDLE_CONNS" >"$out" 2>"$TMP/idle-$t.err"; then
        log "idle connections through $t failed:"; sed 's/^/    /' "$TMP/idle-$t.err" >&2
        add idle "$t" err; return
    fi
    local k
    k=$(python3 -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["kib_per_conn"])' "$out")
    add idle "$t" "$k"
    NOTES+=("idle / $t / round $ROUND: $(cat "$out")")
    log "  idle $t: $k KiB/conn"
}

# nginx_worker MASTER_PID -> the pid of the master's (one) worker, waiting up to 10 s for it
nginx_worker() {
    local deadline=$((SECONDS + 10)) p
    while ((SECONDS < deadline)); do
        p=$(ps -o pid= --ppid "$1" | awk 'NR == 1 { print $1 }')
        [ -z "$p" ] || { echo "$p"; return; }
        sleep 0.05
    done
    die "nginx $1 started no worker within 10 s"
}

run_redis() { # run_redis TARGET PORT : redis-get-rps, -p99, -cpu, -busy
    local t=$1 port=$2 out=$TMP/redis-$1-r$ROUND.csv n rate
    # Warm-up and calibration: 20 000 GETs, then as many as take DURATION s at that rate
    # (redis-benchmark counts requests, not seconds).
    rate=$("${PIN_LOAD[@]}" redis-benchmark -h 127.0.0.1 -p "$port" -c "$REDIS_CONNS" -n 20000 -t get --csv 2>&1 |
        awk -F'"' '$2 == "GET" { printf "%.0f", $4 }') || true
    n=$(awk -v r="${rate:-0}" -v d="$DURATION" 'BEGIN { n = int(r * d); print (n < 10000 ? 10000 : n) }')
    cpu_start "$t"
    "${PIN_LOAD[@]}" redis-benchmark -h 127.0.0.1 -p "$port" -c "$REDIS_CONNS" -n "$n" -t get --csv >"$out" 2>&1 || true
    cpu_stop
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    local rps p99
    rps=$(awk -F'"' '$2 == "GET" { printf "%.0f", $4 }' "$out")
    p99=$(awk -F'"' '$2 == "GET" { print $14 }' "$out")
    if [ -z "$rps" ] || [ -z "$p99" ]; then
        log "redis-benchmark against $t failed:"; sed 's/^/    /' "$out" >&2
        add redis-rps "$t" err; add redis-p99 "$t" err; add redis-cpu "$t" err; add redis-busy "$t" err
        return
    fi
    add redis-rps "$t" "$rps"
    add redis-p99 "$t" "$p99"
    add_cpu redis "$t" "$n"
    log "  redis GET $t: $rps ops/s ($n GETs), p99 $p99 ms${CPU_PIDS[0]:+, proxy CPU $CPU_S s, waited $WAIT_S s}"
}

# run_tls KEY TARGET PORT [tlsload args...] : new TLS connections with full handshakes
# (benches/load/tlsload) for DURATION s after WARMUP s: KEY-rps (handshakes/s), KEY-p99 (ms, a
# whole connection), KEY-cpu/-sys (proxy CPU µs per handshake), KEY-busy, KEY-load
TLS_SEEN=() # "KEY,TARGET" whose negotiated parameters are in the notes already
run_tls() {
    local key=$1 t=$2 port=$3; shift 3
    local out=$TMP/tls-$key-$t-r$ROUND.txt mode=()
    ((TLS_REQUEST)) || mode=(--handshake-only)
    if ((WARMUP > 0)); then
        "${PIN_LOAD[@]}" "$TLSLOAD_BIN" "127.0.0.1:$port" --conns "$TLS_CONNS" --duration "$WARMUP" "${mode[@]}" "$@" >/dev/null 2>&1 || true
    fi
    cpu_start "$t"
    "${PIN_LOAD[@]}" "$TLSLOAD_BIN" "127.0.0.1:$port" --conns "$TLS_CONNS" --duration "$DURATION" "${mode[@]}" "$@" >"$out" 2>&1 || true
    cpu_stop
    # handshakes=N in_window=N seconds=S rate=R errors=N resumed=N bad=N p50_ms=X p99_ms=Y version=V suite=S kx=K alpn=A
    local -A u=()
    local kv
    for kv in $(grep -m1 '^handshakes=' "$out" || true); do u[${kv%%=*}]=${kv#*=}; done
    if [ -z "${u[rate]:-}" ] || ((u[handshakes] == 0)); then
        log "tlsload $key against $t failed:"; sed 's/^/    /' "$out" >&2
        add "$key-rps" "$t" err; add "$key-p99" "$t" err; add "$key-cpu" "$t" err; add "$key-sys" "$t" err; add "$key-busy" "$t" err
        add "$key-load" "$t" err
        return
    fi
    add "$key-rps" "$t" "${u[rate]}"
    add "$key-p99" "$t" "${u[p99_ms]}"
    add_cpu "$key" "$t" "${u[handshakes]}"
    if [[ " ${TLS_SEEN[*]} " != *" $key,$t "* ]]; then
        TLS_SEEN+=("$key,$t")
        NOTES+=("$key / $t: tlsload negotiated ${u[version]}, ${u[suite]}, ${u[kx]}, ALPN ${u[alpn]}")
    fi
    ((u[errors] + u[resumed] + u[bad] == 0)) ||
        NOTES+=("$key / $t / round $ROUND: ${u[errors]} failed connections ($(grep -m1 '^tlsload:' "$out" | cut -c1-200)), ${u[resumed]} resumed handshakes, ${u[bad]} responses not 200")
    log "  $key $t: ${u[rate]} handshakes/s (${u[handshakes]} in all), p99 ${u[p99_ms]} ms${CPU_PIDS[0]:+, proxy CPU $CPU_S s, waited $WAIT_S s}"
}

NOTES=()
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "pinning: $pinning; ROUNDS=$ROUNDS DURATION=${DURATION}s WARMUP=${WARMUP}s CONNS=$CONNS IPERF_DURATION=${IPERF_DURATION}s IDLE_CONNS=$IDLE_CONNS"
# Is something else using the CPUs? Sample /proc/stat over one second.
BUSY=$(python3 - <<'EOF'
import time
def snap():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]
t0, i0 = snap(); time.sleep(1); t1, i1 = snap()
print(round(100 * (1 - (i1 - i0) / max(1, t1 - t0))))
EOF
)
if ((BUSY > 15)); then
    log "warning: the CPUs were ${BUSY}% busy before the run: other work on this machine adds noise"
    NOTES+=("the CPUs were ${BUSY}% busy just before the run: other work on the machine adds noise")
fi

# Rows 1-2: nginx backend
if want 1 || want 2; then
    read -r BP < <(free_ports 1)
    start_backend nginx "$BP"
    start_proxies "$BP"
    if want 1; then
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            log "row 1: wrk keep-alive (round $ROUND/$ROUNDS)"
            for t in $(in_order "$ROUND"); do p=PORT_$t; run_wrk ka "$t" "${!p}"; done
        done
    fi
    if want 2; then
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            log "row 2: wrk Connection: close (round $ROUND/$ROUNDS)"
            for t in $(in_order "$ROUND"); do p=PORT_$t; run_wrk close "$t" "${!p}" -H "Connection: close"; done
        done
    fi
    stop_all
    ngx_stream_log 1-2
    log_problems switchyard
    log_problems haproxy
fi

# Row 3: iperf3 backend; 3a one stream, 3b IPERF_STREAMS streams
if want 3; then
    read -r BP < <(free_ports 1)
    start_backend iperf3 "$BP"
    start_proxies "$BP"
    if want 3a; then
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            log "row 3a: iperf3, 1 stream (round $ROUND/$ROUNDS)"
            for t in $(in_order "$ROUND"); do p=PORT_$t; run_iperf iperf1 "$t" "${!p}"; done
        done
    fi
    if want 3b; then
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            log "row 3b: iperf3 -P $IPERF_STREAMS (round $ROUND/$ROUNDS)"
            for t in $(in_order "$ROUND"); do p=PORT_$t; run_iperf iperfn "$t" "${!p}" -P "$IPERF_STREAMS"; done
        done
    fi
    stop_all
    ngx_stream_log 3
    log_problems switchyard
    log_problems haproxy
fi

# Row 4: idle connections, one proxy at a time against a fresh holding backend
if want 4; then
    R[idle,direct]=n/a
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        log "row 4: $IDLE_CONNS idle connections (round $ROUND/$ROUNDS)"
        for t in $(in_order "$ROUND" haproxy nginx switchyard); do
            read -r BP LP < <(free_ports 2)
            start_backend hold "$BP"
            case $t in
                haproxy) start_haproxy "$LP" "$BP"; pid=$HAP_PID ;;
                # the worker holds the connections; the master's RSS does not move
                nginx) start_nginx_stream "$LP" "$BP"; pid=$(nginx_worker "$NGX_PID") ;;
                switchyard) start_switchyard "$LP" "$BP"; pid=$SY_PID ;;
            esac
            run_idle "$t" "$LP" "$pid" "$BP"
            stop_all
        done
    done
    ngx_stream_log 4
fi

# Row 5: HTTP mode, cookie stickiness, two nginx server blocks (one nginx, one worker);
# "direct" = straight to the first server block
if want 5; then
    read -r BP1 BP2 HP SP < <(free_ports 4)
    start_nginx nginx-http "$BP1" "$BP2"
    start_haproxy_http "$HP" "$BP1" "$BP2"
    PORT_direct=$BP1 PORT_haproxy=$HP PORT_switchyard=$SP PID_direct="" PID_haproxy=$HAP_PID PID_switchyard=""
    declare -A COOKIE=([direct]=s1)
    HTTP_TARGETS=(direct)
    check_http haproxy "$HP"
    ((HTTP_OK)) && { HTTP_TARGETS+=(haproxy); COOKIE[haproxy]=$CK; }
    if start_switchyard_http "$SP" "$BP1" "$BP2"; then
        PID_switchyard=$SY_PID
        check_http switchyard "$SP"
        ((HTTP_OK)) && { HTTP_TARGETS+=(switchyard); COOKIE[switchyard]=$CK; }
    fi
    for t in haproxy nginx switchyard; do
        [[ " ${HTTP_TARGETS[*]} " == *" $t "* ]] ||
            for k in hck hst; do R[$k-rps,$t]=n/a R[$k-p99,$t]=n/a R[$k-cpu,$t]=n/a R[$k-busy,$t]=n/a; done
    done
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        log "row 5: HTTP mode, wrk keep-alive without cookie (round $ROUND/$ROUNDS)"
        for t in $(in_order "$ROUND"); do
            [[ " ${HTTP_TARGETS[*]} " == *" $t "* ]] || continue
            p=PORT_$t; run_wrk hck "$t" "${!p}"
        done
    done
    if ((ROW5_STICKY)); then
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            log "row 5: HTTP mode, wrk keep-alive with the sticky cookie (round $ROUND/$ROUNDS)"
            for t in $(in_order "$ROUND"); do
                [[ " ${HTTP_TARGETS[*]} " == *" $t "* ]] || continue
                p=PORT_$t; run_wrk hst "$t" "${!p}" -H "Cookie: SERVERID=${COOKIE[$t]}"
            done
        done
    fi
    stop_all
    log_problems switchyard-http
    log_problems haproxy-http
fi

# Row 6: DNS-like UDP request/response, one echo backend; nginx stream stands in for HAProxy
# (which has no UDP proxying). Both proxies run for the whole row, each idle while the other is measured.
if want 6; then
    start_udp_echo
    start_nginx_udp "$ECHO_PORT"
    PORT_direct=$ECHO_PORT PORT_nginx=$NGX_PORT PID_direct="" PID_nginx=$NGX_PID
    UDP_TARGETS=(direct nginx)
    if start_switchyard_udp "$ECHO_PORT"; then
        UDP_TARGETS+=(switchyard) PORT_switchyard=$SY_PORT PID_switchyard=$SY_PID
    else
        R[udp-rate,switchyard]=n/a R[udp-cpu,switchyard]=n/a R[udp-busy,switchyard]=n/a R[udp-wait,switchyard]=n/a R[udp-lost,switchyard]=n/a
    fi
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        log "row 6: UDP request/response, $UDP_OUTSTANDING outstanding from $UDP_SOCKETS sockets (round $ROUND/$ROUNDS)"
        for t in $(in_order "$ROUND" "${UDP_TARGETS[@]}"); do
            p=PORT_$t; q=PID_$t; run_udp "$t" "${!p}" "${!q}"
        done
    done
    stop_all
    log_problems switchyard-udp
    if [ -s "$TMP/nginx-udp/logs/error.log" ]; then
        NOTES+=("nginx-udp: $(wc -l <"$TMP/nginx-udp/logs/error.log") lines in its error log, first: $(head -n 3 "$TMP/nginx-udp/logs/error.log" | cut -c1-300 | paste -sd'|')")
    fi
fi

# Row 7: redis GET through each proxy (redis-benchmark -c REDIS_CONNS -t get), redis-server
# on the load CPU
if want 7; then
    read -r BP < <(free_ports 1)
    start_backend redis "$BP"
    start_proxies "$BP"
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        log "row 7: redis-benchmark -c $REDIS_CONNS -t get (round $ROUND/$ROUNDS)"
        for t in $(in_order "$ROUND"); do p=PORT_$t; run_redis "$t" "${!p}"; done
    done
    stop_all
    ngx_stream_log 7
    log_problems switchyard
    log_problems haproxy
fi
# Row 8: TLS termination in HTTP mode, HAProxy vs switchyard, one nginx backend (1 worker).
# 8a-8c: a full handshake per connection (tlsload), 8d: keep-alive requests (wrk https).
# Both proxies run for the whole row, each idle while the other is measured.
if want 8; then
    make_certs
    read -r BP HE HR SE SR < <(free_ports 5)
    start_nginx nginx-tls "$BP"
    start_haproxy_tls "$HE" "$HR" "$BP"
    PORT_haproxy=$HE RSA_PORT_haproxy=$HR PID_haproxy=$HAP_PID
    TLS_TARGETS=(haproxy)
    probe_tls haproxy "$HE" "ECDSA P-256"
    probe_tls haproxy "$HR" "RSA 2048"
    if start_switchyard_tls "$SE" "$SR" "$BP"; then
        TLS_TARGETS+=(switchyard) PORT_switchyard=$SE RSA_PORT_switchyard=$SR PID_switchyard=$SY_PID
        probe_tls switchyard "$SE" "ECDSA P-256"
        probe_tls switchyard "$SR" "RSA 2048"
    fi
    hs_what="one GET"; ((TLS_REQUEST)) || hs_what="close_notify at once (no request)"
    # sub-row key tlsload-arguments port-variable label
    for sub in "8a tls-ec13 PORT --tls 1.3" "8b tls-rsa13 RSA_PORT --tls 1.3" "8c tls-ec12 PORT --tls 1.2"; do
        read -r sub_row key pv args <<<"$sub"
        want "$sub_row" || continue
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            log "row $sub_row: full TLS handshakes ($key, $TLS_CONNS connections, $hs_what) (round $ROUND/$ROUNDS)"
            for t in $(in_order "$ROUND" "${TLS_TARGETS[@]}"); do
                # $args unquoted: "--tls 1.3" is two arguments
                p=${pv}_$t; run_tls "$key" "$t" "${!p}" $args
            done
        done
    done
    if want 8d; then
        # wrk sends its URL's host as SNI; an IP address there is not allowed (RFC 6066), and
        # rustls logs a WARN line for each such connection. `localhost`, if it is 127.0.0.1 here.
        WRK_SCHEME=https
        if [ "$(getent ahosts localhost | awk 'NR == 1 { print $1 }')" = 127.0.0.1 ]; then
            WRK_HOST=localhost
        else
            NOTES+=("row 8d: localhost is not 127.0.0.1 first here, so wrk ran against https://127.0.0.1:PORT/ and sent that IP address as SNI")
        fi
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            log "row 8d: wrk keep-alive over TLS (round $ROUND/$ROUNDS)"
            for t in $(in_order "$ROUND" "${TLS_TARGETS[@]}"); do p=PORT_$t; run_wrk tls-ka "$t" "${!p}"; done
        done
        WRK_SCHEME=http WRK_HOST=127.0.0.1
    fi
    stop_all
    log_problems switchyard-tls
    log_problems haproxy-tls
fi
# ---------------------------------------------------------------- report
ratio() { # ratio SWITCHYARD HAPROXY
    awk -v s="$1" -v h="$2" 'BEGIN {
        if (s !~ /^[0-9.]+$/ || h !~ /^[0-9.]+$/ || h + 0 == 0) print "n/a"; else printf "%.2f", s / h }'
}
median() { # median "v1 v2 ..." -> median of the numeric values; "err"/"n/a" if there is none
    local nums
    nums=$(printf '%s\n' $1 | grep -E '^-?[0-9.]+$' | sort -g || true)
    if [ -z "$nums" ]; then printf '%s\n' ${1:-n/a} | head -n 1; return; fi
    awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }' <<<"$nums"
}
fmt() { # fmt VALUE DECIMALS
    awk -v v="$1" -v d="$2" 'BEGIN { if (v ~ /^-?[0-9.]+$/) printf "%.*f", d, v; else print v }'
}
spread() { # spread "a1 a2 ..." "b1 b2 ..." -> "min-max" of the per-round ratios a_i/b_i ("" if none)
    awk -v a="$1" -v b="$2" 'BEGIN {
        n = split(a, x, " "); split(b, y, " ")
        for (i = 1; i <= n; i++) {
            if (x[i] !~ /^[0-9.]+$/ || y[i] !~ /^[0-9.]+$/ || y[i] + 0 == 0) continue
            r = x[i] / y[i]; if (!k++ || r < lo) lo = r; if (k == 1 || r > hi) hi = r
        }
        if (k) printf "%.2f-%.2f", lo, hi }'
}
total() { # total "v1 v2 ..." -> sum of the numeric values, or the first non-numeric one
    awk -v v="$1" 'BEGIN { n = split(v, x, " "); if (!n) { print "n/a"; exit }
        for (i = 1; i <= n; i++) { if (x[i] !~ /^[0-9]+$/) { print x[i]; exit } s += x[i] } print s }'
}

echo
echo "## switchyard load benchmark ($STARTED)"
echo
echo "switchyard $rev ($SWITCHYARD_BIN), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}'), $(nginx -v 2>&1 | sed 's/.*: //'),"\
     "$(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}'), $(iperf3 -v | head -1 | awk '{print "iperf3 " $2}'); $(uname -r), $ncpu CPUs, $pinning."
if want 1 || want 2 || want 3 || want 4 || want 5 || want 7; then
    redis=""
    ! want 7 || redis="; redis-benchmark -c $REDIS_CONNS -t get against redis-server $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"\
" (run as ${REDIS_RAN_AS:-?}, no persistence): 20 000 GETs of warm-up, then as many as take ${DURATION}s at that rate"
    echo "wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s --latency (after ${WARMUP}s warm-up); iperf3 -t $IPERF_DURATION (3b: -P $IPERF_STREAMS);"\
         "$IDLE_CONNS idle connections$redis."\
         "HAProxy \`mode tcp\`, \`nbthread $PROXY_THREADS\`, maxconn $HAP_MAXCONN; nginx stream $PROXY_THREADS worker(s), \`proxy_timeout 1h\`, no access log,"\
         "worker_connections $NGX_CONNS; switchyard one listener, roundrobin, one backend. Proxy CPU = utime+stime of the proxy's"\
         "processes (nginx: master and worker; switchyard: all threads) from the start to the end of the measured run, per request"\
         "(rows 1, 5), per new connection (row 2), per GET (row 7) or, in ms, per GB received by iperf3 (rows 3a, 3b); busy = that CPU time / the same seconds; waiting = their"\
         "run-queue time (/proc/PID/task/*/schedstat) / the same seconds: other work on the proxy CPU (0 is clean)."\
         "Median of $ROUNDS rounds, targets in rotating order; ratios are of the medians, with the range of the per-round ratios in brackets."
fi
if want 5; then
    echo "Row 5: two nginx server blocks (one nginx worker); HAProxy \`mode http\`, \`balance roundrobin\`, \`cookie SERVERID insert indirect nocache\`;"\
         "switchyard \`mode = \"http\"\`, roundrobin, \`[listener.sticky] method = \"lbcookie\"\`; direct = the first server block."\
         "\"cookie insert\": wrk sends no cookie, so every request is balanced and answered with a Set-Cookie;"\
         "\"sticky cookie\": wrk sends \`Cookie: SERVERID=<s1's value>\` (HAProxy \`s1\`, switchyard: taken from its Set-Cookie)."
fi
if want 6; then
    echo "Row 6: UDP request/response, one echo backend (\`udpload echo\`, recvmmsg/sendmmsg); \`udpload load\` keeps $UDP_OUTSTANDING datagrams"\
         "of $UDP_SIZE bytes outstanding from $UDP_SOCKETS client sockets for ${DURATION}s (after ${WARMUP}s warm-up), a reply missing for"\
         "over $UDP_TIMEOUT_MS ms = lost; nginx stream \`listen udp\`, \`proxy_responses 1\`, \`proxy_timeout 5s\`, 1 worker;"\
         "switchyard \`mode = \"udp\"\`, \`udp_replies = 1\`, \`idle_timeout = \"5s\"\`, one backend. HAProxy has no UDP proxying: not in this row."\
         "Proxy CPU = utime+stime of the proxy's processes (nginx: master and worker; switchyard: all threads) over the counted seconds;"\
         "waiting = their run-queue time (/proc/PID/task/*/schedstat) over the same seconds."\
         "Median of $ROUNDS rounds; ratios are of the medians, with the range of the per-round ratios in brackets."
fi
if want 8; then
    ! want 8d || TLS_8D_WHAT="8d: \`wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s --latency https://localhost:PORT/\` keep-alive (wrk's OpenSSL defaults; what it negotiated is in the notes)."
    echo "Row 8: TLS termination, HTTP mode, one nginx backend (1 worker, 128-byte file) on CPU $LOAD_CPU; self-signed bench.test certificates"\
         "made with $(openssl version | awk '{print $1 " " $2}'), ECDSA P-256 and RSA 2048; HAProxy \`mode http\`, \`nbthread $PROXY_THREADS\`,"\
         "\`bind ... ssl crt <certificate+key PEM> alpn http/1.1 curves X25519:P-256\`, \`http-reuse always\`, $(haproxy -vv 2>/dev/null | sed -n 's/^Running on OpenSSL version : \(OpenSSL [^ ]*\).*/\1/p' | head -n 1);"\
         "switchyard \`mode = \"http\"\` with \`[listener.tls]\` (rustls, ring). 8a-8c: \`tlsload\` (benches/load/tlsload, rustls client on CPU $LOAD_CPU),"\
         "$TLS_CONNS connections at a time, each a new TCP connection and a full handshake (the client asks for tickets and"\
         "never uses one; resumed handshakes counted, 0 expected), then $hs_what; one cipher suite"\
         "(TLS 1.3: TLS_AES_128_GCM_SHA256, 1.2: ECDHE-*-AES128-GCM-SHA256), groups X25519 (the key share) and P-256; ${DURATION}s after ${WARMUP}s of warm-up;"\
         "handshakes/s counts those done within the ${DURATION}s, CPU per handshake divides by all done (those in progress at the end included)."\
         "${TLS_8D_WHAT:-}"\
         "Proxy CPU as in the other rows; load CPU busy = CPU $LOAD_CPU's busy time (client, nginx, their kernel work) over the same seconds."\
         "Median of $ROUNDS rounds, the two proxies in alternating order; ratios are of the medians, with the range of the per-round ratios in brackets."
fi
if want 1 || want 2 || want 3 || want 4 || want 5 || want 7; then
    echo
    echo "| # | workload | direct | HAProxy | nginx stream | switchyard | switchyard/HAProxy | switchyard/nginx |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
fi
# ratio_sp KEY A B -> "median(A)/median(B) (lowest-highest of the same round's A/B)", or n/a
ratio_sp() {
    local r sp
    r=$(ratio "$(median "${R[$1,$2]:-}")" "$(median "${R[$1,$3]:-}")")
    [ "$r" != n/a ] || { echo n/a; return; }
    sp=$(spread "${R[$1,$2]:-}" "${R[$1,$3]:-}")
    echo "$r${sp:+ ($sp)}"
}
# row NUM LABEL KEY DECIMALS [KIND] : one table line, the median of each target; KIND = ratios
# (default: switchyard/HAProxy and switchyard/nginx), none (no ratios), frac (each proxy's
# figure as a fraction of direct's, with the per-round range; no ratio columns), floor (KEY-sys
# of each proxy over HAProxy's KEY-cpu: the ratio to HAProxy that proxy would reach with no
# user-space CPU at all, what its kernel work alone costs; no ratio columns)
row() {
    want "$1" || return 0
    local kind=${5:-ratios} t v cells="" rh="" rn=""
    for t in direct haproxy nginx switchyard; do
        if [ "$1" = 5 ] && [ "$t" = nginx ]; then
            v="n/a (L4 only)"
        elif [ "$kind" = frac ]; then
            if [ "$t" = direct ]; then v=1.00; else v=$(ratio_sp "$3" "$t" direct); fi
        elif [ "$kind" = floor ]; then # KEY is a -sys key: this target's kernel CPU / HAProxy's whole CPU
            if [ "$t" = direct ]; then v=n/a; else v=$(ratio "$(median "${R[$3,$t]:-}")" "$(median "${R[${3%-sys}-cpu,haproxy]:-}")"); fi
        elif [ "$kind" = bw ]; then # values "busy/waiting": the median of each
            v=${R[$3,$t]:-n/a}
            [[ $v == *[0-9]/[0-9]* ]] &&
                v="$(fmt "$(median "$(printf '%s\n' $v | cut -d/ -f1)")" 0) / $(fmt "$(median "$(printf '%s\n' $v | cut -sd/ -f2)")" 0)" ||
                v=$(median "$v")
        else
            v=$(fmt "$(median "${R[$3,$t]:-}")" "$4")
        fi
        cells+=" $v |"
    done
    if [ "$kind" = ratios ]; then
        rh=$(ratio_sp "$3" switchyard haproxy); rn=$(ratio_sp "$3" switchyard nginx)
    fi
    echo "| $1 | $2 |$cells $rh | $rn |"
}
row 1 "keep-alive req/s (higher is better)" ka-rps 0
row 1 "keep-alive proxy CPU µs per request (lower is better)" ka-cpu 2
row 1 "keep-alive p99 latency ms (lower is better)" ka-p99 2
row 1 "keep-alive proxy CPU busy / waiting for its CPU, %" ka-busy 0 bw
row 1 "keep-alive proxy kernel CPU µs per request (stime)" ka-sys 2
row 1 "keep-alive floor: proxy's kernel CPU / HAProxy's whole CPU" ka-sys 2 floor
row 2 "Connection: close req/s = new conns/s (higher is better)" close-rps 0
row 2 "proxy CPU µs per new connection (lower is better)" close-cpu 2
row 2 "Connection: close p99 latency ms (lower is better)" close-p99 2
row 2 "Connection: close proxy CPU busy / waiting for its CPU, %" close-busy 0 bw
row 2 "proxy kernel CPU µs per new connection (stime)" close-sys 2
row 2 "new-connection floor: proxy's kernel CPU / HAProxy's whole CPU" close-sys 2 floor
row 3a "iperf3 1 stream, Gbit/s (higher is better)" iperf1 2
row 3a "iperf3 1 stream, fraction of direct" iperf1 2 frac
row 3a "iperf3 1 stream, proxy CPU ms per GB (lower is better)" iperf1-cpu 0
row 3a "iperf3 1 stream, proxy CPU busy / waiting for its CPU, %" iperf1-busy 0 bw
row 3a "iperf3 1 stream, load CPU busy % (iperf3 client and server)" iperf1-load 0 none
row 3b "iperf3 -P $IPERF_STREAMS, Gbit/s (higher is better)" iperfn 2
row 3b "iperf3 -P $IPERF_STREAMS, fraction of direct" iperfn 2 frac
row 3b "iperf3 -P $IPERF_STREAMS, proxy CPU ms per GB (lower is better)" iperfn-cpu 0
row 3b "iperf3 -P $IPERF_STREAMS, proxy CPU busy / waiting for its CPU, %" iperfn-busy 0 bw
row 3b "iperf3 -P $IPERF_STREAMS, load CPU busy % (iperf3 client and server)" iperfn-load 0 none
row 4 "RSS per idle connection KiB (lower is better)" idle 2
row 5 "HTTP mode keep-alive req/s (cookie insert) (higher is better)" hck-rps 0
row 5 "HTTP mode proxy CPU µs per request (cookie insert) (lower is better)" hck-cpu 2
row 5 "HTTP mode keep-alive p99 latency ms (cookie insert) (lower is better)" hck-p99 2
row 5 "HTTP mode proxy CPU busy / waiting for its CPU, % (cookie insert)" hck-busy 0 bw
if ((ROW5_STICKY)); then
    row 5 "HTTP mode keep-alive req/s (sticky cookie) (higher is better)" hst-rps 0
    row 5 "HTTP mode proxy CPU µs per request (sticky cookie) (lower is better)" hst-cpu 2
    row 5 "HTTP mode keep-alive p99 latency ms (sticky cookie) (lower is better)" hst-p99 2
    row 5 "HTTP mode proxy CPU busy / waiting for its CPU, % (sticky cookie)" hst-busy 0 bw
fi
row 7 "redis GET ops/s (higher is better)" redis-rps 0
row 7 "redis GET proxy CPU µs per GET (lower is better)" redis-cpu 2
row 7 "redis GET p99 latency ms (lower is better)" redis-p99 2
row 7 "redis GET proxy CPU busy / waiting for its CPU, %" redis-busy 0 bw
row 7 "redis GET proxy kernel CPU µs per GET (stime)" redis-sys 2
row 7 "redis GET floor: proxy's kernel CPU / HAProxy's whole CPU" redis-sys 2 floor
udp_row() { # udp_row LABEL KEY DECIMALS RATIOS : medians; RATIOS = nginx, nginx+direct or none
    local d n s rn="" rd="" sp
    d=$(median "${R[$2,direct]:-}"); n=$(median "${R[$2,nginx]:-}"); s=$(median "${R[$2,switchyard]:-}")
    if [[ $4 == nginx* ]]; then
        rn=$(ratio "$s" "$n"); sp=$(spread "${R[$2,switchyard]:-}" "${R[$2,nginx]:-}"); [ -z "$sp" ] || rn+=" ($sp)"
        rd="n/a"
    fi
    if [[ $4 == *direct ]]; then
        rd=$(ratio "$s" "$d"); sp=$(spread "${R[$2,switchyard]:-}" "${R[$2,direct]:-}"); [ -z "$sp" ] || rd+=" ($sp)"
    fi
    echo "| 6 | $1 | $(fmt "$d" "$3") | $(fmt "$n" "$3") | $(fmt "$s" "$3") | $rn | $rd |"
}
if want 6; then
    echo
    echo "| # | workload | direct | nginx stream | switchyard | switchyard/nginx | switchyard/direct |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    udp_row "UDP replies/s (higher is better)" udp-rate 0 nginx+direct
    udp_row "proxy CPU µs per reply, request + reply (lower is better)" udp-cpu 2 nginx
    udp_row "proxy CPU busy, % of one core" udp-busy 0 none
    udp_row "proxy runnable but waiting for its CPU, % (other work on it; 0 is clean)" udp-wait 0 none
    echo "| 6 | datagrams lost, all rounds (lower is better) | $(total "${R[udp-lost,direct]:-}") | $(total "${R[udp-lost,nginx]:-}") | $(total "${R[udp-lost,switchyard]:-}") | | |"
fi
tls_row() { # tls_row ROW LABEL KEY DECIMALS [KIND] : HAProxy, switchyard, ratio; KIND = ratios (default), bw, none
    want "$1" || return 0
    local kind=${5:-ratios} t v cells="" r=""
    for t in haproxy switchyard; do
        v=${R[$3,$t]:-n/a}
        if [ "$kind" = bw ] && [[ $v == *[0-9]/[0-9]* ]]; then
            v="$(fmt "$(median "$(printf '%s\n' $v | cut -d/ -f1)")" 0) / $(fmt "$(median "$(printf '%s\n' $v | cut -sd/ -f2)")" 0)"
        else
            v=$(fmt "$(median "${R[$3,$t]:-}")" "$4")
        fi
        cells+=" $v |"
    done
    [ "$kind" != ratios ] || r=$(ratio_sp "$3" switchyard haproxy)
    echo "| $1 | $2 |$cells $r |"
}
if want 8; then
    echo
    echo "| # | workload | HAProxy | switchyard | switchyard/HAProxy |"
    echo "|---|---|---:|---:|---:|"
    for sub in "8a tls-ec13 ECDSA P-256, TLS 1.3" "8b tls-rsa13 RSA 2048, TLS 1.3" "8c tls-ec12 ECDSA P-256, TLS 1.2"; do
        read -r sub_row key what <<<"$sub"
        tls_row "$sub_row" "full handshakes/s, $what (higher is better)" "$key-rps" 0
        tls_row "$sub_row" "proxy CPU µs per full handshake, $what (lower is better)" "$key-cpu" 1
        tls_row "$sub_row" "proxy kernel CPU µs per handshake (stime), $what" "$key-sys" 1
        tls_row "$sub_row" "p99 ms per connection, $what (lower is better)" "$key-p99" 2
        tls_row "$sub_row" "proxy CPU busy / waiting for its CPU, %, $what" "$key-busy" 0 bw
        tls_row "$sub_row" "load CPU busy % (tlsload and nginx), $what" "$key-load" 0 none
    done
    tls_row 8d "keep-alive HTTPS req/s, ECDSA P-256 (higher is better)" tls-ka-rps 0
    tls_row 8d "keep-alive HTTPS proxy CPU µs per request (lower is better)" tls-ka-cpu 2
    tls_row 8d "keep-alive HTTPS proxy kernel CPU µs per request (stime)" tls-ka-sys 2
    tls_row 8d "keep-alive HTTPS p99 latency ms (lower is better)" tls-ka-p99 2
    tls_row 8d "keep-alive HTTPS proxy CPU busy / waiting for its CPU, %" tls-ka-busy 0 bw
    tls_row 8d "keep-alive HTTPS load CPU busy % (wrk and nginx)" tls-ka-load 0 none
fi
if ((ROUNDS > 1)) && { want 1 || want 2 || want 3 || want 4 || want 5 || want 7; }; then
    echo
    echo "Per-round values (direct / HAProxy / nginx stream / switchyard):"
    for k in ka-rps ka-cpu ka-sys ka-p99 ka-busy close-rps close-cpu close-sys close-p99 close-busy \
             iperf1 iperf1-cpu iperf1-busy iperf1-load iperfn iperfn-cpu iperfn-busy iperfn-load idle \
             hck-rps hck-cpu hck-p99 hck-busy hst-rps hst-cpu hst-p99 hst-busy redis-rps redis-cpu redis-sys redis-p99 redis-busy; do
        [ -n "${R[$k,haproxy]:-}${R[$k,switchyard]:-}" ] || continue
        echo "- $k: ${R[$k,direct]:-} / ${R[$k,haproxy]:-} / ${R[$k,nginx]:-} / ${R[$k,switchyard]:-}"
    done
fi
if ((ROUNDS > 1)) && want 6; then
    echo
    echo "Per-round values, row 6 (direct / nginx stream / switchyard):"
    for k in udp-rate udp-cpu udp-busy udp-wait udp-lost; do
        echo "- $k: ${R[$k,direct]:-} / ${R[$k,nginx]:-} / ${R[$k,switchyard]:-}"
    done
fi
if ((ROUNDS > 1)) && want 8; then
    echo
    echo "Per-round values, row 8 (HAProxy / switchyard):"
    for k in tls-ec13 tls-rsa13 tls-ec12 tls-ka; do
        for m in rps cpu sys p99 busy load; do
            [ -n "${R[$k-$m,haproxy]:-}${R[$k-$m,switchyard]:-}" ] || continue
            echo "- $k-$m: ${R[$k-$m,haproxy]:-} / ${R[$k-$m,switchyard]:-}"
        done
    done
fi
if ((${#NOTES[@]})); then
    echo
    echo "Notes:"
    for n in "${NOTES[@]}"; do echo "- $n"; done
fi
