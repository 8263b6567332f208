"""`relay audit`: check on a live Redis that every relay key obeys the retention bound.

Contract points 2 and 5 (protocol.md): every key under the prefix must carry a
TTL no longer than the retention window. The audit walks the keys with SCAN
(never KEYS, which blocks the server) and asks PTTL in pipelined batches; it
never reads a value, so no message body can reach its report. Messages are
counted, and their age is told, from their key names alone: a message id
starts with its send time (relay.store_redis.message_sent_ms).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import attrs
import orjson

from relay.redis_checks import (
    NOTHING_ALLOWED,
    Allowed,
    RedisSettings,
    evaluate_settings,
    read_settings,
)
from relay.redis_sync import RedisClient
from relay.store_redis import glob_escape, message_sent_ms

BATCH = 1000
LISTED_MAX = 100  # key names listed per kind of violation; all are counted


@attrs.frozen
class AuditReport:
    prefix: str
    retention_s: int
    keys: int
    messages: int
    oldest_message_age_ms: int | None
    without_ttl: int
    without_ttl_listed: tuple[str, ...]
    over_retention: int
    over_retention_listed: tuple[tuple[str, int], ...]  # (key, PTTL in ms)
    settings: RedisSettings
    settings_violations: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def violations(self) -> list[str]:
        found = list(self.settings_violations)
        if self.without_ttl:
            found.append(f"{self.without_ttl} keys under {self.prefix!r} have no TTL")
        if self.over_retention:
            found.append(
                f"{self.over_retention} keys under {self.prefix!r} have a TTL longer "
                f"than the retention window of {self.retention_s} s"
            )
        return found

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "prefix": self.prefix,
            "retention_s": self.retention_s,
            "keys": self.keys,
            "messages": self.messages,
            "oldest_message_age_ms": self.oldest_message_age_ms,
            "keys_without_ttl": {"count": self.without_ttl, "listed": self.without_ttl_listed},
            "keys_over_retention": {
                "count": self.over_retention,
                "listed": [{"key": k, "ttl_ms": t} for k, t in self.over_retention_listed],
            },
            "settings": attrs.asdict(self.settings),
            "violations": self.violations,
            "warnings": self.warnings,
        }

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2).decode()

    def to_text(self) -> str:
        age = self.oldest_message_age_ms
        lines = [
            f"prefix {self.prefix!r}, retention {self.retention_s} s",
            f"keys: {self.keys}",
            f"messages: {self.messages}",
            f"oldest message: {'none' if age is None else f'{age / 1000:.1f} s old'}",
            f"keys without TTL: {self.without_ttl}",
            *(f"  {key}" for key in self.without_ttl_listed),
            f"keys with a TTL over the retention window: {self.over_retention}",
            *(f"  {key} (TTL {ttl_ms} ms)" for key, ttl_ms in self.over_retention_listed),
            f"save {self.settings.save!r}, appendonly {self.settings.appendonly!r}, "
            f"maxmemory-policy {self.settings.maxmemory_policy!r}, "
            f"slowlog-log-slower-than {self.settings.slowlog_log_slower_than!r}",
            *(f"warning: {w}" for w in self.warnings),
            *(f"VIOLATION: {v}" for v in self.violations),
            "OK" if self.ok else "FAILED",
        ]
        return "\n".join(lines)


def _message_id(key: str, prefix: str) -> str | None:
    """The message id in `<prefix>{<mailbox>}:msg:<id>`, or None for other keys.

    Mailbox ids cannot contain `}`, so the first `}` closes the hash tag.
    """
    _, brace, rest = key[len(prefix) :].partition("}")
    if not brace or not rest.startswith(":msg:"):
        return None
    return rest[len(":msg:") :]


def _pttls(client: RedisClient, prefix: str) -> Iterator[tuple[str, int]]:
    """Every key under the prefix with its PTTL, asked in pipelined batches."""
    keys = client.scan_iter(match=glob_escape(prefix) + "*", count=BATCH)
    while batch := list(islice(keys, BATCH)):
        with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.pttl(key)
            yield from zip(batch, pipe.execute(), strict=True)


def audit(
    client: RedisClient,
    prefix: str,
    retention_s: int,
    now_ms: int,
    allowed: Allowed = NOTHING_ALLOWED,
) -> AuditReport:
    """Audit the keys under `prefix` and the server's persistence and eviction settings.

    SCAN may return a key twice while Redis rehashes, so counts are upper
    bounds; listed names are unique. A key that expires during the audit is
    not counted.
    """
    keys = messages = without_ttl = over_retention = 0
    without_ttl_listed: list[str] = []
    over_retention_listed: dict[str, int] = {}
    oldest_sent_ms: int | None = None
    for key, pttl in _pttls(client, prefix):
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
        message_id = _message_id(key, prefix)
        if message_id is not None:
            messages += 1
            sent_ms = message_sent_ms(message_id)
            if sent_ms is not None and (oldest_sent_ms is None or sent_ms < oldest_sent_ms):
                oldest_sent_ms = sent_ms
    settings = read_settings(client)
    settings_violations, warnings = evaluate_settings(settings, allowed)
    return AuditReport(
        prefix=prefix,
        retention_s=retention_s,
        keys=keys,
        messages=messages,
        oldest_message_age_ms=None if oldest_sent_ms is None else now_ms - oldest_sent_ms,
        without_ttl=without_ttl,
        without_ttl_listed=tuple(without_ttl_listed),
        over_retention=over_retention,
        over_retention_listed=tuple(over_retention_listed.items()),
        settings=settings,
        settings_violations=tuple(settings_violations),
        warnings=tuple(warnings),
    )
