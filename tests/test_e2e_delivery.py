"""End to end: delivery (deliver frames, order, flow control, at-least-once), the `expired`
counter, and the ephemerality contract of protocol.md, with the acceptance tests for offline
delivery and redelivery.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    keys_under,
    poll_until,
    raw_session,
    receive_n,
    receive_until,
    recv,
    relay_config,
    request,
    send_json,
    signed_token,
    token,
    wall_ms,
)
from trio_websocket import ConnectionClosed, WebSocketConnection

from relay.cli import main as relay_cli
from relay.client import Message, RelayClientError, open_relay
from relay.embedded import EmbeddedServer
from relay.errors import UnsafeRedis
from relay.redis_sync import RedisClient, connect
from relay.server import RunningRelay, serve_relay

pytest_plugins = ["relay_fixtures"]

MESSAGE_FIELDS = {"id", "from", "body", "sent_at", "expires_at"}


def msg_key(prefix: str, mailbox: str, message_id: str) -> str:
    return f"{prefix}{{{mailbox}}}:msg:{message_id}"


async def deliveries(ws: WebSocketConnection, n: int) -> list[dict[str, Any]]:
    """Read frames until `n` messages were delivered (other frames are dropped)."""
    messages: list[dict[str, Any]] = []
    while len(messages) < n:
        frame = await recv(ws)
        if frame["type"] == "deliver":
            messages += frame["messages"]
    assert len(messages) == n, f"{len(messages)} delivered, expected {n}"
    return messages


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
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(10):
                await alice.send("bob", f"b{n}")
        async with raw_session(relay.url, "bob") as (bob, _):
            first = await recv(bob)
            assert first["type"] == "deliver"
            assert len(first["messages"]) > 1
            rest = await deliveries(bob, 10 - len(first["messages"]))
    assert [m["body"] for m in first["messages"] + rest] == [f"b{n}" for n in range(10)]


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


async def test_deliver_not_repeated_within_one_session(make_relay: RelayFactory) -> None:
    """The periodic re-read of the mailbox (the backstop) must not deliver a message twice."""
    relay = await make_relay(backstop_drain_s=0.05)
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(5):
                await alice.send("bob", f"early {n}")
            async with open_relay(relay.url, token("bob")) as bob:
                first = await receive_n(bob, 5)
                for n in range(5):
                    await alice.send("bob", f"live {n}")
                first += await receive_n(bob, 5)
                await trio.sleep(0.4)  # several backstop re-reads of the 10 unacked messages
                await alice.send("bob", "marker")
                rest = await receive_until(bob, "marker")
    assert len({m.id for m in first}) == 10
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


# -- the ephemerality contract ------------------------------------------------------


async def test_ephemerality_1_acked_means_the_copy_is_gone_from_redis(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            accepted = await alice.send(["bob", "carol"], "gone when acked")
        key = msg_key(prefix, "bob", accepted["ids"]["bob"])
        assert redis_client.exists(key) == 1
        async with raw_session(relay.url, "bob") as (bob, _):
            (message,) = await deliveries(bob, 1)
            acked = await request(bob, {"type": "ack", "ids": [message["id"]], "ref": "a"})
            assert acked["count"] == 1
            # `acked` was sent after the deletion: nothing of the copy is left
            assert redis_client.exists(key) == 0
            assert redis_client.zscore(f"{prefix}{{bob}}:idx", message["id"]) is None
    assert redis_client.exists(msg_key(prefix, "carol", accepted["ids"]["carol"])) == 1


async def _busy_mixed_run(relay: RunningRelay, redis_client: RedisClient, prefix: str) -> None:
    """Sends (single, multi-recipient, with and without ref, repeated refs, short ttls, refused
    for a full mailbox), deliveries, acks with and without ref, and expiries.

    The relay must run with max_mailbox_messages=25."""
    async with (
        open_relay(relay.url, token("alice")) as alice,
        open_relay(relay.url, token("bob")) as bob,
    ):
        expiring = await alice.send(["carol", "dave"], "short", ttl_s=1)
        for n in range(10):
            await alice.send(["bob", "carol", "dave"], f"multi {n}", ttl_s=30 + n)
            await alice.send("bob", f"plain {n}", ref=None)
            await alice.send("erin", f"ref {n}", ref=f"same-{n % 5}", ttl_s=60)
            await bob.send("alice", f"back {n}", ttl_s=5)
        for n in range(25):
            await alice.send("frank", f"fill {n}", ttl_s=20)
        with pytest.raises(RelayClientError) as full:
            await alice.send(["gina", "frank"], "all or nothing", ref="full")
        assert full.value.code == "mailbox_full"
        got = await receive_n(bob, 20)
        assert await bob.ack([m.id for m in got[::2]]) == 10
        got = await receive_n(alice, 10)
        await alice.ack([m.id for m in got[:5]], wait=False)
        await alice.send("alice", "end")
        await receive_until(alice, "end")
    key = msg_key(prefix, "carol", expiring["ids"]["carol"])
    await poll_until(lambda: not redis_client.exists(key))
    async with open_relay(relay.url, token("carol")) as carol:
        assert carol.welcome["expired"] == 1
        got = await receive_n(carol, 10)
        await carol.ack([m.id for m in got[5:]])
    assert not any("{gina}" in key for key in keys_under(redis_client, prefix))


async def test_ephemerality_2_every_key_has_a_ttl_within_retention_after_a_busy_run(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    retention_ms = 120_000
    relay = await make_relay(retention_s=120, max_mailbox_messages=25)
    with trio.fail_after(3 * DEADLINE_S):
        await _busy_mixed_run(relay, redis_client, prefix)
    keys = keys_under(redis_client, prefix)
    assert keys
    pttls = {key: redis_client.pttl(key) for key in keys}
    bad = {key: pttl for key, pttl in pttls.items() if not 0 < pttl <= retention_ms}
    assert not bad, bad


async def test_ephemerality_3_no_bodies_or_tokens_in_the_logs(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_body = "body-7f3a9c1e-never-logged"
    relay = await make_relay(max_body_bytes=1024, auth_timeout_s=0.5)
    alice_token = token("alice")
    bad_token = signed_token({"sub": "alice", "exp": 1, "note": secret_body})
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, alice_token) as alice:
            await alice.send("bob", secret_body)
            await alice.send(["bob", "carol"], secret_body + " multi", ref="r1")
            for bad in (
                {"type": "send", "to": "bob", "body": secret_body * 100},  # too_large
                {"type": "send", "to": "not ok!", "body": secret_body},
                {"type": "send", "to": "bob", "body": secret_body, "ttl": 0},
                {"type": secret_body},
                {"type": "auth", "token": alice_token},
            ):
                await send_json(alice.ws, bad)
            await alice.send("alice", "sync")  # errors above are answered before this
            await alice.receive()
        async with raw_session(relay.url, "bob") as (bob, _):
            await deliveries(bob, 2)
        with pytest.raises(ConnectionClosed):
            async with open_relay(relay.url, bad_token, auth="frame"):
                raise AssertionError("the expired token was accepted")
    assert caplog.records  # the relay did log something at DEBUG
    text = caplog.text + "".join(str(record.args) for record in caplog.records)
    assert secret_body not in text
    assert alice_token not in text
    assert bad_token not in text
    for part in alice_token.split("."):
        assert part not in text


async def test_ephemerality_3_logs_name_mailboxes_only_pseudonymously(
    relay: RunningRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # debug logging would show mailbox ids as they are
    sender, recipient = "sender-4b1d9e", "recipient-8c2f7a"
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token(sender)) as alice:
            await alice.send(recipient, "x")
            async with open_relay(relay.url, token(recipient)) as bob:
                await bob.receive()
                async with open_relay(relay.url, token(recipient)):  # 4409 for bob: logged
                    pass
        with pytest.raises(ConnectionClosed):
            async with open_relay(relay.url, signed_token({"sub": sender, "exp": 1})):
                pass
        relay.shutdown()
    text = caplog.text + "".join(str(record.args) for record in caplog.records)
    assert caplog.records
    assert sender not in text
    assert recipient not in text


async def test_ephemerality_4_startup_refuses_a_persisting_redis(
    make_relay: RelayFactory, redis_server: EmbeddedServer, prefix: str
) -> None:
    with EmbeddedServer(binary=redis_server.binary) as persisting:
        client = connect(persisting.url)
        client.config_set("appendonly", "yes")
        try:
            with trio.fail_after(DEADLINE_S), pytest.raises(UnsafeRedis):
                await serve_relay(relay_config(persisting.url, prefix))
            relay = await make_relay(redis_url=persisting.url, allow_persistent_redis=True)
            with trio.fail_after(DEADLINE_S):
                async with open_relay(relay.url, token("alice")) as alice:
                    await alice.send("alice", "it runs")
                    assert (await alice.receive()).body == "it runs"
        finally:
            client.config_set("appendonly", "no")  # else the server takes 5 s to stop
            client.close()


async def test_ephemerality_4_evicting_redis_refused_unless_allowed_then_a_warning(
    make_relay: RelayFactory,
    redis_server: EmbeddedServer,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """protocol.md asks for a warning; the relay refuses unless --allow-eviction (README.md),
    and warns when allowed."""
    caplog.set_level(logging.WARNING)
    with EmbeddedServer(binary=redis_server.binary) as evicting:
        client = connect(evicting.url)
        try:
            client.config_set("maxmemory-policy", "allkeys-lru")
        finally:
            client.close()
        with trio.fail_after(DEADLINE_S), pytest.raises(UnsafeRedis, match="maxmemory-policy"):
            await serve_relay(relay_config(evicting.url, prefix))
        relay = await make_relay(redis_url=evicting.url, allow_eviction=True)
        assert "maxmemory-policy" in caplog.text
        with trio.fail_after(DEADLINE_S):
            async with open_relay(relay.url, token("alice")) as alice:
                await alice.send("alice", "it runs")
                assert (await alice.receive()).body == "it runs"


async def test_ephemerality_5_relay_audit_exits_0_after_traffic(
    make_relay: RelayFactory,
    redis_client: RedisClient,
    redis_url: str,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await make_relay(retention_s=120, max_mailbox_messages=25)
    with trio.fail_after(3 * DEADLINE_S):
        await _busy_mixed_run(relay, redis_client, prefix)
    args = ["audit", "--redis-url", redis_url, "--key-prefix", prefix, "--retention", "120s"]
    status = await trio.to_thread.run_sync(run_cli, args)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "messages: 0" not in out  # it audited real traffic


def run_cli(args: list[str]) -> int:
    """`relay.cli.main(args)`, putting back the logging set-up the command replaces."""
    loggers = [logging.getLogger(name) for name in ("", "trio-websocket", "trio_websocket")]
    saved = [(logger.handlers[:], logger.level) for logger in loggers]
    try:
        return relay_cli(args)
    finally:
        for logger, (handlers, level) in zip(loggers, saved, strict=True):
            logger.handlers[:] = handlers
            logger.setLevel(level)


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
