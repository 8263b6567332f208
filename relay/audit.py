"""`relay audit`: check on a live Redis that every relay key obeys the retention bound.

Contract points 2 and 5 (protocol.md): every key under the prefix must carry a
TTL no longer than the retention window. The audit walks the keys with SCAN
(never KEYS, which blocks the server) and asks PTTL in pipelined batches; it
never reads a message, so no body can reach its report. Messages are counted,
and their age is told, from their key names alone: a message id starts with
its send time (relay.store_redis.message_sent_ms).

Contract point 1 for metadata: a ref record whose message is gone may live
only for the dedupe window. The audit reads ref records (they hold a message
id, an expiry and a hash; no body) and flags those that outlive it.

On a Redis Cluster every primary is audited on its own (a ref record and its
message share a hash tag, so a node); each violation names its node, and the
report gives each node's findings and their totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import Any, TypeVar

import attrs
import orjson
import redis

from relay.redis.admin import RedisClient, primaries
from relay.redis.checks import (
    NOTHING_ALLOWED,
    Allowed,
    NodeSettings,
    RedisSettings,
    evaluate_nodes,
    least_safe,
    read_server_settings,
)
from relay.store_redis import glob_escape, message_sent_ms

BATCH = 1000
LISTED_MAX = 100  # key names listed per kind of violation; all are counted
T = TypeVar("T")


@attrs.frozen(kw_only=True)
class Findings:
    """What the audit found among the keys of one node, or of all nodes together."""

    keys: int
    messages: int
    oldest_message_age_ms: int | None
    without_ttl: int
    without_ttl_listed: tuple[str, ...]
    over_retention: int
    over_retention_listed: tuple[tuple[str, int], ...]  # (key, PTTL in ms)
    ref_records: int
    stale_refs: int  # ref records of a message that is gone, with a TTL over the dedupe window
    stale_refs_listed: tuple[tuple[str, int], ...]
    settings: RedisSettings
    violations: tuple[str, ...]  # each starts with the name of its node
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "keys": self.keys,
            "messages": self.messages,
            "oldest_message_age_ms": self.oldest_message_age_ms,
            "keys_without_ttl": {"count": self.without_ttl, "listed": self.without_ttl_listed},
            "keys_over_retention": {
                "count": self.over_retention,
                "listed": [{"key": k, "ttl_ms": t} for k, t in self.over_retention_listed],
            },
            "ref_records": self.ref_records,
            "stale_ref_records": {
                "count": self.stale_refs,
                "listed": [{"key": k, "ttl_ms": t} for k, t in self.stale_refs_listed],
            },
            "settings": attrs.asdict(self.settings),
            "violations": self.violations,
            "warnings": self.warnings,
        }


@attrs.frozen(kw_only=True)
class NodeAudit(Findings):
    node: str  # host:port (or the socket path)

    def key_violations(self, prefix: str, windows_s: tuple[int, int]) -> tuple[str, ...]:
        """What this node's keys break, each naming the node."""
        retention_s, dedupe_window_s = windows_s
        found = []
        if self.without_ttl:
            found.append(f"{self.without_ttl} keys under {prefix!r} have no TTL")
        if self.over_retention:
            found.append(
                f"{self.over_retention} keys under {prefix!r} have a TTL longer "
                f"than the retention window of {retention_s} s"
            )
        if self.stale_refs:
            found.append(
                f"{self.stale_refs} ref records of delivered or expired messages outlive "
                f"the dedupe window of {dedupe_window_s} s"
            )
        return tuple(f"{self.node}: {v}" for v in found)


