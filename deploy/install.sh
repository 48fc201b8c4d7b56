#!/usr/bin/env bash
# Installs switchyard as a systemd service.
#
#   bash deploy/install.sh [--binary PATH]
#   DESTDIR=/tmp/root PREFIX=/usr bash deploy/install.sh --binary target/release/switchyard
#
# What it installs (paths below $DESTDIR; PREFIX defaults to /usr):
#   $PREFIX/bin/switchyard                       the daemon (0755)
#   /lib/systemd/system/switchyard.service       the unit (0644)
#   /etc/switchyard/switchyard.toml              the example config, ONLY if absent:
#                                                an operator's config is never touched
#   /etc/switchyard/switchyard.toml.dist         the shipped config, always (to diff against)
#   $PREFIX/lib/switchyard/check-switchyard.sh   keepalived health check (docs/ha.md)
#   $PREFIX/lib/switchyard/notify.sh             keepalived state-change hook
# and, on the real root only (DESTDIR empty): the system user and group
# `switchyard`, then `systemctl daemon-reload` if systemd is running. It
# neither enables nor starts the service.
#
# Idempotent: a file whose content and mode are already right is left alone
# (not even its mtime changes), so running it twice changes nothing.
#
# On Debian 12 or later, install the package instead: `bash
# scripts/package.sh` builds it with cargo-deb (these files plus the man
# page and shell completions; /etc/switchyard/switchyard.toml as a dpkg
# conffile, which an upgrade never replaces without asking; the user
# created by its postinst; removal and purge through dpkg;
# tests/package.rs checks it). This script is for other systemd
# distributions: it needs no extra tool, and installs into a temporary root
# with DESTDIR, which is how tests/service_files.rs checks it. Packagers of
# other formats can call it with DESTDIR and create the user in their
# post-install step (with DESTDIR set, the script only prints the command
# it would have run).
#
# The unit goes to /lib/systemd/system, the distribution's ("vendor") unit
# directory, not /etc/systemd/system: /etc/systemd/system belongs to the
# administrator, and a unit there would shadow the whole file, so a
# reinstall would have to choose between overwriting local edits and not
# upgrading the unit. With the unit in /lib, local changes go in drop-ins
# (`systemctl edit switchyard` → /etc/systemd/system/switchyard.service.d/)
# and survive upgrades. (/lib is /usr/lib on merged-/usr systems; systemd
# reads both.) Override with SYSTEMD_UNIT_DIR if your distribution differs.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr}
SYSTEMD_UNIT_DIR=${SYSTEMD_UNIT_DIR:-/lib/systemd/system}
binary=$repo/target/release/switchyard

usage() {
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
}

