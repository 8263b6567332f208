"""The generator's side of the wire: raw trio-websocket connections and hand-built frames.

relay.client is convenient but does more per message than a load generator
can afford (an Event per send, an unbounded inbox); here frames are built with
f-strings, sends go without `ref` (so the relay keeps no idempotency records),
and each connection is one `WebSocketConnection` read by one task.

A body is `"<seq> <t_ns> xxxx..."`: the sender's sequence number, then a time
in `time.monotonic_ns()` of the process that holds both ends of the pair (the
send time, or the scheduled send time in the open-loop workload).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url
from wsproto.utilities import LocalProtocolError

from relay.auth import mint_token

SUBPROTOCOL = "relay.v1"
RECEIVE_BUFFER_BYTES = 64 * 1024  # trio-websocket's 4 KiB default costs throughput
MESSAGE_QUEUE_SIZE = 64
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 2.0
TOKEN_TTL_S = 6 * 3600


class Unexpected(Exception):
    """The relay answered something the bench did not expect."""


@attrs.define(eq=False)
class Conn:
    mailbox: str
    ws: WebSocketConnection
    welcome: dict[str, Any]


def mailbox(run_id: str, role: str, index: int) -> str:
    return f"bench-{run_id}-{role}{index}"


async def connect(nursery: trio.Nursery, url: str, secret: str, box: str) -> Conn:
    """Open an authenticated connection held by a task in `nursery`; read its welcome."""
    conn: Conn = await nursery.start(_hold, url, secret, box)
    return conn


async def _hold(url: str, secret: str, box: str, *, task_status: trio.TaskStatus[Conn]) -> None:
    """Open the connection in a nursery of its own, and hold it until it closes.

    trio-websocket's reader task raises LocalProtocolError when a ping arrives
    while we close (it answers with a pong in the CLOSING state): that must not
    tear down the generator, so it ends here.
    """
    started = False
    try:
        async with trio.open_nursery() as own:
            token = mint_token(secret, box, TOKEN_TTL_S, time.time())
            with trio.fail_after(CONNECT_TIMEOUT_S):
                ws = await connect_websocket_url(
                    own,
                    url,
                    subprotocols=[SUBPROTOCOL],
                    extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    max_message_size=MAX_MESSAGE_BYTES,
                    receive_buffer_size=RECEIVE_BUFFER_BYTES,
                )
                welcome = orjson.loads(await ws.get_message())
            if welcome.get("type") != "welcome":
                raise Unexpected(f"{box}: expected welcome, got {str(welcome)[:200]}")
            started = True
            task_status.started(Conn(box, ws, welcome))
    except BaseExceptionGroup as group:
        if not started:
            raise _first(group) from None
        rest = group.split((LocalProtocolError, ConnectionClosed))[1]
        if rest is not None:
            raise rest from None


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def connect_many(
    nursery: trio.Nursery,
    url: str,
    secret: str,
    boxes: list[str],
    concurrency: int = 64,
    on_connect: Callable[[], None] | None = None,
) -> list[Conn]:
    """Connect every mailbox, at most `concurrency` handshakes at a time, in the given order."""
    conns: list[Conn | None] = [None] * len(boxes)
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            conns[i] = await connect(nursery, url, secret, boxes[i])
        if on_connect is not None:
            on_connect()

    async with trio.open_nursery() as connecting:
        for i in range(len(boxes)):
            connecting.start_soon(one, i)
    return [c for c in conns if c is not None]


async def close_all(conns: list[Conn]) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S * 2):
        async with trio.open_nursery() as closing:
            for conn in conns:
                closing.start_soon(conn.ws.aclose)


def make_body(seq: int, t_ns: int, size: int) -> str:
    head = f"{seq} {t_ns} "
    return head + "x" * max(size - len(head), 0)


def parse_body(body: str) -> tuple[int, int]:
    """The sequence number and the time a body carries."""
    seq, t_ns, _ = body.split(" ", 2)
    return int(seq), int(t_ns)


def send_frame(to: str, body: str) -> str:
    """A `send` without ref (bodies and mailbox ids are plain ASCII: no escaping needed)."""
    return f'{{"type":"send","to":"{to}","body":"{body}"}}'


def ack_frame(ids: list[str], ref: str) -> str:
    return orjson.dumps({"type": "ack", "ids": ids, "ref": ref}).decode()


def wall_ms() -> int:
    return time.time_ns() // 1_000_000
