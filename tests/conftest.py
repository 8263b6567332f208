"""Real servers for the tests: an embedded Valkey, and Debian's redis-server when installed.

Every test that takes `redis_url` runs once per available server. Servers
listen on unix sockets in private temporary directories and are stopped by
PID at the end of the session; each test gets its own key prefix.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator

import pytest
import trio

from relay.embedded import EmbeddedServer, valkey_binary
from relay.redis.admin import RedisClient, connect
from relay.redis.pump import RedisPump
from relay.store_redis import RedisMailboxStore

SERVERS: dict[str, Callable[[], str | None]] = {
    "valkey": valkey_binary,
    "redis": lambda: shutil.which("redis-server"),
}
_prefixes = itertools.count()


@pytest.fixture(scope="session", params=sorted(SERVERS))
def redis_server(request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    binary = SERVERS[request.param]()
    if binary is None:
        pytest.skip(f"{request.param}-server is not installed")
    with EmbeddedServer(binary=binary) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses."""
    return f"test{next(_prefixes)}:"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[RedisClient]:
    """A plain synchronous client, for looking at what the relay wrote."""
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
async def pump(redis_url: str, nursery: trio.Nursery) -> RedisPump:
    pump = RedisPump(redis_url)
    await nursery.start(pump.run)
    return pump


@pytest.fixture
def store(pump: RedisPump, prefix: str) -> RedisMailboxStore:
    return RedisMailboxStore(pump, prefix=prefix, retention_s=3600, dedupe_window_s=2)
