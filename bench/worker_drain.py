"""A generator process of the offline workloads: drain and retention.

Senders fill the mailboxes of recipients that are offline (gates
`store:start` / `store:end`), then leave. In `drain` the recipients connect
all at once and empty their mailboxes, acking as they go (`drain:start` /
`drain:end`). In `retention` nobody comes until the parent has watched every
message expire (gate `expired`); then the recipients connect once and must be
given nothing (`check:end`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import trio

from . import wire
from .checks import Failures, SessionChecker
from .loops import Pair, RoundContext, RoundStats, receive, run_round, send_windowed
from .measure import CpuClock, Recorder
from .procs import CONNECTED, DELIVERED, Link, WorkerSpec

GATES = {
    "drain": ("store:start", "store:end", "drain:start", "drain:end"),
    "retention": ("store:start", "store:end", "expired", "check:end"),
}
LISTEN_AFTER_EXPIRY_S = 1.0


async def run(spec: WorkerSpec, link: Link) -> dict[str, Any]:
    o = spec.options
    failures = Failures()
    rounds: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    async with trio.open_nursery() as connections:
        units = range(*spec.units)
        senders = await wire.connect_many(
            connections, spec.url, spec.secret, [wire.mailbox(spec.run_id, "s", i) for i in units]
        )
        link.count(CONNECTED, len(senders))
        pairs = []
        for sender, i in zip(senders, units, strict=True):
            to = wire.mailbox(spec.run_id, "r", i)
            pairs.append(Pair(i, sender, to, SessionChecker(to, failures)))

        await link.gate("store:start")
        clock = CpuClock()
        clock.start()
        store = RoundStats("store", None)
        ctx = RoundContext(link, failures, store, o.stall_s, o.body_bytes)
        await run_round(ctx, [_sender(ctx, p, o.messages, o.window) for p in pairs])
        rounds.append({**store.to_json(), "cpu": clock.stop()})
        await wire.close_all(senders)
        for pair in pairs:
            pair.sender = None
        await link.gate("store:end")

        if o.workload == "drain":
            await link.gate("drain:start")
            if not store.stalled:
                clock.start()
                stats, ttfm = await _drain(spec, link, failures, connections, pairs)
                rounds.append({**stats.to_json(), "cpu": clock.stop(), "ttfm": ttfm.to_json()})
            await link.gate("drain:end")
        else:
            await link.gate("expired")
            extra = await _after_expiry(spec, link, failures, connections, pairs)
            await link.gate("check:end")
        if o.workload == "drain":
            for pair in pairs:
                pair.checker.finish(pair.sent, pair.rejected)
        await wire.close_all([p.recipient for p in pairs if p.recipient is not None])
        connections.cancel_scope.cancel()
    return {"rounds": rounds, "failures": failures.to_json(), "pairs": len(pairs), **extra}


def _sender(ctx: RoundContext, pair: Pair, n: int, window: int) -> Any:
    return lambda: send_windowed(ctx, pair, n, window)


async def _drain(
    spec: WorkerSpec,
    link: Link,
    failures: Failures,
    connections: trio.Nursery,
    pairs: list[Pair],
) -> tuple[RoundStats, Recorder]:
    """Recipients connect at once and drain; time to first message per recipient."""
    o = spec.options
    stats = RoundStats("drain", Recorder(spec.origin_s))  # latency here: age at delivery
    ttfm = Recorder(spec.origin_s)
    ctx = RoundContext(link, failures, stats, o.stall_s, o.body_bytes)

    def recipient(pair: Pair) -> Any:
        async def run() -> None:
            started = time.monotonic_ns()
            stats.first_send_s = min(stats.first_send_s, started / 1e9)  # the drain's start
            pair.recipient = await wire.connect(connections, spec.url, spec.secret, pair.to)
            link.count(CONNECTED)

            def first() -> None:
                ttfm.record(time.monotonic_ns() - started, time.monotonic())

            await receive(ctx, pair, pair.sent - len(pair.rejected), on_first=first)

        return run

    await run_round(ctx, [recipient(p) for p in pairs])
    return stats, ttfm


async def _after_expiry(
    spec: WorkerSpec,
    link: Link,
    failures: Failures,
    connections: trio.Nursery,
    pairs: list[Pair],
) -> dict[str, Any]:
    """Recipients come after every message expired: they must be given nothing."""
    expired = 0
    delivered = 0

    async def listen(pair: Pair) -> None:
        nonlocal expired, delivered
        pair.recipient = await wire.connect(connections, spec.url, spec.secret, pair.to)
        expired += int(pair.recipient.welcome.get("expired", 0))
        with trio.move_on_after(LISTEN_AFTER_EXPIRY_S):
            while True:
                frame = orjson.loads(await pair.recipient.ws.get_message())
                if frame.get("type") != "deliver":
                    failures.add("unexpected", f"{pair.to} got {str(frame)[:120]}")
                    continue
                for m in frame["messages"]:
                    seq, _ = wire.parse_body(m["body"])
                    delivered += 1
                    link.count(DELIVERED)
                    failures.add(
                        "after_expiry",
                        f"{pair.to}: #{seq} delivered after the retention window "
                        f"(expires_at {m['expires_at']}, now {wire.wall_ms()})",
                    )

    with trio.fail_after(wire.CONNECT_TIMEOUT_S + LISTEN_AFTER_EXPIRY_S + 5):
        async with trio.open_nursery() as nursery:
            for pair in pairs:
                nursery.start_soon(listen, pair)
    return {"welcome_expired": expired, "delivered_after_expiry": delivered}
