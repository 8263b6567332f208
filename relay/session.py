"""One authenticated WebSocket: frames handled a batch at a time, delivery, keepalive.

Reading. One task reads the connection, and the frames of one read are a
batch. Its sends go to the store together (one store call and one task for
all of them, handed to the Redis pump in request order, so they share a
pipeline and sends to one mailbox one script run) and the task reads on while
they are stored: a client with many sends in flight is not served one Redis
round trip at a time. The batch's acks without a `ref` are
merged into one store call. Answers go out in request order, whatever order
Redis finished in. A connection above its frame budget is not read until the
budget refills (limits.FrameBudget, protocol.md "Rate limits").

Writing. Everything a batch answers, and everything delivery produced
meanwhile, is queued in the WebSocket and written by its one writer with one
`send_all`. Keepalive pings, the backstop re-read and token expiry come from
the process's ticker: no task per timer.

Delivery keeps a cursor (the sequence of the last message delivered in this
session) and reads in order from two sources: the envelopes the hub hands over
as they are stored (no extra Redis read when the recipient is online), and the
mailbox in Redis whenever that stream may have a gap (session start, a full
notice buffer, a pub/sub reconnect, the periodic backstop). Anything at or
below the cursor was delivered already and is skipped, so a message is never
repeated within a session. At most `max_inflight` messages are delivered and
unacked; the rest wait in Redis, not here. One `deliver` frame carries every
message ready, up to `max_frame_bytes`. The notices of one read from Redis are
delivered from the hub's task; a delivery task runs only while something
holds delivery back (a mailbox read, a full window, a full output buffer).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import Counter, deque
from collections.abc import Sequence

import attrs
import trio

from relay import protocol
from relay.codes import CLOSE_REASONS, CloseCode, ErrorCode
from relay.config import Config
from relay.errors import BadFrame, ClientError, RateLimited, RelayError, StorageError
from relay.hub import REPLACED_PREFIX, Hub
from relay.limits import FrameBudget, Network
from relay.logs import pseudonym
from relay.metrics import Metrics
from relay.store import Accepted, MailboxStore, SendRequest
from relay.ticker import Ticker
from relay.websocket import Message, WebSocket

log = logging.getLogger(__name__)

FETCH_PAGE = 256  # messages read from Redis at most at a time (the default window)
FIRST_PAGE = 32  # at most in a session's first read
NOTICE_BUFFER_BYTES = 256 * 1024  # envelopes held for a busy session before falling back to Redis
CLOSE_TIMEOUT_S = 2.0
STORAGE_RETRY_S = 1.0
OUTPUT_HIGH_WATER = 1024 * 1024  # queued output above which reading and delivery wait
MIN_PAUSE_S = 0.01  # a connection held back sleeps at least this long: fewer wake-ups
PING_PAYLOAD = b"relay"


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
        return self.take_now(most)

    def take_now(self, most: int) -> int:
        """Take up to `most` of the free slots, without waiting (maybe none)."""
        taken = min(self.free, most)
        self.free -= taken
        return taken

    def give(self, count: int) -> None:
        if count:
            self.free += count
            if self._given is not None:
                self._given.set()


class _Slot:
    """One answer's place in request order; `text` stays None until the answer is known."""

    __slots__ = ("text",)

    def __init__(self, text: str | None = None) -> None:
        self.text = text


