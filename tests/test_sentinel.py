"""relay.redis.sentinel against real Sentinels: resolving, connecting, following failovers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from functools import partial

import pytest
import redis
import trio
from sentinel_fixtures import SentinelGroup

from relay.embedded import free_loopback_port
from relay.errors import StorageUnavailable
from relay.redis.address import Node, RedisAddress, parse
from relay.redis.connection import ConnectionLost, RedisConnection
from relay.redis.sentinel import open_primary, resolve_primary, watch_switches

pytest_plugins = ["sentinel_fixtures"]

TIMEOUT_S = 2.0
DEADLINE_S = 10.0  # one step of a test
SWITCH_S = 10.0  # SENTINEL FAILOVER to on_switch, at most


def with_first(group: SentinelGroup, first: str) -> RedisAddress:
    """The group's address with one more "Sentinel" listed first."""
    return parse(group.url.replace("://", f"://{first},", 1))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Sentinel)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


async def role(connection: RedisConnection) -> str:
    [reply] = await connection.execute([("ROLE",)])
    return str(reply[0])


async def test_resolve_skips_a_dead_first_sentinel(redis_sentinel: SentinelGroup) -> None:
    address = with_first(redis_sentinel, f"127.0.0.1:{free_loopback_port()}")
    with trio.fail_after(DEADLINE_S):
        assert await resolve_primary(address, timeout_s=TIMEOUT_S) == redis_sentinel.primary()


async def test_resolve_skips_a_server_that_is_no_sentinel(redis_sentinel: SentinelGroup) -> None:
    data_port = redis_sentinel.primary()[1]  # answers SENTINEL with an error
    address = with_first(redis_sentinel, f"127.0.0.1:{data_port}")
    with trio.fail_after(DEADLINE_S):
        assert await resolve_primary(address, timeout_s=TIMEOUT_S) == redis_sentinel.primary()


async def test_a_hung_sentinel_does_not_starve_the_next(
    redis_sentinel: SentinelGroup, silent_port: int
) -> None:
    address = with_first(redis_sentinel, f"127.0.0.1:{silent_port}")
    start = trio.current_time()
    with trio.fail_after(DEADLINE_S):
        assert await resolve_primary(address, timeout_s=TIMEOUT_S) == redis_sentinel.primary()
    # The hung one gets its share of the time (a quarter of it: four are listed).
    assert trio.current_time() - start < TIMEOUT_S / 2


async def test_no_sentinel_knows_the_name(redis_sentinel: SentinelGroup) -> None:
    address = parse(redis_sentinel.url.replace("/relaymaster", "/othermaster"))
    with trio.fail_after(DEADLINE_S), pytest.raises(StorageUnavailable) as raised:
        await resolve_primary(address, timeout_s=TIMEOUT_S)
    assert "'othermaster'" in str(raised.value)
    assert str(raised.value).count("does not know") == 3


async def test_no_sentinel_answers_quickly_and_without_passwords() -> None:
    dead = [free_loopback_port(), free_loopback_port()]
    address = parse(
        f"redis+sentinel://user:data-secret@127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}"
        "/relaymaster?sentinel_password=sentinel-secret"
    )
    start = trio.current_time()
    with trio.fail_after(DEADLINE_S), pytest.raises(StorageUnavailable) as raised:
        await open_primary(address, client_name="relay-test", timeout_s=TIMEOUT_S)
    assert trio.current_time() - start < 1.0
    message = str(raised.value)
    assert "'relaymaster'" in message
    assert all(f"127.0.0.1:{port}" in message for port in dead)
    assert "secret" not in message


async def test_open_primary_gives_a_connection_to_the_master(
    redis_sentinel: SentinelGroup,
) -> None:
    with trio.fail_after(DEADLINE_S):
        connection = await open_primary(
            parse(redis_sentinel.url), client_name="relay-test", timeout_s=TIMEOUT_S
        )
        try:
            assert await role(connection) == "master"
            [port] = await connection.execute([("CONFIG", "GET", "port")])
            assert int(port[1]) == redis_sentinel.primary()[1]
        finally:
            await connection.aclose()


