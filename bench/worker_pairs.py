"""A generator process of the pair workloads: throughput, burst, latency, roundtrip, flood.

The process connects its share of the pairs (sender `s<i>`, recipient
`r<i>`, both online), then runs the workload's rounds. Before each measured
round it may warm up (closed loop, not recorded); it then stops at the gates
`<round>:start` and `<round>:end`, where the parent reads the relay's CPU and
Redis's counters.
"""

from __future__ import annotations

from typing import Any

import trio

from . import wire
from .checks import Failures, SessionChecker
from .loops import (
    Pair,
    RoundContext,
    RoundStats,
    closed_loop_tasks,
    open_loop_tasks,
    roundtrip,
    run_round,
)
from .measure import CpuClock, Recorder
from .options import BenchOptions, warmup_messages
from .procs import CONNECTED, Link, WorkerSpec

# Rounds of each workload: (label, warm up first, kind of loop)
PLANS: dict[str, list[tuple[str, bool, str]]] = {
    "throughput": [("measure", True, "closed")],
    "burst": [("burst", False, "closed"), ("reference", True, "closed")],
    "latency": [("measure", True, "open")],
    "roundtrip": [("measure", True, "roundtrip")],
    "flood": [("quiet", True, "open"), ("flood", False, "open")],  # worker_flood floods
}


def gates(options: BenchOptions) -> tuple[str, ...]:
    return tuple(
        g for label, _, _ in PLANS[options.workload] for g in (f"{label}:start", f"{label}:end")
    )


async def run(spec: WorkerSpec, link: Link) -> dict[str, Any]:
    o = spec.options
    failures = Failures()
    rounds: list[dict[str, Any]] = []
    async with trio.open_nursery() as connections:
        boxes = [
            wire.mailbox(spec.run_id, role, i) for i in range(*spec.units) for role in ("s", "r")
        ]
        conns = await wire.connect_many(connections, spec.url, spec.secret, boxes)
        link.count(CONNECTED, len(conns))
        pairs = []
        for k, i in enumerate(range(*spec.units)):
            sender, recipient = conns[2 * k], conns[2 * k + 1]
            checker = SessionChecker(recipient.mailbox, failures)
            pairs.append(Pair(i, sender, recipient.mailbox, checker, recipient))
        stalled = False
        for label, warm, kind in PLANS[o.workload]:
            warmup = warmup_messages(o) if warm else 0
            if warmup and not stalled:
                stalled = (
                    await _round(spec, link, failures, pairs, "warmup", kind, warmup, None)
                ).stalled
            await link.gate(f"{label}:start")
            if not stalled:
                clock = CpuClock()
                clock.start()
                recorder = Recorder(spec.origin_s)
                stats = await _round(spec, link, failures, pairs, label, kind, o.messages, recorder)
                rounds.append({**stats.to_json(), "cpu": clock.stop()})
                stalled = stats.stalled
            await link.gate(f"{label}:end")
        for pair in pairs:
            pair.checker.finish(pair.sent, pair.rejected)
        await wire.close_all(conns)
        connections.cancel_scope.cancel()
    return {"rounds": rounds, "failures": failures.to_json(), "pairs": len(pairs)}


async def _round(
    spec: WorkerSpec,
    link: Link,
    failures: Failures,
    pairs: list[Pair],
    label: str,
    kind: str,
    n: int,
    recorder: Recorder | None,
) -> RoundStats:
    o = spec.options
    stats = RoundStats(label, recorder)
    ctx = RoundContext(link, failures, stats, o.stall_s, o.body_bytes)
    if kind == "open" and recorder is not None:
        stats.from_send = Recorder(spec.origin_s)
        share = o.rate * len(pairs) / o.pairs
        await run_round(ctx, open_loop_tasks(ctx, pairs, n, share))
    elif kind == "roundtrip":
        if recorder is not None:
            stats.from_send = Recorder(spec.origin_s)  # here: the whole cycle up to `acked`
        await run_round(ctx, [lambda: roundtrip(ctx, pairs[0], n)])
    else:
        await run_round(ctx, closed_loop_tasks(ctx, pairs, n, o.window))
    return stats
