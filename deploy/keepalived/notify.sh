#!/bin/sh
# keepalived state-change hook: logs the transition to syslog/journald with
# the tag switchyard-ha (`journalctl -t switchyard-ha`).
#
# Called as
#   notify.sh STATE                          (notify_master/_backup/_fault/_stop "notify.sh MASTER")
#   notify.sh TYPE NAME STATE PRIORITY       (keepalived's generic `notify` hook)
# STATE is MASTER, BACKUP, FAULT or STOP. Always exits 0: a logging hook
# must never disturb keepalived.
set -u

if [ "$#" -ge 3 ]; then
  what="$1 $2"
  state=$3
  prio=${4:-}
else
  what="VRRP instance"
  state=${1:-UNKNOWN}
  prio=""
fi

case $state in
  MASTER) level=notice; meaning="this node now holds the virtual IP and takes new connections" ;;
  BACKUP) level=notice; meaning="this node is standby (the other node holds the virtual IP)" ;;
  FAULT) level=warning; meaning="switchyard is not ready here (or the interface is down): virtual IP released" ;;
  STOP) level=notice; meaning="keepalived stopped: virtual IP released" ;;
  *) level=warning; meaning="unknown state" ;;
esac

msg="$what on $(hostname 2>/dev/null || echo '?') entered $state${prio:+ (priority $prio)}: $meaning"
logger -t switchyard-ha -p "daemon.$level" -- "$msg" 2>/dev/null || printf '%s\n' "switchyard-ha: $msg" >&2
exit 0
