"""The calibration server: the relay protocol over bare Trio + wsproto, with no storage.

`python -m relay_bench.echo_server --port P` (the secret in RELAY_JWT_SECRET)
answers what the load generator sends the way a relay would, and does nothing
else: a `send` is answered `accepted` and handed to the recipient's connection
in this process as a `deliver` (nothing is stored; a recipient that is not
connected gets nothing and the sender an `error`), an `ack` with a `ref` is
answered `acked` with the number of ids named. Each connection has one reader
and one writer; the reader parses every frame a read brought, and the writer
sends whatever is pending with one `send_all`, so the server batches as well
as a server can. What it achieves under the bench's load generator is this
machine's ceiling for the protocol over WebSockets: `relay bench calibrate`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any

import attrs
import jwt
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

SUBPROTOCOL = "relay.v1"
READ_BYTES = 64 * 1024
RETENTION_S = 7 * 24 * 3600
MAX_FRAME_BYTES = 1024 * 1024
MAX_INFLIGHT = 256
MAX_BODY_BYTES = 64 * 1024


@attrs.define(eq=False)
class Conn:
    """One WebSocket connection: its wsproto state and the bytes waiting to be written."""

    stream: trio.SocketStream
    ws: WSConnection = attrs.field(factory=lambda: WSConnection(ConnectionType.SERVER))
    mailbox: str = ""
    outbox: bytearray = attrs.field(factory=bytearray)
    waiting: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    closed: bool = False

    def write(self, data: bytes) -> None:
        self.outbox += data
        self.waiting.unpark_all()

    def text(self, payload: dict[str, Any]) -> None:
        self.write(self.ws.send(TextMessage(data=orjson.dumps(payload).decode())))


class EchoServer:
    """Connections by mailbox, and the frames of the relay protocol without storage."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.online: dict[str, Conn] = {}
        self.ids = itertools.count()

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = Conn(stream)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn)
                try:
                    await self._reader(conn)
                finally:
                    self._leave(conn)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    def _leave(self, conn: Conn) -> None:
        """No more deliveries to `conn`; its writer flushes what is pending and ends."""
        if self.online.get(conn.mailbox) is conn:
            del self.online[conn.mailbox]
        conn.closed = True
        conn.waiting.unpark_all()

    async def _writer(self, conn: Conn) -> None:
        while True:
            if not conn.outbox:
                if conn.closed:
                    return
                await conn.waiting.park()
                continue
            data = bytes(conn.outbox)
            conn.outbox.clear()
            await conn.stream.send_all(data)

    async def _reader(self, conn: Conn) -> None:
        text: list[str] = []
        while True:
            data = await conn.stream.receive_some(READ_BYTES)
            try:
                conn.ws.receive_data(data or None)
            except RemoteProtocolError:
                return
            deliveries: dict[str, list[dict[str, Any]]] = {}
            for event in conn.ws.events():
                if isinstance(event, Request):
                    if not self._accept(conn, event):
                        return
                elif isinstance(event, TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        self._frame(conn, "".join(text), deliveries)
                        text.clear()
                elif isinstance(event, Ping):
                    conn.write(conn.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    conn.write(conn.ws.send(event.response()))
                    return
            for mailbox, messages in deliveries.items():
                target = self.online.get(mailbox)
                if target is not None and target.ws.state is ConnectionState.OPEN:
                    target.text({"type": "deliver", "messages": messages})
            if not data:
                return

    def _accept(self, conn: Conn, request: Request) -> bool:
        headers = {name.lower(): value for name, value in request.extra_headers}
        token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
        try:
            mailbox = str(jwt.decode(token, self.secret, algorithms=["HS256"])["sub"])
        except (jwt.InvalidTokenError, KeyError):
            conn.write(conn.ws.send(RejectConnection(status_code=401)))
            return False
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.subprotocols else None
        conn.write(conn.ws.send(AcceptConnection(subprotocol=subprotocol)))
        conn.mailbox = mailbox
        self.online[mailbox] = conn
        conn.text(
            {
                "type": "welcome",
                "mailbox": mailbox,
                "session": f"echo-{next(self.ids)}",
                "retention_s": RETENTION_S,
                "max_body_bytes": MAX_BODY_BYTES,
                "max_frame_bytes": MAX_FRAME_BYTES,
                "max_inflight": MAX_INFLIGHT,
                "server_time": _now_ms(),
                "expired": 0,
                "epoch": "echo",
            }
        )
        return True

    def _frame(self, conn: Conn, raw: str, deliveries: dict[str, list[dict[str, Any]]]) -> None:
        frame = orjson.loads(raw)
        kind = frame.get("type")
        ref = {"ref": frame["ref"]} if "ref" in frame else {}
        if kind == "send":
            to = frame["to"] if isinstance(frame["to"], list) else [frame["to"]]
            offline = [box for box in to if box not in self.online]
            if offline:
                conn.text(
                    {
                        "type": "error",
                        **ref,
                        "code": "storage_unavailable",
                        "message": "echo server: a recipient is not connected (nothing stored)",
                    }
                )
                return
            now = _now_ms()
            expires_at = now + 1000 * int(frame.get("ttl", RETENTION_S))
            ids = {box: str(next(self.ids)) for box in to}
            for box, message_id in ids.items():
                deliveries.setdefault(box, []).append(
                    {
                        "id": message_id,
                        "from": conn.mailbox,
                        "body": frame["body"],
                        "sent_at": now,
                        "expires_at": expires_at,
                    }
                )
            conn.text({"type": "accepted", **ref, "ids": ids, "expires_at": expires_at})
        elif kind == "ack":
            if ref:
                conn.text({"type": "acked", **ref, "count": len(frame.get("ids", []))})
        else:
            conn.text({"type": "error", **ref, "code": "unknown_type", "message": str(kind)})


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def main(host: str, port: int, secret: str) -> None:
    server = EchoServer(secret)
    await trio.serve_tcp(server.serve, port, host=host)


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m relay_bench.echo_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    secret = os.environ.get("RELAY_JWT_SECRET")
    if not secret:
        parser.error("the HS256 secret goes in RELAY_JWT_SECRET")
    trio.run(main, args.host, args.port, secret)


if __name__ == "__main__":
    cli()
