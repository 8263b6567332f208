"""The Redis pump against a real Valkey/Redis (no mocks).

Each test checks one promise of relay/redis/pump.py: every caller gets its own
reply, batches form under load, a failing command fails only its caller,
NOSCRIPT is handled, cancellation and shutdown leave nobody hanging, the queue
is bounded, and the pump reconnects by itself after a Redis restart.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import trio
import trio.testing

from relay.embedded import EmbeddedServer, free_loopback_port
from relay.errors import StorageError, StorageUnavailable, Unconfirmed
from relay.redis.admin import RedisClient
from relay.redis.pump import Command, LuaScript, RedisPump

DEADLINE_S = 10

BOOM = LuaScript("boom", "return redis.error_reply('boom')")
INCR_BY = LuaScript("incr_by", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
ECHO = LuaScript("echo", "return ARGV[1] .. ':' .. KEYS[1]")


@pytest.fixture
def tcp_server(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the same kind as `redis_server`, on a loopback TCP port."""
    server = EmbeddedServer(binary=redis_server.binary, port=free_loopback_port())
    server.start()
    yield server
    server.stop()


async def start_pump(nursery: trio.Nursery, url: str, **options: Any) -> RedisPump:
    """A pump of our own (with its own connection), running in `nursery`."""
    pump = RedisPump(url, **options)
    await nursery.start(pump.run)
    return pump


