"""One round of messages over a set of pairs: closed loop (a window per sender) or open loop.

Sender and recipient of a pair live in the same process, so the time a body
carries (`time.monotonic_ns()`) can be compared with the time of delivery.
Recipients ack every `deliver` frame at once, with a `ref`, and a round ends
when every pair's recipient has had all the round's messages acked. A round
with no progress for `stall_s` stops; what was accepted and not delivered by
then is reported as lost.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import trio
from hdrh.histogram import HdrHistogram
from trio_websocket import ConnectionClosed

from . import wire
from .checks import Failures, SessionChecker
from .measure import Recorder, new_histogram
from .procs import DELIVERED, SENT, Link

OPEN_LOOP_MAX_OUTSTANDING = 10_000  # unaccepted sends per sender before the open loop waits


@attrs.define(eq=False)
class Pair:
    index: int
    sender: wire.Conn | None  # None once closed (drain: senders leave before recipients come)
    to: str  # the recipient's mailbox
    checker: SessionChecker
    recipient: wire.Conn | None = None  # None while offline
    sent: int = 0  # sequence number of the next send
    accepted: int = 0
    rejected: set[int] = attrs.field(factory=set)  # sequence numbers answered with `error`
    acks: int = 0
    send_times: dict[int, int] = attrs.field(factory=dict)  # open loop: seq -> actual send ns


@attrs.define
class RoundStats:
    label: str
    recorder: Recorder | None  # latency from the time in the body
    from_send: Recorder | None = None  # open loop: latency from the actual send
    send_lag: HdrHistogram | None = None  # open loop: actual send minus scheduled, us
    first_send_s: float = math.inf
    last_accept_s: float = 0.0
    last_ack_s: float = 0.0
    first_delivery_s: float = math.inf
    sent: int = 0
    accepted: int = 0
    delivered: int = 0  # new messages (not repeats) delivered
    deliver_frames: int = 0
    stalled: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "first_send_s": None if math.isinf(self.first_send_s) else self.first_send_s,
            "last_accept_s": self.last_accept_s or None,
            "last_ack_s": self.last_ack_s or None,
            "first_delivery_s": None
            if math.isinf(self.first_delivery_s)
            else self.first_delivery_s,
            "sent": self.sent,
            "accepted": self.accepted,
            "delivered": self.delivered,
            "deliver_frames": self.deliver_frames,
            "stalled": self.stalled,
            "latency": self.recorder.to_json() if self.recorder else None,
            "latency_from_send": self.from_send.to_json() if self.from_send else None,
            "send_lag": _encode(self.send_lag),
        }


def error_text(frame: dict[str, Any]) -> str:
    text = f"{frame.get('code')}: {frame.get('message')}"
    if frame.get("code") == "rate_limited":
        text += " (run the relay with a higher --rate-limit and --rate-burst)"
    return text


def _encode(hist: HdrHistogram | None) -> str | None:
    return hist.encode().decode() if hist is not None and hist.get_total_count() else None


@attrs.define
class RoundContext:
    link: Link
    failures: Failures
    stats: RoundStats
    stall_s: float
    body_bytes: int
    cancel: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    progress_at: float = attrs.field(factory=time.monotonic)

    def progressed(self) -> None:
        self.progress_at = time.monotonic()


async def run_round(ctx: RoundContext, tasks: list[Callable[[], Awaitable[None]]]) -> None:
    """Run the round's tasks until they finish, a connection closes, or progress stalls."""

    async def guarded(task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except* ConnectionClosed as group:
            closed = group.exceptions[0]
            while isinstance(closed, BaseExceptionGroup):
                closed = closed.exceptions[0]
            reason = getattr(closed, "reason", None)
            code = reason.code if reason is not None else None
            ctx.failures.add("closed", f"the relay closed with {code} during {ctx.stats.label}")
            ctx.stats.stalled = True
            ctx.cancel.cancel()

    async def watchdog() -> None:
        while True:
            await trio.sleep(0.5)
            if time.monotonic() - ctx.progress_at > ctx.stall_s:
                ctx.stats.stalled = True
                ctx.failures.add("timeout", f"{ctx.stats.label}: no progress for {ctx.stall_s} s")
                ctx.cancel.cancel()

    async with trio.open_nursery() as outer:
        outer.start_soon(watchdog)
        with ctx.cancel:
            async with trio.open_nursery() as nursery:
                for task in tasks:
                    nursery.start_soon(guarded, task)
        outer.cancel_scope.cancel()


async def read_answers(ctx: RoundContext, pair: Pair, n: int, credit: trio.Semaphore) -> None:
    """The sender's side: `n` answers (`accepted` or `error`), in the order of the sends."""
    assert pair.sender is not None
    ws, stats = pair.sender.ws, ctx.stats
    first_seq = pair.sent
    for i in range(n):
        frame = orjson.loads(await ws.get_message())
        if frame.get("type") == "accepted":
            pair.accepted += 1
            stats.accepted += 1
            stats.last_accept_s = time.monotonic()
            ctx.link.count(SENT)
        elif frame.get("type") == "error":
            pair.rejected.add(first_seq + i)
            ctx.failures.add("relay_error", f"send #{first_seq + i}: {error_text(frame)}")
        else:
            ctx.failures.add("unexpected", f"sender got {str(frame)[:120]}")
        credit.release()
        ctx.progressed()


async def receive(
    ctx: RoundContext, pair: Pair, n: int, on_first: Callable[[], None] | None = None
) -> None:
    """The recipient's side: check and ack every delivery until `n` new ones are acked.

    `on_first` is called when the first `deliver` frame arrives.
    """
    assert pair.recipient is not None
    ws, stats, checker, rec = pair.recipient.ws, ctx.stats, pair.checker, ctx.stats.recorder
    from_send = ctx.stats.from_send
    got = 0
    pending: dict[str, list[str]] = {}
    while got < n or pending:
        raw = await ws.get_message()
        now_ns = time.monotonic_ns()
        frame = orjson.loads(raw)
        kind = frame.get("type")
        if kind == "deliver":
            now_ms, now_s = wire.wall_ms(), now_ns / 1e9
            stats.first_delivery_s = min(stats.first_delivery_s, now_s)
            stats.deliver_frames += 1
            if on_first is not None:
                on_first()
                on_first = None
            ids, new = [], 0
            for m in frame["messages"]:
                seq, t_ns = wire.parse_body(m["body"])
                if checker.on_deliver(m["id"], seq, m["expires_at"], now_ms):
                    new += 1
                    if rec is not None:
                        rec.record(now_ns - t_ns, now_s)
                    if from_send is not None:
                        from_send.record(now_ns - pair.send_times.pop(seq, t_ns), now_s)
                ids.append(m["id"])
            got += new
            stats.delivered += new
            ctx.link.count(DELIVERED, new)
            pair.acks += 1
            ref = f"a{pair.acks}"
            pending[ref] = ids
            await ws.send_message(wire.ack_frame(ids, ref))
        elif kind == "acked":
            ids = pending.pop(frame.get("ref"), [])
            if frame.get("count") != len(ids):
                ctx.failures.add(
                    "ack_count", f"{pair.to}: ack of {len(ids)} deleted {frame.get('count')}"
                )
            checker.on_acked(ids)
            stats.last_ack_s = now_ns / 1e9
        elif kind == "error":
            pending.pop(frame.get("ref", ""), None)  # an ack the relay refused
            ctx.failures.add("relay_error", f"recipient: {error_text(frame)}")
        else:
            ctx.failures.add("unexpected", f"recipient got {str(frame)[:120]}")
        ctx.progressed()


async def send_windowed(ctx: RoundContext, pair: Pair, n: int, window: int) -> None:
    """Send `n` messages, at most `window` of them unanswered; bodies carry the send time."""
    assert pair.sender is not None
    credit = trio.Semaphore(window)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_answers, ctx, pair, n, credit)
        to, ws, size, stats = pair.to, pair.sender.ws, ctx.body_bytes, ctx.stats
        for _ in range(n):
            await credit.acquire()
            t_ns = time.monotonic_ns()
            stats.first_send_s = min(stats.first_send_s, t_ns / 1e9)
            await ws.send_message(wire.send_frame(to, wire.make_body(pair.sent, t_ns, size)))
            pair.sent += 1
            stats.sent += 1


