"""The server's WebSocket engine: wsproto (sans-IO) driven by one reader and one writer.

`ServerProtocol` is sans-IO: bytes in, complete messages out. It answers pings,
assembles fragmented messages (at most `max_message_bytes`, counted as they
arrive, so nothing larger is ever buffered: 1009), leaves UTF-8 validation to
wsproto (1007), and ends reading at the first protocol violation; the Close
frame then carries the violation's code (1002, 1007, 1009), after the answers
to the messages that came before it. Everything to send collects in one buffer.

`WebSocket` drives it over a Trio stream (a `trio.SSLStream` for TLS):
`receive()` reads once and returns every message that read completed,
`send()` only buffers, and `run_writer()` writes whatever is pending at
once, under a per-connection send deadline rather than a cancel scope per
frame (reads and writes with `relay.netio`'s fewer system calls on plain
TCP). `aclose()` does the close handshake within a deadline and closes the
stream.

`read_opening` and `Upgrade` do the HTTP/1.1 side with wsproto's handshake;
plain requests on the port are answered by `relay.web_routes`. No extension
is ever negotiated (no permessage-deflate).
"""

from __future__ import annotations

import math

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from relay.netio import Reader, write_at_once

Message = str | bytes

RECEIVE_BYTES = 64 * 1024
WRITE_BYTES = 256 * 1024  # a write longer than this gets the send deadline per part
MAX_HEAD_BYTES = 16 * 1024
ABNORMAL_CLOSURE = 1006  # no Close frame: the peer hung up (never sent on the wire)
DRAIN_BYTES = 1024 * 1024  # read at most this much of a failed peer's leftovers while closing


