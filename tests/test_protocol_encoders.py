"""Sans-IO frames: the encoders of the server's frames (welcome, accepted, acked, error,
deliver), and a fuzz of their round trip.
"""

import orjson
from hypothesis import given
from hypothesis import strategies as st
from protocol_helpers import refused, send

from relay.codes import ErrorCode
from relay.errors import BadRecipient
from relay.protocol import (
    encode_accepted,
    encode_acked,
    encode_deliver,
    encode_delivers,
    encode_error,
    encode_welcome,
)

# --- encoders ------------------------------------------------------------------------------


def test_encode_welcome() -> None:
    text = encode_welcome("bob", "s-1", 604800, 65536, 1048576, 256, 1_700_000_000_000, 3, "e-1")
    assert orjson.loads(text) == {
        "type": "welcome",
        "mailbox": "bob",
        "session": "s-1",
        "retention_s": 604800,
        "max_body_bytes": 65536,
        "max_frame_bytes": 1048576,
        "max_inflight": 256,
        "server_time": 1_700_000_000_000,
        "expired": 3,
        "epoch": "e-1",
    }
    assert " " not in text


def test_encode_delivers_splits_by_utf8_bytes() -> None:
    envelopes = [
        '{"id":"a","body":"' + "é" * 40 + '"}',
        '{"id":"b"}',
        '{"id":"c","body":"' + "x" * 300 + '"}',
    ]
    frames = encode_delivers(envelopes, 200)
    assert len(frames[0].encode()) <= 200
    assert [m for f in frames for m in orjson.loads(f)["messages"]] == [
        orjson.loads(e) for e in envelopes
    ]
    assert len(frames) == 2 and len(orjson.loads(frames[1])["messages"]) == 1  # c travels alone
    assert encode_delivers(envelopes[:2], 1000) == [encode_deliver(envelopes[:2])]


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
