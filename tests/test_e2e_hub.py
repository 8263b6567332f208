"""The hub is robust against what it did not publish itself."""

from __future__ import annotations

import trio
from relay_fixtures import DEADLINE_S, receive_n, token

from relay.client import open_relay
from relay.redis_sync import RedisClient
from relay.server import RunningRelay
from relay.store_redis import Keys

pytest_plugins = ["relay_fixtures"]


async def test_foreign_publishes_on_a_mailbox_channel_are_ignored(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    channel = Keys.of(prefix, "bob").channel
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("bob")) as bob:
            assert redis_client.publish(channel, "not a notice") == 1
            assert redis_client.publish(channel, b"\xff\xfe 12 \x80") == 1
            assert redis_client.publish(channel, "123 {not json") >= 1
            async with open_relay(relay.url, token("alice")) as alice:
                await alice.send("bob", "still here")
            (message,) = await receive_n(bob, 1)
            assert message.body == "still here"
