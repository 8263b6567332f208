"""End to end: the ops port (/healthz /readyz /metrics /.well-known/relay-policy).

Real relays over real WebSockets, and real HTTP to the ops port through a tiny client of
our own (relay_fixtures.http). Every I/O step has a deadline; waits for state no frame
announces poll with one.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    http,
    open_stalled_socket,
    poll_until,
    raw_session,
    relay_config,
    request,
    scrape,
    serving,
    token,
    unique,
)

from relay.client import open_relay
from relay.config import Config
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.errors import UnsafeRedis
from relay.policy_document import policy as policy_document
from relay.redis.admin import connect
from relay.redis.checks import RedisSettings

pytest_plugins = ["relay_fixtures"]


async def wait_for_status(port: int, path: str, status: int, timeout_s: float) -> None:
    """Poll `path` until it answers `status`; /healthz must stay 200 all along."""

    async def answers() -> bool:
        assert (await http(port, "/healthz")).status == 200
        return (await http(port, path)).status == status

    with trio.fail_after(timeout_s):
        await poll_until(answers)


# -- the ops endpoints -------------------------------------------------------------


async def test_metrics_counters_move_by_exactly_the_traffic_sent(make_relay: RelayFactory) -> None:
    relay = await make_relay(ops_port=free_loopback_port())
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    body = unique("metrics-body")
    before = await scrape(relay.ops_port)

    with trio.fail_after(DEADLINE_S):
        async with (
            raw_session(relay.url, alice) as (sender, _),
            open_relay(relay.url, token(bob)) as receiver,
        ):
            ids = []
            for i in range(3):
                accepted = await request(
                    sender, {"type": "send", "ref": f"s{i}", "to": bob, "body": f"{body}-{i}"}
                )
                assert accepted["type"] == "accepted", accepted
                ids.append(accepted["ids"][bob])
            # One send to two recipients: two copies, one delivered (carol never connects).
            both = await request(
                sender, {"type": "send", "ref": "s3", "to": [bob, carol], "body": body}
            )
            assert both["type"] == "accepted", both
            ids.append(both["ids"][bob])
            too_long = await request(
                sender, {"type": "send", "ref": "bad1", "to": bob, "body": body, "ttl": 10**9}
            )
            assert too_long["code"] == "ttl_too_long", too_long
            bad = await request(sender, {"type": "send", "ref": "bad2", "to": bob})
            assert bad["code"] == "bad_frame", bad

            received = [await receiver.receive() for _ in range(4)]
            assert [m.id for m in received] == ids
            assert await receiver.ack([*ids, "0-unknown"]) == 4

    after = before

    async def both_closes_counted() -> bool:
        # The relay counts a close once the connection handler has ended.
        nonlocal after
        after = await scrape(relay.ops_port)
        closed = after.value("relay_connections_closed_total", code="1000")
        return closed - before.value("relay_connections_closed_total", code="1000") >= 2

    after = before
    with trio.fail_after(DEADLINE_S):
        await poll_until(both_closes_counted)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("relay_messages_accepted_total") == 5
    assert moved("relay_messages_delivered_total") == 4
    assert moved("relay_messages_acked_total") == 4
    assert moved("relay_connections_opened_total") == 2
    assert moved("relay_connections_closed_total", code="1000") == 2
    assert after.value("relay_connections") == before.value("relay_connections") == 0
    assert moved("relay_requests_rejected_total", code="ttl_too_long") == 1
    assert moved("relay_requests_rejected_total", code="bad_frame") == 1
    rejected = {
        dict(labels)["code"]: value
        for (name, labels), value in after.samples.items()
        if name == "relay_requests_rejected_total"
    }
    assert rejected == {"ttl_too_long": 1, "bad_frame": 1}
    assert moved("relay_delivery_latency_seconds_count") == 4
    assert moved("relay_messages_expired_undelivered_total") == 0
    for secret in (alice, bob, carol, body, *ids):
        assert secret not in after.text, f"{secret!r} appears in /metrics"


async def test_readyz_follows_redis_and_shutdown_while_healthz_stays_ok(prefix: str) -> None:
    port = free_loopback_port()
    redis = EmbeddedServer(port=port)
    redis.start()
    replacement: EmbeddedServer | None = None
    try:
        config = relay_config(redis.url, prefix, ops_port=free_loopback_port())
        async with serving(config) as relay:
            ops = relay.ops_port
            with trio.fail_after(DEADLINE_S):
                ready = await http(ops, "/readyz")
            assert ready.status == 200, ready
            assert (await http(ops, "/healthz")).status == 200

            redis.stop()
            await wait_for_status(ops, "/readyz", 503, timeout_s=15)
            assert b"redis" in (await http(ops, "/readyz")).body.lower()

            replacement = EmbeddedServer(port=port)
            replacement.start()
            await wait_for_status(ops, "/readyz", 200, timeout_s=15)
            assert (await scrape(ops)).value("relay_hub_reconnects_total") >= 1

            # Draining: a session that never answers the close keeps the relay in its drain
            # for a while, and /readyz says 503 meanwhile.
            with trio.fail_after(DEADLINE_S):
                stalled = await open_stalled_socket(relay.port, token(unique("drain")))
            async with stalled:
                relay.shutdown()
                with trio.fail_after(DEADLINE_S):
                    draining = await http(ops, "/readyz")
                assert draining.status == 503, draining
                assert b"shutting down" in draining.body
                assert (await http(ops, "/healthz")).status == 200
    finally:
        redis.stop()
        if replacement is not None:
            replacement.stop()


async def test_policy_endpoint_reports_configured_retention_as_json(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(ops_port=free_loopback_port(), retention_s=3600)
    response = await http(relay.ops_port, "/.well-known/relay-policy")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    policy: dict[str, Any] = orjson.loads(response.body)
    assert policy["retention_s"] == 3600
    assert policy["max_ttl_s"] == 3600
    assert policy["redis"]["persistence"] == "off"
    assert policy["redis"]["maxmemory_policy"] == "noeviction"
    assert policy["redis"]["slowlog"] == "off"
    assert policy["bodies_logged"] is False
    assert policy["mailboxes_in_logs"] == "keyed hash"
    assert policy["protocol"] == "relay.v1"
    assert isinstance(policy["version"], str) and policy["version"]


async def test_ops_unknown_path_is_404_and_post_is_405(make_relay: RelayFactory) -> None:
    relay = await make_relay(ops_port=free_loopback_port())
    ops = relay.ops_port
    assert (await http(ops, "/nope")).status == 404
    assert (await http(ops, "/metrics/../secret")).status == 404
    assert (await http(ops, "/healthz", method="POST")).status == 405
    assert (await http(ops, "/metrics", method="POST")).status == 405
    head = await http(ops, "/healthz", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert (await http(ops, "/healthz?probe=1")).status == 200


async def test_slowlog_refused_unless_allowed_and_reported_in_policy(
    redis_server: EmbeddedServer, prefix: str
) -> None:
    """A Redis whose slow log is on keeps command arguments (bodies): refused at startup,
    and reported by the policy endpoint when --allow-slowlog lets the relay run."""
    with EmbeddedServer(binary=redis_server.binary) as server:
        with connect(server.url) as client:
            client.config_set("slowlog-log-slower-than", "10000")
        with pytest.raises(BaseExceptionGroup) as refused:
            async with serving(relay_config(server.url, prefix)):
                pass  # pragma: no cover - the relay must not start
        unsafe = refused.value.subgroup(UnsafeRedis)
        assert unsafe is not None
        assert "--allow-slowlog" in str(unsafe.exceptions[0])
        config = relay_config(server.url, prefix, ops_port=free_loopback_port(), allow_slowlog=True)
        async with serving(config) as relay:
            policy = orjson.loads((await http(relay.ops_port, "/.well-known/relay-policy")).body)
    assert policy["redis"]["slowlog"] == "on (allowed by --allow-slowlog)"


def test_policy_uses_the_checks_evaluation() -> None:
    """One place decides: an append-only Redis whose `save` could not be read persists."""
    settings = RedisSettings(
        save=None, appendonly="yes", maxmemory_policy="noeviction", slowlog_log_slower_than="-1"
    )
    redis = policy_document(Config(allow_persistent_redis=True), settings, None)["redis"]
    assert redis["persistence"] == "on (allowed by --allow-persistent-redis)"
    assert redis["slowlog"] == "off"
