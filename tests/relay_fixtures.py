"""Fixtures and helpers of the end-to-end tests: a real relay on port 0, tokens, raw WebSockets.

Test modules load this file with `pytest_plugins = ["relay_fixtures"]` and
import the plain helpers from it. Every relay runs in the test's nursery, on
the test's Redis (`redis_url`) and key prefix, and is shut down (and waited
for) at teardown.

PYTEST_DONT_REWRITE: test modules import helpers from here before pytest
registers it as a plugin; the marker keeps pytest from warning about that.
"""

from __future__ import annotations

import base64
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import jwt
import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from relay.client import Message, RelaySession
from relay.config import Config
from relay.redis.admin import RedisClient
from relay.server import RunningRelay, serve_relay

SECRET = "e2e-test-secret-that-is-long-enough-for-hs256"  # HS256 wants >= 32 bytes
SUBPROTOCOL = "relay.v1"
DEADLINE_S = 10.0  # the default deadline of one I/O step of a test
TEARDOWN_S = 10.0

RelayFactory = Callable[..., Awaitable[RunningRelay]]


async def _serve(
    config: Config, done: trio.Event, *, task_status: trio.TaskStatus[RunningRelay]
) -> None:
    try:
        await serve_relay(config, task_status=task_status)
    finally:
        done.set()


def relay_config(url: str, prefix: str, **fields: Any) -> Config:
    """The Config of a test relay: port 0, no ops port, the test's Redis and prefix."""
    values: dict[str, Any] = {
        "port": 0,
        "ops_port": 0,
        "redis_url": url,
        "key_prefix": prefix,
        "jwt_secret": SECRET,
        "drain_timeout_s": 2.0,
    }
    values.update(fields)
    return Config(**values)


@pytest.fixture
async def make_relay(
    nursery: trio.Nursery, redis_url: str, prefix: str
) -> AsyncIterator[RelayFactory]:
    """`await make_relay(max_inflight=5, ...)`: a relay with these Config fields changed."""
    started: list[tuple[RunningRelay, trio.Event]] = []

    async def make(**fields: Any) -> RunningRelay:
        done = trio.Event()
        running: RunningRelay = await nursery.start(
            _serve, relay_config(redis_url, prefix, **fields), done
        )
        started.append((running, done))
        return running

    yield make
    for running, _ in started:
        running.shutdown()
    with trio.fail_after(TEARDOWN_S):
        for _, done in started:
            await done.wait()


@pytest.fixture
async def relay(make_relay: RelayFactory) -> RunningRelay:
    """A relay with the default Config (but port 0, the test's Redis and prefix)."""
    return await make_relay()


# -- tokens -------------------------------------------------------------------


def token(mailbox: str, ttl_s: int = 3600) -> str:
    """A valid HS256 token for `mailbox`."""
    now = int(time.time())
    return jwt.encode({"sub": mailbox, "iat": now, "exp": now + ttl_s}, SECRET, algorithm="HS256")


def signed_token(claims: dict[str, Any], key: str = SECRET) -> str:
    """An HS256 token with exactly these claims."""
    return jwt.encode(claims, key, algorithm="HS256")


