"""The flooding process of the flood workload: one connection sending as fast as it can.

It goes through the same gates as the pairs (`quiet:*`, then `flood:*`) and
floods only between `flood:start` and the opening of `flood:end`: it arrives
at `flood:end` at once, so the parent opens it when the pairs have finished
their flood round. The flooder speaks raw wsproto over a Trio socket (so it
costs the generator little per frame: many frames per `send_all`), ignores
rate limits, reads every answer (`accepted`, or an `error` such as
`rate_limited`), and reconnects when the relay closes it. Its messages go to
a sink connection in this process, which checks them like a recipient of the
pairs (order, duplicates, loss) and acks them every 50 ms (one ack frame per
interval keeps the sink below any rate limit).
"""

from __future__ import annotations

import collections
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError, RemoteProtocolError

from relay.auth import mint_token

from . import wire
from .checks import Failures, SessionChecker
from .measure import CpuClock
from .procs import Link, WorkerSpec
from .system import parse_cpus

GATES = ("quiet:start", "quiet:end", "flood:start", "flood:end")
BATCH_FRAMES = 64  # flood frames per send_all
READ_BYTES = 64 * 1024
ACK_INTERVAL_S = 0.05
SETTLE_S = 1.0  # after the flood: no delivery for this long, and the sink is done
RECONNECT_PAUSE_S = 0.05


@attrs.define
class FloodStats:
    sent: int = 0  # frames written
    accepted: int = 0
    refused: dict[str, int] = attrs.field(factory=dict)  # error code -> answers
    closes: dict[str, int] = attrs.field(factory=dict)  # close code (or "reset") -> times
    handshakes_refused: int = 0
    connections: int = 0
    rejected: set[int] = attrs.field(factory=set)  # refused sequence numbers: never stored
    unanswered: set[int] = attrs.field(factory=set)  # written, no answer: maybe stored
    started_s: float = 0.0
    stopped_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        wall = self.stopped_s - self.started_s
        return {
            "sent": self.sent,
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "unanswered": len(self.unanswered),
            "closes": dict(self.closes),
            "handshakes_refused": self.handshakes_refused,
            "connections": self.connections,
            "duration_s": round(wall, 3),
            "sent_per_s": round(self.sent / wall, 1) if wall > 0 else None,
            "accepted_per_s": round(self.accepted / wall, 1) if wall > 0 else None,
        }


