"""Checks of a running relay deployment from outside, for deploy/test.sh.

    python deploy/check_exchange.py exchange --lb ws://H:P/v1 --metrics-a URL --metrics-b URL
    python deploy/check_exchange.py drain --url ws://H:P/v1 -- docker stop CONTAINER
    python deploy/check_exchange.py failover --lb ws://H:P/v1
    python deploy/check_exchange.py redis-acl --port 6379 [--failover-users]
    python deploy/check_exchange.py policy --ops http://H:P
    python deploy/check_exchange.py sentinel-primary --sentinels H:P,H:P,H:P --master relay --expect H:P
    python deploy/check_exchange.py sentinel-failover --a ws://H:P/v1 --b ws://H:P/v1 \
        --sentinels H:P,H:P,H:P --master relay --old H:P --new H:P -- docker stop CONTAINER

Tokens are minted with RELAY_JWT_SECRET from the environment, the Redis
password is RELAY_REDIS_PASSWORD; the Sentinel stack's other secrets are
RELAY_SENTINEL_PASSWORD (the Sentinels'), REDIS_REPLICATION_PASSWORD and
REDIS_SENTINEL_PASSWORD (the data nodes' replication and sentinel users). Each command prints what it checked and
exits 0, or prints FAIL and exits 1. Mailbox ids are random per run, so runs
never meet each other's messages or sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import redis
import trio
from trio_websocket import ConnectionClosed

from relay.auth import mint_token
from relay.client import RelaySession, open_relay
from relay.client_frames import RelayClientError

TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 60.0  # the Sentinels' down-after time, their election and the promotion


class CheckFailed(Exception):
    pass


def token(mailbox: str) -> str:
    return mint_token(os.environ["RELAY_JWT_SECRET"], mailbox, 600, time.time())


def mailbox(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def open_connections(metrics_url: str) -> int:
    """The relay_connections gauge of one replica."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("relay_connections "):
            return int(float(line.split()[1]))
    raise CheckFailed(f"{metrics_url} has no relay_connections gauge")


async def gauges(urls: dict[str, str]) -> dict[str, int]:
    return {
        name: await trio.to_thread.run_sync(open_connections, url) for name, url in urls.items()
    }


async def landed_on(urls: dict[str, str], before: dict[str, int]) -> str:
    """The replica whose gauge went up by one since `before`."""
    with trio.fail_after(5):
        while True:
            now = await gauges(urls)
            grown = [name for name in urls if now[name] > before[name]]
            if len(grown) == 1:
                return grown[0]
            await trio.sleep(0.05)


@asynccontextmanager
async def connect_retrying(url: str, box: str, deadline_s: float) -> AsyncIterator[RelaySession]:
    """open_relay, retried while the load balancer has no replica ready for it."""
    stop = trio.current_time() + deadline_s
    while True:
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(open_relay(url, token(box)))
            break
        except Exception as exc:  # refused, reset, 503 from the LB: all mean "not yet"
            if trio.current_time() > stop:
                raise
            print(f"connect to {url} failed ({type(exc).__name__}); retrying")
        await trio.sleep(0.5)
    async with stack:
        yield client


async def exchange_one(sender: RelaySession, to: str, recipient: RelaySession) -> None:
    body = f"hello {secrets.token_hex(8)}"
    accepted = await sender.send(to, body, ttl_s=300)
    message = await recipient.receive()
    if message.body != body or message.id != accepted["ids"][to]:
        raise CheckFailed(f"received {message!r}, expected body {body!r}")
    if await recipient.ack([message.id]) != 1:
        raise CheckFailed("ack did not delete the message")


