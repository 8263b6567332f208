"""The synchronous redis-py client, for the admin paths: startup checks and `relay audit`."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

RedisClient = redis.Redis | redis.RedisCluster


def connect(url: str, *, timeout_s: float = 5.0, cluster: bool = False) -> RedisClient:
    """A redis-py client for `redis://`, `rediss://` or `unix://` URLs, replies decoded."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "client_name": "relay-admin",
    }
    if cluster:
        return redis.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)
