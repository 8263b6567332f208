"""One Redis connection on a Trio stream: hiredis packs commands and parses replies.

redis-py has no Trio client, and driving its blocking client from worker
threads costs a thread hop per batch and, under load, GIL hand-offs between the
pump thread and the Trio thread that cost milliseconds (measured in
bench/results/; see the note in design.md). So the relay talks RESP on a Trio
socket itself, with the two pieces of redis-py's own stack that matter for
speed: `hiredis.pack_command` and `hiredis.Reader`. redis-py still parses the
URL and supplies the exception classes; the synchronous redis-py client stays
for the admin paths (startup checks, `relay audit`).
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import trio
from redis.connection import parse_url

from relay.netio import Reader, write_at_once

RECEIVE_BYTES = 256 * 1024


class ConnectionLost(Exception):
    """The connection broke or timed out; replies still owed will never come."""


def pack(command: Sequence[Any]) -> bytes:
    """One command in RESP, as hiredis packs it (its stub types a 1-tuple by mistake)."""
    packed: bytes = hiredis.pack_command(tuple(command))
    return packed


def error_class(message: str) -> type[redis.ResponseError]:
    """The redis-py class of an error reply, as redis-py itself would raise it."""
    if message.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError
    if message.startswith(("NOPERM", "NOAUTH", "WRONGPASS")):
        return redis.exceptions.AuthenticationError  # type: ignore[return-value]
    return redis.ResponseError


def _reply_error(message: str) -> redis.ResponseError:
    if message.startswith("ERR "):
        message = message[4:]  # as redis-py does
    return error_class(message)(message)


class RedisConnection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._reader = Reader(stream, RECEIVE_BYTES)
        self._parser = hiredis.Reader(
            encoding="utf-8",
            errors="replace",  # the relay writes only UTF-8; anything else is not ours
            replyError=_reply_error,
            protocolError=redis.InvalidResponse,
        )

    @classmethod
    async def open(cls, url: str, *, client_name: str = "relay") -> RedisConnection:
        """Connect to a `redis://`, `rediss://` or `unix://` URL and log in."""
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        stream: trio.abc.Stream
        if "path" in options:
            stream = await trio.open_unix_socket(options["path"])
        else:
            host, port = options.get("host", "localhost"), int(options.get("port", 6379))
            tcp = await trio.open_tcp_stream(host, port)
            stream = tcp
            if url.startswith("rediss://"):
                stream = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=host)
        connection = cls(stream)
        try:
            hello: list[tuple[Any, ...]] = []
            if options.get("password"):
                hello.append(("AUTH", options.get("username") or "default", options["password"]))
            if options.get("db"):
                hello.append(("SELECT", options["db"]))
            hello.append(("CLIENT", "SETNAME", client_name))
            for reply in await connection.execute(hello):
                if isinstance(reply, Exception):
                    raise reply
        except BaseException:
            await connection.aclose()
            raise
        return connection

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send the commands as one write and return their replies (errors as values)."""
        packed = b"".join(pack(c) for c in commands)
        return await self.execute_packed(packed, len(commands))

    async def execute_packed(self, packed: bytes, count: int) -> list[Any]:
        """Send `count` commands packed by hiredis.pack_command; return their replies."""
        await self.send(packed)
        return [await self.reply() for _ in range(count)]

    async def send(self, data: bytes) -> None:
        try:
            written = write_at_once(self._stream, data)
            if written < len(data):
                await self._stream.send_all(memoryview(data)[written:])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"write failed: {exc}") from None

    async def reply(self) -> Any:
        """The next reply (an error reply is returned as its exception)."""
        while (reply := self._parser.gets()) is False:
            try:
                data = await self._reader.read()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionLost(f"read failed: {exc}") from None
            if not data:
                raise ConnectionLost("Redis closed the connection")
            self._parser.feed(data)  # type: ignore[arg-type]  # a bytearray from SSL is fine
        return reply

    def buffered_reply(self) -> Any:
        """The next reply if it has been read already, else False (no I/O)."""
        return self._parser.gets()

    def looks_closed(self) -> bool:
        """Whether an idle connection has become readable: then it holds an EOF (a
        Redis restart, a proxy's idle timeout) or garbage, and must not be used."""
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if not isinstance(stream, trio.SocketStream):
            return False
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
