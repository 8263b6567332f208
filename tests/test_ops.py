"""End to end: the ops port (/healthz /readyz /metrics /.well-known/relay-policy), the limits
(rate, connection caps, slow consumers), what the logs never contain, and `--workers`.

Real relays over real WebSockets, and real HTTP to the ops port through a tiny client of
our own. Every I/O step has a deadline; waits for state no frame announces poll with one.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from relay_fixtures import (
    DEADLINE_S,
    SECRET,
    TEARDOWN_S,
    RelayFactory,
    close_code,
    raw_session,
    raw_ws,
    recv,
    relay_config,
    request,
    send_json,
    signed_token,
    token,
    unsigned_token,
    valid_claims,
)
from trio_websocket import ConnectionClosed, ConnectionRejected

from relay.client import open_relay
from relay.config import Config
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis_sync import RedisClient
from relay.server import RunningRelay, serve_relay

pytest_plugins = ["relay_fixtures"]

WORKER_START_S = 30.0  # three Python processes start on a small machine


# -- a tiny HTTP client for the ops port -----------------------------------------


class HttpResponse(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


async def http(port: int, path: str, method: str = "GET") -> HttpResponse:
    """One HTTP/1.1 request to 127.0.0.1:port; the ops server closes after answering."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    if method == "POST":
        head += "Content-Length: 0\r\n"
    with trio.fail_after(DEADLINE_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all((head + "\r\n").encode())
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    raw_head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpResponse(int(status_line.split()[1]), headers, body)


SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class Scrape(NamedTuple):
    text: str
    samples: dict[SampleKey, float]

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for one not exported yet (a labelled counter never hit)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(port: int) -> Scrape:
    response = await http(port, "/metrics")
    assert response.status == 200, response
    assert response.headers["content-type"].startswith("text/plain")
    text = response.body.decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return Scrape(text, samples)


async def wait_for_status(port: int, path: str, status: int, timeout_s: float) -> None:
    """Poll `path` until it answers `status`; /healthz must stay 200 all along."""
    last: HttpResponse | None = None
    with trio.fail_after(timeout_s):
        while True:
            last = await http(port, path)
            assert (await http(port, "/healthz")).status == 200
            if last.status == status:
                return
            await trio.sleep(0.05)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free on the loopback (the ops ports of two
    workers)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports")


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[RunningRelay]:
    """A relay of our own (not the make_relay fixture's), shut down and waited for on exit,
    so its shutdown happens inside the test body."""
    done = trio.Event()

    async def serve(*, task_status: trio.TaskStatus[RunningRelay]) -> None:
        try:
            await serve_relay(config, task_status=task_status)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        running: RunningRelay = await nursery.start(serve)
        try:
            yield running
        finally:
            running.shutdown()
            with trio.fail_after(TEARDOWN_S):
                await done.wait()


@asynccontextmanager
async def private_relay(**fields: Any) -> AsyncIterator[RunningRelay]:
    """A relay on a Valkey of its own: for tests that need no run per Redis server."""
    with EmbeddedServer() as redis:
        async with serving(relay_config(redis.url, "ops-test:", **fields)) as relay:
            yield relay


async def open_stalled_socket(
    port: int, bearer: str, rcvbuf_bytes: int = 4096
) -> trio.SocketStream:
    """A WebSocket whose client completes the upgrade (Authorization header) and then never
    reads again: a slow consumer. A small receive buffer makes the relay's sends block soon."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            "GET /v1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {bearer}\r\n"
            "\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = await stream.receive_some(1)  # no further than the response head
        assert chunk, f"relay closed during the handshake: {response!r}"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return stream


async def read_until_closed(stream: trio.SocketStream) -> None:
    """Drain a raw socket until the relay has closed it (EOF, or a reset)."""
    try:
        while await stream.receive_some(1 << 20):
            pass
    except trio.BrokenResourceError:
        pass


# -- the ops endpoints -------------------------------------------------------------


async def test_metrics_counters_move_by_exactly_the_traffic_sent(make_relay: RelayFactory) -> None:
    relay = await make_relay(ops_port=free_loopback_port())
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    body = unique("metrics-body")
    before = await scrape(relay.ops_port)

    with trio.fail_after(DEADLINE_S):
        async with (
            raw_session(relay.url, alice) as (sender, _),
            open_relay(relay.url, token(bob)) as receiver,
        ):
            ids = []
            for i in range(3):
                accepted = await request(
                    sender, {"type": "send", "ref": f"s{i}", "to": bob, "body": f"{body}-{i}"}
                )
                assert accepted["type"] == "accepted", accepted
                ids.append(accepted["ids"][bob])
            # One send to two recipients: two copies, one delivered (carol never connects).
            both = await request(
                sender, {"type": "send", "ref": "s3", "to": [bob, carol], "body": body}
            )
            assert both["type"] == "accepted", both
            ids.append(both["ids"][bob])
            too_long = await request(
                sender, {"type": "send", "ref": "bad1", "to": bob, "body": body, "ttl": 10**9}
            )
            assert too_long["code"] == "ttl_too_long", too_long
            bad = await request(sender, {"type": "send", "ref": "bad2", "to": bob})
            assert bad["code"] == "bad_frame", bad

            received = [await receiver.receive() for _ in range(4)]
            assert [m.id for m in received] == ids
            assert await receiver.ack([*ids, "0-unknown"]) == 4

    with trio.fail_after(DEADLINE_S):
        while True:  # the relay counts a close once the connection handler has ended
            after = await scrape(relay.ops_port)
            closed = after.value("relay_connections_closed_total", code="1000")
            if closed - before.value("relay_connections_closed_total", code="1000") >= 2:
                break
            await trio.sleep(0.05)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("relay_messages_accepted_total") == 5
    assert moved("relay_messages_delivered_total") == 4
    assert moved("relay_messages_acked_total") == 4
    assert moved("relay_connections_opened_total") == 2
    assert moved("relay_connections_closed_total", code="1000") == 2
    assert after.value("relay_connections") == before.value("relay_connections") == 0
    assert moved("relay_requests_rejected_total", code="ttl_too_long") == 1
    assert moved("relay_requests_rejected_total", code="bad_frame") == 1
    rejected = {
        dict(labels)["code"]: value
        for (name, labels), value in after.samples.items()
        if name == "relay_requests_rejected_total"
    }
    assert rejected == {"ttl_too_long": 1, "bad_frame": 1}
    assert moved("relay_delivery_latency_seconds_count") == 4
    assert moved("relay_messages_expired_undelivered_total") == 0
    for secret in (alice, bob, carol, body, *ids):
        assert secret not in after.text, f"{secret!r} appears in /metrics"


async def test_readyz_follows_redis_and_shutdown_while_healthz_stays_ok(prefix: str) -> None:
    port = free_loopback_port()
    redis = EmbeddedServer(port=port)
    redis.start()
    replacement: EmbeddedServer | None = None
    try:
        config = relay_config(redis.url, prefix, ops_port=free_loopback_port())
        async with serving(config) as relay:
            ops = relay.ops_port
            with trio.fail_after(DEADLINE_S):
                ready = await http(ops, "/readyz")
            assert ready.status == 200, ready
            assert (await http(ops, "/healthz")).status == 200

            redis.stop()
            await wait_for_status(ops, "/readyz", 503, timeout_s=15)
            assert b"redis" in (await http(ops, "/readyz")).body.lower()

            replacement = EmbeddedServer(port=port)
            replacement.start()
            await wait_for_status(ops, "/readyz", 200, timeout_s=15)
            assert (await scrape(ops)).value("relay_hub_reconnects_total") >= 1

            # Draining: a session that never answers the close keeps the relay in its drain
            # for a while, and /readyz says 503 meanwhile.
            with trio.fail_after(DEADLINE_S):
                stalled = await open_stalled_socket(relay.port, token(unique("drain")))
            async with stalled:
                relay.shutdown()
                with trio.fail_after(DEADLINE_S):
                    draining = await http(ops, "/readyz")
                assert draining.status == 503, draining
                assert b"shutting down" in draining.body
                assert (await http(ops, "/healthz")).status == 200
    finally:
        redis.stop()
        if replacement is not None:
            replacement.stop()


async def test_policy_endpoint_reports_configured_retention_as_json(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(ops_port=free_loopback_port(), retention_s=3600)
    response = await http(relay.ops_port, "/.well-known/relay-policy")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    policy: dict[str, Any] = orjson.loads(response.body)
    assert policy["retention_s"] == 3600
    assert policy["max_ttl_s"] == 3600
    assert policy["redis"]["persistence"] == "off"
    assert policy["redis"]["maxmemory_policy"] == "noeviction"
    assert policy["bodies_logged"] is False
    assert policy["mailboxes_in_logs"] == "keyed hash"
    assert policy["protocol"] == "relay.v1"
    assert isinstance(policy["version"], str) and policy["version"]


async def test_ops_unknown_path_is_404_and_post_is_405(make_relay: RelayFactory) -> None:
    relay = await make_relay(ops_port=free_loopback_port())
    ops = relay.ops_port
    assert (await http(ops, "/nope")).status == 404
    assert (await http(ops, "/metrics/../secret")).status == 404
    assert (await http(ops, "/healthz", method="POST")).status == 405
    assert (await http(ops, "/metrics", method="POST")).status == 405
    head = await http(ops, "/healthz", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert (await http(ops, "/healthz?probe=1")).status == 200


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

        with trio.fail_after(DEADLINE_S):
            while True:
                after = await scrape(relay.ops_port)
                if after.value("relay_connections_closed_total", code="1008") > before.value(
                    "relay_connections_closed_total", code="1008"
                ):
                    break
                await trio.sleep(0.05)
            await read_until_closed(stalled)  # and the relay did close the socket

    assert after.value("relay_connections_closed_total", code="1008") == 1
    assert len(message_keys(redis_client, prefix, slow)) == count
    # Still queued: a new session of the mailbox gets every one, in order.
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token(slow)) as client:
            got = [await client.receive() for _ in range(count)]
    assert [m.id for m in got] == ids


# -- logs ------------------------------------------------------------------------------


async def test_debug_logs_never_contain_tokens_or_bodies(
    caplog: pytest.LogCaptureFixture, redis_url: str, prefix: str
) -> None:
    caplog.set_level(logging.DEBUG)  # the root level, as `relay serve --log-level debug` sets it
    body = unique("SECRET-BODY")
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    now = int(time.time())
    tokens = {
        "alice": token(alice),
        "bob": token(bob),
        "bob2": token(bob),
        "carol": token(carol),
        "wrong_key": signed_token(valid_claims(alice), key="x" * 48),
        "expired": signed_token({"sub": alice, "iat": now - 100, "exp": now - 10}),
        "future": signed_token({"sub": alice, "iat": now + 999, "exp": now + 9999}),
        "alg_none": unsigned_token(valid_claims(alice)),
        "bad_sub": signed_token({"sub": "no spaces allowed " + body, "exp": now + 60}),
        "garbage": "not-a-jwt-" + unique("garbage"),
    }
    refused = [tokens[k] for k in ("wrong_key", "expired", "future", "alg_none", "bad_sub")]
    refused.append(tokens["garbage"])
    config = relay_config(redis_url, prefix, auth_timeout_s=1.0, log_level="debug")

    async with serving(config) as relay:
        url = relay.url
        with trio.fail_after(DEADLINE_S * 3):
            for bad in refused:  # every way a token is refused, by header and by frame
                async with raw_ws(url, bearer=bad) as ws:
                    assert await close_code(ws) == 4401
                async with raw_ws(url) as ws:
                    await send_json(ws, {"type": "auth", "token": bad})
                    assert await close_code(ws) == 4401
            basic = [(b"Authorization", f"Basic {tokens['alice']}".encode())]
            async with raw_ws(url, headers=basic) as ws:
                assert await close_code(ws) == 4401
            async with raw_ws(url) as ws:  # an auth frame that is not JSON
                await ws.send_message('{"type": "auth", "token": "' + tokens["alice"])
                assert await close_code(ws) == 4401
            async with raw_ws(url) as ws:  # a send before auth
                await send_json(ws, {"type": "send", "to": bob, "body": body})
                assert await close_code(ws) == 4401
            async with raw_ws(url + "?token=" + tokens["alice"]) as ws:  # never in the URL
                assert await close_code(ws) == 4408

            async with (
                raw_session(url, alice) as (sender, _),
                open_relay(url, tokens["bob"], auth="frame") as receiver,
            ):
                # Online delivery, a retried ref, two recipients, then the offline path.
                sent = await request(sender, {"type": "send", "ref": "r1", "to": bob, "body": body})
                again = await request(
                    sender, {"type": "send", "ref": "r1", "to": bob, "body": body}
                )
                assert again == sent
                multi = await request(
                    sender, {"type": "send", "ref": "r2", "to": [bob, carol], "body": body + "-2"}
                )
                assert multi["type"] == "accepted"
                first = [await receiver.receive(), await receiver.receive()]
                assert [m.body for m in first] == [body, body + "-2"]
                assert await receiver.ack([m.id for m in first]) == 2
                await receiver.ack(["0-unknown"], wait=False)

                # Every error path, each frame carrying the body or a token.
                bad_frames: list[tuple[object, str]] = [
                    (
                        {"type": "send", "ref": "e1", "to": bob, "body": body, "ttl": 10**9},
                        "ttl_too_long",
                    ),
                    ({"type": "send", "ref": "e2", "to": bob, "body": body * 3000}, "too_large"),
                    (
                        {"type": "send", "ref": "e3", "to": "bad recipient", "body": body},
                        "bad_recipient",
                    ),
                    ({"type": "send", "ref": "e4", "to": bob, "body": [body]}, "bad_frame"),
                    ({"type": "auth", "ref": "e5", "token": tokens["alice"]}, "bad_frame"),
                    ({"type": "nope", "ref": "e6", "body": body}, "unknown_type"),
                    ({"type": "ack", "ref": "e7", "ids": body}, "bad_frame"),
                ]
                for frame, code in bad_frames:
                    error = await request(sender, frame)
                    assert (error["type"], error["code"]) == ("error", code), error
                await sender.send_message('{"type": "send", "to": "' + bob + '", "body": "' + body)
                assert (await recv(sender))["code"] == "bad_frame"
                await sender.send_message(body.encode())  # binary frames are reserved
                assert (await recv(sender))["code"] == "bad_frame"

                # A newer session replaces this one (4409).
                async with open_relay(url, tokens["bob2"]):
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await receiver.receive()
                    assert receiver.close_code == 4409

            async with open_relay(url, tokens["carol"], auth="frame") as client:
                waiting = await client.receive()  # stored while carol was offline
                assert waiting.body == body + "-2"
                assert await client.ack([waiting.id]) == 1

            # A live session when the relay shuts down (1001) is logged too.
            async with open_relay(url, tokens["alice"]) as client:
                await client.send(alice, body + "-3")
                relay.shutdown()
                with pytest.raises(ConnectionClosed):
                    while True:
                        await client.receive()
                assert client.close_code == 1001

    records = caplog.get_records("call")
    assert any(r.levelno == logging.DEBUG and r.name.startswith("relay") for r in records), (
        "no DEBUG record of the relay was captured: the test would prove nothing"
    )
    texts = [caplog.text]
    for record in records:
        texts += [record.getMessage(), repr(record.args), record.exc_text or ""]
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
    everything = "\n".join(texts)
    for secret in [body, *tokens.values()]:
        assert secret not in everything, f"{secret[:40]!r} appears in the logs"
    # Nor any piece of one: every 8 characters of each signature and of the body's random part.
    random_parts = [body.rsplit("-", 1)[1], tokens["garbage"].rsplit("-", 1)[1]]
    random_parts += [t.rsplit(".", 1)[1] for t in tokens.values() if t.count(".") == 2]
    for part in filter(None, random_parts):
        for start in range(len(part) - 7):
            piece = part[start : start + 8]
            assert piece not in everything, f"{piece!r} (of {part[:20]!r}...) appears in the logs"
    # The libraries that would log frames stay at INFO even with the root at DEBUG.
    for name in ("trio-websocket", "redis"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.INFO


# -- workers ----------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def is_running(pid: int) -> bool:
    """True for a live process; a zombie (exited, not reaped yet) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def is_ready(ops_port: int) -> bool:
    try:
        return (await http(ops_port, "/readyz")).status == 200
    except OSError:
        return False


@asynccontextmanager
async def killed_at_exit(process: trio.Process, others: list[int]) -> AsyncIterator[None]:
    """Whatever happens, stop the process and the recorded children by PID."""
    try:
        yield
    finally:
        for pid in others:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        with trio.move_on_after(TEARDOWN_S) as scope:
            scope.shield = True
            await process.wait()


async def test_workers_serve_a_client_each_and_exit_cleanly_on_sigterm(tmp_path: Path) -> None:
    port, ops = free_loopback_port(), free_port_pair()
    stderr_path = tmp_path / "relay.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    workers: list[int] = []
    with EmbeddedServer() as redis, stderr_path.open("wb") as stderr:
        command = [sys.executable, "-m", "relay", "serve", "--workers", "2", "--port", str(port)]
        command += ["--ops-port", str(ops), "--redis-url", redis.url, "--jwt-secret", SECRET]
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env
        )

        def log_text() -> str:
            return stderr_path.read_text(errors="replace")

        async with killed_at_exit(process, workers):
            with trio.fail_after(WORKER_START_S):
                while not (await is_ready(ops) and await is_ready(ops + 1)):
                    assert process.poll() is None, f"supervisor exited:\n{log_text()}"
                    await trio.sleep(0.1)
            workers += children_of(process.pid)
            assert len(workers) == 2, workers

            served = {0: 0.0, 1: 0.0}
            url = f"ws://127.0.0.1:{port}/v1"
            with trio.fail_after(DEADLINE_S * 2):
                for attempt in range(100):  # each on a new TCP connection, until both served
                    mailbox = unique(f"w{attempt}")
                    async with open_relay(url, token(mailbox)) as client:
                        await client.send(mailbox, "to myself")
                        message = await client.receive()
                        assert await client.ack([message.id]) == 1
                    for worker in (0, 1):
                        metrics = await scrape(ops + worker)
                        assert metrics.value("relay_worker_info", worker=str(worker)) == 1
                        served[worker] = metrics.value("relay_messages_delivered_total")
                    if all(served.values()):
                        break
            assert all(served.values()), f"one worker served every client: {served}"

            # A worker that dies is restarted (on the same ops port).
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(WORKER_START_S):
                while True:
                    assert process.poll() is None, f"supervisor exited:\n{log_text()}"
                    current = children_of(process.pid)
                    restarted = victim not in current and len(current) == 2
                    if restarted and await is_ready(ops) and await is_ready(ops + 1):
                        break
                    await trio.sleep(0.1)
            workers += [pid for pid in current if pid not in workers]

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(DEADLINE_S * 2):
                code = await process.wait()
            assert code == 0, log_text()
            left = [pid for pid in workers if is_running(pid)]
            assert not left, f"workers still running after the supervisor exited: {left}"

    text = log_text()
    assert re.search(r"\bworker=0\b", text), text
    assert re.search(r"\bworker=1\b", text), text
