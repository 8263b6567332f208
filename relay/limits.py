"""Pure limits: a token bucket for frames, and the client address behind trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def _refill(self, now_s: float) -> None:
        if now_s > self.updated_s:
            self.tokens = min(self.burst, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
            self.updated_s = now_s


@attrs.define
class FrameLimiter:
    """Frames over the rate are refused; a client that keeps sending over it is abusive.

    Each refused frame is a strike; strikes drain at the allowed rate, so only
    a client that goes on sending much faster than allowed piles up more than
    `burst` of them.
    """

    allowed: TokenBucket
    strikes: float = 0.0
    strikes_updated_s: float = 0.0

    @classmethod
    def create(cls, rate_per_s: float, burst: float, now_s: float) -> FrameLimiter:
        return cls(TokenBucket(rate_per_s, burst, burst, now_s), strikes_updated_s=now_s)

    def admit(self, now_s: float) -> bool:
        if self.allowed.take(now_s):
            return True
        drained = (now_s - self.strikes_updated_s) * self.allowed.rate_per_s
        self.strikes = max(0.0, self.strikes - drained) + 1
        self.strikes_updated_s = now_s
        return False

    @property
    def abusive(self) -> bool:
        return self.strikes > self.allowed.burst


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
