"""Contract point 1 for metadata (protocol.md): after the ack, nothing records who wrote
to whom and when, but a ref record named by a hash, for the dedupe window only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from process_fixtures import relay_process
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    keys_under,
    poll_until,
    raw_session,
    recv,
    request,
    send_json,
    token,
)

from relay.audit import audit
from relay.client import open_relay
from relay.redis.admin import RedisClient, primaries
from relay.store_redis import Keys

pytest_plugins = ["relay_fixtures"]

WINDOW_S = 2


def _dump_everything(redis_client: RedisClient, prefix: str) -> bytes:
    """Every key under the prefix and its DUMP (the serialized value, whatever its type),
    on every primary."""
    found = []
    for _, node in primaries(redis_client):
        for key in node.scan_iter(match=prefix + "*", count=1000):
            found += [key.encode(), node.dump(key) or b""]  # DUMP is never decoded
    return b"\n".join(found)


async def test_after_the_ack_and_the_dedupe_window_nothing_about_the_exchange_remains(
    make_relay: RelayFactory, redis_client: RedisClient, redis_url: str, prefix: str
) -> None:
    relay = await make_relay(dedupe_window_s=WINDOW_S)
    frame = {"type": "send", "ref": "ref-of-alice-9f", "to": "bob-m", "body": "hush", "ttl": 3600}
    with trio.fail_after(DEADLINE_S):
        async with (
            raw_session(relay.url, "alice-m") as (alice, _),
            raw_session(relay.url, "bob-m") as (bob, _),
        ):
            accepted = await request(alice, frame)
            message_id = accepted["ids"]["bob-m"]
            (delivered,) = (await recv(bob))["messages"]
            assert delivered["id"] == message_id
            acked = await request(bob, {"type": "ack", "ids": [message_id], "ref": "a"})
            assert acked["count"] == 1
            acked_at = time.monotonic()
            # Within the window a retry converges on the original answer and stores nothing.
            retry = await request(alice, frame)
            assert retry == {**accepted, "duplicate": True}
            assert keys_under(redis_client, Keys.of(prefix, "bob-m").msg_prefix) == []
    (ref_key,) = keys_under(redis_client, prefix)  # the ref record, for the window only
    assert 0 < redis_client.pttl(ref_key) <= WINDOW_S * 1000
    within = _dump_everything(redis_client, prefix)  # names no one, holds no body
    for secret in ("alice-m", "ref-of-alice-9f", "hush"):
        assert secret.encode() not in within, secret
    with trio.fail_after(DEADLINE_S):
        await poll_until(lambda: keys_under(redis_client, prefix) == [])
    assert time.monotonic() - acked_at <= WINDOW_S + 1.0
    everything = _dump_everything(redis_client, prefix)
    for secret in ("alice-m", "bob-m", message_id, "ref-of-alice-9f", "hush"):
        assert secret.encode() not in everything, secret


async def test_an_undelivered_messages_ref_record_lives_as_long_as_the_message(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay(dedupe_window_s=WINDOW_S)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (alice, _):
            accepted = await request(
                alice, {"type": "send", "ref": "r", "to": "carol", "body": "x", "ttl": 3}
            )
            keys = Keys.of(prefix, "carol")
            msg_key, ref_key = keys.msg(accepted["ids"]["carol"]), keys.ref("alice", "r")
            # Past the dedupe window, unacked: both still there, the record as long as the message.
            await trio.sleep(WINDOW_S + 0.5)  # the point is time passing; nothing to wait on
            assert redis_client.exists(msg_key, ref_key) == 2
            assert abs(redis_client.pttl(ref_key) - redis_client.pttl(msg_key)) < 100
            again = await request(
                alice, {"type": "send", "ref": "r", "to": "carol", "body": "x", "ttl": 3}
            )
            assert again == {**accepted, "duplicate": True}
            await poll_until(lambda: redis_client.exists(msg_key, ref_key) == 0)


async def test_audit_flags_a_ref_record_that_outlives_its_message(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay()
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (alice, _):
            await send_json(alice, {"type": "send", "ref": "kept", "to": "dave", "body": "x"})
            assert (await recv(alice))["type"] == "accepted"
    clean = audit(redis_client, prefix, 7 * 24 * 3600, now_ms=time.time_ns() // 1_000_000)
    assert clean.ok and clean.ref_records == 1 and clean.stale_refs == 0

    planted = Keys.of(prefix, "erin").ref("alice", "gone")  # its message is not there
    redis_client.set(planted, "0-nothing 0 fp", px=3_600_000)
    report = audit(redis_client, prefix, 7 * 24 * 3600, now_ms=time.time_ns() // 1_000_000)
    assert not report.ok
    assert report.ref_records == 2 and report.stale_refs == 1
    assert [key for key, _ in report.stale_refs_listed] == [planted]
    assert any("dedupe window" in v for v in report.violations)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_logs_hold_no_record_per_message_or_session(
    log_format: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A busy mix of sessions at the default log level writes only lifecycle lines."""
    log_path = tmp_path / "relay.log"
    async with relay_process(redis_url, prefix, log_path, "--log-format", log_format) as relay:
        with trio.fail_after(DEADLINE_S):
            await poll_until(lambda: "listening" in log_path.read_text())
            startup_lines = len(log_path.read_text().splitlines())
            for round_ in range(10):
                async with (
                    open_relay(relay.url, token(f"sender-{round_}")) as sender,
                    open_relay(relay.url, token(f"reader-{round_}")) as reader,
                ):
                    for n in range(5):
                        await sender.send(f"reader-{round_}", f"body {round_}.{n}")
                    for _ in range(5):
                        message = await reader.receive()
                        assert await reader.ack([message.id]) == 1
            during = log_path.read_text().splitlines()[startup_lines:]
    assert during == []  # nothing per message, per session, per mailbox
    text = log_path.read_text()
    assert "sender-" not in text and "reader-" not in text and "body " not in text
    assert "listening" in text and "shutting down" in text  # the lifecycle is logged
