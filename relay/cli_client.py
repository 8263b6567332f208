"""`relay token`, `relay send` and `relay listen`: the relay's client side on the command line.

Tokens are minted with the HS256 secret (`--jwt-secret` / RELAY_JWT_SECRET)
for the mailbox named by `--as`, unless a ready token is given (`--token` /
RELAY_TOKEN). The relay's URL comes from `--url` / RELAY_URL.

Every failure is one line on stderr and exit status 1 (2 for a usage error).
`relay listen` reconnects with full-jitter backoff when the relay goes away
(1001, 1006, 1011, 1013, or the connect fails) and stops on 4401 or 4409.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from relay import config as relay_config
from relay.auth import mint_token
from relay.client import RelayClient, RelayClientError, new_ref, open_relay
from relay.config import Subparsers
from relay.errors import first_leaf
from relay.policy import parse_duration

_duration = relay_config.argparse_type(parse_duration)

TOKEN_OPTIONS = ("jwt-secret", "jwt-audience", "jwt-issuer")
DEFAULT_URL = "ws://127.0.0.1:8080/v1"

RECONNECT_CODES = frozenset({1001, 1006, 1011, 1013})
RETRY_STATUSES = frozenset({429, 503})  # the relay is busy, not misaddressed
STOP_REASONS = {4401: "the relay refused the token", 4409: "replaced by a newer session"}
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 20.0


class Stop(Exception):
    """`relay listen` gives up; the message says why."""


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
    if _token_for(args) is None:
        return 2

    async def listen() -> None:
        epoch: str | None = None
        received, attempt = 0, 0
        while args.count is None or received < args.count:
            token = _token_for(args)  # a fresh one each time: a long listen outlives a token
            assert token is not None
            code: int | None = None
            try:
                async with open_relay(args.url, token) as relay:
                    attempt = 0
                    epoch = report_welcome(relay.welcome, epoch)
                    received = await _print_messages(relay, received, args.count)
                    code = relay.close_code
            except* ConnectionRejected as group:
                status = first_leaf(group).status_code  # type: ignore[attr-defined]
                if status not in RETRY_STATUSES:
                    raise Stop(f"cannot connect to {args.url}: HTTP {status}") from None
                problem = f"HTTP {status}"
            except* (HandshakeError, OSError) as group:
                problem = _reason(first_leaf(group))
            else:
                if args.count is not None and received >= args.count:
                    return
                if code in STOP_REASONS:
                    raise Stop(f"{STOP_REASONS[code]} ({code})")
                if code not in RECONNECT_CODES:
                    raise Stop(f"the relay closed the connection ({code})")
                problem = f"the relay closed the connection ({code})"
            delay = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2**attempt))
            attempt += 1
            _say(args, f"{problem}; reconnecting in {delay:.1f} s")
            await trio.sleep(delay)

    return _run(args, listen)


async def _print_messages(relay: RelayClient, received: int, count: int | None) -> int:
    """Print and ack messages until the session ends or `count` were received in all."""
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
        if count is not None and received >= count:
            break
    return received


def report_welcome(welcome: dict[str, Any], seen_epoch: str | None) -> str | None:
    """Say what the welcome tells a user (storage reset, expired messages); the epoch now."""
    epoch = welcome.get("epoch")
    if seen_epoch is not None and epoch is not None and epoch != seen_epoch:
        print(
            "relay listen: the relay's storage was reset (new epoch): "
            "messages queued before may have been lost",
            file=sys.stderr,
            flush=True,
        )
    expired = welcome.get("expired", 0)
    if expired:
        print(
            f"relay listen: {expired} message(s) expired before they were delivered",
            file=sys.stderr,
            flush=True,
        )
    return epoch if isinstance(epoch, str) else seen_epoch


def _say(args: argparse.Namespace, text: str) -> None:
    print(f"relay {args.command}: {text}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    """Why a connect failed, in words (trio-websocket's HandshakeError has none of its own)."""
    if isinstance(exc, ConnectionRejected):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, HandshakeError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc)
    inner = exc.__cause__
    if isinstance(inner, BaseExceptionGroup):
        inner = first_leaf(inner)
    if isinstance(inner, OSError) and inner.strerror:
        text += f" ({inner.strerror})"
    return text or type(exc).__name__


def _run(args: argparse.Namespace, main: Callable[[], Awaitable[None]]) -> int:
    problems: list[str] = []
    try:
        trio.run(main)
    except* KeyboardInterrupt:
        pass  # Ctrl-C is how a user stops `relay listen`
    except* Stop as group:
        problems.append(str(first_leaf(group)))
    except* ConnectionClosed as group:
        closed = first_leaf(group)
        assert isinstance(closed, ConnectionClosed)
        code = closed.reason.code if closed.reason else "?"
        problems.append(f"the relay closed the connection ({code})")
    except* (HandshakeError, OSError) as group:
        problems.append(f"cannot connect to {args.url}: {_reason(first_leaf(group))}")
    except* RelayClientError as group:
        problems.append(str(first_leaf(group)))
    if problems:
        _say(args, problems[0])
        return 1
    return 0
