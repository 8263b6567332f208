"""The options of one `relay bench` run: flags, with defaults that depend on the workload."""

from __future__ import annotations

import argparse
import os
from typing import Any

import attrs

from relay.auth import HS256_MIN_SECRET_BYTES
from relay.config import Config

from .system import parse_cpus

WORKLOADS = (
    "throughput",
    "latency",
    "roundtrip",
    "drain",
    "burst",
    "idle",
    "retention",
    "flood",
    "calibrate",
)
REDIS_KINDS = ("single", "cluster")
CLUSTER_PRIMARIES = 3
MAX_REPEAT = 9

# flood: the spawned relay keeps its default rate limit (acks count as frames too)
RELAY_RATE_LIMIT = Config().rate_limit_per_s
FLOOD_PAIR_SHARE = 0.5  # of the limit, at most, per pair

# Defaults per workload; a flag given on the command line wins.
DEFAULTS: dict[str, dict[str, Any]] = {
    "throughput": {"pairs": 50, "messages": 1000},
    "burst": {"pairs": 50, "messages": 1000},
    "latency": {"pairs": 20, "messages": 500, "rate": 2000.0},
    "roundtrip": {"pairs": 1, "messages": 2000},
    "drain": {"pairs": 50, "messages": 1000},
    "retention": {"pairs": 10, "messages": 200},
    "idle": {"connections": 1000},
    "flood": {"pairs": 20, "messages": 250, "rate": 500.0},
    "calibrate": {"pairs": 50, "messages": 1000},
}
COMMON = {
    "pairs": 10,
    "window": 8,
    "messages": 1000,
    "rate": 2000.0,
    "body_bytes": 100,
    "connections": 1000,
    "procs": 1,
}


