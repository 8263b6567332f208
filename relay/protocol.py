"""Sans-IO frames of protocol v1: parse client text frames, encode server frames.

No trio, no redis: `parse_frame` turns one text frame into a frozen value or raises a
`ClientError` that carries its wire code and, when one could be read, the client's `ref`.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import attrs
import orjson

from relay import policy
from relay.codes import ErrorCode
from relay.errors import BadFrame, BadRecipient, ClientError, TooLarge, UnknownType

REF_MAX_BYTES = 64
_SHORT_CHARS = 32

MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_at_least_1 = attrs.validators.ge(1)


@attrs.frozen
class Limits:
    """What a client may send; the session builds one from the config."""

    max_body_bytes: int = attrs.field(default=65536, validator=_at_least_1)
    max_recipients: int = attrs.field(default=100, validator=_at_least_1)
    retention_s: int = attrs.field(default=604800, validator=_at_least_1)
    max_ack_ids: int = attrs.field(default=1024, validator=_at_least_1)


@attrs.frozen
class AuthFrame:
    token: str = attrs.field(repr=False)  # never let a token reach a log line
    ref: str | None = None  # echoed on an error, like any request's


@attrs.frozen
class SendFrame:
    to: tuple[str, ...]
    body: str = attrs.field(repr=False)  # bodies are opaque and never logged
    ttl_s: int  # already resolved against the retention window
    ref: str | None


@attrs.frozen
class AckFrame:
    ids: tuple[str, ...]
    ref: str | None


ClientFrame: TypeAlias = AuthFrame | SendFrame | AckFrame


def _short(text: str) -> str:
    """A quoted, truncated echo of client input for an error message."""
    if len(text) <= _SHORT_CHARS:
        return repr(text)
    return repr(text[:_SHORT_CHARS]) + "..."


def _valid_ref(value: object) -> str | None:
    """`value` if it is a well-formed ref (a str of 1 to 64 UTF-8 bytes), else None."""
    if (
        isinstance(value, str)
        and 0 < len(value) <= REF_MAX_BYTES
        and len(value.encode()) <= REF_MAX_BYTES
    ):
        return value
    return None


def parse_frame(text: str, limits: Limits) -> ClientFrame:
    """Parse and validate one client text frame.

    Raises a `ClientError` subclass; it carries `ref` whenever the object held a
    well-formed one, so the error frame can echo it.
    """
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BadFrame("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadFrame("frame must be a JSON object")
    ref = _valid_ref(obj.get("ref"))
    try:
        return _parse_object(obj, limits)
    except ClientError as exc:
        exc.ref = ref
        raise


def _parse_object(obj: dict[str, Any], limits: Limits) -> ClientFrame:
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise BadFrame("field 'type' is missing or not a string")
    if kind == "send":
        return _parse_send(obj, limits)
    if kind == "ack":
        return _parse_ack(obj, limits)
    if kind == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise BadFrame("field 'token' is missing or not a non-empty string")
        return AuthFrame(token, _parse_ref(obj))
    raise UnknownType(f"unknown frame type {_short(kind)}")


def _parse_ref(obj: dict[str, Any]) -> str | None:
    """The optional `ref`; JSON null counts as absent."""
    value = obj.get("ref")
    if value is None:
        return None
    ref = _valid_ref(value)
    if ref is None:
        raise BadFrame(f"field 'ref' must be a string of 1 to {REF_MAX_BYTES} bytes")
    return ref


def _parse_send(obj: dict[str, Any], limits: Limits) -> SendFrame:
    ref = _parse_ref(obj)
    to = _parse_recipients(obj.get("to"), limits.max_recipients)
    body = obj.get("body")
    if not isinstance(body, str):
        raise BadFrame("field 'body' is missing or not a string")
    _check_body_size(body, limits.max_body_bytes)
    ttl = obj.get("ttl")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
        raise BadFrame("field 'ttl' must be an integer number of seconds")
    ttl_s = policy.resolve_ttl_s(ttl, limits.retention_s)
    return SendFrame(to=to, body=body, ttl_s=ttl_s, ref=ref)


def _parse_recipients(value: object, max_recipients: int) -> tuple[str, ...]:
    if isinstance(value, str):
        recipients: list[object] = [value]
    elif isinstance(value, list):
        recipients = value
    else:
        raise BadFrame("field 'to' is missing or not a string or a list of strings")
    if not recipients:
        raise BadRecipient("field 'to' must name at least one recipient")
    if len(recipients) > max_recipients:
        raise BadRecipient(f"{len(recipients)} recipients exceed the limit of {max_recipients}")
    checked: list[str] = []
    seen: set[str] = set()
    for recipient in recipients:
        if not isinstance(recipient, str):
            raise BadFrame("field 'to' must hold only strings")
        if not policy.is_valid_mailbox(recipient):
            raise BadRecipient(
                f"recipient {_short(recipient)} is not a mailbox id ({policy.MAILBOX_ID_RULE})"
            )
        if recipient in seen:
            raise BadRecipient(f"recipient {_short(recipient)} is listed more than once")
        seen.add(recipient)
        checked.append(recipient)
    return tuple(checked)


def _check_body_size(body: str, limit: int) -> None:
    """At most `limit` bytes of UTF-8, encoding only when the length alone cannot tell.

    A character is 1 to 4 UTF-8 bytes, so `len(body)` bounds the size on both sides.
    """
    chars = len(body)
    if chars * 4 <= limit:
        return
    if chars > limit:
        raise TooLarge(f"body of at least {chars} bytes exceeds the limit of {limit} bytes")
    size = len(body.encode())
    if size > limit:
        raise TooLarge(f"body of {size} bytes exceeds the limit of {limit} bytes")


def _parse_ack(obj: dict[str, Any], limits: Limits) -> AckFrame:
    ref = _parse_ref(obj)
    ids = obj.get("ids")
    if not isinstance(ids, list) or not ids:
        raise BadFrame("field 'ids' is missing or not a non-empty list")
    if len(ids) > limits.max_ack_ids:
        raise BadFrame(f"{len(ids)} ids exceed the limit of {limits.max_ack_ids}")
    for message_id in ids:
        if not isinstance(message_id, str) or MESSAGE_ID_RE.fullmatch(message_id) is None:
            raise BadFrame("ids must be strings of 1 to 64 characters of [A-Za-z0-9_-]")
    return AckFrame(ids=tuple(ids), ref=ref)


def _dumps(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


def encode_welcome(
    mailbox: str,
    session: str,
    retention_s: int,
    max_body_bytes: int,
    max_frame_bytes: int,
    max_inflight: int,
    server_time_ms: int,
    expired: int,
    epoch: str,
) -> str:
    return _dumps(
        {
            "type": "welcome",
            "mailbox": mailbox,
            "session": session,
            "retention_s": retention_s,
            "max_body_bytes": max_body_bytes,
            "max_frame_bytes": max_frame_bytes,
            "max_inflight": max_inflight,
            "server_time": server_time_ms,
            "expired": expired,
            "epoch": epoch,
        }
    )


def encode_accepted(
    ref: str | None, ids: Mapping[str, str], expires_at_ms: int, duplicate: bool = False
) -> str:
    """`ids` maps each recipient to the id of its copy; `ref` is left out when None;
    `duplicate` (a retry of a request stored before) only when true."""
    frame: dict[str, Any] = {"type": "accepted"}
    if ref is not None:
        frame["ref"] = ref
    frame["ids"] = dict(ids)
    frame["expires_at"] = expires_at_ms
    if duplicate:
        frame["duplicate"] = True
    return _dumps(frame)


def encode_acked(ref: str, count: int) -> str:
    return _dumps({"type": "acked", "ref": ref, "count": count})


def encode_error(code: ErrorCode, message: str, ref: str | None) -> str:
    """An `error` frame; `ref` is left out when None."""
    frame: dict[str, Any] = {"type": "error"}
    if ref is not None:
        frame["ref"] = ref
    frame["code"] = code.value
    frame["message"] = message
    return _dumps(frame)


_DELIVER_HEAD, _DELIVER_TAIL = '{"type":"deliver","messages":[', "]}"


def encode_deliver(envelopes: Sequence[str]) -> str:
    """Join already-encoded JSON envelope objects into one `deliver` frame, without re-parsing."""
    return _DELIVER_HEAD + ",".join(envelopes) + _DELIVER_TAIL


def encode_delivers(envelopes: Sequence[str], max_frame_bytes: int) -> list[str]:
    """`deliver` frames of at most `max_frame_bytes` UTF-8 bytes each, in order; an
    envelope too large for that travels alone."""
    frames: list[str] = []
    group: list[str] = []
    size = len(_DELIVER_HEAD) + len(_DELIVER_TAIL) - 1  # minus the comma the first one skips
    used = size
    for envelope in envelopes:
        length = 1 + (len(envelope) if envelope.isascii() else len(envelope.encode()))
        if group and used + length > max_frame_bytes:
            frames.append(encode_deliver(group))
            group, used = [], size
        group.append(envelope)
        used += length
    if group:
        frames.append(encode_deliver(group))
    return frames
