"""What a client reads from the relay, typed: welcome, delivered messages, accepted
answers and error answers; and the refs it sends. Shared by both client modes
(relay.client's reconnecting RelayClient and relay.client_session's one-session
RelaySession). No I/O here."""

from __future__ import annotations

import secrets
from typing import Any, TypedDict

import attrs

SUBPROTOCOL = "relay.v1"


def new_ref() -> str:
    """A ref that never repeats (128 random bits): the relay remembers a send's ref
    for the message's whole ttl, across connections and processes."""
    return secrets.token_urlsafe(16)


class RelayClientError(Exception):
    """The relay answered a request with an `error` frame (`code` is the protocol's)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Welcome(TypedDict):
    """The relay's first frame of a session (protocol.md, Authentication)."""

    type: str
    mailbox: str
    session: str
    retention_s: int
    max_body_bytes: int
    max_frame_bytes: int
    max_inflight: int
    server_time: int
    expired: int
    epoch: str


@attrs.frozen
class Message:
    """One delivered message; `sender` is the wire's `from`, set by the relay."""

    id: str
    sender: str
    body: str
    sent_at_ms: int
    expires_at_ms: int

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Message:
        return cls(m["id"], m["from"], m["body"], m["sent_at"], m["expires_at"])


@attrs.frozen
class Accepted:
    """The relay stored every copy of a send: `ids` maps each recipient to its message id;
    `duplicate` says an earlier send with this ref had been stored already."""

    ref: str
    ids: dict[str, str]
    expires_at_ms: int
    duplicate: bool

    @classmethod
    def from_wire(cls, frame: dict[str, Any]) -> Accepted:
        return cls(frame["ref"], frame["ids"], frame["expires_at"], frame.get("duplicate") is True)
