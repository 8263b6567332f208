"""One pub/sub connection per process: wake the local session of a mailbox.

The store publishes every stored message on its mailbox's channel, and a new
session publishes a "replaced" notice there. The hub subscribes to the
channels of the mailboxes that have a session in this process and hands what
arrives to those sessions.

redis-py's PubSub is blocking, so it is read in a thread of its own; the Trio
side changes the subscriptions through one control task, in order, and each
session waits until Redis confirmed its channel before it reads its mailbox.
Pub/sub is at-most-once: after a reconnect every local session re-reads its
mailbox from Redis (`resync`), and sessions also do so periodically.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
import trio

from relay.errors import StorageUnavailable
from relay.redis_pump import RedisClient

log = logging.getLogger(__name__)

REPLACED_PREFIX = "!r "  # a notice "!r <session id>"; message notices start with a digit


class Subscriber(Protocol):
    """What the hub needs from a session."""

    def on_message(self, seq: int, envelope: str) -> None: ...

    def on_replaced(self, session_id: str) -> None: ...

    def resync(self) -> None: ...


class Hub:
    def __init__(
        self,
        client: RedisClient,
        channel_of: Callable[[str], str],
        *,
        on_reconnect: Callable[[], None] = lambda: None,
        poll_s: float = 0.5,
    ) -> None:
        self._client = client
        self._on_reconnect = on_reconnect
        self._channel_of = channel_of
        self._poll_s = poll_s
        self._pubsub: Any = None
        self._wanted: dict[str, set[Subscriber]] = {}
        self._active: set[str] = set()
        self._confirmed: dict[str, trio.Event] = {}
        self._changed = trio.Event()
        self._stopping = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._connects = 0
        self.connected = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read pub/sub in a thread and apply subscription changes until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        self._pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        try:
            # A private channel opens the connection, so a connect callback can be set on it.
            await trio.to_thread.run_sync(self._pubsub.subscribe, f"relay-hub:{id(self)}")
            self._pubsub.connection.register_connect_callback(self._on_connect)
            self._connects = 1
            self.connected = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._control)
                nursery.start_soon(self._read_in_thread)
                task_status.started()
        finally:
            self._stopping.set()
            self._pubsub.close()

    async def subscribe(self, mailbox: str, subscriber: Subscriber, timeout_s: float = 5.0) -> None:
        """Route the mailbox's notices to `subscriber`; return once Redis confirmed it."""
        channel = self._channel_of(mailbox)
        self._wanted.setdefault(channel, set()).add(subscriber)
        confirmed = self._confirmed.setdefault(channel, trio.Event())
        self._changed.set()
        with trio.move_on_after(timeout_s):
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

    async def _control(self) -> None:
        """Bring Redis's subscriptions in line with the wanted ones, one change set at a time."""
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            wanted = set(self._wanted)
            add, remove = wanted - self._active, self._active - wanted
            for channel in remove:
                # Whoever subscribes to it from now on waits for a fresh confirmation.
                self._confirmed.pop(channel, None)
            try:
                if add:
                    await trio.to_thread.run_sync(self._pubsub.subscribe, *add)
                if remove:
                    await trio.to_thread.run_sync(self._pubsub.unsubscribe, *remove)
            except redis.RedisError as exc:
                log.warning("pub/sub subscription change failed: %s; retrying", type(exc).__name__)
                await trio.sleep(self._poll_s)
                self._changed.set()
                continue
            self._active = wanted

    async def _read_in_thread(self) -> None:
        await trio.to_thread.run_sync(self._reader, abandon_on_cancel=True)

    def _reader(self) -> None:
        """The pub/sub thread: read messages and pass them to the Trio side."""
        assert self._token is not None
        while not self._stopping.is_set():
            try:
                message = self._pubsub.get_message(timeout=self._poll_s)
            except (redis.RedisError, OSError) as exc:
                if self._stopping.is_set():
                    return
                self._token.run_sync_soon(self._set_connected, False)
                log.warning("pub/sub connection lost (%s); reconnecting", type(exc).__name__)
                time.sleep(self._poll_s)
                continue
            if message is not None:
                try:
                    self._token.run_sync_soon(self._dispatch, message)
                except trio.RunFinishedError:
                    return

    def _on_connect(self, connection: object) -> None:
        """redis-py calls this (after resubscribing) on every (re)connect of the pub/sub socket."""
        self._connects += 1
        if self._connects > 1 and self._token is not None:
            self._token.run_sync_soon(self._resync_all)

    def _set_connected(self, value: bool) -> None:
        self.connected = value

    def _resync_all(self) -> None:
        self.connected = True
        self._on_reconnect()
        log.info("pub/sub reconnected; %d local channels re-read from Redis", len(self._wanted))
        for subscribers in self._wanted.values():
            for subscriber in subscribers:
                subscriber.resync()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "subscribe":
            event = self._confirmed.get(channel)
            if event is not None:
                event.set()
            return
        if kind != "message":
            return
        subscribers = self._wanted.get(channel)
        if not subscribers:
            return
        data: str = message["data"]
        if data.startswith(REPLACED_PREFIX):
            session_id = data[len(REPLACED_PREFIX) :]
            for subscriber in list(subscribers):
                subscriber.on_replaced(session_id)
            return
        seq, _, envelope = data.partition(" ")
        for subscriber in list(subscribers):
            subscriber.on_message(int(seq), envelope)
