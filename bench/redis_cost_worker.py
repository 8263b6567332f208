"""The workloads of bench/redis_cost.py, run in a child process whose `relay` package is the
one under test (this checkout's, or another commit's on PYTHONPATH): only the store's
interface (send, start_session, fetch, ack) and the pump are used, which every version has
(where a version keeps them in other modules, or `fetch` returns a plain list, the worker
takes what that version has).

    python -m relay_bench.redis_cost_worker URL WORKLOAD OPTIONS_JSON

It prints `mark PHASE MESSAGES` at each phase boundary and reads a line before it goes
on, so that the snapshots the driver takes meanwhile hold the phase's commands only;
`done` at the end.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

import relay
from relay.session import FETCH_PAGE
from relay.store_redis import RedisMailboxStore

# The Redis layer moved into relay/redis/ (17b0601). The tree under test is checked on
# disk: for a missing module the editable install would hand over this checkout's.
if os.path.isdir(os.path.join(os.path.dirname(relay.__file__), "redis")):
    _connection, _pump = "relay.redis.connection", "relay.redis.pump"
else:
    _connection, _pump = "relay.redis_conn", "relay.redis_pump"
RedisConnection: Any = importlib.import_module(_connection).RedisConnection
pack: Callable[[Any], bytes] = importlib.import_module(_connection).pack
RedisPump: Any = importlib.import_module(_pump).RedisPump

PREFIX = "cost:"
TTL_S = 3600
REDIS_TIMEOUT_S = 300.0  # generous: a Valkey under callgrind runs about 50 times slower


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _mark(phase: str, messages: int) -> None:
    print(f"mark {phase} {messages}", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)


async def _all(fn: Callable[[Any], Awaitable[None]], args: list[Any]) -> None:
    async with trio.open_nursery() as nursery:
        for arg in args:
            nursery.start_soon(fn, arg)


class Workloads:
    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.pump = RedisPump(url, timeout_s=REDIS_TIMEOUT_S)
        self.store = RedisMailboxStore(self.pump, prefix=PREFIX, retention_s=TTL_S)
        self.body = "x" * options["body_bytes"]
        self.boxes = [f"box{i}" for i in range(options["mailboxes"])]
        self.tasks: int = options["tasks"]
        self.window: int = options["window"]
        self.ack_batch: int = options["ack_batch"]
        self.per_task: int = options["messages"] // self.tasks

    async def send(self, task: int, box: str) -> str:
        """One send with a random ref, as the client library sends."""
        accepted = await self.store.send(
            f"s{task}", [box], self.body, TTL_S, secrets.token_hex(8), _now_ms()
        )
        return accepted.ids[box]

    async def online(self) -> int:
        """Each task sends to the mailboxes in turn and acks every `ack_batch` messages."""

        async def task(t: int) -> None:
            ids: dict[str, list[str]] = {}
            for n in range(self.per_task):
                box = self.boxes[(t + n * self.tasks) % len(self.boxes)]
                ids.setdefault(box, []).append(await self.send(t, box))
                if sum(map(len, ids.values())) == self.ack_batch or n == self.per_task - 1:
                    for b, of_b in ids.items():
                        await self.store.ack(b, of_b)
                    ids.clear()

        await _all(task, list(range(self.tasks)))
        return self.per_task * self.tasks

    async def pairs(self) -> int:
        """Each task keeps `window` sends in flight to its own mailbox, then acks them in
        one ack, as a recipient acks one deliver frame."""
        rounds = self.per_task // self.window

        async def task(t: int) -> None:
            box = self.boxes[t % len(self.boxes)]
            ids: list[str] = []

            async def one() -> None:
                ids.append(await self.send(t, box))

            for _ in range(rounds):
                await _all(lambda _: one(), list(range(self.window)))
                await self.store.ack(box, ids)
                ids.clear()

        await _all(task, list(range(self.tasks)))
        return rounds * self.window * self.tasks

    async def store_only(self) -> int:
        async def task(t: int) -> None:
            for n in range(self.per_task):
                await self.send(t, self.boxes[(t + n * self.tasks) % len(self.boxes)])

        await _all(task, list(range(self.tasks)))
        return self.per_task * self.tasks

    async def drain(self) -> None:
        async def one(box: str) -> None:
            await self.store.start_session(box)
            after = 0
            more = True
            while more:
                page = await self.store.fetch(box, after, FETCH_PAGE)
                if isinstance(page, list):  # before ddefb47: the deliveries alone
                    deliveries, more = page, len(page) == FETCH_PAGE
                else:
                    deliveries, more = page.deliveries, page.more
                if deliveries:
                    after = deliveries[-1].seq
                    await self.store.ack(box, [d.id for d in deliveries])

        await _all(one, self.boxes)

    async def subscriber(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Takes the publishes, as the relay's hub does for online mailboxes."""
        connection = await RedisConnection.open(self.url)
        channels = [self.store.keys(b).channel for b in self.boxes]
        await connection.send(pack(("SUBSCRIBE", *channels)))
        for _ in channels:
            await connection.reply()
        task_status.started()
        while True:
            await connection.reply()

    async def warm_up(self) -> None:
        """Scripts loaded and connections open, on mailboxes of their own."""
        for k in range(3):
            box = f"warm{k}"
            accepted = await self.store.send("w", [box], self.body, TTL_S, None, _now_ms())
            await self.store.start_session(box)
            await self.store.fetch(box, 0, 10)
            await self.store.ack(box, list(accepted.ids.values()))


async def run(url: str, workload: str, options: dict[str, Any]) -> None:
    w = Workloads(url, options)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.pump.run)
        await nursery.start(w.subscriber)
        await w.warm_up()
        await _mark("start", 0)
        if workload == "online":
            await _mark("online", await w.online())
        elif workload == "pairs":
            await _mark("pairs", await w.pairs())
        else:
            stored = await w.store_only()
            await _mark("store", stored)
            await w.drain()
            await _mark("drain", stored)
        nursery.cancel_scope.cancel()


def main() -> None:
    url, workload, options = sys.argv[1:4]
    trio.run(run, url, workload, json.loads(options))
    print("done", flush=True)


if __name__ == "__main__":
    main()
