"""Redis Cluster routing: which primary owns a key's slot, and what a redirection says.

The slot table comes from `CLUSTER SHARDS` (Redis 7+, Valkey), or `CLUSTER
SLOTS` where SHARDS is unknown, parsed by redis-py's own parsers; a key's
slot is redis-py's `key_slot` (CRC16 of the hash tag). Replies that prove a
command did not run (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, and READONLY from a
demoted primary) are classified here so the pump can resend them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs
import redis
from redis.cluster import parse_cluster_shards, parse_cluster_slots
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from relay.redis.address import Node
from relay.redis.connection import RedisConnection

SLOTS = REDIS_CLUSTER_HASH_SLOTS
# Commands whose first argument is not a key (the pump sends them to any primary,
# or to the node it is pinned to).
KEYLESS = frozenset({"PING", "SCAN", "INFO", "CLUSTER", "CONFIG", "SCRIPT", "DBSIZE", "ROLE"})


def command_slot(args: Sequence[Any]) -> int | None:
    """The slot of a command's first key, or None when it has no key."""
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return key_slot(_bytes(args[3])) if int(args[2]) > 0 else None
    if name in KEYLESS or len(args) < 2:
        return None
    return key_slot(_bytes(args[1]))


def _bytes(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


class SlotTable:
    """The primary that owns each slot, as the cluster last said (None: unowned)."""

    def __init__(self, owners: list[Node | None]) -> None:
        assert len(owners) == SLOTS
        self._owners = owners
        self._primaries: list[Node] | None = None  # derived from the owners, on demand

    @classmethod
    def empty(cls) -> SlotTable:
        return cls([None] * SLOTS)

    @classmethod
    def from_shards(cls, reply: Any) -> SlotTable:
        owners: list[Node | None] = [None] * SLOTS
        for shard in parse_cluster_shards(reply):  # type: ignore[no-untyped-call]
            primary = next(
                (
                    n
                    for n in shard["nodes"]
                    if n.get("role") == "master" and n.get("health", "online") == "online"
                ),
                None,
            )
            if primary is None:
                continue
            host = primary.get("ip") or primary.get("endpoint")
            port = primary.get("port") or primary.get("tls-port")
            for start, end in shard["slots"]:
                owners[int(start) : int(end) + 1] = [(str(host), int(port))] * (
                    int(end) - int(start) + 1
                )
        return cls(owners)

    @classmethod
    def from_slots(cls, reply: Any, current_host: str) -> SlotTable:
        owners: list[Node | None] = [None] * SLOTS
        for (start, end), nodes in parse_cluster_slots(reply, current_host=current_host).items():
            host, port = nodes["primary"]
            owners[int(start) : int(end) + 1] = [(str(host), int(port))] * (
                int(end) - int(start) + 1
            )
        return cls(owners)

    def owner(self, slot: int) -> Node | None:
        return self._owners[slot]

    def primaries(self) -> list[Node]:
        """The primaries that own slots, in slot order."""
        if self._primaries is None:
            self._primaries = list(dict.fromkeys(n for n in self._owners if n is not None))
        return self._primaries

    def unowned(self) -> int:
        """How many slots no primary owns."""
        return self._owners.count(None)

    def patch(self, slot: int, node: Node) -> None:
        self._owners[slot] = node
        self._primaries = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotTable) and self._owners == other._owners

    __hash__ = None  # type: ignore[assignment]


async def read_slot_table(connection: RedisConnection, host: str) -> SlotTable:
    """The slot table as one node sees it: CLUSTER SHARDS, or CLUSTER SLOTS before Redis 7."""
    (reply,) = await connection.execute([("CLUSTER", "SHARDS")])
    if isinstance(reply, redis.ResponseError) and "unknown" in str(reply).lower():
        (reply,) = await connection.execute([("CLUSTER", "SLOTS")])
        if isinstance(reply, Exception):
            raise reply
        return SlotTable.from_slots(reply, host)
    if isinstance(reply, Exception):
        raise reply
    return SlotTable.from_shards(reply)


Resend = Literal["moved", "ask", "wait", "reresolve"]


@attrs.frozen
class Redirection:
    """A reply proving the command did not run, and where (or when) to send it again."""

    how: Resend
    slot: int | None = None
    node: Node | None = None


def redirection(reply: Any) -> Redirection | None:
    """What a reply says about resending its command; None for a final reply."""
    if not isinstance(reply, redis.ResponseError):
        return None
    text = str(reply)
    code = text.partition(" ")[0]
    if code in ("MOVED", "ASK"):
        try:
            _, slot, where = text.split(" ")
            host, _, port = where.rpartition(":")
            return Redirection("moved" if code == "MOVED" else "ask", int(slot), (host, int(port)))
        except ValueError:
            return None
    if code in ("TRYAGAIN", "CLUSTERDOWN"):
        return Redirection("wait")
    if code == "READONLY":
        return Redirection("reresolve")
    return None
