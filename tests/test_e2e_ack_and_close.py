"""End to end, protocol.md's ack frame and close codes: acked counts, idempotent acks, acks
without ref, 1000 on a client close, 1001 on shutdown, and the rate limit (rate_limited,
then 1008).

Every test talks to a real relay (`serve_relay` on port 0) over real
WebSockets, on the test's Redis and key prefix. Tests that must see raw frames
or close codes use a plain trio-websocket connection; the others use
`relay.client`.
"""

from __future__ import annotations

import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    Scrape,
    close_code,
    poll_until,
    raw_session,
    recv,
    request,
    scrape,
    send_json,
    token,
)
from trio_websocket import ConnectionClosed

from relay.client import open_relay
from relay.codes import CloseCode
from relay.embedded import free_loopback_port
from relay.redis.admin import RedisClient
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]


CLOSED = "relay_connections_closed_total"


def _closed_total(metrics: Scrape) -> float:
    return sum(v for (name, _), v in metrics.samples.items() if name == CLOSED)


# -- ack --------------------------------------------------------------------------


async def test_ack_answers_acked_with_the_count_of_deleted_messages(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(3):
                await alice.send("bob", f"m{n}")
        async with raw_session(relay.url, "bob") as (ws, _):
            ids: list[str] = []
            while len(ids) < 3:
                frame = await recv(ws)
                assert frame["type"] == "deliver"
                ids += [m["id"] for m in frame["messages"]]
            acked = await request(ws, {"type": "ack", "ids": ids[:2], "ref": "a-3"})
            assert acked == {"type": "acked", "ref": "a-3", "count": 2}
            acked = await request(ws, {"type": "ack", "ids": ids, "ref": "a-4"})
            assert acked == {"type": "acked", "ref": "a-4", "count": 1}


async def test_ack_is_idempotent_second_ack_and_unknown_ids_count_0(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            await alice.send("bob", "once")
        async with open_relay(relay.url, token("bob")) as bob:
            message = await bob.receive()
            assert await bob.ack([message.id, message.id]) == 1
            assert await bob.ack([message.id]) == 0
            assert await bob.ack(["unknown-id", "18c0ffee000-AAAAAAAA"]) == 0


async def test_ack_without_ref_gets_no_answer_but_deletes(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            accepted = await alice.send("bob", "ack me silently")
        key = f"{prefix}{{bob}}:msg:{accepted['ids']['bob']}"
        assert redis_client.exists(key) == 1
        async with raw_session(relay.url, "bob") as (ws, _):
            deliver = await recv(ws)
            assert deliver["type"] == "deliver"
            await send_json(ws, {"type": "ack", "ids": [accepted["ids"]["bob"]]})
            # frames are handled in order: the answer to this one comes after the first was done
            probe = await request(ws, {"type": "ack", "ids": ["probe"], "ref": "probe"})
            assert probe == {"type": "acked", "ref": "probe", "count": 0}
            assert redis_client.exists(key) == 0


async def test_ack_deletes_only_messages_of_the_sessions_own_mailbox(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            accepted = await alice.send("bob", "for bob")
            assert await alice.ack([accepted["ids"]["bob"]]) == 0
        assert redis_client.exists(f"{prefix}{{bob}}:msg:{accepted['ids']['bob']}") == 1
        async with open_relay(relay.url, token("bob")) as bob:
            assert (await bob.receive()).id == accepted["ids"]["bob"]


# -- close codes --------------------------------------------------------------------


async def test_close_1000_normal_when_the_client_closes(make_relay: RelayFactory) -> None:
    relay = await make_relay(ops_port=free_loopback_port())
    before = await scrape(relay.ops_port)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            await ws.aclose(CloseCode.NORMAL)

        # The relay's own count of the close, not the code trio-websocket records for
        # the close it sent itself.
        async def counted() -> bool:
            return _closed_total(await scrape(relay.ops_port)) != _closed_total(before)

        await poll_until(counted, 0.02)
        after = await scrape(relay.ops_port)
        assert after.value(CLOSED, code="1000") == before.value(CLOSED, code="1000") + 1
        assert _closed_total(after) == _closed_total(before) + 1
        async with open_relay(relay.url, token("alice")) as alice:  # no 4409 for anyone
            await alice.send("alice", "again")
            assert (await alice.receive()).body == "again"


async def test_close_1001_on_server_shutdown_messages_stay_queued(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay()
    with trio.fail_after(DEADLINE_S):
        async with (
            raw_session(relay.url, "alice") as (alice, _),
            raw_session(relay.url, "bob") as (bob, _),
        ):
            accepted = await request(
                alice, {"type": "send", "ref": "kept", "to": "carol", "body": "x"}
            )
            relay.shutdown()
            assert await close_code(alice) == CloseCode.GOING_AWAY
            assert await close_code(bob) == CloseCode.GOING_AWAY
    assert redis_client.exists(f"{prefix}{{carol}}:msg:{accepted['ids']['carol']}") == 1
    second = await make_relay()
    with trio.fail_after(DEADLINE_S):
        async with open_relay(second.url, token("carol")) as carol:
            assert (await carol.receive()).id == accepted["ids"]["carol"]


async def test_close_1008_policy_when_a_client_keeps_sending_over_its_rate_limit(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(rate_limit_per_s=0.01, rate_burst=2)
    codes: list[str] = []
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            try:
                for n in range(20):
                    frame = await request(
                        ws, {"type": "send", "ref": f"r{n}", "to": "bob", "body": "x"}
                    )
                    codes.append(frame.get("code", frame["type"]))
            except ConnectionClosed as closed:
                assert closed.reason is not None
                assert closed.reason.code == CloseCode.POLICY
            else:
                raise AssertionError(f"never closed: {codes}")
    assert codes[:2] == ["accepted", "accepted"]
    assert set(codes[2:]) == {"rate_limited"}


async def test_send_over_the_rate_limit_is_rate_limited_with_ref(make_relay: RelayFactory) -> None:
    relay = await make_relay(rate_limit_per_s=0.01, rate_burst=3)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for n in range(3):
                ok = await request(ws, {"type": "send", "ref": f"r{n}", "to": "bob", "body": "x"})
                assert ok["type"] == "accepted"
            error = await request(ws, {"type": "send", "ref": "over", "to": "bob", "body": "x"})
            assert (error["type"], error["code"], error["ref"]) == ("error", "rate_limited", "over")
            error = await request(ws, {"type": "ack", "ids": ["x"], "ref": "ack-over"})
            assert (error["type"], error["code"], error["ref"]) == (
                "error",
                "rate_limited",
                "ack-over",
            )
