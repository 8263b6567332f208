"""Helpers of the Redis mailbox store tests (test_store.py, test_store_quota.py): clocks,
looking at keys, and a store with another quota.
"""

from __future__ import annotations

import time

import trio
from relay_fixtures import poll_until

from relay.redis.admin import RedisClient
from relay.store_redis import Quota, RedisMailboxStore

DEADLINE_S = 10


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def keys_under(client: RedisClient, pattern: str) -> list[str]:
    """The keys matching `pattern`, but the storage's epoch key (`<prefix>epoch`, one
    per deployment, a random id): it is about no mailbox and no message."""
    return sorted(k for k in client.scan_iter(match=pattern, count=1000) if "{" in k)


def zcard(client: RedisClient, key: str) -> int:
    value: int = client.zcard(key)
    return value


def with_quota(store: RedisMailboxStore, quota: Quota) -> RedisMailboxStore:
    """Another store on the same pump and prefix, with a different quota."""
    return RedisMailboxStore(
        store.pump,
        prefix=store.prefix,
        retention_s=store.retention_s,
        dedupe_window_s=store.dedupe_window_s,
        quota=quota,
    )


def msg_keys(client: RedisClient, store: RedisMailboxStore, mailbox: str) -> list[str]:
    return keys_under(client, store.keys(mailbox).msg_prefix + "*")


def ref_keys(client: RedisClient, store: RedisMailboxStore, mailbox: str) -> list[str]:
    return keys_under(client, store.keys(mailbox).base + "ref:*")


async def wait_until_gone(client: RedisClient, *keys: str, timeout_s: float = 5.0) -> None:
    """Poll until Redis has expired these keys (a real TTL runs out; no mock clock)."""
    with trio.fail_after(timeout_s):
        await poll_until(lambda: client.exists(*keys) == 0)
