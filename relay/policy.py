"""Pure rules of the relay: mailbox ids, durations, ttl bounds, expiry times. No I/O, no clock."""

import re

from relay.errors import BadFrame, TtlTooLong

# The charset is ASCII, so 1 to 128 characters is 1 to 128 bytes.
MAILBOX_ID_RE = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
MAILBOX_ID_RULE = "1 to 128 bytes of [A-Za-z0-9._:@/-]"

_DURATION_RE = re.compile(r"([0-9]+)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB)?")
_UNIT_BYTES = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def is_valid_mailbox(s: str) -> bool:
    """Whether `s` is a mailbox id: 1 to 128 bytes of `[A-Za-z0-9._:@/-]`."""
    return MAILBOX_ID_RE.fullmatch(s) is not None


def parse_duration(text: str) -> int:
    """Seconds in `90s`, `15m`, `2h`, `7d` or plain integer seconds; must be positive."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid duration {text[:40]!r}: expected whole seconds or a number "
            "followed by s, m, h or d (e.g. 90s, 15m, 2h, 7d)"
        )
    seconds = int(match[1]) * _UNIT_S[match[2]]
    if seconds <= 0:
        raise ValueError(f"invalid duration {text[:40]!r}: must be positive")
    return seconds


def parse_size(text: str) -> int:
    """Bytes in `64MiB`, `512KiB`, `1GiB` or plain integer bytes; must be positive."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text[:40]!r}: expected whole bytes or a number "
            "followed by B, KiB, MiB or GiB (e.g. 512KiB, 64MiB)"
        )
    size = int(match[1]) * _UNIT_BYTES[match[2]]
    if size <= 0:
        raise ValueError(f"invalid size {text[:40]!r}: must be positive")
    return size


def resolve_ttl_s(ttl_s: int | None, retention_s: int) -> int:
    """The ttl a send gets: the retention window by default, never silently capped."""
    if ttl_s is None:
        return retention_s
    if ttl_s < 1:
        raise BadFrame(f"ttl {ttl_s} is below the minimum of 1 s")
    if ttl_s > retention_s:
        raise TtlTooLong(f"ttl {ttl_s} exceeds retention {retention_s} s")
    return ttl_s


def expires_at_ms(now_ms: int, ttl_s: int) -> int:
    """When a message stored at `now_ms` with `ttl_s` runs out, in epoch milliseconds."""
    return now_ms + ttl_s * 1000
