"""One pub/sub connection per process: wake the local session of a mailbox.

The store publishes every stored message on its mailbox's channel, and a new
session publishes a "replaced" notice there. The hub subscribes to the
channels of the mailboxes that have a session in this process and hands what
arrives to those sessions, on the Trio thread (the connection is a
RedisConnection, like the pump's).

Subscriptions change through one control task, in order, and a session waits
until Redis confirmed its channel before it reads its mailbox. Pub/sub is
at-most-once: after a reconnect, once each channel is confirmed again, its
sessions re-read their mailbox from Redis (`resync`); sessions also do so
periodically. A PING every `heartbeat_s` finds a connection that died
silently.

The hub never ends the process: every failure of connecting or talking to Redis
(an error, a hang-up, no answer within `timeout_s`) ends the connection and is
retried with capped exponential backoff and jitter, and anything on the
connection the relay did not publish is ignored and counted. `problem` says
what is wrong for /readyz; `health_problem` says the hub has been unable to
connect for longer than `unhealthy_after_s`, for /healthz.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import orjson
import trio

from relay.errors import StorageUnavailable
from relay.redis.connection import RedisConnection, pack
from relay.store import envelope_id

log = logging.getLogger(__name__)

REPLACED_PREFIX = "!r "  # a notice "!r <session id>"; message notices start with a digit
SEQ = re.compile(r"[0-9]{1,18}")  # a sequence number as send.lua writes it (ASCII, fits int64)
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # secrets.token_urlsafe's alphabet


def _is_envelope(text: str, message_id: str) -> bool:
    """Whether `text` is a JSON object with this id: sessions join envelopes into deliver
    frames unparsed, so one forged notice must not make a frame no client can read."""
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and parsed.get("id") == message_id


class Subscriber(Protocol):
    """What the hub needs from a session."""

    def on_message(self, seq: int, message_id: str, envelope: str) -> None: ...

    def on_replaced(self, session_id: str) -> None: ...

    def resync(self) -> None: ...


@attrs.define(eq=False)
class _Confirmation:
    """Redis's answer to the subscription of one channel: confirmed, or refused with why."""

    done: trio.Event = attrs.field(factory=trio.Event)
    refused: str | None = None


