"""The primary that Sentinels name, on Trio: find it, connect to it, hear it change.

Sentinels are asked in the order the address lists them; one that cannot be
reached, gives no answer in time or does not know the master name is skipped.
A Sentinel may still name an old primary for a moment after a failover, and a
node just demoted says `slave`: `open_primary` checks ROLE before it hands out a
connection, and asks again if the node is not the primary.

A failover ends the connections of both nodes (Sentinel sends them CLIENT KILL
TYPE normal and pubsub with its REPLICAOF), and a connection opened to a node
after it became a replica gets `READONLY` for a write: either tells the caller
to open the primary again. `watch_switches` hears `+switch-master` so the
caller need not wait for one of those.

Between a replica's promotion and `+switch-master` (about a second: the
leading Sentinel polls the promoted node's INFO), the old primary still
answers as one, and what is written there is lost when it is demoted.
`watch_failovers` listens on every Sentinel (only the leader of a failover
announces its steps) and reports `+try-failover`, the first step, before any
replica is promoted, so the caller can stop writing until the switch; and the
failover's abort.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from typing import Any

import redis
import trio

from relay.errors import StorageUnavailable
from relay.redis.address import Node, RedisAddress
from relay.redis.connection import ConnectionLost, RedisConnection, pack

log = logging.getLogger(__name__)

SWITCH_CHANNEL = "+switch-master"  # "<name> <old host> <old port> <new host> <new port>"
FAILOVER_STARTED = "+try-failover"  # "master <name> <host> <port>"
FAILOVER_ABORTED = (  # the same shape; the old primary stays
    "-failover-abort-not-elected",
    "-failover-abort-no-good-slave",
    "-failover-abort-slave-timeout",
)
ROLE_RETRY_S = 0.1  # the first wait before asking again for a node not (yet) primary
RETRY_S = 0.5  # watch_switches: the first wait after a failed round of Sentinels
RETRY_MAX_S = 5.0
HEARTBEAT_S = 5.0  # a PING this often finds a subscriber connection that died silently
CLIENT_NAME = "relay-sentinel"

# What talking to one server can fail with; anything else is a bug and propagates.
NETWORK_ERRORS = (ConnectionLost, OSError, trio.TooSlowError, redis.RedisError)


async def resolve_primary(address: RedisAddress, *, timeout_s: float) -> Node:
    """The primary of `address.master_name` as the first Sentinel that knows it says.

    The whole resolution takes at most `timeout_s`; each Sentinel gets an equal
    share of the time left, so one that hangs cannot starve the others.
    StorageUnavailable (naming the master and each Sentinel's failure) if none
    answers with an address."""
    deadline = trio.current_time() + timeout_s
    failures: list[str] = []
    for k, sentinel in enumerate(address.nodes):
        share = (deadline - trio.current_time()) / (len(address.nodes) - k)
        try:
            with trio.fail_after(max(share, 0.0)):
                node = await _ask(address, sentinel)
        except NETWORK_ERRORS as exc:
            failures.append(f"{_label(sentinel)}: {_describe(exc)}")
            continue
        if node is not None:
            return node
        failures.append(f"{_label(sentinel)}: does not know {address.master_name!r}")
    raise StorageUnavailable(
        f"no Sentinel names the primary of {address.master_name!r} ({'; '.join(failures)})"
    )


async def _ask(address: RedisAddress, sentinel: Node) -> Node | None:
    connection = await RedisConnection.open(address.sentinel_url(sentinel), client_name=CLIENT_NAME)
    try:
        [reply] = await connection.execute(
            [("SENTINEL", "GET-MASTER-ADDR-BY-NAME", address.master_name)]
        )
    finally:
        await connection.aclose()
    return _node(reply)


def _node(reply: Any) -> Node | None:
    """GET-MASTER-ADDR-BY-NAME's answer as a Node; None for nil; raises an error reply."""
    if isinstance(reply, Exception):
        raise reply
    if reply is None:
        return None
    if (
        isinstance(reply, list)
        and len(reply) == 2
        and all(isinstance(part, str) for part in reply)
        and reply[1].isdigit()
    ):
        return reply[0], int(reply[1])
    raise redis.InvalidResponse(f"not a master address: {reply!r:.80}")


async def open_primary(
    address: RedisAddress, *, client_name: str, timeout_s: float
) -> RedisConnection:
    """A connection to the primary whose ROLE says `master`, within about `timeout_s`.

    A named node that cannot be reached or is not (yet) the primary is asked
    about again, after a growing pause, while time is left; then
    StorageUnavailable."""
    deadline = trio.current_time() + timeout_s
    pause = ROLE_RETRY_S
    while True:
        node = await resolve_primary(address, timeout_s=deadline - trio.current_time())
        try:
            with trio.fail_after(max(deadline - trio.current_time(), 0.0)):
                connection = await RedisConnection.open(
                    address.node_url(node), client_name=client_name
                )
                try:
                    [role] = await connection.execute([("ROLE",)])
                except BaseException:
                    await connection.aclose()
                    raise
        except NETWORK_ERRORS as exc:
            why = f"it cannot be reached ({_describe(exc)})"
        else:
            if isinstance(role, list) and role and role[0] == "master":
                return connection
            await connection.aclose()
            why = f"its ROLE says {role[0] if isinstance(role, list) and role else role!r}"
        if trio.current_time() + pause >= deadline:
            raise StorageUnavailable(
                f"Sentinel names {_label(node)} as the primary of {address.master_name!r},"
                f" but {why}"
            )
        await trio.sleep(pause)
        pause *= 2


async def watch_switches(
    address: RedisAddress,
    on_switch: Callable[[Node], None],
    *,
    timeout_s: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_switch(new primary)` each time the Sentinels switch our master; run
    until cancelled, never raising for a Sentinel's failure.

    One subscriber connection on one Sentinel at a time, each tried in turn
    after a failure, with capped, jittered backoff after a round in which none
    answered. `task_status.started()` comes once subscribed the first time, or
    once every Sentinel has been tried once in vain: startup never waits longer
    than one round. After a reconnect, a switch missed meanwhile is reported
    too (the primary is asked for in the same write as the SUBSCRIBE)."""
    started = False
    known: Node | None = None  # the primary as last heard
    misses = 0  # attempts failed in a row
    for sentinel in itertools.cycle(address.nodes):
        try:
            with trio.fail_after(timeout_s):
                connection, node = await _subscribe(address, sentinel)
        except NETWORK_ERRORS as exc:
            log.warning("cannot subscribe on Sentinel %s (%s)", _label(sentinel), _describe(exc))
            misses += 1
            if misses % len(address.nodes) == 0:  # a whole round in vain
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(_backoff_s(misses // len(address.nodes) - 1))
            continue
        misses = 0
        if known is not None and node is not None and node != known:
            log.warning("the primary changed to %s while not subscribed", _label(node))
            on_switch(node)
        known = node or known
        if not started:
            task_status.started()
            started = True
        try:
            async with trio.open_nursery() as nursery:
                pong = _Pong()
                nursery.start_soon(_heartbeat, connection, pong, timeout_s)
                while True:
                    new = _switched_to(await connection.reply(), address.master_name, pong)
                    if new is not None and new != known:
                        known = new
                        on_switch(new)
        except* NETWORK_ERRORS as lost:
            log.warning(
                "lost Sentinel %s (%s); trying the next",
                _label(sentinel),
                _describe(lost.exceptions[0]),
            )
        finally:
            await connection.aclose()
        await trio.sleep(_backoff_s(0))


async def _subscribe(address: RedisAddress, sentinel: Node) -> tuple[RedisConnection, Node | None]:
    """A connection subscribed to switches, and the primary this Sentinel names now.
    Both commands go in one write, so Sentinel runs them back to back: no switch
    falls between the answer and the subscription."""
    connection = await RedisConnection.open(address.sentinel_url(sentinel), client_name=CLIENT_NAME)
    try:
        named, confirmed = await connection.execute(
            [
                ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", address.master_name),
                ("SUBSCRIBE", SWITCH_CHANNEL),
            ]
        )
        if isinstance(confirmed, Exception):
            raise confirmed
        return connection, _node(named)
    except BaseException:
        await connection.aclose()
        raise


class _Pong:
    def __init__(self) -> None:
        self.event = trio.Event()


async def _heartbeat(connection: RedisConnection, pong: _Pong, timeout_s: float) -> None:
    while True:
        await trio.sleep(HEARTBEAT_S)
        pong.event = trio.Event()
        await connection.send(pack(("PING",)))
        with trio.fail_after(timeout_s):
            await pong.event.wait()


def _switched_to(reply: Any, master_name: str | None, pong: _Pong) -> Node | None:
    """The new primary if `reply` is a +switch-master of our master; notes PONGs."""
    if isinstance(reply, list) and reply and reply[0] == "pong":
        pong.event.set()
        return None
    if not (
        isinstance(reply, list)
        and len(reply) == 3
        and reply[:2] == ["message", SWITCH_CHANNEL]
        and isinstance(reply[2], str)
    ):
        return None  # a subscribe confirmation, or nothing we asked for
    parts = reply[2].split(" ")
    if len(parts) != 5 or parts[0] != master_name or not parts[4].isdigit():
        return None
    return parts[3], int(parts[4])


def _backoff_s(failures: int) -> float:
    """Exponential, capped, with jitter (half fixed, half random), as the hub's."""
    delay: float = min(RETRY_MAX_S, RETRY_S * 2.0 ** min(failures, 16))
    return delay / 2 + random.uniform(0, delay / 2)


def _label(node: Node) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(exc: BaseException) -> str:
    """An exception as a reason (some, like ConnectionLost(), have no text)."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def watch_failovers(
    address: RedisAddress, on_failover: Callable[[bool], None], *, timeout_s: float
) -> None:
    """Call `on_failover(True)` when a Sentinel starts failing our master over, and
    `on_failover(False)` when it aborts; run until cancelled, never raising for a
    Sentinel's failure. One subscriber connection on every Sentinel, each kept up
    on its own (only the failover's leader announces its steps)."""
    async with trio.open_nursery() as nursery:
        for sentinel in address.nodes:
            nursery.start_soon(_watch_failovers_on, address, sentinel, on_failover, timeout_s)


async def _watch_failovers_on(
    address: RedisAddress,
    sentinel: Node,
    on_failover: Callable[[bool], None],
    timeout_s: float,
) -> None:
    failures = 0
    while True:
        try:
            with trio.fail_after(timeout_s):
                connection = await RedisConnection.open(
                    address.sentinel_url(sentinel), client_name=CLIENT_NAME
                )
        except NETWORK_ERRORS:
            await trio.sleep(_backoff_s(failures))  # watch_switches logs the Sentinels' state
            failures += 1
            continue
        failures = 0
        try:
            async with trio.open_nursery() as nursery:
                await connection.send(pack(("SUBSCRIBE", FAILOVER_STARTED, *FAILOVER_ABORTED)))
                pong = _Pong()
                nursery.start_soon(_heartbeat, connection, pong, timeout_s)
                while True:
                    started = _failover_news(await connection.reply(), address.master_name, pong)
                    if started is not None:
                        on_failover(started)
        except* NETWORK_ERRORS:
            pass
        finally:
            await connection.aclose()
        await trio.sleep(_backoff_s(0))


def _failover_news(reply: Any, master_name: str | None, pong: _Pong) -> bool | None:
    """True for a failover of our master started, False for one aborted, else None."""
    if isinstance(reply, list) and reply and reply[0] == "pong":
        pong.event.set()
        return None
    if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == "message"):
        return None
    channel, data = reply[1], reply[2]
    parts = data.split(" ") if isinstance(data, str) else []
    if len(parts) < 2 or parts[0] != "master" or parts[1] != master_name:
        return None
    if channel == FAILOVER_STARTED:
        return True
    return False if channel in FAILOVER_ABORTED else None
