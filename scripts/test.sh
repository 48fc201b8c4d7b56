#!/usr/bin/env bash
# The project's one test command: installs what the tests need (Debian
# packages, only those missing), then runs every test. Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# command → Debian package that provides it
declare -A needs=(
  [promtool]=prometheus          # checks deploy/prometheus/ rules and config
  [systemd-analyze]=systemd      # verifies deploy/switchyard.service
  [curl]=curl                    # the keepalived readiness check script
)
missing=()
for cmd in "${!needs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${needs[$cmd]}")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo test --all-targets --locked "$@"
