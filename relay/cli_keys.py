"""`relay keygen`, and the key files `relay send --key --seal-to` and `relay listen --key
--trust` read (relay.seal's identity and public-key files).

`relay keygen FILE [--as MAILBOX]` writes the private identity to FILE (mode 0600) and
its public key to FILE.pub, prints the public key, and never overwrites a file. A public
key is given as FILE (the file names its mailbox) or MAILBOX=FILE.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import attrs

from relay.config import Subparsers
from relay.policy import MAILBOX_ID_RULE, is_valid_mailbox
from relay.seal import Identity, PublicKey

EXIT_OK, EXIT_USAGE = 0, 2


def add_keygen_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "keygen",
        help="make a key pair for sealed messages",
        description="Write a private identity (X25519 and Ed25519 keys) to FILE, readable by "
        "you only, and its public key to FILE.pub (give that to the people who write to you); "
        "print the public key. Existing files are never overwritten.",
    )
    parser.add_argument("file", help="where to write the private identity")
    parser.add_argument(
        "--as", dest="mailbox", help="the mailbox the keys belong to (named in them)"
    )
    parser.set_defaults(run=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    if args.mailbox is not None and not is_valid_mailbox(args.mailbox):
        print(f"relay keygen: --as is not a mailbox id ({MAILBOX_ID_RULE})", file=sys.stderr)
        return EXIT_USAGE
    private, public = Path(args.file), Path(args.file + ".pub")
    identity = Identity.generate(args.mailbox)
    try:
        for path in (private, public):
            if path.exists():
                raise FileExistsError(f"{path} exists (not overwritten)")
        _write_new(private, identity.to_json(), 0o600)
        _write_new(public, identity.public.to_json(), 0o644)
    except OSError as exc:
        print(f"relay keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(identity.public.to_json())
    return EXIT_OK


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create `path` with `mode` from the start (never a moment with wider permissions)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as file:
        file.write(text + "\n")


def read_identity(path: str) -> Identity:
    """The identity in a private identity file; ValueError naming the file otherwise."""
    try:
        return Identity.from_json(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_public_key(spec: str) -> PublicKey:
    """The public key in FILE or MAILBOX=FILE (for a file that names no mailbox, or to say
    which one it must name); ValueError when it has no mailbox or another one."""
    mailbox, path = None, spec
    if not os.path.exists(spec) and "=" in spec:
        mailbox, _, path = spec.partition("=")
    try:
        key = PublicKey.from_json(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if mailbox is not None:
        if not is_valid_mailbox(mailbox):
            raise ValueError(f"{spec}: {mailbox!r} is not a mailbox id ({MAILBOX_ID_RULE})")
        if key.mailbox not in (None, mailbox):
            raise ValueError(f"{path} is the key of mailbox {key.mailbox!r}, not {mailbox!r}")
        key = attrs.evolve(key, mailbox=mailbox)
    if key.mailbox is None:
        raise ValueError(f"{path} names no mailbox: give it as MAILBOX={path}")
    return key


def read_trusted(specs: list[str]) -> dict[str, PublicKey]:
    """Public keys by mailbox; ValueError when two files give one mailbox other keys."""
    keys: dict[str, PublicKey] = {}
    for spec in specs:
        key = read_public_key(spec)
        assert key.mailbox is not None
        if keys.get(key.mailbox, key) != key:
            raise ValueError(f"two different keys for mailbox {key.mailbox!r}")
        keys[key.mailbox] = key
    return keys
