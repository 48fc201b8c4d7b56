#!/usr/bin/env bash
# Failover of the active/standby pair with the shipped keepalived configs.
# Builds the pair of docs/ha.md in network namespaces of its own: lb1, lb2,
# a client and a backend on one bridge, each with an interface eth0 and the
# addresses of deploy/keepalived/ (192.0.2.0/24, VIP 192.0.2.10, only inside
# these namespaces). switchyard runs on both nodes with the same config, its
# listener bound to the VIP with `freebind = true`; keepalived runs on both
# nodes with deploy/keepalived/keepalived-lb{1,2}.conf, rewritten only for
# the scripts' paths and the process name (see the end of this comment).
# A client makes 10 connection attempts a second through the VIP, each
# given 1 s to get the backend's answer, while:
#
#   0. upgrade: switchyard on the active node lb1 is upgraded live
#      (SIGUSR2). lb1 must keep the VIP and no attempt may fail: the new
#      process starts before the old one exits, so track_process sees no
#      gap.
#   1. crash: switchyard on the active node lb1 gets SIGKILL. The VIP must
#      be on lb2 within MAX_MOVE s and fewer than MAX_FAILED attempts may
#      fail (track_process: keepalived hears of the death from the kernel
#      at once; no check has to fail first).
#   2. wedged: lb1's switchyard started again (lb1 becomes the standby:
#      nopreempt), then switchyard on lb2 gets SIGSTOP: alive, answering
#      nothing, which only the /readyz check (check-switchyard.sh) can see.
#      The VIP must be back on lb1 within MAX_WEDGED_MOVE s.
#   3. lost: lb2's switchyard continued (lb2 the standby again), then lb1 is
#      cut off the network (its bridge port down): lb2 hears no more adverts
#      and must hold the VIP within MAX_LOST_MOVE s.
#
# Prints one line of figures a phase and a final PASS (or FAIL, exit 1).
# Everything it creates (namespaces, processes, a temporary directory) is
# removed on exit, on failure too. Needs root, iproute2, keepalived, curl,
# python3.
#
#   bash scripts/ha-failover.sh                       # builds and uses target/debug/switchyard
#   SWITCHYARD_BIN=path bash scripts/ha-failover.sh   # that binary (tests/ha_failover.rs: the test build)
#   SWITCHYARD_HA_LOGS=dir ...                        # keeps the logs, configs and attempts there
#   SWITCHYARD_HA_CONFIGS=dir ...                     # other keepalived-lb{1,2}.conf (e.g. an older pair)
#
# Exits 77 after a line "SKIP: <reason>" only when network namespaces cannot
# be created (not root, or a container without CAP_SYS_ADMIN).
#
# keepalived's process tracking (the kernel's process-event connector) does
# not work when keepalived runs under `ip netns exec` or in a PID namespace
# of its own, so it runs as `keepalived --namespace NS` from the host's
# namespaces. There it sees every process of the host, the other node's
# switchyard too: so each node runs its own copy of the binary under a name
# of its own (sy<id>-lb1, sy<id>-lb2), and its config's `process switchyard`
# becomes that name.
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C # a "." in EPOCHREALTIME and in awk's numbers

MAX_MOVE=2          # s from the SIGKILL until lb2 holds the VIP (issue #18)
MAX_FAILED=5        # failed attempts during the crash must stay below this (issue #18)
MAX_WEDGED_MOVE=6   # s from the SIGSTOP: 2 failed checks (1 s apart, 1 s curl timeout each) + slack
MAX_LOST_MOVE=3     # s from the cut: 3 adverts (0.5 s) + skew (0.11 s) = 1.61 s + slack
RATE_INTERVAL=0.1   # s between attempts: 10 a second
ATTEMPT_TIMEOUT=1   # s an attempt has for connect, request and answer
MAX_ATTEMPTS=600    # a phase's client stops at this many attempts at the latest
VIP=192.0.2.10
PORT=80
configs=${SWITCHYARD_HA_CONFIGS:-deploy/keepalived}

[ "$(id -u)" -eq 0 ] || { echo "SKIP: not root: creating network namespaces needs root"; exit 77; }
for cmd in ip keepalived curl python3; do
    command -v "$cmd" >/dev/null || { echo "$cmd not found (Debian: apt-get install iproute2 keepalived curl python3)" >&2; exit 1; }
done
bin=${SWITCHYARD_BIN:-}
if [ -z "$bin" ]; then
    cargo build --quiet
    bin=target/debug/switchyard
