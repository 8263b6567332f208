"""Pub/sub for a process: wake the local session of a mailbox.

The store publishes every stored message on its mailbox's channel, and a new
session publishes a "replaced" notice there. The hub subscribes to the
channels of the mailboxes that have a session in this process and hands what
arrives to those sessions, on the Trio thread (each connection is a
RedisConnection, like the pump's).

The topology says where each channel is subscribed and with which command:
one connection to one Redis (or to the primary Sentinel names), or on a
cluster one per primary, each with SSUBSCRIBE for the channels of its slots.
When the topology changes (a slot moved, a failover, an unsolicited
`sunsubscribe`, a MOVED), channels move to their new node and their sessions
re-read their mailbox once the new subscription is confirmed (Redis is the
truth).

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
from relay.redis.cluster import redirection
from relay.redis.connection import RedisConnection, pack
from relay.redis.topology import Topology
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

    def notices_arrived(self) -> None:
        """Every notice of one read from Redis has been handed over (`on_message`)."""
        ...


@attrs.define(eq=False)
class _Confirmation:
    """Redis's answer to the subscription of one channel: confirmed, or refused with why."""

    done: trio.Event = attrs.field(factory=trio.Event)
    refused: str | None = None


@attrs.define(eq=False)
class _Link:
    """The hub's subscriber connection to one node, and what is subscribed there."""

    node: str
    active: set[str] = attrs.field(factory=set)  # channels subscribed on this connection
    # Our UNSUBSCRIBEs Redis has not answered yet, per channel. Redis answers each once
    # per channel, so an answer while one is owed is ours, even if the channel was
    # subscribed again meanwhile; only the others mean Redis ended a subscription.
    unsubscribing: dict[str, int] = attrs.field(factory=dict)
    changed: trio.Event = attrs.field(factory=trio.Event)
    pong: trio.Event = attrs.field(factory=trio.Event)
    send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    connected: bool = False
    tried: trio.Event = attrs.field(factory=trio.Event)  # the first connection attempt ended
    down_since: float | None = None
    down_why: str = "not connected yet"


