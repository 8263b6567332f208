"""End to end, protocol.md's "Rate limits": backpressure rather than refusal.

A connection over its frame budget is not read until the budget refills: a client
flushing a thousand queued sends is slowed down and every send is accepted, while other
clients of the relay are served; acks of delivered messages cost nothing, so a draining
recipient is never held back; and a client's pipelined sends still reach Redis, and the
recipient, in the order it sent them. (The refusals, `rate_limited` and 1008, are in
test_ops_limits.py and test_e2e_ack_and_close.py.)
"""

from __future__ import annotations

from typing import Any

import orjson
import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    raw_session,
    recv,
    scrape,
    send_json,
    token,
    unique,
)
from test_e2e_violations import open_raw_session, text_frames
from test_websocket_engine import TEXT, frame

from relay.client import open_relay
from relay.embedded import free_loopback_port

pytest_plugins = ["relay_fixtures"]

FLUSH = 1000


async def test_a_flush_of_1000_sends_over_the_rate_is_slowed_not_refused_and_others_are_served(
    make_relay: RelayFactory,
) -> None:
    # 1000 sends against a burst of 200 and 500/s: held back for about 1.6 s, well within
    # the patience (10 bursts' worth: 4 s) after which a client counts as abusive.
    relay = await make_relay(rate_limit_per_s=500, rate_burst=200, ops_port=free_loopback_port())
    flooder, sink, alice, bob = (unique(n) for n in ("flooder", "sink", "alice", "bob"))
    refs = [f"f-{i}" for i in range(FLUSH)]
    answers: list[dict[str, Any]] = []
    bodies: list[str] = []

    async def flush() -> None:
        async with raw_session(relay.url, flooder) as (ws, _):

            async def send_every_one() -> None:  # as fast as the socket takes them
                for ref in refs:
                    await send_json(ws, {"type": "send", "ref": ref, "to": sink, "body": ref})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_every_one)
                while len(answers) < FLUSH:
                    answers.append(await recv(ws))

    async def other_pair() -> None:
        async with (
            open_relay(relay.url, token(alice)) as sender,
            open_relay(relay.url, token(bob)) as recipient,
        ):
            for i in range(20):
                await sender.send(bob, f"calm-{i}")
            while len(bodies) < 20:
                message = await recipient.receive()
                bodies.append(message.body)
                await recipient.ack([message.id])

    with trio.fail_after(3 * DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            nursery.start_soon(other_pair)
        metrics = await scrape(relay.ops_port)

    assert [a["type"] for a in answers] == ["accepted"] * FLUSH, {a.get("code") for a in answers}
    assert [a["ref"] for a in answers] == refs  # every answer, in request order
    assert bodies == [f"calm-{i}" for i in range(20)]
    assert metrics.value("relay_frames_delayed_total") > 0  # it was held back, not refused
    assert metrics.value("relay_requests_rejected_total", code="rate_limited") == 0
    with trio.fail_after(3 * DEADLINE_S):
        async with open_relay(relay.url, token(sink)) as client:
            got: list[str] = []
            while len(got) < FLUSH:
                message = await client.receive()
                got.append(message.body)
                await client.ack([message.id], wait=False)
    assert got == refs  # stored in the order they were sent


async def test_a_client_above_its_rate_that_waits_for_answers_is_slowed_never_closed(
    make_relay: RelayFactory,
) -> None:
    """Ten sends in flight at a time, each sent again as soon as it is answered, for three
    times the patience (10 bursts' worth: 1 s here): held back read after read, but its
    reads are small (it waits for answers), so it does not keep the relay's buffers full."""
    relay = await make_relay(rate_limit_per_s=50, rate_burst=5, ops_port=free_loopback_port())
    bob = unique("bob")
    accepted: list[str] = []
    async with open_relay(relay.url, token(unique("alice"))) as alice:
        end = trio.current_time() + 3.0

        async def send_steadily(n: int) -> None:
            while trio.current_time() < end:
                answer = await alice.send(bob, f"s{n}")
                accepted.append(answer["ids"][bob])

        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(send_steadily, n)
            assert (await alice.send(bob, "still open"))["ids"][bob]
        metrics = await scrape(relay.ops_port)
    assert metrics.value("relay_frames_delayed_total") > 0  # it was held back
    assert metrics.value("relay_connections_closed_total", code="1008") == 0
    assert len(set(accepted)) == len(accepted) > 50


async def test_acks_of_delivered_messages_do_not_count_against_the_rate(
    make_relay: RelayFactory,
) -> None:
    """A recipient at one frame a second (burst 5) drains 40 messages with one ack, and one
    answer, each: its acks are free, or this would take 35 s."""
    filler = await make_relay()
    limited = await make_relay(rate_limit_per_s=1, rate_burst=5)
    bob = unique("bob")
    with trio.fail_after(DEADLINE_S):
        async with open_relay(filler.url, token(unique("alice"))) as sender:
            for i in range(40):
                await sender.send(bob, f"m-{i}")
        async with open_relay(limited.url, token(bob)) as recipient:
            for i in range(40):
                message = await recipient.receive()
                assert message.body == f"m-{i}"
                assert await recipient.ack([message.id]) == 1
            # Acks of nothing delivered do count: the budget (5) is still whole.
            for _ in range(5):
                assert await recipient.ack(["0-not-delivered"]) == 0


async def test_pipelined_sends_of_one_connection_arrive_in_the_order_sent(
    make_relay: RelayFactory,
) -> None:
    """150 sends in one write (so in one read: one batch) go to the store together, yet
    are answered, stored and delivered in the order they were sent."""
    relay = await make_relay()
    sender, recipient = unique("sender"), unique("recipient")
    count = 150
    frames = [
        orjson.dumps({"type": "send", "ref": f"p-{i}", "to": recipient, "body": f"{i:03d}"})
        for i in range(count)
    ]
    with trio.fail_after(DEADLINE_S):
        stream, ws = await open_raw_session(relay.port, sender)
        async with stream:
            await stream.send_all(b"".join(frame(TEXT, f) for f in [b"", *frames]))
            answers = await text_frames(stream, ws, count + 2)  # welcome, bad_frame, sends
        assert answers[0]["type"] == "welcome"
        assert answers[1]["code"] == "bad_frame"  # the empty frame, answered first
        assert [a["ref"] for a in answers[2:]] == [f"p-{i}" for i in range(count)]
        async with open_relay(relay.url, token(recipient)) as client:
            got = [(await client.receive()).body for _ in range(count)]
    assert got == [f"{i:03d}" for i in range(count)]


async def test_a_queue_flushed_at_once_below_one_frame_a_second_is_refused_not_closed(
    make_relay: RelayFactory,
) -> None:
    """At 0.5/s (burst 5) the frames over the burst would wait more than a second: they
    are refused. 30 sends in one write are one strike, not 25 (the client sent them
    before it could see an answer), so the connection stays open and, once the budget
    has refilled, a send is accepted on it."""
    relay = await make_relay(rate_limit_per_s=0.5, rate_burst=5, ops_port=free_loopback_port())
    sender, recipient = unique("sender"), unique("recipient")
    count = 30
    frames = [
        orjson.dumps({"type": "send", "ref": f"q-{i}", "to": recipient, "body": f"{i}"})
        for i in range(count)
    ]
    later = orjson.dumps({"type": "send", "ref": "later", "to": recipient, "body": "later"})
    with trio.fail_after(DEADLINE_S):
        stream, ws = await open_raw_session(relay.port, sender)
        async with stream:
            await stream.send_all(b"".join(frame(TEXT, f) for f in frames))
            answers = await text_frames(stream, ws, count + 1)  # welcome, sends
            await trio.sleep(2.0)  # the time one frame's budget takes to refill
            await stream.send_all(frame(TEXT, later))
            (answer,) = await text_frames(stream, ws, 1)
        metrics = await scrape(relay.ops_port)
    assert answers[0]["type"] == "welcome"
    assert [a["ref"] for a in answers[1:]] == [f"q-{i}" for i in range(count)]
    assert [a["type"] for a in answers[1:6]] == ["accepted"] * 5
    assert {a.get("code") for a in answers[6:]} == {"rate_limited"}
    assert answer["type"] == "accepted" and answer["ref"] == "later"
    assert metrics.value("relay_connections_closed_total", code="1008") == 0
