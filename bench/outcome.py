"""What a workload found: metrics, table rows, targets, and the series the plots draw."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from hdrh.histogram import HdrHistogram

from .measure import merge, percentiles
from .runner import Run

SATURATED = 0.9  # a process using more than this share of one core is the bottleneck
NOISY_CORES = 0.1  # CPU used by other processes above which a run is not on a quiet machine


@attrs.define
class Outcome:
    metrics: dict[str, Any] = attrs.field(factory=dict)
    rows: list[tuple[str, str]] = attrs.field(factory=list)
    targets: list[dict[str, Any]] = attrs.field(factory=list)
    histograms: dict[str, HdrHistogram] = attrs.field(factory=dict)  # title -> latencies (us)
    series: dict[str, dict[int, int]] = attrs.field(factory=dict)  # label -> deliveries per bucket
    sent: int = 0
    delivered: int = 0
    notes: list[str] = attrs.field(factory=list)

    def row(self, name: str, value: str) -> None:
        self.rows.append((name, value))

    def target(self, name: str, value: float | None, op: str, limit: float, unit: str) -> None:
        met = value is not None and (value >= limit if op == ">=" else value <= limit)
        gap = None
        if value is not None and not met and limit:
            gap = round(
                100 * (limit - value) / limit if op == ">=" else 100 * (value - limit) / limit, 1
            )
        self.targets.append(
            {
                "name": name,
                "op": op,
                "limit": limit,
                "unit": unit,
                "value": value,
                "met": met,
                "gap_pct": gap,
            }
        )


def us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} µs"


def latency_rows(
    outcome: Outcome, title: str, stats: Mapping[str, Any], keys: tuple[str, ...]
) -> None:
    if not stats.get("count"):
        outcome.row(title, "no samples")
        return
    outcome.row(title, "  ".join(f"{k} {us(stats.get(k))}" for k in keys))


def rounds_of(results: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    return [r for w in results for r in w.get("rounds", []) if r["label"] == label]


def generator_cpu(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU of each generator process over the round, as a share of one core."""
    utils = [
        round(r["cpu"]["cpu_s"] / r["cpu"]["wall_s"], 3) if r["cpu"]["wall_s"] else 0.0
        for r in rounds
    ]
    return {
        "cpu_s": [r["cpu"]["cpu_s"] for r in rounds],
        "cpu_util": utils,
        "saturated": any(u > SATURATED for u in utils),
    }


def cores_text(relay: Mapping[str, Any]) -> str:
    """The relay's CPU use: a share of one core, or with workers, cores of the processes."""
    util = relay.get("cpu_util") or 0.0
    processes = relay.get("processes", 1)
    if processes <= 1:
        return f"{util:.0%} of a core"
    return f"{util:.2f} cores over {processes} relay processes"


def bottleneck(
    relay: Mapping[str, Any], generator: Mapping[str, Any], machine: Mapping[str, Any]
) -> str:
    relay_util, main = relay.get("cpu_util"), relay.get("main_thread_cpu_util")
    other = machine.get("other_processes_cores") or 0.0
    parts = []
    if other >= NOISY_CORES:
        parts.append(f"CPU taken by other processes ({other:.2f} cores)")
    cores = relay.get("cores", 1)
    if relay_util is not None and (relay_util > SATURATED * cores or (main or 0) > SATURATED):
        parts.append(f"relay CPU ({cores_text(relay)}, Trio thread {main:.0%})")
    if generator.get("saturated"):
        parts.append(
            f"load generator CPU (max {max(generator['cpu_util']):.0%} of a core per process)"
        )
    if parts:
        return " and ".join(parts)
    if relay_util is None:
        return "unknown (relay PID not known)"
    return (
        f"neither CPU saturated (relay {cores_text(relay)}, Trio thread {main or 0:.0%}): "
        "bound by latency and window, Redis, or CPUs shared with other processes"
    )


