# Stand-in for the official redis:7.2-bookworm image, for deploy/test.sh on a
# machine that reaches no container registry: Debian bookworm's redis-server
# (7.0) and redis-sentinel on the stand-in base. Tagged with the official
# name, so compose.yaml and compose.sentinel.yaml run unchanged; like the
# official image it has redis-server, redis-sentinel, redis-cli, sh and a
# `redis` user. Never pushed anywhere.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-sentinel \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
 && mkdir -p /usr/local/etc/redis /data \
 && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
