"""`relay token`, `relay send` and `relay listen`: the relay's client side on the command line.

Tokens are minted with the HS256 secret (`--jwt-secret` / RELAY_JWT_SECRET)
for the mailbox named by `--as`, unless a ready token is given (`--token` /
RELAY_TOKEN). The relay's URL comes from `--url` / RELAY_URL.

Every failure is one line on stderr and exit status 1 (2 for a usage error).
Both commands use relay.client's RelayClient: `relay listen` reconnects with
full-jitter backoff when the relay goes away (1001, 1006, 1011, 1013, or the
connect fails) and stops on 4401 or 4409; `relay send` gives up after
SEND_ATTEMPTS connects in a row that got no session, and sends its message
again with the same ref when a connection ends before the answer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable

import orjson
import trio

from relay import config as relay_config
from relay.auth import mint_token
from relay.client import (
    EpochChanged,
    Event,
    Expired,
    Reconnecting,
    RelayClientError,
    RelayStopped,
    Token,
    open_client,
)
from relay.config import Subparsers
from relay.errors import first_leaf
from relay.policy import parse_duration

_duration = relay_config.argparse_type(parse_duration)

TOKEN_OPTIONS = ("jwt-secret", "jwt-audience", "jwt-issuer")
DEFAULT_URL = "ws://127.0.0.1:8080/v1"
SEND_ATTEMPTS = 3


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


def _token_source(args: argparse.Namespace) -> Token | None:
    """The ready token, or a function minting a fresh one for each connect (a long
    `relay listen` outlives any one token); None (said on stderr) when neither works."""
    if _token_for(args) is None:
        return None
    if args.token:
        return str(args.token)

    def fresh() -> str:
        token = _token_for(args)
        if token is None:
            raise ValueError("cannot mint a token")
        return token

    return fresh


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
    token = _token_source(args)
    if token is None:
        return 2

    async def send() -> None:
        async with open_client(args.url, token, max_attempts=SEND_ATTEMPTS) as relay:
            to = args.to[0] if len(args.to) == 1 else args.to
            accepted = await relay.send(to, args.text, ttl_s=args.ttl, ref=args.ref)
        line = {
            "type": "accepted",
            "ref": accepted.ref,
            "ids": accepted.ids,
            "expires_at": accepted.expires_at_ms,
            "duplicate": accepted.duplicate,
        }
        print(orjson.dumps(line).decode())

    return _run(args, send)


def add_listen_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "listen", help="print incoming messages as JSON lines and ack them"
    )
    _add_identity(parser)
    parser.add_argument("--count", type=int, help="exit after this many messages")
    parser.set_defaults(run=run_listen)


def run_listen(args: argparse.Namespace) -> int:
    token = _token_source(args)
    if token is None:
        return 2

    async def listen() -> None:
        received = 0
        async with open_client(args.url, token, on_event=lambda e: report(args, e)) as relay:
            async for message in relay.messages():
                line = {
                    "id": message.id,
                    "from": message.sender,
                    "body": message.body,
                    "sent_at": message.sent_at_ms,
                    "expires_at": message.expires_at_ms,
                }
                print(orjson.dumps(line).decode(), flush=True)
                received += 1
                if received == args.count:
                    return  # the last one is acked as the client closes

    return _run(args, listen)


def report(args: argparse.Namespace, event: Event) -> None:
    """Say on stderr what a user of `relay listen` should know."""
    if isinstance(event, EpochChanged):
        _say(args, "the relay's storage was reset (new epoch): messages queued before may be lost")
    elif isinstance(event, Expired):
        _say(args, f"{event.count} message(s) expired before they were delivered")
    elif isinstance(event, Reconnecting):
        _say(args, str(event))


def _say(args: argparse.Namespace, text: str) -> None:
    print(f"relay {args.command}: {text}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, main: Callable[[], Awaitable[None]]) -> int:
    problems: list[str] = []
    try:
        trio.run(main)
    except* KeyboardInterrupt:
        pass  # Ctrl-C is how a user stops `relay listen`
    except* (RelayStopped, RelayClientError) as group:
        problems.append(str(first_leaf(group)))
    if problems:
        _say(args, problems[0])
        return 1
    return 0
