#!/bin/sh
# Starts redis-server with redis.conf and the relay user's password.
#
# The password comes from RELAY_REDIS_PASSWORD_FILE (a mounted secret) or
# RELAY_REDIS_PASSWORD; its SHA-256 replaces @RELAY_PASSWORD_SHA256@ and the
# result reaches redis-server on stdin, so the password is in no file, in no
# command line and (unset before exec) not in redis-server's environment.
# Extra arguments are passed on to redis-server (`--port 16379`) and win over
# the file. Runs with /bin/sh and coreutils: the official redis image and
# Debian's redis-server both have them.
#
# A data node of a Sentinel-managed group (deploy/compose.sentinel.yaml) also
# gets REDIS_CONF_EXTRA, a file appended to redis.conf (redis-replication.conf:
# the replication and sentinel users). Its @REPLICATION_PASSWORD_SHA256@ and
# @SENTINEL_PASSWORD_SHA256@ take the hashes of REDIS_REPLICATION_PASSWORD and
# REDIS_SENTINEL_PASSWORD (or their _FILE forms), and the node authenticates to
# whichever node is its primary as the replication user, whose password is
# therefore given in clear text (masterauth), on stdin like the rest.
set -eu

conf=${REDIS_CONF:-/usr/local/etc/redis/redis.conf}

# The value of secret $1: the contents of the file named by ${1}_FILE, or $1.
secret() {
  eval "file=\${${1}_FILE:-} value=\${${1}:-}"
  if [ -n "$file" ]; then value=$(cat "$file"); fi
  if [ "${#value}" -lt 16 ]; then
    echo "redis-start: set $1 or ${1}_FILE (at least 16 characters)" >&2
    exit 64
  fi
  printf '%s' "$value"
}
sha256() { printf '%s' "$1" | sha256sum | cut -d ' ' -f 1; }

password=$(secret RELAY_REDIS_PASSWORD)
config=$(sed "s/@RELAY_PASSWORD_SHA256@/$(sha256 "$password")/" "$conf")
if [ -n "${REDIS_CONF_EXTRA:-}" ]; then
  replication=$(secret REDIS_REPLICATION_PASSWORD)
  sentinel=$(secret REDIS_SENTINEL_PASSWORD)
  case $replication in
    *[!A-Za-z0-9._~+/=-]*)
      echo "redis-start: REDIS_REPLICATION_PASSWORD may hold only letters, digits and ._~+/=-" >&2
      exit 64
      ;;
  esac
  config="$config
$(sed -e "s/@REPLICATION_PASSWORD_SHA256@/$(sha256 "$replication")/" \
    -e "s/@SENTINEL_PASSWORD_SHA256@/$(sha256 "$sentinel")/" "$REDIS_CONF_EXTRA")
masterauth \"$replication\""
fi
unset password replication sentinel RELAY_REDIS_PASSWORD REDIS_REPLICATION_PASSWORD REDIS_SENTINEL_PASSWORD

# A here-document, not a pipe: `exec` keeps redis-server as this process
# (PID 1 of the container), so it receives the stop signal itself.
exec redis-server "$@" - <<EOF
$config
EOF