@attrs.frozen(kw_only=True)
class AuditReport(Findings):
    """The totals over `nodes` (the settings: each one's least safe value)."""

    prefix: str
    retention_s: int
    dedupe_window_s: int
    nodes: tuple[NodeAudit, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "retention_s": self.retention_s,
            "dedupe_window_s": self.dedupe_window_s,
            **super().to_dict(),
            "nodes": [{"node": n.node, **n.to_dict()} for n in self.nodes],
        }

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2).decode()

    def to_text(self) -> str:
        age = self.oldest_message_age_ms
        nodes = self.nodes
        lines = [
            f"prefix {self.prefix!r}, retention {self.retention_s} s, {len(nodes)} primaries",
            *(
                f"{n.node}: {n.keys} keys, {n.messages} messages, {n.without_ttl} without TTL, "
                f"{n.over_retention} over retention, {n.stale_refs} stale ref records"
                for n in nodes
            ),
            f"keys: {self.keys}",
            f"messages: {self.messages}",
            f"oldest message: {'none' if age is None else f'{age / 1000:.1f} s old'}",
            f"keys without TTL: {self.without_ttl}",
            *(f"  {key} on {n.node}" for n in nodes for key in n.without_ttl_listed),
            f"keys with a TTL over the retention window: {self.over_retention}",
            *(
                f"  {key} on {n.node} (TTL {ttl_ms} ms)"
                for n in nodes
                for key, ttl_ms in n.over_retention_listed
            ),
            f"ref records: {self.ref_records}",
            f"ref records outliving the dedupe window ({self.dedupe_window_s} s) "
            f"with their message gone: {self.stale_refs}",
            *(
                f"  {key} on {n.node} (TTL {ttl_ms} ms)"
                for n in nodes
                for key, ttl_ms in n.stale_refs_listed
            ),
            *(
                f"{n.node}: save {n.settings.save!r}, appendonly {n.settings.appendonly!r}, "
                f"maxmemory-policy {n.settings.maxmemory_policy!r}, "
                f"slowlog-log-slower-than {n.settings.slowlog_log_slower_than!r}"
                for n in nodes
            ),
            *(f"warning: {w}" for w in self.warnings),
            *(f"VIOLATION: {v}" for v in self.violations),
            "OK" if self.ok else "FAILED",
        ]
        return "\n".join(lines)


def _split(key: str, prefix: str) -> tuple[str, str, str] | None:
    """`<prefix>{<mailbox>}:<kind>:<rest>` as (`<prefix>{<mailbox>}:`, kind, rest).

    Mailbox ids cannot contain `}`, so the first `}` closes the hash tag.
    """
    head, brace, tail = key[len(prefix) :].partition("}")
    kind, colon, rest = tail[1:].partition(":")
    if not brace or not tail.startswith(":") or not colon:
        return None
    return f"{prefix}{head}}}:", kind, rest


def _stale_refs(
    client: redis.Redis, refs: list[tuple[str, int]], base_of: dict[str, str], window_ms: int
) -> Iterator[tuple[str, int]]:
    """The ref records (key, PTTL) over the dedupe window whose message is gone."""
    long_lived = [(key, pttl) for key, pttl in refs if pttl > window_ms]
    for start in range(0, len(long_lived), BATCH):
        batch = long_lived[start : start + BATCH]
        with client.pipeline(transaction=False) as pipe:
            for key, _ in batch:
                pipe.get(key)
            records = pipe.execute()
        with client.pipeline(transaction=False) as pipe:
            for (key, _), record in zip(batch, records, strict=True):
                message_id = str(record or "").partition(" ")[0]
                pipe.exists(f"{base_of[key]}msg:{message_id}")
            present = pipe.execute()
        for (key, pttl), exists in zip(batch, present, strict=True):
            if not exists:
                yield key, pttl


def _pttls(client: redis.Redis, prefix: str) -> Iterator[tuple[str, int]]:
    """Every key under the prefix with its PTTL, asked in pipelined batches."""
    keys = client.scan_iter(match=glob_escape(prefix) + "*", count=BATCH)
    while batch := list(islice(keys, BATCH)):
        with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.pttl(key)
            yield from zip(batch, pipe.execute(), strict=True)


