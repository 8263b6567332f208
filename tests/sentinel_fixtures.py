"""A Sentinel-watched primary for the tests: one primary, one replica, three Sentinels.

Everything listens on 127.0.0.1 on free ports and keeps its files in one private
temporary directory. The data nodes are the wheel's valkey-server, with
`save ""` and `appendonly no` (Debian's redis-sentinel 7.0.15 manages them as
it does redis-server: it drives them with INFO, PING, pub/sub hellos, REPLICAOF,
CLIENT KILL and CONFIG REWRITE, which fails harmlessly without a config file);
the Sentinels are Debian's redis-sentinel, quick to judge a node down
(`down-after-milliseconds` 1000) so a failover takes a second or two. After
one, Sentinel turns the old primary into a replica only ~10 s later (its
fixed INFO and hello periods): `wait_replica` waits for that.

Test modules load this file with `pytest_plugins = ["sentinel_fixtures"]`:
`redis_sentinel` is one group for the session, for tests that only read it;
`fresh_sentinel` is a group of the test's own, for tests that fail it over or
kill its processes. Every process is stopped by its PID.

PYTEST_DONT_REWRITE: test modules import SentinelGroup from here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import pytest
import redis

from relay.embedded import (
    EmbeddedServer,
    die_with_parent,
    free_loopback_port,
    valkey_binary,
    wait_until,
)
from relay.redis.address import Node

MASTER_NAME = "relaymaster"
SENTINEL_BINARY = "/usr/bin/redis-sentinel"
SENTINELS = 3
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
READY_S = 30.0  # Sentinels discover each other through hello messages every 2 s
FAILOVER_S = 30.0
HOST = "127.0.0.1"
# Full syncs at once and through memory: no 5 s wait for more replicas, no RDB file.
REPLICATION = ("--repl-diskless-sync-delay", "0", "--repl-diskless-load", "swapdb")


def _client(port: int) -> redis.Redis:
    return redis.Redis(HOST, port, socket_timeout=1.0, decode_responses=True)


def _ask(port: int, *command: Any) -> Any:
    """One command to one node; None when it cannot be reached or answers an error."""
    with _client(port) as client:
        try:
            return client.execute_command(*command)
        except redis.RedisError:
            return None


class _Sentinel:
    """One redis-sentinel process with its config file (Sentinel rewrites it)."""

    def __init__(self, directory: str, port: int, primary_port: int) -> None:
        self.port = port
        self.config = os.path.join(directory, f"sentinel-{port}.conf")
        self.log = os.path.join(directory, f"sentinel-{port}.log")
        lines = [
            f"port {port}",
            f"bind {HOST}",
            "daemonize no",
            f"dir {directory}",
            f'logfile "{self.log}"',
            f"sentinel monitor {MASTER_NAME} {HOST} {primary_port} {QUORUM}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        with open(self.config, "w") as file:
            file.write("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [SENTINEL_BINARY, self.config],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log) as file:
                return "".join(file.readlines()[-lines:])
        except OSError:
            return "(no log)"


class SentinelGroup:
    """A primary, a replica and three Sentinels; a context manager (started on entry).

    `url` is the relay's `--redis-url` for the group; `primary()` is the primary
    as the Sentinels name it now; `failover()` has them fail it over; `kill(port)`
    kills (SIGKILL) the data node or Sentinel listening on `port`."""

    def __init__(self, data_binary: str | None = None) -> None:
        self._data_binary = data_binary or valkey_binary()
        self._dir: str | None = None
        self._nodes: dict[int, EmbeddedServer] = {}
        self._sentinels: dict[int, _Sentinel] = {}

    @property
    def master_name(self) -> str:
        return MASTER_NAME

    @property
    def sentinel_ports(self) -> list[int]:
        """Every Sentinel's port, the killed ones too, in the order of `url`."""
        return list(self._sentinels)

    @property
    def data_ports(self) -> list[int]:
        """The data nodes' ports, primary first as started (not as now)."""
        return list(self._nodes)

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self._sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="relay-sentinel-")
        os.chmod(self._dir, 0o700)
        try:
            primary = self._start_node(())
            self._start_node(("--replicaof", HOST, str(primary)))
            wait_until(
                "the replica is in sync",
                lambda: self._replicates(self.data_ports[1]),
                READY_S,
            )
            for _ in range(SENTINELS):
                port = free_loopback_port()
                self._sentinels[port] = _Sentinel(self._dir, port, primary)
            self._wait_known(primary)
        except BaseException:
            self.stop()
            raise

    def _start_node(self, extra: tuple[str, ...]) -> int:
        port = free_loopback_port()
        server = EmbeddedServer(binary=self._data_binary, port=port, extra_args=REPLICATION + extra)
        self._nodes[port] = server  # before start(): stop() must find it even if start fails
        server.start()
        return port

    def _replicates(self, port: int) -> bool:
        """Whether the node on `port` is a replica whose link to its primary is up."""
        with _client(port) as client:
            try:
                info = client.info("replication")
            except redis.RedisError:
                return False
        return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")

    def _wait_known(self, primary: int) -> None:
        """Until every Sentinel names the primary and knows the replica and the others."""

        def known(port: int) -> bool:
            master = _ask(port, "SENTINEL", "MASTER", MASTER_NAME)
            if not isinstance(master, dict):
                return False
            replicas = _ask(port, "SENTINEL", "REPLICAS", MASTER_NAME) or []
            return (
                int(master["port"]) == primary
                and int(master["num-other-sentinels"]) == SENTINELS - 1
                and any(r["flags"] == "slave" and r["master-link-status"] == "ok" for r in replicas)
            )

        try:
            wait_until(
                "every Sentinel knows the group", lambda: all(map(known, self._live())), READY_S
            )
        except TimeoutError as exc:
            logs = "\n".join(s.log_tail() for s in self._sentinels.values())
            raise TimeoutError(f"{exc}\n{logs}") from None

    def _live(self) -> list[int]:
        return [port for port, s in self._sentinels.items() if s.process is not None]

    def primary(self) -> Node:
        """The primary as the first Sentinel still running names it."""
        for port in self._live():
            answer = _ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            if answer:
                return answer[0], int(answer[1])
        raise RuntimeError("no Sentinel names the primary")

    def role(self, node: Node) -> str | None:
        """What ROLE says on a data node: "master", "slave", or None if it is down."""
        answer = _ask(node[1], "ROLE")
        return str(answer[0]) if answer else None

    def failover(self) -> Node:
        """SENTINEL FAILOVER, then wait until every running Sentinel names the new
        primary and it says it is one; return it."""
        old = self.primary()
        for port in self._live():
            if _ask(port, "SENTINEL", "FAILOVER", MASTER_NAME):
                break
        else:
            raise RuntimeError("no Sentinel accepted SENTINEL FAILOVER")
        names: list[Node] = []

        def switched() -> bool:
            names[:] = [n for n in map(self._named_by, self._live()) if n is not None]
            return (
                len(names) == len(self._live())
                and len(set(names)) == 1
                and names[0] != old
                and self.role(names[0]) == "master"
            )

        wait_until(f"failover away from {old}", switched, FAILOVER_S)
        return names[0]

    def wait_replica(self, node: Node, timeout_s: float = FAILOVER_S) -> None:
        """Until `node` is a replica in sync with the current primary (an old primary is
        turned into one a few seconds after a failover)."""
        wait_until(f"{node} replicates", lambda: self._replicates(node[1]), timeout_s)

    def _named_by(self, port: int) -> Node | None:
        answer = _ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return (answer[0], int(answer[1])) if answer else None

    def kill(self, port: int) -> None:
        """SIGKILL the data node or Sentinel on `port` (as a crash would)."""
        if port in self._sentinels:
            self._sentinels[port].kill()
        else:
            server = self._nodes[port]
            os.kill(server.pid, signal.SIGKILL)
            server.stop()  # reaps it and removes its directory

    def stop(self) -> None:
        """Stop every process by its PID and remove the directory."""
        for sentinel in self._sentinels.values():
            sentinel.stop()
        for server in self._nodes.values():
            server.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> SentinelGroup:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelGroup]:
    """One group for the whole session: do not fail it over or kill its processes."""
    if not os.path.exists(SENTINEL_BINARY):
        pytest.skip("redis-sentinel is not installed")
    with SentinelGroup() as group:
        yield group


@pytest.fixture
def fresh_sentinel() -> Iterator[SentinelGroup]:
    """A group of the test's own, to fail over or break."""
    if not os.path.exists(SENTINEL_BINARY):
        pytest.skip("redis-sentinel is not installed")
    with SentinelGroup() as group:
        yield group
