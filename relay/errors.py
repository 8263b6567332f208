"""The relay's error tree: each error that reaches a client knows its wire code."""

from typing import Any

from relay.codes import ErrorCode


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ClientError(RelayError):
    """A request the relay refuses; answered with an `error` frame, the connection stays."""

    code: ErrorCode = ErrorCode.BAD_FRAME

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.ref = ref


class BadFrame(ClientError):
    code = ErrorCode.BAD_FRAME


class UnknownType(ClientError):
    code = ErrorCode.UNKNOWN_TYPE


class TooLarge(ClientError):
    code = ErrorCode.TOO_LARGE


class BadRecipient(ClientError):
    code = ErrorCode.BAD_RECIPIENT


class TtlTooLong(ClientError):
    code = ErrorCode.TTL_TOO_LONG


class RateLimited(ClientError):
    code = ErrorCode.RATE_LIMITED


class RefConflict(ClientError):
    """A `ref` reused for a different request: nothing is stored."""

    code = ErrorCode.REF_CONFLICT


class MailboxFull(ClientError):
    code = ErrorCode.MAILBOX_FULL


class StorageError(ClientError):
    """Redis failed a request: the base of the two outcomes a client must tell apart."""

    code = ErrorCode.STORAGE_UNAVAILABLE


class StorageUnavailable(StorageError):
    """Redis did not run the request: it could not be reached, or refused it."""

    code = ErrorCode.STORAGE_UNAVAILABLE


class Unconfirmed(StorageError):
    """The request was written to Redis and no reply came: it may have run."""

    code = ErrorCode.UNCONFIRMED


class UnsafeRedis(RelayError):
    """The Redis server's settings would break the ephemerality contract."""


class AuthError(RelayError):
    """A token was refused. Deliberately carries no detail to the client."""


def first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception in a (nested) group: the one a one-line report names."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
