"""The relay's Python client (Trio): one mailbox's connection that survives reconnects.

    from relay.client import open_client

    async with open_client("wss://chat.example/v1", token=fetch_token) as relay:
        accepted = await relay.send("bob", "hello", ttl_s=3600)
        async for message in relay.messages():  # acked once the loop asks for the next one
            print(message.sender, message.body)

It does what relay.js does in a browser:

- `token` is a string or a (possibly async) function, called before every
  connect, so after a 4401 (the token ran out) too.
- Every send carries a random `ref`. A send not yet `accepted` is kept and sent
  again with the same ref after a reconnect and after `unconfirmed` or
  `rate_limited` (with jittered backoff; `rate_limited` ones one at a time), so
  it is stored once; `send` raises RelayClientError on any other `error`.
- Deliveries are deduplicated by id across sessions (the last `dedupe_size`
  ids) and acked in batches: one `ack` frame per `ack_delay_s`, up to the
  welcome's `max_inflight` ids.
- It reconnects with full-jitter backoff (`min_backoff_s` doubling to
  `max_backoff_s`, reset on welcome) after close codes 1001, 1006, 1011 and
  1013, after a failed connect (or HTTP 429/503) and when a ping gets no pong
  within `idle_timeout_s`. It stops after 4409, after 4401 when the token
  cannot be refreshed (a string, a function that raises, or a fresh token
  refused), after any other close code, and after `max_attempts` connects in a
  row that got no welcome. Once stopped, `send`, `receive` and
  `wait_connected` raise RelayStopped.
- `on_event` hears Welcomed, EpochChanged (the storage was reset: queued
  messages may be lost), Expired (the welcome's count, when not 0),
  Reconnecting and Unopened.
- With `identity` (relay.seal.Identity) and `public_key` (a function from a
  mailbox id to its relay.seal.PublicKey, or None), every send is sealed for its
  one recipient and every delivery opened: a delivery that does not open (not
  sealed, altered, not from the sender the relay names, or from a sender
  without a key) never reaches `receive()`; `on_event` hears Unopened.

relay.client_session.open_relay is the other mode: one session, no reconnects
(for tests and tools that want to see each close code).
"""

from __future__ import annotations

import inspect
import math
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from itertools import islice
from typing import Any, NoReturn, cast

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from relay.client_events import (
    EpochChanged,
    Event,
    Expired,
    Reconnecting,
    RelayStopped,
    Stats,
    Unopened,
    Welcomed,
)
from relay.client_frames import (
    SUBPROTOCOL,
    Accepted,
    Message,
    RelayClientError,
    Welcome,
    new_ref,
)
from relay.client_seal import PublicKeyLookup, Sealer
from relay.client_session import RelaySession, open_relay
from relay.seal import Identity

__all__ = [
    "Accepted",
    "EpochChanged",
    "Event",
    "Expired",
    "Message",
    "PublicKeyLookup",
    "Reconnecting",
    "RelayClient",
    "RelayClientError",
    "RelaySession",
    "RelayStopped",
    "Stats",
    "Token",
    "Unopened",
    "Welcome",
    "Welcomed",
    "new_ref",
    "open_client",
    "open_relay",
]

Token = str | Callable[[], str | Awaitable[str]]

RECONNECT_CODES = frozenset({1001, 1006, 1011, 1013})
RETRY_STATUSES = frozenset({429, 503})  # the relay is busy, not misaddressed
RETRY_ERRORS = frozenset({"unconfirmed", "rate_limited"})  # a retry with the ref is safe
UNAVAILABLE = "storage_unavailable"
REPLACED, UNAUTHORIZED = 4409, 4401
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0  # a relay that stopped answering does not hold a reconnect up longer
# The first retry of an `unconfirmed` / `rate_limited` send waits up to this (doubling
# after): a burst of refused sends comes back spread out, not as another burst.
RETRY_MIN_S = 0.5
# `rate_limited` sends are retried one at a time, client-wide, waiting up to this at most
# (whatever max_backoff_s): each retry the relay refuses is a strike against the
# connection (README, "Rate limits"), so the retries must slow down to the relay's rate.
RATE_RETRY_MAX_S = 20.0


def backoff_s(attempt: int, min_s: float, max_s: float) -> float:
    """Full jitter: uniform in [0, min(max_s, min_s * 2**attempt))."""
    return random.uniform(0, min(max_s, min_s * 2 ** min(attempt, 30)))


