"""`relay probe URL`: run relay.probe's checks against a live relay and report them.

The mailbox is the one the user's token names (`--token`, its `sub`), or, with the HS256
secret (`--jwt-secret`), a fresh `probe-<random>` one with a token minted per session.
Exit status: 0 when no check failed (warnings allowed), 1 when one failed or could not
run, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from typing import Any

import trio

from relay import config as relay_config
from relay.auth import mint_token
from relay.cli_client import TOKEN_OPTIONS
from relay.config import Subparsers
from relay.policy import parse_duration
from relay.probe import ProbeOptions, policy_url_for, run_probe, unverified_claims

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MINTED_TOKEN_S = 300  # each session's token, with --jwt-secret

_duration = relay_config.argparse_type(parse_duration)


def add_probe_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="check a live relay's promise from outside, with a user's token",
        description="Check from outside that a relay keeps its promise: its public policy "
        "document agrees with what a session is told, a message with a short ttl expires "
        "undelivered and is counted, an acked message is gone, a ref stores one copy, and "
        "tokens in the URL or unsigned are refused. Sends only to its own mailbox. Exit 0 "
        "when no check failed, 1 when one did, 2 on a usage error.",
    )
    parser.add_argument("url", help="the relay's ws:// or wss:// URL, ending in /v1")
    relay_config.add_arguments(parser, TOKEN_OPTIONS)
    parser.add_argument(
        "--token",
        default=os.environ.get("RELAY_TOKEN"),
        help="a token for the mailbox to probe (its sub; env RELAY_TOKEN); it is also "
        "sent once in a URL query string, which the relay must refuse: use a short-lived "
        "token for a mailbox nothing else uses",
    )
    parser.add_argument(
        "--ttl", type=_duration, default=5, help="ttl of the message meant to expire (default 5s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds one step may take (default 10)"
    )
    parser.add_argument("--policy-url", help="the policy document's URL (default: from URL)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run_probe_command)


def run_probe_command(args: argparse.Namespace) -> int:
    options = _options(args)
    if options is None:
        return EXIT_USAGE
    report = trio.run(run_probe, options)
    print(report.to_json() if args.json else report.to_text())
    return EXIT_OK if report.ok else EXIT_FAILED


def _options(args: argparse.Namespace) -> ProbeOptions | None:
    """The probe's options, or None after saying on stderr what is wrong."""
    try:
        policy_url_for(args.url)
        if args.ttl < 1:
            raise ValueError("--ttl must be at least 1 s")
        if args.token:
            claims = unverified_claims(args.token)
            mailbox = str(claims["sub"])
            given = str(args.token)

            def token() -> str:
                return given
        else:
            config = relay_config.load(args)
            if not config.jwt_secret:
                raise ValueError("give --token, or --jwt-secret to mint tokens")
            mailbox = f"probe-{secrets.token_hex(8)}"
            claims = _claims(mailbox, config.jwt_audience, config.jwt_issuer)
            secret = config.jwt_secret

            def token() -> str:
                return mint_token(
                    secret,
                    mailbox,
                    MINTED_TOKEN_S,
                    time.time(),
                    config.jwt_audience,
                    config.jwt_issuer,
                )

            token()  # a bad secret is a usage error, said now
    except (ValueError, OSError) as exc:
        print(f"relay probe: {exc}", file=sys.stderr)
        return None
    return ProbeOptions(
        url=args.url,
        mailbox=mailbox,
        token=token,
        claims=claims,
        ttl_s=args.ttl,
        timeout_s=args.timeout,
        policy_url=args.policy_url,
    )


def _claims(mailbox: str, audience: str | None, issuer: str | None) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": mailbox, "iat": int(time.time())}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return claims