async def exchange(args: argparse.Namespace) -> None:
    """A message from a sender on one replica to a recipient on the other, both via the LB."""
    urls = {"relay-a": args.metrics_a, "relay-b": args.metrics_b}
    bob, alice = mailbox("bob"), mailbox("alice")
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            before = await gauges(urls)
            recipient = await stack.enter_async_context(open_relay(args.lb, token(bob)))
            bob_on = await landed_on(urls, before)
            print(f"recipient {bob} connected through the LB, landed on {bob_on}")
            for attempt in range(1, 11):
                before = await gauges(urls)
                attempt_stack = AsyncExitStack()
                sender = await attempt_stack.enter_async_context(open_relay(args.lb, token(alice)))
                alice_on = await landed_on(urls, before)
                print(f"sender {alice} connection {attempt} landed on {alice_on}")
                if alice_on != bob_on:
                    stack.push_async_exit(attempt_stack)
                    break
                await attempt_stack.aclose()
            else:
                raise CheckFailed("10 sender connections all landed on the recipient's replica")
            await exchange_one(sender, bob, recipient)
            print(f"ok: message from {alice} on {alice_on} delivered to {bob} on {bob_on}, acked")


async def failover(args: argparse.Namespace) -> None:
    """Through the LB while one replica is down: both ends land on the survivor."""
    bob, alice = mailbox("bob"), mailbox("alice")
    with trio.fail_after(TIMEOUT_S):
        async with (
            connect_retrying(args.lb, bob, 20) as recipient,
            connect_retrying(args.lb, alice, 20) as sender,
        ):
            await exchange_one(sender, bob, recipient)
    print("ok: message exchanged through the LB with one replica stopped")


async def drain(args: argparse.Namespace) -> None:
    """A session open on a relay sees close 1001 when `command` stops that relay."""
    carol = mailbox("carol")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with trio.fail_after(TIMEOUT_S):
        async with open_relay(args.url, token(carol)) as client:
            print(f"session {carol} open on {args.url}; running: {' '.join(command)}")
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.run_process, command)
                try:
                    message = await client.receive()
                    raise CheckFailed(f"unexpected message {message!r}")
                except ConnectionClosed:
                    pass
                closed_after = trio.current_time() - started
            stopped_after = trio.current_time() - started
    if client.close_code != 1001:
        raise CheckFailed(f"session closed with {client.close_code}, expected 1001")
    print(
        f"ok: session closed with 1001 after {closed_after:.2f} s; "
        f"the stop command returned after {stopped_after:.2f} s"
    )


