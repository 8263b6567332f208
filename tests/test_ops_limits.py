"""End to end: the limits (rate, connection caps, slow consumers).

Real relays over real WebSockets, and real HTTP to the ops port through a tiny client of
our own (relay_fixtures.http). Every I/O step has a deadline; waits for state no frame
announces poll with one.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    open_stalled_socket,
    poll_until,
    raw_session,
    raw_ws,
    recv,
    relay_config,
    scrape,
    send_json,
    serving,
    token,
    unique,
)
from trio_websocket import ConnectionClosed, ConnectionRejected

from relay.client import open_relay
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]


@asynccontextmanager
async def private_relay(**fields: Any) -> AsyncIterator[RunningRelay]:
    """A relay on a Valkey of its own: for tests that need no run per Redis server."""
    with EmbeddedServer() as redis:
        async with serving(relay_config(redis.url, "ops-test:", **fields)) as relay:
            yield relay


async def read_until_closed(stream: trio.SocketStream) -> None:
    """Drain a raw socket until the relay has closed it (EOF, or a reset)."""
    try:
        while await stream.receive_some(1 << 20):
            pass
    except trio.BrokenResourceError:
        pass


# -- limits --------------------------------------------------------------------------


async def test_rate_limit_flood_gets_rate_limited_then_1008_while_others_are_served(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(rate_limit_per_s=20, rate_burst=10)
    flooder, calm = unique("flooder"), unique("calm")
    refs = [f"f-{i}" for i in range(1000)]  # sent until the relay closes; it will long before
    frames: list[dict[str, Any]] = []
    code: list[int | None] = []

    async def flood() -> None:
        async with raw_session(relay.url, flooder) as (ws, _):

            async def send_all() -> None:
                for ref in refs:
                    try:
                        await send_json(ws, {"type": "send", "ref": ref, "to": calm, "body": ref})
                    except ConnectionClosed:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                try:
                    while True:
                        frames.append(await recv(ws))
                except ConnectionClosed as closed:
                    code.append(closed.reason.code if closed.reason else None)

    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token(calm)) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                for i in range(5):  # meanwhile the other connection keeps sending
                    await client.send(calm, f"calm-{i}")

            assert code == [1008]
            accepted = [f for f in frames if f["type"] == "accepted"]
            errors = [f for f in frames if f["type"] == "error"]
            assert len(accepted) + len(errors) == len(frames)
            assert len(accepted) >= 10  # the burst
            assert errors, "no rate_limited error before the close"
            assert {e["code"] for e in errors} == {"rate_limited"}
            answered = [f["ref"] for f in frames]
            assert answered == sorted(answered, key=refs.index)  # one answer per frame, in order
            assert len(set(answered)) == len(answered)
            assert set(answered) <= set(refs)

            # The other connection gets its own messages and every flood message accepted.
            marker = "calm-marker"
            await client.send(calm, marker)
            bodies: list[str] = []
            while not bodies or bodies[-1] != marker:
                bodies.append((await client.receive()).body)
    assert sorted(b for b in bodies if b.startswith("f-")) == sorted(f["ref"] for f in accepted)
    assert [b for b in bodies if b.startswith("calm-")] == [
        *(f"calm-{i}" for i in range(5)),
        marker,
    ]


async def test_max_connections_refuses_the_eleventh_handshake_with_503(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(max_connections=10, ops_port=free_loopback_port())
    with trio.fail_after(DEADLINE_S):
        async with AsyncExitStack() as stack:
            for i in range(9):
                await stack.enter_async_context(raw_session(relay.url, unique(f"cap{i}")))
            async with raw_session(relay.url, unique("tenth")):
                with pytest.raises(ConnectionRejected) as refused:
                    async with raw_ws(relay.url, bearer=token(unique("eleventh"))):
                        pass
                assert refused.value.status_code == 503
            # One closed: soon a new handshake gets through.
            while True:
                try:
                    async with raw_session(relay.url, unique("again")) as (_, welcome):
                        assert welcome["type"] == "welcome"
                        break
                except ConnectionRejected as exc:
                    assert exc.status_code == 503
                    await trio.sleep(0.05)
        metrics = await scrape(relay.ops_port)
    assert metrics.value("relay_handshakes_refused_total", status="503") >= 1


async def test_per_ip_cap_answers_429_and_counts_forwarded_addresses_behind_trusted_proxy(
    make_relay: RelayFactory,
) -> None:
    def xff(address: str) -> list[tuple[bytes, bytes]]:
        return [(b"X-Forwarded-For", address.encode())]

    async def refused_status(url: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> int:
        with pytest.raises(ConnectionRejected) as refused:
            async with raw_ws(url, bearer=token(unique("over")), headers=headers):
                pass
        return refused.value.status_code

    direct = await make_relay(max_connections_per_ip=2)
    proxied = await make_relay(max_connections_per_ip=2, trusted_proxies=("127.0.0.1/32",))
    with trio.fail_after(DEADLINE_S):
        async with AsyncExitStack() as stack:
            for _ in range(2):
                await stack.enter_async_context(raw_ws(direct.url, bearer=token(unique("d"))))
            assert await refused_status(direct.url) == 429
            # From an untrusted peer, X-Forwarded-For is ignored: no way around the cap.
            assert await refused_status(direct.url, xff("198.51.100.77")) == 429

        async with AsyncExitStack() as stack:
            for address in ("198.51.100.1", "198.51.100.1", "198.51.100.2", "198.51.100.2"):
                ws = await stack.enter_async_context(
                    raw_ws(proxied.url, bearer=token(unique("p")), headers=xff(address))
                )
                assert (await recv(ws))["type"] == "welcome"
            assert await refused_status(proxied.url, xff("198.51.100.1")) == 429
            # The right-most untrusted hop counts; what the client prepended does not.
            assert await refused_status(proxied.url, xff("198.51.100.3, 198.51.100.2")) == 429
            async with raw_ws(
                proxied.url, bearer=token(unique("p")), headers=xff("198.51.100.2, 198.51.100.3")
            ) as ws:
                assert (await recv(ws))["type"] == "welcome"
            # The proxy's own connections (no header) count as its address.
            async with raw_ws(proxied.url, bearer=token(unique("p"))) as ws:
                assert (await recv(ws))["type"] == "welcome"


@pytest.mark.parametrize(
    ("field", "status"), [("max_connections", 503), ("max_connections_per_ip", 429)]
)
async def test_concurrent_handshakes_never_exceed_the_connection_cap(
    field: str, status: int
) -> None:
    """Handshakes arriving together must not all pass the cap check before any is counted."""
    cap, attempts = 3, 30
    welcomed: list[str] = []
    refused: list[int] = []
    everyone_tried = trio.Event()

    async def attempt(relay: RunningRelay, i: int) -> None:
        try:
            async with raw_ws(relay.url, bearer=token(unique(f"race{i}"))) as ws:
                welcomed.append((await recv(ws))["type"])
                if len(welcomed) + len(refused) == attempts:
                    everyone_tried.set()
                await everyone_tried.wait()  # hold the connection until all have tried
        except ConnectionRejected as exc:
            refused.append(exc.status_code)
            if len(welcomed) + len(refused) == attempts:
                everyone_tried.set()

    async with private_relay(**{field: cap}) as relay:
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                for i in range(attempts):
                    nursery.start_soon(attempt, relay, i)
                await everyone_tried.wait()
    assert set(refused) == {status}
    assert len(welcomed) == cap, f"{len(welcomed)} connections admitted under a cap of {cap}"


async def test_refused_handshake_connection_is_closed_by_the_relay() -> None:
    """After an HTTP refusal the relay closes the TCP connection itself: a client that keeps
    its end open must not hold a socket (and a task) past the cap, nor delay shutdown."""
    received = b""
    closed = False
    async with private_relay(max_connections=1) as relay:
        with trio.fail_after(DEADLINE_S):
            async with raw_ws(relay.url, bearer=token(unique("holder"))):
                stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
                async with stream:
                    key = base64.b64encode(os.urandom(16)).decode()
                    await stream.send_all(
                        (
                            "GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                            "Sec-WebSocket-Version: 13\r\n\r\n"
                        ).encode()
                    )
                    with trio.move_on_after(3):
                        while chunk := await stream.receive_some(4096):
                            received += chunk
                        closed = True
    assert received.startswith(b"HTTP/1.1 503"), received
    assert closed, "the relay kept the refused connection open for 3 s"


def message_keys(redis_client: RedisClient, prefix: str, mailbox: str) -> list[str]:
    return sorted(redis_client.scan_iter(match=f"{prefix}{{{mailbox}}}:msg:*", count=1000))


async def test_slow_consumer_is_closed_with_1008_and_its_messages_stay_queued(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay(send_timeout_s=0.5, ops_port=free_loopback_port())
    slow, sender = unique("slow"), unique("sender")
    count = 120  # 120 x 60 KiB: more than the kernel buffers between relay and client
    before = await scrape(relay.ops_port)
    with trio.fail_after(DEADLINE_S):
        stalled = await open_stalled_socket(relay.port, token(slow))
    async with stalled:
        with trio.fail_after(DEADLINE_S):
            async with open_relay(relay.url, token(sender)) as client:
                ids = []
                for i in range(count):
                    accepted = await client.send(slow, f"{i:04d}" + "x" * (60 * 1024))
                    ids.append(accepted["ids"][slow])

        after = before

        async def closed_1008() -> bool:
            nonlocal after
            after = await scrape(relay.ops_port)
            counted = after.value("relay_connections_closed_total", code="1008")
            return counted > before.value("relay_connections_closed_total", code="1008")

        after = before
        with trio.fail_after(DEADLINE_S):
            await poll_until(closed_1008)
            await read_until_closed(stalled)  # and the relay did close the socket

    assert after.value("relay_connections_closed_total", code="1008") == 1
    assert len(message_keys(redis_client, prefix, slow)) == count
    # Still queued: a new session of the mailbox gets every one, in order.
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token(slow)) as client:
            got = [await client.receive() for _ in range(count)]
    assert [m.id for m in got] == ids
