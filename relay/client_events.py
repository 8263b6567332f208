"""What RelayClient tells its application besides messages: the events `on_event` hears,
why it stopped (RelayStopped), and its counters. Plain values, no I/O."""

from __future__ import annotations

import attrs

from relay.client_frames import Welcome


class RelayStopped(Exception):
    """The client stopped and reconnects no more; `code` is the close code that stopped it
    (4409, 4401, ...), None when no connection said (a refused connect, say)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason if code is None else f"{reason} ({code})")
        self.reason = reason
        self.code = code


@attrs.frozen
class Welcomed:
    """A session started (after every connect and reconnect)."""

    welcome: Welcome


@attrs.frozen
class EpochChanged:
    """The storage lost everything since the last welcome: queued messages may be lost."""

    previous: str
    epoch: str


@attrs.frozen
class Expired:
    """`count` messages ran out of time before they were delivered (the welcome's count)."""

    count: int


@attrs.frozen
class Reconnecting:
    """The connection ended (`reason`; `code` when the relay closed it); the client tries
    again in `delay_s`. `attempt` counts the tries since the last welcome, from 1."""

    reason: str
    code: int | None
    attempt: int
    delay_s: float

    def __str__(self) -> str:
        why = self.reason if self.code is None else f"{self.reason} ({self.code})"
        return f"{why}; reconnecting in {self.delay_s:.1f} s"


Event = Welcomed | EpochChanged | Expired | Reconnecting


@attrs.define
class Stats:
    """Counters, for the curious and for tests."""

    connects: int = 0
    welcomes: int = 0
    sends: int = 0  # send frames written, first tries and resends
    ack_frames: int = 0
    duplicates_dropped: int = 0
