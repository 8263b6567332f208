"""`relay bench WORKLOAD ...`: run one workload against a relay and report it.

Exit status: 0 when every self-check passed (targets missed or not), 1 when a
self-check failed or the run could not finish, 2 on a usage error or when the
relay could not be started or reached.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import time

from rich.console import Console

from . import plots, report
from .checks import Failures
from .options import BenchOptions, from_args
from .outcome import Outcome
from .profile import Profiler
from .redis_probe import RedisProbe
from .runner import Run
from .system import command_line, git_commit, machine, pin_self, raise_open_files, utc_now
from .target import SpawnedRelay, Target, TargetError, probe
from .wire import mailbox
from .workloads import WORKLOADS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_RETENTION_FOR_URL_S = 120  # retention against a given relay: its window must be short


# One generator on one address would hit the relay's per-connection frame rate limit
# (acks count too) and its per-address connection limit: a spawned relay lifts them.
SPAWN_LIMITS = (
    *("--rate-limit", "1000000", "--rate-burst", "1000000"),
    *("--max-connections", "100000", "--max-connections-per-ip", "100000"),
)


def _spawn_args(o: BenchOptions) -> list[str]:
    args = list(SPAWN_LIMITS)
    if o.workload == "retention":
        args += ["--retention", f"{o.retention_s}s"]
    if o.workload == "idle":
        args += ["--ping-interval", f"{o.ping_interval_s:g}"]
    return args


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        options = from_args(args)
    except ValueError as exc:
        err.print(f"relay bench: {exc}")
        return EXIT_USAGE
    pin_self(options.client_cpu)  # the generator, and the Valkey started below, inherit it
    raise_open_files(2 * options.connections + 1024)
    context = {
        "command": command_line(),
        "date": utc_now().isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine(),
    }
    stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
    run_id = secrets.token_hex(4)
    failures = Failures()
    with contextlib.ExitStack() as stack:
        try:
            target = _target(options, stack, run_id)
        except TargetError as exc:
            err.print(f"relay bench: {exc}")
            return EXIT_USAGE
        refusal = _refuse(options, target)
        if refusal:
            err.print(f"relay bench {options.workload}: {refusal}")
            return EXIT_USAGE
        redis = (
            RedisProbe(target.redis_url, target.key_prefix, run_id) if target.redis_url else None
        )
        if redis is not None:
            stack.callback(redis.close)
        bench_run = Run(options, target, run_id, time.monotonic(), err, redis, failures)
        if options.profile and target.relay_pid:
            path = os.path.join(options.out, f"{options.workload}-{stamp}-profile.txt")
            bench_run.profiler = Profiler(target.relay_pid, path)
        outcome: Outcome = WORKLOADS[options.workload](bench_run)
        spawned = stack.pop_all()
        relay_alive = _relay_alive(target)
        spawned.close()  # stop the relay and Valkey before writing the report
    if target.spawned and not relay_alive:
        failures.add("worker", "the spawned relay exited during the run")
    result = report.build(options, target, outcome, failures, context)
    if bench_run.profile:
        result["profile"] = bench_run.profile
    stem = f"{options.workload}-{stamp}"
    result["plots"] = plots.draw(
        outcome.histograms, outcome.series, options.out, stem, f"relay bench {options.workload}"
    )
    json_path, md_path = report.write(result, outcome, options.out, stem)
    report.show(Console(), result, outcome)
    err.print(f"wrote {json_path}, {md_path} and {len(result['plots'])} plot(s)")
    return EXIT_OK if result["ok"] else EXIT_FAILED


def _target(options: BenchOptions, stack: contextlib.ExitStack, run_id: str) -> Target:
    if options.spawn:
        relay = stack.enter_context(SpawnedRelay(options.relay_cpu, _spawn_args(options)))
        target = Target(
            url=f"ws://127.0.0.1:{relay.port}/v1",
            secret=relay.secret,
            redis_url=relay.valkey.url,
            key_prefix="relay:",
            relay_pid=relay.pid,
            spawned=True,
            metrics_url=relay.metrics_url,
        )
    else:
        assert options.url is not None and options.jwt_secret is not None
        target = Target(
            url=options.url,
            secret=options.jwt_secret,
            redis_url=options.redis_url,
            key_prefix=options.key_prefix,
            relay_pid=options.relay_pid,
            spawned=False,
            metrics_url=options.metrics_url,
        )
    target.welcome = probe(target.url, target.secret, mailbox(run_id, "probe", 0))
    return target


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


def _relay_alive(target: Target) -> bool:
    if target.relay_pid is None:
        return True
    try:
        with open(f"/proc/{target.relay_pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m relay_bench.cli WORKLOAD ...`, the same as `relay bench`."""
    from .options import add_arguments

    parser = argparse.ArgumentParser(prog="relay bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
