"""Wire error codes and WebSocket close codes of protocol v1, in one table."""

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The `code` field of an `error` frame."""

    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    BAD_RECIPIENT = "bad_recipient"
    TTL_TOO_LONG = "ttl_too_long"
    RATE_LIMITED = "rate_limited"
    REF_CONFLICT = "ref_conflict"
    MAILBOX_FULL = "mailbox_full"
    STORAGE_UNAVAILABLE = "storage_unavailable"  # nothing was stored
    UNCONFIRMED = "unconfirmed"  # may have been stored; retry with the same ref
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes the relay sends."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down; messages stay queued
    POLICY = 1008  # abuse
    TOO_BIG = 1009  # frame larger than the frame limit
    TRY_AGAIN_LATER = 1013  # storage unavailable; messages stay queued
    UNAUTHORIZED = 4401
    AUTH_TIMEOUT = 4408
    REPLACED = 4409


CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "bye",
    CloseCode.GOING_AWAY: "server shutting down",
    CloseCode.POLICY: "policy violation",
    CloseCode.TOO_BIG: "frame too large",
    CloseCode.TRY_AGAIN_LATER: "storage unavailable, try again later",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.AUTH_TIMEOUT: "auth timeout",
    CloseCode.REPLACED: "replaced by a newer session",
}
