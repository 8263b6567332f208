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
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import attrs
import orjson

from relay.redis.admin import RedisClient
from relay.redis.checks import (
    NOTHING_ALLOWED,
    Allowed,
    RedisSettings,
    evaluate_settings,
    read_settings,
)
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
    dedupe_window_s: int
    ref_records: int
    stale_refs: int  # ref records of a message that is gone, with a TTL over the dedupe window
    stale_refs_listed: tuple[tuple[str, int], ...]
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
        if self.stale_refs:
            found.append(
                f"{self.stale_refs} ref records of delivered or expired messages outlive "
                f"the dedupe window of {self.dedupe_window_s} s"
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
            "dedupe_window_s": self.dedupe_window_s,
            "ref_records": self.ref_records,
            "stale_ref_records": {
                "count": self.stale_refs,
                "listed": [{"key": k, "ttl_ms": t} for k, t in self.stale_refs_listed],
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
            f"ref records: {self.ref_records}",
            f"ref records outliving the dedupe window ({self.dedupe_window_s} s) "
            f"with their message gone: {self.stale_refs}",
            *(f"  {key} (TTL {ttl_ms} ms)" for key, ttl_ms in self.stale_refs_listed),
            f"save {self.settings.save!r}, appendonly {self.settings.appendonly!r}, "
            f"maxmemory-policy {self.settings.maxmemory_policy!r}, "
            f"slowlog-log-slower-than {self.settings.slowlog_log_slower_than!r}",
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
    client: RedisClient, refs: list[tuple[str, int]], base_of: dict[str, str], window_ms: int
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
    dedupe_window_s: int = 600,
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
    refs: list[tuple[str, int]] = []
    base_of: dict[str, str] = {}
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
        parts = _split(key, prefix)
        if parts is not None and parts[1] == "ref":
            refs.append((key, pttl))
            base_of[key] = parts[0]
        elif parts is not None and parts[1] == "msg":
            messages += 1
            sent_ms = message_sent_ms(parts[2])
            if sent_ms is not None and (oldest_sent_ms is None or sent_ms < oldest_sent_ms):
                oldest_sent_ms = sent_ms
    stale = list(_stale_refs(client, refs, base_of, dedupe_window_s * 1000))
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
        dedupe_window_s=dedupe_window_s,
        ref_records=len(refs),
        stale_refs=len(stale),
        stale_refs_listed=tuple(stale[:LISTED_MAX]),
        settings=settings,
        settings_violations=tuple(settings_violations),
        warnings=tuple(warnings),
    )
