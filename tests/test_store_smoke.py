from relay.store_redis import RedisMailboxStore
from relay.redis_pump import RedisClient


async def test_send_fetch_ack_roundtrip(store: RedisMailboxStore, redis_client: RedisClient, prefix: str) -> None:
    accepted = await store.send("alice", ["bob"], "hello", 60, "r1", 1_000_000)
    start = await store.start_session("bob")
    assert start.expired == 0 and start.waiting == 1
    got = await store.fetch("bob", 0, 10)
    assert [d.id for d in got] == [accepted.ids["bob"]]
    for key in redis_client.scan_iter(f"{prefix}*"):
        assert 0 < redis_client.pttl(key) <= 3600_000, key
    assert await store.ack("bob", [accepted.ids["bob"]]) == 1
    left = sorted(redis_client.scan_iter(f"{prefix}*"))
    assert left == [f"{prefix}{{bob}}:ref:5:alice:r1"]