@attrs.frozen
class BenchOptions:
    workload: str
    url: str | None
    jwt_secret: str | None
    spawn: bool
    pairs: int
    window: int
    messages: int
    rate: float
    body_bytes: int
    connections: int
    procs: int
    relay_cpu: str | None
    client_cpu: str | None
    out: str
    redis_url: str | None = None  # --url mode: lets the bench inspect Redis
    key_prefix: str = "relay:"
    relay_pid: int | None = None  # --url mode: lets the bench read the relay's CPU and memory
    metrics_url: str | None = None  # --url mode: the relay's Prometheus /metrics
    profile: bool = False  # sample the relay with py-spy
    warmup: int | None = None  # messages per pair before measuring (None: per workload)
    retention_s: int = 3  # --spawn: the relay's retention in the retention workload
    hold_s: float = 10.0  # idle: how long connections are held
    ping_interval_s: float = 5.0  # idle, --spawn: the relay's keepalive ping interval
    stall_s: float = 15.0  # a phase with no progress for this long has lost messages
    timeout_s: float = 600.0  # the whole run
    calibrate: bool = True  # measure the echo server's ceiling first
    baseline: str | None = None  # --spawn: also run the relay of this git commit
    flood_cpu: str | None = None  # flood: taskset CPU list of the flooding process
    redis: str = "single"  # --spawn: one Valkey, or a 3-primary cluster ("cluster")
    workers: int = 1  # --spawn: the relay's worker processes (`relay serve --workers`)
    repeat: int = 1  # runs of the relay (and of the baseline, in turns), reported by median


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", choices=WORKLOADS, help="what to measure")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running relay, ws://HOST:PORT/v1")
    where.add_argument(
        "--spawn", action="store_true", help="start a relay and a Valkey, and stop them at the end"
    )
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("RELAY_JWT_SECRET"),
        help="HS256 secret of the relay given by --url (env RELAY_JWT_SECRET)",
    )
    add = parser.add_argument
    add("--pairs", type=int, help="sender/recipient pairs")
    add("--window", type=int, help="sends per sender not yet accepted (default 8)")
    add("--messages", type=int, help="messages per pair")
    add(
        "--rate", type=float, help="latency, flood: offered msgs/s over all pairs (2000; flood 500)"
    )
    add("--body-bytes", type=int, help="message body size (default 100)")
    add("--connections", type=int, help="idle: connections to hold (default 1000)")
    add("--procs", type=int, help="load generator processes (default 1)")
    add("--relay-cpu", help="--spawn: taskset CPU list of the relay, e.g. 0")
    add("--client-cpu", help="taskset CPU list of the generator (and the spawned Valkey), e.g. 1")
    add(
        "--out",
        default="bench-results",
        help="directory of the JSON, Markdown and PNG results (default: ./bench-results)",
    )
    add("--redis-url", help="--url mode: the relay's Redis, for key, TTL and command checks")
    add("--key-prefix", default="relay:", help="--url mode: the relay's Redis key prefix")
    add("--relay-pid", type=int, help="--url mode: the relay's PID, for its CPU and memory")
    add(
        "--metrics-url", help="--url mode: the relay's /metrics, e.g. http://127.0.0.1:9090/metrics"
    )
    add("--warmup", type=int, help="messages per pair sent before measuring")
    add("--profile", action="store_true", help="sample the relay with py-spy while it runs")
    add("--retention", type=int, default=3, help="retention: the spawned relay's retention, s")
    add("--hold", type=float, default=10.0, help="idle: seconds to hold the connections")
    add(
        "--ping-interval",
        type=float,
        default=5.0,
        help="idle, --spawn: the relay's keepalive ping interval, s (its default is 20)",
    )
    add("--stall", type=float, default=15.0, help="seconds without progress before giving up")
    add("--timeout", type=float, default=600.0, help="limit of each run (relay, baseline...), s")
    add(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip the echo server's ceiling run before the workload",
    )
    add(
        "--baseline",
        metavar="REF",
        help="--spawn: run the same workload against the relay of git commit REF too, and "
        "report both and their ratios",
    )
    add(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the workload N times (with --baseline: the two relays in turns, ABBA, so "
        "neither always runs first) and report the median run of each (default 1)",
    )
    add(
        "--redis",
        choices=REDIS_KINDS,
        default="single",
        help="--spawn: one Valkey (single, the default) or a 3-primary Redis Cluster (cluster)",
    )
    add(
        "--workers",
        type=int,
        default=1,
        help="--spawn: relay worker processes sharing the port (relay serve --workers; default 1)",
    )
    add(
        "--flood-cpu",
        help="flood: taskset CPU list of the flooding process (default: the generator's)",
    )


def from_args(args: argparse.Namespace) -> BenchOptions:
    """The options of a run; raises ValueError for a bad combination."""
    chosen = {**COMMON, **DEFAULTS.get(args.workload, {})}
    for name in COMMON:
        value = getattr(args, name, None)
        if value is not None:
            chosen[name] = value
    if args.workload == "roundtrip":
        chosen["pairs"], chosen["procs"] = 1, 1
    options = BenchOptions(
        workload=args.workload,
        url=args.url,
        jwt_secret=args.jwt_secret,
        spawn=bool(args.spawn),
        relay_cpu=args.relay_cpu,
        client_cpu=args.client_cpu,
        out=args.out,
        redis_url=args.redis_url,
        key_prefix=args.key_prefix,
        relay_pid=args.relay_pid,
        metrics_url=args.metrics_url,
        warmup=args.warmup,
        profile=args.profile,
        retention_s=args.retention,
        hold_s=args.hold,
        ping_interval_s=args.ping_interval,
        stall_s=args.stall,
        timeout_s=args.timeout,
        calibrate=args.calibrate,
        baseline=args.baseline,
        flood_cpu=args.flood_cpu,
        redis=args.redis,
        workers=args.workers,
        repeat=args.repeat,
        **chosen,
    )
    _validate(options)
    return options


def _validate(o: BenchOptions) -> None:
    if o.workload == "calibrate":
        if o.url or o.baseline:
            raise ValueError("calibrate starts its own echo server: no --url or --baseline")
        if o.redis != "single" or o.workers != 1:
            raise ValueError("calibrate starts only the echo server: no --redis or --workers")
    elif not o.spawn and not o.url:
        raise ValueError("say where the relay is: --spawn, or --url ws://HOST:PORT/v1")
    elif o.baseline and not o.spawn:
        raise ValueError("--baseline starts the other commit's relay: use it with --spawn")
    if o.redis != "single" and not o.spawn:
        raise ValueError(
            f"--redis {o.redis} says what Redis the bench starts: use it with --spawn "
            "(with --url, the relay's own --redis-url decides)"
        )
    if o.workers != 1 and not o.spawn:
        raise ValueError("--workers sets the worker processes of a relay the bench starts: --spawn")
    if o.workers < 1:
        raise ValueError("--workers must be at least 1")
    if not 1 <= o.repeat <= MAX_REPEAT:
        raise ValueError(f"--repeat must be 1 to {MAX_REPEAT}")
    if o.repeat > 1 and o.profile:
        raise ValueError("--profile samples one run: use it without --repeat")
    if o.flood_cpu and o.workload != "flood":
        raise ValueError("--flood-cpu pins the flooding process of the flood workload")
    if o.flood_cpu:
        try:
            parse_cpus(o.flood_cpu)
        except ValueError:
            raise ValueError(
                f"--flood-cpu {o.flood_cpu!r} is not a CPU list like 1 or 0,2-3"
            ) from None
    if not o.spawn and o.url and not o.jwt_secret:
        raise ValueError("--url needs --jwt-secret (or RELAY_JWT_SECRET)")
    if o.url and len((o.jwt_secret or "").encode()) < HS256_MIN_SECRET_BYTES:
        raise ValueError(f"--jwt-secret must be at least {HS256_MIN_SECRET_BYTES} bytes (HS256)")
    if o.spawn and (o.redis_url or o.relay_pid or o.metrics_url):
        raise ValueError(
            "--redis-url, --relay-pid and --metrics-url go with --url; --spawn knows its own"
        )
    if o.profile and o.url and not o.relay_pid:
        raise ValueError("--profile needs the relay's PID: use --spawn or --relay-pid")
    if o.relay_cpu and o.url:
        raise ValueError("--relay-cpu pins a relay the bench starts: use it with --spawn")
    for name in ("pairs", "window", "messages", "connections", "procs"):
        if getattr(o, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if min(o.rate, o.hold_s, o.stall_s, o.timeout_s, o.ping_interval_s) <= 0:
        raise ValueError("--rate, --hold, --ping-interval, --stall and --timeout must be positive")
    if o.body_bytes < 40:
        raise ValueError(
            "--body-bytes must be at least 40 (the body carries a sequence and a time)"
        )
    if o.retention_s < 1:
        raise ValueError("--retention must be at least 1 s")
    units = o.connections if o.workload == "idle" else o.pairs
    if o.procs > units:
        raise ValueError(
            f"--procs {o.procs} is more than the {units} pairs or connections to split"
        )
    if o.workload == "flood" and o.spawn and o.rate / o.pairs > FLOOD_PAIR_SHARE * RELAY_RATE_LIMIT:
        raise ValueError(
            f"flood: --rate / --pairs is {o.rate / o.pairs:g} msgs/s per pair; the spawned relay "
            f"keeps its rate limit ({RELAY_RATE_LIMIT:g} frames/s) so that the flood exceeds it: "
            f"give the pairs at most {FLOOD_PAIR_SHARE * RELAY_RATE_LIMIT:g} each"
        )
    if o.workload in ("drain", "retention") and o.messages > 10_000:
        raise ValueError("drain and retention keep --messages in one mailbox: at most 10000")


def warmup_messages(o: BenchOptions) -> int:
    if o.warmup is not None:
        return o.warmup
    return {"throughput": min(100, o.messages // 5), "burst": min(100, o.messages // 5)}.get(
        o.workload, 20
    )
