"""The tally, the cache that lets a send read one key (relay/lua/tally.lua), against a real
Valkey/Redis: it heals when it is lost or wrong, sequences keep growing across its loss,
expired messages are counted once whoever finds them, and a session start reads no index
while nothing can have expired. Also: sends to one mailbox that meet in one pump batch
run as one script, and still behave as separate sends (order, refs, quota, TTLs).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing
from store_helpers import DEADLINE_S, keys_under, now_ms, wait_until_gone, with_quota

from relay.errors import MailboxFull, RefConflict
from relay.redis.admin import RedisClient
from relay.redis.pump import LuaScript
from relay.store import Accepted
from relay.store_redis import Quota, RedisMailboxStore

RETENTION_MS = 3600 * 1000  # the `store` fixture's retention
AHEAD = 1_799_999_999_999_999  # a sequence from a clock far ahead of this one (µs)


def calls(client: RedisClient, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})
    return int(stats["calls"])


def tally_of(client: RedisClient, store: RedisMailboxStore, mailbox: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in client.hgetall(store.keys(mailbox).tally).items()}


def lose_tally(client: RedisClient, store: RedisMailboxStore, mailbox: str, how: str) -> None:
    key = store.keys(mailbox).tally
    if how == "deleted":
        client.delete(key)
    else:  # it ran out while messages wait (a shorter retention than before, say)
        client.pexpire(key, 1)


@pytest.mark.parametrize("how", ["deleted", "expired"])
async def test_a_lost_tally_is_rebuilt_from_the_index(
    how: str, store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    small = with_quota(store, Quota(max_messages=4))
    keys = small.keys("bob")
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        sent = [
            (await small.send("alice", ["bob"], f"m{n}", 600, f"r{n}", t)).ids["bob"]
            for n in range(3)
        ]
        lose_tally(redis_client, small, "bob", how)
        await wait_until_gone(redis_client, keys.tally)
        start = await small.start_session("bob")  # rebuilds it
        assert (start.expired, start.waiting) == (0, 3)
        assert tally_of(redis_client, small, "bob")["n"] == "3"
        assert 0 < redis_client.pttl(keys.tally) <= RETENTION_MS

        lose_tally(redis_client, small, "bob", how)
        await wait_until_gone(redis_client, keys.tally)
        sent.append((await small.send("alice", ["bob"], "m3", 600, "r3", t)).ids["bob"])
        with pytest.raises(MailboxFull):  # counted from the index, not from zero
            await small.send("alice", ["bob"], "m4", 600, "r4", t)
        assert 0 < redis_client.pttl(keys.tally) <= RETENTION_MS

        fetched = (await small.fetch("bob", 0, 10)).deliveries
        assert [d.id for d in fetched] == sent
        seqs = [d.seq for d in fetched]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
        assert await small.ack("bob", sent) == 4
    assert keys_under(redis_client, keys.base + "*") == sorted(
        keys.ref("alice", f"r{n}") for n in range(4)
    )


async def test_sequences_keep_growing_past_the_clock_and_across_a_lost_tally(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    """A mailbox whose last sequence is ahead of this Redis clock (another clock gave it)
    still gets strictly larger ones: from the tally, and from the index once the tally
    is lost."""
    keys = store.keys("bob")
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        first = (await store.send("alice", ["bob"], "first", 600, None, t)).ids["bob"]
        redis_client.zadd(keys.idx, {first: AHEAD})
        redis_client.hset(keys.tally, "s", str(AHEAD))
        second = (await store.send("alice", ["bob"], "second", 600, None, t)).ids["bob"]
        redis_client.delete(keys.tally)
        third = (await store.send("alice", ["bob"], "third", 600, None, t)).ids["bob"]
        fetched = (await store.fetch("bob", 0, 10)).deliveries
    assert [(d.id, d.seq) for d in fetched] == [
        (first, AHEAD),
        (second, AHEAD + 1),  # 1799999999999999 + 1: the digits carry
        (third, AHEAD + 2),
    ]
    assert [orjson.loads(d.envelope)["body"] for d in fetched] == ["first", "second", "third"]


async def test_expired_messages_a_full_mailbox_recounted_are_reported_once(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    """The recount before refusing drops expired messages from the index; the next
    session still hears of them, even when the mailbox was emptied in between."""
    small = with_quota(store, Quota(max_messages=3))
    keys = small.keys("bob")
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        short = [
            (await small.send("alice", ["bob"], "short", 1, None, t)).ids["bob"] for _ in range(3)
        ]
        await wait_until_gone(redis_client, *(keys.msg(i) for i in short))
        kept = (await small.send("alice", ["bob"], "kept", 600, None, t)).ids["bob"]  # recounts
        assert redis_client.zrange(keys.idx, 0, -1) == [kept]
        assert await small.ack("bob", [kept]) == 1
        # Nothing waits, but the tally still has expired messages to report.
        assert keys_under(redis_client, keys.base + "*") == [keys.tally]
        assert 0 < redis_client.pttl(keys.tally) <= RETENTION_MS
        start = await small.start_session("bob")
        assert (start.expired, start.waiting) == (3, 0)
        again = await small.start_session("bob")
    assert (again.expired, again.waiting) == (0, 0)
    assert keys_under(redis_client, keys.base + "*") == []


async def test_expired_messages_a_fetch_skipped_are_reported_at_the_next_session(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    keys = store.keys("bob")
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        short = (await store.send("alice", ["bob"], "short", 1, None, t)).ids["bob"]
        kept = (await store.send("alice", ["bob"], "kept", 600, None, t)).ids["bob"]
        await wait_until_gone(redis_client, keys.msg(short))
        assert [d.id for d in (await store.fetch("bob", 0, 10)).deliveries] == [
            kept
        ]  # drops `short`
        assert await store.ack("bob", [kept]) == 1
        start = await store.start_session("bob")
    assert (start.expired, start.waiting) == (1, 0)
    assert keys_under(redis_client, keys.base + "*") == []


async def test_a_session_start_reads_no_index_until_a_message_may_have_expired(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    keys = store.keys("bob")
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        short = (await store.send("alice", ["bob"], "short", 1, None, t)).ids["bob"]
        for n in range(20):
            await store.send("alice", ["bob"], f"m{n}", 600, None, t)
        before = calls(redis_client, "strlen")
        assert (await store.start_session("bob")).waiting == 21
        assert calls(redis_client, "strlen") == before  # the tally was enough
        await wait_until_gone(redis_client, keys.msg(short))
        start = await store.start_session("bob")  # `short` may have expired: a recount
        assert calls(redis_client, "strlen") > before
        assert (start.expired, start.waiting) == (1, 20)
        before = calls(redis_client, "strlen")
        assert (await store.start_session("bob")).waiting == 20
    assert calls(redis_client, "strlen") == before


async def test_a_tally_that_counts_too_little_heals_before_the_quota_is_passed(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    """A tally that lost count (an older relay, a restore) makes the count too low;
    the quota must still hold, from the index, once the tally is seen to be wrong."""
    small = with_quota(store, Quota(max_messages=2, max_bytes=1 << 20))
    keys = small.keys("bob")
    t = now_ms()
    with trio.fail_after(DEADLINE_S):
        for n in range(2):
            await small.send("alice", ["bob"], f"m{n}", 600, None, t)
        redis_client.hdel(keys.tally, "e")  # not a tally this relay wrote: rebuilt
        redis_client.hset(keys.tally, "n", "0")
        with pytest.raises(MailboxFull):
            await small.send("alice", ["bob"], "third", 600, None, t)
        assert tally_of(redis_client, small, "bob")["n"] == "2"
        # A tally that looks whole but counts too little heals at the next session.
        redis_client.hset(keys.tally, "n", "0")
        assert (await small.start_session("bob")).waiting == 2
        with pytest.raises(MailboxFull):
            await small.send("alice", ["bob"], "third", 600, None, t)
    assert tally_of(redis_client, small, "bob")["n"] == "2"


async def test_the_tally_counts_the_bytes_of_short_and_long_messages_exactly(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    """Bodies over 1 KiB are stored (appended) and acked (measured) another way."""
    keys = store.keys("bob")
    t = now_ms()
    bodies = ["short", "l" * 5000, "s" * 1000, "L" * 70_000]
    with trio.fail_after(DEADLINE_S):
        ids = [
            (await store.send("alice", ["bob"], b, 600, f"r{n}", t)).ids["bob"]
            for n, b in enumerate(bodies)
        ]
        sizes = [int(redis_client.strlen(keys.msg(i))) for i in ids]
        assert tally_of(redis_client, store, "bob")["b"] == str(sum(sizes))
        fetched = (await store.fetch("bob", 0, 10)).deliveries
        assert [orjson.loads(d.envelope)["body"] for d in fetched] == bodies
        assert await store.ack("bob", [ids[1], ids[2]]) == 2
        assert tally_of(redis_client, store, "bob")["b"] == str(sizes[0] + sizes[3])
        for n in (1, 2):  # their ref records are cut to the dedupe window
            assert 0 < redis_client.pttl(keys.ref("alice", f"r{n}")) <= store.dedupe_window_s * 1000


# -- sends that meet in one pump batch ----------------------------------------------------

BLOCK = LuaScript("block", "local x = 0 for i = 1, tonumber(ARGV[1]) do x = x + i end return 1")


async def in_one_batch(
    store: RedisMailboxStore, sends: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], Any]]:
    """Run `store.send(**s)` for each of `sends` concurrently while the pump waits on a
    slow script, so that they all queue up and leave in one batch; each send with its
    Accepted or exception, in the order they were queued."""
    outcomes: list[Any] = []
    queued: list[int] = []

    async def one(n: int) -> None:
        queued.append(n)  # store.send queues its commands before its first checkpoint
        try:
            outcome: Any = await store.send(**sends[n])
        except Exception as exc:
            outcome = exc
        outcomes.append((n, outcome))

    await store.pump.run_script(BLOCK, [], [1])  # loaded: one round trip below
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.pump.run_script, BLOCK, [], [20_000_000])
        await trio.testing.wait_all_tasks_blocked()
        for n in range(len(sends)):
            nursery.start_soon(one, n)
    by_n = dict(outcomes)
    return [(sends[n], by_n[n]) for n in queued]


def send_args(body: str, ref: str | None, to: str = "bob", ttl_s: int = 600) -> dict[str, Any]:
    return {
        "sender": "alice",
        "recipients": [to],
        "body": body,
        "ttl_s": ttl_s,
        "ref": ref,
        "now_ms": now_ms(),
    }


async def test_sends_to_one_mailbox_in_one_batch_run_as_one_script_in_their_order(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    sends = [send_args(f"m{n}", f"r{n}") for n in range(10)] + [send_args("c", None, to="carol")]
    with trio.fail_after(DEADLINE_S):
        await store.send(**send_args("warm", None, to="warm"))  # loaded, epoch refreshed
        before = calls(redis_client, "time")  # one TIME per run of send.lua
        done = await in_one_batch(store, sends)
        assert calls(redis_client, "time") - before == 2  # bob's ten as one, and carol's
        assert all(isinstance(o, Accepted) and not o.duplicate for _, o in done)
        fetched = (await store.fetch("bob", 0, 20)).deliveries
    to_bob = [(s, o) for s, o in done if s["recipients"] == ["bob"]]
    assert [orjson.loads(d.envelope)["body"] for d in fetched] == [s["body"] for s, _ in to_bob]
    assert [d.id for d in fetched] == [o.ids["bob"] for _, o in to_bob]
    seqs = [d.seq for d in fetched]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    assert tally_of(redis_client, store, "bob")["n"] == "10"
    idx_ttl = redis_client.pttl(store.keys("bob").idx)
    assert 590_000 < idx_ttl <= 600_000


async def test_refs_in_one_batch_behave_as_in_separate_sends(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    sends = [
        send_args("a", "same"),
        send_args("a", "same"),  # a retry of it
        send_args("other body", "same"),  # the ref reused for another request
        send_args("b", "rb"),
    ]
    with trio.fail_after(DEADLINE_S):
        await store.send(**send_args("warm", None, to="warm"))
        done = await in_one_batch(store, sends)
        fetched = (await store.fetch("bob", 0, 10)).deliveries
    # The first queued of those with ref "same" is stored; a later one of the same
    # request is its duplicate, one of another request a conflict.
    same = [(s, o) for s, o in done if s["ref"] == "same"]
    owner, stored = same[0]
    assert isinstance(stored, Accepted) and not stored.duplicate
    for s, o in same[1:]:
        if s["body"] == owner["body"]:
            assert isinstance(o, Accepted) and o.duplicate and o.ids == stored.ids
        else:
            assert isinstance(o, RefConflict)
    b = next(o for s, o in done if s["ref"] == "rb")
    assert [x.id for x in fetched] == [
        o.ids["bob"] for s, o in done if s is owner or s["ref"] == "rb"
    ]
    assert isinstance(b, Accepted)
    refs = keys_under(redis_client, store.keys("bob").base + "ref:*")
    assert refs == sorted(store.keys("bob").ref("alice", r) for r in ("same", "rb"))


async def test_the_quota_in_one_batch_admits_the_first_queued(
    store: RedisMailboxStore, redis_client: RedisClient
) -> None:
    small = with_quota(store, Quota(max_messages=3))
    sends = [send_args(f"m{n}", f"r{n}") for n in range(5)]
    with trio.fail_after(DEADLINE_S):
        await small.send(**send_args("warm", None, to="warm"))
        done = await in_one_batch(small, sends)
        fetched = (await small.fetch("bob", 0, 10)).deliveries
    assert [type(o) for _, o in done] == [Accepted] * 3 + [MailboxFull] * 2
    assert [x.id for x in fetched] == [o.ids["bob"] for _, o in done[:3]]
    refs = keys_under(redis_client, small.keys("bob").base + "ref:*")
    assert refs == sorted(small.keys("bob").ref("alice", s["ref"]) for s, _ in done[:3])


async def test_a_batch_of_sends_to_a_new_mailbox_leaves_every_key_with_a_ttl(
    store: RedisMailboxStore, redis_client: RedisClient, prefix: str
) -> None:
    sends = [send_args(f"m{n}", f"r{n}", ttl_s=5 + n) for n in range(5)]
    with trio.fail_after(DEADLINE_S):
        await store.send(**send_args("warm", None, to="warm"))
        done = await in_one_batch(store, sends)
    assert all(isinstance(o, Accepted) for _, o in done)
    keys = keys_under(redis_client, store.keys("bob").base + "*")
    assert len(keys) == 5 + 5 + 2  # messages, ref records, index and tally
    for key in keys:
        assert 0 < redis_client.pttl(key) <= RETENTION_MS, key
    assert 8_000 < redis_client.pttl(store.keys("bob").idx) <= 9_000  # the longest ttl
