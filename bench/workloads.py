"""The workloads by name (the names are part of the `relay bench` interface)."""

from __future__ import annotations

from collections.abc import Callable

from bench.outcome import Outcome
from bench.runner import Run
from bench.workload_idle import idle
from bench.workload_mailboxes import drain, retention
from bench.workload_pairs import burst, latency, roundtrip, throughput

WORKLOADS: dict[str, Callable[[Run], Outcome]] = {
    "throughput": throughput,
    "latency": latency,
    "roundtrip": roundtrip,
    "drain": drain,
    "burst": burst,
    "idle": idle,
    "retention": retention,
}
