"""The pump's joined commands against a real Valkey/Redis: commands with one merge key that
meet in a batch run as one command, and each caller still gets its own reply or error
(relay/redis/pump.py, `Merge`). `runs` counts what Redis really ran (INFO commandstats).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import trio

from relay.redis.admin import RedisClient
from relay.redis.pump import Command, LuaScript, Merge, RedisPump

DEADLINE_S = 10

# ARGV: one amount per key; returns the new value of each key (a list, whatever the count).
ADD = LuaScript(
    "add",
    "local out = {} for i = 1, #KEYS do out[i] = redis.call('INCRBY', KEYS[i], ARGV[i]) end "
    "if #KEYS == 1 then return out[1] end return out",
)
SHAPELESS = LuaScript("shapeless", "return 'one reply for all'")


def join_adds(commands: Sequence[Command]) -> Command:
    keys = [c.args[3] for c in commands]
    amounts = [c.args[4] for c in commands]
    return Command.call(ADD, keys, amounts)


def add(key: str, amount: object, group: str = "g") -> Command:
    return Command.call(ADD, [key], [amount], Merge(group, join_adds))


def runs(client: RedisClient, command: str = "evalsha") -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})
    return int(stats["calls"])


async def test_commands_with_one_merge_key_run_as_one_and_each_gets_its_reply(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        await pump.execute_many([add(f"{prefix}warm", 1)])  # loaded: no NOSCRIPT round
        before = runs(redis_client)
        results = await pump.execute_many(
            [
                add(f"{prefix}a", 1),
                Command(("ECHO", "between")),
                add(f"{prefix}b", 10),
                add(f"{prefix}a", 100),  # the same key again: run in order, after the first
                add(f"{prefix}c", 5, group="other"),
            ]
        )
    assert results == [1, "between", 10, 101, 5]
    assert runs(redis_client) - before == 2  # the three of group "g" as one, and "other"


async def test_an_error_of_the_joined_command_is_each_callers(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    redis_client.set(f"{prefix}text", "not a number", px=60_000)
    with trio.fail_after(DEADLINE_S):
        results = await pump.execute_many(
            [add(f"{prefix}a", 1), add(f"{prefix}text", 1), Command(("ECHO", "fine"))]
        )
    assert isinstance(results[0], redis.ResponseError)
    assert results[1] is results[0]
    assert results[2] == "fine"


async def test_an_unencodable_argument_fails_only_its_own_caller_in_a_join(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        results = await pump.execute_many(
            [add(f"{prefix}a", 1), add(f"{prefix}b", None), add(f"{prefix}c", 3)]
        )
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], redis.DataError)
    assert redis_client.get(f"{prefix}b") is None


async def test_a_joined_script_redis_does_not_know_is_loaded_and_run_once(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    redis_client.script_flush()
    with trio.fail_after(DEADLINE_S):
        results = await pump.execute_many([add(f"{prefix}a", 2), add(f"{prefix}b", 3)])
    assert results == [2, 3]
    assert redis_client.get(f"{prefix}a") == "2"  # run once, not again after the load


async def test_a_joined_reply_of_the_wrong_shape_fails_each_caller(pump: RedisPump) -> None:
    def join(commands: Sequence[Command]) -> Command:
        return Command.call(SHAPELESS, [], [])

    merge = Merge("shapeless", join)
    commands = [Command.call(SHAPELESS, [], [], merge) for _ in range(2)]
    with trio.fail_after(DEADLINE_S):
        results = await pump.execute_many(commands)
    assert all(isinstance(r, redis.ResponseError) for r in results)
    assert "2 replies" in str(results[0])


async def test_concurrent_callers_meeting_in_one_batch_are_joined(
    pump: RedisPump, redis_client: RedisClient, prefix: str
) -> None:
    """While one batch is in flight the others queue up; the next batch joins them."""
    block = LuaScript("block", "local x = 0 for i = 1, tonumber(ARGV[1]) do x = x + i end return 1")
    results: dict[int, object] = {}

    async def caller(n: int) -> None:
        (results[n],) = await pump.execute_many([add(f"{prefix}k{n}", n)])

    with trio.fail_after(DEADLINE_S):
        await pump.execute_many([Command.call(block, [], [1]), add(f"{prefix}warm", 1)])
        before = runs(redis_client)  # both scripts are loaded: no NOSCRIPT rounds below
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run_script, block, [], [20_000_000])
            await trio.testing.wait_all_tasks_blocked()  # the block is in flight
            for n in range(1, 21):
                nursery.start_soon(caller, n)
    assert results == {n: n for n in range(1, 21)}
    assert runs(redis_client) - before == 2  # the block, and the twenty callers as one


async def test_requests_that_tasks_start_one_after_another_leave_in_one_batch(
    redis_url: str, prefix: str, nursery: trio.Nursery
) -> None:
    """As a session starts its sends: each task starts the next before it waits. Under
    load the pump lets the tasks run before it sends, so they share a batch (and sends
    to one mailbox a script); a lone request after a quiet spell leaves at once."""
    sizes: list[int] = []
    pump = RedisPump(redis_url, on_batch=lambda size, _elapsed_s: sizes.append(size))
    await nursery.start(pump.run)
    turns = [trio.Event() for _ in range(5)]
    replies: list[int] = []

    async def caller(n: int) -> None:
        await turns[n].wait()
        if n + 1 < len(turns):
            turns[n + 1].set()  # the next one runs on the scheduler's next pass
        replies.append(await pump.execute("INCR", f"{prefix}n"))

    with trio.fail_after(DEADLINE_S):
        # Under load: the pump waits for more only after a batch of several requests.
        await pump.execute_many([Command(("PING",))])
        async with trio.open_nursery() as callers:
            for _ in range(2):
                callers.start_soon(pump.execute, "PING")
        assert sizes == [1, 2]
        async with trio.open_nursery() as callers:
            for n in range(len(turns)):
                callers.start_soon(caller, n)
            await trio.testing.wait_all_tasks_blocked()
            turns[0].set()
    assert sorted(replies) == [1, 2, 3, 4, 5]
    assert sizes == [1, 2, 5]
