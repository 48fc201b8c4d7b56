#!/usr/bin/env bash
# The project's one test command: installs what the tests need (Debian
# packages, only those missing: promtool, systemd-analyze, curl, python3, openssl,
# slowhttptest, keepalived, lintian, Chromium and ChromeDriver, PostgreSQL,
# Redis, MariaDB, dnsmasq; and cargo-deb from crates.io), then runs every
# test. The database, DNS, browser and HA-pair tests start their own servers
# on loopback or in network namespaces they create; no system service is
# used.
# Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# command → Debian package that provides it
declare -A needs=(
  [promtool]=prometheus          # checks deploy/prometheus/ rules and config
  [systemd-analyze]=systemd      # verifies deploy/switchyard.service
  [curl]=curl                    # the keepalived readiness check script; HTTPS clients (tests/tls_clients.rs)
  [python3]=python3              # an HTTPS client with Python's ssl (tests/tls_clients.rs)
  [openssl]=openssl              # s_client sends what other clients will not (tests/tls.rs)
  [slowhttptest]=slowhttptest    # slowloris, slow body and slow read (tests/slow_clients.rs)
  [keepalived]=keepalived        # the active/standby pair (tests/ha_failover.rs)
  [lintian]=lintian              # checks the Debian package (tests/package.rs)
  [chromium]=chromium            # the status page in a real browser (tests/status_page.rs)
  [chromedriver]=chromium-driver
)
missing=()
for cmd in "${!needs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${needs[$cmd]}")
done
# PostgreSQL's server binaries live under /usr/lib/postgresql/<version>/bin
# (the /usr/bin wrappers can exist without a server).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
# mariadbd lives in /usr/sbin, which a non-root PATH may lack.
{ [ -x /usr/sbin/mariadbd ] && command -v mariadb-install-db >/dev/null 2>&1 &&
  command -v mariadb >/dev/null 2>&1; } || missing+=(mariadb-server)
# dnsmasq (the DNS discovery tests' server) lives in /usr/sbin too;
# dnsmasq-base has the binary without the system service.
[ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# cargo-deb builds the Debian package (tests/package.rs); pinned, so a CI
# run builds what was tested here.
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked --quiet cargo-deb --version 3.8.0

cargo test --all-targets --locked "$@"
