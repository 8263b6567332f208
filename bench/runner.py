"""The parent side of a run: the generator processes, snapshots, Redis sampling, progress.

A `Run` belongs to one workload run. It starts the generator processes over
their share of the units (pairs or connections), shows their progress, and at
each gate takes a snapshot: the relay's CPU seconds and memory (from /proc,
when its PID is known) and Redis's command counters (when its URL is known).
While the run goes on it samples this run's Redis keys for TTLs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .checks import Failures
from .options import BenchOptions
from .procs import CONNECTED, DELIVERED, SENT, WorkerFailed, WorkerSpec, run_workers, split
from .profile import Profiler
from .redis_probe import RedisProbe
from .relay_metrics import delta, scrape_all
from .system import machine_busy_s, parse_cpus, process_cpu_s, process_rss_bytes, process_tree
from .target import Target

KEYS_LEFT_WAIT_S = 3.0


def _relay_processes(pid: int) -> dict[str, Any] | None:
    """CPU seconds and RSS of the relay's processes (a supervisor's workers included)
    summed, and each one's main-thread CPU seconds by PID; None when it is gone."""
    cpu, main, rss = 0.0, {}, 0
    for each in process_tree(pid):
        total, own = process_cpu_s(each), process_cpu_s(each, each)
        if total is None or own is None:
            continue
        cpu += total
        main[each] = own
        rss += process_rss_bytes(each) or 0
    return {"cpu_s": cpu, "main_cpu_s": main, "rss": rss} if main else None


