"""End to end: delivery (deliver frames, order, flow control, at-least-once), the `expired`
counter, and the acceptance tests for offline delivery and redelivery.
"""

from __future__ import annotations

from typing import Any

import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    deliveries,
    keys_under,
    msg_key,
    poll_until,
    raw_session,
    receive_n,
    receive_until,
    recv,
    request,
    send_json,
    token,
    wall_ms,
)
from trio_websocket import WebSocketConnection

from relay.client import Message, open_relay
from relay.redis.admin import RedisClient
from relay.redis.pump import RedisPump
from relay.server import RunningRelay
from relay.store_redis import Keys, RedisMailboxStore

pytest_plugins = ["relay_fixtures"]


MESSAGE_FIELDS = {"id", "from", "body", "sent_at", "expires_at"}


async def assert_nothing_delivered(ws: WebSocketConnection, window_s: float) -> None:
    """No deliver frame within `window_s`: a negative can only be observed over a window."""
    with trio.move_on_after(window_s):
        while True:
            frame = await recv(ws)
            assert frame["type"] != "deliver", frame


# -- deliver ------------------------------------------------------------------


async def test_deliver_frame_fields_and_from_is_the_authenticated_sender(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            raw_session(relay.url, "alice") as (alice, _),
            raw_session(relay.url, "bob") as (bob, _),
        ):
            before = wall_ms()
            accepted = await request(
                alice,
                {
                    "type": "send",
                    "ref": "f",
                    "to": "bob",
                    "body": "hi",
                    "ttl": 60,
                    "from": "mallory",
                },
            )
            assert accepted["type"] == "accepted"
            frame = await recv(bob)
    assert set(frame) == {"type", "messages"}
    assert frame["type"] == "deliver"
    (message,) = frame["messages"]
    assert set(message) == MESSAGE_FIELDS
    assert message["id"] == accepted["ids"]["bob"]
    assert message["from"] == "alice"
    assert message["body"] == "hi"
    assert before <= message["sent_at"] <= wall_ms()
    assert message["expires_at"] == accepted["expires_at"] == message["sent_at"] + 60_000


async def test_deliver_order_within_a_mailbox_is_the_accepted_order(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            open_relay(relay.url, token("alice")) as alice,
            open_relay(relay.url, token("carol")) as carol,
            open_relay(relay.url, token("bob")) as bob,
        ):
            order: list[str] = []
            for n in range(40):
                sender = alice if n % 2 else carol
                accepted = await sender.send("bob", f"m{n}", ref=None)
                order.append(accepted["ids"]["bob"])
            got = await receive_n(bob, 40)
    assert [m.id for m in got] == order
    assert [m.body for m in got] == [f"m{n}" for n in range(40)]