@pytest.mark.failover
async def test_open_primary_reaches_the_new_primary_after_a_failover(
    fresh_sentinel: SentinelGroup,
) -> None:
    address = parse(fresh_sentinel.url)
    old = fresh_sentinel.primary()
    new = await trio.to_thread.run_sync(fresh_sentinel.failover)
    assert new != old
    with trio.fail_after(DEADLINE_S):
        connection = await open_primary(address, client_name="relay-test", timeout_s=TIMEOUT_S)
        try:
            assert await role(connection) == "master"
            [port] = await connection.execute([("CONFIG", "GET", "port")])
            assert int(port[1]) == new[1]
        finally:
            await connection.aclose()


@pytest.mark.failover
async def test_a_demoted_primary_answers_readonly(fresh_sentinel: SentinelGroup) -> None:
    """What the pump sees of a failover: the old primary takes writes until Sentinel
    demotes it (~10 s after the switch: only watch_switches tells sooner), its
    connections are killed then, and one opened to it later is refused writes."""
    old = fresh_sentinel.primary()
    before = await RedisConnection.open(f"redis://{old[0]}:{old[1]}", client_name="relay-test")
    try:
        await trio.to_thread.run_sync(fresh_sentinel.failover)
        with trio.fail_after(DEADLINE_S):
            assert await before.execute([("SET", "sentinel-test", "x", "EX", "60")]) == ["OK"]
        await trio.to_thread.run_sync(fresh_sentinel.wait_replica, old)
        with trio.fail_after(DEADLINE_S), pytest.raises(ConnectionLost):
            await before.execute([("SET", "sentinel-test", "x", "EX", "60")])
    finally:
        await before.aclose()
    after = await RedisConnection.open(f"redis://{old[0]}:{old[1]}", client_name="relay-test")
    try:
        with trio.fail_after(DEADLINE_S):
            [reply] = await after.execute([("SET", "sentinel-test", "x", "EX", "60")])
        assert isinstance(reply, redis.ResponseError)
        assert str(reply) == "READONLY You can't write against a read only replica."
    finally:
        await after.aclose()


async def watch(
    nursery: trio.Nursery, address: RedisAddress, switches: trio.MemorySendChannel[Node]
) -> None:
    await nursery.start(partial(watch_switches, address, switches.send_nowait, timeout_s=TIMEOUT_S))


@pytest.mark.failover
async def test_watch_switches_reports_the_new_primary(
    fresh_sentinel: SentinelGroup, nursery: trio.Nursery
) -> None:
    send, receive = trio.open_memory_channel[Node](10)
    await watch(nursery, parse(fresh_sentinel.url), send)
    start = trio.current_time()
    new = await trio.to_thread.run_sync(fresh_sentinel.failover)
    with trio.fail_after(SWITCH_S - (trio.current_time() - start)):
        assert await receive.receive() == new


@pytest.mark.failover
async def test_watch_switches_moves_to_the_next_sentinel(
    fresh_sentinel: SentinelGroup, nursery: trio.Nursery
) -> None:
    send, receive = trio.open_memory_channel[Node](10)
    await watch(nursery, parse(fresh_sentinel.url), send)
    fresh_sentinel.kill(fresh_sentinel.sentinel_ports[0])  # the one it subscribed on
    new = await trio.to_thread.run_sync(fresh_sentinel.failover)
    with trio.fail_after(SWITCH_S):
        assert await receive.receive() == new


async def test_watch_switches_starts_when_no_sentinel_answers(nursery: trio.Nursery) -> None:
    address = parse(f"redis+sentinel://127.0.0.1:{free_loopback_port()}/relaymaster")
    send, _ = trio.open_memory_channel[Node](10)
    with trio.fail_after(DEADLINE_S):
        await watch(nursery, address, send)
