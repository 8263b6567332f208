"""The hub against what it did not publish, and against a Redis that misbehaves.

Real relays on real Redis servers; faults come from a loopback proxy the test switches
(tests/redis_proxy.py), from CLIENT KILL, and from a real ACL user.
"""

from __future__ import annotations

import logging
import secrets

import pytest
import redis
import trio
from redis_proxy import RedisProxy
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    close_code,
    http,
    poll_until,
    raw_ws,
    receive_n,
    token,
)

from relay.client import open_relay
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient
from relay.server import RunningRelay
from relay.store_redis import Keys

pytest_plugins = ["relay_fixtures"]


async def test_foreign_publishes_on_a_mailbox_channel_are_ignored(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    channel = Keys.of(prefix, "bob").channel
    # Publish as the relay does: on a cluster, sharded (the hub SSUBSCRIBEs there).
    publish = (
        redis_client.spublish
        if isinstance(redis_client, redis.RedisCluster)
        else redis_client.publish
    )
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("bob")) as bob:
            assert publish(channel, "not a notice") == 1
            assert publish(channel, b"\xff\xfe 12 \x80") == 1
            assert publish(channel, "123 {not json") >= 1
            assert publish(channel, '² {"id":"x"}') == 1
            assert publish(channel, "9" * 5000 + ' {"id":"x"}') == 1
            # the shape of a notice, but not JSON: it would break the deliver frame
            assert publish(channel, '17 {"id":"19ac8e1f2b3-Xk3p9QaZ",') == 1
            async with open_relay(relay.url, token("alice")) as alice:
                await alice.send("bob", "still here")
            (message,) = await receive_n(bob, 1)
            assert message.body == "still here"
    assert relay.services.metrics.hub_ignored_notices._value.get() == 6


def hub_was_never_lost(relay: RunningRelay, caplog: pytest.LogCaptureFixture) -> None:
    assert relay.services.metrics.hub_reconnects._value.get() == 0
    assert not [r for r in caplog.records if "connection lost" in r.getMessage()]


async def test_an_idle_relay_stays_ready_over_many_heartbeats(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With no channel subscribed, Redis answers PING with +PONG, not the subscribed
    mode's reply: both are a heartbeat."""
    caplog.set_level(logging.INFO, logger="relay")
    relay = await make_relay(ops_port=free_loopback_port(), hub_heartbeat_s=0.02)

    async def twenty_heartbeats_while_ready() -> bool:
        assert (await http(relay.ops_port, "/readyz")).status == 200
        return relay.services.hub.heartbeats >= 20

    with trio.fail_after(DEADLINE_S):
        await poll_until(twenty_heartbeats_while_ready, 0.02)
    hub_was_never_lost(relay, caplog)


async def test_a_subscribed_relay_counts_its_heartbeats_too(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    relay = await make_relay(hub_heartbeat_s=0.02)
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("bob")):
            start = relay.services.hub.heartbeats
            await poll_until(lambda: relay.services.hub.heartbeats >= start + 10, 0.02)
    hub_was_never_lost(relay, caplog)


async def wait_for(port: int, path: str, status: int, timeout_s: float = 3 * DEADLINE_S) -> bytes:
    """Poll `path` until it answers `status`; its body."""
    response = await http(port, path)

    async def answers() -> bool:
        nonlocal response
        response = await http(port, path)
        return response.status == status

    with trio.fail_after(timeout_s):
        await poll_until(answers)
    return response.body


async def test_a_redis_that_hangs_up_or_never_answers_is_retried_and_reported(
    make_relay: RelayFactory,
    redis_server: EmbeddedServer,
    redis_client: RedisClient,
    nursery: trio.Nursery,
) -> None:
    proxy = RedisProxy(redis_server.socket_path)
    await nursery.start(proxy.run)
    relay = await make_relay(
        redis_url=proxy.url, ops_port=free_loopback_port(), hub_unhealthy_after_s=0.3
    )
    ops = relay.ops_port
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("bob")):  # the hub's connection is pub/sub now
            assert (await http(ops, "/readyz")).status == 200
            proxy.mode = "close"
            assert redis_client.client_kill_filter(_type="pubsub") >= 1
    assert b"pub/sub" in await wait_for(ops, "/readyz", 503)
    assert b"pub/sub" in await wait_for(ops, "/healthz", 503)
    with trio.fail_after(DEADLINE_S):
        await poll_until(lambda: proxy.accepted["close"] >= 3)  # retried, the relay still up
    proxy.mode = "hang"
    with trio.fail_after(DEADLINE_S):
        await poll_until(lambda: proxy.accepted["hang"] >= 1)
    proxy.mode = "forward"  # the hanging attempt must time out, and the next one succeed
    await wait_for(ops, "/healthz", 200)
    await wait_for(ops, "/readyz", 200)
    with trio.fail_after(DEADLINE_S):
        async with (
            open_relay(relay.url, token("bob")) as bob,
            open_relay(relay.url, token("alice")) as alice,
        ):
            await alice.send("bob", "after the outage")
            assert (await bob.receive()).body == "after the outage"


async def test_a_refused_subscribe_closes_the_session_1013_and_says_why(
    make_relay: RelayFactory,
    redis_server: EmbeddedServer,
    redis_client: RedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL user whose channels are `&relay:*` only, with another key prefix: NOPERM."""
    user, password = f"hub-{secrets.token_hex(4)}", secrets.token_hex(16)
    redis_client.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        commands=["+@all"],
        keys=["*"],
        channels=["relay:*"],
        reset_channels=True,
    )
    try:
        url = f"unix://{user}:{password}@{redis_server.socket_path}"
        relay = await make_relay(redis_url=url, ops_port=free_loopback_port())
        with trio.fail_after(DEADLINE_S):
            async with raw_ws(relay.url, bearer=token("bob")) as ws:
                assert await close_code(ws) == 1013
        assert b"NOPERM" in await wait_for(relay.ops_port, "/readyz", 503)
        assert [r for r in caplog.records if "NOPERM" in r.getMessage()]

        redis_client.acl_setuser(user, channels=["*"])  # fixed: the next session works
        with trio.fail_after(DEADLINE_S):
            async with (
                open_relay(relay.url, token("bob")) as bob,
                open_relay(relay.url, token("alice")) as alice,
            ):
                await alice.send("bob", "allowed now")
                assert (await bob.receive()).body == "allowed now"
        await wait_for(relay.ops_port, "/readyz", 200)
    finally:
        redis_client.acl_deluser(user)


async def test_a_mailbox_that_returns_before_redis_answered_its_unsubscribe_is_served(
    make_relay: RelayFactory, redis_server: EmbeddedServer, redis_client: RedisClient
) -> None:
    """Bob leaves and comes back while Redis holds the hub's UNSUBSCRIBE (CLIENT PAUSE):
    the answer to that UNSUBSCRIBE arrives after the new SUBSCRIBE went out, and must not
    be taken for Redis ending the new subscription (which left the session waiting for a
    confirmation that never came: closed 1013)."""
    relay = await make_relay()
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("bob")):
            redis_client.client_pause(1000, all=True)
        await poll_until(lambda: not relay.services.sessions)
        async with open_relay(relay.url, token("bob")) as bob:
            async with open_relay(relay.url, token("alice")) as alice:
                await alice.send("bob", "after the pause")
            assert (await bob.receive()).body == "after the pause"