fi

# Names of this run only: runs side by side (or a leftover) never collide.
while :; do
    id=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
    ip netns list | grep -q "^syha-$id-" || break
done
ns() { echo "syha-$id-$1"; }
NS_SW=$(ns sw) NS_CL=$(ns client) NS_BE=$(ns backend)
addr() { echo "192.0.2.1$1"; } # node N's own address

# keepalived refuses scripts that others could change (enable_script_security)
# and runs them as nobody: a 0755 directory owned by root.
work=$(mktemp -d /tmp/switchyard-ha.XXXXXX)
chmod 755 "$work"
mkdir -m 755 "$work/lib" "$work/bin"

declare -A PIDS=()  # what → pid, of every process started here
created=()          # namespaces created so far
cleanup() {
    local rc=$? what pid ns
    set +e
    trap - EXIT INT TERM HUP
    # keepalived first: when it stops, it removes the VIP it holds.
    for what in ka1 ka2; do
        [ -z "${PIDS[$what]:-}" ] || kill -TERM "${PIDS[$what]}" 2>/dev/null
    done
    for what in ka1 ka2; do
        pid=${PIDS[$what]:-}
        [ -n "$pid" ] || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    done
    for what in "${!PIDS[@]}"; do
        kill -CONT "${PIDS[$what]}" 2>/dev/null
        kill -KILL "${PIDS[$what]}" 2>/dev/null
    done
    # What else runs in these namespaces (keepalived's VRRP process, a check
    # script, a curl) was started by this script too.
    for ns in "${created[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    for what in "${!PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "${PIDS[$what]}" 2>/dev/null || break; sleep 0.05; done
    done
    for ns in "${created[@]}"; do ip netns del "$ns"; done
    if [ "$rc" != 0 ] && [ "$rc" != 77 ]; then
        for f in "$work"/*.log; do
            [ -e "$f" ] || continue
            echo "--- $f (last 40 lines)"
            tail -n 40 "$f"
        done
    fi
    if [ -n "${SWITCHYARD_HA_LOGS:-}" ]; then
        mkdir -p "$SWITCHYARD_HA_LOGS" && cp "$work"/*.log "$work"/*.conf "$work"/*.toml "$SWITCHYARD_HA_LOGS/" 2>/dev/null
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
fail() { echo "FAIL: $*"; exit 1; }
# Start a command in the background, as PIDS[what]. Disowned: bash does not
# announce the kills below; cleanup waits for each pid itself.
spawn() { # what, log file, command...
    local what=$1 log=$2
    shift 2
    "$@" >>"$log" 2>&1 &
    PIDS[$what]=$!
    disown "$!"
}

# --- network: a bridge in a namespace of its own, a veth to each of the others
if ! ip netns add "$NS_SW" 2>"$work/netns.err"; then
    echo "SKIP: cannot create a network namespace: $(cat "$work/netns.err")"
    exit 77
fi
created+=("$NS_SW")
ip -n "$NS_SW" link add br0 type bridge
ip -n "$NS_SW" link set br0 up
plug() { # namespace, name of its port on the bridge, address
    ip netns add "$1"
    created+=("$1")
    ip link add eth0 netns "$1" type veth peer name "$2" netns "$NS_SW"
    ip -n "$NS_SW" link set "$2" master br0 up
    ip -n "$1" link set lo up
    ip -n "$1" addr add "$3/24" dev eth0
    ip -n "$1" link set eth0 up
}
plug "$(ns lb1)" lb1 "$(addr 1)"
plug "$(ns lb2)" lb2 "$(addr 2)"
plug "$NS_CL" client 192.0.2.100
plug "$NS_BE" backend 192.0.2.200

# Wait until a command succeeds, polling, for at most DEADLINE seconds.
wait_for() { # deadline, command...
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < end)) || return 1
        sleep 0.05
    done
}
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; } # s since an EPOCHREALTIME
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }
holds_vip() { ip -n "$(ns "lb$1")" -o -4 addr show dev eth0 | grep -qF " inet $VIP/"; } # node
count() { local n; n=$(grep -c -- "$2" "$1" 2>/dev/null) || true; echo "${n:-0}"; } # file, pattern
ka_log() { echo "$work/keepalived-lb$1.log"; } # node
ka_logged_more() { [ "$(count "$(ka_log "$1")" "$2")" -gt "$3" ]; } # node, pattern, count before

# --- the backend: answers each connection with the address it came from
# (a node's own address: switchyard connects from there)
spawn backend "$work/backend.log" ip netns exec "$NS_BE" python3 -c '
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.0.2.200", 8080))
s.listen(128)
open(sys.argv[1], "w").close()
def serve(c, peer):
    with c:
        c.settimeout(5)
        try:
            c.recv(100)
            c.sendall(b"backend saw %s\n" % peer[0].encode())
        except OSError:
            pass
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
' "$work/backend.ready"
wait_for 30 test -e "$work/backend.ready" || fail "the backend did not start"

# --- switchyard on both nodes: one config, the VIP bound with freebind
cat >"$work/switchyard.toml" <<EOF
[global]
shutdown_timeout = "1s"

[admin]
bind = "127.0.0.1:9900"

[[listener]]
name = "web"
bind = "$VIP:$PORT"
freebind = true

[[listener.backend]]
name = "web1"
address = "192.0.2.200:8080"
EOF
for n in 1 2; do cp "$bin" "$work/bin/sy$id-lb$n"; done
ready() { ip netns exec "$(ns "lb$1")" curl -fsS -o /dev/null -m 1 http://127.0.0.1:9900/readyz 2>/dev/null; } # node
start_switchyard() { # node
    local name=sy$id-lb$1
    spawn "sy$1" "$work/switchyard-lb$1.log" \
        ip netns exec "$(ns "lb$1")" "$work/bin/$name" run --config "$work/switchyard.toml"
    wait_for 60 ready "$1" || fail "switchyard on lb$1 is not ready"
    # `ip netns exec` execs: the pid is switchyard's, under the name
    # keepalived looks for.
    [ "$(cat "/proc/${PIDS[sy$1]}/comm")" = "$name" ] || fail "lb$1's switchyard is not named $name"
}
start_switchyard 1
start_switchyard 2

# --- keepalived on both nodes, with the shipped configs
cp deploy/keepalived/check-switchyard.sh deploy/keepalived/notify.sh "$work/lib/"
chmod 755 "$work/lib/"*.sh
for n in 1 2; do
    shipped=$configs/keepalived-lb$n.conf
    sed -e "s#/usr/lib/switchyard/#$work/lib/#g" -e "s#^\( *process\) switchyard\$#\1 sy$id-lb$n#" \
        "$shipped" >"$work/keepalived-lb$n.conf"
    # Only those lines differ from the shipped file.
    expected=$(grep -c -e '/usr/lib/switchyard/' -e '^ *process switchyard$' "$shipped") || true
    changed=$(diff "$shipped" "$work/keepalived-lb$n.conf" | grep -c '^>') || true
    [ "$changed" = "$expected" ] || fail "$shipped: $changed lines rewritten, expected $expected"
done
start_keepalived() { # node
    spawn "ka$1" "$(ka_log "$1")" keepalived --namespace "$(ns "lb$1")" \
        --dont-fork --log-console --log-detail --no-syslog --vrrp \
        --use-file "$work/keepalived-lb$1.conf" \
        --pid "$work/keepalived-lb$1.pid" --vrrp_pid "$work/keepalived-lb$1-vrrp.pid" \
        --checkers_pid "$work/keepalived-lb$1-checkers.pid" --bfd_pid "$work/keepalived-lb$1-bfd.pid"
}
# lb1 first: it wins the first election, as when both nodes boot together
# (higher priority, shorter wait); then lb2 joins as its backup.
start_keepalived 1
wait_for 60 holds_vip 1 || fail "lb1 never took the VIP"
start_keepalived 2
wait_for 60 ka_logged_more 2 "Entering BACKUP STATE" 0 || fail "lb2 never became BACKUP"
echo "pair up: lb1 MASTER holding $VIP, lb2 BACKUP"

# --- the client: an attempt every RATE_INTERVAL s, each in a thread of its
# own (an attempt that hangs does not slow the others), until told to stop.
# A line per attempt: "index start end outcome", the outcome "ok VIA" when
# the backend answered (VIA: the node it came through), else what went
# wrong: refused, reset, timeout, ...
start_client() { # attempts file
    rm -f "$work/client.stop"
    spawn client "$work/client.log" ip netns exec "$NS_CL" python3 -c '
import os, socket, sys, threading, time
vip, port, interval, timeout, most, out, stop = sys.argv[1:8]
port, interval, timeout, most = int(port), float(interval), float(timeout), int(most)
lock = threading.Lock()
log = open(out, "w", buffering=1)
def attempt(i, start):
    try:
        with socket.create_connection((vip, port), timeout=timeout) as s:
            s.settimeout(max(0.001, start + timeout - time.time()))
            s.sendall(b"hello\n")
            got = b""
            while not got.endswith(b"\n"):
                part = s.recv(100)
                if not part:
                    break
                got += part
        words = got.split()
        if words[:2] == [b"backend", b"saw"] and len(words) == 3:
            outcome = "ok " + words[2].decode()
        else:
            outcome = "bad-answer"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except (socket.timeout, TimeoutError):
        outcome = "timeout"
    except OSError as e:
        outcome = "error-%s" % e.errno
    with lock:
        log.write("%d %.3f %.3f %s\n" % (i, start, time.time(), outcome))
t0 = time.time()
threads = []
for i in range(most):
    if os.path.exists(stop):
        break
    ahead = t0 + i * interval - time.time()
    if ahead > 0:
        time.sleep(ahead)  # the pace of the attempts, not a wait for an event
    th = threading.Thread(target=attempt, args=(i, time.time()))
    th.start()
    threads.append(th)
for th in threads:
    th.join()
log.write("done %d\n" % len(threads))
' "$VIP" "$PORT" "$RATE_INTERVAL" "$ATTEMPT_TIMEOUT" "$MAX_ATTEMPTS" "$1" "$work/client.stop"
}
oks_at_least() { [ "$(count "$1" " ok $2\$")" -ge "$3" ]; } # attempts file, via, count

# A failover, measured: the client runs until 10 answers came through lb
# FROM; ACTION... runs; the addresses are polled (every ~10 ms, with a
# deadline) until lb TO holds the VIP; the client runs on until 20 answers
# came through TO, and stops. Checks that every attempt that ended before
# the action was answered through FROM, the last 20 through TO, and that
# FROM no longer holds the VIP. Prints
#   NAME: VIP on lbTO after M s (off lbFROM after L s); N attempts, F failed (kinds)
# and sets MOVED (M) and FAILED (F).
failover() { # name, from, to, action...
    local name=$1 from=$2 to=$3 file t0 left="" end kinds n
    shift 3
    file=$work/$name-attempts.log
    start_client "$file"
    wait_for 30 oks_at_least "$file" "$(addr "$from")" 10 || fail "$name: no 10 answers through lb$from"
    t0=$EPOCHREALTIME
    "$@"
    MOVED=""
    end=$((SECONDS + 30))
    while ((SECONDS < end)); do
        [ -n "$left" ] || holds_vip "$from" || left=$(since "$t0")
        if holds_vip "$to"; then MOVED=$(since "$t0"); break; fi
        sleep 0.01
    done
    [ -n "$MOVED" ] || fail "$name: lb$to did not take the VIP within 30 s"
    wait_for 30 oks_at_least "$file" "$(addr "$to")" 20 || fail "$name: no 20 answers through lb$to"
    touch "$work/client.stop"
    wait_for 30 grep -q '^done ' "$file" || fail "$name: the client did not finish"
    [ -n "$left" ] || ! holds_vip "$from" || fail "$name: lb$from still holds the VIP too"
    awk -v t0="$t0" -v via="$(addr "$from")" '$1 != "done" && $3 < t0 && !($4 == "ok" && $5 == via) { bad = 1 }
        END { exit bad }' "$file" || fail "$name: an attempt before the failover failed or went elsewhere"
    n=$(grep -v '^done' "$file" | sort -n | tail -n 20 | grep -c " ok $(addr "$to")\$") || true
    [ "$n" = 20 ] || fail "$name: of the last 20 attempts, $n were answered through lb$to"
    FAILED=$(awk '$1 != "done" && $4 != "ok" { f++ } END { print f + 0 }' "$file")
    kinds=$(awk '$1 != "done" && $4 != "ok" { k[$4]++ } END { for (x in k) printf "%s%d %s", (s++ ? ", " : ""), k[x], x }' "$file")
    echo "$name: VIP on lb$to after $MOVED s (off lb$from after ${left:-?} s);" \
        "$(grep -vc '^done' "$file") attempts, $FAILED failed${kinds:+ ($kinds)}"
}
ok=1
check() { # description, command...
    local what=$1
    shift
    if "$@"; then echo "  ok: $what"; else echo "  NOT: $what"; ok=0; fi
}
gone() { ! kill -0 "$1" 2>/dev/null; } # pid
kill_lb1_switchyard() { kill -KILL "${PIDS[sy1]}"; }
stop_lb2_switchyard() { kill -STOP "${PIDS[sy2]}"; }
cut_lb1_off() { ip -n "$NS_SW" link set lb1 down; }

# === 0. live upgrade (SIGUSR2) on lb1, the active node: the new process
# starts before the old one exits, so process tracking sees no gap
quorum=$(count "$(ka_log 1)" "Quorum lost")
file=$work/upgrade-attempts.log
start_client "$file"
wait_for 30 oks_at_least "$file" "$(addr 1)" 10 || fail "upgrade: no 10 answers through lb1"
old=${PIDS[sy1]}
kill -USR2 "$old"
wait_for 30 gone "$old" || fail "upgrade: the old process did not exit"
PIDS[sy1]=$(pgrep -x "sy$id-lb1") || fail "upgrade: no new process"
wait_for 60 ready 1 || fail "upgrade: the new process is not ready"
n=$(count "$file" " ok $(addr 1)\$")
wait_for 30 oks_at_least "$file" "$(addr 1)" $((n + 10)) || fail "upgrade: no 10 answers through lb1 after it"
touch "$work/client.stop"
wait_for 30 grep -q '^done ' "$file" || fail "upgrade: the client did not finish"
upgrade_failed=$(awk '$1 != "done" && $4 != "ok" { f++ } END { print f + 0 }' "$file")
echo "upgrade: lb1's switchyard $old -> ${PIDS[sy1]}; $(grep -vc '^done' "$file") attempts, $upgrade_failed failed"
check "lb1 kept the VIP through a live upgrade" holds_vip 1
check "lb1's process tracking saw no gap" test "$(count "$(ka_log 1)" "Quorum lost")" = "$quorum"
check "no attempt failed during the live upgrade" test "$upgrade_failed" = 0

# === 1. crash: SIGKILL to switchyard on lb1, the active node
faults=$(count "$(ka_log 1)" "Entering FAULT STATE")
quorum=$(count "$(ka_log 1)" "Quorum lost for tracked process")
failover crash 1 2 kill_lb1_switchyard
crash_moved=$MOVED crash_failed=$FAILED
check "lb2 holds the VIP within $MAX_MOVE s of the SIGKILL" le "$crash_moved" "$MAX_MOVE"
check "fewer than $MAX_FAILED attempts failed" lt "$crash_failed" "$MAX_FAILED"
check "lb1's keepalived saw the process go (track_process)" ka_logged_more 1 "Quorum lost for tracked process" "$quorum"
check "lb1 entered FAULT" ka_logged_more 1 "Entering FAULT STATE" "$faults"

# === 2. wedged: SIGSTOP to switchyard on lb2 (active now); lb1 the standby
backups=$(count "$(ka_log 1)" "Entering BACKUP STATE")
start_switchyard 1
wait_for 60 ka_logged_more 1 "Entering BACKUP STATE" "$backups" || fail "lb1 did not become BACKUP again"
quorum=$(count "$(ka_log 2)" "Quorum lost")
readyz_failed=$(count "$(ka_log 2)" "Script .chk_switchyard. now returning 1")
failover wedged 2 1 stop_lb2_switchyard
wedged_moved=$MOVED
check "lb1 holds the VIP within $MAX_WEDGED_MOVE s of the SIGSTOP" le "$wedged_moved" "$MAX_WEDGED_MOVE"
check "lb2's /readyz check failed" ka_logged_more 2 "Script .chk_switchyard. now returning 1" "$readyz_failed"
check "lb2's process tracking saw nothing (the process still runs)" test "$(count "$(ka_log 2)" "Quorum lost")" = "$quorum"

# === 3. lost: lb1 (active now) cut off the network; lb2 the standby
backups=$(count "$(ka_log 2)" "Entering BACKUP STATE")
kill -CONT "${PIDS[sy2]}"
wait_for 60 ka_logged_more 2 "Entering BACKUP STATE" "$backups" || fail "lb2 did not become BACKUP again"
failover lost 1 2 cut_lb1_off
lost_moved=$MOVED
check "lb2 holds the VIP within $MAX_LOST_MOVE s of the cut" le "$lost_moved" "$MAX_LOST_MOVE"

echo "figures: crash ${crash_moved} s, ${crash_failed} failed; wedged ${wedged_moved} s; lost ${lost_moved} s"
[ "$ok" = 1 ] || fail "see NOT above"
echo PASS
