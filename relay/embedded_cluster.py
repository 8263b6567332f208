"""A private, memory-only Redis Cluster on loopback: N primaries, R replicas each.

The tests and `relay bench --spawn --redis cluster` use it. Each node is an
`EmbeddedServer` (its own private directory holds its cluster config file)
with a short node timeout, so a failover takes seconds; `valkey-cli --cluster
create` (or `redis-cli`, next to a redis-server) assigns the slots.
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import ExitStack, suppress
from types import TracebackType

import attrs
import redis
from redis.crc import key_slot

from relay.embedded import EmbeddedServer, free_loopback_port, valkey_binary, wait_until

SLOTS = 16384
HOST = "127.0.0.1"


@attrs.frozen
class ClusterMember:
    """One line of CLUSTER NODES that is not failing."""

    host: str
    port: int
    node_id: str
    primary_id: str | None  # a replica's primary; None for a primary
    slots: tuple[tuple[int, int], ...]  # (first, last) ranges a primary serves

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def cli_binary(server_binary: str) -> str:
    """`valkey-cli` next to `valkey-server`, `redis-cli` next to `redis-server`."""
    folder, name = os.path.split(server_binary)
    return os.path.join(folder, name.replace("-server", "-cli"))


def parse_cluster_nodes(text: str) -> list[ClusterMember]:
    """The members of a CLUSTER NODES reply that are connected and not failing."""
    members = []
    for line in text.splitlines():
        fields = line.split()
        node_id, address, flags, primary = fields[:4]
        flag_set = set(flags.split(","))
        if flag_set & {"fail", "fail?", "noaddr", "handshake"}:
            continue
        host_port = address.partition("@")[0]
        host, _, port = host_port.rpartition(":")
        slots = tuple(_slot_range(f) for f in fields[8:] if not f.startswith("["))
        replica_of = None if primary == "-" else primary
        members.append(ClusterMember(host, int(port), node_id, replica_of, slots))
    return members


def _slot_range(field: str) -> tuple[int, int]:
    first, _, last = field.partition("-")
    return int(first), int(last or first)


@attrs.define
class EmbeddedCluster:
    """Start with `with EmbeddedCluster(primaries=3, replicas=1) as cluster:` from the main
    thread (see EmbeddedServer); every node is stopped by PID at the end."""

    primaries_count: int = 3
    replicas_per_primary: int = 0
    binary: str = attrs.field(factory=valkey_binary)
    node_timeout_ms: int = 1000
    _servers: list[EmbeddedServer] = attrs.field(factory=list, init=False)
    _stack: ExitStack = attrs.field(factory=ExitStack, init=False)

    @property
    def url(self) -> str:
        """`redis+cluster://` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for _, port, _ in self.nodes)

    @property
    def nodes(self) -> list[tuple[str, int, int]]:
        """(host, port, pid) of every node started, killed ones included."""
        return [(HOST, s.port or 0, s.pid) for s in self._servers]

    def node_url(self, port: int) -> str:
        return f"redis://{HOST}:{port}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the nodes, create the cluster, and wait until every node sees it whole."""
        try:
            for _ in range(self.primaries_count * (1 + self.replicas_per_primary)):
                self._servers.append(self._stack.enter_context(self._node()))
            create = [cli_binary(self.binary), "--cluster", "create"]
            create += [f"{HOST}:{port}" for _, port, _ in self.nodes]
            create += ["--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
            subprocess.run(create, check=True, capture_output=True, timeout=timeout_s)
            want_replicas = self.primaries_count * self.replicas_per_primary
            wait_until(
                "the Redis Cluster forms",
                lambda: self._formed(len(self._servers), want_replicas),
                timeout_s,
            )
        except BaseException:
            self.stop()
            raise

    def _node(self) -> EmbeddedServer:
        args = [
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-port", str(free_loopback_port())),
            *("--cluster-node-timeout", str(self.node_timeout_ms)),
            # a replica syncs over the socket (no RDB file) and at once, not after 5 s
            *("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"),
        ]
        return EmbeddedServer(binary=self.binary, port=free_loopback_port(), extra_args=tuple(args))

    def _formed(self, want_nodes: int, want_replicas: int) -> bool:
        for _, port, _ in self.nodes:
            with self._client(port) as client:
                info = client.execute_command("CLUSTER", "INFO")
                role = client.execute_command("ROLE")
            if "cluster_state:ok" not in info or f"cluster_slots_assigned:{SLOTS}" not in info:
                return False
            if f"cluster_known_nodes:{want_nodes}" not in info:
                return False
            if role[0] == "slave" and role[3] != "connected":
                return False
        return len(self.replicas()) == want_replicas

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(HOST, port, decode_responses=True, socket_timeout=1.0)

    def _members(self) -> list[ClusterMember]:
        """CLUSTER NODES as the first node that answers sees it."""
        for _, port, _ in self.nodes:
            try:
                with self._client(port) as client:
                    return parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
            except redis.RedisError:
                continue
        raise RuntimeError("no node of the Redis Cluster answers")

    def primaries(self) -> list[ClusterMember]:
        """The primaries that are not failing, read live."""
        return [m for m in self._members() if m.primary_id is None]

    def replicas(self) -> list[ClusterMember]:
        """The replicas that are not failing, read live."""
        return [m for m in self._members() if m.primary_id is not None]

    def primary_for(self, key: str) -> ClusterMember:
        """The live primary that serves `key`'s slot."""
        slot = key_slot(key.encode())
        (owner,) = [m for m in self.primaries() if m.serves(slot)]
        return owner

    def kill(self, port: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to the node on `port` (SIGKILL to crash it, SIGSTOP to freeze it)."""
        (pid,) = [pid for _, node_port, pid in self.nodes if node_port == port]
        os.kill(pid, sig)

    def stop(self) -> None:
        """Stop every node by PID (waking frozen ones first) and remove their directories."""
        for _, _, pid in self.nodes:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._stack.close()
        self._servers.clear()

    def __enter__(self) -> EmbeddedCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