@attrs.define(eq=False)
class _Send:
    text: str
    answered: trio.Event = attrs.field(factory=trio.Event)
    answer: dict[str, Any] | None = None
    sent_on: WebSocketConnection | None = None  # the connection it was last written to


@attrs.frozen
class _Ended:
    """How one connection ended."""

    reason: str
    code: int | None = None  # the close code, when there was a session
    status: int | None = None  # the HTTP status of a refused handshake
    welcomed: bool = False


class RelayClient:
    """A mailbox's connection to the relay that survives reconnects; made by open_client."""

    def __init__(
        self,
        url: str,
        token: Token,
        *,
        auto_ack: bool,
        on_event: Callable[[Event], None] | None,
        min_backoff_s: float,
        max_backoff_s: float,
        max_attempts: int | None,
        idle_timeout_s: float,
        ack_delay_s: float,
        dedupe_size: int,
        max_message_size: int,
        sealer: Sealer | None,
    ) -> None:
        self.url = url
        self.auto_ack = auto_ack
        self.welcome: Welcome | None = None
        self.epoch: str | None = None
        self.stats = Stats()
        self._token = token
        self._on_event = on_event
        self._min_backoff_s, self._max_backoff_s = min_backoff_s, max_backoff_s
        self._max_attempts = max_attempts
        self._idle_timeout_s = idle_timeout_s
        self._ack_delay_s = ack_delay_s
        self._dedupe_size = dedupe_size
        self._max_message_size = max_message_size
        self._sealer = sealer
        self._ws: WebSocketConnection | None = None  # the connection, once welcomed
        self._ready = trio.Event()  # set while _ws is set, and once stopped
        self._stopped: RelayStopped | None = None
        self._pending: dict[str, _Send] = {}
        self._rate_retry = trio.Lock()  # held by the one `rate_limited` send being retried
        self._rate_refusals = 0  # retries refused in a row, less one per accepted retry
        self._seen: OrderedDict[str, bool] = OrderedDict()  # delivered id -> acked
        self._acks: dict[str, None] = {}  # ids to ack, in order
        self._acks_queued = trio.Event()
        self._acked: dict[str, trio.Event] = {}  # refs of the acks a normal exit waits for
        self._handed: str | None = None  # with auto_ack: acked when the next is asked for
        # Unbounded, yet bounded by the protocol: at most max_inflight unacked deliveries
        # per session, and redeliveries of what waits here are dropped as duplicates.
        self._inbox_in, self._inbox = trio.open_memory_channel[Message](math.inf)

    # -- the API ----------------------------------------------------------------------

    @property
    def stopped(self) -> RelayStopped | None:
        """Why the client stopped, or None while it runs."""
        return self._stopped

    @property
    def pending_count(self) -> int:
        """Sends not answered yet (sent again after a reconnect)."""
        return len(self._pending)

    async def wait_connected(self) -> Welcome:
        """The current session's welcome, once there is one."""
        while self._ws is None:
            self._raise_if_stopped()
            await self._ready.wait()
        assert self.welcome is not None
        return self.welcome

    async def send(
        self,
        to: str | Sequence[str],
        body: str,
        *,
        ttl_s: int | None = None,
        ref: str | None = None,
    ) -> Accepted:
        """Send and wait until the relay stored it, across reconnects (wrap it in
        `trio.fail_after` for a deadline; a cancelled send may still be stored: send it
        again with the same ref). Raises RelayClientError on a definite `error`. With
        sealing, it waits for a session (the welcome names the sender), seals once (a
        resend is the same request) and raises ValueError for a recipient without a key
        or more than one recipient."""
        self._raise_if_stopped()
        if self._sealer is not None:
            to, body = self._sealer.seal((await self.wait_connected())["mailbox"], to, body)
        ref = ref if ref is not None else new_ref()
        if ref in self._pending:
            raise RelayClientError("ref_conflict", "a send with this ref is pending")
        frame: dict[str, Any] = {"type": "send", "ref": ref, "to": to, "body": body}
        if not isinstance(to, str):
            frame["to"] = list(to)
        if ttl_s is not None:
            frame["ttl"] = ttl_s
        pending = self._pending[ref] = _Send(orjson.dumps(frame).decode())
        retries, maybe_stored = 0, False
        paced = False  # holds _rate_retry
        try:
            while True:
                if self._ws is not None:
                    await self._transmit(self._ws, pending)
                await pending.answered.wait()
                if pending.answer is None:  # only the stop wakes a send without an answer
                    self._raise_if_stopped()
                answer = pending.answer
                assert answer is not None
                if answer["type"] == "accepted":
                    if paced:
                        self._rate_refusals = max(self._rate_refusals - 1, 0)
                    return Accepted.from_wire(answer)
                code = answer["code"]
                maybe_stored = maybe_stored or code == "unconfirmed"
                # After `unconfirmed`, a retry's storage_unavailable says nothing of the
                # first try's outcome: the send stays pending.
                if code not in RETRY_ERRORS and not (maybe_stored and code == UNAVAILABLE):
                    raise RelayClientError(code, answer.get("message", ""))
                pending.answered, pending.answer, pending.sent_on = trio.Event(), None, None
                if code == "rate_limited":
                    if paced:
                        self._rate_refusals += 1
                    else:
                        await self._rate_retry.acquire()
                        paced = True
                    delay = backoff_s(self._rate_refusals, RETRY_MIN_S, RATE_RETRY_MAX_S)
                else:
                    delay = backoff_s(retries, RETRY_MIN_S, self._max_backoff_s)
                    retries += 1
                await trio.sleep(delay)
        finally:
            if paced:
                self._rate_retry.release()
            del self._pending[ref]

    async def receive(self) -> Message:
        """The next delivered message (each once, across reconnects). With `auto_ack`, the
        message received before is acked now: you came back, so you handled it."""
        if self._handed is not None:
            self.ack(self._handed)
            self._handed = None
        try:
            message = await self._inbox.receive()
        except trio.EndOfChannel:
            self._raise_if_stopped()
            raise AssertionError("the inbox ends only when the client stops") from None
        if self.auto_ack:
            self._handed = message.id
        return message

    async def messages(self) -> AsyncIterator[Message]:
        """`receive()` in a loop, until the client stops (RelayStopped)."""
        while True:
            yield await self.receive()

    def ack(self, message_id: str) -> None:
        """Acknowledge (delete) a message; batched, and sent again should it be redelivered."""
        if message_id in self._seen:
            self._seen[message_id] = True
        self._acks[message_id] = None
        self._acks_queued.set()

    # -- the connection loop ----------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0  # reconnects since the last welcome: the backoff's exponent
        failures = 0  # connects in a row that got no welcome
        while self._stopped is None:
            try:
                token = await self._fresh_token()
            except Exception as exc:
                self._stop(RelayStopped(f"the token function failed: {exc}", UNAUTHORIZED))
                return
            self.stats.connects += 1
            ended = await self._connection(token)
            if self._stopped is not None:
                return
            attempt, failures = (0, 0) if ended.welcomed else (attempt, failures + 1)
            stop = self._verdict(ended)
            if stop is None and failures == self._max_attempts:
                stop = RelayStopped(ended.reason, ended.code)
            if stop is not None:
                self._stop(stop)
                return
            delay = backoff_s(attempt, self._min_backoff_s, self._max_backoff_s)
            attempt += 1
            self._emit(Reconnecting(ended.reason, ended.code, attempt, delay))
            await trio.sleep(delay)

    async def _fresh_token(self) -> str:
        if isinstance(self._token, str):
            return self._token
        value = self._token()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str) or not value:
            raise ValueError("it returned no token")
        return value

    def _verdict(self, ended: _Ended) -> RelayStopped | None:
        """None to reconnect, or why to stop."""
        if ended.status is not None:
            return None if ended.status in RETRY_STATUSES else RelayStopped(ended.reason)
        if ended.code == REPLACED:
            return RelayStopped("replaced by a newer session of the mailbox", REPLACED)
        if ended.code == UNAUTHORIZED:
            if isinstance(self._token, str) or not ended.welcomed:
                return RelayStopped("the relay refused the token", UNAUTHORIZED)
            return None  # it ran out: the token function gives a fresh one
        if ended.code is None or ended.code in RECONNECT_CODES:
            return None
        return RelayStopped(ended.reason, ended.code)

    async def _connection(self, token: str) -> _Ended:
        ended: _Ended | None = None
        try:
            async with open_websocket_url(
                self.url,
                subprotocols=[SUBPROTOCOL],
                extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
                max_message_size=self._max_message_size,
                connect_timeout=CONNECT_TIMEOUT_S,
                disconnect_timeout=CLOSE_TIMEOUT_S,
            ) as ws:
                ended = await self._session(ws)
        except ConnectionRejected as exc:
            status = exc.status_code
            return _Ended(f"cannot connect to {self.url}: HTTP {status}", status=status)
        except (HandshakeError, OSError) as exc:
            if ended is None:  # else the close after the session timed out: that is fine
                return _Ended(f"cannot connect to {self.url}: {connect_failure(exc)}")
        assert ended is not None
        return ended

    async def _session(self, ws: WebSocketConnection) -> _Ended:
        """Read frames until the connection ends; a keepalive drops it when pings go
        unanswered (a relay that stopped, or a path that silently died)."""
        welcomed = False
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as reading:
                nursery.start_soon(self._keepalive, ws, reading)
                try:
                    while True:
                        frame = _parse(await ws.get_message())
                        if frame.get("type") == "welcome":
                            welcomed = True
                            await self._on_welcome(ws, cast(Welcome, frame))
                        else:
                            self._on_frame(frame)
                except ConnectionClosed as closed:
                    code = closed.reason.code if closed.reason is not None else 1006
                    return _Ended("the relay closed the connection", code, None, welcomed)
                finally:
                    nursery.cancel_scope.cancel()
                    if self._ws is ws:
                        self._ws, self._ready = None, trio.Event()
        idle = f"no answer from the relay for {self._idle_timeout_s:g} s"
        return _Ended(idle, None, None, welcomed)

    async def _keepalive(self, ws: WebSocketConnection, reading: trio.CancelScope) -> None:
        half = self._idle_timeout_s / 2
        while True:
            await trio.sleep(half)
            with trio.move_on_after(half):
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return
                continue
            reading.cancel()
            return

    async def _on_welcome(self, ws: WebSocketConnection, welcome: Welcome) -> None:
        previous, self.epoch = self.epoch, welcome.get("epoch")
        self.welcome = welcome
        self.stats.welcomes += 1
        self._ws = ws
        self._ready.set()
        self._emit(Welcomed(welcome))
        if welcome.get("expired"):
            self._emit(Expired(welcome["expired"]))
        if previous is not None and self.epoch is not None and self.epoch != previous:
            self._emit(EpochChanged(previous, self.epoch))
        for pending in list(self._pending.values()):
            await self._transmit(ws, pending)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "deliver":
            for m in frame["messages"]:
                self._on_delivery(m)
        elif kind in ("acked", "error") and frame.get("ref") in self._acked:
            self._acked.pop(frame["ref"]).set()
        elif kind in ("accepted", "error"):
            pending = self._pending.get(frame.get("ref", ""))
            if pending is not None and not pending.answered.is_set():
                pending.answer = frame
                pending.answered.set()

    def _on_delivery(self, m: dict[str, Any]) -> None:
        message_id = m["id"]
        acked = self._seen.get(message_id)
        if acked is not None:  # seen in an earlier session
            self.stats.duplicates_dropped += 1
            if acked:  # its ack did not land: send it again
                self.ack(message_id)
            return
        self._seen[message_id] = False
        if len(self._seen) > self._dedupe_size:
            self._seen.popitem(last=False)
        message = Message.from_wire(m)
        if self._sealer is not None:
            assert self.welcome is not None  # deliveries come after it
            opened = self._sealer.open(self.welcome["mailbox"], message)
            if isinstance(opened, Unopened):
                if self.auto_ack:
                    self.ack(message_id)
                self._emit(opened)
                return
            message = opened
        self._inbox_in.send_nowait(message)

    async def _transmit(self, ws: WebSocketConnection, pending: _Send) -> None:
        """Write a send to a connection once; a failed write waits for the next welcome."""
        if pending.sent_on is ws or pending.answered.is_set():
            return
        pending.sent_on = ws
        try:
            await ws.send_message(pending.text)
        except ConnectionClosed:
            return
        self.stats.sends += 1

    # -- acks ---------------------------------------------------------------------------

    async def _flush_acks(self) -> None:
        """One ack frame per `ack_delay_s` (several when more than max_inflight wait)."""
        while True:
            await self._acks_queued.wait()
            await trio.sleep(self._ack_delay_s)
            try:
                ws = await self._wait_ws()
            except RelayStopped:
                return
            await self._send_acks(ws)
            if not self._acks:
                self._acks_queued = trio.Event()

    async def _wait_ws(self) -> WebSocketConnection:
        while self._ws is None:
            self._raise_if_stopped()
            await self._ready.wait()
        return self._ws

    async def _send_acks(
        self, ws: WebSocketConnection, *, confirm: bool = False
    ) -> list[trio.Event]:
        """Send the queued acks; with `confirm`, each frame carries a ref and the events
        returned are set when the relay answers them (`acked`: the messages are gone)."""
        assert self.welcome is not None
        limit = max(1, self.welcome["max_inflight"])
        answers = []
        while self._acks:
            ids = list(islice(self._acks, limit))
            frame: dict[str, Any] = {"type": "ack", "ids": ids}
            if confirm:
                frame["ref"] = ref = new_ref()
                answers.append(self._acked.setdefault(ref, trio.Event()))
            try:
                await ws.send_message(orjson.dumps(frame).decode())
            except ConnectionClosed:
                return answers  # kept for the next session
            self.stats.ack_frames += 1
            for message_id in ids:
                self._acks.pop(message_id, None)
        return answers

    # -- stopping -----------------------------------------------------------------------

    async def _close(self) -> None:
        """A normal exit: ack what was handed out, send the acks and wait for the relay to
        confirm them (a relay need not act on an ack it reads just before the Close: only
        `acked` says the messages are gone), close with 1000."""
        if self._handed is not None:
            self.ack(self._handed)
            self._handed = None
        ws = self._ws
        self._stop(RelayStopped("the client was closed", 1000))
        if ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                for answered in await self._send_acks(ws, confirm=True):
                    await answered.wait()
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await ws.aclose()

    def _stop(self, reason: RelayStopped) -> None:
        if self._stopped is not None:
            return
        self._stopped = reason
        self._inbox_in.close()
        self._ready.set()
        for pending in self._pending.values():
            pending.answered.set()

    def _raise_if_stopped(self) -> None:
        if self._stopped is not None:
            raise self._stopped

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)


