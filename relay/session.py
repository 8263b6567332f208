"""One authenticated WebSocket: inbound frames, outbound delivery and keepalive in one nursery.

Delivery keeps a cursor (the sequence of the last message delivered in this
session) and reads in order from two sources: the envelopes the hub hands over
as they are stored (no extra Redis read when the recipient is online), and the
mailbox in Redis whenever that stream may have a gap (session start, a full
notice buffer, a pub/sub reconnect, the periodic backstop). Anything at or
below the cursor was delivered already and is skipped, so a message is never
repeated within a session. At most `max_inflight` messages are delivered and
unacked; the rest wait in Redis, not here.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from relay import protocol
from relay.codes import CLOSE_REASONS, CloseCode, ErrorCode
from relay.config import Config
from relay.errors import BadFrame, ClientError, RateLimited, RelayError, StorageError
from relay.hub import REPLACED_PREFIX, Hub
from relay.limits import FrameLimiter, Network
from relay.logs import pseudonym
from relay.metrics import Metrics
from relay.store import MailboxStore
from relay.ticker import Ticker

log = logging.getLogger(__name__)

FETCH_PAGE = 100  # messages read from Redis at a time
NOTICE_BUFFER_BYTES = 256 * 1024  # envelopes held for a busy session before falling back to Redis
CLOSE_TIMEOUT_S = 2.0
STORAGE_RETRY_S = 1.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@attrs.define(eq=False)
class Services:
    """What every session of this process shares."""

    config: Config
    store: MailboxStore
    hub: Hub
    limits: protocol.Limits
    metrics: Metrics
    trusted_proxies: tuple[Network, ...] = ()
    ticker: Ticker = attrs.field(factory=Ticker)
    sessions: set[Session] = attrs.field(factory=set)
    connections: Counter[str] = attrs.field(factory=Counter)  # open connections by client address
    draining: bool = False  # shutting down: new sessions are closed with 1001 at once


class Credits:
    """The in-flight window: a counting semaphore that delivery takes from in bulk
    (one frame may carry many messages) and acks give back to."""

    __slots__ = ("_given", "free")

    def __init__(self, total: int) -> None:
        self.free = total
        self._given: trio.Event | None = None  # made only while delivery waits

    async def take(self, most: int) -> int:
        """Wait until at least one slot is free; take up to `most`."""
        while self.free == 0:
            self._given = trio.Event()
            await self._given.wait()
        self._given = None
        taken = min(self.free, most)
        self.free -= taken
        return taken

    def give(self, count: int) -> None:
        if count:
            self.free += count
            if self._given is not None:
                self._given.set()


class Session:
    __slots__ = (
        "__weakref__",
        "_cancel_scope",
        "_close_code",
        "_config",
        "_cursor",
        "_established",
        "_expires",
        "_inflight",
        "_must_read",
        "_next_ping",
        "_next_read",
        "_notice_bytes",
        "_notices",
        "_nursery",
        "_pinging",
        "_services",
        "_token_expires_at_s",
        "_unacked",
        "_wake",
        "id",
        "mailbox",
        "ws",
    )

    def __init__(
        self, ws: WebSocketConnection, mailbox: str, token_expires_at_s: float, services: Services
    ) -> None:
        self.ws = ws
        self.mailbox = mailbox
        self.id = secrets.token_urlsafe(12)
        self._token_expires_at_s = token_expires_at_s
        self._services = services
        self._config = services.config
        self._cursor = 0
        self._inflight = Credits(self._config.max_inflight)
        self._unacked: set[str] = set()
        # (seq, message id, envelope); a list: an empty deque costs 600 bytes
        self._notices: list[tuple[int, str, str]] = []
        self._notice_bytes = 0
        self._must_read = True  # read the mailbox from Redis before trusting notices
        self._wake = trio.Event()
        self._established = False  # saw its own "replaced" notice come back
        self._close_code: CloseCode | None = None
        self._cancel_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._pinging = False
        self._expires = self._next_ping = self._next_read = 0.0  # Trio clock; set at start

    # -- the hub's side ---------------------------------------------------

    def on_message(self, seq: int, message_id: str, envelope: str) -> None:
        if self._notice_bytes + len(envelope) > NOTICE_BUFFER_BYTES:
            self.resync()
            return
        self._notices.append((seq, message_id, envelope))
        self._notice_bytes += len(envelope)
        self._wake.set()

    def on_replaced(self, session_id: str) -> None:
        """Redis orders the notices: one published after ours means a newer session."""
        if session_id == self.id:
            self._established = True
        elif self._established:
            self.close(CloseCode.REPLACED)

    def resync(self) -> None:
        self._notices.clear()
        self._notice_bytes = 0
        self._must_read = True
        self._established = True
        self._wake.set()

    # -- lifecycle --------------------------------------------------------

    def close(self, code: CloseCode) -> None:
        """End the session with `code` (the first code given wins)."""
        if self._close_code is None:
            self._close_code = code
        self._cancel_scope.cancel()

    async def run(self) -> int:
        """Serve the session to its end; return the close code (ours, or the client's)."""
        services = self._services
        services.sessions.add(self)
        if services.draining:
            self.close(CloseCode.GOING_AWAY)
        try:
            with self._cancel_scope:
                await services.hub.subscribe(self.mailbox, self)
                try:
                    await self._serve()
                finally:
                    services.hub.unsubscribe(self.mailbox, self)
        except ConnectionClosed:
            pass
        except StorageError as exc:  # only the start raises it: the session never began
            log.warning("session %s cannot start: %s", pseudonym(self.mailbox), exc.message)
            self._close_code = self._close_code or CloseCode.TRY_AGAIN_LATER
        except RelayError as exc:
            log.warning("session %s ended: %s", pseudonym(self.mailbox), exc)
            self._close_code = self._close_code or CloseCode.GOING_AWAY
        finally:
            services.sessions.discard(self)
            client_closed = self.ws.closed
            with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
                scope.shield = True
                code = self._close_code or CloseCode.NORMAL
                await self.ws.aclose(code, CLOSE_REASONS[code])
        if self._close_code is None and client_closed is not None:
            return client_closed.code
        return code

    async def _serve(self) -> None:
        notice = REPLACED_PREFIX + self.id  # tells older sessions of the mailbox they are replaced
        start = await self._services.store.start_session(self.mailbox, notice)
        self._services.metrics.expired.inc(start.expired)
        await self._send(
            protocol.encode_welcome(
                self.mailbox,
                self.id,
                self._config.retention_s,
                self._config.max_body_bytes,
                self._config.deliver_frame_bytes,
                self._config.max_inflight,
                now_ms(),
                start.expired,
                start.epoch,
            )
        )
        log.debug("session %s started, %d waiting", pseudonym(self.mailbox), start.waiting)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._inbound)
                nursery.start_soon(self._outbound)
                now = trio.current_time()
                self._expires = now + max(self._token_expires_at_s - time.time(), 0.0)
                self._next_ping = now + self._config.ping_interval_s
                self._next_read = now + self._config.backstop_drain_s  # inf: no backstop
                self._services.ticker.at(min(self._next_ping, self._next_read, self._expires), self)
        finally:
            self._nursery = None  # the ticker may still hold this session: start nothing more

    def _loop_ended(self) -> None:
        """When one loop ends (the peer closed, say), the others stop too."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def tick(self, now: float) -> None:
        """The ticker's call: token expiry, the backstop re-read, the keepalive ping."""
        nursery = self._nursery
        if nursery is None or self._close_code is not None or nursery.cancel_scope.cancel_called:
            return
        if now >= self._expires:
            self.close(CloseCode.UNAUTHORIZED)
            return
        config = self._config
        if now >= self._next_read:
            # In case a notice was lost: read the mailbox from Redis.
            self._must_read = True
            self._wake.set()
            self._next_read = now + config.backstop_drain_s
        if now >= self._next_ping:
            self._next_ping = now + config.ping_interval_s
            if not self._pinging:
                self._pinging = True
                nursery.start_soon(self._ping)
        self._services.ticker.at(min(self._next_ping, self._next_read, self._expires), self)

    async def _send(self, text: str) -> None:
        """Send a frame; a client that does not read within the deadline is closed (1008)."""
        with trio.move_on_after(self._config.send_timeout_s) as scope:
            await self.ws.send_message(text)
        if scope.cancelled_caught:
            log.warning("session %s too slow to read; closing", pseudonym(self.mailbox))
            self.close(CloseCode.POLICY)
            await trio.lowlevel.checkpoint()

    # -- the loops --------------------------------------------------------

    async def _inbound(self) -> None:
        try:
            config, metrics = self._config, self._services.metrics
            limiter = FrameLimiter.create(
                config.rate_limit_per_s, config.rate_burst, trio.current_time()
            )
            while True:
                message = await self.ws.get_message()
                frame: protocol.ClientFrame | None = None
                admitted = limiter.admit(trio.current_time())  # every frame counts, good or bad
                if not admitted and limiter.abusive:
                    log.warning(
                        "session %s kept sending over its rate limit; closing",
                        pseudonym(self.mailbox),
                    )
                    self.close(CloseCode.POLICY)
                    return
                try:
                    if isinstance(message, bytes):
                        raise BadFrame("binary frames are reserved for a later protocol version")
                    frame = protocol.parse_frame(message, self._services.limits)
                    if not admitted:
                        raise RateLimited(
                            f"more than {config.rate_limit_per_s:g} frames/s (burst {config.rate_burst})"
                        )
                    await self._handle(frame)
                except ClientError as exc:
                    metrics.rejected.labels(exc.code.value).inc()
                    ref = exc.ref if exc.ref is not None else getattr(frame, "ref", None)
                    await self._send(protocol.encode_error(exc.code, exc.message, ref))
                except ConnectionClosed:
                    raise
                except Exception:
                    # A bug must not end the session, nor reach the client in detail.
                    log.exception("session %s: frame failed", pseudonym(self.mailbox))
                    metrics.rejected.labels(ErrorCode.INTERNAL.value).inc()
                    ref = getattr(frame, "ref", None)
                    await self._send(
                        protocol.encode_error(ErrorCode.INTERNAL, "internal error", ref)
                    )
        except ConnectionClosed:
            pass
        finally:
            self._loop_ended()

    async def _handle(self, frame: protocol.ClientFrame) -> None:
        store = self._services.store
        if isinstance(frame, protocol.SendFrame):
            accepted = await store.send(
                self.mailbox, frame.to, frame.body, frame.ttl_s, frame.ref, now_ms()
            )
            if not accepted.duplicate:
                self._services.metrics.accepted.inc(len(accepted.ids))
            await self._send(
                protocol.encode_accepted(
                    frame.ref, accepted.ids, accepted.expires_at_ms, accepted.duplicate
                )
            )
        elif isinstance(frame, protocol.AckFrame):
            self._services.metrics.ack_frames.inc()
            count = await store.ack(self.mailbox, frame.ids)
            self._services.metrics.acked.inc(count)
            released = 0
            for message_id in frame.ids:
                if message_id in self._unacked:
                    self._unacked.remove(message_id)
                    released += 1
            self._inflight.give(released)
            if frame.ref is not None:
                await self._send(protocol.encode_acked(frame.ref, count))
        else:
            raise BadFrame("already authenticated")

    async def _outbound(self) -> None:
        try:
            while True:
                if not self._must_read and not self._notices:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                wanted = FETCH_PAGE if self._must_read else min(len(self._notices), FETCH_PAGE)
                slots = await self._inflight.take(wanted)
                if self._must_read:
                    self._must_read = False
                    try:
                        batch = await self._services.store.fetch(self.mailbox, self._cursor, slots)
                    except StorageError as exc:
                        log.warning(
                            "session %s: %s; retrying", pseudonym(self.mailbox), exc.message
                        )
                        self._inflight.give(slots)
                        self._must_read = True
                        await trio.sleep(STORAGE_RETRY_S)
                        continue
                    if len(batch) == slots:
                        self._must_read = True  # there may be more
                    deliveries = [(d.seq, d.id, d.envelope) for d in batch]
                else:
                    deliveries = self._take_notices(slots)
                self._inflight.give(slots - len(deliveries))
                if deliveries:
                    self._cursor = deliveries[-1][0]
                    self._unacked.update(message_id for _, message_id, _ in deliveries)
                    self._observe_delivery([seq for seq, _, _ in deliveries])
                    for frame in protocol.encode_delivers(
                        [envelope for _, _, envelope in deliveries],
                        self._config.deliver_frame_bytes,
                    ):
                        await self._send(frame)
        except ConnectionClosed:
            pass
        finally:
            self._loop_ended()

    def _observe_delivery(self, seqs: list[int]) -> None:
        """Sequences are the Redis clock in µs when the message was stored."""
        metrics = self._services.metrics
        metrics.delivered.inc(len(seqs))
        now_us = time.time_ns() // 1000
        for seq in seqs:
            metrics.delivery_latency.observe(max(now_us - seq, 0) / 1e6)

    def _take_notices(self, limit: int) -> list[tuple[int, str, str]]:
        taken: list[tuple[int, str, str]] = []
        used = 0
        for notice in self._notices:
            if len(taken) == limit:
                break
            used += 1
            self._notice_bytes -= len(notice[2])
            if notice[0] > self._cursor and (not taken or notice[0] > taken[-1][0]):
                taken.append(notice)
        del self._notices[:used]
        return taken

    async def _ping(self) -> None:
        """One keepalive ping; a peer that answers none within idle_timeout is closed."""
        try:
            with trio.move_on_after(self._config.idle_timeout_s) as scope:
                await self.ws.ping()
            if scope.cancelled_caught:
                log.info("session %s answered no ping; closing", pseudonym(self.mailbox))
                self.close(CloseCode.NORMAL)
        except ConnectionClosed:
            pass
        finally:
            self._pinging = False
