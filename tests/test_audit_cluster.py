"""Contract points 4 and 5 on a Redis Cluster: the startup checks and `relay audit` read
every primary, and each violation names the node it is on."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest
import redis
import trio

from relay.audit import audit
from relay.cli import main
from relay.embedded_cluster import EmbeddedCluster
from relay.errors import UnsafeRedis
from relay.redis.admin import connect, primaries
from relay.redis.checks import NOTHING_ALLOWED, check_nodes, read_node_settings
from relay.store_redis import new_message_id

pytest_plugins = ["cluster_fixtures"]

RETENTION_S = 3600
MAILBOXES = 30  # enough hash tags that every primary holds some


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def cluster_client(redis_cluster: EmbeddedCluster) -> Iterator[redis.RedisCluster]:
    client = connect(redis_cluster.url)
    assert isinstance(client, redis.RedisCluster)
    yield client
    client.close()


def store_messages(client: redis.RedisCluster, prefix: str, sent_ms: int) -> list[str]:
    """One message per mailbox, shaped like the store's keys, with a PX TTL."""
    keys = [f"{prefix}{{m{i}}}:msg:{new_message_id(sent_ms + i)}" for i in range(MAILBOXES)]
    for key in keys:
        client.set(key, "x", px=600_000)
    return keys


def node(member_port: int) -> str:
    return f"127.0.0.1:{member_port}"


