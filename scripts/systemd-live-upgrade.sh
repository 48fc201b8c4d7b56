#!/usr/bin/env bash
# Live upgrade under a real systemd: boots systemd (the machine's own,
# /lib/systemd/systemd) as PID 1 of a private PID and mount namespace, runs
# the shipped unit (deploy/switchyard.service, unchanged but for a drop-in
# that points it at this build, a config here and a 6 s watchdog) as the
# unprivileged `switchyard` user, holds a connection open through it and
# sends `systemctl kill -s USR2 switchyard` three times. Checks after each:
# systemd's MainPID is the new process, the unit stays active with no
# restart, the old process is gone, the held connection still echoes, and
# after two watchdog periods the unit is still active (the new main process
# pings). Needs root (namespaces, mounts); nothing outside the namespace
# changes but an empty /etc/switchyard (ConfigurationDirectory=).
#
#   bash scripts/systemd-live-upgrade.sh        # builds and uses target/release/switchyard
#   SWITCHYARD_BIN=path bash scripts/...        # that binary (tests/systemd.rs: the test build)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 2; }
bin=${SWITCHYARD_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin=target/release/switchyard
fi
# The unit's ProtectSystem=strict/PrivateTmp hide /tmp: keep everything the
# service reads under the project's target directory.
work=$PWD/target/systemd-proof
rm -rf "$work" && mkdir -p "$work/units/switchyard.service.d"
cp "$bin" "$work/switchyard"
chmod 755 "$work" "$work/switchyard"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LPORT=$(port) BPORT=$(port)
cat >"$work/switchyard.toml" <<EOF
[[listener]]
name = "proof"
bind = "127.0.0.1:$LPORT"
[[listener.backend]]
name = "echo"
address = "127.0.0.1:$BPORT"
EOF
chmod 644 "$work/switchyard.toml"
cp deploy/switchyard.service "$work/units/switchyard.service"
cat >"$work/units/switchyard.service.d/proof.conf" <<EOF
[Service]
ExecStartPre=
ExecStartPre=$work/switchyard check --config $work/switchyard.toml
ExecStart=
ExecStart=$work/switchyard run --config $work/switchyard.toml
ExecReload=
ExecReload=/bin/kill -HUP \$MAINPID
WatchdogSec=6s
EOF
cp /etc/passwd "$work/passwd" && cp /etc/group "$work/group"
grep -q '^switchyard:' "$work/passwd" || echo 'switchyard:x:989:989:switchyard:/nonexistent:/usr/sbin/nologin' >>"$work/passwd"
grep -q '^switchyard:' "$work/group" || echo 'switchyard:x:989:' >>"$work/group"

# An echo backend on loopback (the network namespace is shared).
python3 - "$BPORT" <<'EOF' &
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
def echo(c):
    while (d := c.recv(65536)):
        c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
EOF
ECHO=$!

# systemd as PID 1 of its own namespaces; only basic.target, so none of the
# machine's installed services start. /tmp, /var/tmp and /run get tmpfs
# mounts of their own first: systemd-tmpfiles empties /tmp at boot, and
# systemd fills /run and journald /var/log/journal, which must not touch
# the machine's.
container=other unshare --mount --pid --fork --mount-proc --propagation private \
    sh -c 'mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /var/tmp && mount -t tmpfs tmpfs /run &&
           { [ ! -d /var/log/journal ] || mount -t tmpfs tmpfs /var/log/journal; } &&
           exec /lib/systemd/systemd --system --unit=basic.target' >"$work/systemd.log" 2>&1 &
UNSHARE=$!
SD=""
cleanup() {
    [ -z "$SD" ] || kill -9 "$SD" 2>/dev/null || true
    kill "$UNSHARE" "$ECHO" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
    SD=$(pgrep -f -P "$UNSHARE" '^/lib/systemd/systemd --system' || true)
    [ -n "$SD" ] && break
    sleep 0.1
done
[ -n "$SD" ] || { cat "$work/systemd.log"; echo "systemd did not start" >&2; exit 1; }
in_ns() { nsenter -t "$SD" -m -p "$@"; }
for _ in $(seq 300); do
    state=$(in_ns systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] && break
    sleep 0.1
done
echo "systemd: $(in_ns systemctl --version | head -1), $state"
in_ns mount --bind "$work/passwd" /etc/passwd
in_ns mount --bind "$work/group" /etc/group
in_ns mount -t tmpfs tmpfs /etc/systemd/system
in_ns cp -r "$work/units/." /etc/systemd/system/
in_ns systemctl daemon-reload
in_ns systemctl start switchyard
show() { in_ns systemctl show switchyard -p "$1" --value; }
echo "started: ActiveState=$(show ActiveState) MainPID=$(show MainPID) User=$(show User)"

# A client that holds one connection for the whole proof, echoing a line
# every 0.2 s and checking every answer; it reports on a FIFO when asked.
mkfifo "$work/ask" "$work/told"
python3 - "$LPORT" "$work/ask" "$work/told" <<'EOF' &
import socket, sys, time, threading
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.settimeout(10)
n, bad = 0, []
lock = threading.Lock()
def loop():
    global n
    while True:
        msg = b"line %d\n" % n
        c.sendall(msg)
        got = b""
        while len(got) < len(msg):
            part = c.recv(len(msg) - len(got))
            if not part:
                bad.append("closed"); return
            got += part
        with lock:
            if got != msg: bad.append(got)
            n += 1
        time.sleep(0.2)
threading.Thread(target=loop, daemon=True).start()
while True:
    open(sys.argv[2]).read()
    with lock:
        open(sys.argv[3], "w").write("%d %s\n" % (n, "ok" if not bad else "BAD %r" % bad[:3]))
EOF
CLIENT=$!
ask() { echo >"$work/ask"; cat "$work/told"; }
# Wait (up to 10 s) until the client has had N more lines echoed than it
# had when asked first; print its report.
echoed_more() {
    local first n report
    first=$(ask | cut -d' ' -f1)
    for _ in $(seq 100); do
        report=$(ask)
        n=${report%% *}
        ((n >= first + $1)) && break
        sleep 0.1
    done
    echo "$report"
}
echo "client: $(echoed_more 3) before the upgrades"

fail=0
for i in 1 2 3; do
    old=$(show MainPID)
    in_ns systemctl kill -s USR2 switchyard
    new=$old
    for _ in $(seq 200); do
        new=$(show MainPID)
        [ "$new" != "$old" ] && [ "$new" != 0 ] && break
        sleep 0.05
    done
    # The PID is the namespace's: ask there (on the host the same number
    # can be any process, a kernel thread even).
    for _ in $(seq 100); do in_ns kill -0 "$old" 2>/dev/null || break; sleep 0.05; done
    gone=yes; in_ns kill -0 "$old" 2>/dev/null && gone=no
    line="upgrade $i: MainPID $old -> $new, old gone: $gone, ActiveState=$(show ActiveState), NRestarts=$(show NRestarts), client: $(echoed_more 3)"
    echo "$line"
    [[ $new != "$old" && $gone == yes && $line == *"ActiveState=active, NRestarts=0"* && $line == *" ok" ]] || fail=1
done
# Two watchdog periods must pass (this waits for time itself, not for an
# event): a main process that did not ping would be killed meanwhile.
sleep 13
final="after two watchdog periods: ActiveState=$(show ActiveState) SubState=$(show SubState) NRestarts=$(show NRestarts) MainPID=$(show MainPID), client: $(ask)"
echo "$final"
[[ $final == *"ActiveState=active SubState=running NRestarts=0"* && $final == *" ok" ]] || fail=1
echo "--- journal"
in_ns journalctl -u switchyard --no-pager -o short-precise | grep -E "upgrade|took|taken|ready|MAINPID|notification|Watchdog|watchdog" || true
kill "$CLIENT" 2>/dev/null || true
in_ns systemctl stop switchyard
[ "$fail" = 0 ] && echo "PASS" || { echo "FAIL"; exit 1; }
