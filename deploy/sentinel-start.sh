#!/bin/sh
# Starts redis-sentinel watching the relay's primary (deploy/compose.sentinel.yaml).
#
# Sentinel rewrites its configuration file as it learns the replicas, the
# other Sentinels and each failover, so the file must be writable: it is
# written to SENTINEL_CONF (default /run/sentinel/sentinel.conf), which the
# container mounts as a tmpfs: memory, never a disk, gone with the container.
#
#   SENTINEL_PRIMARY_HOST, SENTINEL_PRIMARY_PORT  the primary to start from
#   SENTINEL_MASTER_NAME     the group's name (the relay URL's /MASTER-NAME): relay
#   SENTINEL_QUORUM          Sentinels that must agree the primary is down: 2
#   SENTINEL_DOWN_AFTER_MS   silence before a Sentinel deems it down: 5000
#   SENTINEL_BIND, SENTINEL_PORT  where this Sentinel listens: every interface, 26379
#   RELAY_SENTINEL_PASSWORD  (or _FILE) what clients of the Sentinels, the
#                            relays and the other Sentinels, log in with
#   REDIS_SENTINEL_PASSWORD  (or _FILE) the sentinel user's on the data nodes
#                            (deploy/redis-replication.conf)
set -eu

conf=${SENTINEL_CONF:-/run/sentinel/sentinel.conf}
name=${SENTINEL_MASTER_NAME:-relay}

secret() { # as in redis-start.sh; in clear text here, so no quote or backslash
  eval "file=\${${1}_FILE:-} value=\${${1}:-}"
  if [ -n "$file" ]; then value=$(cat "$file"); fi
  if [ "${#value}" -lt 16 ]; then
    echo "sentinel-start: set $1 or ${1}_FILE (at least 16 characters)" >&2
    exit 64
  fi
  case $value in
    *[!A-Za-z0-9._~+/=-]*)
      echo "sentinel-start: $1 may hold only letters, digits and ._~+/=-" >&2
      exit 64
      ;;
  esac
  printf '%s' "$value"
}
own=$(secret RELAY_SENTINEL_PASSWORD)
nodes=$(secret REDIS_SENTINEL_PASSWORD)

umask 077
cat >"$conf" <<EOF
bind ${SENTINEL_BIND:-* -::*}
port ${SENTINEL_PORT:-26379}
dir $(dirname "$conf")
logfile ""
# The relays find the primary here, so nobody gets in without the password;
# the Sentinels give it to each other too.
requirepass "$own"
sentinel sentinel-pass "$own"
# Compose and Kubernetes name the data nodes by host name.
sentinel resolve-hostnames yes
sentinel monitor $name ${SENTINEL_PRIMARY_HOST:?} ${SENTINEL_PRIMARY_PORT:-6379} ${SENTINEL_QUORUM:-2}
sentinel auth-user $name sentinel
sentinel auth-pass $name "$nodes"
sentinel down-after-milliseconds $name ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout $name 60000
sentinel parallel-syncs $name 1
EOF
unset own nodes RELAY_SENTINEL_PASSWORD REDIS_SENTINEL_PASSWORD
exec redis-sentinel "$conf"
