"""Scale-out: several relays on one Redis behave as one relay (design.md, "Scale-out").

Messages cross relays through Redis and its pub/sub, and "one live session per
mailbox across all relay instances" (protocol.md) holds across them. First
with two relays in this process, then, as the acceptance test, with two real
`python -m relay serve` processes.
"""

from __future__ import annotations

from pathlib import Path

import trio
from process_fixtures import relay_process
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    close_code,
    raw_session,
    token,
)

from relay.client import open_relay
from relay.codes import CloseCode

pytest_plugins = ["relay_fixtures"]


async def test_scaleout_two_relays_in_one_process_deliver_across(make_relay: RelayFactory) -> None:
    first, second = await make_relay(), await make_relay()
    with trio.fail_after(DEADLINE_S):
        async with (
            open_relay(first.url, token("alice")) as alice,
            open_relay(second.url, token("bob")) as bob,
        ):
            await alice.send("bob", "across relays")
            message = await bob.receive()
            assert (message.sender, message.body) == ("alice", "across relays")
            await bob.send("alice", "and back")
            assert (await alice.receive()).body == "and back"


async def test_scaleout_one_live_session_per_mailbox_across_relays_4409(
    make_relay: RelayFactory,
) -> None:
    first, second = await make_relay(), await make_relay()
    with trio.fail_after(DEADLINE_S):
        async with (
            raw_session(first.url, "bob") as (old, _),
            open_relay(second.url, token("bob")) as new,
        ):
            assert await close_code(old) == CloseCode.REPLACED
            async with open_relay(first.url, token("alice")) as alice:
                await alice.send("bob", "to the newer session")
            assert (await new.receive()).body == "to the newer session"


# -- two real relay processes ------------------------------------------------------


async def test_acceptance_two_relay_processes_on_one_redis(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    async with (
        relay_process(redis_url, prefix, tmp_path / "a.log") as a,
        relay_process(redis_url, prefix, tmp_path / "b.log") as b,
    ):
        with trio.fail_after(DEADLINE_S):
            # a message sent through one reaches a recipient on the other
            async with (
                open_relay(a.url, token("alice")) as alice,
                open_relay(b.url, token("bob")) as bob,
            ):
                accepted = await alice.send("bob", "from relay a to relay b")
                message = await bob.receive()
                assert (message.id, message.sender) == (accepted["ids"]["bob"], "alice")
                assert message.body == "from relay a to relay b"
                assert await bob.ack([message.id]) == 1
                await bob.send("alice", "and back")
                assert (await alice.receive()).body == "and back"
            # the same mailbox on the second relay closes its session on the first with 4409
            async with (
                raw_session(a.url, "carol") as (on_a, _),
                open_relay(b.url, token("carol")) as on_b,
            ):
                assert await close_code(on_a) == CloseCode.REPLACED
                await on_b.send("carol", "the newer session works")
                assert (await on_b.receive()).body == "the newer session works"
    for relay in (a, b):
        assert relay.process.returncode is not None  # stopped, by PID
        assert relay.returncode == 0, f"relay did not stop cleanly on SIGTERM:\n{relay.log()}"
