"""Faults injected into real servers under a real relay: a stalled Redis (SIGSTOP), a
full Redis (maxmemory, noeviction), a stopped Redis, and a backlog larger than a
client's frame limit."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    SUBPROTOCOL,
    close_code,
    raw_session,
    raw_ws,
    recv,
    relay_config,
    request,
    send_json,
    serving,
    token,
    unique,
)
from test_e2e_violations import open_raw_session, text_frames
from trio_websocket import open_websocket_url
from wsproto.events import TextMessage

from relay.codes import CloseCode
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient, connect
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]

REDIS_TIMEOUT_S = 0.5


@pytest.fixture
def own_server(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the same kind as `redis_server`, free to stop and fill."""
    server = EmbeddedServer(binary=redis_server.binary, port=free_loopback_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_client(own_server: EmbeddedServer) -> Iterator[RedisClient]:
    client = connect(own_server.url)
    yield client
    client.close()


def url_of(relay: RunningRelay) -> str:
    return f"ws://127.0.0.1:{relay.port}/v1"


def bodies_stored(client: RedisClient, prefix: str, mailbox: str) -> list[str]:
    keys = list(client.scan_iter(match=f"{prefix}{{{mailbox}}}:msg:*"))
    # a stored value is "<tag of its ref record>\n<envelope>" (relay/store_redis.py)
    values = [str(v).partition("\n")[2] for v in client.mget(keys) if v is not None]
    return sorted(orjson.loads(v)["body"] for v in values)


async def test_a_stalled_redis_answers_unconfirmed_or_unavailable_truthfully(
    own_server: EmbeddedServer, own_client: RedisClient, prefix: str
) -> None:
    senders = 8
    bob = unique("bob")
    config = relay_config(own_server.url, prefix, redis_timeout_s=REDIS_TIMEOUT_S)
    answers: dict[int, dict[str, Any]] = {}
    async with serving(config) as relay, trio.open_nursery() as nursery:
        sockets = []
        for n in range(senders):
            ws = await nursery.start(_session, url_of(relay), f"alice{n}")
            sockets.append(ws)

        async def send(n: int) -> None:
            frame = {"type": "send", "to": bob, "body": f"m{n}", "ref": f"r{n}"}
            answers[n] = await request(sockets[n], frame)

        for ws in sockets:  # each session has read its mailbox: the pump is idle
            warm_up = {"type": "send", "to": bob + "-warm", "body": "w"}
            assert (await request(ws, warm_up))["type"] == "accepted"
        os.kill(own_server.pid, signal.SIGSTOP)
        try:
            with trio.fail_after(DEADLINE_S):
                async with trio.open_nursery() as sends:
                    for n in range(senders):
                        sends.start_soon(send, n)
                        await trio.sleep(REDIS_TIMEOUT_S / 4)  # spread over the stall
        finally:
            os.kill(own_server.pid, signal.SIGCONT)
        codes = {n: a.get("code", a["type"]) for n, a in answers.items()}
        assert set(codes.values()) <= {"unconfirmed", "storage_unavailable"}, codes

        # A retry with the same ref converges on one copy.
        with trio.fail_after(DEADLINE_S):
            for n, code in codes.items():
                if code == "unconfirmed":
                    frame = {"type": "send", "to": bob, "body": f"m{n}", "ref": f"r{n}"}
                    while (answer := await request(sockets[n], frame))["type"] != "accepted":
                        assert answer["code"] in ("unconfirmed", "storage_unavailable")
                        await trio.sleep(0.05)  # Redis is coming back
        nursery.cancel_scope.cancel()
    expected = sorted(f"m{n}" for n, code in codes.items() if code == "unconfirmed")
    # Nothing answered storage_unavailable was stored; each retried send is there once.
    assert bodies_stored(own_client, prefix, bob) == expected
    assert expected, codes  # the send in flight when Redis stalled was unconfirmed


async def test_sends_of_one_read_failing_together_are_each_answered_with_their_own_ref(
    own_server: EmbeddedServer, prefix: str
) -> None:
    """Redis stalls past the timeout under a batch of sends that came in one write: they
    fail together (one pipeline, one error for all of it), and still each answer carries
    its own request's ref, in request order, so every waiting client call is answered."""
    bob = unique("bob")
    refs = [f"r{n}" for n in range(8)]
    config = relay_config(own_server.url, prefix, redis_timeout_s=REDIS_TIMEOUT_S)
    async with serving(config) as relay:
        stream, ws = await open_raw_session(relay.port, unique("alice"))
        with trio.fail_after(DEADLINE_S):
            (welcome,) = await text_frames(stream, ws, 1)
            assert welcome["type"] == "welcome"
            frames = [
                orjson.dumps({"type": "send", "to": bob, "body": ref, "ref": ref}).decode()
                for ref in refs
            ]
            os.kill(own_server.pid, signal.SIGSTOP)
            try:
                await stream.send_all(b"".join(ws.send(TextMessage(f)) for f in frames))
                answers = await text_frames(stream, ws, len(refs))
            finally:
                os.kill(own_server.pid, signal.SIGCONT)
        await stream.aclose()
    assert [a["ref"] for a in answers] == refs
    assert {a.get("code") for a in answers} <= {"unconfirmed", "storage_unavailable"}, answers


async def test_multi_recipient_sends_of_one_read_refused_together_leave_no_copy(
    own_server: EmbeddedServer, own_client: RedisClient, prefix: str
) -> None:
    """Sends to two mailboxes, one of them full, that came in one write: the copies stored
    for the other mailbox are deleted again (for all the sends of the batch at once), and
    each send is answered mailbox_full with its own ref."""
    bob, carol = unique("bob"), unique("carol")
    refs = [f"m{n}" for n in range(8)]
    config = relay_config(own_server.url, prefix, max_mailbox_messages=1)
    async with serving(config) as relay:
        with trio.fail_after(DEADLINE_S):
            async with raw_session(url_of(relay), "alice") as (alice, _):
                answer = await request(alice, {"type": "send", "to": carol, "body": "fills"})
                assert answer["type"] == "accepted", answer
            stream, ws = await open_raw_session(relay.port, unique("alice"))
            (welcome,) = await text_frames(stream, ws, 1)
            assert welcome["type"] == "welcome"
            frames = [
                orjson.dumps({"type": "send", "to": [bob, carol], "body": r, "ref": r}).decode()
                for r in refs
            ]
            await stream.send_all(b"".join(ws.send(TextMessage(f)) for f in frames))
            answers = await text_frames(stream, ws, len(refs))
            await stream.aclose()
    assert [(a["ref"], a.get("code")) for a in answers] == [(r, "mailbox_full") for r in refs]
    assert list(own_client.scan_iter(match=f"{prefix}{{{bob}}}*")) == []  # nor ref records
    assert bodies_stored(own_client, prefix, carol) == ["fills"]


async def _session(url: str, mailbox: str, *, task_status: trio.TaskStatus[Any]) -> None:
    async with raw_session(url, mailbox) as (ws, _):
        task_status.started(ws)
        await trio.sleep_forever()


async def test_a_full_redis_lets_the_recipient_drain_its_mailbox(
    own_server: EmbeddedServer, own_client: RedisClient, prefix: str
) -> None:
    bob = unique("bob")
    body = "x" * 16 * 1024
    async with serving(relay_config(own_server.url, prefix)) as relay:
        with trio.fail_after(DEADLINE_S):
            async with raw_session(url_of(relay), "alice") as (alice, _):
                for _ in range(20):
                    answer = await request(alice, {"type": "send", "to": bob, "body": body})
                    assert answer["type"] == "accepted", answer
                used = int(own_client.info("memory")["used_memory"])
                own_client.config_set("maxmemory", used + 256 * 1024)
                sent = 20
                while True:  # fill up to the limit
                    answer = await request(alice, {"type": "send", "to": bob, "body": body})
                    if answer["type"] != "accepted":
                        break
                    sent += 1
                assert answer["code"] == "storage_unavailable", answer

            async with raw_session(url_of(relay), bob) as (ws, _):
                received: list[str] = []
                while len(received) < sent:
                    frame = await recv(ws)
                    assert frame["type"] == "deliver", frame
                    ids = [m["id"] for m in frame["messages"]]
                    received += ids
                    answer = await request(ws, {"type": "ack", "ids": ids, "ref": "a"})
                    assert answer == {"type": "acked", "ref": "a", "count": len(ids)}
    assert own_client.keys(f"{prefix}{{{bob}}}:*") == []


async def test_a_session_that_cannot_reach_storage_closes_with_1013(
    own_server: EmbeddedServer, prefix: str
) -> None:
    config = relay_config(own_server.url, prefix, redis_timeout_s=REDIS_TIMEOUT_S)
    async with serving(config) as relay:
        own_server.stop()
        with trio.fail_after(DEADLINE_S):
            async with raw_ws(url_of(relay), bearer=token("bob")) as ws:
                assert await close_code(ws) == CloseCode.TRY_AGAIN_LATER.value


async def test_a_backlog_drains_to_a_client_with_a_1_mib_frame_limit(
    own_server: EmbeddedServer, prefix: str
) -> None:
    bob, limit = unique("bob"), 1024 * 1024
    body = "y" * 60 * 1024
    async with serving(relay_config(own_server.url, prefix)) as relay:
        with trio.fail_after(DEADLINE_S * 3):
            async with raw_session(url_of(relay), "alice") as (alice, _):
                for _ in range(100):
                    await send_json(alice, {"type": "send", "to": bob, "body": body})
                for _ in range(100):
                    assert (await recv(alice))["type"] == "accepted"
            async with open_websocket_url(
                url_of(relay),
                subprotocols=[SUBPROTOCOL],
                extra_headers=[(b"Authorization", f"Bearer {token(bob)}".encode())],
                max_message_size=limit,
            ) as ws:
                welcome = await recv(ws)
                assert welcome["max_frame_bytes"] == limit
                seen = 0
                while seen < 100:
                    text = await ws.get_message()
                    assert isinstance(text, str) and len(text.encode()) <= limit
                    frame = orjson.loads(text)
                    assert frame["type"] == "deliver"
                    seen += len(frame["messages"])
                    await send_json(
                        ws, {"type": "ack", "ids": [m["id"] for m in frame["messages"]]}
                    )
