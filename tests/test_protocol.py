"""Sans-IO frames: every parse rule of protocol.md, the encoders, and a fuzz of parse_frame."""

import json
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.codes import ErrorCode
from relay.errors import (
    BadFrame,
    BadRecipient,
    ClientError,
    TooLarge,
    TtlTooLong,
    UnknownType,
)
from relay.protocol import (
    AckFrame,
    AuthFrame,
    Limits,
    SendFrame,
    encode_accepted,
    encode_acked,
    encode_deliver,
    encode_error,
    encode_welcome,
    parse_frame,
)

LIMITS = Limits()


def parse(obj: Any, limits: Limits = LIMITS) -> object:
    return parse_frame(json.dumps(obj), limits)


def refused(obj: Any, error: type[ClientError], limits: Limits = LIMITS) -> ClientError:
    """The error `parse_frame` raises for `obj`, which must be exactly of type `error`."""
    with pytest.raises(ClientError) as info:
        parse(obj, limits)
    assert type(info.value) is error, info.value
    return info.value


def send(**fields: Any) -> dict[str, Any]:
    return {"type": "send", "to": "bob", "body": "hello", **fields}


# --- framing -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{", "not json", "{'type': 'send'}", "[1,", "NaN"])
def test_not_json_is_bad_frame(text: str) -> None:
    with pytest.raises(BadFrame):
        parse_frame(text, LIMITS)


@pytest.mark.parametrize("obj", [[], [{"type": "ack"}], "send", 1, None, True])
def test_not_an_object_is_bad_frame(obj: Any) -> None:
    refused(obj, BadFrame)


@pytest.mark.parametrize("obj", [{}, {"type": None}, {"type": 1}, {"type": ["send"]}])
def test_type_missing_or_not_a_string_is_bad_frame(obj: Any) -> None:
    refused(obj, BadFrame)


def test_unknown_type_names_the_type() -> None:
    error = refused({"type": "subscribe"}, UnknownType)
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert "'subscribe'" in error.message


def test_unknown_type_message_is_truncated() -> None:
    error = refused({"type": "x" * 10_000}, UnknownType)
    assert len(error.message) < 100


def test_server_frame_types_are_unknown_from_a_client() -> None:
    for kind in ("welcome", "deliver", "accepted", "acked", "error"):
        refused({"type": kind}, UnknownType)


def test_unknown_fields_are_ignored() -> None:
    frame = parse(send(future_field={"x": 1}, priority=3))
    assert frame == SendFrame(to=("bob",), body="hello", ttl_s=604800, ref=None)


# --- ref -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({"ref": "r1"}, BadFrame),
        ({"type": 5, "ref": "r1"}, BadFrame),
        ({"type": "nope", "ref": "r1"}, UnknownType),
        (send(ref="r1", to=[]), BadRecipient),
        (send(ref="r1", body=None), BadFrame),
        (send(ref="r1", body="x" * 70_000), TooLarge),
        (send(ref="r1", ttl=10**9), TtlTooLong),
        (send(ref="r1", ttl=0), BadFrame),
        ({"type": "ack", "ref": "r1", "ids": []}, BadFrame),
    ],
)
def test_errors_carry_the_ref(obj: dict[str, Any], error: type[ClientError]) -> None:
    assert refused(obj, error).ref == "r1"


@pytest.mark.parametrize("ref", ["", "r" * 65, "é" * 33, 17, ["r"], {"r": 1}, True])
def test_malformed_ref_is_bad_frame_and_not_echoed(ref: Any) -> None:
    error = refused(send(ref=ref), BadFrame)
    assert error.ref is None
    error = refused({"type": "ack", "ids": ["a"], "ref": ref}, BadFrame)
    assert error.ref is None


def test_ref_of_64_bytes_is_accepted() -> None:
    frame = parse(send(ref="é" * 32))
    assert isinstance(frame, SendFrame)
    assert frame.ref == "é" * 32


def test_null_ref_counts_as_absent() -> None:
    frame = parse(send(ref=None))
    assert isinstance(frame, SendFrame)
    assert frame.ref is None


# --- auth ----------------------------------------------------------------------------------


def test_auth_frame() -> None:
    assert parse({"type": "auth", "token": "abc.def.ghi"}) == AuthFrame("abc.def.ghi")


@pytest.mark.parametrize("token", [None, "", 5, ["t"]])
def test_auth_needs_a_non_empty_string_token(token: Any) -> None:
    refused({"type": "auth", "token": token}, BadFrame)
    refused({"type": "auth"}, BadFrame)


def test_frame_reprs_hide_tokens_and_bodies() -> None:
    assert "s3cret" not in repr(AuthFrame("s3cret"))
    assert "private words" not in repr(
        SendFrame(to=("bob",), body="private words", ttl_s=1, ref=None)
    )


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


# --- ack -----------------------------------------------------------------------------------


def test_ack_frame() -> None:
    frame = parse({"type": "ack", "ids": ["01HX-a_b", "z" * 64], "ref": "a-3"})
    assert frame == AckFrame(ids=("01HX-a_b", "z" * 64), ref="a-3")


def test_ack_without_ref() -> None:
    assert parse({"type": "ack", "ids": ["m1"]}) == AckFrame(ids=("m1",), ref=None)


@pytest.mark.parametrize("ids", [None, [], "m1", {"m1": 1}, 5])
def test_ack_ids_must_be_a_non_empty_list(ids: Any) -> None:
    refused({"type": "ack", "ids": ids}, BadFrame)
    refused({"type": "ack"}, BadFrame)


@pytest.mark.parametrize("bad", ["", "z" * 65, "a b", "a.b", "a/b", "é", "m1\n", 5, None])
def test_ack_ids_must_match_the_id_charset(bad: Any) -> None:
    refused({"type": "ack", "ids": ["good", bad]}, BadFrame)