def unsigned_token(claims: dict[str, Any]) -> str:
    """A token with `alg: none` and an empty signature (RFC 7519 section 6)."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def valid_claims(mailbox: str, ttl_s: int = 3600) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": mailbox, "iat": now, "exp": now + ttl_s}


# -- raw WebSockets -------------------------------------------------------------


@asynccontextmanager
async def raw_ws(
    url: str,
    *,
    bearer: str | None = None,
    subprotocols: Sequence[str] | None = None,
    origin: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
    message_queue_size: int = 1,
) -> AsyncIterator[WebSocketConnection]:
    """A plain WebSocket to the relay; authenticates by header when `bearer` is given."""
    extra = list(headers)
    if bearer is not None:
        extra.append((b"Authorization", f"Bearer {bearer}".encode()))
    if origin is not None:
        extra.append((b"Origin", origin.encode()))
    async with open_websocket_url(
        url,
        subprotocols=list(subprotocols) if subprotocols is not None else None,
        extra_headers=extra,
        message_queue_size=message_queue_size,
        max_message_size=16 * 1024 * 1024,
    ) as ws:
        yield ws


@asynccontextmanager
async def raw_session(
    url: str, mailbox: str
) -> AsyncIterator[tuple[WebSocketConnection, dict[str, Any]]]:
    """A raw WebSocket authenticated as `mailbox`, with its welcome frame read."""
    async with raw_ws(url, bearer=token(mailbox)) as ws:
        welcome = await recv(ws)
        assert welcome["type"] == "welcome", welcome
        yield ws, welcome


async def send_json(ws: WebSocketConnection, obj: object) -> None:
    await ws.send_message(orjson.dumps(obj).decode())


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await ws.get_message())
    return frame


async def answer(ws: WebSocketConnection) -> dict[str, Any]:
    """The next frame that is not a `deliver` (an accepted, acked or error answer)."""
    while True:
        frame = await recv(ws)
        if frame["type"] != "deliver":
            return frame


async def request(ws: WebSocketConnection, obj: object) -> dict[str, Any]:
    """Send one frame and return its answer."""
    await send_json(ws, obj)
    return await answer(ws)


async def close_code(ws: WebSocketConnection) -> int | None:
    """Read (and drop) frames until the relay closes the connection; its close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        return closed.reason.code if closed.reason is not None else None


async def receive_n(client: RelaySession, n: int) -> list[Message]:
    return [await client.receive() for _ in range(n)]


async def receive_until(client: RelaySession, body: str) -> list[Message]:
    """Messages up to and including the first whose body is `body` (a marker)."""
    got: list[Message] = []
    while not got or got[-1].body != body:
        got.append(await client.receive())
    return got


async def poll_until(
    condition: Callable[[], bool | Awaitable[bool]], interval_s: float = 0.05
) -> None:
    """Wait until `condition()` holds (it may be async), checking every `interval_s`; for
    state no frame announces (a Redis TTL running out, a subprocess coming up, an HTTP
    endpoint changing). Callers set the deadline."""
    while True:
        held = condition()
        if held if isinstance(held, bool) else await held:
            return
        await trio.sleep(interval_s)


async def accepts_connections(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port (for `poll_until`)."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def send_steadily(
    session: RelaySession,
    mailbox: str,
    stop: trio.Event,
    accepted: list[tuple[float, str]],
    refused: list[str],
) -> None:
    """Send to `mailbox`, one message at a time, until `stop`: each accepted message as
    (monotonic time of its answer, id) in `accepted`, each refusal's code in `refused`;
    after a refusal the next try waits 50 ms (or the stop)."""
    while not stop.is_set():
        try:
            answer = await session.send(mailbox, "x")
        except Exception as exc:  # refused while Redis fails over
            refused.append(getattr(exc, "code", type(exc).__name__))
            with trio.move_on_after(0.05):
                await stop.wait()
            continue
        accepted.append((time.monotonic(), answer["ids"][mailbox]))


def keys_under(redis_client: RedisClient, prefix: str) -> list[str]:
    """Every Redis key under `prefix`, sorted (SCAN, not KEYS), but the storage's epoch
    key (`<prefix>epoch`: one per deployment, a random id, about no mailbox or message)."""
    keys = redis_client.scan_iter(match=prefix + "*", count=1000)
    return sorted(k for k in keys if k != prefix + "epoch")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# -- a tiny HTTP client for the ops port -----------------------------------------


class HttpResponse(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


async def http(port: int, path: str, *extra: str, method: str = "GET") -> HttpResponse:
    """One HTTP/1.1 request to 127.0.0.1:port, with `extra` header lines; the server
    closes after answering."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += "".join(h + "\r\n" for h in extra)
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


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


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


# -- deliveries ------------------------------------------------------------------


def msg_key(prefix: str, mailbox: str, message_id: str) -> str:
    return f"{prefix}{{{mailbox}}}:msg:{message_id}"


async def deliveries(ws: WebSocketConnection, n: int) -> list[dict[str, Any]]:
    """Read frames until `n` messages were delivered (other frames are dropped)."""
    messages: list[dict[str, Any]] = []
    while len(messages) < n:
        frame = await recv(ws)
        if frame["type"] == "deliver":
            messages += frame["messages"]
    assert len(messages) == n, f"{len(messages)} delivered, expected {n}"
    return messages
