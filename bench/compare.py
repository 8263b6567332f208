"""Each workload's headline numbers, and how they compare: with the calibration's ceiling
(the echo server) and with a baseline commit's relay (`--baseline`).

Issue 10's targets are relative to the baseline relay, measured in the same
run; they are checked here when there is one.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .options import BenchOptions
from .outcome import Outcome


@attrs.frozen
class Item:
    key: str  # name in the headline
    path: tuple[str, ...]  # where in the workload's metrics
    unit: str
    ceiling: str | None = None  # the calibration's headline key this is a fraction of


def _pair_items(phase: str = "") -> list[Item]:
    p = (phase,) if phase else ()
    k = f"{phase}_" if phase else ""
    return [
        Item(f"{k}msgs_per_s", (*p, "msgs_per_s"), "msgs/s", "msgs_per_s"),
        Item(
            f"{k}relay_cpu_us_per_msg",
            (*p, "relay", "cpu_us_per_msg"),
            "µs/msg",
            "relay_cpu_us_per_msg",
        ),
        Item(f"{k}p50_us", (*p, "latency_us", "p50"), "µs", "p50_us"),
        Item(f"{k}p99_us", (*p, "latency_us", "p99"), "µs", "p99_us"),
        Item(f"{k}redis_cpu_us_per_msg", (*p, "redis", "cpu_us_per_msg"), "µs/msg"),
    ]


def _store_items(phase: str, path: tuple[str, ...]) -> list[Item]:
    return [
        Item(f"{phase}_msgs_per_s", (*path, "msgs_per_s"), "msgs/s", "msgs_per_s"),
        Item(
            f"{phase}_relay_cpu_us_per_msg",
            (*path, "relay", "cpu_us_per_msg"),
            "µs/msg",
            "relay_cpu_us_per_msg",
        ),
        Item(f"{phase}_redis_cpu_us_per_msg", (*path, "redis", "cpu_us_per_msg"), "µs/msg"),
    ]


ITEMS: dict[str, list[Item]] = {
    "throughput": _pair_items(),
    "latency": _pair_items(),
    "roundtrip": _pair_items(),
    "calibrate": _pair_items(),
    "burst": [*_pair_items("burst"), *_pair_items("reference"), Item("ratio", ("ratio",), "x")],
    "drain": [
        *_store_items("store", ("store",)),
        *_store_items("drain", ("drain",)),
        Item("time_to_first_message_p99_us", ("time_to_first_message_us", "p99"), "µs"),
    ],
    "flood": [
        *_pair_items("quiet"),
        *_pair_items("flood"),
        Item("p99_ratio", ("p99_ratio",), "x"),
        Item("flood_relay_cpu_util", ("flood", "relay", "cpu_util"), "cores"),
        Item("flooder_accepted_per_s", ("flooder", "accepted_per_s"), "msgs/s"),
    ],
    "idle": [
        Item("relay_bytes_per_conn", ("relay_bytes_per_conn_held",), "bytes"),
        Item("redis_bytes_per_conn", ("redis_bytes_per_conn_held",), "bytes"),
        Item("heartbeat_p50_us", ("heartbeat_us", "p50"), "µs"),
        Item("heartbeat_p99_us", ("heartbeat_us", "p99"), "µs"),
        Item("relay_cpu_util_while_idle", ("relay_cpu_util_while_idle",), "cores"),
    ],
    "retention": [
        Item(
            "store_relay_cpu_us_per_msg",
            ("store_relay", "cpu_us_per_msg"),
            "µs/msg",
            "relay_cpu_us_per_msg",
        )
    ],
}


# The headline number that picks a side's median run under --repeat.
MEDIAN_BY = {
    "throughput": "relay_cpu_us_per_msg",
    "latency": "p99_us",
    "roundtrip": "p99_us",
    "calibrate": "msgs_per_s",
    "burst": "ratio",
    "drain": "drain_msgs_per_s",
    "flood": "p99_ratio",
    "idle": "relay_bytes_per_conn",
    "retention": "store_relay_cpu_us_per_msg",
}


def median_index(workload: str, runs: Sequence[Mapping[str, Any]]) -> int:
    """Which of several runs' metrics is the median by the workload's MEDIAN_BY number (the
    lower middle one of an even count; runs without the number come last)."""
    item = next(i for i in ITEMS[workload] if i.key == MEDIAN_BY[workload])
    values = [_get(metrics, item.path) for metrics in runs]
    order = sorted(range(len(runs)), key=lambda i: (values[i] is None, values[i] or 0.0))
    measured = [i for i in order if values[i] is not None] or order
    return measured[(len(measured) - 1) // 2]


def medians(workload: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Each headline number's median over several runs (each number on its own)."""
    out: dict[str, float | None] = {}
    for item in ITEMS[workload]:
        values = [v for metrics in runs if (v := _get(metrics, item.path)) is not None]
        out[item.key] = statistics.median(values) if values else None
    return out


def _get(metrics: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = metrics
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def headline(workload: str, metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The numbers a workload is judged by, by key."""
    return {item.key: _get(metrics, item.path) for item in ITEMS[workload]}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def versus_ceiling(
    workload: str, metrics: Mapping[str, Any], ceiling: Mapping[str, float | None]
) -> list[dict[str, Any]]:
    """Each headline number that has a counterpart in the calibration, and its ratio to it."""
    rows = []
    for item in ITEMS[workload]:
        if item.ceiling is None:
            continue
        value, limit = _get(metrics, item.path), ceiling.get(item.ceiling)
        rows.append(
            {
                "key": item.key,
                "unit": item.unit,
                "value": value,
                "ceiling": limit,
                "ratio": ratio(value, limit),
            }
        )
    return rows


def versus_baseline(
    workload: str, this: Mapping[str, Any], base: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Each headline number of this relay and of the baseline, and this / baseline."""
    rows = []
    for item in ITEMS[workload]:
        a, b = _get(this, item.path), _get(base, item.path)
        rows.append(
            {"key": item.key, "unit": item.unit, "this": a, "baseline": b, "ratio": ratio(a, b)}
        )
    return rows


# Issue 10's targets against the baseline relay: (workload, headline key, op, factor)
BASELINE_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("throughput", "msgs_per_s", ">=", 2.5),
    ("throughput", "relay_cpu_us_per_msg", "<=", 0.4),
    ("throughput", "redis_cpu_us_per_msg", "<=", 0.5),
    ("drain", "drain_msgs_per_s", ">=", 1.5),
)
LATENCY_BASELINE_RATE = 500.0  # the latency target against the baseline is set at this rate
LATENCY_BASELINE_FACTOR = 0.5


def baseline_targets(
    options: BenchOptions,
    outcome: Outcome,
    this: Mapping[str, Any],
    base: Mapping[str, Any],
) -> None:
    """Add issue 10's targets relative to the baseline to `outcome` (limits in absolute units)."""
    wanted = [t for t in BASELINE_TARGETS if t[0] == options.workload]
    if options.workload == "latency" and options.rate == LATENCY_BASELINE_RATE:
        wanted.append(("latency", "p99_us", "<=", LATENCY_BASELINE_FACTOR))
    units = {item.key: item for item in ITEMS[options.workload]}
    for _, key, op, factor in wanted:
        item = units[key]
        value, reference = _get(this, item.path), _get(base, item.path)
        if reference is None:
            continue
        limit = round(factor * reference, 1)
        outcome.target(f"{key}, {factor:g}x baseline", value, op, limit, item.unit)
