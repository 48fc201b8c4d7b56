#!/usr/bin/env python3
"""Helpers for the idle-connection memory row of benches/load/run.sh.

  idle.py serve PORT
      Backend: accept TCP connections on 127.0.0.1:PORT and hold them open
      (never reads, never closes) until killed.

  idle.py measure --port P --backend-port B --pid PID [-n 5000] [--timeout 60]
      Read VmRSS of PID, open N idle connections to 127.0.0.1:P, wait until N
      new established connections towards the backend port exist (i.e. the
      proxy really connected each one through), wait for the RSS to settle (unchanged for 2 s),
      read VmRSS again and print one JSON line.
"""
import argparse
import json
import resource
import socket
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return want
        except (ValueError, OSError):
            continue
    return soft


def serve(port):
    raise_nofile()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4096)
    held = []
    while True:
        try:
            conn, _ = ls.accept()
        except OSError as e:  # e.g. EMFILE: keep what we have, retry
            print(f"idle.py serve: accept: {e}", file=sys.stderr)
            time.sleep(0.1)
            continue
        held.append(conn)


def vmrss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def established_to(port):
    """Number of ESTABLISHED IPv4/IPv6 sockets whose remote port is `port`."""
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "01" and int(parts[2].rsplit(":", 1)[1], 16) == port:
                        n += 1
        except FileNotFoundError:
            pass
    return n


def measure(a):
    limit = raise_nofile()
    if limit < a.n + 100:
        sys.exit(f"idle.py: RLIMIT_NOFILE {limit} too low for {a.n} connections")
    base_backend = established_to(a.backend_port)
    before = vmrss_kib(a.pid)
    deadline = time.monotonic() + a.timeout
    socks = []
    for _ in range(a.n):
        while True:
            try:
                socks.append(socket.create_connection(("127.0.0.1", a.port), timeout=10))
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    sys.exit(f"idle.py: connect failed after {len(socks)} connections: {e}")
                time.sleep(0.01)
    # Wait until the proxy has opened one backend connection per client.
    while True:
        through = established_to(a.backend_port) - base_backend
        if through >= a.n:
            break
        if time.monotonic() > deadline:
            sys.exit(f"idle.py: only {through}/{a.n} connections reached the backend "
                     f"within {a.timeout}s")
        time.sleep(0.05)
    # Let the RSS settle: unchanged for 2 s (an allocator that hands freed
    # memory back in the background gets to do so), bounded by the deadline.
    after = vmrss_kib(a.pid)
    stable_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < 2.0:
        time.sleep(0.2)
        again = vmrss_kib(a.pid)
        if again != after:
            after, stable_since = again, time.monotonic()
    # Every client socket must still be open (not reset/closed by the proxy).
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += 0 if s.recv(1, socket.MSG_PEEK) == b"" else 1
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    for s in socks:
        s.close()
    print(json.dumps({
        "connections": a.n, "through_to_backend": through, "client_alive": alive,
        "rss_before_kib": before, "rss_after_kib": after,
        "kib_per_conn": (after - before) / a.n,
    }))
    if alive < a.n:
        sys.exit(f"idle.py: only {alive}/{a.n} client connections still open")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    m = sub.add_parser("measure")
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--backend-port", type=int, required=True)
    m.add_argument("--pid", type=int, required=True)
    m.add_argument("-n", type=int, default=5000)
    m.add_argument("--timeout", type=float, default=60)
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a.port)
    else:
        measure(a)


if __name__ == "__main__":
    main()
