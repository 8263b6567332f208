"""open_client's normal exit against a relay process: the acks it sends as it closes are
confirmed (`acked`) before it closes, so what it received is gone from Redis when the block
ends. A relay need not act on an ack it reads just before the Close: this relay cancels the
store calls of a session its client ended, so an unconfirmed last ack was often lost."""

from __future__ import annotations

from pathlib import Path

import trio
from process_fixtures import relay_process
from relay_fixtures import keys_under, token, unique

from relay.client import open_client, open_relay
from relay.redis.admin import RedisClient

pytest_plugins = ["relay_fixtures"]

ROUNDS = 20
STEP_S = 30.0


async def test_what_a_client_received_is_gone_when_its_block_ends(
    redis_url: str, prefix: str, tmp_path: Path, redis_client: RedisClient
) -> None:
    async with relay_process(redis_url, prefix, tmp_path / "relay.log") as relay:
        with trio.fail_after(STEP_S):
            left = []
            for i in range(ROUNDS):
                bob = unique("bob")
                async with open_relay(relay.url, token("alice")) as alice:
                    await alice.send(bob, f"m{i}")
                async with open_client(relay.url, token(bob)) as client:
                    assert (await client.receive()).body == f"m{i}"
                # No polling: the block's end waited for the relay's `acked`.
                left += keys_under(redis_client, f"{prefix}{{{bob}}}:msg:")
    assert left == []
