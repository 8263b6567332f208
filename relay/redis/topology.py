"""Which node a command goes to: one server, the primary Sentinel names, or a cluster's.

A topology hands the pump the `NodeLink` for each command, learns from the
replies that prove a command did not run (MOVED patches the slot table, READONLY
means the primary changed), and keeps itself current in `run`: a cluster
refreshes its slot table after a redirection or a lost node and every
`REFRESH_S`; Sentinel follows `+switch-master`. The hub asks it where each
channel's subscription lives and with which command to subscribe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio

from relay.errors import StorageUnavailable
from relay.redis import sentinel
from relay.redis.address import Node, RedisAddress
from relay.redis.cluster import Redirection, SlotTable, command_slot, read_slot_table
from relay.redis.connection import RedisConnection
from relay.redis.link import NodeLink

log = logging.getLogger(__name__)

REFRESH_S = 5.0  # a cluster's slot table is read again at least this often
REFRESH_GAP_S = 0.2  # and at most this often, however many redirections ask for it
FAILOVER_PAUSE_S = 10.0  # Sentinel: nothing is written for at most this long after
# +try-failover, until +switch-master or an abort: what the old primary took meanwhile
# would be lost when it is demoted


class Topology:
    """One Redis server (`redis://`, `rediss://`, `unix://`)."""

    publish = "PUBLISH"  # the command the scripts publish notices with
    resends = False  # whether MOVED, ASK, TRYAGAIN, READONLY… are resent (else final)
    subscribe = ("SUBSCRIBE", "UNSUBSCRIBE", "message")  # the hub's commands and reply kind

    def __init__(self, address: RedisAddress, *, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.changed = trio.Event()  # set (and replaced) when the set of nodes changes
        self._link = NodeLink("redis", self._open_default, timeout_s=timeout_s)

    async def _open_default(self) -> RedisConnection:
        return await RedisConnection.open(self.address.url)

    def link_for(self, args: Sequence[Any], node: str | None = None) -> NodeLink:
        """The link a command goes to (`node`: pinned to that link's label)."""
        return self._link

    def links(self) -> list[NodeLink]:
        """One link per primary: for what runs on every node (SCAN, PING)."""
        return [self._link]

    def redirected(self, redirection: Redirection) -> NodeLink | None:
        """Learn from a reply that proved its command did not run; the link to resend
        it to (None: where it would go anyway)."""
        return None

    def lost(self, link: NodeLink) -> None:
        """A link lost its connection (the node may have failed over)."""

    def lost_subscriber(self) -> None:
        """The hub lost a subscription or a connection: the topology may have changed."""

    def problem(self) -> str | None:
        """Why some commands cannot be served now, for /readyz."""
        return None

    def subscriber_nodes(self) -> list[str]:
        """The nodes the hub keeps a subscriber connection on."""
        return ["redis"]

    def slot_of(self, channel: str) -> int | None:
        """The cluster slot of a channel (None: one Redis; any channels subscribe together)."""
        return None

    def subscriber_node(self, channel: str) -> str | None:
        """The node on which the hub subscribes to `channel` (None: no node owns it now)."""
        return "redis"

    async def open_subscriber(self, node: str) -> RedisConnection:
        return await RedisConnection.open(self.address.url, client_name="relay-hub")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def _announce(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class SentinelTopology(Topology):
    """The primary a group of Sentinels names; followed across failovers."""

    resends = True  # READONLY: the primary changed

    def __init__(self, address: RedisAddress, *, timeout_s: float) -> None:
        super().__init__(address, timeout_s=timeout_s)
        self._link = NodeLink("primary", self._open_primary, timeout_s=timeout_s)
        self.switches = 0  # primary switches seen: the hub's node is "primary#N"
        self._paused_until = 0.0  # trio time: no connection opens before it (a failover)

    async def _open_primary(self, client_name: str = "relay") -> RedisConnection:
        if trio.current_time() < self._paused_until:
            raise StorageUnavailable("Sentinel is failing the primary over")
        return await sentinel.open_primary(
            self.address, client_name=client_name, timeout_s=self.timeout_s
        )

    def redirected(self, redirection: Redirection) -> NodeLink | None:
        if redirection.how == "reresolve":  # READONLY: this is no longer the primary
            self._switch()
        return None

    def subscriber_nodes(self) -> list[str]:
        return [f"primary#{self.switches}"]

    def subscriber_node(self, channel: str) -> str | None:
        return f"primary#{self.switches}"

    async def open_subscriber(self, node: str) -> RedisConnection:
        return await self._open_primary("relay-hub")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(sentinel.watch_failovers, timeout_s=self.timeout_s),
                self.address,
                self._failing_over,
            )
            await nursery.start(
                partial(sentinel.watch_switches, timeout_s=self.timeout_s),
                self.address,
                self._switched,
            )
            task_status.started()

    def _failing_over(self, started: bool) -> None:
        """Stop writing when a failover starts (the link reconnects, and cannot until
        the switch, or the abort, or FAILOVER_PAUSE_S)."""
        if started:
            log.warning("Sentinel started a failover; sends wait for the new primary")
            self._paused_until = trio.current_time() + FAILOVER_PAUSE_S
            self._link.stale = True
        else:
            log.warning("Sentinel aborted the failover; the primary stays")
            self._paused_until = 0.0

    def _switched(self, node: Node) -> None:
        log.warning("Sentinel switched the primary to %s:%d", *node)
        self._switch()

    def _switch(self) -> None:
        """The primary changed: the pump reconnects, the hub subscribes anew there."""
        self._link.stale = True
        self._paused_until = 0.0
        self.switches += 1
        self._announce()


class ClusterTopology(Topology):
    """A Redis Cluster: each command goes to the primary that owns its first key's slot."""

    publish = "SPUBLISH"
    resends = True
    subscribe = ("SSUBSCRIBE", "SUNSUBSCRIBE", "smessage")

    def __init__(self, address: RedisAddress, *, timeout_s: float) -> None:
        super().__init__(address, timeout_s=timeout_s)
        self.table = SlotTable.empty()
        self._loaded = False
        self._links: dict[Node, NodeLink] = {}
        self._refresh = trio.Event()

    def _link_of(self, node: Node) -> NodeLink:
        link = self._links.get(node)
        if link is None:
            url = self.address.node_url(node)
            link = NodeLink(
                _label(node),
                lambda: RedisConnection.open(url),
                timeout_s=self.timeout_s,
            )
            self._links[node] = link
        return link

    def link_for(self, args: Sequence[Any], node: str | None = None) -> NodeLink:
        if node is not None:
            for known, link in self._links.items():
                if _label(known) == node:
                    return link
            raise StorageUnavailable(f"no Redis Cluster primary {node}")
        slot = command_slot(args)
        owner = (
            self.table.owner(slot) if slot is not None else next(iter(self.table.primaries()), None)
        )
        if owner is None:
            self._refresh.set()
            why = "the slot table is not loaded yet" if not self._loaded else f"slot {slot}"
            raise StorageUnavailable(f"no Redis Cluster primary owns {why}")
        return self._link_of(owner)

    def links(self) -> list[NodeLink]:
        return [self._link_of(node) for node in self.table.primaries()]

    def redirected(self, redirection: Redirection) -> NodeLink | None:
        if redirection.how in ("moved", "ask") and redirection.node is not None:
            if redirection.how == "moved" and redirection.slot is not None:
                self.table.patch(redirection.slot, redirection.node)
            self._refresh.set()
            return self._link_of(redirection.node)
        self._refresh.set()  # TRYAGAIN, CLUSTERDOWN: the cluster is changing
        return None

    def lost(self, link: NodeLink) -> None:
        self._refresh.set()

    def lost_subscriber(self) -> None:
        self._refresh.set()

    def problem(self) -> str | None:
        if not self._loaded:
            return "the Redis Cluster slot table could not be read"
        if unowned := self.table.unowned():
            return f"no Redis Cluster primary owns {unowned} of the 16384 slots"
        return None

    def subscriber_nodes(self) -> list[str]:
        return [_label(node) for node in self.table.primaries()]

    def slot_of(self, channel: str) -> int | None:
        return command_slot(("SPUBLISH", channel))

    def subscriber_node(self, channel: str) -> str | None:
        owner = self.table.owner(command_slot(("SPUBLISH", channel)) or 0)
        return None if owner is None else _label(owner)

    async def open_subscriber(self, node: str) -> RedisConnection:
        host, _, port = node.rpartition(":")
        url = self.address.node_url((host, int(port)))
        return await RedisConnection.open(url, client_name="relay-hub")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the slot table (once before `started`, then on demand and every REFRESH_S)."""
        await self._read_table()
        task_status.started()
        while True:
            with trio.move_on_after(REFRESH_S):
                await self._refresh.wait()
            self._refresh = trio.Event()
            await self._read_table()
            await trio.sleep(REFRESH_GAP_S)

    async def _read_table(self) -> None:
        """Ask the known primaries, then the seeds, until one answers."""
        candidates = list(dict.fromkeys([*self.table.primaries(), *self.address.nodes]))
        for node in candidates:
            try:
                with trio.fail_after(self.timeout_s):
                    connection = await RedisConnection.open(
                        self.address.node_url(node), client_name="relay-topology"
                    )
                    try:
                        table = await read_slot_table(connection, node[0])
                    finally:
                        await connection.aclose()
            except Exception as exc:  # that node cannot say; ask the next
                log.debug("cannot read the slot table from %s: %s", _label(node), exc)
                continue
            if table.unowned() and node != candidates[-1]:
                continue  # a node that lost contact may see holes the others do not
            if table != self.table:
                if self._loaded:
                    log.info("the Redis Cluster slot table changed")
                self.table = table
                self._announce()  # the hub moves the subscriptions of moved slots
            self._loaded = True
            return
        log.warning("no Redis Cluster node answered CLUSTER SHARDS; retrying")


def _label(node: Node) -> str:
    return f"{node[0]}:{node[1]}"


def topology_for(address: RedisAddress, *, timeout_s: float) -> Topology:
    if address.kind == "cluster":
        return ClusterTopology(address, timeout_s=timeout_s)
    if address.kind == "sentinel":
        return SentinelTopology(address, timeout_s=timeout_s)
    return Topology(address, timeout_s=timeout_s)
