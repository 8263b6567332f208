"""The Redis mailbox store's quotas (mailbox_full by messages and by bytes, expired messages
not counted) and multi-recipient sends (one copy each, all or nothing), against a real
Valkey/Redis; `redis_client` looks at what the store really wrote.
"""

from __future__ import annotations

import orjson
import pytest
import trio
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

from relay.codes import ErrorCode
from relay.errors import MailboxFull
from relay.redis.admin import RedisClient
from relay.store import Accepted, SendRequest
from relay.store_redis import Quota, RedisMailboxStore


async def test_mailbox_full_when_message_quota_is_reached(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    small = with_quota(store, Quota(max_messages=3, max_bytes=1 << 20))
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        ids = [
            (await small.send("alice", ["bob"], f"m{n}", 600, None, t)).ids["bob"] for n in range(3)
        ]
        with pytest.raises(MailboxFull) as refused:
            await small.send("alice", ["bob"], "fourth", 600, "r4", t)
        assert zcard(redis_client, small.keys("bob").idx) == 3
        assert ref_keys(redis_client, small, "bob") == []
        assert await small.ack("bob", [ids[0]]) == 1
        fourth = await small.send("alice", ["bob"], "fourth", 600, "r4", t)
    error = refused.value
    assert error.code == ErrorCode.MAILBOX_FULL and error.code.value == "mailbox_full"
    assert "bob" in error.message and "3 messages" in error.message
    assert fourth.ids["bob"] not in ids


async def test_mailbox_full_when_byte_quota_is_reached(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    body = "x" * 300
    with trio.fail_after(DEADLINE_S):
        probe = await store.send("alice", ["probe"], body, 600, None, t)
        size = int(redis_client.strlen(store.keys("probe").msg(probe.ids["probe"])))
        max_bytes = 2 * size + size // 2  # room for two such messages, not three
        small = with_quota(store, Quota(max_messages=100, max_bytes=max_bytes))
        ids = [
            (await small.send("alice", ["bob"], body, 600, None, t)).ids["bob"] for _ in range(2)
        ]
        with pytest.raises(MailboxFull) as refused:
            await small.send("alice", ["bob"], body, 600, None, t)
        assert zcard(redis_client, small.keys("bob").idx) == 2
        # A smaller message still fits in the room that is left.
        await small.send("alice", ["bob"], "tiny", 600, None, t)
        assert await small.ack("bob", [ids[0]]) == 1
        await small.send("alice", ["bob"], body, 600, None, t)
    assert refused.value.code == ErrorCode.MAILBOX_FULL
    assert f"{max_bytes} bytes" in refused.value.message


async def test_expired_messages_do_not_count_against_the_quota(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    body = "y" * 200
    with trio.fail_after(DEADLINE_S):
        probe = await store.send("alice", ["probe"], body, 600, None, t)
        size = int(redis_client.strlen(store.keys("probe").msg(probe.ids["probe"])))
        # Full by count and by bytes after three messages.
        small = with_quota(store, Quota(max_messages=3, max_bytes=3 * size))
        short = [
            (await small.send("alice", ["bob"], body, 1, None, t)).ids["bob"] for _ in range(3)
        ]
        with pytest.raises(MailboxFull):
            await small.send("alice", ["bob"], body, 600, None, t)
        await wait_until_gone(redis_client, *(small.keys("bob").msg(i) for i in short))
        for _ in range(3):
            await small.send("alice", ["bob"], body, 600, None, t)
        with pytest.raises(MailboxFull):
            await small.send("alice", ["bob"], body, 600, None, t)
        start = await small.start_session("bob")
    assert (start.expired, start.waiting) == (3, 3)


async def test_multi_recipient_send_stores_one_copy_per_recipient(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    t = now_ms()
    recipients = ["bob", "carol", "dave"]
    with trio.fail_after(DEADLINE_S):
        accepted = await store.send("alice", recipients, "to all", 600, "all-1", t)
        assert sorted(accepted.ids) == sorted(recipients)
        assert len(set(accepted.ids.values())) == 3
        for mailbox in recipients:
            (delivery,) = (await store.fetch(mailbox, 0, 10)).deliveries
            assert delivery.id == accepted.ids[mailbox]
            envelope = orjson.loads(delivery.envelope)
            assert envelope["body"] == "to all" and envelope["from"] == "alice"
            assert msg_keys(redis_client, store, mailbox) == [
                store.keys(mailbox).msg(accepted.ids[mailbox])
            ]
            assert ref_keys(redis_client, store, mailbox) == [
                store.keys(mailbox).ref("alice", "all-1")
            ]


@pytest.mark.parametrize("full_at", ["first", "last"])
async def test_multi_recipient_send_is_all_or_nothing(
    full_at: str, store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    small = with_quota(store, Quota(max_messages=1))
    t = now_ms()
    recipients = ["carol", "bob", "dave"] if full_at == "first" else ["bob", "dave", "carol"]
    with trio.fail_after(DEADLINE_S):
        filler = (await small.send("zed", ["carol"], "filler", 600, None, t)).ids["carol"]
        with pytest.raises(MailboxFull) as refused:
            await small.send("alice", recipients, "hi", 600, "m-1", t)
        assert "carol" in refused.value.message

        # The copies stored for bob and dave are gone: no msg key, no idx entry,
        # no ref record, no tally (nothing at all for those mailboxes).
        for mailbox in ("bob", "dave"):
            assert keys_under(redis_client, small.keys(mailbox).base + "*") == []
            start = await small.start_session(mailbox)
            assert (start.expired, start.waiting) == (0, 0)
        assert msg_keys(redis_client, small, "carol") == [small.keys("carol").msg(filler)]
        assert ref_keys(redis_client, small, "carol") == []

        # Free carol's mailbox; a retry with the same ref stores one copy each.
        assert await small.ack("carol", [filler]) == 1
        retried = await small.send("alice", recipients, "hi", 600, "m-1", t + 1000)
        again = await small.send("alice", recipients, "hi", 600, "m-1", t + 2000)
        assert (again.ids, again.duplicate) == (retried.ids, True)
    assert len(set(retried.ids.values())) == 3
    for mailbox in recipients:
        keys = small.keys(mailbox)
        assert msg_keys(redis_client, small, mailbox) == [keys.msg(retried.ids[mailbox])]
        assert redis_client.zrange(keys.idx, 0, -1) == [retried.ids[mailbox]]
        assert ref_keys(redis_client, small, mailbox) == [keys.ref("alice", "m-1")]


async def test_sends_handed_over_together_each_get_their_own_outcome_in_order(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    """One read's sends are one `send_many`: a full mailbox in the middle fails that send
    only (its other copy deleted again), the sends around it are stored, and a repeated
    ref within the same call is a duplicate of the first."""
    small = with_quota(store, Quota(max_messages=2))
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        await small.send("zed", ["carol"], "filler 1", 600, None, t)
        await small.send("zed", ["carol"], "filler 2", 600, None, t)
        first, refused, third, repeated = await small.send_many(
            "alice",
            [
                SendRequest(["bob"], "one", 600, "r1"),
                SendRequest(["dave", "carol"], "two", 600, "r2"),
                SendRequest(["bob"], "three", 600, None),
                SendRequest(["bob"], "one", 600, "r1"),
            ],
            t,
        )
    assert isinstance(first, Accepted) and not first.duplicate
    assert isinstance(refused, MailboxFull) and "carol" in refused.message
    assert isinstance(third, Accepted) and isinstance(repeated, Accepted)
    assert (repeated.ids, repeated.duplicate) == (first.ids, True)
    bob = small.keys("bob")
    assert sorted(msg_keys(redis_client, small, "bob")) == sorted(
        bob.msg(sent.ids["bob"]) for sent in (first, third)
    )
    assert keys_under(redis_client, small.keys("dave").base + "*") == []
