"""End to end, protocol.md's errors: unknown_type, bad_frame, the ref every error frame carries,
storage_unavailable while Redis is down, and internal; none of them closes the connection.

Every test talks to a real relay (`serve_relay` on port 0) over real
WebSockets, on the test's Redis and key prefix. Tests that must see raw frames
or close codes use a plain trio-websocket connection; the others use
`relay.client`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
from relay_fixtures import DEADLINE_S, RelayFactory, answer, raw_session, request

from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient
from relay.server import RunningRelay
from relay.store_redis import Keys, fingerprint

pytest_plugins = ["relay_fixtures"]


async def test_unknown_type(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for kind in ("subscribe", "deliver", "welcome", "accepted", "SEND", ""):
                error = await request(ws, {"type": kind, "ref": "u"})
                assert (error["type"], error["code"], error["ref"]) == (
                    "error",
                    "unknown_type",
                    "u",
                )


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"type": "send", "to": "bob", "body": "x"',  # truncated
        "[]",
        '"send"',
        "42",
        "null",
        '{"to": "bob", "body": "x"}',  # no type
        '{"type": 7, "to": "bob", "body": "x"}',
        '{"type": "send", "body": "x"}',  # no to
        '{"type": "send", "to": "bob"}',  # no body
        '{"type": "send", "to": 7, "body": "x"}',
        '{"type": "send", "to": ["bob", 7], "body": "x"}',
        '{"type": "send", "to": "bob", "body": 7}',
        '{"type": "send", "to": "bob", "body": "x", "ref": 7}',
        '{"type": "send", "to": "bob", "body": "x", "ref": ""}',
        '{"type": "send", "to": "bob", "body": "x", "ref": "' + "r" * 65 + '"}',
        '{"type": "ack"}',
        '{"type": "ack", "ids": []}',
        '{"type": "ack", "ids": "abc"}',
        '{"type": "ack", "ids": [7]}',
        '{"type": "auth"}',
    ],
)
async def test_bad_frame_not_json_not_object_missing_or_wrong_typed_field(
    relay: RunningRelay, text: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            await ws.send_message(text)
            error = await answer(ws)
            assert error["type"] == "error"
            assert error["code"] == "bad_frame"
            assert isinstance(error["message"], str) and error["message"]
            ok = await request(ws, {"type": "send", "ref": "next", "to": "bob", "body": "x"})
            assert ok["type"] == "accepted"


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"type": "send", "to": "bad id", "body": "x"}, "bad_recipient"),
    ({"type": "send", "to": "bob", "body": "x", "ttl": 10**9}, "ttl_too_long"),
    ({"type": "send", "to": "bob", "body": "x", "ttl": 0}, "bad_frame"),
    ({"type": "send", "to": "bob", "body": 5}, "bad_frame"),
    ({"type": "send", "body": "x"}, "bad_frame"),
    ({"type": "send", "to": "bob", "body": "x" * 70_000}, "too_large"),
    ({"type": "ack", "ids": "x"}, "bad_frame"),
    ({"type": "ack", "ids": ["not an id!"]}, "bad_frame"),
    ({"type": "nope"}, "unknown_type"),
]


async def test_every_error_frame_carries_the_request_ref_and_never_closes(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for n, (frame, code) in enumerate(BAD_REQUESTS):
                error = await request(ws, {**frame, "ref": f"e{n}"})
                assert error == {
                    "type": "error",
                    "ref": f"e{n}",
                    "code": code,
                    "message": error["message"],
                }, frame
                assert isinstance(error["message"], str) and error["message"]
                ok = await request(ws, {"type": "send", "ref": f"ok{n}", "to": "bob", "body": "x"})
                assert ok["type"] == "accepted"  # the error did not close the connection


@pytest.fixture
def private_redis(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the same kind as the shared one, on a TCP port, free to stop."""
    server = EmbeddedServer(binary=redis_server.binary, port=free_loopback_port())
    server.start()
    yield server
    server.stop()


async def _send_until_accepted(ws: Any, ref: str) -> dict[str, Any]:
    """Redis is back: poll with sends until one is accepted (the pump reconnects)."""
    while True:
        frame = await request(ws, {"type": "send", "ref": ref, "to": "bob", "body": "x"})
        if frame["type"] == "accepted":
            return frame
        assert frame["code"] == "storage_unavailable"
        await trio.sleep(0.1)


async def test_send_storage_unavailable_when_redis_is_down_connection_stays(
    make_relay: RelayFactory, private_redis: EmbeddedServer
) -> None:
    relay = await make_relay(redis_url=private_redis.url)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            assert (await request(ws, {"type": "send", "ref": "up", "to": "bob", "body": "x"}))[
                "type"
            ] == "accepted"
            private_redis.stop()
            for n in range(2):
                error = await request(
                    ws, {"type": "send", "ref": f"down{n}", "to": "bob", "body": "x"}
                )
                assert (error["type"], error["code"], error["ref"]) == (
                    "error",
                    "storage_unavailable",
                    f"down{n}",
                )
            restarted = EmbeddedServer(binary=private_redis.binary, port=private_redis.port)
            restarted.start()
            try:
                assert (await _send_until_accepted(ws, "back"))["ref"] == "back"
            finally:
                restarted.stop()


async def test_ack_storage_unavailable_error_carries_the_ref(
    make_relay: RelayFactory, private_redis: EmbeddedServer
) -> None:
    relay = await make_relay(redis_url=private_redis.url)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            private_redis.stop()
            error = await request(ws, {"type": "ack", "ids": ["abc"], "ref": "a-down"})
            assert (error["type"], error["code"]) == ("error", "storage_unavailable")
            assert error.get("ref") == "a-down"


def _poison_ref_record(redis_client: RedisClient, prefix: str) -> None:
    """An idempotency record the relay cannot parse: the only way found to reach `internal`.

    Nothing a client sends makes the relay fail internally, so this test corrupts
    Redis behind its back (the record layout is relay/store_redis.py's: it ends with
    the request's fingerprint, so the send script takes it for a retry).
    """
    record = f"garbage {fingerprint(['bob'], 'x', 60)}"
    redis_client.set(Keys.of(prefix, "bob").ref("alice", "poisoned"), record, px=60_000)


async def test_error_internal_is_answered_and_keeps_the_connection(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    _poison_ref_record(redis_client, prefix)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(
                ws, {"type": "send", "ref": "poisoned", "to": "bob", "body": "x", "ttl": 60}
            )
            assert (error["type"], error["code"]) == ("error", "internal")
            assert "garbage" not in error["message"]
            ok = await request(ws, {"type": "send", "ref": "fine", "to": "bob", "body": "x"})
            assert ok["type"] == "accepted"


async def test_error_internal_carries_the_request_ref(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    _poison_ref_record(redis_client, prefix)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(
                ws, {"type": "send", "ref": "poisoned", "to": "bob", "body": "x", "ttl": 60}
            )
    assert (error["type"], error["code"]) == ("error", "internal")
    assert error.get("ref") == "poisoned"