class Hub:
    def __init__(
        self,
        url: str,
        channel_of: Callable[[str], str],
        *,
        on_reconnect: Callable[[], None] = lambda: None,
        on_ignored: Callable[[], None] = lambda: None,
        retry_s: float = 0.5,
        retry_max_s: float = 5.0,
        heartbeat_s: float = 15.0,
        timeout_s: float = 5.0,
        unhealthy_after_s: float = 60.0,
    ) -> None:
        self._url = url
        self._channel_of = channel_of
        self._on_reconnect = on_reconnect
        self._on_ignored = on_ignored
        self._retry_s = retry_s
        self._retry_max_s = retry_max_s
        self._heartbeat_s = heartbeat_s
        self._timeout_s = timeout_s
        self._unhealthy_after_s = unhealthy_after_s
        self._wanted: dict[str, set[Subscriber]] = {}
        self._active: set[str] = set()
        self._confirmed: dict[str, _Confirmation] = {}
        self._resync_when_confirmed: set[str] = set()
        self._changed = trio.Event()
        self._pong = trio.Event()
        self._send_lock = trio.Lock()
        self.connected = False
        self.heartbeats = 0  # PING replies received
        self._down_since: float | None = None
        self._down_why = "not connected yet"
        self._refused: str | None = None  # the last error reply, until a subscription succeeds

    @property
    def problem(self) -> str | None:
        """What keeps the hub from serving, for /readyz; None when it serves."""
        if not self.connected:
            return f"Redis pub/sub disconnected ({self._down_why})"
        if self._refused is not None:
            return f"Redis refused a subscription: {self._refused}"
        return None

    def health_problem(self) -> str | None:
        """For /healthz: set once the hub has been unable to connect for too long."""
        if self._down_since is None:
            return None
        down_s = trio.current_time() - self._down_since
        if down_s <= self._unhealthy_after_s:
            return None
        return f"Redis pub/sub unreachable for {down_s:.0f} s ({self._down_why})"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a subscriber connection up and serve it, until cancelled."""
        self._down_since = trio.current_time()
        task_status.started()
        first = True
        failures = 0  # connection attempts failed in a row
        while True:
            try:
                with trio.fail_after(self._timeout_s):
                    connection = await RedisConnection.open(self._url, client_name="relay-hub")
            except Exception as exc:  # whatever it is, retry: never crash
                self._down_why = _describe(exc)
                log.warning("pub/sub cannot connect (%s); retrying", self._down_why)
                await trio.sleep(self._backoff_s(failures))
                failures += 1
                continue
            failures = 0
            if not first:
                self._on_reconnect()
                self._resync_when_confirmed = set(self._wanted)
                log.info("pub/sub reconnected; %d channels to re-read", len(self._wanted))
            first = False
            self.connected = True
            self._down_since = None
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, connection)
                    nursery.start_soon(self._control, connection)
                    nursery.start_soon(self._heartbeat, connection)
            except* Exception as lost:
                self._down_why = _describe(lost.exceptions[0])
                log.warning("pub/sub connection lost (%s); reconnecting", self._down_why)
            finally:
                self.connected = False
                self._down_since = trio.current_time()
                self._refused = None
                self._active = set()
                # Confirmations of the old connection are void: who subscribes from now on
                # waits for the new one; who was still waiting keeps waiting.
                self._confirmed = {c: e for c, e in self._confirmed.items() if not e.done.is_set()}
                self._changed.set()
                await connection.aclose()
            await trio.sleep(self._backoff_s(0))

    def _backoff_s(self, failures: int) -> float:
        """Exponential, capped, with jitter (half fixed, half random) so replicas spread."""
        delay: float = min(self._retry_max_s, self._retry_s * 2.0 ** min(failures, 16))
        return delay / 2 + random.uniform(0, delay / 2)

    async def subscribe(self, mailbox: str, subscriber: Subscriber) -> None:
        """Route the mailbox's notices to `subscriber`; return once Redis confirmed it."""
        channel = self._channel_of(mailbox)
        self._wanted.setdefault(channel, set()).add(subscriber)
        confirmation = self._confirmed.setdefault(channel, _Confirmation())
        self._changed.set()
        with trio.move_on_after(self._timeout_s):
            await confirmation.done.wait()
        if confirmation.refused is not None or not confirmation.done.is_set():
            self.unsubscribe(mailbox, subscriber)
            why = confirmation.refused or "Redis did not confirm the subscription in time"
            raise StorageUnavailable(why)

    def unsubscribe(self, mailbox: str, subscriber: Subscriber) -> None:
        channel = self._channel_of(mailbox)
        subscribers = self._wanted.get(channel)
        if subscribers is None:
            return
        subscribers.discard(subscriber)
        if not subscribers:
            del self._wanted[channel]
            self._changed.set()

    async def _send(self, connection: RedisConnection, *command: str) -> None:
        async with self._send_lock:
            with trio.fail_after(self._timeout_s):
                await connection.send(pack(command))

    async def _control(self, connection: RedisConnection) -> None:
        """Bring Redis's subscriptions in line with the wanted ones, one change set at a time."""
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            wanted = set(self._wanted)
            add, remove = wanted - self._active, self._active - wanted
            for channel in remove:
                # Whoever subscribes to it from now on waits for a fresh confirmation.
                self._confirmed.pop(channel, None)
            for channel in add:
                self._confirmed.setdefault(channel, _Confirmation())
            if add:
                await self._send(connection, "SUBSCRIBE", *add)
            if remove:
                await self._send(connection, "UNSUBSCRIBE", *remove)
            self._active = wanted

    async def _heartbeat(self, connection: RedisConnection) -> None:
        while True:
            await trio.sleep(self._heartbeat_s)
            self._pong = trio.Event()
            await self._send(connection, "PING")
            with trio.fail_after(self._timeout_s):
                await self._pong.wait()

    async def _read(self, connection: RedisConnection) -> None:
        while True:
            self.handle_reply(await connection.reply())

    def handle_reply(self, reply: Any) -> None:
        """One reply on the pub/sub connection, whatever it is; never raises."""
        if reply == "PONG":  # PING's reply while no channel is subscribed
            self._heartbeat_answered()
        elif isinstance(reply, Exception):
            self._on_error_reply(reply)
        elif isinstance(reply, list) and reply and isinstance(reply[0], str):
            self._dispatch(reply[0], reply[1:])
        else:
            self._ignore(reply)

    def _dispatch(self, kind: str, rest: list[Any]) -> None:
        if kind == "pong":  # PING's reply in subscribed mode: ["pong", ""]
            self._heartbeat_answered()
        elif not rest or not isinstance(rest[0], str):
            self._ignore(kind)
        elif kind == "message" and len(rest) == 2 and isinstance(rest[1], str):
            self._deliver(rest[0], rest[1])
        elif kind == "subscribe":
            self._on_confirmed(rest[0])
        elif kind != "unsubscribe":
            self._ignore(kind)

    def _heartbeat_answered(self) -> None:
        self.heartbeats += 1
        self._pong.set()

    def _on_confirmed(self, channel: str) -> None:
        self._refused = None
        confirmation = self._confirmed.get(channel)
        if confirmation is not None:
            confirmation.done.set()
        if channel in self._resync_when_confirmed:
            self._resync_when_confirmed.discard(channel)
            for subscriber in list(self._wanted.get(channel, ())):
                subscriber.resync()

    def _on_error_reply(self, error: Exception) -> None:
        """An error reply cannot be matched to its channels (NOPERM answers a whole
        SUBSCRIBE): every subscription still waiting fails with it."""
        self._refused = str(error) or type(error).__name__
        log.error("Redis refused a pub/sub command: %s", self._refused)
        for confirmation in self._confirmed.values():
            if not confirmation.done.is_set():
                confirmation.refused = f"Redis refused the subscription: {self._refused}"
                confirmation.done.set()

    def _ignore(self, what: object) -> None:
        self._on_ignored()
        log.warning("ignored a pub/sub reply the relay did not expect (%s)", type(what).__name__)

    def _deliver(self, channel: str, data: str) -> None:
        subscribers = self._wanted.get(channel)
        if not subscribers:
            return
        if data.startswith(REPLACED_PREFIX):
            session_id = data[len(REPLACED_PREFIX) :]
            if SESSION_ID.fullmatch(session_id):
                for subscriber in list(subscribers):
                    subscriber.on_replaced(session_id)
                return
        else:
            seq, _, envelope = data.partition(" ")
            message_id = envelope_id(envelope) if SEQ.fullmatch(seq) else None
            if message_id is not None and _is_envelope(envelope, message_id):
                for subscriber in list(subscribers):
                    subscriber.on_message(int(seq), message_id, envelope)
                return
        self._on_ignored()
        log.warning("ignored a notice the relay did not publish on a mailbox channel")


def _describe(exc: BaseException) -> str:
    """An exception as a log line's reason (some, like ConnectionLost(), have no text)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
