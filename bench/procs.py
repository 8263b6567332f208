"""Load generator processes, their progress counters and the gates between phases.

The parent starts K worker processes (the `spawn` start method: nothing of the
parent's state leaks in). Each runs one Trio loop over its share of the pairs
or connections and returns one JSON-able dict. Between phases every worker
stops at a named gate; when all K have arrived, the parent runs its callback
for that gate (a snapshot of the relay's CPU, of Redis's counters...) and
opens the gate. Progress is a shared array of counters the parent reads for
its progress display; nothing is sent per message between processes.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.sharedctypes
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .options import BenchOptions

SENT, DELIVERED, CONNECTED = 0, 1, 2
SLOTS = 3
POLL_S = 0.1
JOIN_S = 10.0


class WorkerFailed(Exception):
    """A generator process raised, died or missed a gate."""


@attrs.frozen
class WorkerSpec:
    index: int
    procs: int
    options: BenchOptions
    url: str
    secret: str
    run_id: str
    origin_s: float  # time.monotonic() of the run's start, shared by all processes
    units: tuple[int, int]  # [start, stop) of the pairs or connections of this worker
    gates: tuple[str, ...]
    entry: str  # "module:function", an async function (spec, link) -> dict
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Shared:
    progress: Any  # RawArray of int64: SLOTS counters per worker
    arrivals: Any  # Array of int: workers arrived at each gate
    releases: tuple[Any, ...]  # one Event per gate
    abort: Any  # an Event: the parent gave up; a worker let through a gate stops


class Link:
    """A worker's handle on the shared counters and gates."""

    def __init__(self, spec: WorkerSpec, shared: Shared) -> None:
        self.spec = spec
        self._shared = shared
        self._base = spec.index * SLOTS

    def count(self, slot: int, n: int = 1) -> None:
        self._shared.progress[self._base + slot] += n

    async def gate(self, name: str) -> None:
        """Arrive at gate `name` and wait until the parent opens it."""
        i = self.spec.gates.index(name)
        with self._shared.arrivals.get_lock():
            self._shared.arrivals[i] += 1
        remaining = self.spec.options.timeout_s - (time.monotonic() - self.spec.origin_s)
        opened = await trio.to_thread.run_sync(
            self._shared.releases[i].wait, max(remaining, 1.0), abandon_on_cancel=True
        )
        if self._shared.abort.is_set():
            raise WorkerFailed("the parent stopped the run")
        if not opened:
            raise WorkerFailed(f"gate {name!r} was not opened within the run's timeout")


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `total` units over `parts` workers, as even as possible."""
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _worker_main(spec: WorkerSpec, shared: Shared, results: Any) -> None:
    try:
        module, _, name = spec.entry.partition(":")
        run = getattr(importlib.import_module(module), name)
        results.put({"index": spec.index, "result": trio.run(run, spec, Link(spec, shared))})
    except BaseException:
        results.put({"index": spec.index, "error": traceback.format_exc(limit=8)})


Tick = Callable[[str, Sequence[int]], None]  # phase, summed counters


def run_workers(
    specs: list[WorkerSpec],
    on_gate: Callable[[str], None],
    on_tick: Tick,
    deadline_s: float,
) -> list[dict[str, Any]]:
    """Run the workers through their gates; their results in worker order."""
    ctx = multiprocessing.get_context("spawn")
    gates = specs[0].gates
    shared = Shared(
        progress=ctx.RawArray("q", len(specs) * SLOTS),
        arrivals=ctx.Array("i", max(len(gates), 1)),
        releases=tuple(ctx.Event() for _ in gates),
        abort=ctx.Event(),
    )
    results_queue = ctx.Queue()
    processes = [
        ctx.Process(target=_worker_main, args=(spec, shared, results_queue), daemon=True)
        for spec in specs
    ]
    results: dict[int, dict[str, Any]] = {}
    finished = False
    try:
        for process in processes:
            process.start()

        def poll(phase: str) -> None:
            _collect(results_queue, results)
            errors = [r["error"] for r in results.values() if "error" in r]
            if errors:
                raise WorkerFailed(f"generator process failed:\n{errors[0]}")
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise WorkerFailed(f"generator process {dead[0].pid} died ({dead[0].exitcode})")
            if time.monotonic() > deadline_s:
                raise WorkerFailed(f"the run's timeout passed during {phase!r}")
            on_tick(phase, _sums(shared.progress, len(specs)))
            time.sleep(POLL_S)

        for i, gate in enumerate(gates):
            while shared.arrivals[i] < len(specs):
                poll(gate)
            on_gate(gate)
            shared.releases[i].set()
        while len(results) < len(specs):
            poll("finishing")
        on_tick("done", _sums(shared.progress, len(specs)))
        finished = True
        return [results[i]["result"] for i in range(len(specs))]
    finally:
        if not finished:
            shared.abort.set()
            for release in shared.releases:
                release.set()  # a worker still waiting at a gate finds out it is over
        _stop(processes, JOIN_S if finished else 1.0)


def _collect(results_queue: Any, results: dict[int, dict[str, Any]]) -> None:
    while True:
        try:
            item = results_queue.get_nowait()
        except queue.Empty:
            return
        results[item["index"]] = item


def _sums(progress: Any, workers: int) -> list[int]:
    return [sum(progress[w * SLOTS + slot] for w in range(workers)) for slot in range(SLOTS)]


def _stop(processes: list[Any], join_s: float) -> None:
    """Join the workers; terminate, then kill, any that does not end in time."""
    deadline = time.monotonic() + join_s
    for process in processes:
        if process.pid is None:
            continue
        process.join(max(deadline - time.monotonic(), 0.1))
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
