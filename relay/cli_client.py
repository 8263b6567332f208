"""`relay token`, `relay send` and `relay listen`: the relay's client side on the command line.

Tokens are minted with the HS256 secret (`--jwt-secret` / RELAY_JWT_SECRET)
for the mailbox named by `--as`, unless a ready token is given (`--token` /
RELAY_TOKEN). The relay's URL comes from `--url` / RELAY_URL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from relay import config as relay_config
from relay.auth import mint_token
from relay.client import RelayClientError, new_ref, open_relay
from relay.policy import parse_duration

_duration = relay_config.argparse_type(parse_duration)

if TYPE_CHECKING:
    from relay.cli import Subparsers

TOKEN_OPTIONS = ("jwt-secret", "jwt-audience", "jwt-issuer")
DEFAULT_URL = "ws://127.0.0.1:8080/v1"


def _add_identity(parser: argparse.ArgumentParser) -> None:
    relay_config.add_arguments(parser, TOKEN_OPTIONS)
    parser.add_argument(
        "--url", default=os.environ.get("RELAY_URL", DEFAULT_URL), help="relay URL (env RELAY_URL)"
    )
    parser.add_argument("--as", dest="mailbox", help="your mailbox id (a token is minted for it)")
    parser.add_argument(
        "--token", default=os.environ.get("RELAY_TOKEN"), help="a ready token (env RELAY_TOKEN)"
    )


def _token_for(args: argparse.Namespace, ttl_s: int = 3600) -> str | None:
    if args.token:
        return str(args.token)
    try:
        config = relay_config.load(args)
    except (ValueError, OSError) as exc:
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return None
    if not args.mailbox or not config.jwt_secret:
        print(
            f"relay {args.command}: give --token, or --as MAILBOX with --jwt-secret",
            file=sys.stderr,
        )
        return None
    try:
        return mint_token(
            config.jwt_secret,
            args.mailbox,
            ttl_s,
            time.time(),
            config.jwt_audience,
            config.jwt_issuer,
        )
    except ValueError as exc:
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return None


def add_token_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("token", help="print an HS256 token for a mailbox")
    relay_config.add_arguments(parser, TOKEN_OPTIONS)
    parser.add_argument("mailbox", help="the mailbox id (the token's sub)")
    parser.add_argument(
        "--ttl", type=_duration, default=3600, help="lifetime, e.g. 1h (default 1h)"
    )
    parser.set_defaults(run=run_token, token=None)


def run_token(args: argparse.Namespace) -> int:
    token = _token_for(args, args.ttl)
    if token is None:
        return 2
    print(token)
    return 0


def add_send_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("send", help="send one message")
    _add_identity(parser)
    parser.add_argument(
        "--to", action="append", required=True, help="recipient mailbox (repeatable)"
    )
    parser.add_argument(
        "--ttl", type=_duration, help="how long the message may wait (default: retention)"
    )
    parser.add_argument(
        "--ref",
        help="idempotency key: a retry with the same ref stores one copy (default: random)",
    )
    parser.add_argument("text", help="the message body")
    parser.set_defaults(run=run_send)


def run_send(args: argparse.Namespace) -> int:
    token = _token_for(args)
    if token is None:
        return 2

    async def send() -> None:
        async with open_relay(args.url, token) as relay:
            to = args.to[0] if len(args.to) == 1 else args.to
            ref = args.ref if args.ref is not None else new_ref()
            accepted = await relay.send(to, args.text, ttl_s=args.ttl, ref=ref)
            print(orjson.dumps(accepted).decode())

    return _run(args, send)


def add_listen_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "listen", help="print incoming messages as JSON lines and ack them"
    )
    _add_identity(parser)
    parser.add_argument("--count", type=int, help="exit after this many messages")
    parser.set_defaults(run=run_listen)


def run_listen(args: argparse.Namespace) -> int:
    token = _token_for(args)
    if token is None:
        return 2

    async def listen() -> None:
        async with open_relay(args.url, token) as relay:
            received = 0
            async for message in relay.messages():
                line = {
                    "id": message.id,
                    "from": message.sender,
                    "body": message.body,
                    "sent_at": message.sent_at_ms,
                    "expires_at": message.expires_at_ms,
                }
                print(orjson.dumps(line).decode(), flush=True)
                await relay.ack([message.id])
                received += 1
                if args.count is not None and received >= args.count:
                    return

    return _run(args, listen)


def _run(args: argparse.Namespace, main: Callable[[], Awaitable[None]]) -> int:
    try:
        trio.run(main)
    except KeyboardInterrupt:
        return 0
    except ConnectionClosed as exc:
        code = exc.reason.code if exc.reason else "?"
        print(f"relay {args.command}: the relay closed the connection ({code})", file=sys.stderr)
        return 1
    except (HandshakeError, OSError) as exc:
        print(f"relay {args.command}: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    except RelayClientError as exc:
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