async def test_deliver_waiting_messages_first_oldest_first(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(5):
                await alice.send("bob", f"waiting {n}")
            async with open_relay(relay.url, token("bob")) as bob:
                for n in range(3):
                    await alice.send("bob", f"live {n}")
                got = await receive_n(bob, 8)
    assert [m.body for m in got] == [f"waiting {n}" for n in range(5)] + [
        f"live {n}" for n in range(3)
    ]
    assert [m.sent_at_ms for m in got] == sorted(m.sent_at_ms for m in got)


async def test_deliver_frame_carries_several_messages_when_a_backlog_exists(
    relay: RunningRelay,
) -> None:
    first, rest = await _backlog_delivered(relay, [f"b{n}" for n in range(10)])
    assert len(first) > 1
    assert [m["body"] for m in first + rest] == [f"b{n}" for n in range(10)]


async def test_a_backlog_comes_first_in_a_short_read_then_in_full_pages(
    relay: RunningRelay,
) -> None:
    """A session's first read is short (its first messages come sooner); the reads after
    it take a whole page, so the window fills without waiting for acks."""
    first, rest = await _backlog_delivered(relay, [f"p{n}" for n in range(100)])
    assert 1 <= len(first) <= 32  # relay/session.py FIRST_PAGE
    assert [m["body"] for m in first + rest] == [f"p{n}" for n in range(100)]


async def _backlog_delivered(
    relay: RunningRelay, bodies: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Alice sends `bodies` to bob while he is away; bob connects and reads them all,
    acking none: the messages of his first `deliver` frame, and those of the others."""
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for body in bodies:
                await alice.send("bob", body)
        async with raw_session(relay.url, "bob") as (bob, _):
            first = await recv(bob)
            assert first["type"] == "deliver"
            rest = await deliveries(bob, len(bodies) - len(first["messages"]))
    return first["messages"], rest


async def test_deliver_flow_control_at_most_max_inflight_unacked(make_relay: RelayFactory) -> None:
    relay = await make_relay(max_inflight=5)
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(20):
                await alice.send("bob", f"f{n}")
        async with raw_session(relay.url, "bob") as (bob, welcome):
            assert welcome["max_inflight"] == 5
            got = await deliveries(bob, 5)
            await assert_nothing_delivered(bob, 0.3)
            acked = await request(
                bob, {"type": "ack", "ids": [m["id"] for m in got[:2]], "ref": "a1"}
            )
            assert acked["count"] == 2
            got += await deliveries(bob, 2)
            await assert_nothing_delivered(bob, 0.2)
            while len(got) < 20:
                await send_json(bob, {"type": "ack", "ids": [m["id"] for m in got[-5:]]})
                got += await deliveries(bob, min(5, 20 - len(got)))
    assert [m["body"] for m in got] == [f"f{n}" for n in range(20)]


async def test_deliver_at_least_once_unacked_messages_come_again_next_session(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(3):
                await alice.send("bob", f"m{n}")
        async with open_relay(relay.url, token("bob")) as bob:
            first = await receive_n(bob, 3)
        async with open_relay(relay.url, token("bob")) as bob:
            again = await receive_n(bob, 3)
    assert [m.id for m in again] == [m.id for m in first]


class _Unheard(Keys):
    @property
    def channel(self) -> str:
        return self.base + "unheard"  # a channel no relay subscribes to


class UnheardStore(RedisMailboxStore):
    """The relay's store, whose notices go where nobody listens: a lost notice."""

    def keys(self, mailbox: str) -> Keys:
        return _Unheard(Keys.of(self.prefix, mailbox).base)


async def test_deliver_backstop_delivers_a_message_whose_notice_was_lost_and_repeats_none(
    make_relay: RelayFactory, pump: RedisPump, prefix: str
) -> None:
    """The periodic re-read of the mailbox (the backstop) finds a message no notice
    announced, and does not deliver again the unacked ones it re-reads."""
    relay = await make_relay(backstop_drain_s=0.2)
    unheard = UnheardStore(pump, prefix=prefix, retention_s=3600)
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(5):
                await alice.send("bob", f"early {n}")
            async with open_relay(relay.url, token("bob")) as bob:
                first = await receive_n(bob, 5)
                for n in range(5):
                    await alice.send("bob", f"live {n}")
                first += await receive_n(bob, 5)
                await unheard.send("alice", ["bob"], "lost notice", 60, None, wall_ms())
                (found,) = await receive_n(bob, 1)  # only a backstop re-read can find it
                await alice.send("bob", "marker")
                rest = await receive_until(bob, "marker")
    assert len({m.id for m in first}) == 10
    assert found.body == "lost notice"
    assert [m.body for m in rest] == ["marker"]


async def test_deliver_in_order_exactly_once_when_wake_ups_overflow_the_session_buffer(
    make_relay: RelayFactory,
) -> None:
    """300 KB of wake-ups for a session that may hold only 10 unacked: it must fall back
    to reading Redis, without gaps or repeats."""
    relay = await make_relay(max_inflight=10, rate_limit_per_s=10_000, rate_burst=10_000)
    count, body = 300, "y" * 1000
    with trio.fail_after(3 * DEADLINE_S):
        async with (
            open_relay(relay.url, token("alice")) as alice,
            open_relay(relay.url, token("bob")) as bob,
        ):
            for n in range(count):
                await alice.send("bob", f"{n} {body}", ref=None)
            got: list[Message] = []
            while len(got) < count:
                batch = await receive_n(bob, 10)
                await bob.ack([m.id for m in batch], wait=False)
                got += batch
            await alice.send("bob", "marker")
            rest = await receive_until(bob, "marker")
    assert [int(m.body.split()[0]) for m in got] == list(range(count))
    assert [m.body for m in rest] == ["marker"]


async def test_deliver_online_recipient_gets_messages_sent_while_pubsub_was_down(
    make_relay: RelayFactory, redis_client: RedisClient
) -> None:
    """Pub/sub is at-most-once: after the relay's pub/sub connection comes back, its sessions
    read their mailboxes from Redis (the periodic re-read is far off here).

    redis-py reconnects within the read that saw the kill, so the gap may be too short
    to lose a wake-up; what this holds the relay to is that no message is lost or repeated."""
    relay = await make_relay(backstop_drain_s=3600)
    with trio.fail_after(DEADLINE_S):
        async with (
            open_relay(relay.url, token("alice")) as alice,
            open_relay(relay.url, token("bob")) as bob,
        ):
            await alice.send("bob", "before")
            assert (await bob.receive()).body == "before"
            assert redis_client.client_kill_filter(_type="pubsub") >= 1
            await alice.send("bob", "while pub/sub was down")
            await alice.send("bob", "after")
            got = await receive_until(bob, "after")
    assert [m.body for m in got] == ["while pub/sub was down", "after"]


async def test_welcome_expired_counts_messages_that_ran_out_undelivered(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            short = await alice.send("bob", "too late", ttl_s=1)
            await alice.send("bob", "in time")
        key = msg_key(prefix, "bob", short["ids"]["bob"])
        assert 0 < redis_client.pttl(key) <= 1000
        await poll_until(lambda: not redis_client.exists(key))  # Redis's clock runs the ttl out
        async with open_relay(relay.url, token("bob")) as bob:
            assert bob.welcome["expired"] == 1
            message = await bob.receive()
            assert message.body == "in time"
        async with open_relay(relay.url, token("bob")) as bob:
            assert bob.welcome["expired"] == 0  # counted since the last session only
            assert (await bob.receive()).id == message.id


# -- acceptance ---------------------------------------------------------------------


async def test_acceptance_offline_delivery_500_messages_in_order_exactly_once_then_no_keys(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    count = 500
    relay = await make_relay(rate_limit_per_s=10_000, rate_burst=10_000)  # not a rate test
    with trio.fail_after(3 * DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(count):
                await alice.send("bob", f"offline {n}", ref=None)
        assert len([k for k in keys_under(redis_client, prefix) if ":msg:" in k]) == count
        async with open_relay(relay.url, token("bob")) as bob:
            got: list[Message] = []
            while len(got) < count:  # ack as we go: at most max_inflight (256) unacked
                batch = await receive_n(bob, 100)
                assert await bob.ack([m.id for m in batch]) == 100
                got += batch
            assert [m.body for m in got] == [f"offline {n}" for n in range(count)]
            assert len({m.id for m in got}) == count
            # exactly once in this session: the next message is the marker
            await alice_sends_marker(relay, "bob")
            rest = await receive_until(bob, "marker")
            assert [m.body for m in rest] == ["marker"]
            assert await bob.ack([rest[0].id]) == 1
    assert keys_under(redis_client, prefix) == []


async def alice_sends_marker(relay: RunningRelay, to: str) -> None:
    async with open_relay(relay.url, token("alice")) as alice:
        await alice.send(to, "marker", ref=None)


async def test_acceptance_redelivery_unacked_come_again_acked_never_come_back(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(6):
                await alice.send("bob", f"m{n}")
        async with open_relay(relay.url, token("bob")) as bob:
            first = await receive_n(bob, 6)
            acked = [m.id for m in first[::2]]
            assert await bob.ack(acked) == 3
        # disconnected without acking m1, m3, m5
        async with open_relay(relay.url, token("bob")) as bob:
            again = await receive_n(bob, 3)
            assert [m.body for m in again] == ["m1", "m3", "m5"]
            assert [m.id for m in again] == [m.id for m in first[1::2]]
            await bob.ack([again[0].id])
        await alice_sends_marker(relay, "bob")
        async with open_relay(relay.url, token("bob")) as bob:
            rest = await receive_until(bob, "marker")
    assert [m.body for m in rest] == ["m3", "m5", "marker"]
    assert not set(acked) & {m.id for m in rest}
