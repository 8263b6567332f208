"""`ref` (protocol.md, "send"): random refs in the clients, `ref_conflict` for a reused
ref, `duplicate: true` for a true retry; and the welcome's `epoch`.

The first test is README's quick start as a user runs it: a relay process, two
`relay send` processes in a row, one `relay listen`. It lost every second
message while the CLI numbered refs afresh per connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from process_fixtures import cli_identity, relay_process, run_cli
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    keys_under,
    raw_session,
    receive_until,
    request,
    token,
)

from relay.client import open_relay
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient, connect
from relay.server import RunningRelay
from relay.store_redis import Keys, fingerprint

pytest_plugins = ["relay_fixtures"]

CLI_DEADLINE_S = 60.0  # three Python interpreters start one after another


async def test_two_cli_sends_in_a_row_both_arrive(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    async with relay_process(redis_url, prefix, tmp_path / "relay.log") as relay:
        with trio.fail_after(CLI_DEADLINE_S):
            answers = []
            for text in ("first message", "second message"):
                sent = await run_cli("send", *cli_identity(relay, "alice"), "--to", "bob", text)
                assert sent.returncode == 0, sent.stderr.decode()
                answers.append(orjson.loads(sent.stdout))
            listened = await run_cli("listen", *cli_identity(relay, "bob"), "--count", "2")
    assert listened.returncode == 0, listened.stderr.decode()
    received = [orjson.loads(line) for line in listened.stdout.splitlines()]
    assert [m["body"] for m in received] == ["first message", "second message"]
    assert answers[0]["ref"] != answers[1]["ref"]
    assert not any(a.get("duplicate") for a in answers)


async def test_cli_send_with_the_same_ref_converges_on_one_copy(
    redis_url: str, prefix: str, tmp_path: Path, redis_client: RedisClient
) -> None:
    async with relay_process(redis_url, prefix, tmp_path / "relay.log") as relay:
        with trio.fail_after(CLI_DEADLINE_S):
            send = ("send", *cli_identity(relay, "alice"), "--to", "bob", "--ref", "order-17")
            first = await run_cli(*send, "pay 10")
            again = await run_cli(*send, "pay 10")
            other = await run_cli(*send, "pay 20")
    assert first.returncode == again.returncode == 0, (first.stderr, again.stderr)
    assert orjson.loads(again.stdout) == {**orjson.loads(first.stdout), "duplicate": True}
    assert other.returncode != 0 and b"ref_conflict" in other.stderr
    assert len(keys_under(redis_client, Keys.of(prefix, "bob").msg_prefix)) == 1


async def test_client_library_refs_never_repeat_across_connections(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        refs = []
        for n in range(3):
            async with open_relay(relay.url, token("alice")) as alice:
                refs.append((await alice.send("bob", f"#{n}"))["ref"])
        async with open_relay(relay.url, token("bob")) as bob:
            got = await receive_until(bob, "#2")
    assert [m.body for m in got] == ["#0", "#1", "#2"]
    assert len(set(refs)) == 3 and all(len(r) >= 22 for r in refs)  # 128 random bits


@pytest.mark.parametrize(
    "change",
    [{"body": "another body"}, {"ttl": 120}, {"to": ["bob", "carol"]}],
    ids=["body", "ttl", "recipients"],
)
async def test_ref_conflict_for_a_reused_ref_stores_nothing(
    change: dict[str, Any], relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    frame = {"type": "send", "ref": "r-1", "to": "bob", "body": "the body", "ttl": 60}
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            first = await request(ws, frame)
            before = keys_under(redis_client, prefix)
            conflict = await request(ws, {**frame, **change})
            after = keys_under(redis_client, prefix)
            retry = await request(ws, frame)
    assert first["type"] == "accepted"
    assert (conflict["type"], conflict["code"], conflict["ref"]) == ("error", "ref_conflict", "r-1")
    assert "the body" not in conflict["message"]
    assert after == before  # nothing stored, for any recipient
    assert retry == {**first, "duplicate": True}


async def test_ref_records_name_neither_sender_nor_ref(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice-sender")) as alice:
            await alice.send("bob", "hello", ref="my-visible-ref")
    (ref_key,) = keys_under(redis_client, Keys.of(prefix, "bob").ref_prefix)
    record = redis_client.get(ref_key)
    assert isinstance(record, str)
    for text in (ref_key, record):
        assert "alice-sender" not in text and "my-visible-ref" not in text and "hello" not in text


async def test_corrupt_ref_record_rolls_back_the_copies_already_stored(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    """A record the relay cannot read (planted behind its back) fails the send, and the
    copy stored for the other recipient goes too (the rollback runs on every failure)."""
    request_print = fingerprint(["bob", "carol"], "x", 60)
    bob = Keys.of(prefix, "bob")
    redis_client.set(bob.ref("alice", "poisoned"), f"garbage {request_print}", px=60_000)
    frame = {"type": "send", "ref": "poisoned", "to": ["carol", "bob"], "body": "x", "ttl": 60}
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(ws, frame)
    assert (error["type"], error["code"], error["ref"]) == ("error", "internal", "poisoned")
    assert keys_under(redis_client, Keys.of(prefix, "carol").base) == []


async def test_welcome_epoch_is_stable_and_changes_when_storage_was_reset(
    make_relay: RelayFactory, redis_server: EmbeddedServer, prefix: str
) -> None:
    port = free_loopback_port()
    first_life = EmbeddedServer(binary=redis_server.binary, port=port)
    first_life.start()
    try:
        relay = await make_relay(redis_url=first_life.url)
        with trio.fail_after(DEADLINE_S):
            async with raw_session(relay.url, "bob") as (_, welcome):
                epoch = welcome["epoch"]
            async with raw_session(relay.url, "alice") as (_, again):
                assert again["epoch"] == epoch and again["expired"] == 0
        ttl_ms = connect(first_life.url).pttl(f"{prefix}epoch")
        assert 0 < ttl_ms <= relay.services.config.retention_s * 1000
    finally:
        first_life.stop()
    second_life = EmbeddedServer(binary=redis_server.binary, port=port)  # memory only: empty
    second_life.start()
    try:
        with trio.fail_after(DEADLINE_S):
            while True:  # the pump reconnects on the next command
                try:
                    async with raw_session(relay.url, "bob") as (_, welcome):
                        break
                except Exception:
                    await trio.sleep(0.1)
        assert welcome["epoch"] != epoch and isinstance(welcome["epoch"], str)
    finally:
        second_life.stop()
