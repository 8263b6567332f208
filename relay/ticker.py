"""One task for the timers of every session of the process.

A timer task per session (pings, the backstop re-read, token expiry) costs a
task, its frames and a cancel scope per idle connection, and a wake-up per
timer. The ticker keeps one heap of deadlines instead and calls each session's
`tick` when its deadline comes; the heap holds sessions weakly, so a closed
session is not kept alive by its next deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import weakref
from typing import Protocol

import trio

log = logging.getLogger(__name__)


class Ticking(Protocol):
    def tick(self, now: float) -> None:
        """Do what is due at `now`, and ask for the next tick with `Ticker.at`."""
        ...


class Ticker:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[Ticking]]] = []
        self._order = itertools.count()  # ties never compare the references
        self._earlier = trio.Event()

    def at(self, when: float, target: Ticking) -> None:
        """Call `target.tick` at `when` (Trio clock), once."""
        if not self._heap or when < self._heap[0][0]:
            self._earlier.set()
        heapq.heappush(self._heap, (when, next(self._order), weakref.ref(target)))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            deadline = self._heap[0][0] if self._heap else float("inf")
            with trio.move_on_at(deadline):
                await self._earlier.wait()
            self._earlier = trio.Event()
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, ref = heapq.heappop(self._heap)
                target = ref()
                if target is None:
                    continue
                try:
                    target.tick(now)
                except Exception:  # one session's bug must not stop every session's timers
                    log.exception("timer failed")
