"""End to end: the ephemerality contract of protocol.md, point by point (acked copies are gone,
every key has a TTL within retention, no bodies or tokens in the logs, startup refuses an
unsafe Redis, `relay audit` passes after traffic).
"""

from __future__ import annotations

import logging

import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    close_code,
    deliveries,
    keys_under,
    msg_key,
    poll_until,
    raw_session,
    receive_n,
    receive_until,
    recv,
    relay_config,
    request,
    send_json,
    signed_token,
    token,
)
from trio_websocket import ConnectionClosed

from relay.cli import main as relay_cli
from relay.client import RelayClientError, open_relay
from relay.codes import CloseCode
from relay.embedded import EmbeddedServer
from relay.errors import UnsafeRedis
from relay.logs import pseudonym
from relay.redis.admin import RedisClient, connect
from relay.server import RunningRelay, serve_relay

pytest_plugins = ["relay_fixtures"]


# -- the ephemerality contract ------------------------------------------------------


async def test_ephemerality_1_acked_means_the_copy_is_gone_from_redis(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            accepted = await alice.send(["bob", "carol"], "gone when acked")
        key = msg_key(prefix, "bob", accepted["ids"]["bob"])
        assert redis_client.exists(key) == 1
        async with raw_session(relay.url, "bob") as (bob, _):
            (message,) = await deliveries(bob, 1)
            acked = await request(bob, {"type": "ack", "ids": [message["id"]], "ref": "a"})
            assert acked["count"] == 1
            # `acked` was sent after the deletion: nothing of the copy is left
            assert redis_client.exists(key) == 0
            assert redis_client.zscore(f"{prefix}{{bob}}:idx", message["id"]) is None
    assert redis_client.exists(msg_key(prefix, "carol", accepted["ids"]["carol"])) == 1


async def _busy_mixed_run(relay: RunningRelay, redis_client: RedisClient, prefix: str) -> None:
    """Sends (single, multi-recipient, with and without ref, repeated refs, short ttls, refused
    for a full mailbox), deliveries, acks with and without ref, and expiries.

    The relay must run with max_mailbox_messages=25."""
    async with (
        open_relay(relay.url, token("alice")) as alice,
        open_relay(relay.url, token("bob")) as bob,
    ):
        expiring = await alice.send(["carol", "dave"], "short", ttl_s=1)
        for n in range(10):
            await alice.send(["bob", "carol", "dave"], f"multi {n}", ttl_s=30 + n)
            await alice.send("bob", f"plain {n}", ref=None)
            await alice.send("erin", f"ref {n % 5}", ref=f"same-{n % 5}", ttl_s=60)
            await bob.send("alice", f"back {n}", ttl_s=5)
        for n in range(25):
            await alice.send("frank", f"fill {n}", ttl_s=20)
        with pytest.raises(RelayClientError) as full:
            await alice.send(["gina", "frank"], "all or nothing", ref="full")
        assert full.value.code == "mailbox_full"
        got = await receive_n(bob, 20)
        assert await bob.ack([m.id for m in got[::2]]) == 10
        got = await receive_n(alice, 10)
        await alice.ack([m.id for m in got[:5]], wait=False)
        await alice.send("alice", "end")
        await receive_until(alice, "end")
    key = msg_key(prefix, "carol", expiring["ids"]["carol"])
    await poll_until(lambda: not redis_client.exists(key))
    async with open_relay(relay.url, token("carol")) as carol:
        assert carol.welcome["expired"] == 1
        got = await receive_n(carol, 10)
        await carol.ack([m.id for m in got[5:]])
    assert not any("{gina}" in key for key in keys_under(redis_client, prefix))


async def test_ephemerality_2_every_key_has_a_ttl_within_retention_after_a_busy_run(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    retention_ms = 120_000
    relay = await make_relay(retention_s=120, max_mailbox_messages=25)
    with trio.fail_after(3 * DEADLINE_S):
        await _busy_mixed_run(relay, redis_client, prefix)
    keys = keys_under(redis_client, prefix)
    assert keys
    pttls = {key: redis_client.pttl(key) for key in keys}
    bad = {key: pttl for key, pttl in pttls.items() if not 0 < pttl <= retention_ms}
    assert not bad, bad


async def test_ephemerality_3_no_bodies_or_tokens_in_the_logs(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_body = "body-7f3a9c1e-never-logged"
    relay = await make_relay(max_body_bytes=1024, auth_timeout_s=0.5)
    alice_token = token("alice")
    bad_token = signed_token({"sub": "alice", "exp": 1, "note": secret_body})
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, alice_token) as alice:
            await alice.send("bob", secret_body)
            await alice.send(["bob", "carol"], secret_body + " multi", ref="r1")
            for bad in (
                {"type": "send", "to": "bob", "body": secret_body * 100},  # too_large
                {"type": "send", "to": "not ok!", "body": secret_body},
                {"type": "send", "to": "bob", "body": secret_body, "ttl": 0},
                {"type": secret_body},
                {"type": "auth", "token": alice_token},
            ):
                await send_json(alice.ws, bad)
            await alice.send("alice", "sync")  # errors above are answered before this
            await alice.receive()
        async with raw_session(relay.url, "bob") as (bob, _):
            await deliveries(bob, 2)
        with pytest.raises(ConnectionClosed):
            async with open_relay(relay.url, bad_token, auth="frame"):
                raise AssertionError("the expired token was accepted")
    assert caplog.records  # the relay did log something at DEBUG
    text = caplog.text + "".join(str(record.args) for record in caplog.records)
    assert secret_body not in text
    assert alice_token not in text
    assert bad_token not in text
    for part in alice_token.split("."):
        assert part not in text


async def test_ephemerality_3_logs_name_mailboxes_only_pseudonymously(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # debug logging would show mailbox ids as they are
    relay = await make_relay(rate_limit_per_s=0.01, rate_burst=2)
    sender, recipient = "sender-4b1d9e", "recipient-8c2f7a"
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token(sender)) as alice:
            await alice.send(recipient, "x")
        async with (
            raw_session(relay.url, recipient) as (bob, _),
            raw_session(relay.url, recipient),  # 4409 for bob: logged
        ):
            assert await close_code(bob) == CloseCode.REPLACED
        with pytest.raises(ConnectionClosed):
            async with open_relay(relay.url, signed_token({"sub": sender, "exp": 1})):
                pass
        async with raw_session(relay.url, sender) as (flooder, _):  # a warning names it
            while True:
                try:
                    await send_json(flooder, {"type": "ack", "ids": ["x"], "ref": "r"})
                    await recv(flooder)
                except ConnectionClosed:
                    break
        relay.shutdown()
    text = caplog.text + "".join(str(record.args) for record in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(pseudonym(sender) in line for line in warnings), warnings
    assert sender not in text
    assert recipient not in text


async def test_ephemerality_4_startup_refuses_a_persisting_redis(
    make_relay: RelayFactory, redis_server: EmbeddedServer, prefix: str
) -> None:
    with EmbeddedServer(binary=redis_server.binary) as persisting:
        client = connect(persisting.url)
        client.config_set("appendonly", "yes")
        try:
            with trio.fail_after(DEADLINE_S), pytest.raises(UnsafeRedis):
                await serve_relay(relay_config(persisting.url, prefix))
            relay = await make_relay(redis_url=persisting.url, allow_persistent_redis=True)
            with trio.fail_after(DEADLINE_S):
                async with open_relay(relay.url, token("alice")) as alice:
                    await alice.send("alice", "it runs")
                    assert (await alice.receive()).body == "it runs"
        finally:
            client.config_set("appendonly", "no")  # else the server takes 5 s to stop
            client.close()


async def test_ephemerality_4_evicting_redis_refused_unless_allowed_then_a_warning(
    make_relay: RelayFactory,
    redis_server: EmbeddedServer,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """protocol.md asks for a warning; the relay refuses unless --allow-eviction (README.md),
    and warns when allowed."""
    caplog.set_level(logging.WARNING)
    with EmbeddedServer(binary=redis_server.binary) as evicting:
        client = connect(evicting.url)
        try:
            client.config_set("maxmemory-policy", "allkeys-lru")
        finally:
            client.close()
        with trio.fail_after(DEADLINE_S), pytest.raises(UnsafeRedis, match="maxmemory-policy"):
            await serve_relay(relay_config(evicting.url, prefix))
        relay = await make_relay(redis_url=evicting.url, allow_eviction=True)
        assert "maxmemory-policy" in caplog.text
        with trio.fail_after(DEADLINE_S):
            async with open_relay(relay.url, token("alice")) as alice:
                await alice.send("alice", "it runs")
                assert (await alice.receive()).body == "it runs"


async def test_ephemerality_5_relay_audit_exits_0_after_traffic(
    make_relay: RelayFactory,
    redis_client: RedisClient,
    redis_url: str,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await make_relay(retention_s=120, max_mailbox_messages=25)
    with trio.fail_after(3 * DEADLINE_S):
        await _busy_mixed_run(relay, redis_client, prefix)
    args = ["audit", "--redis-url", redis_url, "--key-prefix", prefix, "--retention", "120s"]
    status = await trio.to_thread.run_sync(relay_cli, args)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "messages: 0" not in out  # it audited real traffic