class Hub:
    def __init__(
        self,
        topology: Topology,
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
        self._topology = topology
        self._channel_of = channel_of
        self._on_reconnect = on_reconnect
        self._on_ignored = on_ignored
        self._retry_s = retry_s
        self._retry_max_s = retry_max_s
        self._heartbeat_s = heartbeat_s
        self._timeout_s = timeout_s
        self._unhealthy_after_s = unhealthy_after_s
        command, uncommand, message = topology.subscribe
        self._commands = (command, uncommand)
        self._kinds = {
            command.lower(): "confirmed",
            uncommand.lower(): "dropped",
            message: "message",
        }
        self._wanted: dict[str, set[Subscriber]] = {}
        self._placed: dict[str, str] = {}  # channel -> the node it was last subscribed on
        self._confirmed: dict[str, _Confirmation] = {}
        self._resync_when_confirmed: set[str] = set()
        self._links: dict[str, _Link] = {}
        self._arrived: dict[Subscriber, None] = {}  # handed notices in this read, in order
        self.heartbeats = 0  # PING replies received
        self._refused: str | None = None  # the last error reply, until a subscription succeeds

    @property
    def connected(self) -> bool:
        return bool(self._links) and all(link.connected for link in self._links.values())

    @property
    def problem(self) -> str | None:
        """What keeps the hub from serving, for /readyz; None when it serves."""
        if not self._links:
            return "Redis pub/sub disconnected (no node to subscribe on)"
        for link in self._links.values():
            if not link.connected:
                return f"Redis pub/sub disconnected ({self._where(link)}{link.down_why})"
        if self._refused is not None:
            return f"Redis refused a subscription: {self._refused}"
        return None

    def _where(self, link: _Link) -> str:
        return f"{link.node}: " if len(self._links) > 1 else ""

    def health_problem(self) -> str | None:
        """For /healthz: set once the hub has been unable to connect for too long."""
        down = [link for link in self._links.values() if link.down_since is not None]
        if not down:
            return None
        link = min(down, key=lambda link: link.down_since or 0.0)
        down_s = trio.current_time() - (link.down_since or 0.0)
        if down_s <= self._unhealthy_after_s:
            return None
        return f"Redis pub/sub unreachable for {down_s:.0f} s ({self._where(link)}{link.down_why})"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one subscriber connection up on each node the topology names, until
        cancelled; follow the topology as it changes."""
        scopes: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while True:
                changed = self._topology.changed
                nodes = self._topology.subscriber_nodes()
                for node in nodes:
                    if node not in scopes:
                        link = self._links[node] = _Link(node, down_since=trio.current_time())
                        scopes[node] = await nursery.start(self._serve_link, link)
                for node in [n for n in scopes if n not in nodes]:
                    scopes.pop(node).cancel()  # its channels move to their new nodes
                    self._links.pop(node, None)
                for link in self._links.values():
                    link.changed.set()  # channels may have moved between nodes
                with trio.move_on_after(self._timeout_s):  # readiness is known once started
                    for link in self._links.values():
                        await link.tried.wait()
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await changed.wait()

    async def _serve_link(
        self, link: _Link, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await self._keep_up(link)

    async def _keep_up(self, link: _Link) -> None:
        first = True
        failures = 0  # connection attempts failed in a row
        while True:
            try:
                with trio.fail_after(self._timeout_s):
                    connection = await self._topology.open_subscriber(link.node)
            except Exception as exc:  # whatever it is, retry: never crash
                link.tried.set()
                link.down_why = _describe(exc)
                log.warning(
                    "pub/sub cannot connect (%s%s); retrying", self._where(link), link.down_why
                )
                await trio.sleep(self._backoff_s(failures))
                failures += 1
                continue
            failures = 0
            if not first:
                self._on_reconnect()
                share = self._share(link)
                self._resync_when_confirmed |= share
                log.info("pub/sub reconnected; %d channels to re-read", len(share))
            first = False
            link.connected = True
            link.tried.set()
            link.down_since = None
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, link, connection)
                    nursery.start_soon(self._control, link, connection)
                    nursery.start_soon(self._heartbeat, link, connection)
            except* Exception as lost:
                link.down_why = _describe(lost.exceptions[0])
                log.warning(
                    "pub/sub connection lost (%s%s); reconnecting", self._where(link), link.down_why
                )
                self._topology.lost_subscriber()
            finally:
                link.connected = False
                link.down_since = trio.current_time()
                self._refused = None
                # Confirmations of the old connection are void: who subscribes from now on
                # waits for the new one; who was still waiting keeps waiting.
                for channel in link.active:
                    confirmation = self._confirmed.get(channel)
                    if confirmation is not None and confirmation.done.is_set():
                        del self._confirmed[channel]
                link.active = set()
                link.unsubscribing = {}
                link.changed.set()
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
        self._changed(channel)
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
            self._changed(channel)

    def _changed(self, channel: str) -> None:
        """Wake the link that serves `channel` now and the one that did."""
        for node in (self._topology.subscriber_node(channel), self._placed.get(channel)):
            link = self._links.get(node) if node is not None else None
            if link is not None:
                link.changed.set()

    def _share(self, link: _Link) -> set[str]:
        """The wanted channels this link subscribes to."""
        node_of = self._topology.subscriber_node
        return {channel for channel in self._wanted if node_of(channel) == link.node}

    async def _send(self, link: _Link, connection: RedisConnection, *command: str) -> None:
        async with link.send_lock:
            with trio.fail_after(self._timeout_s):
                await connection.send(pack(command))

    async def _send_for(
        self, link: _Link, connection: RedisConnection, command: str, channels: set[str]
    ) -> None:
        """(UN)SUBSCRIBE the channels: one command for all, or with sharded pub/sub one
        per slot (SSUBSCRIBE refuses channels of several slots: CROSSSLOT), one write."""
        groups: dict[int | None, list[str]] = {}
        for channel in channels:
            groups.setdefault(self._topology.slot_of(channel), []).append(channel)
        if command == self._commands[1]:
            for channel in channels:
                link.unsubscribing[channel] = link.unsubscribing.get(channel, 0) + 1
        async with link.send_lock:
            with trio.fail_after(self._timeout_s):
                await connection.send(b"".join(pack((command, *g)) for g in groups.values()))

    async def _control(self, link: _Link, connection: RedisConnection) -> None:
        """Bring the node's subscriptions in line with the wanted ones, a change set at a time."""
        subscribe, unsubscribe = self._commands
        while True:
            await link.changed.wait()
            link.changed = trio.Event()
            wanted = self._share(link)
            add, remove = wanted - link.active, link.active - wanted
            for channel in remove:
                # Whoever subscribes to it from now on waits for a fresh confirmation
                # (unless it moved to another node, whose link makes that one).
                if self._placed.get(channel, link.node) == link.node:
                    self._confirmed.pop(channel, None)
            for channel in add:
                self._confirmed.setdefault(channel, _Confirmation())
                placed = self._placed.get(channel)
                if placed is not None and placed != link.node:  # moved: re-read once here
                    self._resync_when_confirmed.add(channel)
                self._placed[channel] = link.node
            for channel in remove:
                if channel not in self._wanted:
                    self._placed.pop(channel, None)
            link.active = wanted
            if add:
                await self._send_for(link, connection, subscribe, add)
            if remove:
                await self._send_for(link, connection, unsubscribe, remove)

    async def _heartbeat(self, link: _Link, connection: RedisConnection) -> None:
        while True:
            await trio.sleep(self._heartbeat_s)
            link.pong = trio.Event()
            await self._send(link, connection, "PING")
            with trio.fail_after(self._timeout_s):
                await link.pong.wait()

    async def _read(self, link: _Link, connection: RedisConnection) -> None:
        """Handle every reply one read brought, then tell the sessions that got notices:
        they deliver what a read brought in one frame."""
        while True:
            self.handle_reply(await connection.reply(), link)
            while (reply := connection.buffered_reply()) is not False:
                self.handle_reply(reply, link)
            arrived, self._arrived = self._arrived, {}
            for subscriber in arrived:
                subscriber.notices_arrived()

    def handle_reply(self, reply: Any, link: _Link | None = None) -> None:
        """One reply on a pub/sub connection, whatever it is; never raises."""
        if reply == "PONG":  # PING's reply while no channel is subscribed
            self._heartbeat_answered(link)
        elif isinstance(reply, Exception):
            self._on_error_reply(reply, link)
        elif isinstance(reply, list) and reply and isinstance(reply[0], str):
            self._dispatch(reply[0], reply[1:], link)
        else:
            self._ignore(reply)

    def _dispatch(self, kind: str, rest: list[Any], link: _Link | None) -> None:
        what = self._kinds.get(kind)
        if kind == "pong":  # PING's reply in subscribed mode: ["pong", ""]
            self._heartbeat_answered(link)
        elif not rest or not isinstance(rest[0], str):
            self._ignore(kind)
        elif what == "message" and len(rest) == 2 and isinstance(rest[1], str):
            self._deliver(rest[0], rest[1])
        elif what == "confirmed":
            self._on_confirmed(rest[0])
        elif what == "dropped":
            self._on_dropped(rest[0], link)
        else:
            self._ignore(kind)

    def _heartbeat_answered(self, link: _Link | None) -> None:
        self.heartbeats += 1
        if link is not None:
            link.pong.set()

    def _on_confirmed(self, channel: str) -> None:
        self._refused = None
        confirmation = self._confirmed.get(channel)
        if confirmation is not None:
            confirmation.done.set()
        if channel in self._resync_when_confirmed:
            self._resync_when_confirmed.discard(channel)
            for subscriber in list(self._wanted.get(channel, ())):
                subscriber.resync()

    def _on_dropped(self, channel: str, link: _Link | None) -> None:
        """An unsubscribe the hub did not ask for (the channel is still active): Redis
        moved the channel's slot away. Ask the topology again and subscribe anew."""
        if link is None:
            return
        owed = link.unsubscribing.pop(channel, 0)
        if owed > 1:
            link.unsubscribing[channel] = owed - 1
        if owed or channel not in link.active:
            return  # the answer to our own UNSUBSCRIBE
        log.info("Redis ended a subscription (its slot moved); subscribing again")
        link.active.discard(channel)
        if channel not in self._wanted:
            self._confirmed.pop(channel, None)
        else:  # who already waits keeps waiting, for the next confirmation
            confirmation = self._confirmed.get(channel)
            if confirmation is None or confirmation.done.is_set():
                self._confirmed[channel] = _Confirmation()
            self._resync_when_confirmed.add(channel)
        self._topology.lost_subscriber()
        link.changed.set()

    def _on_error_reply(self, error: Exception, link: _Link | None) -> None:
        """MOVED: the node no longer owns a slot of ours; the topology learns, and the
        channels of that slot move. Any other error reply cannot be matched to its
        channels (NOPERM answers a whole SUBSCRIBE): every subscription still waiting
        fails with it."""
        moved = redirection(error)
        if moved is not None and link is not None:
            self._topology.redirected(moved)
            self._topology.lost_subscriber()
            for channel in [
                c for c in link.active if self._topology.subscriber_node(c) != link.node
            ]:
                link.active.discard(channel)
                self._resync_when_confirmed.add(channel)
            for other in self._links.values():
                other.changed.set()
            return
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
                    self._arrived[subscriber] = None
                return
        self._on_ignored()
        log.warning("ignored a notice the relay did not publish on a mailbox channel")


def _describe(exc: BaseException) -> str:
    """An exception as a log line's reason (some, like ConnectionLost(), have no text)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
