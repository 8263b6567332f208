"""The idle workload, parent side: memory per connection and heartbeat latency."""

from __future__ import annotations

from typing import Any

from . import worker_idle
from .measure import merge, percentiles
from .outcome import Outcome, generator_cpu, latency_rows, merge_failures
from .procs import CONNECTED
from .runner import Run

IDLE_BYTES_TARGET = 20 * 1024  # issue 10: relay memory per connection, at 5,000 connections


def idle(run: Run) -> Outcome:
    o = run.options
    outcome = Outcome()
    results = run.run_workers(
        f"{__package__}.worker_idle:run",
        worker_idle.GATES,
        o.connections,
        o.connections,
        slot=CONNECTED,
        profile_between=("connected", "held"),
    )
    merge_failures(run, results)
    if not results:
        return outcome
    held = sum(r["connections"] for r in results)
    pings, _ = merge(r["pings"] for r in results)
    snaps = run.snapshots
    per_conn: dict[str, Any] = {}
    for gate in ("connected", "held"):
        rss0, rss1 = snaps["baseline"]["relay_rss"], snaps[gate]["relay_rss"]
        if rss0 is not None and rss1 is not None:
            per_conn[f"relay_bytes_per_conn_{gate}"] = round((rss1 - rss0) / max(held, 1))
        redis0, redis1 = snaps["baseline"]["redis"], snaps[gate]["redis"]
        if redis0 and redis1:
            per_conn[f"redis_bytes_per_conn_{gate}"] = round(
                (redis1["used_memory"] - redis0["used_memory"]) / max(held, 1)
            )
    connect_s = max(r["connect_s"] for r in results)
    hold = run.relay_cost("connected", "held", 1)
    outcome.metrics = {
        "connections": held,
        "connect_s": connect_s,
        "connects_per_s": round(held / connect_s, 1) if connect_s else None,
        "heartbeat_us": percentiles(pings),
        "relay_rss_bytes": {g: snaps[g]["relay_rss"] for g in ("baseline", "connected", "held")},
        "relay_cpu_util_while_idle": hold.get("cpu_util"),
        **per_conn,
    }
    outcome.histograms["heartbeat (ping to pong)"] = pings
    outcome.sent = outcome.delivered = 0
    outcome.row(
        "connections held",
        f"{held:,} for {o.hold_s:g} s (opened in {connect_s:.2f} s, "
        f"{outcome.metrics['connects_per_s'] or 0:,.0f}/s)",
    )
    for key, value in per_conn.items():
        outcome.row(key.replace("_", " "), f"{value / 1024:.1f} KiB")
    latency_rows(outcome, "heartbeat", outcome.metrics["heartbeat_us"], ("p50", "p99", "max"))
    if hold.get("cpu_util") is not None:
        outcome.row("relay CPU while idle", f"{hold['cpu_util']:.1%} of a core")
    if run.target.spawned:
        outcome.row("relay keepalive", f"pings every {o.ping_interval_s:g} s (--ping-interval)")
    generator = generator_cpu([{"cpu": r["cpu"]} for r in results])
    outcome.metrics["generator"] = generator
    utils = ", ".join(f"{u:.0%}" for u in generator["cpu_util"])
    saturated = " SATURATED: heartbeats include generator delay" if generator["saturated"] else ""
    outcome.row("generator CPU while idle", f"{utils} of a core per process{saturated}")
    if o.connections != 5000:
        outcome.notes.append("the memory target is defined at 5,000 connections")
    outcome.target(
        "relay memory per connection",
        per_conn.get("relay_bytes_per_conn_held"),
        "<=",
        IDLE_BYTES_TARGET,
        "bytes",
    )
    return outcome
