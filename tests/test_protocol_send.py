"""Sans-IO frames: the parse rules of protocol.md for the send frame (to, body, ttl)."""

from typing import Any

import pytest
from protocol_helpers import parse, refused, send

from relay.codes import ErrorCode
from relay.errors import BadFrame, BadRecipient, TooLarge, TtlTooLong
from relay.protocol import Limits, SendFrame

# --- send: to ------------------------------------------------------------------------------


def test_send_to_one_mailbox() -> None:
    frame = parse({"type": "send", "ref": "c-17", "to": "bob", "body": "hello", "ttl": 3600})
    assert frame == SendFrame(to=("bob",), body="hello", ttl_s=3600, ref="c-17")


def test_send_to_a_list_keeps_order() -> None:
    frame = parse(send(to=["carol", "bob", "a@b.c/d:e"]))
    assert isinstance(frame, SendFrame)
    assert frame.to == ("carol", "bob", "a@b.c/d:e")


@pytest.mark.parametrize("to", [None, 5, {"bob": 1}, True])
def test_send_to_missing_or_wrong_type_is_bad_frame(to: Any) -> None:
    refused(send(to=to), BadFrame)
    refused({"type": "send", "body": "x"}, BadFrame)


def test_send_to_non_string_member_is_bad_frame() -> None:
    refused(send(to=["bob", 5]), BadFrame)


def test_send_to_empty_list_is_bad_recipient() -> None:
    error = refused(send(to=[]), BadRecipient)
    assert error.code is ErrorCode.BAD_RECIPIENT


def test_send_to_at_most_max_recipients() -> None:
    limits = Limits(max_recipients=3)
    assert isinstance(parse(send(to=["a", "b", "c"]), limits), SendFrame)
    error = refused(send(to=["a", "b", "c", "d"]), BadRecipient, limits)
    assert "4" in error.message
    assert "3" in error.message


def test_send_to_default_limit_is_100() -> None:
    assert isinstance(parse(send(to=[f"m{i}" for i in range(100)])), SendFrame)
    refused(send(to=[f"m{i}" for i in range(101)]), BadRecipient)


def test_send_to_duplicates_are_bad_recipient() -> None:
    error = refused(send(to=["bob", "carol", "bob"]), BadRecipient)
    assert "'bob'" in error.message
    assert "more than once" in error.message


@pytest.mark.parametrize("to", ["", "bob smith", "b\u00f6b", "a" * 129, ["ok", "not ok"]])
def test_send_to_invalid_mailbox_is_bad_recipient(to: Any) -> None:
    error = refused(send(to=to), BadRecipient)
    assert "[A-Za-z0-9._:@/-]" in error.message


def test_bad_recipient_message_truncates_the_id() -> None:
    long_id = "!" + "y" * 5000
    error = refused(send(to=long_id), BadRecipient)
    assert long_id not in error.message
    assert len(error.message) < 150


# --- send: body ----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [None, 5, ["x"], {"a": "b"}, True])
def test_send_body_must_be_a_string(body: Any) -> None:
    refused(send(body=body), BadFrame)
    refused({"type": "send", "to": "bob"}, BadFrame)


def test_send_empty_body_is_allowed() -> None:
    assert isinstance(parse(send(body="")), SendFrame)


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])  # 1, 2, 3, 4 bytes of UTF-8
def test_send_body_limit_counts_utf8_bytes(char: str) -> None:
    limits = Limits(max_body_bytes=1000)
    width = len(char.encode())
    fits = char * (1000 // width)
    assert isinstance(parse(send(body=fits), limits), SendFrame)
    over = fits + char
    error = refused(send(body=over), TooLarge, limits)
    assert error.code is ErrorCode.TOO_LARGE
    assert "1000" in error.message
    assert str(len(over.encode())) in error.message


def test_send_body_longer_than_limit_in_characters_is_too_large() -> None:
    error = refused(send(body="z" * 2001), TooLarge, Limits(max_body_bytes=2000))
    assert "2001" in error.message
    assert "2000" in error.message


def test_send_body_at_default_limit() -> None:
    assert isinstance(parse(send(body="b" * 65536)), SendFrame)
    refused(send(body="b" * 65537), TooLarge)


def test_error_messages_never_contain_the_body() -> None:
    secret = "TOPSECRET" * 10_000
    for obj, error in [
        (send(body=secret), TooLarge),
        (send(body=secret[:50], to=[]), BadRecipient),
        (send(body=secret[:50], ttl=10**9), TtlTooLong),
        (send(body=secret[:50], ttl="1h"), BadFrame),
    ]:
        assert "TOPSECRET" not in refused(obj, error).message


# --- send: ttl -----------------------------------------------------------------------------


def test_send_ttl_defaults_to_retention() -> None:
    frame = parse(send(), Limits(retention_s=3600))
    assert isinstance(frame, SendFrame)
    assert frame.ttl_s == 3600
    frame = parse(send(ttl=None), Limits(retention_s=3600))
    assert isinstance(frame, SendFrame)
    assert frame.ttl_s == 3600


@pytest.mark.parametrize("ttl", [1, 60, 604800])
def test_send_ttl_within_bounds(ttl: int) -> None:
    frame = parse(send(ttl=ttl))
    assert isinstance(frame, SendFrame)
    assert frame.ttl_s == ttl


def test_send_ttl_longer_than_retention_is_ttl_too_long() -> None:
    error = refused(send(ttl=900000), TtlTooLong)
    assert error.message == "ttl 900000 exceeds retention 604800 s"


@pytest.mark.parametrize("ttl", [0, -5])
def test_send_ttl_below_one_is_bad_frame(ttl: int) -> None:
    refused(send(ttl=ttl), BadFrame)


@pytest.mark.parametrize("ttl", [True, False, 60.0, 1.5, "60", [60], 1e30])
def test_send_ttl_must_be_an_integer(ttl: Any) -> None:
    refused(send(ttl=ttl), BadFrame)
