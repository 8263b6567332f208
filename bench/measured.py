"""One measured run: a server (the relay, a baseline commit's relay, or the echo server),
one workload against it, and what it found.

`relay bench` makes up to three of these, back to back, each with its own
server processes (stopped before the next starts) and its own mailboxes:
the calibration on the echo server, the workload on this checkout's relay,
and with `--baseline REF` the same workload on REF's relay.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from typing import Any

import attrs
from rich.console import Console

from .baseline import RelayTree
from .checks import Failures
from .options import BenchOptions
from .outcome import Outcome
from .profile import Profiler
from .redis_probe import RedisProbe
from .runner import Run
from .target import SpawnedEcho, SpawnedRelay, Target, probe
from .wire import mailbox
from .workloads import WORKLOADS

# One generator on one address would hit the relay's per-connection frame rate limit
# (acks count too) and its per-address connection limit: a spawned relay lifts them.
RATE_LIMITS = ("--rate-limit", "1000000", "--rate-burst", "1000000")
CONNECTION_LIMITS = ("--max-connections", "100000", "--max-connections-per-ip", "100000")
MAX_RETENTION_FOR_URL_S = 120  # retention against a given relay: its window must be short


class Refused(Exception):
    """The workload cannot run against this relay (a usage error)."""


@attrs.define
class Measured:
    label: str  # "relay", "baseline" or "calibration"
    options: BenchOptions  # as run (the calibration's differ from the command line's)
    target: Target
    outcome: Outcome
    failures: Failures
    profile: dict[str, Any] = attrs.field(factory=dict)
    commit: str | None = None  # the baseline's commit
    dropped_args: list[str] = attrs.field(factory=list)  # flags the baseline relay lacks

    @property
    def ok(self) -> bool:
        return not self.failures


def spawn_args(o: BenchOptions) -> list[str]:
    args = list(CONNECTION_LIMITS)
    if o.workload != "flood":  # the flood is over the relay's own rate limit, the pairs not
        args += RATE_LIMITS
    if o.workload == "retention":
        args += ["--retention", f"{o.retention_s}s"]
    if o.workload == "idle":
        args += ["--ping-interval", f"{o.ping_interval_s:g}"]
    return args


def measure(
    label: str,
    options: BenchOptions,
    console: Console,
    profile_path: str | None = None,
    tree: RelayTree | None = None,
) -> Measured:
    """Start the server, run the workload, stop the server; raises TargetError or Refused."""
    run_id = secrets.token_hex(4)
    failures = Failures()
    with contextlib.ExitStack() as stack:
        target, dropped = _target(label, options, stack, tree)
        target.welcome = probe(target.url, target.secret, mailbox(run_id, "probe", 0))
        refusal = _refuse(options, target)
        if refusal:
            raise Refused(refusal)
        redis = None
        if target.redis_url:
            redis = RedisProbe(target.redis_url, target.key_prefix, run_id)
            stack.callback(redis.close)
        bench_run = Run(options, target, run_id, time.monotonic(), console, redis, failures)
        if profile_path and target.relay_pid:
            bench_run.profiler = Profiler(
                target.relay_pid, profile_path, subprocesses=options.workers > 1
            )
        outcome: Outcome = WORKLOADS[options.workload](bench_run)
        alive = _alive(target)
    if target.spawned and not alive:
        failures.add("worker", f"the spawned {target.kind} exited during the run")
    if target.kind == "echo":
        outcome.targets.clear()  # the targets are a relay's
    return Measured(
        label,
        options,
        target,
        outcome,
        failures,
        bench_run.profile,
        tree.commit if tree else None,
        dropped,
    )


def _target(
    label: str, options: BenchOptions, stack: contextlib.ExitStack, tree: RelayTree | None
) -> tuple[Target, list[str]]:
    if label == "calibration":
        echo = stack.enter_context(SpawnedEcho(options.relay_cpu))
        url = f"ws://127.0.0.1:{echo.port}/v1"
        return Target(url, echo.secret, None, "", echo.pid, True, kind="echo"), []
    if options.spawn:
        relay = SpawnedRelay(
            options.relay_cpu, spawn_args(options), tree, options.redis, options.workers
        )
        stack.enter_context(relay)
        target = Target(
            url=f"ws://127.0.0.1:{relay.port}/v1",
            secret=relay.secret,
            redis_url=relay.redis_url,
            key_prefix="relay:",
            relay_pid=relay.pid,
            spawned=True,
            metrics_urls=relay.metrics_urls,
        )
        return target, relay.dropped_args
    assert options.url is not None and options.jwt_secret is not None
    target = Target(
        url=options.url,
        secret=options.jwt_secret,
        redis_url=options.redis_url,
        key_prefix=options.key_prefix,
        relay_pid=options.relay_pid,
        spawned=False,
        metrics_urls=(options.metrics_url,) if options.metrics_url else (),
    )
    return target, []


def _refuse(options: BenchOptions, target: Target) -> str | None:
    if options.workload != "retention":
        return None
    if target.redis_url is None:
        return "needs the relay's Redis to watch keys expire: use --spawn, or --redis-url"
    retention = int(target.welcome.get("retention_s", 0))
    if retention > MAX_RETENTION_FOR_URL_S:
        return (
            f"the relay's retention is {retention} s; run one with a short --retention, or --spawn"
        )
    return None


def _alive(target: Target) -> bool:
    if target.relay_pid is None:
        return True
    try:
        with open(f"/proc/{target.relay_pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def profile_path(options: BenchOptions, stem: str) -> str | None:
    return os.path.join(options.out, f"{stem}-profile.txt") if options.profile else None
