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
set -eu

conf=${REDIS_CONF:-/usr/local/etc/redis/redis.conf}
if [ -n "${RELAY_REDIS_PASSWORD_FILE:-}" ]; then
  password=$(cat "$RELAY_REDIS_PASSWORD_FILE")
else
  password=${RELAY_REDIS_PASSWORD:-}
fi
if [ "${#password}" -lt 16 ]; then
  echo "redis-start: set RELAY_REDIS_PASSWORD or RELAY_REDIS_PASSWORD_FILE (at least 16 characters)" >&2
  exit 64
fi
hash=$(printf '%s' "$password" | sha256sum | cut -d ' ' -f 1)
unset password RELAY_REDIS_PASSWORD
config=$(sed "s/@RELAY_PASSWORD_SHA256@/$hash/" "$conf")

# A here-document, not a pipe: `exec` keeps redis-server as this process
# (PID 1 of the container), so it receives the stop signal itself.
exec redis-server "$@" - <<EOF
$config
EOF
