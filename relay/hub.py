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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis
import trio

from relay.errors import StorageUnavailable
from relay.redis_conn import ConnectionLost, RedisConnection, pack
from relay.store import envelope_id

log = logging.getLogger(__name__)

REPLACED_PREFIX = "!r "  # a notice "!r <session id>"; message notices start with a digit


class Subscriber(Protocol):
    """What the hub needs from a session."""

    def on_message(self, seq: int, message_id: str, envelope: str) -> None: ...

    def on_replaced(self, session_id: str) -> None: ...

    def resync(self) -> None: ...


class Hub:
    def __init__(
        self,
        url: str,
        channel_of: Callable[[str], str],
        *,
        on_reconnect: Callable[[], None] = lambda: None,
        retry_s: float = 0.5,
        heartbeat_s: float = 15.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._url = url
        self._channel_of = channel_of
        self._on_reconnect = on_reconnect
        self._retry_s = retry_s
        self._heartbeat_s = heartbeat_s
        self._timeout_s = timeout_s
        self._wanted: dict[str, set[Subscriber]] = {}
        self._active: set[str] = set()
        self._confirmed: dict[str, trio.Event] = {}
        self._resync_when_confirmed: set[str] = set()
        self._changed = trio.Event()
        self._pong = trio.Event()
        self._send_lock = trio.Lock()
        self.connected = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a subscriber connection up and serve it, until cancelled."""
        task_status.started()
        first = True
        while True:
            try:
                connection = await RedisConnection.open(self._url, client_name="relay-hub")
            except (OSError, redis.RedisError) as exc:
                log.warning("pub/sub cannot connect (%s); retrying", exc)
                await trio.sleep(self._retry_s)
                continue
            if not first:
                self._on_reconnect()
                self._resync_when_confirmed = set(self._wanted)
                log.info("pub/sub reconnected; %d channels to re-read", len(self._wanted))
            first = False
            self.connected = True
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, connection)
                    nursery.start_soon(self._control, connection)
                    nursery.start_soon(self._heartbeat, connection)
            except* (ConnectionLost, trio.TooSlowError, redis.RedisError) as lost:
                log.warning("pub/sub connection lost (%s); reconnecting", lost.exceptions[0])
            finally:
                self.connected = False
                self._active = set()
                # Confirmations of the old connection are void: who subscribes from now on
                # waits for the new one; who was still waiting keeps waiting.
                self._confirmed = {c: e for c, e in self._confirmed.items() if not e.is_set()}
                self._changed.set()
                await connection.aclose()
            await trio.sleep(self._retry_s)

    async def subscribe(self, mailbox: str, subscriber: Subscriber) -> None:
        """Route the mailbox's notices to `subscriber`; return once Redis confirmed it."""
        channel = self._channel_of(mailbox)
        self._wanted.setdefault(channel, set()).add(subscriber)
        confirmed = self._confirmed.setdefault(channel, trio.Event())
        self._changed.set()
        with trio.move_on_after(self._timeout_s):
            await confirmed.wait()
        if not confirmed.is_set():
            self.unsubscribe(mailbox, subscriber)
            raise StorageUnavailable("Redis did not confirm the subscription in time")

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
                self._confirmed.setdefault(channel, trio.Event())
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
            reply = await connection.reply()
            if isinstance(reply, list) and reply:
                self._dispatch(reply)

    def _dispatch(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == "message":
            self._deliver(reply[1], reply[2])
        elif kind == "subscribe":
            channel = reply[1]
            event = self._confirmed.get(channel)
            if event is not None:
                event.set()
            if channel in self._resync_when_confirmed:
                self._resync_when_confirmed.discard(channel)
                for subscriber in list(self._wanted.get(channel, ())):
                    subscriber.resync()
        elif kind == "pong":
            self._pong.set()

    def _deliver(self, channel: str, data: str) -> None:
        subscribers = self._wanted.get(channel)
        if not subscribers:
            return
        if data.startswith(REPLACED_PREFIX):
            session_id = data[len(REPLACED_PREFIX) :]
            for subscriber in list(subscribers):
                subscriber.on_replaced(session_id)
            return
        seq, _, envelope = data.partition(" ")
        message_id = envelope_id(envelope)
        if not seq.isdigit() or message_id is None:
            log.warning("ignored a notice the relay did not publish on a mailbox channel")
            return
        for subscriber in list(subscribers):
            subscriber.on_message(int(seq), message_id, envelope)
