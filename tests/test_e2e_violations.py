"""End to end: a WebSocket protocol violation gets a Close frame with its code (1002 bad
framing, 1007 bad UTF-8, 1009 too large), after the answers to the requests that came
before it in the same read, and then the relay closes the TCP connection. Requests in
the same write as the client's own Close still take effect.

The client is wsproto's own client side over a raw socket, so the test can put a valid
`send` and a broken frame into one write.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from relay_fixtures import DEADLINE_S, RelayFactory, keys_under, poll_until, token, unique
from test_websocket_engine import BINARY, TEXT, frame
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from relay.redis.admin import RedisClient

pytest_plugins = ["relay_fixtures"]

MAX_BODY = 1024  # a frame limit of 6 x 1 KiB + 64 KiB


async def open_raw_session(port: int, mailbox: str) -> tuple[trio.SocketStream, WSConnection]:
    """A raw socket upgraded with wsproto's client (authenticated by header)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    headers = [(b"authorization", f"Bearer {token(mailbox)}".encode())]
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/v1", extra_headers=headers)))
    while True:
        ws.receive_data(await stream.receive_some(65536))
        if any(isinstance(e, AcceptConnection) for e in ws.events()):
            return stream, ws


async def text_frames(stream: trio.SocketStream, ws: WSConnection, n: int) -> list[dict[str, Any]]:
    """The next `n` text frames, parsed."""
    frames: list[dict[str, Any]] = []
    while len(frames) < n:
        data = await stream.receive_some(65536)
        assert data, f"the relay hung up after {frames}"
        ws.receive_data(data)
        frames += [orjson.loads(e.data) for e in ws.events() if isinstance(e, TextMessage)]
    return frames


async def _until_closed(
    stream: trio.SocketStream, ws: WSConnection
) -> tuple[list[dict[str, Any]], int]:
    """Frames until the relay's Close, its code; then the relay must hang up."""
    frames: list[dict[str, Any]] = []
    while True:
        data = await stream.receive_some(65536)
        assert data, f"the relay hung up without a Close frame after {frames}"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage):
                frames.append(orjson.loads(event.data))
            elif isinstance(event, CloseConnection):
                try:
                    while await stream.receive_some(65536):
                        pass  # the relay closes the TCP connection after its Close
                except trio.BrokenResourceError:
                    pass
                return frames, event.code


@pytest.mark.parametrize(
    ("broken", "code"),
    [
        (frame(TEXT, b'{"type": "send", "to": "x", "body": "\xff"}'), 1007),
        (frame(TEXT, b"{}", masked=False), 1002),
        (frame(0x3, b"reserved opcode"), 1002),
        (frame(TEXT, b"{", fin=False) + frame(TEXT, b"}"), 1002),
        (frame(BINARY, b"b" * (6 * MAX_BODY + 64 * 1024 + 1)), 1009),
    ],
    ids=["utf-8", "unmasked", "opcode", "interleaved", "too-large"],
)
async def test_a_violation_is_closed_with_its_code_after_the_answers_before_it(
    make_relay: RelayFactory, broken: bytes, code: int
) -> None:
    relay = await make_relay(max_body_bytes=MAX_BODY)
    alice = unique("alice")
    send = {"type": "send", "ref": "before", "to": alice, "body": "kept"}
    with trio.fail_after(DEADLINE_S):
        stream, ws = await open_raw_session(relay.port, alice)
        async with stream:
            await stream.send_all(frame(TEXT, orjson.dumps(send)) + broken)
            frames, closed_with = await _until_closed(stream, ws)
    assert closed_with == code
    answers = [f for f in frames if f["type"] not in ("welcome", "deliver")]
    assert answers == [answers[0]] and answers[0]["type"] == "accepted", frames
    assert answers[0]["ref"] == "before"


async def test_requests_just_before_the_clients_close_still_take_effect(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    """An ack and a send in the same write as the client's Close: the relay cannot answer
    them (nothing may follow the peer's Close), but the ack deletes and the send stores."""
    relay = await make_relay()
    bob, carol = unique("bob"), unique("carol")
    with trio.fail_after(DEADLINE_S):
        stream, ws = await open_raw_session(relay.port, bob)
        async with stream:
            send = {"type": "send", "ref": "r1", "to": bob, "body": "to be acked"}
            await stream.send_all(frame(TEXT, orjson.dumps(send)))
            frames: list[dict[str, Any]] = []
            while not any(f["type"] == "deliver" for f in frames):
                frames += await text_frames(stream, ws, 1)
            delivered = next(f for f in frames if f["type"] == "deliver")
            ack = {"type": "ack", "ids": [delivered["messages"][0]["id"]]}
            last = {"type": "send", "to": carol, "body": "sent as the client left"}
            close = frame(0x8, (1000).to_bytes(2, "big"))
            await stream.send_all(
                frame(TEXT, orjson.dumps(ack)) + frame(TEXT, orjson.dumps(last)) + close
            )
            _, code = await _until_closed(stream, ws)
    assert code == 1000
    with trio.fail_after(DEADLINE_S):
        await poll_until(
            lambda: not [k for k in keys_under(redis_client, prefix) if f"{{{bob}}}:msg:" in k]
        )
        await poll_until(
            lambda: [k for k in keys_under(redis_client, prefix) if f"{{{carol}}}:msg:" in k] != []
        )