class Session:
    __slots__ = (
        "__weakref__",
        "_answers",
        "_cancel_scope",
        "_close_code",
        "_config",
        "_cursor",
        "_delivering",
        "_delivery_scope",
        "_established",
        "_expires",
        "_inflight",
        "_must_read",
        "_next_ping",
        "_next_read",
        "_notice_bytes",
        "_notices",
        "_nursery",
        "_ping_deadline",
        "_pongs_at_ping",
        "_requests_done",
        "_requests_in_flight",
        "_sends",
        "_services",
        "_serving",
        "_token_expires_at_s",
        "_turn",
        "_turns",
        "_unacked",
        "id",
        "mailbox",
        "ws",
    )

    def __init__(
        self, ws: WebSocket, mailbox: str, token_expires_at_s: float, services: Services
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
        self._delivering = False  # the delivery task runs (only while there is work)
        self._delivery_scope: trio.CancelScope | None = None
        self._established = False  # saw its own "replaced" notice come back
        self._close_code: CloseCode | None = None
        self._cancel_scope = trio.CancelScope()  # around subscribing, starting and reading
        self._nursery: trio.Nursery | None = None  # the writer, delivery, store calls
        self._serving = False  # welcomed, and still reading
        self._requests_in_flight = 0
        self._requests_done: trio.Event | None = None  # made while the end waits for them
        self._answers: deque[_Slot] | None = None  # made by the first answer that must wait
        self._sends = 0  # sends started, each numbered: its turn to reach the store
        self._turn = 0  # the number of the next send to hand to the store
        self._turns: dict[int, trio.Event] = {}  # sends that ran before their turn wait here
        self._ping_deadline: float | None = None  # a ping is unanswered until then
        self._pongs_at_ping = 0
        self._expires = self._next_ping = self._next_read = 0.0  # Trio clock; set at start

    # -- the hub's side ---------------------------------------------------

    def on_message(self, seq: int, message_id: str, envelope: str) -> None:
        if self._notice_bytes + len(envelope) > NOTICE_BUFFER_BYTES:
            self.resync()
            return
        self._notices.append((seq, message_id, envelope))
        self._notice_bytes += len(envelope)

    def notices_arrived(self) -> None:
        """Deliver the notices now, from the hub's task, unless the delivery task runs or
        something holds delivery back (a mailbox read due, a full window, a full
        output buffer): then the delivery task waits for it. No task per message."""
        if self._delivering or not self._serving:
            return
        if not self._must_read and self.ws.backlog_bytes < OUTPUT_HIGH_WATER:
            slots = self._inflight.take_now(min(len(self._notices), FETCH_PAGE))
            deliveries = self._take_notices(slots)
            self._inflight.give(slots - len(deliveries))
            self._send_deliveries(deliveries)
        if self._must_read or self._notices:
            self._deliver_soon()

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
        self._deliver_soon()

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
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                try:
                    with self._cancel_scope:
                        await self._serve_subscribed()
                    self._stop_serving()
                    # Let what the client asked for finish (a store call ends within the
                    # Redis timeout), even when the client has closed: an ack sent just
                    # before its Close must still delete. While the client reads, the
                    # answers reach it too.
                    finished = False
                    with trio.move_on_after(self._config.redis_timeout_s):
                        await self._requests_finished()
                        finished = True
                    if not finished:
                        nursery.cancel_scope.cancel()
                finally:
                    self._stop_serving()
                    self.ws.finish_writing()  # never cut a write short: the Close follows
        finally:
            services.sessions.discard(self)
            code = self._close_code or CloseCode.NORMAL
            await self.ws.aclose(code, CLOSE_REASONS[code], CLOSE_TIMEOUT_S)
        peer_code = self.ws.protocol.code
        if self._close_code is None and peer_code is not None:
            return peer_code
        return code

    async def _requests_finished(self) -> None:
        while self._requests_in_flight:
            self._requests_done = trio.Event()
            await self._requests_done.wait()

    def _request_ended(self) -> None:
        self._requests_in_flight -= 1
        if self._requests_done is not None and not self._requests_in_flight:
            self._requests_done.set()

    async def _serve_subscribed(self) -> None:
        services = self._services
        try:
            await services.hub.subscribe(self.mailbox, self)
            try:
                await self._serve()
            finally:
                services.hub.unsubscribe(self.mailbox, self)
        except StorageError as exc:  # only the start raises it: the session never began
            log.warning("session %s cannot start: %s", pseudonym(self.mailbox), exc.message)
            self._close_code = self._close_code or CloseCode.TRY_AGAIN_LATER
        except RelayError as exc:
            log.warning("session %s ended: %s", pseudonym(self.mailbox), exc)
            self._close_code = self._close_code or CloseCode.GOING_AWAY

    async def _serve(self) -> None:
        notice = REPLACED_PREFIX + self.id  # tells older sessions of the mailbox they are replaced
        start = await self._services.store.start_session(self.mailbox, notice)
        self._services.metrics.expired.inc(start.expired)
        self.ws.send(
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
        now = trio.current_time()
        self._expires = now + max(self._token_expires_at_s - time.time(), 0.0)
        self._next_ping = now + self._config.ping_interval_s
        self._next_read = now + self._config.backstop_drain_s  # inf: no backstop
        self._services.ticker.at(min(self._next_ping, self._next_read, self._expires), self)
        self._serving = True
        self._deliver_soon()
        await self._read()

    def _stop_serving(self) -> None:
        """Reading ended: no more delivery (the ticker may still hold this session)."""
        self._serving = False
        if self._delivery_scope is not None:
            self._delivery_scope.cancel()

    def _deliver_soon(self) -> None:
        """Start the delivery task unless it runs: it ends once nothing is left to deliver,
        so an idle session holds no task for it."""
        if not self._delivering and self._serving:
            assert self._nursery is not None  # set while serving
            self._delivering = True
            scope = self._delivery_scope = trio.CancelScope()  # cancelled when reading ends
            self._nursery.start_soon(self._deliver, scope)

    def tick(self, now: float) -> None:
        """The ticker's call: token expiry, the backstop re-read, the keepalive ping."""
        if not self._serving or self._close_code is not None:
            return
        if now >= self._expires:
            self.close(CloseCode.UNAUTHORIZED)
            return
        config = self._config
        if now >= self._next_read:
            # In case a notice was lost: read the mailbox from Redis.
            self._must_read = True
            self._deliver_soon()
            self._next_read = now + config.backstop_drain_s
        if self._ping_deadline is not None:
            if self.ws.protocol.pongs > self._pongs_at_ping:
                self._ping_deadline = None
            elif now >= self._ping_deadline:
                log.info("session %s answered no ping; closing", pseudonym(self.mailbox))
                self.close(CloseCode.NORMAL)
                return
        if now >= self._next_ping:
            self._next_ping = now + config.ping_interval_s
            if self._ping_deadline is None:
                self._pongs_at_ping = self.ws.protocol.pongs
                self._ping_deadline = now + config.idle_timeout_s
                self.ws.ping(PING_PAYLOAD)
        when = min(self._next_ping, self._next_read, self._expires)
        if self._ping_deadline is not None:
            when = min(when, self._ping_deadline)
        self._services.ticker.at(when, self)

    # -- answers, in request order ------------------------------------------

    def _answer(self, text: str) -> None:
        """An answer known at once: written now, unless an earlier one is still pending."""
        if self._answers:
            self._answers.append(_Slot(text))
        else:
            self.ws.send(text)

    def _reserve(self) -> _Slot:
        """A place for an answer that comes later."""
        if self._answers is None:
            self._answers = deque()
        slot = _Slot()
        self._answers.append(slot)
        return slot

    def _fill(self, slot: _Slot, text: str) -> None:
        """Give a reserved place its answer ("" for none); write what is now in order."""
        slot.text = text
        answers = self._answers
        assert answers is not None  # reserved places live there
        while answers and (done := answers[0].text) is not None:
            answers.popleft()
            if done:
                self.ws.send(done)

    def _reject(self, exc: ClientError, ref: str | None) -> None:
        self._services.metrics.rejected.labels(exc.code.value).inc()
        self._answer(protocol.encode_error(exc.code, exc.message, ref))

    # -- the loops --------------------------------------------------------

    async def _writer(self) -> None:
        await self.ws.run_writer()
        if self.ws.stuck:
            log.warning("session %s too slow to read; closing", pseudonym(self.mailbox))
            self.close(CloseCode.POLICY)
        elif self.ws.broken:
            self._cancel_scope.cancel()  # the peer is gone: stop reading

    async def _read(self) -> None:
        """The session's one reader: until the peer closes, or the session is closed."""
        config, ws = self._config, self.ws
        budget = FrameBudget.create(config.rate_limit_per_s, config.rate_burst, trio.current_time())
        while not ws.protocol.ended and not ws.broken:
            if ws.backlog_bytes >= OUTPUT_HIGH_WATER:
                await ws.wait_backlog_below(OUTPUT_HIGH_WATER)
            messages = await ws.receive()
            if messages and not await self._handle_batch(messages, budget):
                return

    async def _handle_batch(self, messages: list[Message], budget: FrameBudget) -> bool:
        """Handle the frames of one read; False when the session must end (abuse)."""
        now = trio.current_time()
        held_back = False
        sends: list[tuple[protocol.SendFrame, _Slot]] = []
        acks: list[tuple[protocol.AckFrame, int, _Slot | None]] = []
        for index, message in enumerate(messages):
            frame, error = self._parse(message)
            released = self._release(frame.ids) if isinstance(frame, protocol.AckFrame) else 0
            # An ack of messages delivered in this session is free: there are never more
            # of those than deliveries, and a draining recipient must not be held back.
            wait = 0.0 if released else budget.admit(now)
            if 0 < wait < math.inf:
                self._services.metrics.frames_delayed.inc()
            while 0 < wait < math.inf:
                held_back = True
                self._start_sends(sends)  # what was admitted need not wait
                self._start_acks(acks)
                sends, acks = [], []
                await trio.sleep(max(wait, MIN_PAUSE_S))
                now = trio.current_time()
                if budget.abusive(now):
                    self._abusive("kept the relay's buffers full", messages[index:])
                    return False
                wait = budget.admit(now)
            if wait == math.inf:
                if budget.abusive(now):
                    self._abusive("kept sending over its rate limit", [])
                    return False
                if error is None:
                    error = self._rate_limited()
            ref = getattr(frame, "ref", None)
            if error is not None:
                self._reject(error, error.ref if error.ref is not None else ref)
            elif isinstance(frame, protocol.SendFrame):
                sends.append((frame, self._reserve()))
            elif isinstance(frame, protocol.AckFrame):
                acks.append((frame, released, None if ref is None else self._reserve()))
            else:
                self._reject(BadFrame("already authenticated"), ref)
        self._start_sends(sends)
        self._start_acks(acks)
        budget.read_done(held_back, self.ws.last_read_bytes)
        return True

    def _parse(self, message: Message) -> tuple[protocol.ClientFrame | None, ClientError | None]:
        if isinstance(message, bytes):
            return None, BadFrame("binary frames are reserved for a later protocol version")
        try:
            return protocol.parse_frame(message, self._services.limits), None
        except ClientError as exc:
            return None, exc

    def _rate_limited(self) -> RateLimited:
        config = self._config
        return RateLimited(
            f"more than {config.rate_limit_per_s:g} frames/s (burst {config.rate_burst})"
        )

    def _abusive(self, why: str, unread: list[Message]) -> None:
        """Refuse the frames held back, and end the session with 1008."""
        log.warning("session %s %s; closing", pseudonym(self.mailbox), why)
        for message in unread:
            frame, error = self._parse(message)
            ref = error.ref if error is not None else getattr(frame, "ref", None)
            self._reject(self._rate_limited(), ref)
        self.close(CloseCode.POLICY)

    def _release(self, ids: tuple[str, ...]) -> int:
        """Forget these ids as delivered-and-unacked; how many were."""
        released = 0
        for message_id in ids:
            if message_id in self._unacked:
                self._unacked.remove(message_id)
                released += 1
        return released

    def _start_sends(self, sends: list[tuple[protocol.SendFrame, _Slot]]) -> None:
        """One store call, in one task, for the sends of one read."""
        if not sends:
            return
        assert self._nursery is not None  # set for the whole session
        self._requests_in_flight += 1
        self._nursery.start_soon(self._store_sends, sends, self._sends)
        self._sends += 1

    async def _store_sends(self, sends: list[tuple[protocol.SendFrame, _Slot]], turn: int) -> None:
        if turn != self._turn:  # Trio ran this task before an earlier read's
            waiting = self._turns[turn] = trio.Event()
            await waiting.wait()
        self._turn += 1
        if (following := self._turns.pop(self._turn, None)) is not None:
            following.set()
        # The next read's task runs once this one waits, and store.send_many hands its
        # commands to the Redis pump before it first waits: sends reach Redis in order.
        requests = [SendRequest(f.to, f.body, f.ttl_s, f.ref) for f, _ in sends]
        outcomes: list[Accepted | Exception]
        try:
            outcomes = await self._services.store.send_many(self.mailbox, requests, now_ms())
        except Exception as exc:
            outcomes = [exc] * len(sends)
        finally:
            self._request_ended()
        for (frame, slot), outcome in zip(sends, outcomes, strict=True):
            self._fill(slot, self._send_answer(frame, outcome))

    def _send_answer(self, frame: protocol.SendFrame, outcome: Accepted | Exception) -> str:
        metrics = self._services.metrics
        if isinstance(outcome, Accepted):
            if not outcome.duplicate:
                metrics.accepted.inc(len(outcome.ids))
            return protocol.encode_accepted(
                frame.ref, outcome.ids, outcome.expires_at_ms, outcome.duplicate
            )
        if isinstance(outcome, ClientError):
            metrics.rejected.labels(outcome.code.value).inc()
            return protocol.encode_error(outcome.code, outcome.message, frame.ref)
        # A bug must not end the session, nor reach the client in detail.
        log.error(
            "session %s: send failed",
            pseudonym(self.mailbox),
            exc_info=(type(outcome), outcome, outcome.__traceback__),
        )
        metrics.rejected.labels(ErrorCode.INTERNAL.value).inc()
        return protocol.encode_error(ErrorCode.INTERNAL, "internal error", frame.ref)

    def _start_acks(self, acks: list[tuple[protocol.AckFrame, int, _Slot | None]]) -> None:
        """One store call for the acks without a ref; each with a ref needs its own count.
        All start together, so they share a Redis pipeline."""
        if not acks:
            return
        nursery = self._nursery
        assert nursery is not None  # set for the whole session
        self._services.metrics.ack_frames.inc(len(acks))
        merged: list[str] = []
        merged_released = 0
        for frame, released, slot in acks:
            if slot is None:
                merged.extend(frame.ids)
                merged_released += released
            else:
                self._requests_in_flight += 1
                nursery.start_soon(self._store_ack, frame.ids, released, slot, frame.ref)
        if merged:
            self._requests_in_flight += 1
            nursery.start_soon(self._store_ack, merged, merged_released, None, None)

    async def _store_ack(
        self, ids: Sequence[str], released: int, slot: _Slot | None, ref: str | None
    ) -> None:
        metrics = self._services.metrics
        text = ""
        try:
            count = await self._services.store.ack(self.mailbox, ids)
        except ClientError as exc:
            metrics.rejected.labels(exc.code.value).inc()
            text = protocol.encode_error(exc.code, exc.message, ref)
        except Exception:
            log.exception("session %s: ack failed", pseudonym(self.mailbox))
            metrics.rejected.labels(ErrorCode.INTERNAL.value).inc()
            text = protocol.encode_error(ErrorCode.INTERNAL, "internal error", ref)
        else:
            metrics.acked.inc(count)
            if ref is not None:
                text = protocol.encode_acked(ref, count)
        finally:
            # Given back even when the ack failed: the messages stay queued for a later
            # session, and this one must not run out of window.
            self._inflight.give(released)
            self._request_ended()
        if slot is not None:
            self._fill(slot, text)
        elif text:
            self._answer(text)

    async def _deliver(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._deliver_while_ready()
        finally:
            self._delivering = False
            self._delivery_scope = None

    async def _deliver_while_ready(self) -> None:
        ws = self.ws
        while self._must_read or self._notices:
            if ws.backlog_bytes >= OUTPUT_HIGH_WATER:
                await ws.wait_backlog_below(OUTPUT_HIGH_WATER)
            if self._must_read:
                # The first read of a session is short: its first messages come sooner.
                wanted = FETCH_PAGE if self._cursor else FIRST_PAGE
            else:
                wanted = min(len(self._notices), FETCH_PAGE)
            slots = await self._inflight.take(wanted)
            if self._must_read:
                self._must_read = False
                try:
                    page = await self._services.store.fetch(self.mailbox, self._cursor, slots)
                except StorageError as exc:
                    log.warning("session %s: %s; retrying", pseudonym(self.mailbox), exc.message)
                    self._inflight.give(slots)
                    self._must_read = True
                    await trio.sleep(STORAGE_RETRY_S)
                    continue
                if page.more:
                    self._must_read = True  # (a resync meanwhile has set it too)
                deliveries = [(d.seq, d.id, d.envelope) for d in page.deliveries]
            else:
                deliveries = self._take_notices(slots)
            self._inflight.give(slots - len(deliveries))
            self._send_deliveries(deliveries)

    def _send_deliveries(self, deliveries: list[tuple[int, str, str]]) -> None:
        """Queue `deliver` frames for these messages (in sequence order, after the cursor)."""
        if not deliveries:
            return
        self._cursor = deliveries[-1][0]
        self._unacked.update(message_id for _, message_id, _ in deliveries)
        self._observe_delivery(deliveries)
        for frame in protocol.encode_delivers(
            [envelope for _, _, envelope in deliveries], self._config.deliver_frame_bytes
        ):
            self.ws.send(frame)

    def _observe_delivery(self, deliveries: list[tuple[int, str, str]]) -> None:
        """Sequences are the Redis clock in µs when the message was stored."""
        metrics = self._services.metrics
        metrics.delivered.inc(len(deliveries))
        now_us = time.time_ns() // 1000
        metrics.delivery_latency.observe_many(
            max(now_us - seq, 0) / 1e6 for seq, _, _ in deliveries
        )

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