def _parse(message: str | bytes) -> dict[str, Any]:
    """A frame as a dict; {} for what is none (a later protocol's binary frame, say)."""
    try:
        frame = orjson.loads(message)
    except orjson.JSONDecodeError:
        return {}
    return frame if isinstance(frame, dict) else {}


def connect_failure(exc: BaseException) -> str:
    """Why a connect failed, in words (trio-websocket's HandshakeError has none of its own)."""
    if isinstance(exc, HandshakeError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc)
    inner = exc.__cause__
    while isinstance(inner, BaseExceptionGroup):
        inner = inner.exceptions[0]
    if isinstance(inner, OSError) and inner.strerror:
        text += f" ({inner.strerror})"
    return text or type(exc).__name__


@asynccontextmanager
async def open_client(
    url: str,
    token: Token,
    *,
    auto_ack: bool = True,
    on_event: Callable[[Event], None] | None = None,
    min_backoff_s: float = 0.5,
    max_backoff_s: float = 20.0,
    max_attempts: int | None = None,
    idle_timeout_s: float = 60.0,
    ack_delay_s: float = 0.01,
    dedupe_size: int = 10_000,
    max_message_size: int = 16 * 1024 * 1024,
    identity: Identity | None = None,
    public_key: PublicKeyLookup | None = None,
) -> AsyncIterator[RelayClient]:
    """A RelayClient that connects (and reconnects) in the background while the block runs.

    It does not wait for the first welcome (`await relay.wait_connected()` does); sends
    wait for a session. A normal exit acks the message last received (with `auto_ack`),
    sends the acks still queued, waits (up to CLOSE_TIMEOUT_S) for the relay's `acked`
    and closes with 1000; an exception acks nothing more.
    `on_event` runs in the client's task: it must not block. `identity` and `public_key`
    (both or neither) turn sealing on.
    """
    if (identity is None) != (public_key is None):
        raise ValueError("sealing needs both identity and public_key")
    sealer = None if identity is None or public_key is None else Sealer(identity, public_key)
    client = RelayClient(
        url,
        token,
        auto_ack=auto_ack,
        on_event=on_event,
        min_backoff_s=min_backoff_s,
        max_backoff_s=max_backoff_s,
        max_attempts=max_attempts,
        idle_timeout_s=idle_timeout_s,
        ack_delay_s=ack_delay_s,
        dedupe_size=dedupe_size,
        max_message_size=max_message_size,
        sealer=sealer,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            nursery.start_soon(client._flush_acks)
            try:
                yield client
                await client._close()
            finally:
                client._stop(RelayStopped("the client was closed", 1000))
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background tasks raise nothing of their own: the one exception is the
        # block's, and the block's caller should see it as it was raised.
        if len(group.exceptions) != 1:
            raise
        _reraise(group.exceptions[0])


def _reraise(exc: BaseException) -> NoReturn:
    """Raise `exc` again without making the group it came in its context."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
