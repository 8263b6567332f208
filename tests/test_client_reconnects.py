"""relay.client's RelayClient as an application uses it, against relays and Valkey/Redis in
processes of their own: a relay killed (SIGKILL) and restarted on its port with sends
pending, redeliveries, batched acks (the relay's /metrics), backoff after 1013 while the
storage is down, 4409, token refresh after 4401, and retried `rate_limited` sends."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from process_fixtures import RestartableRelay, relay_process, restartable_relay, run_cli
from relay_fixtures import SECRET, poll_until, scrape, token, unique

from relay.client import (
    EpochChanged,
    Event,
    Reconnecting,
    RelayClient,
    RelayClientError,
    RelayStopped,
    Token,
    Welcomed,
    open_client,
    open_relay,
)
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient, connect

pytest_plugins = ["relay_fixtures"]

STEP_S = 30.0  # one scenario, relay restarts included, on a small shared machine
PAUSE_ATTEMPTS = 3  # pauses of Redis tried until a send in flight is answered `unconfirmed`


@pytest.fixture
async def relay(redis_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[RestartableRelay]:
    async with restartable_relay(redis_url, prefix, tmp_path) as relay:
        yield relay


@pytest.fixture
def own_server(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the same kind as `redis_server`, on a fixed port, free to stop
    and start again (empty: a new epoch)."""
    server = EmbeddedServer(binary=redis_server.binary, port=free_loopback_port())
    server.start()
    yield server
    server.stop()


def fast_client(url: str, tok: Token, **options: Any) -> AbstractAsyncContextManager[RelayClient]:
    """open_client with short backoffs: the tests wait for the reconnects."""
    return open_client(url, tok, **{"min_backoff_s": 0.05, "max_backoff_s": 0.4, **options})


def stored_bodies(redis_client: RedisClient, prefix: str, mailbox: str) -> list[str]:
    keys = list(redis_client.scan_iter(match=f"{prefix}{{{mailbox}}}:msg:*"))
    # a stored value is "<tag of its ref record>\n<envelope>" (relay/store_redis.py)
    values = [str(v).partition("\n")[2] for v in redis_client.mget(keys) if v is not None]
    return sorted(orjson.loads(v)["body"] for v in values)


async def fill(url: str, mailbox: str, bodies: list[str]) -> None:
    """Store messages for `mailbox` (from another mailbox, in one session)."""
    async with open_relay(url, token(unique("sender"))) as sender:
        for body in bodies:
            await sender.send(mailbox, body)


async def test_sends_pending_when_the_relay_is_killed_are_stored_once_after_the_restart(
    relay: RestartableRelay, redis_client: RedisClient, prefix: str
) -> None:
    carol = unique("carol")
    with trio.fail_after(STEP_S):
        async with fast_client(relay.url, token("alice")) as alice:
            for i in range(5):
                await alice.send(carol, f"k{i}")
            relay.pause()  # these reach its socket and stay unanswered; then it dies
            async with trio.open_nursery() as nursery:
                for i in range(5, 30):
                    nursery.start_soon(alice.send, carol, f"k{i}")
                await poll_until(lambda: alice.stats.sends == 30)
                assert alice.pending_count == 25
                await relay.restart()
            assert alice.pending_count == 0
            assert alice.stats.welcomes == 2
            assert alice.stats.sends == 55  # the 25 were sent again, after the welcome
    assert stored_bodies(redis_client, prefix, carol) == sorted(f"k{i}" for i in range(30))


async def test_redelivered_messages_reach_the_consumer_once(
    relay: RestartableRelay, redis_client: RedisClient, prefix: str
) -> None:
    bob = unique("bob")
    with trio.fail_after(STEP_S):
        await fill(relay.url, bob, [f"r{i}" for i in range(5)])
        async with fast_client(relay.url, token(bob), auto_ack=False) as client:
            got = [await client.receive() for _ in range(5)]
            await relay.restart()  # unacked: the next session delivers them again
            await poll_until(lambda: client.stats.duplicates_dropped == 5)
            assert client.stats.welcomes == 2
            await fill(relay.url, bob, ["after"])
            assert (await client.receive()).body == "after"  # not a redelivery
            for message in got:
                client.ack(message.id)
            await poll_until(lambda: stored_bodies(redis_client, prefix, bob) == ["after"])
    assert [m.body for m in got] == [f"r{i}" for i in range(5)]


async def test_a_relay_that_answers_nothing_is_dropped_and_reconnected(
    relay: RestartableRelay,
) -> None:
    """The relay stops (SIGSTOP): TCP stays up, pings go unanswered. After idle_timeout_s
    the client drops the connection and connects again, and gets a session once the
    relay runs again."""
    events: list[Event] = []
    with trio.fail_after(STEP_S):
        async with fast_client(
            relay.url, token("ivy"), idle_timeout_s=1, on_event=events.append
        ) as client:
            await client.wait_connected()
            relay.pause()
            try:
                await poll_until(lambda: bool(tries(events)))
            finally:
                relay.resume()
            await poll_until(lambda: client.stats.welcomes == 2)
            await client.send("ivy", "awake")
            assert (await client.receive()).body == "awake"
    assert tries(events)[0].reason == "no answer from the relay for 1 s"
    assert tries(events)[0].code is None


