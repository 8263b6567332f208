"""Pure limits: the frame budget of a connection, and the client address behind trusted proxies."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ROUNDING = 1e-9  # a token refilled by float arithmetic may come out a hair short of 1


@attrs.define
class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up; time is passed in."""

    rate_per_s: float
    burst: float
    tokens: float
    updated_s: float

    def take(self, now_s: float) -> bool:
        """Take one token; False when none is left (the frame is over the limit)."""
        self._refill(now_s)
        if self.tokens >= 1 - ROUNDING:
            self.tokens -= 1
            return True
        return False

    def _refill(self, now_s: float) -> None:
        if now_s > self.updated_s:
            self.tokens = min(self.burst, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
            self.updated_s = now_s


MAX_DELAY_S = 1.0  # a frame that would wait longer than this for its budget is refused
PATIENCE_BURSTS = 10  # held back without a break for this many bursts' worth: abusive
# A read this large found the socket full (a TLS record's worth: SSLStream returns no more
# per read). A held-back read smaller than it is a break: the client has only a few frames
# in flight (it waits for answers), however far above its rate it is.
FULL_READ_BYTES = 16 * 1024


@attrs.define
class FrameBudget:
    """How fast one connection's frames are handled (protocol.md, "Rate limits").

    Frames within `rate_per_s` (with `burst` saved up) are handled at once.
    Above it the connection is held back: `admit` says how long to wait, and
    the relay reads nothing more from the connection meanwhile (its socket
    fills), so a client flushing a queue is slowed down, not refused, and a
    flood costs no more than the rate. A frame that would wait longer than
    MAX_DELAY_S (a rate below one frame a second) is refused instead. A read
    with refusals is one strike (the client sent its frames before it could see
    an answer: a queue flushed at once is one strike, however long), strikes
    drain at the allowed rate, and more than `burst` of them is abuse. So is
    being held back, read after read, for longer than PATIENCE_BURSTS bursts'
    worth of the rate: a client that keeps the relay's buffers full: a read
    that brought less than FULL_READ_BYTES breaks the run, so a client that
    waits for answers before it sends more is slowed down, never closed.
    """

    allowed: TokenBucket
    strikes: float = 0.0
    strikes_updated_s: float = 0.0
    held_since_s: float | None = None  # the first wait of the current run of held-back reads
    struck: bool = False  # this read has refused a frame already

    @classmethod
    def create(cls, rate_per_s: float, burst: float, now_s: float) -> FrameBudget:
        return cls(TokenBucket(rate_per_s, burst, burst, now_s), strikes_updated_s=now_s)

    @property
    def patience_s(self) -> float:
        return PATIENCE_BURSTS * self.allowed.burst / self.allowed.rate_per_s

    def admit(self, now_s: float) -> float:
        """0.0: handle the frame now (its token is taken); a positive number: wait that
        many seconds, then ask again; math.inf: refuse the frame (the read's strike)."""
        bucket = self.allowed
        if bucket.take(now_s):
            return 0.0
        wait = (1 - bucket.tokens) / bucket.rate_per_s
        if wait <= MAX_DELAY_S:
            if self.held_since_s is None:
                self.held_since_s = now_s
            return wait
        if not self.struck:
            self.struck = True
            drained = (now_s - self.strikes_updated_s) * bucket.rate_per_s
            self.strikes = max(0.0, self.strikes - drained) + 1
            self.strikes_updated_s = now_s
        return math.inf

    def read_done(self, held_back: bool, read_bytes: int) -> None:
        """After the frames of one read: a read none of whose frames waited, or one that
        did not find the socket full, ends a run."""
        self.struck = False
        if not held_back or read_bytes < FULL_READ_BYTES:
            self.held_since_s = None

    def abusive(self, now_s: float) -> bool:
        if self.strikes > self.allowed.burst:
            return True
        return self.held_since_s is not None and now_s - self.held_since_s > self.patience_s


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the
    right-most address in X-Forwarded-For that is not itself a trusted proxy."""
    if forwarded_for is None or not _is_trusted(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if not hop:
            continue
        if not _is_trusted(hop, trusted):
            return hop
    return peer


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # what a dual-stack listener reports for an IPv4 client
    return any(ip in network for network in trusted)
