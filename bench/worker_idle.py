"""A generator process of the idle workload: hold many authenticated, silent connections.

Gates: `baseline` (before any connection: the parent reads the relay's
memory), `connected` (all held), `held` (after `--hold` seconds). While the
connections are held, they ping the relay (a WebSocket ping answered by its
event loop) to measure heartbeat latency: about 200 pings a second over all
processes, at random times (when that is less than one ping per connection
during the hold, a random share of the connections pings once).
"""

from __future__ import annotations

import random
import time
from typing import Any

import trio
from trio_websocket import ConnectionClosed

from . import wire
from .checks import Failures
from .measure import CpuClock, Recorder
from .procs import CONNECTED, DELIVERED, Link, WorkerSpec

GATES = ("baseline", "connected", "held")
PINGS_PER_S = 200.0


async def run(spec: WorkerSpec, link: Link) -> dict[str, Any]:
    o = spec.options
    failures = Failures()
    await link.gate("baseline")
    async with trio.open_nursery() as connections:
        boxes = [wire.mailbox(spec.run_id, "i", i) for i in range(*spec.units)]
        started = time.monotonic()
        conns = await wire.connect_many(
            connections, spec.url, spec.secret, boxes, on_connect=lambda: link.count(CONNECTED)
        )
        connect_s = time.monotonic() - started
        await link.gate("connected")

        clock = CpuClock()
        clock.start()
        pings = Recorder(spec.origin_s)
        per_conn = PINGS_PER_S * o.hold_s / o.connections  # pings per connection in the hold
        interval = o.hold_s / per_conn if per_conn >= 1 else o.hold_s
        rng = random.Random(spec.index)

        async def heartbeat(conn: wire.Conn) -> None:
            if per_conn < 1 and rng.random() >= per_conn:
                return
            await trio.sleep(rng.uniform(0, interval))
            while True:
                sent = time.monotonic_ns()
                try:
                    await conn.ws.ping()
                except ConnectionClosed:
                    return  # counted below
                pings.record(time.monotonic_ns() - sent, time.monotonic())
                link.count(DELIVERED)
                await trio.sleep(interval)

        with trio.move_on_after(o.hold_s):
            async with trio.open_nursery() as holding:
                for conn in conns:
                    holding.start_soon(heartbeat, conn)
        cpu = clock.stop()
        for conn in conns:
            if conn.ws.closed is not None:
                failures.add(
                    "closed", f"{conn.mailbox} closed with {conn.ws.closed.code} while idle"
                )
        await link.gate("held")
        await wire.close_all(conns)
        connections.cancel_scope.cancel()
    return {
        "connections": len(conns),
        "connect_s": round(connect_s, 3),
        "pings": pings.to_json(),
        "cpu": cpu,
        "failures": failures.to_json(),
    }
