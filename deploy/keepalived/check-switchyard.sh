#!/bin/sh
# keepalived health check for switchyard (vrrp_script chk_switchyard).
#
#   check-switchyard.sh [URL]
#
# Exits 0 when switchyard's admin endpoint answers GET /readyz with 200, and
# 1 otherwise: 503 (not ready yet, or shutting down after SIGTERM), no answer
# within the timeout, connection refused (not running, or no [admin] table).
# keepalived then puts this node in FAULT and the virtual IP moves to the
# other node — on a graceful stop that happens while switchyard is still
# draining its open connections, before they are cut.
#
# The URL is the first argument, else $SWITCHYARD_READYZ_URL, else
# http://127.0.0.1:9900/readyz (the default [admin] bind). The timeout in
# seconds is $SWITCHYARD_READYZ_TIMEOUT (default 1); keep it below the
# vrrp_script interval. Needs curl.
set -u

url=${1:-${SWITCHYARD_READYZ_URL:-http://127.0.0.1:9900/readyz}}
timeout=${SWITCHYARD_READYZ_TIMEOUT:-1}

# --noproxy: never ask a proxy from the environment about 127.0.0.1.
# No --location: a redirect is not "ready".
code=$(curl --silent --show-error --output /dev/null --write-out '%{http_code}' \
  --max-time "$timeout" --noproxy '*' -- "$url") || {
  echo "switchyard not ready: no answer from $url" >&2
  exit 1
}
if [ "$code" = 200 ]; then
  exit 0
fi
echo "switchyard not ready: $url answered $code" >&2
exit 1
