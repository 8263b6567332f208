"""The workloads by name (the names are part of the `relay bench` interface)."""

from __future__ import annotations

from collections.abc import Callable

from .outcome import Outcome
from .runner import Run
from .workload_flood import flood
from .workload_idle import idle
from .workload_mailboxes import drain, retention
from .workload_pairs import burst, latency, roundtrip, throughput

WORKLOADS: dict[str, Callable[[Run], Outcome]] = {
    "throughput": throughput,
    "latency": latency,
    "roundtrip": roundtrip,
    "drain": drain,
    "burst": burst,
    "idle": idle,
    "retention": retention,
    "flood": flood,
}