class Flooder:
    """Floods `send`s to `to` over one raw connection at a time until cancelled."""

    def __init__(self, spec: WorkerSpec, box: str, to: str, stats: FloodStats) -> None:
        url = urllib.parse.urlsplit(spec.url)
        if url.scheme != "ws" or url.hostname is None:
            raise ValueError(f"the flooder speaks plain ws:// only, not {spec.url}")
        self.host, self.port, self.path = url.hostname, url.port or 80, url.path or "/"
        self.secret, self.box, self.to = spec.secret, box, to
        self.body_bytes = spec.options.body_bytes
        self.stats = stats

    async def run(self) -> None:
        while True:
            try:
                await self._connection()
            except* (OSError, trio.BrokenResourceError, ProtocolError):
                self.stats.closes["reset"] = self.stats.closes.get("reset", 0) + 1
            await trio.sleep(RECONNECT_PAUSE_S)

    async def _connection(self) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            token = mint_token(self.secret, self.box, wire.TOKEN_TTL_S, time.time())
            request = Request(
                host=f"{self.host}:{self.port}",
                target=self.path,
                subprotocols=[wire.SUBPROTOCOL],
                extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
            )
            await stream.send_all(ws.send(request))
            if not await self._handshake(stream, ws):
                return
            self.stats.connections += 1
            outstanding: collections.deque[int] = collections.deque()  # unanswered seqs
            pongs: list[bytes] = []
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._answers, stream, ws, outstanding, pongs, nursery)
                    await self._flood(stream, ws, outstanding, pongs)
            finally:
                self.stats.unanswered.update(outstanding)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.SocketStream, ws: WSConnection) -> bool:
        """Up to the welcome; False when the relay refused the handshake."""
        while True:
            data = await stream.receive_some(READ_BYTES)
            if not data:
                raise trio.BrokenResourceError("closed during the handshake")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, RejectConnection):
                    self.stats.handshakes_refused += 1
                    return False
                if isinstance(event, TextMessage):  # the welcome (or a close follows)
                    return True
                if not isinstance(event, AcceptConnection):
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} in handshake")

    async def _flood(
        self,
        stream: trio.SocketStream,
        ws: WSConnection,
        outstanding: collections.deque[int],
        pongs: list[bytes],
    ) -> None:
        stats, size, to = self.stats, self.body_bytes, self.to
        while True:
            chunks = [*pongs]
            pongs.clear()
            for _ in range(BATCH_FRAMES):
                frame = wire.send_frame(to, wire.make_body(stats.sent, 0, size))
                chunks.append(ws.send(TextMessage(data=frame)))
                outstanding.append(stats.sent)
                stats.sent += 1
            await stream.send_all(b"".join(chunks))

    async def _answers(
        self,
        stream: trio.SocketStream,
        ws: WSConnection,
        outstanding: collections.deque[int],
        pongs: list[bytes],
        nursery: trio.Nursery,
    ) -> None:
        stats, text = self.stats, []
        while True:
            data = await stream.receive_some(READ_BYTES)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    text.append(event.data)
                    if not event.message_finished:
                        continue
                    frame = orjson.loads("".join(text))
                    text.clear()
                    kind = frame.get("type")
                    if kind == "accepted" and outstanding:
                        outstanding.popleft()
                        stats.accepted += 1
                    elif kind == "error" and outstanding:
                        stats.rejected.add(outstanding.popleft())
                        code = str(frame.get("code"))
                        stats.refused[code] = stats.refused.get(code, 0) + 1
                elif isinstance(event, Ping):
                    pongs.append(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    stats.closes[str(event.code)] = stats.closes.get(str(event.code), 0) + 1
                    nursery.cancel_scope.cancel()
                    return
            if not data:
                stats.closes["eof"] = stats.closes.get("eof", 0) + 1
                nursery.cancel_scope.cancel()
                return


@attrs.define
class Sink:
    """The flood's recipient: checks what it gets, and acks it in batches."""

    conn: wire.Conn
    checker: SessionChecker
    failures: Failures
    delivered: int = 0
    last_delivery_s: float = 0.0
    to_ack: list[str] = attrs.field(factory=list)
    acks: dict[str, list[str]] = attrs.field(factory=dict)  # ref -> ids not yet acked
    refs: int = 0

    @property
    def idle(self) -> bool:
        return not self.to_ack and not self.acks

    async def read(self) -> None:
        while True:
            frame = orjson.loads(await self.conn.ws.get_message())
            kind = frame.get("type")
            if kind == "deliver":
                now_ms = wire.wall_ms()
                for m in frame["messages"]:
                    seq, _ = wire.parse_body(m["body"])
                    if self.checker.on_deliver(m["id"], seq, m["expires_at"], now_ms):
                        self.delivered += 1
                    self.to_ack.append(m["id"])
                self.last_delivery_s = time.monotonic()
            elif kind == "acked":
                ids = self.acks.pop(frame.get("ref"), [])
                if frame.get("count") != len(ids):
                    self.failures.add(
                        "ack_count", f"flood sink: ack of {len(ids)} deleted {frame.get('count')}"
                    )
                self.checker.on_acked(ids)
            elif kind == "error":
                self.acks.pop(frame.get("ref", ""), None)
                self.failures.add("relay_error", f"flood sink: {frame.get('code')}")
            else:
                self.failures.add("unexpected", f"flood sink got {str(frame)[:120]}")

    async def ack(self) -> None:
        while True:
            await trio.sleep(ACK_INTERVAL_S)
            if self.to_ack:
                self.refs += 1
                ref = f"k{self.refs}"
                self.acks[ref], self.to_ack = self.to_ack, []
                await self.conn.ws.send_message(wire.ack_frame(self.acks[ref], ref))


async def run(spec: WorkerSpec, link: Link) -> dict[str, Any]:
    o = spec.options
    cpus = spec.extra.get("flood_cpu")
    if cpus:
        os.sched_setaffinity(0, parse_cpus(cpus))
    failures = Failures()
    stats = FloodStats()
    sink_box = wire.mailbox(spec.run_id, "k", 0)
    clock = CpuClock()
    async with trio.open_nursery() as connections:
        (conn,) = await wire.connect_many(connections, spec.url, spec.secret, [sink_box])
        sink = Sink(conn, SessionChecker(sink_box, failures), failures)
        for gate in GATES[:-1]:
            await link.gate(gate)
        clock.start()
        stats.started_s = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.read)
            nursery.start_soon(sink.ack)
            flooder = Flooder(spec, wire.mailbox(spec.run_id, "f", 0), sink_box, stats)
            flooding = trio.CancelScope()
            nursery.start_soon(_cancellable, flooding, flooder.run)
            await link.gate("flood:end")  # opened when the pairs are done
            flooding.cancel()
            stats.stopped_s = time.monotonic()
            cpu = clock.stop()
            await _settle(sink, stats, o.stall_s, failures)
            nursery.cancel_scope.cancel()
        sink.checker.finish(stats.sent, stats.rejected | stats.unanswered)
        await wire.close_all([conn])
        connections.cancel_scope.cancel()
    return {
        "failures": failures.to_json(),
        "flood": {**stats.to_json(), "sink_delivered": sink.delivered, "cpu": cpu},
    }


async def _cancellable(scope: trio.CancelScope, task: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await task()


async def _settle(sink: Sink, stats: FloodStats, stall_s: float, failures: Failures) -> None:
    """Wait until the sink has had and acked every accepted flood message, and nothing
    more arrives; a `timeout` failure when that takes longer than `stall_s`."""
    deadline = time.monotonic() + stall_s
    while time.monotonic() < deadline:
        quiet = time.monotonic() - max(sink.last_delivery_s, stats.stopped_s) >= SETTLE_S
        if sink.delivered >= stats.accepted and sink.idle and quiet:
            return
        await trio.sleep(0.05)
    failures.add(
        "timeout",
        f"flood sink: {sink.delivered:,} of {stats.accepted:,} accepted flood messages "
        f"delivered and acked within {stall_s} s of the flood's end",
    )