def test_contract_5_audit_on_a_cluster_names_the_node_of_a_key_without_ttl(
    redis_cluster: EmbeddedCluster,
    cluster_client: redis.RedisCluster,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = store_messages(cluster_client, prefix, wall_ms() - 5000)
    holders = {redis_cluster.primary_for(key).port for key in keys}
    assert holders == {m.port for m in redis_cluster.primaries()}  # every primary holds some
    args = ["audit", "--redis-url", redis_cluster.url, "--key-prefix", prefix]
    assert main([*args, "--retention", "1h"]) == 0
    out = capsys.readouterr().out
    assert "3 primaries" in out and f"messages: {MAILBOXES}" in out and out.endswith("OK\n")

    planted = f"{prefix}{{m7}}:msg:0-planted"
    cluster_client.set(planted, "x")
    owner = node(redis_cluster.primary_for(planted).port)
    assert main([*args, "--retention", "1h"]) == 1
    out = capsys.readouterr().out
    assert f"  {planted} on {owner}\n" in out
    (violation,) = [line for line in out.splitlines() if line.startswith("VIOLATION")]
    assert violation == f"VIOLATION: {owner}: 1 keys under {prefix!r} have no TTL"


def test_contract_5_audit_on_a_cluster_names_the_node_of_a_ttl_over_retention(
    redis_cluster: EmbeddedCluster, cluster_client: redis.RedisCluster, prefix: str
) -> None:
    long_lived = f"{prefix}{{m3}}:idx"
    cluster_client.set(long_lived, "x", px=RETENTION_S * 1000 + 60_000)
    report = audit(cluster_client, prefix, RETENTION_S, wall_ms())
    owner = node(redis_cluster.primary_for(long_lived).port)
    assert [key for key, _ in report.over_retention_listed] == [long_lived]
    assert report.violations == (
        f"{owner}: 1 keys under {prefix!r} have a TTL longer than the retention window "
        f"of {RETENTION_S} s",
    )
    (flagged,) = [n for n in report.nodes if not n.ok]
    assert flagged.node == owner and flagged.over_retention == 1


async def test_contract_5_audit_json_on_a_cluster_reports_per_node_and_in_total(
    redis_cluster: EmbeddedCluster, cluster_client: redis.RedisCluster, prefix: str
) -> None:
    store_messages(cluster_client, prefix, wall_ms() - 60_000)
    planted = f"{prefix}{{m11}}:stray"
    cluster_client.set(planted, "no TTL")
    owner = node(redis_cluster.primary_for(planted).port)
    args = [sys.executable, "-m", "relay", "audit", "--redis-url", redis_cluster.url, "--json"]
    with trio.fail_after(60):
        done = await trio.run_process(
            [*args, "--key-prefix", prefix, "--retention", "1h"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert (report["keys"], report["messages"]) == (MAILBOXES + 1, MAILBOXES)
    assert report["keys_without_ttl"] == {"count": 1, "listed": [planted]}
    nodes = report["nodes"]
    assert sorted(n["node"] for n in nodes) == sorted(
        node(m.port) for m in redis_cluster.primaries()
    )
    for field in ("keys", "messages", "ref_records"):
        assert sum(n[field] for n in nodes) == report[field]
    assert sum(n["keys_without_ttl"]["count"] for n in nodes) == 1
    assert all(n["keys"] > 0 for n in nodes)
    assert max(n["oldest_message_age_ms"] for n in nodes) == report["oldest_message_age_ms"]
    assert [n["node"] for n in nodes if not n["ok"]] == [owner]
    assert report["violations"] == [f"{owner}: 1 keys under {prefix!r} have no TTL"]
    assert all(n["settings"]["save"] == "" for n in nodes)


def test_contract_4_startup_check_names_the_one_primary_that_snapshots(
    redis_cluster: EmbeddedCluster,
) -> None:
    port = redis_cluster.primaries()[1].port
    with redis.Redis.from_url(redis_cluster.node_url(port), decode_responses=True) as one:
        one.config_set("save", "3600 1")
        try:
            with connect(redis_cluster.url) as client:
                nodes = read_node_settings(client)
            assert [n.node for n in nodes] == [name for name, _ in primaries(client)]
            with pytest.raises(UnsafeRedis) as refused:
                check_nodes(nodes, NOTHING_ALLOWED)
        finally:
            one.config_set("save", "")
    message = str(refused.value)
    assert message.startswith(f"{node(port)}: Redis setting save is '3600 1'")
    others = [node(m.port) for m in redis_cluster.primaries() if m.port != port]
    assert not any(other in message for other in others)


async def test_contract_4_relay_serve_refuses_a_cluster_with_one_unsafe_primary(
    redis_cluster: EmbeddedCluster,
) -> None:
    port = redis_cluster.primaries()[0].port
    serve = [sys.executable, "-m", "relay", "serve", "--redis-url", redis_cluster.url]
    with redis.Redis.from_url(redis_cluster.node_url(port), decode_responses=True) as one:
        one.config_set("maxmemory-policy", "allkeys-lru")
        try:
            with trio.fail_after(60):
                done = await trio.run_process(
                    [*serve, "--port", "0", "--jwt-secret", "s" * 32],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        finally:
            one.config_set("maxmemory-policy", "noeviction")
    assert done.returncode == 2
    err = done.stderr.decode()
    assert f"{node(port)}: Redis setting maxmemory-policy is 'allkeys-lru'" in err


def test_audit_of_an_unreachable_cluster_names_no_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "redis+cluster://relay:s3cret-pw@127.0.0.1:1,127.0.0.1:2"
    assert main(["audit", "--redis-url", url]) == 2
    err = capsys.readouterr().err
    assert "cannot audit Redis" in err and "127.0.0.1" in err
    assert "s3cret-pw" not in err


@pytest.fixture
def cluster_user(redis_cluster: EmbeddedCluster) -> Iterator[tuple[str, str]]:
    """A user with a password on every node (ACLs are per node), removed afterwards."""
    user, password = "auditor", "pw-of-the-auditor"
    nodes = [redis_cluster.node_url(port) for _, port, _ in redis_cluster.nodes]
    for url in nodes:
        with redis.Redis.from_url(url) as one:
            one.acl_setuser(
                user, enabled=True, passwords=[f"+{password}"], keys="*", commands=["+@all"]
            )
    yield user, password
    for url in nodes:
        with redis.Redis.from_url(url) as one:
            one.acl_deluser(user)


def test_audit_logs_in_to_every_node_and_shows_no_password(
    redis_cluster: EmbeddedCluster,
    cluster_user: tuple[str, str],
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    user, password = cluster_user
    seeds = redis_cluster.url.removeprefix("redis+cluster://")
    url = f"redis+cluster://{user}:{password}@{seeds}"
    with connect(url) as client:
        assert all(server.acl_whoami() == user for _, server in primaries(client))
    assert main(["audit", "--redis-url", url, "--key-prefix", prefix]) == 0
    assert password not in capsys.readouterr().out
    wrong = f"redis+cluster://{user}:not-the-password@{seeds}"
    assert main(["audit", "--redis-url", wrong, "--key-prefix", prefix]) == 2
    captured = capsys.readouterr()
    assert "cannot audit Redis" in captured.err
    assert "not-the-password" not in captured.out + captured.err
