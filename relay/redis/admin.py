"""The synchronous redis-py client, for the admin paths: startup checks and `relay audit`.

`connect` takes every `--redis-url` form (relay.redis.address); `primaries`
gives one plain client per primary, for the checks and the audit that must
look at every node and name it.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from relay.redis import address

RedisClient = redis.Redis | redis.RedisCluster


def _options(timeout_s: float) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "client_name": "relay-admin",
    }


def connect(url: str, *, timeout_s: float = 5.0) -> RedisClient:
    """A redis-py client for any `--redis-url`, replies decoded.

    ValueError (naming no password) for a malformed URL; redis.ConnectionError
    when no node of a cluster answers.
    """
    where = address.parse(url)
    options = _options(timeout_s)
    if where.kind == "single":
        return redis.Redis.from_url(url, **options)
    login: dict[str, Any] = {
        "username": where.username,
        "password": where.password,
        "ssl": where.tls,
    }
    if where.kind == "cluster":
        seeds = [ClusterNode(h, p) for h, p in where.nodes]  # type: ignore[no-untyped-call]
        try:
            return redis.RedisCluster(startup_nodes=seeds, **login, **options)
        except RedisClusterException as exc:  # not a RedisError: callers catch those
            raise redis.ConnectionError(f"{where.redacted()}: {exc}") from exc
    sentinel_login: dict[str, Any] = {
        "username": where.sentinel_username,
        "password": where.sentinel_password,
        "ssl": where.tls,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
    }
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(where.nodes), sentinel_kwargs=sentinel_login
    )
    assert where.master_name is not None  # parse() gives a Sentinel address a master name
    client: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        where.master_name, db=where.db, **login, **options
    )
    return client


def node_name(client: redis.Redis) -> str:
    """`host:port` (or the socket path) of the server a plain client talks to."""
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        host, port = pool.get_master_address()  # type: ignore[no-untyped-call]
        return f"{host}:{port}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def primaries(client: RedisClient) -> list[tuple[str, redis.Redis]]:
    """(`host:port`, a plain client) for each primary: every node of a cluster, sorted;
    else the one server."""
    if isinstance(client, redis.RedisCluster):
        nodes: list[ClusterNode] = client.get_primaries()  # type: ignore[no-untyped-call]
        named = [(node.name, client.get_redis_connection(node)) for node in nodes]
        return sorted(named, key=lambda pair: pair[0])
    return [(node_name(client), client)]
