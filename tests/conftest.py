"""Real servers for the tests: an embedded Valkey, and Debian's redis-server when installed;
for the end-to-end suite also a Redis Cluster and a Sentinel-managed primary.

Every test that takes `redis_url` runs once per available server, and the
end-to-end tests (`test_e2e_*`) that need no particular server process
(`redis_server`) once more per topology: on a 3-primary cluster and behind
Sentinel. Servers listen on loopback (single servers on unix sockets) in
private temporary directories and are stopped by PID at the end of the
session; each test gets its own key prefix.
"""

from __future__ import annotations

import itertools
import logging
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
TOPOLOGIES = {"cluster": "redis_cluster", "sentinel": "redis_sentinel"}  # -> their fixture
_prefixes = itertools.count()

pytest_plugins = ["cluster_fixtures", "sentinel_fixtures"]


@pytest.fixture(autouse=True)
def _logging_put_back() -> Iterator[None]:
    """Tests run `relay.cli.main` in-process, and the command sets up logging for a
    process: its handler writes to this test's captured stderr, closed after the test."""
    loggers = [logging.getLogger(name) for name in ("", "trio-websocket", "trio_websocket")]
    saved = [(logger.handlers[:], logger.level) for logger in loggers]
    yield
    for logger, (handlers, level) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run on each server, and the end-to-end suite on each topology too."""
    if "topology" not in metafunc.fixturenames:
        return
    names = sorted(SERVERS)
    end_to_end = metafunc.module.__name__.startswith("test_e2e_")
    if end_to_end and "redis_server" not in metafunc.fixturenames:
        names += list(TOPOLOGIES)
    metafunc.parametrize("topology", names, indirect=True, scope="session")


@pytest.fixture(scope="session")
def topology(request: pytest.FixtureRequest) -> str:
    """The server (valkey, redis) or topology (cluster, sentinel) of this run."""
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def redis_server(topology: str) -> Iterator[EmbeddedServer]:
    binary = SERVERS[topology]()
    if binary is None:
        pytest.skip(f"{topology}-server is not installed")
    with EmbeddedServer(binary=binary) as server:
        yield server


@pytest.fixture
def redis_url(topology: str, request: pytest.FixtureRequest) -> str:
    if topology in TOPOLOGIES:
        url: str = request.getfixturevalue(TOPOLOGIES[topology]).url
        return url
    server: EmbeddedServer = request.getfixturevalue("redis_server")
    return server.url


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
