"""The calibration: the same load generator against the echo server, this machine's ceiling.

Before a workload (unless --no-calibrate), and as `relay bench calibrate`, the
bench runs the message loop closest to the workload against echo_server.py
(bare Trio + wsproto, no storage), pinned like the relay: the workload's own
closed loop, open loop or round trip for the pair workloads, the throughput
loop with its defaults for the others. Results are then also given as
fractions of that ceiling, which compare across machines.
"""

from __future__ import annotations

import attrs

from .options import COMMON, DEFAULTS, BenchOptions

# The message loop each workload is calibrated with (the others: throughput's defaults)
LOOP_OF = {
    "throughput": "throughput",
    "burst": "throughput",
    "calibrate": "throughput",
    "latency": "latency",
    "flood": "latency",
    "roundtrip": "roundtrip",
}


def calibration_options(o: BenchOptions) -> BenchOptions:
    """The options of the calibration run for a run with options `o`."""
    loop = LOOP_OF.get(o.workload)
    if loop is None:  # not a pair workload: the throughput loop with its own defaults
        loop = "throughput"
        defaults = {**COMMON, **DEFAULTS[loop]}
        pairs = int(defaults["pairs"])
        o = attrs.evolve(
            o,
            pairs=pairs,
            window=int(defaults["window"]),
            messages=int(defaults["messages"]),
            warmup=None,
            procs=min(o.procs, pairs),
        )
    return attrs.evolve(
        o,
        workload=loop,
        url=None,
        spawn=True,
        redis_url=None,
        relay_pid=None,
        metrics_url=None,
        baseline=None,
        flood_cpu=None,
        redis="single",  # the echo server has no Redis and runs as one process
        workers=1,
        profile=o.profile and o.workload == "calibrate",
    )
