"""The sans-IO WebSocket engine (relay.websocket.ServerProtocol) against arbitrary client
bytes split at arbitrary points: frames across reads, many frames per read, fragmented
messages with control frames between fragments, and every kind of violation (reserved
opcodes and bits, unmasked frames, fragmented or long control frames, stray
continuations, oversize messages, invalid UTF-8, bad Close frames).

A small model says what a correct server does with the same frames; the engine's
output is decoded by wsproto's own client side, and must hold the same pongs, the same
echoed messages (this test's app echoes every message) and the right Close frame.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Pong, TextMessage

from relay.websocket import ServerProtocol

LIMIT = 300  # the engine's message limit in these tests
KEY = b"\x37\xfa\x21\x3d"
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
EXAMPLES = int(os.environ.get("RELAY_ENGINE_EXAMPLES", "300"))


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    long_length: bool = False,
) -> bytes:
    """One frame as a client sends it (masked), or broken in the ways asked for."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask = 0x80 if masked else 0
    size = len(payload)
    if size <= 125 and not long_length:
        head += bytes([mask | size])
    elif size <= 0xFFFF:
        head += bytes([mask | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + KEY + bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))


@attrs.frozen
class Expected:
    """What a correct server answers: pongs, echoes, and how it closes (None: still open)."""

    pongs: tuple[bytes, ...]
    messages: tuple[str | bytes, ...]
    close: int | None


@attrs.define
class Script:
    """Client frames and the model's account of them."""

    data: bytearray = attrs.field(factory=bytearray)
    pongs: list[bytes] = attrs.field(factory=list)
    messages: list[str | bytes] = attrs.field(factory=list)
    close: int | None = None

    def expected(self) -> Expected:
        return Expected(tuple(self.pongs), tuple(self.messages), self.close)


def _pieces(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


pings = st.lists(st.binary(max_size=125), max_size=2)
texts = st.text(max_size=60)  # at most 240 bytes of UTF-8: under LIMIT


@st.composite
def message_frames(draw: st.DrawFn, script: Script) -> None:
    """A valid message, maybe fragmented (cut anywhere, even inside a character), with
    pings and pongs between its fragments."""
    binary = draw(st.booleans())
    body: str | bytes = draw(st.binary(max_size=LIMIT)) if binary else draw(texts)
    raw = body if isinstance(body, bytes) else body.encode()
    parts = _pieces(raw, draw(st.lists(st.integers(0, LIMIT), max_size=3))) or [raw]
    for i, part in enumerate(parts):
        opcode = (BINARY if binary else TEXT) if i == 0 else CONTINUATION
        script.data += frame(opcode, part, fin=i == len(parts) - 1)
        if i < len(parts) - 1:
            for payload in draw(pings):
                script.data += frame(PING, payload)
                script.pongs.append(payload)
            if draw(st.booleans()):
                script.data += frame(PONG, b"unsolicited")
    script.messages.append(body)


VIOLATIONS: dict[str, tuple[int, Callable[[], bytes]]] = {
    "reserved opcode": (1002, lambda: frame(0x3, b"x")),
    "reserved control opcode": (1002, lambda: frame(0xB, b"")),
    "reserved bit": (1002, lambda: frame(TEXT, b"x", rsv=0b100)),
    "unmasked": (1002, lambda: frame(TEXT, b"x", masked=False)),
    "fragmented ping": (1002, lambda: frame(PING, b"x", fin=False)),
    "long ping": (1002, lambda: frame(PING, b"p" * 126)),
    "stray continuation": (1002, lambda: frame(CONTINUATION, b"x")),
    "data inside a message": (1002, lambda: frame(TEXT, b"a", fin=False) + frame(TEXT, b"b")),
    "non-minimal length": (1002, lambda: frame(TEXT, b"short", long_length=True)),
    "invalid UTF-8": (1007, lambda: frame(TEXT, b"ok \xff")),
    "surrogate in UTF-8": (1007, lambda: frame(TEXT, b"\xed\xa0\x80")),
    "truncated UTF-8": (1007, lambda: frame(TEXT, b"\xe2\x82", fin=False) + frame(0, b"")),
    "oversize": (1009, lambda: frame(BINARY, b"b" * (LIMIT + 1))),
    "oversize fragmented": (
        1009,
        lambda: frame(TEXT, b"t" * LIMIT, fin=False) + frame(CONTINUATION, b"t"),
    ),
    "close of one byte": (1002, lambda: frame(CLOSE, b"\x03")),
    "close code 999": (1002, lambda: frame(CLOSE, (999).to_bytes(2, "big"))),
    "close code 1005": (1002, lambda: frame(CLOSE, (1005).to_bytes(2, "big"))),
    "close code 2999": (1002, lambda: frame(CLOSE, (2999).to_bytes(2, "big"))),
    "close reason not UTF-8": (1007, lambda: frame(CLOSE, (1000).to_bytes(2, "big") + b"\xff")),
}


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    script = Script()
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["message", "ping", "pong"]))
        if kind == "message":
            draw(message_frames(script))
        elif kind == "ping":
            payload = draw(st.binary(max_size=125))
            script.data += frame(PING, payload)
            script.pongs.append(payload)
        else:
            script.data += frame(PONG, draw(st.binary(max_size=125)))
    ending = draw(st.sampled_from(["open", "close", "empty close", *VIOLATIONS]))
    if ending == "close":
        code = draw(st.sampled_from([1000, 1001, 1003, 1008, 1011, 3000, 4401, 4999]))
        reason = draw(st.text(max_size=20)).encode()  # at most 80 bytes
        script.data += frame(CLOSE, code.to_bytes(2, "big") + reason)
        script.close = code
    elif ending == "empty close":
        script.data += frame(CLOSE, b"")
        script.close = 1005  # no code given; the answer carries none either
    elif ending != "open":
        code, make = VIOLATIONS[ending]
        script.data += make()
        script.close = code
    if ending != "open" and draw(st.booleans()):
        script.data += frame(TEXT, b"after the end: never read")
    return script


