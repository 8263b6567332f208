"""The mailbox store: what the relay keeps for undelivered messages, independent of Redis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs

# A read of waiting messages stops once it holds about this much (at most 32 messages
# more): a page of large messages costs the relay and Redis no more than a page of small.
FETCH_BYTES = 1024 * 1024


@attrs.frozen
class Accepted:
    """Every copy of a send is stored: one message id per recipient."""

    ids: Mapping[str, str]
    expires_at_ms: int
    duplicate: bool = False  # a retry of a request stored before: nothing new was stored


@attrs.frozen
class SendRequest:
    """What one `send` frame asks to store."""

    recipients: Sequence[str]
    body: str
    ttl_s: int
    ref: str | None


@attrs.frozen
class Delivery:
    """One stored message as the recipient gets it.

    `envelope` is the JSON object sent in a `deliver` frame, encoded once when
    the message was stored; `seq` orders the messages of one mailbox.
    """

    seq: int
    id: str
    envelope: str


@attrs.frozen
class Page:
    """Waiting messages read at once. `more`: the read stopped at its limit or its byte
    budget, so more may wait; false once the mailbox had nothing more to give."""

    deliveries: list[Delivery]
    more: bool


@attrs.frozen
class SessionStart:
    """What the store knows when a mailbox's session begins."""

    expired: int  # messages that expired unacknowledged since the last session
    waiting: int
    epoch: str = ""  # names the storage's life: it changes when the storage lost everything


class MailboxStore(Protocol):
    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        body: str,
        ttl_s: int,
        ref: str | None,
        now_ms: int,
    ) -> Accepted:
        """Store one copy per recipient, all or none; a repeated `ref` stores nothing new."""
        ...

    async def send_many(
        self, sender: str, sends: Sequence[SendRequest], now_ms: int
    ) -> list[Accepted | Exception]:
        """Several sends at once, in order: what `send` would return or raise for each."""
        ...

    async def start_session(self, mailbox: str, notice: str = "") -> SessionStart:
        """Forget expired messages, count them, and publish `notice` to the mailbox's sessions."""
        ...

    async def fetch(
        self, mailbox: str, after: int, limit: int, max_bytes: int = FETCH_BYTES
    ) -> Page:
        """Up to `limit` waiting messages with a sequence above `after`, oldest first;
        fewer once they hold about `max_bytes`."""
        ...

    async def ack(self, mailbox: str, ids: Sequence[str]) -> int:
        """Delete these messages of `mailbox`; return how many were deleted."""
        ...


def envelope_id(envelope: str) -> str | None:
    """The message id of an envelope, which always starts `{"id":"<id>",`; None for
    anything else (a notice the relay did not publish)."""
    if not envelope.startswith('{"id":"'):
        return None
    end = envelope.find('"', 7)
    return envelope[7:end] if end > 7 else None
