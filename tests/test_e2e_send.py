"""End to end, protocol.md's send frame: the accepted answer, several recipients, ttl,
body and frame size limits, bad recipients, idempotent refs, and full mailboxes.

Every test talks to a real relay (`serve_relay` on port 0) over real
WebSockets, on the test's Redis and key prefix. Tests that must see raw frames
or close codes use a plain trio-websocket connection; the others use
`relay.client`.
"""

from __future__ import annotations

import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    close_code,
    keys_under,
    poll_until,
    raw_session,
    receive_until,
    request,
    send_json,
    token,
    wall_ms,
)

from relay.client import RelayClientError, open_relay
from relay.codes import CloseCode
from relay.redis.admin import RedisClient
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]


# -- send -------------------------------------------------------------------------


async def test_send_accepted_has_ref_ids_per_recipient_and_expires_at(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            before = wall_ms()
            accepted = await request(
                ws, {"type": "send", "ref": "c-17", "to": ["bob", "carol"], "body": "hi", "ttl": 60}
            )
            after = wall_ms()
    assert set(accepted) == {"type", "ref", "ids", "expires_at"}
    assert accepted["type"] == "accepted"
    assert accepted["ref"] == "c-17"
    assert set(accepted["ids"]) == {"bob", "carol"}
    assert all(isinstance(i, str) and i for i in accepted["ids"].values())
    assert accepted["ids"]["bob"] != accepted["ids"]["carol"]
    assert before + 60_000 <= accepted["expires_at"] <= after + 60_000


async def test_send_to_list_each_recipient_gets_its_own_copy(relay: RunningRelay) -> None:
    recipients = ["bob", "carol", "dave"]
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            accepted = await alice.send(recipients, "to all three")
        for mailbox in recipients:
            async with open_relay(relay.url, token(mailbox)) as client:
                message = await client.receive()
                assert message.body == "to all three"
                assert message.sender == "alice"
                assert message.id == accepted["ids"][mailbox]
                assert await client.ack([message.id]) == 1


async def test_send_ttl_defaults_to_retention(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay(retention_s=900)
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            before = wall_ms()
            accepted = await alice.send("bob", "no ttl given")
            after = wall_ms()
    assert before + 900_000 <= accepted["expires_at"] <= after + 900_000
    pttl = redis_client.pttl(f"{prefix}{{bob}}:msg:{accepted['ids']['bob']}")
    assert 890_000 < pttl <= 900_000


async def test_send_ttl_over_retention_is_ttl_too_long_naming_both_numbers(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(retention_s=3600)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(
                ws, {"type": "send", "ref": "t1", "to": "bob", "body": "x", "ttl": 3601}
            )
            assert error["type"] == "error"
            assert error["code"] == "ttl_too_long"
            assert error["ref"] == "t1"
            assert "3601" in error["message"] and "3600" in error["message"]
            ok = await request(
                ws, {"type": "send", "ref": "t2", "to": "bob", "body": "x", "ttl": 3600}
            )
            assert ok["type"] == "accepted"


@pytest.mark.parametrize("ttl", [0, -5, "60", 1.5, True, [60]])
async def test_send_ttl_below_1_or_not_an_integer_is_bad_frame(
    relay: RunningRelay, ttl: object
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(
                ws, {"type": "send", "ref": "t0", "to": "bob", "body": "x", "ttl": ttl}
            )
    assert (error["type"], error["code"], error["ref"]) == ("error", "bad_frame", "t0")


async def test_send_body_over_max_body_bytes_is_too_large_not_a_close(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(max_body_bytes=1024)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for body in ("x" * 1025, "é" * 513, '"' * 1025):  # bytes of UTF-8, not characters
                error = await request(ws, {"type": "send", "ref": "big", "to": "bob", "body": body})
                assert (error["type"], error["code"], error["ref"]) == ("error", "too_large", "big")
            for body in ("x" * 1024, "é" * 512, '"' * 1024):
                ok = await request(ws, {"type": "send", "ref": None, "to": "bob", "body": body})
                assert ok["type"] == "accepted"


async def test_send_frame_over_frame_limit_closes_1009(make_relay: RelayFactory) -> None:
    relay = await make_relay(max_body_bytes=1024)
    limit = relay.services.config.frame_limit_bytes
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            await send_json(ws, {"type": "send", "to": "bob", "body": "x" * (limit + 1)})
            assert await close_code(ws) == CloseCode.TOO_BIG


@pytest.mark.parametrize(
    "to",
    [
        "bad id with spaces",
        "x" * 129,
        "",
        "bob}",
        "émile",
        ["bob", "not ok!"],
        [],
        ["r0", "r1", "r2", "r3"],  # max_recipients is 3 here
        ["bob", "carol", "bob"],
    ],
    ids=["space", "too-long", "empty", "brace", "non-ascii", "one-bad", "none", "too-many", "dup"],
)
async def test_send_bad_recipient(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str, to: object
) -> None:
    relay = await make_relay(max_recipients=3)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(ws, {"type": "send", "ref": "br", "to": to, "body": "x"})
            assert (error["type"], error["code"], error["ref"]) == ("error", "bad_recipient", "br")
            ok = await request(
                ws, {"type": "send", "ref": "ok", "to": ["r0", "r1", "r2"], "body": "x"}
            )
            assert ok["type"] == "accepted"
    assert not any("{bob}" in key for key in keys_under(redis_client, prefix))  # nothing stored


async def test_send_same_ref_is_idempotent_one_copy_same_answer(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    frame = {"type": "send", "ref": "once", "to": ["bob", "carol"], "body": "only once", "ttl": 60}
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            first = await request(ws, frame)
            second = await request(ws, frame)
            await request(ws, {"type": "send", "ref": "end", "to": ["bob", "carol"], "body": "end"})
        assert first["type"] == "accepted" and "duplicate" not in first
        assert second == {**first, "duplicate": True}
        async with open_relay(relay.url, token("bob")) as bob:
            got = await receive_until(bob, "end")
    assert [m.body for m in got] == ["only once", "end"]
    assert got[0].id == first["ids"]["bob"]
    assert len([k for k in keys_under(redis_client, prefix) if "{carol}:msg:" in k]) == 2


async def test_send_same_ref_after_the_copy_was_acked_stores_nothing_new(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            first = await alice.send("bob", "once", ref="retry")
            async with open_relay(relay.url, token("bob")) as bob:
                message = await bob.receive()
                assert await bob.ack([message.id]) == 1
                late = await alice.send("bob", "once", ref="retry")  # a late retry
                assert late == {**first, "duplicate": True}
                await alice.send("bob", "end")
                assert [m.body for m in await receive_until(bob, "end")] == ["end"]


async def test_send_ref_is_idempotent_only_within_the_first_copys_ttl(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            first = await alice.send("bob", "short", ref="brief", ttl_s=1)
            key = f"{prefix}{{bob}}:msg:{first['ids']['bob']}"
            await poll_until(lambda: not redis_client.exists(key))  # Redis runs the ttl out
            second = await alice.send("bob", "short", ref="brief", ttl_s=1)
    assert second["ids"]["bob"] != first["ids"]["bob"]
    assert second["expires_at"] > first["expires_at"]


async def test_send_same_ref_from_another_sender_is_another_message(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (alice, _):
            from_alice = await request(
                alice, {"type": "send", "ref": "r", "to": "bob", "body": "a"}
            )
        async with raw_session(relay.url, "carol") as (carol, _):
            from_carol = await request(
                carol, {"type": "send", "ref": "r", "to": "bob", "body": "c"}
            )
        assert from_alice["ids"]["bob"] != from_carol["ids"]["bob"]
        async with open_relay(relay.url, token("bob")) as bob:
            got = await receive_until(bob, "c")
    assert [(m.sender, m.body) for m in got] == [("alice", "a"), ("carol", "c")]


async def test_send_mailbox_full(make_relay: RelayFactory) -> None:
    relay = await make_relay(max_mailbox_messages=2)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for n in range(2):
                ok = await request(ws, {"type": "send", "ref": f"m{n}", "to": "bob", "body": "x"})
                assert ok["type"] == "accepted"
            error = await request(ws, {"type": "send", "ref": "m2", "to": "bob", "body": "x"})
            assert (error["type"], error["code"], error["ref"]) == ("error", "mailbox_full", "m2")
            ok = await request(ws, {"type": "send", "ref": "m3", "to": "carol", "body": "x"})
            assert ok["type"] == "accepted"


async def test_send_mailbox_full_by_bytes(make_relay: RelayFactory) -> None:
    relay = await make_relay(max_mailbox_bytes=1500)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            ok = await request(ws, {"type": "send", "ref": "b0", "to": "bob", "body": "x" * 600})
            assert ok["type"] == "accepted"
            error = await request(
                ws, {"type": "send", "ref": "b1", "to": "bob", "body": "x" * 1000}
            )
            assert (error["type"], error["code"], error["ref"]) == ("error", "mailbox_full", "b1")
            ok = await request(ws, {"type": "send", "ref": "b2", "to": "bob", "body": "x" * 100})
            assert ok["type"] == "accepted"


async def test_send_all_or_nothing_when_one_recipient_mailbox_is_full(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay(max_mailbox_messages=2)
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            await alice.send("carol", "c1")
            await alice.send("carol", "c2")
            for recipients in (["bob", "carol"], ["carol", "bob"]):
                with pytest.raises(RelayClientError) as refused:
                    await alice.send(recipients, "all or nothing", ref="multi")
                assert refused.value.code == "mailbox_full"
            assert not any("{bob}" in key for key in keys_under(redis_client, prefix))
            await alice.send("bob", "marker")
            async with open_relay(relay.url, token("bob")) as bob:
                got = await bob.receive()
                assert got.body == "marker"  # not "all or nothing"
                await bob.ack([got.id])
            # make room at carol's: the retry with the same ref stores one copy each
            async with open_relay(relay.url, token("carol")) as carol:
                first, second = await carol.receive(), await carol.receive()
                assert await carol.ack([first.id, second.id]) == 2
            accepted = await alice.send(["bob", "carol"], "all or nothing", ref="multi")
            again = await alice.send(["bob", "carol"], "all or nothing", ref="multi")
            assert again == {**accepted, "duplicate": True}
            await alice.send(["bob", "carol"], "end")
        for mailbox in ("bob", "carol"):
            async with open_relay(relay.url, token(mailbox)) as client:
                got_all = await receive_until(client, "end")
                assert [m.body for m in got_all] == ["all or nothing", "end"]