async def test_acks_of_100_deliveries_are_batched_into_few_frames(
    redis_url: str, redis_client: RedisClient, prefix: str, tmp_path: Path
) -> None:
    bob, ops = unique("bob"), free_loopback_port()
    log = tmp_path / "relay.log"
    async with relay_process(redis_url, prefix, log, "--ops-port", str(ops)) as relay:
        with trio.fail_after(STEP_S):
            await fill(relay.url, bob, [f"a{i}" for i in range(100)])
            before = (await scrape(ops)).value("relay_ack_frames_received_total")
            async with fast_client(relay.url, token(bob)) as client:
                bodies = [(await client.receive()).body for _ in range(100)]
            await poll_until(lambda: stored_bodies(redis_client, prefix, bob) == [])
            frames = (await scrape(ops)).value("relay_ack_frames_received_total") - before
    assert bodies == [f"a{i}" for i in range(100)]
    assert client.stats.welcomes == 1 and client.stats.duplicates_dropped == 0  # no redelivery
    assert client.stats.ack_frames == frames
    assert 1 <= frames <= 10, f"{frames} ack frames for 100 messages"


async def test_the_client_backs_off_while_sessions_get_1013_and_resumes_with_the_storage(
    own_server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    events: list[Event] = []
    async with relay_process(own_server.url, prefix, tmp_path / "relay.log") as process:
        own_server.stop()  # the relay runs on; a session cannot start: 1013
        with trio.fail_after(STEP_S):
            async with fast_client(process.url, token("bob"), on_event=events.append) as c:
                await poll_until(lambda: len(tries(events)) >= 2)
                own_server.start()  # on its port again, empty
                welcome = await c.wait_connected()
                await c.send("bob", "storage is back")
                assert (await c.receive()).body == "storage is back"
    retries = tries(events)
    assert [e.code for e in retries] == [1013] * len(retries)
    assert [e.attempt for e in retries] == list(range(1, len(retries) + 1))  # never reset
    assert welcome["mailbox"] == "bob" and c.stats.welcomes == 1
    assert c.stats.connects == len(retries) + 1


def tries(events: list[Event]) -> list[Reconnecting]:
    return [e for e in events if isinstance(e, Reconnecting)]


async def test_a_new_epoch_is_reported_after_the_storage_restarted_empty(
    own_server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    events: list[Event] = []
    async with restartable_relay(own_server.url, prefix, tmp_path) as relay:
        with trio.fail_after(STEP_S):
            async with fast_client(relay.url, token("bob"), on_event=events.append) as c:
                first = (await c.wait_connected())["epoch"]
                await relay.kill()  # the node goes down, Valkey (memory only) with it
                own_server.stop()
                own_server.start()
                await relay.start()
                await poll_until(lambda: c.stats.welcomes == 2)
    changes = [e for e in events if isinstance(e, EpochChanged)]
    assert c.epoch is not None and c.epoch != first
    assert changes == [EpochChanged(first, c.epoch)]
    assert [type(e) for e in events if not isinstance(e, Reconnecting)] == [
        Welcomed,
        Welcomed,
        EpochChanged,
    ]


async def test_a_newer_session_of_the_mailbox_stops_the_older_client(
    relay: RestartableRelay,
) -> None:
    dave = unique("dave")
    with trio.fail_after(STEP_S):
        async with fast_client(relay.url, token(dave)) as older:
            await older.wait_connected()
            async with fast_client(relay.url, token(dave)) as newer:
                await newer.wait_connected()
                with pytest.raises(RelayStopped) as stopped:
                    await older.receive()
                assert stopped.value.code == 4409
                with pytest.raises(RelayStopped):
                    await older.send(dave, "x")
                await newer.send(dave, "to the newer one")
                assert (await newer.receive()).body == "to the newer one"
    assert older.stats.connects == 1  # it did not reconnect (and take the mailbox back)


async def test_a_token_that_runs_out_is_refreshed_through_relay_token(
    relay: RestartableRelay,
) -> None:
    erin, issued = unique("erin"), list[str]()

    async def fresh_token() -> str:
        ttl = "2s" if not issued else "1h"  # the first one runs out during the session
        result = await run_cli("token", "--jwt-secret", SECRET, "--ttl", ttl, erin)
        assert result.returncode == 0, result.stderr
        issued.append(ttl)
        return result.stdout.decode().strip()

    events: list[Event] = []
    with trio.fail_after(STEP_S):
        async with fast_client(relay.url, fresh_token, on_event=events.append) as c:
            await poll_until(lambda: c.stats.welcomes == 2)
            await c.send(erin, "after the refresh")
            assert (await c.receive()).body == "after the refresh"
    assert issued == ["2s", "1h"]
    assert [e.code for e in tries(events)] == [4401]


async def test_a_fixed_token_that_runs_out_stops_the_client(relay: RestartableRelay) -> None:
    with trio.fail_after(STEP_S):
        async with fast_client(relay.url, token(unique("fay"), ttl_s=2)) as client:
            await client.wait_connected()
            with pytest.raises(RelayStopped) as stopped:
                await client.receive()
    assert stopped.value.code == 4401
    assert client.stats.connects == 1 and client.stats.welcomes == 1


async def test_rate_limited_sends_are_retried_one_at_a_time_and_each_stored_once(
    redis_url: str, redis_client: RedisClient, prefix: str, tmp_path: Path
) -> None:
    # Below one frame a second a frame over the burst would wait longer than the relay
    # delays one (protocol.md, "Rate limits"), so it is refused rather than slowed. A
    # read with refusals is a strike, and more than the burst of them closes the session
    # (1008): the client retries refused sends one at a time, slowing down while they
    # are refused, whatever its reconnect backoff (fast_client's is 0.4 s at most).
    gus, ops, sends = unique("gus"), free_loopback_port(), 24
    extra = ("--rate-limit", "0.5/s", "--rate-burst", "20", "--ops-port", str(ops))
    async with relay_process(redis_url, prefix, tmp_path / "relay.log", *extra) as process:
        with trio.fail_after(2 * STEP_S):  # 4 frames at 0.5/s: 8 s, and the retries' jitter
            async with fast_client(process.url, token("alice")) as alice:
                async with trio.open_nursery() as nursery:
                    for i in range(sends):  # 4 over the burst: refused, then sent again
                        nursery.start_soon(alice.send, gus, f"g{i}")
                assert alice.stats.welcomes == 1  # one session throughout
            metrics = await scrape(ops)
    assert metrics.value("relay_requests_rejected_total", code="rate_limited") >= 4
    assert metrics.value("relay_connections_closed_total", code="1008") == 0
    assert stored_bodies(redis_client, prefix, gus) == sorted(f"g{i}" for i in range(sends))


async def test_unconfirmed_sends_are_sent_again_until_stored_once(
    own_server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    """Redis paused (SIGSTOP) past --redis-timeout: the relay answers `unconfirmed` (maybe
    stored); the client sends again with the same ref until Redis answers again.

    A send that reaches the relay while another command of its pipeline (the relay's own
    epoch poll, every second) is already waiting on the paused Redis is refused unsent,
    `storage_unavailable`, and must not be stored: then the pause is tried again."""
    hal, ops = unique("hal"), free_loopback_port()
    extra = ("--redis-timeout", "1", "--ops-port", str(ops))
    own_client = connect(own_server.url)
    try:
        async with relay_process(own_server.url, prefix, tmp_path / "relay.log", *extra) as p:
            with trio.fail_after(STEP_S * PAUSE_ATTEMPTS):
                async with fast_client(p.url, token("alice")) as alice:
                    for attempt in range(PAUSE_ATTEMPTS):
                        await alice.send(hal, f"warm up {attempt}")  # Redis answers again
                        if await _send_while_paused(alice, own_server, hal, attempt):
                            break
                    else:
                        pytest.fail(f"no send was answered unconfirmed in {PAUSE_ATTEMPTS} pauses")
                # Sent again on the same session: the pause closed nothing.
                assert alice.stats.connects == alice.stats.welcomes == 1
                unconfirmed = (await scrape(ops)).value(
                    "relay_requests_rejected_total", code="unconfirmed"
                )
        assert unconfirmed >= 1
        warm_ups = [f"warm up {n}" for n in range(attempt + 1)]
        assert stored_bodies(own_client, prefix, hal) == [*warm_ups, f"while paused {attempt}"]
    finally:
        own_client.close()


async def _send_while_paused(
    alice: RelayClient, server: EmbeddedServer, to: str, attempt: int
) -> bool:
    """Send while Redis is paused; whether the client sent it again (after `unconfirmed`).
    When not, the relay refused it unsent (`storage_unavailable`)."""
    refused: list[str] = []
    before = alice.stats.sends

    async def send() -> None:
        try:
            await alice.send(to, f"while paused {attempt}")
        except RelayClientError as exc:
            refused.append(exc.code)

    os.kill(server.pid, signal.SIGSTOP)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await poll_until(lambda: alice.stats.sends >= before + 2 or bool(refused))
            os.kill(server.pid, signal.SIGCONT)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert refused in ([], ["storage_unavailable"]), refused
    return not refused