@attrs.frozen
class Run:
    received: tuple[str | bytes, ...]  # what the engine handed to the app
    sent: Expected  # what the client decoded of the engine's output
    engine: ServerProtocol


def run_engine(pieces: Sequence[bytes]) -> Run:
    """Feed the pieces one read at a time, echo every message, decode what was sent."""
    engine = ServerProtocol(LIMIT)
    received: list[str | bytes] = []
    for piece in pieces:
        for message in engine.receive(piece):
            received.append(message)
            engine.send(message)
    if engine.ended and not engine.peer_closed:
        engine.close(1000)  # the app closes once reading ended: a violation's code wins
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(engine.output())
    pongs: list[bytes] = []
    messages: list[str | bytes] = []
    parts: list[str | bytes] = []
    close: int | None = None
    for event in client.events():
        assert close is None, f"{event!r} after the Close frame"
        if isinstance(event, Pong):
            pongs.append(bytes(event.payload))
        elif isinstance(event, Message):
            parts.append(event.data if isinstance(event, TextMessage) else bytes(event.data))
            if event.message_finished:
                joined = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)  # type: ignore[arg-type]
                messages.append(joined)
                parts = []
        elif isinstance(event, CloseConnection):
            close = event.code
        else:
            raise AssertionError(f"the server sent {event!r}")
    return Run(tuple(received), Expected(tuple(pongs), tuple(messages), close), engine)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts(), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_engine_answers_as_a_correct_server_whatever_the_reads(
    script: Script, cuts: list[int]
) -> None:
    run = run_engine(_pieces(bytes(script.data), cuts))
    engine, expected = run.engine, script.expected()
    assert run.received == expected.messages
    assert (run.sent.pongs, run.sent.close) == (expected.pongs, expected.close)
    if engine.peer_closed:
        # The answer to a Close goes out at once, and nothing may follow it: messages
        # that came in the same read as the peer's Close get no echo.
        assert expected.messages[: len(run.sent.messages)] == run.sent.messages
    else:
        assert run.sent.messages == expected.messages
    assert engine.ended == (script.close is not None)
    if script.close is not None:
        assert engine.code == script.close
        assert engine.receive(frame(TEXT, b"later")) == []  # nothing is read after the end
        assert engine.output() == b""


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    prefix=scripts(),
    noise=st.binary(min_size=1, max_size=200),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_engine_survives_arbitrary_bytes_and_ends_with_a_proper_close(
    prefix: Script, noise: bytes, cuts: list[int]
) -> None:
    """Garbage after some valid frames: the engine never raises, what it sends is a valid
    server stream, and if the garbage ended the conversation it says so with one Close
    frame, last, with a code a server sends for a violation (or the peer's own)."""
    if prefix.close is not None:
        return  # the garbage would never be read
    run = run_engine(_pieces(bytes(prefix.data) + noise, cuts))
    got, engine = run.sent, run.engine
    assert got.pongs[: len(prefix.pongs)] == tuple(prefix.pongs)
    assert run.received[: len(prefix.messages)] == tuple(prefix.messages)
    if got.close is not None:
        assert engine.ended
        if not engine.peer_closed:
            assert got.close in (1002, 1007, 1009)
        assert got.close == engine.code or (engine.code == 1005 and got.close == 1005)


def test_engine_end_of_stream_without_close_is_1006_and_sends_nothing() -> None:
    engine = ServerProtocol(LIMIT)
    assert engine.receive(frame(TEXT, b"partial", fin=False)) == []
    assert engine.receive(b"") == []
    assert (engine.ended, engine.code, engine.output()) == (True, 1006, b"")


def test_engine_close_handshake_it_starts_waits_for_the_peer() -> None:
    engine = ServerProtocol(LIMIT)
    engine.close(1001, "going away")
    assert engine.closing and not engine.ended
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(engine.output())
    (event,) = client.events()
    assert isinstance(event, CloseConnection) and event.code == 1001
    engine.send("dropped: the Close went out")
    assert engine.output() == b""
    assert engine.receive(frame(TEXT, b"ignored") + frame(PING, b"not answered")) == []
    assert engine.output() == b""
    engine.receive(frame(CLOSE, (1001).to_bytes(2, "big")))
    assert engine.ended and not engine.closing and not engine.peer_closed
    assert engine.code == 1001


def test_engine_frames_of_the_handshake_read_come_first() -> None:
    """Bytes read with the upgrade request are the first frames (WebSocket(received=...))."""
    engine = ServerProtocol(LIMIT)
    both = frame(TEXT, b"one") + frame(BINARY, b"two")
    assert engine.receive(both) == ["one", b"two"]


def test_engine_never_negotiates_or_accepts_compression() -> None:
    """No permessage-deflate: a frame with RSV1 (a compressed one) is a violation."""
    engine = ServerProtocol(LIMIT)
    engine.receive(frame(TEXT, b"\xf2\x48\xcd\xc9\xc9\x07\x00", rsv=0b100))
    assert engine.code == 1002 and engine.failed
    engine.close(1000)
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(engine.output())
    (event,) = client.events()
    assert isinstance(event, CloseConnection) and event.code == 1002


def test_engine_a_text_message_may_be_split_inside_a_character() -> None:
    engine = ServerProtocol(LIMIT)
    euro = "€".encode()
    data = frame(TEXT, euro[:1], fin=False) + frame(CONTINUATION, euro[1:])
    assert [engine.receive(bytes([b])) for b in data][-1] == ["€"]