def node(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def named_primary(sentinel: str, master: str) -> str | None:
    """The primary of `master` as one Sentinel names it ("host:port"), None if it cannot say."""
    host, port = node(sentinel)
    client = redis.Redis(
        host,
        port,
        password=os.environ["RELAY_SENTINEL_PASSWORD"],
        decode_responses=True,
        socket_timeout=2,
    )
    try:
        reply = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", master)
    except redis.RedisError:
        return None
    finally:
        client.close()
    return f"{reply[0]}:{reply[1]}" if reply else None


def role(address: str) -> str | None:
    """ROLE of a data node as the relay user sees it; None if it cannot be reached."""
    host, port = node(address)
    client = redis.Redis(
        host,
        port,
        username="relay",
        password=os.environ["RELAY_REDIS_PASSWORD"],
        decode_responses=True,
        socket_timeout=2,
    )
    try:
        return str(client.execute_command("ROLE")[0])
    except (redis.ConnectionError, redis.TimeoutError):
        return None
    finally:
        client.close()


async def primary_is(sentinels: list[str], master: str, expected: str, timeout_s: float) -> float:
    """Poll until every Sentinel names `expected` and its ROLE says master; the seconds it took."""
    started = trio.current_time()
    with trio.move_on_after(timeout_s):
        while True:
            named = [await trio.to_thread.run_sync(named_primary, s, master) for s in sentinels]
            if (
                named == [expected] * len(sentinels)
                and await trio.to_thread.run_sync(role, expected) == "master"
            ):
                return trio.current_time() - started
            await trio.sleep(0.2)
    raise CheckFailed(
        f"after {timeout_s:.0f} s the Sentinels name {named} as the primary of {master!r},"
        f" expected {expected} (ROLE {await trio.to_thread.run_sync(role, expected)})"
    )


async def exchange_retrying(sender: RelaySession, to: str, recipient: RelaySession) -> int:
    """exchange_one on open sessions, the send retried while the relay answers
    storage_unavailable (it has not found the new primary yet); the refusals seen."""
    body = f"hello {secrets.token_hex(8)}"
    ref = secrets.token_hex(8)  # one ref for every try: at most one copy is stored
    refused = 0
    while True:
        try:
            accepted = await sender.send(to, body, ttl_s=300, ref=ref)
            break
        except RelayClientError as exc:
            if exc.code != "storage_unavailable":
                raise
            refused += 1
            await trio.sleep(0.5)
    message = await recipient.receive()
    if message.body != body or message.id != accepted["ids"][to]:
        raise CheckFailed(f"received {message!r}, expected body {body!r}")
    if await recipient.ack([message.id]) != 1:
        raise CheckFailed("ack did not delete the message")
    return refused


async def sentinel_primary(args: argparse.Namespace) -> None:
    """Every Sentinel names --expect as the primary, and its ROLE says so."""
    sentinels = args.sentinels.split(",")
    took = await primary_is(sentinels, args.master, args.expect, TIMEOUT_S)
    print(
        f"ok: the {len(sentinels)} Sentinels name {args.expect} as the primary of"
        f" {args.master!r} (after {took:.1f} s), its ROLE is master"
    )


async def sentinel_failover(args: argparse.Namespace) -> None:
    """A message crosses relay-a -> relay-b; `command` stops the primary (--old); once the
    Sentinels have promoted the replica, a new message crosses on the same sessions."""
    sentinels = args.sentinels.split(",")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    bob, alice = mailbox("bob"), mailbox("alice")
    async with (
        open_relay(args.b, token(bob)) as recipient,
        open_relay(args.a, token(alice)) as sender,
    ):
        with trio.fail_after(TIMEOUT_S):
            await exchange_one(sender, bob, recipient)
        print(f"ok: message from {alice} on {args.a} delivered to {bob} on {args.b}, acked")
        print(f"running: {' '.join(command)}")
        await trio.run_process(command)
        took = await primary_is(sentinels, args.master, args.new, FAILOVER_TIMEOUT_S)
        print(
            f"ok: {took:.1f} s after the stop every Sentinel names {args.new}, whose ROLE is master"
        )
        with trio.fail_after(TIMEOUT_S):
            refused = await exchange_retrying(sender, bob, recipient)
    print(
        "ok: after the failover a new message crossed on the same two sessions, acked"
        f" ({refused} sends refused with storage_unavailable before)"
    )


FORBIDDEN = (
    ("SAVE",),
    ("BGSAVE",),
    ("BGREWRITEAOF",),
    ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
    ("CONFIG", "SET", "save", "60 1"),
    ("DEBUG", "SLEEP", "0"),
    ("MONITOR",),
    ("REPLICAOF", "NO", "ONE"),
    ("FLUSHALL",),
    ("KEYS", "*"),
    ("SET", "not-relay:key", "x"),
)


def redis_acl(args: argparse.Namespace) -> None:
    """The relay user may do its job and nothing listed in deploy/redis.conf; anonymous, nothing."""
    password = os.environ["RELAY_REDIS_PASSWORD"]
    relay = redis.Redis(port=args.port, username="relay", password=password, decode_responses=True)
    try:
        relay.ping()
        settings = {
            name: relay.config_get(name)[name]
            for name in ("save", "appendonly", "maxmemory-policy", "slowlog-log-slower-than")
        }
        expected = {
            "save": "",
            "appendonly": "no",
            "maxmemory-policy": "noeviction",
            "slowlog-log-slower-than": "-1",
        }
        if settings != expected:
            raise CheckFailed(f"Redis settings {settings}, expected {expected}")
        print(f"ok: relay user reads CONFIG GET: {settings}")
        for command in FORBIDDEN:
            try:
                relay.execute_command(*command)
            except redis.ResponseError as exc:
                print(f"ok: relay user refused {' '.join(command)}: {str(exc).split('.')[0]}")
            else:
                raise CheckFailed(f"relay user may run {' '.join(command)}")
    finally:
        relay.close()
    anonymous = redis.Redis(port=args.port)
    try:
        anonymous.ping()
        raise CheckFailed("an unauthenticated connection may PING")
    except redis.AuthenticationError as exc:
        print(f"ok: unauthenticated connection refused: {exc}")
    finally:
        anonymous.close()
    if args.failover_users:
        failover_users(args.port)


# What the replication and sentinel users (deploy/redis-replication.conf) must be refused.
FAILOVER_FORBIDDEN = (
    ("GET", "relay:key"),
    ("SET", "relay:key", "x"),
    ("SUBSCRIBE", "relay:channel"),
    ("CONFIG", "GET", "save"),
    ("FLUSHALL",),
    ("ACL", "LIST"),
)


def failover_users(port: int) -> None:
    """The replication and sentinel users reach no key, no relay channel, no setting."""
    for user, variable, allowed in (
        ("replication", "REDIS_REPLICATION_PASSWORD", ("PING",)),
        ("sentinel", "REDIS_SENTINEL_PASSWORD", ("INFO", "replication")),
    ):
        client = redis.Redis(port=port, username=user, password=os.environ[variable])
        try:
            client.execute_command(*allowed)
            for command in FAILOVER_FORBIDDEN:
                try:
                    client.execute_command(*command)
                except redis.ResponseError:
                    pass
                else:
                    raise CheckFailed(f"the {user} user may run {' '.join(command)}")
        finally:
            client.close()
        print(f"ok: {user} user may {' '.join(allowed)}, refused {len(FAILOVER_FORBIDDEN)} others")


def policy(args: argparse.Namespace) -> None:
    """The relay checked its Redis itself: /.well-known/relay-policy says persistence,
    eviction and the slow log are off."""
    with urllib.request.urlopen(f"{args.ops}/.well-known/relay-policy", timeout=5) as response:
        promise = json.load(response)
    expected = {"persistence": "off", "maxmemory_policy": "noeviction", "eviction": "off"}
    expected["slowlog"] = "off"
    if promise["redis"] != expected:
        raise CheckFailed(f"relay-policy redis: {promise['redis']}")
    print(f"ok: {args.ops}/.well-known/relay-policy: redis {promise['redis']}")


def describe(exc: BaseException) -> str:
    """The innermost errors of an exception (group), for one FAIL line."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="check", required=True)
    p = commands.add_parser("exchange")
    p.add_argument("--lb", required=True)
    p.add_argument("--metrics-a", required=True)
    p.add_argument("--metrics-b", required=True)
    p = commands.add_parser("failover")
    p.add_argument("--lb", required=True)
    p = commands.add_parser("drain")
    p.add_argument("--url", required=True)
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = commands.add_parser("redis-acl")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--failover-users", action="store_true")
    p = commands.add_parser("policy")
    p.add_argument("--ops", required=True)
    p = commands.add_parser("sentinel-primary")
    for option in ("--sentinels", "--master", "--expect"):
        p.add_argument(option, required=True)
    p = commands.add_parser("sentinel-failover")
    for option in ("--a", "--b", "--sentinels", "--master", "--old", "--new"):
        p.add_argument(option, required=True)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    checks: dict[str, Callable[[argparse.Namespace], object]] = {
        "exchange": lambda a: trio.run(exchange, a),
        "failover": lambda a: trio.run(failover, a),
        "drain": lambda a: trio.run(drain, a),
        "redis-acl": redis_acl,
        "policy": policy,
        "sentinel-primary": lambda a: trio.run(sentinel_primary, a),
        "sentinel-failover": lambda a: trio.run(sentinel_failover, a),
    }
    try:
        checks[args.check](args)
    except Exception as exc:  # a check failed, however deep in a nursery
        print(f"FAIL: {args.check}: {describe(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