def summarize_round(
    run: Run, results: list[dict[str, Any]], label: str, helper_cpu_s: float = 0.0
) -> dict[str, Any]:
    """Rate, latency, costs and bottleneck of one measured round over all processes
    (`helper_cpu_s`: CPU of the bench's other processes meanwhile, e.g. a flooder)."""
    rounds = rounds_of(results, label)
    starts = [r["first_send_s"] for r in rounds if r["first_send_s"] is not None]
    ends = [r["last_ack_s"] for r in rounds if r["last_ack_s"] is not None]
    accepted = sum(r["accepted"] for r in rounds)
    delivered = sum(r["delivered"] for r in rounds)
    duration = (max(ends) - min(starts)) if starts and ends else None
    hist, buckets = merge(r["latency"] for r in rounds if r["latency"])
    relay = run.relay_cost(f"{label}:start", f"{label}:end", delivered)
    redis = run.redis_cost(f"{label}:start", f"{label}:end", delivered)
    generator = generator_cpu(rounds)
    known = sum(generator["cpu_s"]) + relay.get("cpu_s", 0.0) + redis.get("cpu_s", 0.0)
    known += helper_cpu_s
    machine = run.other_cpu(f"{label}:start", f"{label}:end", known)
    deliver_frames = sum(r.get("deliver_frames", 0) for r in rounds)
    return {
        "accepted": accepted,
        "delivered": delivered,
        "duration_s": round(duration, 4) if duration else None,
        "msgs_per_s": round(delivered / duration, 1) if duration else None,
        "latency_us": percentiles(hist),
        "relay": relay,
        "redis": redis,
        "generator": generator,
        "machine": machine,
        # send + accepted per message; deliver + ack + acked per deliver frame
        "frames_per_msg": round((2 * accepted + 3 * deliver_frames) / delivered, 2)
        if delivered
        else None,
        "msgs_per_deliver_frame": round(delivered / deliver_frames, 2) if deliver_frames else None,
        "bottleneck": bottleneck(relay, generator, machine),
        "_hist": hist,
        "_buckets": buckets,
        "_rounds": rounds,
    }


def reads_text(redis: Mapping[str, Any]) -> str:
    """Redis's read events (about one per pipeline a client sent) and calls per read."""
    return (
        f"{redis['reads']:,} reads ({redis['reads_per_msg']} per msg, "
        f"{redis['calls_per_read']} calls each)"
    )


def cost_rows(outcome: Outcome, s: Mapping[str, Any], label: str = "") -> None:
    """Rows of what messages cost; `label` prefixes them when a run has several rounds."""
    relay, redis, gen = s["relay"], s["redis"], s["generator"]
    prefix = f"{label}: " if label else ""

    def row(name: str, value: str) -> None:
        outcome.row(prefix + name, value)

    if relay.get("cpu_s") is not None:
        row(
            "relay CPU",
            f"{relay['cpu_us_per_msg']} µs/msg, {cores_text(relay)} "
            f"(Trio thread {relay['main_thread_cpu_util']:.0%})",
        )
    pump = relay.get("internals") or {}
    if pump.get("redis_batches"):
        row(
            "relay Redis pump",
            f"{pump['redis_batches']:,} pipelines of {pump['commands_per_batch']} commands, "
            f"{pump['batch_ms']} ms each, in flight {pump['pump_busy']:.0%} of the time",
        )
    if pump.get("store_to_deliver_ms") is not None:
        row("relay store to deliver", f"{pump['store_to_deliver_ms']} ms average (relay's own)")
    if redis:
        row(
            "Redis per msg",
            f"{redis['calls_per_msg']} calls ({redis['scripts_per_msg']} scripts), "
            f"{redis['cpu_us_per_msg']} µs CPU",
        )
    if redis.get("reads"):
        row("Redis reads", reads_text(redis))
    for name, node in (redis.get("nodes") or {}).items():
        row(
            f"Redis node {name}",
            f"{node['calls_per_msg']} calls ({node['scripts_per_msg']} scripts), "
            f"{node['cpu_us_per_msg']} µs CPU per msg; {reads_text(node)}",
        )
    if s.get("frames_per_msg"):
        row("frames per msg", f"{s['frames_per_msg']} ({s['msgs_per_deliver_frame']} msgs/deliver)")
    if gen["cpu_util"]:
        utils = ", ".join(f"{u:.0%}" for u in gen["cpu_util"])
        row(
            "generator CPU",
            f"{utils} of a core per process" + (" SATURATED" if gen["saturated"] else ""),
        )
    other = s.get("machine", {}).get("other_processes_cores")
    if other is not None:
        quiet = "quiet" if other < NOISY_CORES else "NOT QUIET: numbers are not comparable"
        row("other processes", f"{other:.2f} cores busy meanwhile ({quiet})")
    row("bottleneck", s["bottleneck"])


def public(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary without its private (non-JSON) parts."""
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def merge_failures(run: Run, results: list[dict[str, Any]] | None) -> None:
    for result in results or []:
        run.failures.merge(result["failures"])


def keys_left_rows(run: Run, outcome: Outcome) -> None:
    if run.target.kind == "echo":
        return  # the calibration's server stores nothing
    if not run.failures.counts.get("lost"):
        left = run.check_keys_left("every message was acked")
        outcome.metrics["keys_left"] = left
        outcome.row(
            "keys left after acks", "not checked (Redis unknown)" if left is None else str(left)
        )
    outcome.metrics["ttl_samples"] = run.ttl_samples
    outcome.metrics["ttl_keys_checked"] = run.ttl_keys_seen
