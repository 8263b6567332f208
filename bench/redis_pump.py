"""Micro-benchmark: reaching Redis from Trio with the batching pump versus the alternatives.

50 concurrent Trio tasks each run `SET key value EX 60` until the total is
reached, against a private embedded Valkey on a unix socket. Three ways:

- `pump`: relay.redis.pump.RedisPump (what the relay uses: batches on one
  Trio-native connection, hiredis packing and parsing);
- `thread_per_command`: one `trio.to_thread.run_sync` call per command on a
  shared redis-py client (its connection pool);
- `plain_pipeline`: no Trio at all; one thread sending the same commands in
  redis-py pipelines of 50 (the ceiling of the worker-thread side alone).

    python -m relay_bench.redis_pump [--commands 20000] [--tasks 50] [--rounds 3] [--seed 1]

Prints one line per way and round, then the best of the rounds and the pump's
speed-up over one thread call per command.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from collections.abc import Awaitable, Callable

import trio

from relay.embedded import EmbeddedServer
from relay.redis.admin import RedisClient, connect
from relay.redis.pump import RedisPump


def _workload(commands: int, tasks: int, seed: int) -> list[list[tuple[str, ...]]]:
    """The commands of each task: seeded keys and values, so every run sends the same bytes."""
    rng = random.Random(seed)
    per_task = commands // tasks
    return [
        [
            ("SET", f"bench:{t}:{rng.randrange(1000)}", str(rng.getrandbits(64)), "EX", "60")
            for _ in range(per_task)
        ]
        for t in range(tasks)
    ]


async def _run_tasks(
    work: list[list[tuple[str, ...]]], run: Callable[[tuple[str, ...]], Awaitable[object]]
) -> float:
    async def task(commands: list[tuple[str, ...]]) -> None:
        for command in commands:
            await run(command)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for commands in work:
            nursery.start_soon(task, commands)
    return time.perf_counter() - started


async def bench_pump(url: str, work: list[list[tuple[str, ...]]]) -> float:
    pump = RedisPump(url)
    async with trio.open_nursery() as nursery:
        await nursery.start(pump.run)
        elapsed = await _run_tasks(work, lambda command: pump.execute(*command))
        nursery.cancel_scope.cancel()
    return elapsed


async def bench_thread_per_command(client: RedisClient, work: list[list[tuple[str, ...]]]) -> float:
    limiter = trio.CapacityLimiter(len(work))

    async def run(command: tuple[str, ...]) -> object:
        return await trio.to_thread.run_sync(
            lambda: client.execute_command(*command),  # type: ignore[no-untyped-call]
            limiter=limiter,
        )

    return await _run_tasks(work, run)


def bench_plain_pipeline(client: RedisClient, work: list[list[tuple[str, ...]]]) -> float:
    started = time.perf_counter()
    for i in range(len(work[0])):
        with client.pipeline(transaction=False) as pipe:
            for commands in work:
                pipe.execute_command(*commands[i])
            pipe.execute()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    work = _workload(args.commands, args.tasks, args.seed)
    total = sum(len(w) for w in work)
    best: dict[str, float] = {}
    print(
        f"# {platform.node()} {platform.machine()} python {platform.python_version()}, "
        f"{total} SET EX commands from {args.tasks} tasks, embedded Valkey on a unix socket"
    )
    with EmbeddedServer() as server:
        client = connect(server.url)
        ways: dict[str, Callable[[], float]] = {
            "pump": lambda: trio.run(bench_pump, server.url, work),
            "thread_per_command": lambda: trio.run(bench_thread_per_command, client, work),
            "plain_pipeline": lambda: bench_plain_pipeline(client, work),
        }
        for round_no in range(1, args.rounds + 1):
            for name, run in ways.items():
                client.flushall()
                rate = total / run()
                best[name] = max(best.get(name, 0.0), rate)
                print(f"round {round_no} {name:<20} {rate:>10,.0f} ops/s")
        client.close()
    print("best:")
    for name, rate in best.items():
        print(f"  {name:<20} {rate:>10,.0f} ops/s")
    print(f"pump / thread_per_command = {best['pump'] / best['thread_per_command']:.1f}x")


if __name__ == "__main__":
    main()
