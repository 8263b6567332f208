"""The relay behind Sentinel: SENTINEL FAILOVER under a steady send load. The relay follows
the new primary (within 10 s, without a restart) and loses nothing it accepted: it stops
writing at the failover's first step (+try-failover), before the replica is promoted, and
sends are refused (storage_unavailable, never written) until +switch-master. The test
records the numbers for README's Durability section."""

from __future__ import annotations

import time

import pytest
import trio
from relay_fixtures import poll_until, relay_config, send_steadily, serving, token, unique
from sentinel_fixtures import SentinelGroup

from relay.client import open_relay
from relay.redis.topology import SentinelTopology
from relay.store_redis import RedisMailboxStore

pytest_plugins = ["relay_fixtures", "sentinel_fixtures"]

FOLLOW_S = 10.0


@pytest.mark.failover
async def test_sentinel_failover_under_load_loses_nothing_accepted(
    fresh_sentinel: SentinelGroup, prefix: str
) -> None:
    group = fresh_sentinel
    old = group.primary()
    mailboxes = [unique(f"box{i}") for i in range(10)]
    accepted: dict[str, list[tuple[float, str]]] = {m: [] for m in mailboxes}
    refused: list[str] = []
    stored: dict[str, set[str]] = {m: set() for m in mailboxes}
    async with serving(relay_config(group.url, prefix)) as relay:
        store = relay.services.store
        assert isinstance(store, RedisMailboxStore)
        topology = store.pump.topology
        assert isinstance(topology, SentinelTopology)
        url = f"ws://127.0.0.1:{relay.port}/v1"
        stop = trio.Event()

        with trio.fail_after(60):
            # Nobody reads during the failover: what the new primary holds is what survived.
            async with open_relay(url, token("alice")) as alice, trio.open_nursery() as nursery:
                for mailbox in mailboxes:
                    nursery.start_soon(
                        send_steadily, alice, mailbox, stop, accepted[mailbox], refused
                    )
                await poll_until(lambda: all(len(accepted[m]) >= 20 for m in mailboxes))
                failover_at = time.monotonic()
                new = await trio.to_thread.run_sync(group.failover)
                await poll_until(lambda: topology.switches > 0)
                switched_at = time.monotonic()
                after = {m: len(accepted[m]) for m in mailboxes}
                await poll_until(lambda: all(len(accepted[m]) >= after[m] + 20 for m in mailboxes))
                stop.set()

            async def read_back(mailbox: str) -> None:
                """Every message accepted after the switch is there (the backlog comes in
                order, so what survived from before it arrives first)."""
                want = {i for at, i in accepted[mailbox] if at > switched_at}
                async with open_relay(url, token(mailbox)) as session:
                    while not want <= stored[mailbox]:
                        stored[mailbox].add((await session.receive()).id)

            async with trio.open_nursery() as nursery:
                for mailbox in mailboxes:
                    nursery.start_soon(read_back, mailbox)
    assert new != old
    follow_s = switched_at - failover_at
    assert follow_s < FOLLOW_S, follow_s
    lost = [at - failover_at for m in mailboxes for at, i in accepted[m] if i not in stored[m]]
    total = sum(len(a) for a in accepted.values())
    print(
        f"Sentinel failover: the relay switched {follow_s:.2f} s after SENTINEL FAILOVER; "
        f"{len(lost)} of {total} accepted messages lost, accepted between "
        f"{min(lost, default=0):.2f} and {max(lost, default=0):.2f} s after the command; "
        f"{len(refused)} sends refused meanwhile ({sorted(set(refused))})"
    )
    # Nothing accepted after the switch is lost (read_back found them all), and nothing
    # before it: between the failover's start and the switch nothing was written.
    assert not lost, lost
    assert set(refused) <= {"storage_unavailable"}
