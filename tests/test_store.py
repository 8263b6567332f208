"""The Redis mailbox store against a real Valkey/Redis, one test per contract point: TTLs,
acks, fetch order, idempotent refs, expiry, pub/sub wake-ups, envelopes and message ids.

protocol.md ("send", "ack", "The ephemerality contract") and design.md
("Redis: keys and TTLs") are the contract; `redis_client` looks at what the
store really wrote. Every test has its own key prefix (the `prefix` fixture).
Quotas and multi-recipient sends are in test_store_quota.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
import redis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_helpers import (
    DEADLINE_S,
    keys_under,
    msg_keys,
    now_ms,
    ref_keys,
    wait_until_gone,
    with_quota,
    zcard,
)

from relay.errors import MailboxFull
from relay.redis.admin import RedisClient
from relay.redis.pump import RedisPump
from relay.store import Accepted
from relay.store_redis import (
    NO_REF,
    SEND,
    Quota,
    RedisMailboxStore,
    message_sent_ms,
    new_message_id,
)

RETENTION_MS = 3600 * 1000  # the `store` fixture's retention


_mailboxes = itertools.count()


def pttl(client: RedisClient, key: str) -> int:
    value: int = client.pttl(key)
    return value


async def test_every_key_written_carries_a_ttl_within_retention(
    store: RedisMailboxStore, redis_client: RedisClient, prefix: str
) -> None:
    t = now_ms()
    small = with_quota(store, Quota(max_messages=1))
    with trio.fail_after(DEADLINE_S):
        first = await store.send("alice", ["bob"], "one", 600, "r1", t)
        await store.send("alice", ["bob", "carol"], "two", 3600, None, t)
        short = await store.send("alice", ["dave"], "short", 5, "r-short", t)
        await store.send("alice", ["bob"], "one", 600, "r1", t + 10)  # repeated ref
        assert (await store.start_session("bob")).waiting == 2
        assert len((await store.fetch("bob", 0, 10)).deliveries) == 2
        assert await store.ack("bob", [first.ids["bob"]]) == 1
        await store.start_session("carol")
        await store.fetch("carol", 0, 10)
        await store.start_session("erin")  # an empty mailbox
        await small.send("zed", ["frank"], "fills frank", 60, None, t)
        with pytest.raises(MailboxFull):  # the quota check recounts (purge) and refuses
            await small.send("zed", ["frank"], "too many", 60, "r-full", t)
        with pytest.raises(MailboxFull):  # gina's copy is stored, then rolled back
            await small.send("zed", ["gina", "frank"], "rolled back", 60, "r-multi", t)

    keys = keys_under(redis_client, f"{prefix}*")
    kinds = {k.rsplit(":", 1)[-1] for k in keys if k.endswith((":idx", ":tally"))}
    assert kinds == {"idx", "tally"}
    assert any(":msg:" in k for k in keys) and any(":ref:" in k for k in keys)
    for key in keys:
        assert 0 < pttl(redis_client, key) <= RETENTION_MS, key

    # A message sent with a short ttl: its key, its ref record and the index
    # that holds only it live no longer than that ttl.
    dave = store.keys("dave")
    for key in (dave.msg(short.ids["dave"]), dave.ref("alice", "r-short"), dave.idx):
        assert 0 < pttl(redis_client, key) <= 5000, key


async def test_message_ttl_is_set_once_and_never_extended(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        first = await store.send("alice", ["bob"], "short-lived", 60, "a", t)
        key = store.keys("bob").msg(first.ids["bob"])
        before = pttl(redis_client, key)
        assert 0 < before <= 60_000
        second = await store.send("alice", ["bob"], "long-lived", 3600, "b", t + 1)
        await store.send("alice", ["bob"], "long-lived", 3600, "b", t + 2)  # repeat
        await store.start_session("bob")
        await store.fetch("bob", 0, 10)
        await store.ack("bob", [second.ids["bob"]])
        after = pttl(redis_client, key)
    assert 0 < after <= before
    # The index was extended for the longer message; the first message was not.
    assert pttl(redis_client, store.keys("bob").idx) > 60_000


async def test_ack_deletes_the_message_and_returns_the_count_deleted(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        ids = [
            (await store.send("alice", ["bob"], f"m{n}", 600, None, t)).ids["bob"] for n in range(3)
        ]
        keys = store.keys("bob")
        assert all(redis_client.exists(keys.msg(i)) for i in ids)
        assert await store.ack("bob", ids[:2]) == 2
        assert redis_client.exists(keys.msg(ids[0]), keys.msg(ids[1])) == 0
        assert redis_client.exists(keys.msg(ids[2])) == 1
        assert [d.id for d in (await store.fetch("bob", 0, 10)).deliveries] == [ids[2]]
        start = await store.start_session("bob")
    assert (start.expired, start.waiting) == (0, 1)  # acked is not expired


async def test_acks_are_idempotent_and_unknown_ids_are_ignored(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        a = (await store.send("alice", ["bob"], "a", 600, None, t)).ids["bob"]
        b = (await store.send("alice", ["bob"], "b", 600, None, t)).ids["bob"]
        assert await store.ack("bob", [a]) == 1
        assert await store.ack("bob", [a]) == 0  # already acked
        assert await store.ack("bob", ["unknown", f"{t:x}-nosuchid"]) == 0
        assert await store.ack("bob", []) == 0
        assert await store.ack("carol", [b]) == 0  # another mailbox's message is untouched
        assert redis_client.exists(store.keys("bob").msg(b)) == 1
        assert await store.ack("bob", [b, b, "unknown"]) == 1  # duplicates count once
        assert (await store.fetch("bob", 0, 10)).deliveries == []
        start = await store.start_session("bob")
    assert (start.expired, start.waiting) == (0, 0)


async def test_messages_are_fetched_in_send_order_across_pages_exactly_once(
    store: RedisMailboxStore, redis_client: RedisClient, prefix: str
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        sent = [
            (await store.send("alice", ["bob"], f"#{n}", 600, None, t + n)).ids["bob"]
            for n in range(500)
        ]
        assert (await store.start_session("bob")).waiting == 500
        fetched: list[Any] = []
        after, pages = 0, 0
        while page := (await store.fetch("bob", after, 100)).deliveries:
            assert len(page) <= 100
            fetched += page
            after = page[-1].seq
            pages += 1
        assert pages == 5
        # `after` is exclusive: from the seq of the 250th message on, the 251st comes next.
        assert ((await store.fetch("bob", fetched[249].seq, 1)).deliveries)[0].id == sent[250]

        assert [d.id for d in fetched] == sent
        assert [orjson.loads(d.envelope)["body"] for d in fetched] == [f"#{n}" for n in range(500)]
        seqs = [d.seq for d in fetched]
        assert seqs == sorted(seqs) and len(set(seqs)) == 500

        assert await store.ack("bob", sent) == 500
    assert keys_under(redis_client, f"{prefix}*") == []  # sent without ref: nothing left


async def test_a_read_says_whether_more_may_wait(store: RedisMailboxStore) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        for n in range(3):
            await store.send("alice", ["bob"], f"#{n}", 600, None, t + n)
        at_limit = await store.fetch("bob", 0, 3)
        assert (len(at_limit.deliveries), at_limit.more) == (3, True)  # stopped at its limit
        after = await store.fetch("bob", at_limit.deliveries[-1].seq, 3)
        assert (after.deliveries, after.more) == ([], False)
        everything = await store.fetch("bob", 0, 10)
        assert (len(everything.deliveries), everything.more) == (3, False)


async def test_a_read_of_large_messages_stops_at_its_byte_budget(store: RedisMailboxStore) -> None:
    """The budget is checked every 32 messages: 100 of 10 KiB, 50 KiB a read, go 32 at a
    time, each once and in order."""
    t = now_ms()
    body = "x" * 10 * 1024
    with trio.fail_after(DEADLINE_S):
        sent = [
            (await store.send("alice", ["bob"], body, 600, None, t + n)).ids["bob"]
            for n in range(100)
        ]
        fetched, sizes, after, more = [], [], 0, True
        while more:
            page = await store.fetch("bob", after, 256, max_bytes=50 * 1024)
            sizes.append(len(page.deliveries))
            fetched += [d.id for d in page.deliveries]
            after = page.deliveries[-1].seq if page.deliveries else after
            more = page.more
    assert sizes == [32, 32, 32, 4]
    assert fetched == sent


async def test_repeated_ref_from_same_sender_stores_nothing_new(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        first = await store.send("alice", ["bob", "carol"], "hello", 600, "c-17", t)
        again = await store.send("alice", ["carol", "bob"], "hello", 600, "c-17", t + 5000)
        assert (again.ids, again.expires_at_ms) == (first.ids, first.expires_at_ms)
        assert again.duplicate and not first.duplicate
        assert first.expires_at_ms == t + 600_000
        for mailbox in ("bob", "carol"):
            assert zcard(redis_client, store.keys(mailbox).idx) == 1
            assert msg_keys(redis_client, store, mailbox) == [
                store.keys(mailbox).msg(first.ids[mailbox])
            ]
            (delivery,) = (await store.fetch(mailbox, 0, 10)).deliveries
            assert orjson.loads(delivery.envelope)["body"] == "hello"


async def test_repeated_ref_after_ack_stores_nothing_new(
    store: RedisMailboxStore, redis_client: RedisClient, prefix: str
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        first = await store.send("alice", ["bob"], "hello", 60, "r1", t)
        assert (await store.start_session("bob")).waiting == 1
        assert [d.id for d in (await store.fetch("bob", 0, 10)).deliveries] == [first.ids["bob"]]
        assert await store.ack("bob", [first.ids["bob"]]) == 1
        # A late retry of the acked send must not deliver the message again.
        retry = await store.send("alice", ["bob"], "hello", 60, "r1", t + 1000)
        assert (retry.ids, retry.duplicate) == (first.ids, True)
        assert (await store.fetch("bob", 0, 10)).deliveries == []
    # Only the idempotency record is left, named by a hash, and it lives for the
    # dedupe window only (the store's is 2 s here), never the message's whole ttl.
    ref_key = store.keys("bob").ref("alice", "r1")
    assert keys_under(redis_client, f"{prefix}*") == [ref_key]
    assert "alice" not in ref_key and "r1" not in ref_key
    assert 0 < pttl(redis_client, ref_key) <= store.dedupe_window_s * 1000


async def test_same_ref_from_a_different_sender_is_a_different_message(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        from_alice = await store.send("alice", ["bob"], "from alice", 600, "c-1", t)
        from_mallory = await store.send("mallory", ["bob"], "from mallory", 600, "c-1", t)
        deliveries = (await store.fetch("bob", 0, 10)).deliveries
    assert from_alice.ids["bob"] != from_mallory.ids["bob"]
    assert [d.id for d in deliveries] == [from_alice.ids["bob"], from_mallory.ids["bob"]]
    assert [orjson.loads(d.envelope)["from"] for d in deliveries] == ["alice", "mallory"]
    assert len(ref_keys(redis_client, store, "bob")) == 2


async def test_expired_message_is_gone_and_counted_at_session_start(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    keys = store.keys("bob")
    with trio.fail_after(DEADLINE_S):
        expiring = (await store.send("alice", ["bob"], "gone soon", 1, "x", t)).ids["bob"]
        acked = (await store.send("alice", ["bob"], "acked in time", 1, None, t)).ids["bob"]
        staying = (await store.send("alice", ["bob"], "stays", 600, None, t)).ids["bob"]
        assert await store.ack("bob", [acked]) == 1
        await wait_until_gone(redis_client, keys.msg(expiring))
        # The idempotency record went with the message (same ttl).
        assert redis_client.exists(keys.ref("alice", "x")) == 0

        start = await store.start_session("bob")
        assert (start.expired, start.waiting) == (1, 1)  # the acked one is not counted
        assert [d.id for d in (await store.fetch("bob", 0, 10)).deliveries] == [staying]
        assert await store.ack("bob", [expiring]) == 0  # expired ids are ignored
        again = await store.start_session("bob")
    assert (again.expired, again.waiting) == (0, 1)  # reported once


async def test_expired_messages_leave_nothing_behind(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        sent = await store.send("alice", ["bob"], "only", 1, "r", t)
        keys = store.keys("bob")
        await wait_until_gone(redis_client, keys.msg(sent.ids["bob"]), keys.idx)
        assert (await store.start_session("bob")).expired == 1
        assert (await store.fetch("bob", 0, 10)).deliveries == []
    assert keys_under(redis_client, keys.base + "*") == []


async def test_send_publishes_seq_and_envelope_on_the_mailbox_channel(
    store: RedisMailboxStore, redis_url: str
) -> None:
    channel = store.keys("bob").channel
    subscriber = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5)
    pubsub = subscriber.pubsub()  # type: ignore[no-untyped-call]

    def next_message() -> dict[str, Any]:
        while True:
            message: dict[str, Any] | None = pubsub.get_message(timeout=1.0)
            if message is not None:
                return message

    try:
        with trio.fail_after(DEADLINE_S):
            pubsub.subscribe(channel)
            confirmed = await trio.to_thread.run_sync(next_message)
            assert confirmed["type"] == "subscribe" and confirmed["channel"] == channel

            accepted = await store.send("alice", ["bob"], "ping ✓", 600, None, now_ms())
            published = await trio.to_thread.run_sync(next_message)
            (delivery,) = (await store.fetch("bob", 0, 10)).deliveries
    finally:
        pubsub.close()
        subscriber.close()
    assert published["type"] == "message" and published["channel"] == channel
    seq, envelope = published["data"].split(" ", 1)
    assert int(seq) == delivery.seq
    assert envelope == delivery.envelope
    assert delivery.id == accepted.ids["bob"]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=st.text(st.characters(exclude_categories=["Cs"]), max_size=300))
async def test_envelope_carries_id_from_body_and_times(
    body: str, redis_url: str, prefix: str
) -> None:
    # Trio fixtures (pump, store) are not re-created per Hypothesis example, so
    # each example runs its own pump; and it uses a fresh mailbox.
    mailbox = f"m{next(_mailboxes)}"
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            pump = RedisPump(redis_url)
            await nursery.start(pump.run)
            store = RedisMailboxStore(pump, prefix=prefix, retention_s=3600)
            accepted = await store.send("alice", [mailbox], body, 120, None, t)
            (delivery,) = (await store.fetch(mailbox, 0, 10)).deliveries
            nursery.cancel_scope.cancel()
    assert orjson.loads(delivery.envelope) == {
        "id": accepted.ids[mailbox],
        "from": "alice",
        "body": body,
        "sent_at": t,
        "expires_at": t + 120_000,
    }
    assert delivery.id == accepted.ids[mailbox]
    assert accepted.expires_at_ms == t + 120_000


async def test_message_id_starts_with_the_send_time_in_hex_ms(
    store: RedisMailboxStore, redis_client: RedisClient, prefix: str
) -> None:
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        accepted: Accepted = await store.send("alice", ["bob", "carol"], "x", 600, None, t)
    for message_id in accepted.ids.values():
        assert message_id.startswith(f"{t:x}-")
        assert message_sent_ms(message_id) == t
    # `relay audit` reads the age from the key name alone.
    for key in keys_under(redis_client, f"{prefix}*:msg:*"):
        assert message_sent_ms(key.rsplit(":msg:", 1)[1]) == t
    assert message_sent_ms("not-hex") is None


async def test_send_script_run_twice_stores_one_message(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    """The pump may run a batch again after a lost reply; a re-run send stores nothing more."""
    keys = store.keys("bob")
    message_id = new_message_id(now_ms())
    args: tuple[object, ...] = (message_id, f'{{"id":"{message_id}","body":"x"}}', 60_000, 10)
    args += (10_000, store.pump.publish)
    args += ("0", "", 3_600_000, "", NO_REF)
    script_keys = (keys.idx, keys.tally, keys.msg(message_id), keys.base + "ref:-", keys.channel)
    with trio.fail_after(DEADLINE_S):
        first = await store.pump.run_script(SEND, script_keys, args)
        again = await store.pump.run_script(SEND, script_keys, args)
        assert again == first and first[0] == 0
        assert zcard(redis_client, keys.idx) == 1
        assert redis_client.hget(keys.tally, "n") == "1"
        assert (await store.start_session("bob")).expired == 0
        assert await store.ack("bob", [message_id]) == 1
    assert keys_under(redis_client, f"{store.prefix}*") == []