async def test_concurrent_callers_each_get_their_own_reply_and_batches_form(
    redis_url: str, prefix: str, nursery: trio.Nursery
) -> None:
    tasks, per_task = 50, 100
    observed: list[int] = []
    pump = await start_pump(
        nursery, redis_url, on_batch=lambda size, _elapsed_s: observed.append(size)
    )
    replies: dict[int, list[Any]] = {}

    async def caller(task: int) -> None:
        got: list[Any] = []
        for n in range(per_task):
            if n % 2:
                got.append(await pump.execute("INCR", f"{prefix}counter:{task}"))
            else:
                got.append(await pump.execute("ECHO", f"{task}/{n}"))
        replies[task] = got

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as callers:
            for task in range(tasks):
                callers.start_soon(caller, task)

    for task in range(tasks):
        expected = [n // 2 + 1 if n % 2 else f"{task}/{n}" for n in range(per_task)]
        assert replies[task] == expected, task
    stats = pump.statistics()
    assert stats.commands == tasks * per_task
    assert stats.batches < stats.commands
    assert max(observed) > 1
    assert sum(observed) == stats.commands and len(observed) == stats.batches
    assert stats.queued == 0


async def test_a_failing_command_fails_only_its_caller_within_one_batch(
    pump: RedisPump, prefix: str
) -> None:
    text, ok = f"{prefix}text", f"{prefix}ok"
    with trio.fail_after(DEADLINE_S):
        await pump.execute("SET", text, "not a number")
        before = pump.statistics().batches
        results = await pump.execute_many(
            [
                Command(("SET", ok, "1")),
                Command(("INCR", text)),  # not an integer
                Command.call(BOOM, [], []),  # redis.error_reply
                Command.call(INCR_BY, [text], [1]),  # error raised inside the script
                Command(("INCR", ok)),
                Command.call(ECHO, [ok], ["hi"]),
            ]
        )
        after = pump.statistics()
    assert after.batches == before + 1 and after.last_batch_size == 6  # one batch
    assert results[0] == "OK"
    assert isinstance(results[1], redis.ResponseError)
    assert "not an integer" in str(results[1])
    assert isinstance(results[2], redis.ResponseError) and str(results[2]) == "boom"
    assert isinstance(results[3], redis.ResponseError)
    assert "not an integer" in str(results[3])
    assert results[4] == 2
    assert results[5] == f"hi:{ok}"


async def test_a_failing_command_fails_only_its_caller_among_concurrent_tasks(
    pump: RedisPump, prefix: str
) -> None:
    text = f"{prefix}text"
    outcomes: dict[int, object] = {}

    async def caller(n: int) -> None:
        try:
            if n % 3 == 0:
                outcomes[n] = await pump.execute("INCR", text)
            elif n % 3 == 1:
                outcomes[n] = await pump.run_script(BOOM, [], [])
            else:
                outcomes[n] = await pump.run_script(INCR_BY, [f"{prefix}n:{n}"], [n])
        except redis.ResponseError as exc:
            outcomes[n] = exc

    with trio.fail_after(DEADLINE_S):
        await pump.execute("SET", text, "abc")
        async with trio.open_nursery() as callers:
            for n in range(60):
                callers.start_soon(caller, n)
        assert await pump.execute("GET", text) == "abc"

    for n, outcome in outcomes.items():
        if n % 3 == 0:
            assert isinstance(outcome, redis.ResponseError), n
            assert "not an integer" in str(outcome)
        elif n % 3 == 1:
            assert isinstance(outcome, redis.ResponseError) and str(outcome) == "boom", n
        else:
            assert outcome == n
    assert len(outcomes) == 60
    assert pump.statistics().batches < pump.statistics().commands


async def test_script_runs_after_script_flush(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    key = f"{prefix}n"
    with trio.fail_after(DEADLINE_S):
        assert await pump.run_script(INCR_BY, [key], [5]) == 5
        redis_client.script_flush()
        assert redis_client.script_exists(INCR_BY.sha, ECHO.sha) == [False, False]
        assert await pump.run_script(INCR_BY, [key], [1]) == 6
        assert redis_client.script_exists(INCR_BY.sha) == [True]

        # Several script calls of one batch all hit NOSCRIPT; one load each suffices.
        redis_client.script_flush()
        results = await pump.execute_many(
            [
                Command.call(INCR_BY, [key], [10]),
                Command.call(ECHO, [key], ["a"]),
                Command(("GET", key)),
                Command.call(INCR_BY, [key], [100]),
            ]
        )
    assert results[1] == f"a:{key}"
    assert results[2] in {"6", "16", "116"}  # plain commands may run before the reload
    assert sorted([results[0], results[3]]) == [16, 116]
    assert int(redis_client.get(key)) == 116  # type: ignore[arg-type]


async def test_cancelled_caller_does_not_break_the_pump(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    key = f"{prefix}list"
    with trio.fail_after(DEADLINE_S):
        with trio.move_on_after(0.1) as waiting:
            # BLPOP holds the batch in Redis for 0.3 s; the caller gives up first.
            await pump.execute_many(
                [Command(("SET", key + ":set", "x")), Command(("BLPOP", key, 0.3))]
            )
        assert waiting.cancelled_caught
        # The pump goes on once Redis answers; the abandoned commands ran all the same.
        assert await pump.execute("LPUSH", key, "v") == 1
        assert redis_client.get(key + ":set") == "x"
        assert redis_client.llen(key) == 1
        assert [await pump.execute("ECHO", str(n)) for n in range(5)] == list("01234")


async def test_caller_cancelled_before_its_batch_is_sent_is_dropped(
    redis_url: str, redis_client: RedisClient, prefix: str
) -> None:
    key = f"{prefix}dropped"
    pump = RedisPump(redis_url)  # not running yet
    with trio.fail_after(DEADLINE_S):
        with trio.move_on_after(0.1) as waiting:
            await pump.execute("SET", key, "x")
        assert waiting.cancelled_caught
        assert pump.statistics().queued == 1
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            assert await pump.execute("ECHO", "after") == "after"
            nursery.cancel_scope.cancel()
    assert redis_client.exists(key) == 0
    assert pump.statistics().commands == 1  # only the ECHO was sent


async def test_bounded_queue_blocks_senders_instead_of_growing(
    redis_url: str, nursery: trio.Nursery
) -> None:
    pump = RedisPump(redis_url, max_pending=2)  # not running yet
    replies: list[Any] = []

    async def caller(n: int) -> None:
        replies.append(await pump.execute("ECHO", str(n)))

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as callers:
            callers.start_soon(caller, 0)
            callers.start_soon(caller, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert pump.statistics().queued == 2

            with trio.move_on_after(0.2) as blocked:
                await pump.execute("ECHO", "third")
            assert blocked.cancelled_caught  # backpressure: the sender waited
            assert pump.statistics().queued == 2  # and nothing more was buffered

            await nursery.start(pump.run)
        assert sorted(replies) == ["0", "1"]
        assert await pump.execute("ECHO", "now") == "now"


async def test_calls_raise_storage_unavailable_promptly_after_the_pump_is_cancelled(
    redis_url: str,
) -> None:
    pump = RedisPump(redis_url)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            assert await pump.execute("PING") == "PONG"
            nursery.cancel_scope.cancel()
    with trio.fail_after(1):
        with pytest.raises(StorageUnavailable):
            await pump.execute("PING")
        with pytest.raises(StorageUnavailable):
            await pump.run_script(ECHO, ["k"], ["v"])


async def test_stopping_pump_finishes_the_batch_in_flight_and_fails_queued_calls(
    redis_url: str, prefix: str
) -> None:
    pump = RedisPump(redis_url)
    outcomes: dict[str, object] = {}

    async def caller(name: str, *args: Any) -> None:
        try:
            outcomes[name] = await pump.execute(*args)
        except StorageUnavailable as exc:
            outcomes[name] = exc

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as callers, trio.open_nursery() as pump_nursery:
            await pump_nursery.start(pump.run)
            callers.start_soon(caller, "in flight", "BLPOP", f"{prefix}empty", 0.5)
            await trio.testing.wait_all_tasks_blocked()
            callers.start_soon(caller, "queued", "PING")
            await trio.testing.wait_all_tasks_blocked()
            assert pump.statistics().queued == 1
            pump_nursery.cancel_scope.cancel()
    assert outcomes["in flight"] is None  # BLPOP timed out normally in Redis
    assert isinstance(outcomes["queued"], StorageUnavailable)


@pytest.mark.parametrize("scheme", ["unix", "redis"])
async def test_pump_works_over_unix_and_tcp_urls(
    scheme: str,
    redis_url: str,
    prefix: str,
    nursery: trio.Nursery,
    request: pytest.FixtureRequest,
) -> None:
    if scheme == "unix":
        url = redis_url
    else:
        tcp: EmbeddedServer = request.getfixturevalue("tcp_server")
        url = tcp.url
        assert url == f"redis://127.0.0.1:{tcp.port}/0"
    assert url.startswith(f"{scheme}://")
    pump = await start_pump(nursery, url)
    with trio.fail_after(DEADLINE_S):
        assert await pump.execute("SET", f"{prefix}k", "v") == "OK"
        assert await pump.execute("GET", f"{prefix}k") == "v"
        assert await pump.run_script(INCR_BY, [f"{prefix}n"], [3]) == 3


async def test_pump_reconnects_after_a_redis_restart(
    tcp_server: EmbeddedServer, prefix: str, nursery: trio.Nursery
) -> None:
    port = tcp_server.port
    assert port is not None
    pump = await start_pump(nursery, tcp_server.url)
    key = f"{prefix}k"
    with trio.fail_after(DEADLINE_S):
        assert await pump.execute("SET", key, "before") == "OK"
        assert await pump.run_script(INCR_BY, [f"{prefix}n"], [1]) == 1

    tcp_server.stop()
    with trio.fail_after(DEADLINE_S):
        with pytest.raises(StorageUnavailable):
            await pump.execute("GET", key)
        with pytest.raises(StorageUnavailable):  # and again: still an error, not a hang
            await pump.run_script(INCR_BY, [f"{prefix}n"], [1])

    restarted = EmbeddedServer(binary=tcp_server.binary, port=port)
    restarted.start()
    try:
        with trio.fail_after(DEADLINE_S):
            while True:
                try:
                    reply = await pump.execute("PING")
                    break
                except StorageError:
                    await trio.sleep(0.05)
            assert reply == "PONG"
            # The same pump works, scripts are reloaded into the new server's
            # empty script cache, and the restart lost the data (memory only).
            assert await pump.execute("GET", key) is None
            assert await pump.run_script(INCR_BY, [f"{prefix}n"], [1]) == 1
            assert await pump.execute("ECHO", "again") == "again"
    finally:
        restarted.stop()


async def test_an_unencodable_argument_fails_only_its_caller(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        results = await pump.execute_many(
            [
                Command(("SET", f"{prefix}a", "1")),
                Command(("SET", f"{prefix}b", None)),  # redis.DataError in redis-py
                Command(("ECHO", "x")),
            ]
        )
    assert results[0] == "OK" and results[2] == "x"
    assert isinstance(results[1], Exception)
    assert redis_client.get(f"{prefix}a") == "1"


async def test_a_non_redis_error_in_the_worker_does_not_stop_the_pump(
    redis_url: str, prefix: str
) -> None:
    pump = RedisPump(redis_url)
    crashed: list[BaseException] = []

    async def run_pump(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await pump.run(task_status=task_status)
        except Exception as exc:
            crashed.append(exc)

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_pump)
            results = await pump.execute_many(
                [Command(("ECHO", "ok")), Command(("SET", f"{prefix}k", "\ud800"))]
            )
            await trio.testing.wait_all_tasks_blocked()
            assert not crashed, crashed
            assert results[0] == "ok"
            assert isinstance(results[1], Exception)
            assert await pump.execute("PING") == "PONG"
            nursery.cancel_scope.cancel()


async def test_a_batch_whose_reply_was_lost_is_not_run_again(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    counter, signal, blocker = f"{prefix}counter", f"{prefix}signal", f"{prefix}blocker"
    outcome: list[object] = []

    async def caller() -> None:
        try:
            outcome.append(
                await pump.execute_many(
                    [
                        Command(("INCR", counter)),
                        Command(("LPUSH", signal, "ran")),
                        Command(("BLPOP", blocker, 1)),  # keeps the connection busy
                    ]
                )
            )
        except StorageUnavailable as exc:
            outcome.append(exc)

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            # Redis ran INCR and LPUSH and now blocks in that BLPOP.
            assert await trio.to_thread.run_sync(redis_client.blpop, [signal], 5) is not None
            (busy,) = [c for c in redis_client.client_list() if c["cmd"] == "blpop"]
            assert redis_client.client_kill_filter(_id=busy["id"]) == 1
    # The connection died after Redis ran the batch: the replies that came are
    # kept, the one owed is unconfirmed (written, it may have run, and did), never
    # "unavailable", and the batch is not sent again.
    (replies,) = outcome
    assert isinstance(replies, list)
    assert replies[:2] == [1, 1]
    assert isinstance(replies[2], Unconfirmed)
    assert redis_client.get(counter) == "1"


async def test_a_stalled_redis_fails_queued_callers_at_once_and_tells_written_from_unsent(
    tcp_server: EmbeddedServer, prefix: str, nursery: trio.Nursery
) -> None:
    timeout_s = 0.5
    pump = await start_pump(nursery, tcp_server.url, timeout_s=timeout_s, max_batch=1)
    key = f"{prefix}n"
    with trio.fail_after(DEADLINE_S):
        assert await pump.execute("INCR", key) == 1
    outcomes: dict[int, Any] = {}

    async def caller(n: int) -> None:
        try:
            outcomes[n] = await pump.execute("INCR", key)
        except (StorageUnavailable, Unconfirmed) as exc:
            outcomes[n] = exc

    os.kill(tcp_server.pid, signal.SIGSTOP)
    try:
        # One batch per caller: had each queued batch waited out its own timeout,
        # the 20 would take 20 timeouts; failing the queue at once takes about one.
        with trio.fail_after(4 * timeout_s):
            async with trio.open_nursery() as callers:
                callers.start_soon(caller, 0)
                await trio.testing.wait_all_tasks_blocked()  # its INCR is written
                for n in range(1, 21):
                    callers.start_soon(caller, n)
    finally:
        os.kill(tcp_server.pid, signal.SIGCONT)
    assert isinstance(outcomes.pop(0), Unconfirmed)
    assert len(outcomes) == 20
    assert all(isinstance(outcome, StorageUnavailable) for outcome in outcomes.values())
    with trio.fail_after(DEADLINE_S):
        # Only the written one may have run; the next batch gets a fresh connection.
        assert await pump.execute("GET", key) == "2"