def test_ack_at_most_max_ack_ids() -> None:
    limits = Limits(max_ack_ids=2)
    assert isinstance(parse({"type": "ack", "ids": ["a", "b"]}, limits), AckFrame)
    error = refused({"type": "ack", "ids": ["a", "b", "c"]}, BadFrame, limits)
    assert "2" in error.message


def test_limits_must_be_positive() -> None:
    assert Limits() == Limits(
        max_body_bytes=65536, max_recipients=100, retention_s=604800, max_ack_ids=1024
    )
    for field in attrs.fields(Limits):
        with pytest.raises(ValueError):
            Limits(**{field.name: 0})


# --- fuzz ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
field_values = (
    json_values
    | st.sampled_from(["bob", "", "a" * 129, "m1", "r" * 65])
    | st.lists(st.sampled_from(["bob", "carol", "bob", "", "!", 3]), max_size=4)
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["send", "ack", "auth", "other"])},
    optional={name: field_values for name in ("to", "body", "ttl", "ref", "ids", "token")},
)
small_limits = st.builds(
    Limits,
    max_body_bytes=st.integers(1, 100),
    max_recipients=st.integers(1, 3),
    retention_s=st.integers(1, 10**6),
    max_ack_ids=st.integers(1, 3),
)


def parses_or_refuses(text: str, limits: Limits) -> None:
    try:
        frame = parse_frame(text, limits)
    except ClientError as error:
        assert isinstance(error.message, str)
        assert error.ref is None or isinstance(error.ref, str)
    else:
        assert isinstance(frame, AuthFrame | SendFrame | AckFrame)


@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    parses_or_refuses(text, LIMITS)


@given(json_values, st.booleans())
def test_fuzz_arbitrary_json(value: Any, ascii_only: bool) -> None:
    parses_or_refuses(json.dumps(value, ensure_ascii=ascii_only), LIMITS)


@given(frame_like, small_limits)
def test_fuzz_frame_like_objects(obj: dict[str, Any], limits: Limits) -> None:
    parses_or_refuses(json.dumps(obj), limits)


# --- encoders ------------------------------------------------------------------------------


def test_encode_welcome() -> None:
    text = encode_welcome("bob", "s-1", 604800, 65536, 256, 1_700_000_000_000, 3)
    assert orjson.loads(text) == {
        "type": "welcome",
        "mailbox": "bob",
        "session": "s-1",
        "retention_s": 604800,
        "max_body_bytes": 65536,
        "max_inflight": 256,
        "server_time": 1_700_000_000_000,
        "expired": 3,
    }
    assert " " not in text


def test_encode_accepted() -> None:
    text = encode_accepted("c-17", {"bob": "m1", "carol": "m2"}, 1_700_000_003_600)
    assert orjson.loads(text) == {
        "type": "accepted",
        "ref": "c-17",
        "ids": {"bob": "m1", "carol": "m2"},
        "expires_at": 1_700_000_003_600,
    }


def test_encode_accepted_without_ref_omits_it() -> None:
    assert orjson.loads(encode_accepted(None, {"bob": "m1"}, 5)) == {
        "type": "accepted",
        "ids": {"bob": "m1"},
        "expires_at": 5,
    }


def test_encode_acked() -> None:
    assert orjson.loads(encode_acked("a-3", 2)) == {"type": "acked", "ref": "a-3", "count": 2}


def test_encode_error() -> None:
    text = encode_error(ErrorCode.TTL_TOO_LONG, "ttl 900000 exceeds retention 604800 s", "c-17")
    assert orjson.loads(text) == {
        "type": "error",
        "ref": "c-17",
        "code": "ttl_too_long",
        "message": "ttl 900000 exceeds retention 604800 s",
    }
    assert orjson.loads(encode_error(ErrorCode.INTERNAL, "oops", None)) == {
        "type": "error",
        "code": "internal",
        "message": "oops",
    }


def test_encode_error_from_a_raised_client_error() -> None:
    error = refused(send(ref="c-9", to="bad id"), BadRecipient)
    decoded = orjson.loads(encode_error(error.code, error.message, error.ref))
    assert decoded["code"] == "bad_recipient"
    assert decoded["ref"] == "c-9"


def test_encode_deliver_joins_envelopes() -> None:
    envelopes = [
        {
            "id": "m1",
            "from": "alice",
            "body": 'he said "hi" \u00e9\n',
            "sent_at": 1,
            "expires_at": 2,
        },
        {"id": "m2", "from": "carol", "body": "", "sent_at": 3, "expires_at": 4},
    ]
    text = encode_deliver([orjson.dumps(e).decode() for e in envelopes])
    assert orjson.loads(text) == {"type": "deliver", "messages": envelopes}


def test_encode_deliver_of_one_and_of_none() -> None:
    one = '{"id":"m1","from":"a","body":"x","sent_at":1,"expires_at":2}'
    assert orjson.loads(encode_deliver([one]))["messages"] == [orjson.loads(one)]
    assert orjson.loads(encode_deliver([])) == {"type": "deliver", "messages": []}


@given(st.text(), st.text(), st.integers(0, 2**53), st.integers(0, 2**31))
def test_fuzz_encoders_round_trip(ref: str, text: str, ms: int, count: int) -> None:
    assert orjson.loads(encode_acked(ref, count)) == {"type": "acked", "ref": ref, "count": count}
    assert orjson.loads(encode_accepted(ref, {text: ref}, ms))["ids"] == {text: ref}
    assert orjson.loads(encode_error(ErrorCode.BAD_FRAME, text, ref))["message"] == text
