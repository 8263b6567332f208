"""Sans-IO frames: the parse rules of protocol.md for framing, ref, auth and ack frames, the
limits, and a fuzz of parse_frame. The send frame is in test_protocol_send.py, the encoders
in test_protocol_encoders.py.
"""

import json
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_helpers import LIMITS, parse, refused, send

from relay.codes import ErrorCode
from relay.errors import BadFrame, BadRecipient, ClientError, TooLarge, TtlTooLong, UnknownType
from relay.protocol import AckFrame, AuthFrame, Limits, SendFrame, parse_frame

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
