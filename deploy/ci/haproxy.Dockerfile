# Stand-in for the official haproxy:2.8-bookworm image, for deploy/test.sh on
# a machine that reaches no container registry: Debian bookworm's haproxy
# (2.6) on the stand-in base. Tagged with the official name, so compose.yaml
# runs unchanged; like the official image it reads
# /usr/local/etc/haproxy/haproxy.cfg, runs as the `haproxy` user, stops
# gracefully on SIGUSR1 and has bash (the compose healthcheck uses it).
# Never pushed anywhere.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
 && mkdir -p /usr/local/etc/haproxy
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