while (($#)); do
  case $1 in
    --binary)
      [[ $# -ge 2 ]] || { echo "install.sh: --binary needs a path" >&2; exit 1; }
      binary=$2
      shift 2
      ;;
    --binary=*)
      binary=${1#--binary=}
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "install.sh: unknown argument: $1" >&2
      usage >&2
      exit 1
      ;;
  esac
done

if [[ ! -f $binary || ! -x $binary ]]; then
  echo "install.sh: no executable at $binary; build it first (cargo build --release) or pass --binary PATH" >&2
  exit 1
fi
if [[ ! $PREFIX =~ ^/[A-Za-z0-9._/+-]*$ ]]; then
  echo "install.sh: PREFIX must be an absolute path of plain characters, got '$PREFIX'" >&2
  exit 1
fi
PREFIX=${PREFIX%/}
[[ -n $PREFIX ]] || PREFIX=/usr

bindir=$PREFIX/bin
libexecdir=$PREFIX/lib/switchyard
confdir=/etc/switchyard

say() { printf '%s\n' "$*"; }
# quoted ARGS...: the arguments as one shell-quoted command line.
quoted() {
  local out
  out=$(printf '%q ' "$@")
  printf '%s' "${out% }"
}

# dir PATH MODE: create $DESTDIR$PATH with MODE if it is missing. An
# existing directory is left as it is (an operator may have made
# /etc/switchyard 0750 root:switchyard on purpose).
dir() {
  local target=$DESTDIR$1
  if [[ ! -d $target ]]; then
    mkdir -p "$target"
    chmod "$2" "$target"
    say "created directory: $target"
  fi
}

# file SRC DEST MODE: install SRC as $DESTDIR$DEST with MODE unless it is
# already there with the same content and mode.
file() {
  local src=$1 target=$DESTDIR$2 mode=$3
  if [[ -f $target ]] && cmp -s "$src" "$target"; then
    if [[ $(stat -c %a "$target") != "${mode#0}" ]]; then
      chmod "$mode" "$target"
      say "fixed mode $mode: $target"
    else
      say "unchanged: $target"
    fi
    return
  fi
  local existed=no
  [[ -e $target ]] && existed=yes
  # Copy beside the target, then rename: a running daemon or a reader never
  # sees a half-written file, and replacing a running binary is safe.
  local tmp
  tmp=$(mktemp "$(dirname "$target")/.$(basename "$target").XXXXXX")
  cp "$src" "$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$target"
  if [[ $existed == yes ]]; then
    say "updated: $target"
  else
    say "installed: $target"
  fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The unit names /usr/bin/switchyard; follow PREFIX.
sed "s#/usr/bin/switchyard#$bindir/switchyard#g" "$repo/deploy/switchyard.service" >"$work/switchyard.service"

dir "$bindir" 0755
dir "$SYSTEMD_UNIT_DIR" 0755
dir "$libexecdir" 0755
dir "$confdir" 0755

file "$binary" "$bindir/switchyard" 0755
file "$work/switchyard.service" "$SYSTEMD_UNIT_DIR/switchyard.service" 0644
file "$repo/deploy/keepalived/check-switchyard.sh" "$libexecdir/check-switchyard.sh" 0755
file "$repo/deploy/keepalived/notify.sh" "$libexecdir/notify.sh" 0755

# The config: 0644 root-owned, readable by the service user (it holds no
# secret; put an admin token in token_file, 0640 root:switchyard).
file "$repo/config/switchyard.toml" "$confdir/switchyard.toml.dist" 0644
if [[ -e $DESTDIR$confdir/switchyard.toml ]]; then
  say "kept existing config: $DESTDIR$confdir/switchyard.toml (shipped version: switchyard.toml.dist)"
else
  file "$repo/config/switchyard.toml" "$confdir/switchyard.toml" 0644
fi

# The service user. With DESTDIR this is a staging root, not the system the
# files will run on: say what to do instead (a package does it in postinst).
groupadd_cmd=(groupadd --system switchyard)
useradd_cmd=(useradd --system --gid switchyard --no-create-home --home-dir /nonexistent
  --shell /usr/sbin/nologin --comment "switchyard load balancer" switchyard)
if [[ -n $DESTDIR ]]; then
  say "DESTDIR is set: not creating the user; on the target system run (e.g. in postinst):"
  say "  getent group switchyard >/dev/null || $(quoted "${groupadd_cmd[@]}")"
  say "  getent passwd switchyard >/dev/null || $(quoted "${useradd_cmd[@]}")"
else
  if getent group switchyard >/dev/null; then
    say "unchanged: group switchyard exists"
  else
    "${groupadd_cmd[@]}"
    say "created group: switchyard"
  fi
  if getent passwd switchyard >/dev/null; then
    say "unchanged: user switchyard exists"
  else
    "${useradd_cmd[@]}"
    say "created system user: switchyard"
  fi
fi

if [[ -z $DESTDIR && ! -x /bin/kill ]]; then
  say "warning: /bin/kill is missing (Debian package procps): 'systemctl reload switchyard' needs it"
fi

if [[ -z $DESTDIR ]]; then
  # The same test as sd_booted(3): is systemd the running init?
  if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    say "ran: systemctl daemon-reload"
    if systemctl is-active --quiet switchyard; then
      say "switchyard is running: 'systemctl restart switchyard' to run the new binary"
    else
      say "next: edit $confdir/switchyard.toml, then 'systemctl enable --now switchyard'"
    fi
  else
    say "systemd is not running: skipped systemctl daemon-reload"
  fi
else
  say "DESTDIR is set: skipped systemctl daemon-reload"
fi
