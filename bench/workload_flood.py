"""The flood workload, parent side: the pairs' latency without and with one flooding client.

The pairs run the open loop of `latency` (`--rate` over `--pairs`) twice: the
`quiet` round alone, then the `flood` round while worker_flood.py floods one
connection as fast as it can. A spawned relay keeps its own rate limit here,
so the flood is over it and the pairs are not. Issue 10's target: the pairs'
p99 with the flood at most twice their p99 without it.
"""

from __future__ import annotations

from typing import Any

from . import worker_pairs
from .options import warmup_messages
from .outcome import Outcome, keys_left_rows, merge_failures
from .runner import Run
from .workload_pairs import open_loop_round

FLOOD_P99_RATIO_TARGET = 2.0


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def flood(run: Run) -> Outcome:
    o = run.options
    outcome = Outcome()
    expected = o.pairs * (warmup_messages(o) + 2 * o.messages)
    results = run.run_workers(
        f"{__package__}.worker_pairs:run",
        worker_pairs.gates(o),
        o.pairs,
        expected,
        helpers=[(f"{__package__}.worker_flood:run", {"flood_cpu": o.flood_cpu})],
    )
    merge_failures(run, results)
    if not results:
        return outcome
    flooder: dict[str, Any] = results[-1]["flood"]
    quiet = open_loop_round(run, results, "quiet", outcome)
    flooded = open_loop_round(run, results, "flood", outcome, flooder["cpu"]["cpu_s"])
    p50 = _ratio(flooded["latency_us"].get("p50"), quiet["latency_us"].get("p50"))
    p99 = _ratio(flooded["latency_us"].get("p99"), quiet["latency_us"].get("p99"))
    wall = flooder["cpu"]["wall_s"]
    flooder["cpu_util"] = round(flooder["cpu"]["cpu_s"] / wall, 3) if wall else None
    outcome.metrics = {
        "quiet": quiet,
        "flood": flooded,
        "p50_ratio": p50,
        "p99_ratio": p99,
        "flooder": flooder,
    }
    outcome.row("flood / quiet latency", f"p50 x{p50 or '-'}  p99 x{p99 or '-'}")
    refused = ", ".join(f"{n:,} {code}" for code, n in flooder["refused"].items()) or "none"
    outcome.row(
        "flooder",
        f"{flooder['sent']:,} sends in {flooder['duration_s']} s "
        f"({flooder['sent_per_s'] or 0:,.0f}/s): {flooder['accepted']:,} accepted, "
        f"refused {refused}, {flooder['unanswered']:,} unanswered when it stopped",
    )
    closes = ", ".join(f"{code} x{n}" for code, n in flooder["closes"].items()) or "none"
    outcome.row(
        "flooder connections",
        f"{flooder['connections']} opened, closes {closes}, "
        f"{flooder['handshakes_refused']} handshakes refused",
    )
    if flooder["cpu_util"] is not None:
        outcome.row("flooder CPU", f"{flooder['cpu_util']:.0%} of a core")
    outcome.row("flood sink", f"{flooder['sink_delivered']:,} flood messages delivered and acked")
    quiet_p99 = quiet["latency_us"].get("p99")
    if quiet_p99:
        outcome.target(
            f"flood p99, {FLOOD_P99_RATIO_TARGET:g}x quiet p99",
            flooded["latency_us"].get("p99"),
            "<=",
            FLOOD_P99_RATIO_TARGET * quiet_p99,
            "µs",
        )
    keys_left_rows(run, outcome)
    return outcome