class ServerProtocol:
    """One server-side WebSocket conversation, sans-IO (after the upgrade)."""

    __slots__ = (
        "_connection",
        "_max_message_bytes",
        "_output",
        "_output_bytes",
        "_parts",
        "_size",
        "code",
        "failed",
        "peer_closed",
        "pongs",
        "reason",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self._connection = Connection(ConnectionType.SERVER)
        self._max_message_bytes = max_message_bytes
        self._output: list[bytes] = []
        self._output_bytes = 0
        self._parts: list[Message] = []  # fragments of the message being received
        self._size = 0  # its bytes so far
        self.code: int | None = None  # set once nothing more will be read; see `ended`
        self.reason = ""
        self.peer_closed = False  # the peer sent Close first
        self.failed = False  # a protocol violation (or a message too large) ended reading
        self.pongs = 0

    @property
    def open(self) -> bool:
        """Whether messages may still be sent."""
        return self._connection.state is ConnectionState.OPEN

    @property
    def ended(self) -> bool:
        """Nothing more will be read: the peer closed, failed, hung up, or answered our Close."""
        return self.code is not None

    @property
    def closing(self) -> bool:
        """We sent Close and wait for the peer's."""
        return self._connection.state is ConnectionState.LOCAL_CLOSING and not self.ended

    @property
    def output_bytes(self) -> int:
        return self._output_bytes

    def output(self) -> bytes:
        """Everything to send, once."""
        data = b"".join(self._output)
        self._output.clear()
        self._output_bytes = 0
        return data

    def _emit(self, data: bytes) -> None:
        self._output.append(data)
        self._output_bytes += len(data)

    def send(self, message: Message) -> None:
        """Queue one message; dropped once the conversation is closing (nothing can carry it)."""
        if self._connection.state is ConnectionState.OPEN:
            event = TextMessage(message) if isinstance(message, str) else BytesMessage(message)
            self._emit(self._connection.send(event))

    def ping(self, payload: bytes) -> None:
        if self._connection.state is ConnectionState.OPEN:
            self._emit(self._connection.send(Ping(payload)))

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake (a no-op once it has started). After a violation
        the Close carries the violation's code, whatever `code` says."""
        if self.failed:
            code, reason = self.code or 1002, self.reason
        if self._connection.state is ConnectionState.OPEN:
            self._emit(self._connection.send(CloseConnection(code, reason)))

    def receive(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes read (b"" at end of stream); return the messages they completed."""
        if self.ended:
            return []
        if not data:
            self._connection.receive_data(None)
            self._end(ABNORMAL_CLOSURE, "connection lost")
            return []
        self._connection.receive_data(bytes(data))
        messages: list[Message] = []
        for event in self._connection.events():
            if isinstance(event, TextMessage | BytesMessage):
                if self._connection.state is ConnectionState.OPEN:
                    message = self._assemble(event)
                    if message is not None:
                        messages.append(message)
                    elif self.ended:
                        break
            elif isinstance(event, Ping):
                if self._connection.state is ConnectionState.OPEN:
                    self._emit(self._connection.send(event.response()))
            elif isinstance(event, Pong):
                self.pongs += 1
            elif isinstance(event, CloseConnection):
                self._on_close(event)
                break
        return messages

    def _assemble(self, event: TextMessage | BytesMessage) -> Message | None:
        data: Message = event.data if isinstance(event.data, str) else bytes(event.data)
        size = len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode())
        self._size += size
        if self._size > self._max_message_bytes:
            self._fail(1009, "message too large")
            return None
        if event.message_finished:
            self._size = 0
            if not self._parts:
                return data
            self._parts.append(data)
            parts, self._parts = self._parts, []
            if isinstance(data, str):
                return "".join(parts)  # type: ignore[arg-type]  # text fragments are str
            return b"".join(parts)  # type: ignore[arg-type]  # binary fragments are bytes
        self._parts.append(data)
        return None

    def _on_close(self, event: CloseConnection) -> None:
        state = self._connection.state
        if state is ConnectionState.REMOTE_CLOSING:  # the peer closes: answer with its code
            self.peer_closed = True
            self._emit(self._connection.send(event.response()))
            self._end(event.code, event.reason or "")
        elif state is ConnectionState.CLOSED:  # the peer answered our Close
            self._end(event.code, event.reason or "")
        elif state is ConnectionState.OPEN:  # wsproto's parser failed: a protocol violation
            self._fail(event.code, event.reason or "protocol error")
        else:  # a violation while we wait for the peer's Close: nothing more to read
            self._end(event.code, event.reason or "")

    def _fail(self, code: int, reason: str) -> None:
        """Nothing more is read; the Close (with this code) waits for `close()`, so the
        answers to earlier messages can go first."""
        self.failed = True
        self._end(code, reason)

    def _end(self, code: int, reason: str) -> None:
        self._parts.clear()
        self.code = code
        self.reason = reason


class WebSocket:
    """A `ServerProtocol` over a Trio stream: one reader (whoever calls `receive`) and one
    writer (`run_writer`, or `flush` while no writer runs)."""

    __slots__ = (
        "_deadline",
        "_drained",
        "_finishing",
        "_pending",
        "_reader",
        "_ready",
        "_send_timeout_s",
        "_stream",
        "broken",
        "last_read_bytes",
        "protocol",
        "stuck",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message_bytes: int,
        send_timeout_s: float,
        received: bytes = b"",
    ) -> None:
        self._stream = stream
        self._reader = Reader(stream, RECEIVE_BYTES)
        self.protocol = ServerProtocol(max_message_bytes)
        self._send_timeout_s = send_timeout_s
        self._ready = trio.lowlevel.ParkingLot()  # the writer waits here for output
        self._drained = trio.lowlevel.ParkingLot()  # producers wait here for the writer
        self._deadline = trio.CancelScope()  # the writer's; its deadline is set per write
        self._finishing = False  # the writer ends once the queue is empty
        self.stuck = False  # one write outlasted the send deadline
        self.broken = False  # the stream failed, or a write was interrupted
        self.last_read_bytes = len(received)  # what the latest read from the stream brought
        # Frames that came with the handshake's bytes wait for the first receive().
        self._pending = self.protocol.receive(received) if received else []

    # -- reading ----------------------------------------------------------

    async def receive(self) -> list[Message]:
        """The messages of one read (maybe none: a read of control frames or a partial
        frame). Once `protocol.ended`, returns [] at once."""
        if self._pending:
            messages, self._pending = self._pending, []
            return messages
        protocol = self.protocol
        if protocol.ended:
            return []
        try:
            data = await self._reader.read()
        except trio.BrokenResourceError:
            self.broken = True
            data = b""
        self.last_read_bytes = len(data)
        messages = protocol.receive(data)
        if protocol.output_bytes:
            self._ready.unpark()
        return messages

    def unread(self, messages: list[Message]) -> None:
        """Give messages back: the next `receive()` returns them first."""
        self._pending = messages + self._pending

    # -- writing ----------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message for the writer."""
        self.protocol.send(message)
        self._ready.unpark()

    def ping(self, payload: bytes) -> None:
        self.protocol.ping(payload)
        self._ready.unpark()

    @property
    def backlog_bytes(self) -> int:
        """Bytes queued and not yet handed to the stream."""
        return self.protocol.output_bytes

    async def wait_backlog_below(self, limit: int) -> None:
        """Wait until the writer has taken the queue below `limit` bytes."""
        while self.protocol.output_bytes >= limit and not self.broken and not self.stuck:
            await self._drained.park()

    async def run_writer(self) -> None:
        """Write what is queued, all of it with one `send_all` each time, until
        `finish_writing()` and an empty queue. Returns early when a write outlasts the
        send deadline (`stuck`) or fails."""
        protocol, stream = self.protocol, self._stream
        with self._deadline:
            while True:
                while not protocol.output_bytes:
                    if self._finishing:
                        return
                    await self._ready.park()
                data = memoryview(protocol.output())
                try:
                    written = write_at_once(stream, data)
                    # The deadline is for progress: a large batch goes in parts, each
                    # with the whole send timeout, so a client reading steadily is fine.
                    for start in range(written, len(data), WRITE_BYTES):
                        self._deadline.deadline = trio.current_time() + self._send_timeout_s
                        await stream.send_all(data[start : start + WRITE_BYTES])
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.broken = True
                    return
                except trio.Cancelled:
                    self.broken = True  # part of a frame may be out: nothing can follow it
                    raise
                finally:
                    self._drained.unpark_all()
                self._deadline.deadline = math.inf
        self.stuck = True  # only the send deadline ends the loop this way

    def finish_writing(self) -> None:
        """Let the writer end once it has written what is queued (a write is never cut
        short: anything after it, such as a Close frame, could not follow)."""
        self._finishing = True
        self._ready.unpark()

    async def flush(self) -> None:
        """Write what is queued now (while no writer task runs)."""
        if self.broken or not self.protocol.output_bytes:
            return
        try:
            await self._stream.send_all(self.protocol.output())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
        except trio.Cancelled:
            self.broken = True  # part of a frame may be written: nothing more can follow
            raise

    # -- closing ----------------------------------------------------------

    async def aclose(self, code: int, reason: str, timeout_s: float) -> None:
        """The close handshake, bounded by `timeout_s`, then the stream is closed."""
        protocol = self.protocol
        with trio.move_on_after(timeout_s) as scope:
            scope.shield = True
            try:
                if not self.broken:
                    protocol.close(code, reason)
                    await self.flush()
                    if protocol.closing:
                        await self._await_peer_close()
                    elif protocol.failed:
                        await self._drain()
            finally:
                await self._stream.aclose()

    async def _await_peer_close(self) -> None:
        """Read (and drop messages) until the peer answers our Close or hangs up."""
        while self.protocol.closing and not self.broken:
            await self.receive()

    async def _drain(self) -> None:
        """After a violation the parser is gone: say we are done writing and read until the
        peer hangs up, so it gets our Close frame rather than a reset."""
        if not isinstance(self._stream, trio.abc.HalfCloseableStream):
            return
        try:
            await self._stream.send_eof()
            left = DRAIN_BYTES
            while left > 0 and (data := await self._stream.receive_some(RECEIVE_BYTES)):
                left -= len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


# -- the opening handshake --------------------------------------------------------


class HeadTooLarge(Exception):
    pass


async def read_opening(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """The request head (up to and including its blank line) and the bytes read after it;
    a head that ends early when the peer hung up. Raises HeadTooLarge past MAX_HEAD_BYTES."""
    data = bytearray()
    start = 0
    while (end := data.find(b"\r\n\r\n", start)) < 0:
        if len(data) > MAX_HEAD_BYTES:
            raise HeadTooLarge
        start = max(len(data) - 3, 0)
        chunk = await stream.receive_some(RECEIVE_BYTES)
        if not chunk:
            return bytes(data), b""
        data += chunk
    if end > MAX_HEAD_BYTES:
        raise HeadTooLarge
    return bytes(data[: end + 4]), bytes(data[end + 4 :])


class BadUpgrade(Exception):
    """An upgrade request wsproto refuses; `response` is the HTTP answer to send."""

    def __init__(self, response: bytes) -> None:
        self.response = response


class Upgrade:
    """A WebSocket upgrade request that wsproto's handshake found well-formed."""

    __slots__ = ("_handshake", "_request", "received")

    def __init__(self, handshake: H11Handshake, request: Request, received: bytes) -> None:
        self._handshake: H11Handshake | None = handshake  # until the answer: then let go
        self._request = request
        self.received = received  # bytes after the head: the client's first frames

    @classmethod
    def parse(cls, head: bytes, received: bytes) -> Upgrade:
        """Raises BadUpgrade with the response wsproto chose (400, or 426 for a version)."""
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.receive_data(head)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            headers = list(hint.headers) if isinstance(hint, RejectConnection) else []
            raise BadUpgrade(
                _refusal(handshake, status, str(exc).encode() + b"\n", headers)
            ) from None
        for event in handshake.events():
            if isinstance(event, Request):
                return cls(handshake, event, received)
        raise BadUpgrade(_refusal(handshake, 400, b"incomplete upgrade request\n"))

    @property
    def path(self) -> str:
        return self._request.target

    @property
    def subprotocols(self) -> list[str]:
        return list(self._request.subprotocols)

    def header(self, name: bytes) -> str | None:
        """The first value of a header (`name` in lower case), as latin-1 text."""
        for key, value in self._request.extra_headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def accept(self, subprotocol: str | None) -> bytes:
        """The 101 response; no extensions. Once only: the HTTP side is dropped (an idle
        connection should not carry it)."""
        handshake, self._handshake = self._handshake, None
        assert handshake is not None, "answered twice"
        return handshake.send(AcceptConnection(subprotocol=subprotocol))

    def refuse(self, status: int, body: bytes) -> bytes:
        """An HTTP refusal; the connection is closed after it."""
        handshake, self._handshake = self._handshake, None
        assert handshake is not None, "answered twice"
        return _refusal(handshake, status, body)


def _refusal(
    handshake: H11Handshake,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    all_headers = [
        *(headers or []),
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
    ]
    try:
        return handshake.send(
            RejectConnection(status_code=status, headers=all_headers, has_body=True)
        ) + handshake.send(RejectData(data=body, body_finished=True))
    except (LocalProtocolError, h11.LocalProtocolError):  # h11 could not parse the request
        return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
