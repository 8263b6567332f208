"""The `relay` command. Logging is configured here and nowhere else.

Each subcommand is one `add_<name>_command(subparsers)` function that
registers its parser and sets `run`, a function from the parsed arguments to
the exit status. Options come from flags, `RELAY_*` environment variables and
an optional TOML file (relay.config). Exit 2 means a usage error or Redis
could not be reached; `relay audit` exits 1 when it finds a violation, `relay probe`
when a check failed.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time

import attrs
import redis
import trio

from relay import config as relay_config
from relay import logs
from relay.audit import audit
from relay.cli_client import add_listen_command, add_send_command, add_token_command
from relay.cli_keys import add_keygen_command
from relay.config import Subparsers
from relay.errors import RelayError, first_leaf
from relay.probe_cli import add_probe_command
from relay.redis.admin import connect
from relay.redis.checks import redis_allowances
from relay.server import serve_until_signal
from relay.workers import run_supervisor

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE = 0, 1, 2

AUDIT_OPTIONS = (
    "redis-url",
    "key-prefix",
    "retention",
    "dedupe-window",
    "allow-persistent-redis",
    "allow-eviction",
    "allow-slowlog",
    "log-level",
)


def load_config(args: argparse.Namespace) -> relay_config.Config | None:
    """The Config for these arguments, or None after printing why it is invalid."""
    try:
        return relay_config.load(args)
    except (ValueError, OSError) as exc:
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return None


def add_serve_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. Without --redis-url it starts a private, memory-only Valkey.",
    )
    relay_config.add_arguments(parser)
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    if config is None:
        return EXIT_USAGE
    logs.configure(config.log_level, config.log_format, config.log_key)
    if config.jwt_secret is None and not config.jwt_public_keys:
        config = attrs.evolve(config, jwt_secret=secrets.token_urlsafe(32))
        _announce_development_secret(config)
    problems: list[str] = []
    try:
        if config.workers > 1:
            run_supervisor(config)
        else:
            trio.run(serve_until_signal, config)
    except* RelayError as group:
        problems.append(str(first_leaf(group)))
    except* redis.RedisError as group:  # the message names host and port, never the password
        problems.append(f"cannot reach Redis: {first_leaf(group)}")
    except* OSError as group:
        problems.append(f"cannot start: {first_leaf(group)}")
    if problems:
        print(f"relay serve: {problems[0]}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _announce_development_secret(config: relay_config.Config) -> None:
    url = f"ws://{config.host}:{config.port}/v1"
    print(
        "\n*** DEVELOPMENT MODE: no --jwt-secret or --jwt-public-key was given. ***\n"
        "*** This run accepts tokens signed with a secret made up just now;    ***\n"
        "*** never run like this in production.                               ***\n\n"
        "In another terminal:\n"
        f"  export RELAY_JWT_SECRET={config.jwt_secret}\n"
        f"  export RELAY_URL={url}\n"
        "  relay listen --as bob &\n"
        "  relay send --as alice --to bob 'hello'\n"
        "  relay token bob          # a token for your own client\n",
        file=sys.stderr,
        flush=True,
    )
    if config.demo:
        print(
            f"Demo chat: open http://{config.host}:{config.port}/demo in two tabs and paste\n"
            "a token in each (relay token alice, relay token bob, with the export above).\n",
            file=sys.stderr,
            flush=True,
        )


def add_audit_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="check that every relay key on a live Redis has a TTL within the retention window",
        description="Exit 0 when nothing violates the ephemerality contract, 1 on a "
        "violation, 2 on a usage error or when Redis cannot be reached.",
    )
    relay_config.add_arguments(parser, AUDIT_OPTIONS)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    config = load_config(args)
    if config is None:
        return EXIT_USAGE
    logs.configure(config.log_level, config.log_format)
    if not config.redis_url:
        print("relay audit: --redis-url (or RELAY_REDIS_URL) is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = connect(config.redis_url)
    except ValueError as exc:  # a malformed URL; the message names no password
        print(f"relay audit: bad --redis-url: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except redis.RedisError as exc:  # no node of a cluster answers
        print(f"relay audit: cannot audit Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = audit(
            client,
            config.key_prefix,
            config.retention_s,
            now_ms=time.time_ns() // 1_000_000,
            allowed=redis_allowances(config),
            dedupe_window_s=config.dedupe_window_s,
        )
    except redis.RedisError as exc:  # the message names host and port, never the password
        print(f"relay audit: cannot audit Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        client.close()
    print(report.to_json() if args.json else report.to_text())
    return EXIT_OK if report.ok else EXIT_VIOLATION


def add_bench_command(subparsers: Subparsers) -> None:
    """`relay bench`: the load benchmark (bench/, installed as relay_bench). Its heavy
    imports wait until it runs."""
    from relay_bench.options import add_arguments

    parser = subparsers.add_parser(
        "bench",
        help="load-benchmark a relay, with self-checks (needs the `bench` extra)",
        description="Run one benchmark workload against a relay (--url) or one it starts "
        "(--spawn), after measuring this machine's ceiling with an echo server (`calibrate` "
        "alone does only that); exit 1 when a self-check fails. See bench/README.md.",
    )
    add_arguments(parser)
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    try:
        from relay_bench.cli import run
    except ModuleNotFoundError as exc:
        if exc.name not in ("rich", "hdrh", "matplotlib"):
            raise
        print(
            f"relay bench needs {exc.name}: pip install '.[bench]' from a checkout of the relay",
            file=sys.stderr,
        )
        return EXIT_USAGE
    status: int = run(args)
    return status


COMMANDS = (
    add_serve_command,
    add_token_command,
    add_send_command,
    add_listen_command,
    add_keygen_command,
    add_audit_command,
    add_probe_command,
    add_bench_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A WebSocket relay that keeps a message only until it is delivered.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (usage errors exit 2 via argparse)."""
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status
