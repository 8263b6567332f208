"""Recording latencies (HDR histograms, in microseconds) and deliveries over time.

Each generator process records into its own `Recorder`; the parent merges
them with `merge`. Times are `time.monotonic()` seconds, one clock for every
process of the machine, so buckets of different processes line up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from hdrh.histogram import HdrHistogram

LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS = 1, 120_000_000, 3
BUCKET_S = 0.1
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def percentiles(hist: HdrHistogram) -> dict[str, float]:
    """p50/p90/p99/p99.9/max (and count, mean) in microseconds."""
    if hist.get_total_count() == 0:
        return {"count": 0}
    found: dict[str, float] = {
        f"p{p:g}": float(hist.get_value_at_percentile(p)) for p in PERCENTILES
    }
    found["max"] = float(hist.get_max_value())
    found["mean"] = round(float(hist.get_mean_value()), 1)
    found["count"] = hist.get_total_count()
    return found


@attrs.define
class Recorder:
    """Latencies of one kind, and when messages arrived."""

    origin_s: float  # the run's time zero, shared by all processes
    hist: HdrHistogram = attrs.field(factory=new_histogram)
    buckets: dict[int, int] = attrs.field(factory=dict)

    def record(self, latency_ns: int, now_s: float) -> None:
        self.hist.record_value(min(max(latency_ns // 1000, LOWEST_US), HIGHEST_US))
        bucket = int((now_s - self.origin_s) / BUCKET_S)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "hist": self.hist.encode().decode() if self.hist.get_total_count() else "",
            "buckets": self.buckets,
        }


def merge(parts: Iterable[Mapping[str, Any]]) -> tuple[HdrHistogram, dict[int, int]]:
    """One histogram and one bucket series from the `to_json` of several recorders."""
    hist = new_histogram()
    buckets: dict[int, int] = {}
    for part in parts:
        if part.get("hist"):
            hist.add(HdrHistogram.decode(part["hist"].encode()))
        for bucket, count in part.get("buckets", {}).items():
            buckets[int(bucket)] = buckets.get(int(bucket), 0) + count
    return hist, buckets


def encode(hist: HdrHistogram) -> str:
    return str(hist.encode().decode()) if hist.get_total_count() else ""


@attrs.define
class CpuClock:
    """CPU time and wall time of this process since `start`."""

    cpu_s: float = 0.0
    wall_s: float = 0.0

    def start(self) -> None:
        self.cpu_s, self.wall_s = time.process_time(), time.monotonic()

    def stop(self) -> dict[str, float]:
        cpu, wall = time.process_time() - self.cpu_s, time.monotonic() - self.wall_s
        return {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4)}