@attrs.define
class Run:
    options: BenchOptions
    target: Target
    run_id: str
    origin_s: float
    console: Console
    probe: RedisProbe | None = None
    failures: Failures = attrs.field(factory=Failures)
    snapshots: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    profiler: Profiler | None = None
    profile: dict[str, Any] = attrs.field(factory=dict)
    ttl_interval_s: float = 1.0
    ttl_samples: int = 0
    ttl_keys_seen: int = 0
    _last_sample_s: float = 0.0

    @property
    def deadline_s(self) -> float:
        return self.origin_s + self.options.timeout_s

    @property
    def retention_ms(self) -> int:
        return int(self.target.welcome.get("retention_s", 7 * 86400)) * 1000

    # -- snapshots -------------------------------------------------------------

    def snapshot(self, name: str) -> None:
        pid = self.target.relay_pid
        relay = _relay_processes(pid) if pid else None
        self.snapshots[name] = {
            "t": time.monotonic(),
            "relay_cpu_s": relay["cpu_s"] if relay else None,
            "relay_main_cpu_s": relay["main_cpu_s"] if relay else None,
            "relay_rss": relay["rss"] if relay else None,
            "machine_busy_s": machine_busy_s(),
            "bench_cpu_s": time.process_time(),
            "redis": self.probe.snapshot() if self.probe else None,
            "metrics": scrape_all(self.target.metrics_urls),
        }

    @property
    def relay_cores(self) -> int:
        """How many cores the relay's processes can keep busy: its workers, at most the
        CPUs it is pinned to (or the machine's)."""
        o = self.options
        cpus = len(parse_cpus(o.relay_cpu)) if o.relay_cpu else os.cpu_count() or 1
        return min(o.workers, cpus) if o.spawn else 1

    def relay_cost(self, start: str, end: str, messages: int) -> dict[str, Any]:
        """The relay's CPU between two snapshots (the supervisor and its workers summed):
        seconds, cores used (the processes, and the busiest main thread, where a Trio loop
        runs), µs per message."""
        a, b = self.snapshots[start], self.snapshots[end]
        wall = b["t"] - a["t"]
        internals = delta(a["metrics"], b["metrics"], wall)
        if a["relay_cpu_s"] is None or b["relay_cpu_s"] is None:
            return {"internals": internals} if internals else {}
        cpu = b["relay_cpu_s"] - a["relay_cpu_s"]
        before, after = a["relay_main_cpu_s"], b["relay_main_cpu_s"]
        main = max((after[p] - before[p] for p in after if p in before), default=0.0)
        return {
            "internals": internals,
            "cpu_s": round(cpu, 3),
            "cpu_util": round(cpu / wall, 3) if wall > 0 else None,
            "cores": self.relay_cores,
            "processes": len(after),
            "main_thread_cpu_util": round(main / wall, 3) if wall > 0 else None,
            "cpu_us_per_msg": round(cpu * 1e6 / messages, 1) if messages else None,
            "rss_bytes": b["relay_rss"],
        }

    def other_cpu(self, start: str, end: str, known_cpu_s: float) -> dict[str, Any]:
        """CPU that processes other than the relay, Redis and the generator used meanwhile."""
        a, b = self.snapshots[start], self.snapshots[end]
        wall = b["t"] - a["t"]
        busy = b["machine_busy_s"] - a["machine_busy_s"]
        mine = b["bench_cpu_s"] - a["bench_cpu_s"]
        other = max(busy - known_cpu_s - mine, 0.0)
        return {
            "machine_busy_cores": round(busy / wall, 2) if wall > 0 else None,
            "other_processes_cores": round(other / wall, 2) if wall > 0 else None,
        }

    def redis_cost(self, start: str, end: str, messages: int) -> dict[str, Any]:
        a, b = self.snapshots[start]["redis"], self.snapshots[end]["redis"]
        if a is None or b is None:
            return {}
        return {"version": b["version"], **RedisProbe.delta(a, b, messages)}

    # -- Redis keys -------------------------------------------------------------

    def sample_ttls(self, force: bool = False) -> None:
        """Every key of this run must have a TTL within the retention window."""
        now = time.monotonic()
        if self.probe is None or (not force and now - self._last_sample_s < self.ttl_interval_s):
            return
        self._last_sample_s = now
        seen, bad = self.probe.sample_ttls(self.retention_ms)
        self.ttl_samples += 1
        self.ttl_keys_seen += seen
        for key, ttl in bad:
            kind = "key_without_ttl" if ttl == -1 else "ttl_too_long"
            self.failures.add(kind, f"{key} PTTL {ttl} (retention {self.retention_ms} ms)")

    def check_keys_left(self, why: str, wait_s: float = KEYS_LEFT_WAIT_S) -> int | None:
        """No key of this run may remain (everything acked, or expired); None without Redis."""
        if self.probe is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            keys = self.probe.scan(1000)
            if not keys or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if keys:
            shown = ", ".join(sorted(keys)[:3])
            self.failures.add("keys_left", f"{len(keys)}+ keys after {why}: {shown}", len(keys))
        return len(keys)

    # -- generator processes ----------------------------------------------------

    def run_workers(
        self,
        entry: str,
        gates: Sequence[str],
        units: int,
        expected: int,
        on_gate: Callable[[str], None] | None = None,
        extra: dict[str, Any] | None = None,
        slot: int = DELIVERED,
        profile_between: tuple[str, str] | None = None,
        helpers: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> list[dict[str, Any]] | None:
        """Run the workers; their results, or None (with a `worker` failure) when one failed.

        `helpers` are more processes (entry, extra) with no units, through the same
        gates, whose results come last (the flood workload's flooder). With a
        profiler, the relay is sampled between two gates (default: the first and
        the last)."""
        first, last = profile_between or (gates[0], gates[-1])
        o = self.options
        specs = [
            WorkerSpec(
                index=i,
                procs=o.procs,
                options=o,
                url=self.target.url,
                secret=self.target.secret,
                run_id=self.run_id,
                origin_s=self.origin_s,
                units=share,
                gates=tuple(gates),
                entry=entry,
                extra=extra or {},
            )
            for i, share in enumerate(split(units, o.procs))
        ]
        for entry_of, extra_of in helpers:
            specs.append(
                attrs.evolve(
                    specs[0], index=len(specs), units=(0, 0), entry=entry_of, extra=extra_of
                )
            )
        names = {SENT: "accepted", DELIVERED: "delivered", CONNECTED: "connected"}
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(o.workload, total=expected)

            def tick(phase: str, sums: Sequence[int]) -> None:
                self.sample_ttls()
                counts = " ".join(f"{names[s]} {sums[s]:,}" for s in (CONNECTED, SENT, DELIVERED))
                progress.update(
                    task, completed=min(sums[slot], expected), description=f"{phase:<16} {counts}"
                )

            def gate(name: str) -> None:
                if self.profiler is not None and name == last:
                    self.profile = self.profiler.stop()
                self.snapshot(name)
                self.sample_ttls(force=True)
                if on_gate is not None:
                    on_gate(name)
                if self.profiler is not None and name == first:
                    self.profiler.start()

            try:
                return run_workers(specs, gate, tick, self.deadline_s)
            except WorkerFailed as exc:
                self.failures.add("worker", str(exc).strip())
                return None
            finally:
                if self.profiler is not None:
                    self.profile = self.profile or self.profiler.stop()
