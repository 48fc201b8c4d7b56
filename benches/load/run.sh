#!/usr/bin/env bash
# Side-by-side L4 load benchmark: direct vs HAProxy (mode tcp, nbthread 1) vs switchyard;
# row 6 (UDP): direct vs nginx stream (1 worker) vs switchyard. Loopback only.
# See benches/load/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

DURATION=${DURATION:-5}             # seconds per wrk run
WARMUP=${WARMUP:-1}                 # seconds of unmeasured wrk warm-up before each run (0 = none)
ROUNDS=${ROUNDS:-3}                 # rows 1-3, 5 and 6 run ROUNDS times, targets in rotating order; median reported
CONNS=${CONNS:-50}                  # wrk connections
WRK_THREADS=${WRK_THREADS:-1}
IPERF_DURATION=${IPERF_DURATION:-$DURATION}
IDLE_CONNS=${IDLE_CONNS:-5000}
PROXY_CPU=${PROXY_CPU:-0}           # proxy under test
LOAD_CPU=${LOAD_CPU:-1}             # load generators and backends
ROWS=${ROWS:-1 2 3 4 5 6}           # which rows to run
ROW5_STICKY=${ROW5_STICKY:-1}       # row 5: also run wrk with the sticky cookie (0 = only without cookie)
UDP_SOCKETS=${UDP_SOCKETS:-256}     # row 6: client sockets (source ports) of the UDP load generator
UDP_OUTSTANDING=${UDP_OUTSTANDING:-64} # row 6: datagrams kept outstanding (at most one per socket)
UDP_SIZE=${UDP_SIZE:-80}            # row 6: bytes per datagram (a DNS query's size)
UDP_TIMEOUT_MS=${UDP_TIMEOUT_MS:-1000} # row 6: a reply later than this is a lost datagram
SWITCHYARD_BIN=${SWITCHYARD_BIN:-}  # set to skip `cargo build --release` and use this binary
UDPLOAD_BIN=${UDPLOAD_BIN:-}        # row 6: set to skip building benches/load/udpload.rs and use this binary

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
want() { [[ " $ROWS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- tools
need=()
for b in haproxy nginx wrk iperf3 taskset ss python3; do
    command -v "$b" >/dev/null 2>&1 || need+=("$b")
done
if ((${#need[@]})); then
    pkgs=()
    for b in "${need[@]}"; do
        case $b in
            taskset) pkgs+=(util-linux) ;;
            ss) pkgs+=(iproute2) ;;
            *) pkgs+=("$b") ;;
        esac
    done
    log "installing missing: ${pkgs[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
# Debian's nginx package may start a system instance; ours is separate (own prefix and port).
# Row 6 needs nginx's stream module; Debian builds it as a module in its own package.
NGX_STREAM=""   # "load_module ...;" line for the row-6 nginx config, or empty when built in
if want 6; then
    if nginx -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
        ngx_mods=$(nginx -V 2>&1 | tr ' ' '\n' | sed -n 's/^--modules-path=//p')
        ngx_mod=${ngx_mods:-/usr/lib/nginx/modules}/ngx_stream_module.so
        if [ ! -f "$ngx_mod" ]; then
            log "installing missing: libnginx-mod-stream (nginx stream module, row 6)"
            SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libnginx-mod-stream >/dev/null
        fi
        [ -f "$ngx_mod" ] || die "no nginx stream module at $ngx_mod"
        NGX_STREAM="load_module $ngx_mod;"
    elif ! nginx -V 2>&1 | grep -q -- '--with-stream'; then
        die "this nginx has no stream module (row 6 needs it)"
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

# CPU pinning (needs 2 CPUs; otherwise run unpinned and say so)
ncpu=$(nproc)
if ((ncpu >= 2)) && ((PROXY_CPU < ncpu)) && ((LOAD_CPU < ncpu)); then
    PIN_PROXY=(taskset -c "$PROXY_CPU")
    PIN_LOAD=(taskset -c "$LOAD_CPU")
    pinning="proxy on CPU $PROXY_CPU, load generator and backends on CPU $LOAD_CPU"
else
    PIN_PROXY=()
    PIN_LOAD=()
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

start_backend() { # start_backend KIND PORT ; KIND = nginx | iperf3 | hold
    local kind=$1 port=$2
    case $kind in
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

start_haproxy() { # start_haproxy LISTEN_PORT BACKEND_PORT -> HAP_PID
    cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
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

# start_proxies BACKEND_PORT -> PORT_direct PORT_haproxy PORT_switchyard
start_proxies() {
    local hp sp
    read -r hp sp < <(free_ports 2)
    start_haproxy "$hp" "$1"
    start_switchyard "$sp" "$1"
    PORT_direct=$1 PORT_haproxy=$hp PORT_switchyard=$sp
}

# ---- row 5: HTTP mode with cookie stickiness, two backends
start_haproxy_http() { # start_haproxy_http LISTEN_PORT BACKEND_PORT1 BACKEND_PORT2 -> HAP_PID
    cat >"$TMP/haproxy-http.cfg" <<EOF
global
    nbthread 1
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
worker_processes 1;
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

session_pids() { # session_pids SID -> the pids of the processes in session SID (nginx: master and worker)
    local f st sid
    for f in /proc/[0-9]*/stat; do
        st=$(cat "$f" 2>/dev/null) || continue
        read -r _ _ _ sid _ <<<"${st##*) }"
        [ "$sid" = "$1" ] || continue
        f=${f#/proc/}; echo "${f%/stat}"
    done
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

# ---------------------------------------------------------------- workloads
TARGETS=(direct haproxy switchyard)
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

run_wrk() { # run_wrk KEY TARGET PORT [extra wrk args...]
    local key=$1 t=$2 port=$3; shift 3
    local out=$TMP/wrk-$key-$t-r$ROUND.txt
    if ((WARMUP > 0)); then
        "${PIN_LOAD[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${WARMUP}s" "$@" "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
    fi
    "${PIN_LOAD[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DURATION}s" --latency "$@" "http://127.0.0.1:$port/" >"$out" 2>&1 || true
    local rps p99 errs non2xx
    rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
    p99=$(awk '$1 == "99%" {print $2}' "$out")
    errs=$(awk '/Socket errors:/ {gsub(",", ""); print "connect " $4 ", read " $6 ", write " $8 ", timeout " $10}' "$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$out")
    if [ -z "$rps" ] || [ -z "$p99" ]; then
        log "wrk $key against $t failed:"; sed 's/^/    /' "$out" >&2
        add "$key-rps" "$t" err; add "$key-p99" "$t" err
        return
    fi
    add "$key-rps" "$t" "$rps"
    add "$key-p99" "$t" "$(to_ms "$p99")"
    [ -z "$errs" ] || NOTES+=("$key / $t / round $ROUND: wrk socket errors: $errs")
    [ -z "$non2xx" ] || NOTES+=("$key / $t / round $ROUND: $non2xx non-2xx responses")
    log "  $key $t: $rps req/s, p99 $p99"
}

run_iperf() { # run_iperf TARGET PORT
    local t=$1 port=$2 out=$TMP/iperf-$1-r$ROUND.json
    "${PIN_LOAD[@]}" iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_DURATION" --connect-timeout 5000 -J >"$out" 2>&1 || true
    local g
    g=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d: sys.exit(d["error"])
print("%.2f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9))' "$out" 2>>"$TMP/iperf-$t.err") || {
        log "iperf3 against $t failed:"; sed 's/^/    /' "$TMP/iperf-$t.err" >&2
        add iperf "$t" err; return; }
    add iperf "$t" "$g"
    log "  iperf3 $t: $g Gbit/s"
}

run_idle() { # run_idle TARGET PORT PID BACKEND_PORT
    local t=$1 out=$TMP/idle-$1.json
    if ! "${PIN_LOAD[@]}" python3 "$HERE/idle.py" measure --port "$2" --pid "$3" \
            --backend-port "$4" -n "$IDLE_CONNS" >"$out" 2>"$TMP/idle-$t.err"; then
        log "idle connections through $t failed:"; sed 's/^/    /' "$TMP/idle-$t.err" >&2
        add idle "$t" err; return
    fi
    R[idle,$t]=$(python3 -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["kib_per_conn"])' "$out")
    NOTES+=("idle / $t: $(cat "$out")")
    log "  idle $t: ${R[idle,$t]} KiB/conn"
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
fi

# Row 3: iperf3 backend
if want 3; then
    read -r BP < <(free_ports 1)
    start_backend iperf3 "$BP"
    start_proxies "$BP"
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        log "row 3: iperf3 (round $ROUND/$ROUNDS)"
        for t in $(in_order "$ROUND"); do p=PORT_$t; run_iperf "$t" "${!p}"; done
    done
    stop_all
fi

# Row 4: idle connections, one proxy at a time against a fresh holding backend
if want 4; then
    log "row 4: $IDLE_CONNS idle connections"
    R[idle,direct]=n/a
    for t in haproxy switchyard; do
        read -r BP LP < <(free_ports 2)
        start_backend hold "$BP"
        if [ "$t" = haproxy ]; then start_haproxy "$LP" "$BP"; pid=$HAP_PID
        else start_switchyard "$LP" "$BP"; pid=$SY_PID; fi
        run_idle "$t" "$LP" "$pid" "$BP"
        stop_all
    done
fi

# Row 5: HTTP mode, cookie stickiness, two nginx server blocks (one nginx, one worker);
# "direct" = straight to the first server block
if want 5; then
    read -r BP1 BP2 HP SP < <(free_ports 4)
    start_nginx nginx-http "$BP1" "$BP2"
    start_haproxy_http "$HP" "$BP1" "$BP2"
    PORT_direct=$BP1 PORT_haproxy=$HP PORT_switchyard=$SP
    declare -A COOKIE=([direct]=s1)
    HTTP_TARGETS=(direct)
    check_http haproxy "$HP"
    ((HTTP_OK)) && { HTTP_TARGETS+=(haproxy); COOKIE[haproxy]=$CK; }
    if start_switchyard_http "$SP" "$BP1" "$BP2"; then
        check_http switchyard "$SP"
        ((HTTP_OK)) && { HTTP_TARGETS+=(switchyard); COOKIE[switchyard]=$CK; }
    fi
    for t in haproxy switchyard; do
        [[ " ${HTTP_TARGETS[*]} " == *" $t "* ]] || { R[hck-rps,$t]=n/a R[hck-p99,$t]=n/a R[hst-rps,$t]=n/a R[hst-p99,$t]=n/a; }
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
if want 1 || want 2 || want 3 || want 4 || want 5; then
    echo "wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s (after ${WARMUP}s warm-up); iperf3 -t $IPERF_DURATION; rows 1-3 and 5: median of $ROUNDS rounds;"\
         "$IDLE_CONNS idle connections; HAProxy maxconn $HAP_MAXCONN."
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
if want 1 || want 2 || want 3 || want 4 || want 5; then
echo
echo "| # | workload | direct | HAProxy | switchyard | switchyard/HAProxy |"
echo "|---|---|---:|---:|---:|---:|"
fi
row() { # row NUM LABEL KEY DECIMALS
    want "$1" || return 0
    local d h s
    d=$(median "${R[$3,direct]:-}"); h=$(median "${R[$3,haproxy]:-}"); s=$(median "${R[$3,switchyard]:-}")
    echo "| $1 | $2 | $(fmt "$d" "$4") | $(fmt "$h" "$4") | $(fmt "$s" "$4") | $(ratio "$s" "$h") |"
}
row 1 "keep-alive req/s (higher is better)" ka-rps 0
row 1 "keep-alive p99 latency ms (lower is better)" ka-p99 2
row 2 "Connection: close req/s = new conns/s (higher is better)" close-rps 0
row 2 "Connection: close p99 latency ms (lower is better)" close-p99 2
row 3 "iperf3 throughput Gbit/s (higher is better)" iperf 2
row 4 "RSS per idle connection KiB (lower is better)" idle 2
row 5 "HTTP mode keep-alive req/s (cookie insert) (higher is better)" hck-rps 0
row 5 "HTTP mode keep-alive p99 latency ms (cookie insert) (lower is better)" hck-p99 2
if ((ROW5_STICKY)); then
    row 5 "HTTP mode keep-alive req/s (sticky cookie) (higher is better)" hst-rps 0
    row 5 "HTTP mode keep-alive p99 latency ms (sticky cookie) (lower is better)" hst-p99 2
fi
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
if ((ROUNDS > 1)) && { want 1 || want 2 || want 3 || want 5; }; then
    echo
    echo "Per-round values (direct / HAProxy / switchyard):"
    for k in ka-rps ka-p99 close-rps close-p99 iperf hck-rps hck-p99 hst-rps hst-p99; do
        [ -n "${R[$k,haproxy]:-}" ] || continue
        echo "- $k: ${R[$k,direct]:-} / ${R[$k,haproxy]:-} / ${R[$k,switchyard]:-}"
    done
fi
if ((ROUNDS > 1)) && want 6; then
    echo
    echo "Per-round values, row 6 (direct / nginx stream / switchyard):"
    for k in udp-rate udp-cpu udp-busy udp-wait udp-lost; do
        echo "- $k: ${R[$k,direct]:-} / ${R[$k,nginx]:-} / ${R[$k,switchyard]:-}"
    done
fi
if ((${#NOTES[@]})); then
    echo
    echo "Notes:"
    for n in "${NOTES[@]}"; do echo "- $n"; done
fi
