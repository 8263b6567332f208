"""Sealing in RelayClient: every send sealed for its recipient, every delivery opened (or
reported as Unopened). No I/O: the client passes its own mailbox (the welcome's)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from relay import seal
from relay.client_events import Unopened
from relay.client_frames import Message

PublicKeyLookup = Callable[[str], seal.PublicKey | None]


@attrs.frozen
class Sealer:
    """`identity` seals and opens as the client's mailbox; `public_key(mailbox)` returns a
    mailbox's public key, or None for one the application does not know."""

    identity: seal.Identity
    public_key: PublicKeyLookup

    def seal(self, own_mailbox: str, to: str | Sequence[str], body: str) -> tuple[str, str]:
        """The one recipient and the body sealed for it; ValueError when there is no key
        for it, or more than one recipient (each needs a body sealed for its own key)."""
        if not isinstance(to, str):
            if len(to) != 1:
                raise ValueError("a sealed send goes to one mailbox: send to each on its own")
            to = to[0]
        key = self.public_key(to)
        if key is None:
            raise ValueError(f"no public key for {to!r}: cannot seal to it")
        return to, seal.seal(body, key, self.identity, seal.Context(own_mailbox, to))

    def open(self, own_mailbox: str, message: Message) -> Message | Unopened:
        """The message with its body opened, or why it does not open."""
        key = self.public_key(message.sender)
        if key is None:
            return Unopened(message, "unknown_sender", f"no public key for {message.sender!r}")
        context = seal.Context(message.sender, own_mailbox)
        try:
            body = seal.open(message.body, self.identity, key, context)
        except seal.SealError as exc:
            return Unopened(message, exc.reason, str(exc))
        return attrs.evolve(message, body=body, sealed=True)