def closed_loop_tasks(
    ctx: RoundContext, pairs: list[Pair], n: int, window: int
) -> list[Callable[[], Awaitable[None]]]:
    """Every pair at once: windowed senders, recipients that ack what they get."""
    tasks: list[Callable[[], Awaitable[None]]] = []
    for pair in pairs:
        tasks += [_sender(ctx, pair, n, window), _receiver(ctx, pair, n)]
    return tasks


def _sender(ctx: RoundContext, pair: Pair, n: int, window: int) -> Callable[[], Awaitable[None]]:
    return lambda: send_windowed(ctx, pair, n, window)


def open_loop_tasks(
    ctx: RoundContext, pairs: list[Pair], n: int, rate: float
) -> list[Callable[[], Awaitable[None]]]:
    """Sends at fixed times (`rate` msgs/s over these pairs), whatever the answers do.

    A pacing thread sleeps until each send is due (time.sleep is precise to
    tens of microseconds; Trio's timers round up to the next millisecond) and
    hands the scheduled time to the pair's sender task. Bodies carry the
    scheduled time, so a send the generator made late still counts late.
    """
    ctx.stats.send_lag = new_histogram()
    channels = [trio.open_memory_channel[int](math.inf) for _ in pairs]
    stop = threading.Event()
    token = trio.lowlevel.current_trio_token()

    def pace() -> None:
        start_ns = time.monotonic_ns() + 5_000_000
        interval_ns = 1e9 / rate
        for j in range(n * len(pairs)):
            due_ns = start_ns + int(j * interval_ns)
            delay = (due_ns - time.monotonic_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            if stop.is_set():
                return
            token.run_sync_soon(channels[j % len(pairs)][0].send_nowait, due_ns)

    async def pacer() -> None:
        try:
            await trio.to_thread.run_sync(pace, abandon_on_cancel=True)
        finally:
            stop.set()

    def sender(i: int, pair: Pair) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            credit = trio.Semaphore(OPEN_LOOP_MAX_OUTSTANDING)
            receiver = channels[i][1]
            lag, stats, size = ctx.stats.send_lag, ctx.stats, ctx.body_bytes
            assert lag is not None
            assert pair.sender is not None
            to, ws, times = pair.to, pair.sender.ws, pair.send_times
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_answers, ctx, pair, n, credit)
                for _ in range(n):
                    due_ns = await receiver.receive()
                    await credit.acquire()
                    now_ns = time.monotonic_ns()
                    lag.record_value(max((now_ns - due_ns) // 1000, 1))
                    stats.first_send_s = min(stats.first_send_s, now_ns / 1e9)
                    times[pair.sent] = now_ns
                    await ws.send_message(
                        wire.send_frame(to, wire.make_body(pair.sent, due_ns, size))
                    )
                    pair.sent += 1
                    stats.sent += 1

        return run

    tasks: list[Callable[[], Awaitable[None]]] = [pacer]
    for i, pair in enumerate(pairs):
        tasks += [sender(i, pair), _receiver(ctx, pair, n)]
    return tasks


def _receiver(ctx: RoundContext, pair: Pair, n: int) -> Callable[[], Awaitable[None]]:
    return lambda: receive(ctx, pair, n)


async def _roundtrip_stalled(ctx: RoundContext, pair: Pair) -> None:
    """No delivery in time: was the send refused?"""
    assert pair.sender is not None
    ctx.stats.stalled = True
    with trio.move_on_after(1.0):
        answer = orjson.loads(await pair.sender.ws.get_message())
        if answer.get("type") == "error":
            pair.rejected.add(pair.sent - 1)
            ctx.failures.add("relay_error", f"send #{pair.sent - 1}: {error_text(answer)}")
            return
    ctx.failures.add("timeout", f"#{pair.sent - 1} not delivered within {ctx.stall_s} s")


async def roundtrip(ctx: RoundContext, pair: Pair, n: int) -> None:
    """One message in flight: send, wait for its delivery, ack it, wait for `acked`."""
    assert pair.sender is not None and pair.recipient is not None
    rec, cycle = ctx.stats.recorder, ctx.stats.from_send
    s, r, to, stats = pair.sender.ws, pair.recipient.ws, pair.to, ctx.stats
    for _ in range(n):
        t0 = time.monotonic_ns()
        stats.first_send_s = min(stats.first_send_s, t0 / 1e9)
        await s.send_message(wire.send_frame(to, wire.make_body(pair.sent, t0, ctx.body_bytes)))
        pair.sent += 1
        stats.sent += 1
        with trio.move_on_after(ctx.stall_s) as waiting:
            frame = orjson.loads(await r.get_message())
        if waiting.cancelled_caught:
            await _roundtrip_stalled(ctx, pair)
            return
        t1 = time.monotonic_ns()
        if frame.get("type") != "deliver" or len(frame["messages"]) != 1:
            ctx.failures.add("unexpected", f"recipient got {str(frame)[:120]}")
            return
        m = frame["messages"][0]
        seq, _ = wire.parse_body(m["body"])
        pair.checker.on_deliver(m["id"], seq, m["expires_at"], wire.wall_ms())
        stats.delivered += 1
        stats.deliver_frames += 1
        ctx.link.count(DELIVERED)
        await r.send_message(wire.ack_frame([m["id"]], "a"))
        acked = orjson.loads(await r.get_message())
        answer = orjson.loads(await s.get_message())
        t2 = time.monotonic_ns()
        if acked.get("type") != "acked" or acked.get("count") != 1:
            ctx.failures.add("ack_count", f"roundtrip ack answered {str(acked)[:120]}")
        if answer.get("type") != "accepted":
            ctx.failures.add("relay_error", f"roundtrip send: {error_text(answer)}")
        else:
            pair.accepted += 1
            stats.accepted += 1
            ctx.link.count(SENT)
        pair.checker.on_acked([m["id"]])
        stats.last_ack_s = t2 / 1e9
        if rec is not None and cycle is not None:
            rec.record(t1 - t0, t1 / 1e9)
            cycle.record(t2 - t0, t2 / 1e9)
        ctx.progressed()
