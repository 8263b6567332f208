"""`relay token`, `relay send` and `relay listen`: the relay's client side on the command line.

Tokens are minted with the HS256 secret (`--jwt-secret` / RELAY_JWT_SECRET)
for the mailbox named by `--as`, unless a ready token is given (`--token` /
RELAY_TOKEN). The relay's URL comes from `--url` / RELAY_URL.

With `--key` (a `relay keygen` identity) they seal: `relay send --seal-to
PUBKEY` seals for that one recipient, `relay listen --trust PUBKEY...` opens
what those senders sealed and reports every other delivery as `unopened`.

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
from relay.cli_keys import read_identity, read_public_key, read_trusted
from relay.client import (
    EpochChanged,
    Event,
    Expired,
    Message,
    Reconnecting,
    RelayClientError,
    RelayStopped,
    Token,
    Unopened,
    open_client,
)
from relay.config import Subparsers
from relay.errors import first_leaf
from relay.policy import parse_duration
from relay.seal import Identity, PublicKey

_duration = relay_config.argparse_type(parse_duration)

TOKEN_OPTIONS = ("jwt-secret", "jwt-audience", "jwt-issuer")
DEFAULT_URL = "ws://127.0.0.1:8080/v1"
SEND_ATTEMPTS = 3


class CommandFailed(Exception):
    """A failure of the command that is not the relay's answer (a key that does not fit)."""


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
        "--to",
        action="append",
        help="recipient mailbox (repeatable; with --seal-to, one, by default its key's)",
    )
    parser.add_argument("--key", help="your identity file (relay keygen): sign what you seal")
    parser.add_argument(
        "--seal-to",
        metavar="PUBKEY",
        help="seal the message for this public key (FILE, or MAILBOX=FILE); needs --key",
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
    try:
        identity, recipient = _send_keys(args)
    except ValueError as exc:
        _say(args, str(exc))
        return 2
    token = _token_source(args)
    if token is None:
        return 2
    keys = {} if recipient is None else {recipient.mailbox: recipient}

    async def send() -> None:
        async with open_client(
            args.url,
            token,
            max_attempts=SEND_ATTEMPTS,
            identity=identity,
            public_key=keys.get if identity is not None else None,
        ) as relay:
            to = args.to[0] if len(args.to) == 1 else args.to
            try:
                accepted = await relay.send(to, args.text, ttl_s=args.ttl, ref=args.ref)
            except ValueError as exc:  # the identity is not the token's mailbox's
                raise CommandFailed(f"cannot seal: {exc}") from None
        line = {
            "type": "accepted",
            "ref": accepted.ref,
            "ids": accepted.ids,
            "expires_at": accepted.expires_at_ms,
            "duplicate": accepted.duplicate,
        }
        print(orjson.dumps(line).decode())

    return _run(args, send)


def _send_keys(args: argparse.Namespace) -> tuple[Identity | None, PublicKey | None]:
    """The identity and recipient key of a sealed send, (None, None) for a plain one;
    ValueError on a usage error. Fills in `args.to` from the key."""
    if args.seal_to is None and args.key is None:
        if not args.to:
            raise ValueError("give --to")
        return None, None
    if args.seal_to is None or args.key is None:
        raise ValueError("--seal-to and --key go together")
    identity, recipient = _own_identity(args), read_public_key(args.seal_to)
    args.to = args.to or [recipient.mailbox]
    if args.to != [recipient.mailbox]:
        raise ValueError(f"--seal-to is the key of {recipient.mailbox!r}: send to it alone")
    return identity, recipient


def _own_identity(args: argparse.Namespace) -> Identity:
    identity = read_identity(args.key)
    if None not in (identity.mailbox, args.mailbox) and identity.mailbox != args.mailbox:
        raise ValueError(f"{args.key} is the identity of {identity.mailbox!r}, not --as's")
    return identity


def add_listen_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "listen", help="print incoming messages as JSON lines and ack them"
    )
    _add_identity(parser)
    parser.add_argument("--count", type=int, help="exit after this many messages")
    parser.add_argument("--key", help="your identity file (relay keygen): open sealed messages")
    parser.add_argument(
        "--trust",
        metavar="PUBKEY",
        nargs="+",
        action="extend",
        default=[],
        help="public keys of the senders whose sealed messages to open (FILE, or MAILBOX=FILE)",
    )
    parser.set_defaults(run=run_listen)


def run_listen(args: argparse.Namespace) -> int:
    if (args.key is None) != (not args.trust):
        _say(args, "--key and --trust go together")
        return 2
    try:
        identity = None if args.key is None else _own_identity(args)
        trusted = read_trusted(args.trust)
    except ValueError as exc:
        _say(args, str(exc))
        return 2
    token = _token_source(args)
    if token is None:
        return 2

    async def listen() -> None:
        received = 0
        counted = trio.CancelScope()  # ends the loop once --count lines were shown

        def show(line: dict[str, object]) -> None:
            nonlocal received
            print(orjson.dumps(line).decode(), flush=True)
            received += 1
            if received == args.count:
                counted.cancel()  # the last one is acked as the client closes

        def on_event(event: Event) -> None:
            if isinstance(event, Unopened):  # shown without its body: it is no text
                show(_line(event.message, body=False) | {"unopened": event.reason})
            report(args, event)

        async with open_client(
            args.url,
            token,
            on_event=on_event,
            identity=identity,
            public_key=trusted.get if identity is not None else None,
        ) as relay:
            with counted:
                async for message in relay.messages():
                    show(_line(message) | ({"sealed": True} if message.sealed else {}))

    return _run(args, listen)


def _line(message: Message, *, body: bool = True) -> dict[str, object]:
    line: dict[str, object] = {"id": message.id, "from": message.sender}
    if body:
        line["body"] = message.body
    return line | {"sent_at": message.sent_at_ms, "expires_at": message.expires_at_ms}


def report(args: argparse.Namespace, event: Event) -> None:
    """Say on stderr what a user of `relay listen` should know."""
    if isinstance(event, Unopened):
        _say(args, f"message {event.message.id} did not open: {event.error}")
    elif isinstance(event, EpochChanged):
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
    except* (RelayStopped, RelayClientError, CommandFailed) as group:
        problems.append(str(first_leaf(group)))
    if problems:
        _say(args, problems[0])
        return 1
    return 0