def _audit_node(
    server: redis.Redis,
    node: NodeSettings,
    prefix: str,
    windows_s: tuple[int, int],  # (retention, dedupe window)
    now_ms: int,
    allowed: Allowed,
) -> NodeAudit:
    """What one node holds under the prefix, and what its settings break."""
    retention_s, dedupe_window_s = windows_s
    keys = messages = without_ttl = over_retention = 0
    without_ttl_listed: list[str] = []
    over_retention_listed: dict[str, int] = {}
    oldest_sent_ms: int | None = None
    refs: list[tuple[str, int]] = []
    base_of: dict[str, str] = {}
    for key, pttl in _pttls(server, prefix):
        if pttl == -2:  # expired since SCAN returned it
            continue
        keys += 1
        if pttl == -1:
            without_ttl += 1
            if len(without_ttl_listed) < LISTED_MAX and key not in without_ttl_listed:
                without_ttl_listed.append(key)
        elif pttl > retention_s * 1000:
            over_retention += 1
            if len(over_retention_listed) < LISTED_MAX:
                over_retention_listed[key] = pttl
        parts = _split(key, prefix)
        if parts is not None and parts[1] == "ref":
            refs.append((key, pttl))
            base_of[key] = parts[0]
        elif parts is not None and parts[1] == "msg":
            messages += 1
            sent_ms = message_sent_ms(parts[2])
            if sent_ms is not None and (oldest_sent_ms is None or sent_ms < oldest_sent_ms):
                oldest_sent_ms = sent_ms
    stale = list(_stale_refs(server, refs, base_of, dedupe_window_s * 1000))
    settings_violations, warnings = evaluate_nodes([node], allowed)
    found = NodeAudit(
        node=node.node,
        keys=keys,
        messages=messages,
        oldest_message_age_ms=None if oldest_sent_ms is None else now_ms - oldest_sent_ms,
        without_ttl=without_ttl,
        without_ttl_listed=tuple(without_ttl_listed),
        over_retention=over_retention,
        over_retention_listed=tuple(over_retention_listed.items()),
        ref_records=len(refs),
        stale_refs=len(stale),
        stale_refs_listed=tuple(stale[:LISTED_MAX]),
        settings=node.settings,
        violations=tuple(settings_violations),
        warnings=tuple(warnings),
    )
    return attrs.evolve(
        found, violations=found.violations + found.key_violations(prefix, windows_s)
    )


def _listed(lists: Iterable[tuple[T, ...]]) -> tuple[T, ...]:
    """The first LISTED_MAX items of the lists, in order."""
    return tuple(islice(chain.from_iterable(lists), LISTED_MAX))


def audit(
    client: RedisClient,
    prefix: str,
    retention_s: int,
    now_ms: int,
    allowed: Allowed = NOTHING_ALLOWED,
    dedupe_window_s: int = 600,
) -> AuditReport:
    """Audit the keys under `prefix` and the persistence and eviction settings of every
    primary.

    SCAN may return a key twice while Redis rehashes, so counts are upper
    bounds; listed names are unique. A key that expires during the audit is
    not counted.
    """
    windows_s = (retention_s, dedupe_window_s)
    named = [
        (NodeSettings(node, read_server_settings(server)), server)
        for node, server in primaries(client)
    ]
    nodes = [
        _audit_node(server, node, prefix, windows_s, now_ms, allowed) for node, server in named
    ]
    ages = [n.oldest_message_age_ms for n in nodes if n.oldest_message_age_ms is not None]
    return AuditReport(
        prefix=prefix,
        retention_s=retention_s,
        dedupe_window_s=dedupe_window_s,
        nodes=tuple(nodes),
        keys=sum(n.keys for n in nodes),
        messages=sum(n.messages for n in nodes),
        oldest_message_age_ms=max(ages, default=None),
        without_ttl=sum(n.without_ttl for n in nodes),
        without_ttl_listed=_listed(n.without_ttl_listed for n in nodes),
        over_retention=sum(n.over_retention for n in nodes),
        over_retention_listed=_listed(n.over_retention_listed for n in nodes),
        ref_records=sum(n.ref_records for n in nodes),
        stale_refs=sum(n.stale_refs for n in nodes),
        stale_refs_listed=_listed(n.stale_refs_listed for n in nodes),
        settings=least_safe([node for node, _ in named]),
        violations=tuple(chain.from_iterable(n.violations for n in nodes)),
        warnings=tuple(chain.from_iterable(n.warnings for n in nodes)),
    )
