"""Contract point 5: `relay audit` checks point 2 on a live Redis and exits non-zero on a violation."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from relay.audit import LISTED_MAX, audit
from relay.cli import main
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient, connect
from relay.redis.checks import Allowed
from relay.store_redis import RedisMailboxStore

RETENTION_S = 3600  # the `store` fixture's retention


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def send_1000(store: RedisMailboxStore, first_sent_ms: int) -> None:
    """1,000 messages: 100 sends to 10 mailboxes, the first at `first_sent_ms`."""
    mailboxes = [f"m{i}" for i in range(10)]
    for i in range(100):
        await store.send("alice", mailboxes, f"body {i}", 600, None, first_sent_ms + i)


@pytest.fixture
def private_server(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the same kind as the shared one, free to be made unsafe."""
    with EmbeddedServer(binary=redis_server.binary) as server:
        yield server


async def test_contract_5_audit_passes_then_names_a_key_without_ttl(
    store: RedisMailboxStore,
    redis_client: RedisClient,
    redis_url: str,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now_ms = wall_ms()
    await send_1000(store, now_ms - 5000)
    report = audit(redis_client, prefix, RETENTION_S, now_ms)
    assert report.ok, report.violations
    assert report.messages == 1000
    # messages, an index and a tally per mailbox, and the storage's epoch
    assert report.keys == 1000 + 10 + 10 + 1
    assert report.oldest_message_age_ms == 5000
    args = ["audit", "--redis-url", redis_url, "--key-prefix", prefix, "--retention", "1h"]
    assert main(args) == 0
    assert "FAILED" not in capsys.readouterr().out

    stray = f"{prefix}{{m3}}:stray"
    redis_client.set(stray, "not a relay key")
    redis_client.set(f"other-{prefix}{{m3}}:msg:0-x", "outside the prefix")  # ignored
    report = audit(redis_client, prefix, RETENTION_S, now_ms)
    assert not report.ok
    assert (report.keys, report.without_ttl, report.without_ttl_listed) == (1022, 1, (stray,))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert stray in out and "not a relay key" not in out
    assert "other-" not in out


def test_contract_5_audit_flags_ttl_over_retention(redis_client: RedisClient, prefix: str) -> None:
    long_lived = f"{prefix}{{m}}:idx"
    redis_client.set(long_lived, "x", px=RETENTION_S * 1000 + 60_000)
    redis_client.set(f"{prefix}{{m}}:tally", "x", px=RETENTION_S * 1000)  # at the bound: fine
    redis_client.set(f"other{prefix}{{m}}:idx", "x", px=RETENTION_S * 2000)  # outside the prefix
    report = audit(redis_client, prefix, RETENTION_S, wall_ms())
    assert (report.keys, report.over_retention, report.without_ttl) == (2, 1, 0)
    ((key, ttl_ms),) = report.over_retention_listed
    assert key == long_lived
    assert RETENTION_S * 1000 < ttl_ms <= RETENTION_S * 1000 + 60_000
    assert not report.ok
    assert long_lived in report.to_text()


def test_contract_5_audit_takes_the_prefix_literally(
    redis_client: RedisClient, prefix: str
) -> None:
    glob_prefix = prefix + "[a]*?\\:"
    redis_client.set(glob_prefix + "{m}:idx", "x")
    redis_client.set(prefix + "a-b\\:{m}:idx", "x")  # what the prefix would match as a pattern
    report = audit(redis_client, glob_prefix, RETENTION_S, wall_ms())
    assert report.without_ttl_listed == (glob_prefix + "{m}:idx",)


def test_contract_5_audit_counts_every_key_but_lists_a_few(
    redis_client: RedisClient, prefix: str
) -> None:
    for i in range(LISTED_MAX + 5):
        redis_client.set(f"{prefix}{{m}}:msg:{i:x}-id", "x")
    report = audit(redis_client, prefix, RETENTION_S, now_ms=LISTED_MAX + 1000)
    assert (report.keys, report.messages, report.without_ttl) == (105, 105, 105)
    assert len(report.without_ttl_listed) == LISTED_MAX
    assert report.oldest_message_age_ms == LISTED_MAX + 1000  # the id sent at 0 ms


def test_contract_5_audit_of_an_empty_prefix(redis_client: RedisClient, prefix: str) -> None:
    report = audit(redis_client, prefix, RETENTION_S, wall_ms())
    assert report.ok
    assert (report.keys, report.messages, report.oldest_message_age_ms) == (0, 0, None)


def test_contract_5_audit_counts_unsafe_settings_unless_allowed(
    private_server: EmbeddedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with connect(private_server.url) as client:
        client.config_set("save", "3600 1")
        client.config_set("maxmemory-policy", "allkeys-lru")
        report = audit(client, "relay:", RETENTION_S, wall_ms())
        assert report.settings.save == "3600 1"
        assert [v.split(" is ")[0] for v in report.violations] == [
            f"{private_server.socket_path}: Redis setting save",
            f"{private_server.socket_path}: Redis setting maxmemory-policy",
        ]
        allowed = audit(client, "relay:", RETENTION_S, wall_ms(), Allowed(True, True))
        assert allowed.ok and len(allowed.warnings) == 2

    url = private_server.url
    assert main(["audit", "--redis-url", url, "--allow-persistent-redis"]) == 1
    assert "maxmemory-policy" in capsys.readouterr().out
    assert main(["audit", "--redis-url", url, "--allow-persistent-redis", "--allow-eviction"]) == 0


def test_contract_5_cli_options_from_environment_and_flags_win(
    redis_client: RedisClient,
    redis_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    redis_client.set(f"{prefix}{{m}}:idx", "x", px=600_000)
    monkeypatch.setenv("RELAY_REDIS_URL", redis_url)
    monkeypatch.setenv("RELAY_KEY_PREFIX", prefix)
    monkeypatch.setenv("RELAY_RETENTION", "5m")
    assert main(["audit", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["prefix"], report["retention_s"], report["keys"]) == (prefix, 300, 1)
    assert main(["audit", "--json", "--retention", "10m"]) == 0
    assert json.loads(capsys.readouterr().out)["retention_s"] == 600


def test_contract_5_cli_usage_errors_and_unreachable_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("RELAY_REDIS_URL", raising=False)
    assert main(["audit"]) == 2
    assert "--redis-url" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["audit", "--redis-url", "redis://127.0.0.1:1", "--retention", "7 days"])
    assert usage.value.code == 2
    assert "invalid duration '7 days'" in capsys.readouterr().err
    assert main(["audit", "--redis-url", f"unix://{tmp_path}/missing.sock"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot audit Redis" in err[0]


async def test_contract_5_cli_subprocess_json(
    store: RedisMailboxStore, redis_client: RedisClient, redis_url: str, prefix: str
) -> None:
    await send_1000(store, wall_ms() - 60_000)
    redis_client.set(f"{prefix}{{m0}}:msg:0-planted", "x")
    args = [sys.executable, "-m", "relay", "audit", "--redis-url", redis_url, "--json"]
    with trio.fail_after(60):
        done = await trio.run_process(
            [*args, "--key-prefix", prefix, "--retention", "1h"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert (report["keys"], report["messages"]) == (1022, 1001)
    assert report["keys_without_ttl"] == {"count": 1, "listed": [f"{prefix}{{m0}}:msg:0-planted"]}
    assert report["keys_over_retention"] == {"count": 0, "listed": []}
    assert report["settings"] == {
        "save": "",
        "appendonly": "no",
        "maxmemory_policy": "noeviction",
        "slowlog_log_slower_than": "-1",
    }
    assert report["oldest_message_age_ms"] > 1_000_000_000  # the planted id says 1970
    assert len(report["violations"]) == 1 and report["warnings"] == []


@pytest.fixture
def cluster(redis_server: EmbeddedServer) -> Iterator[tuple[RedisClient, RedisClient]]:
    """A two-primary cluster of private servers: a cluster client, and one to the second node."""
    with ExitStack() as stack:
        bus_ports = [free_loopback_port() for _ in range(2)]
        servers = [
            stack.enter_context(
                EmbeddedServer(
                    binary=redis_server.binary,
                    port=free_loopback_port(),
                    extra_args=("--cluster-enabled", "yes", "--cluster-port", str(bus_port)),
                )
            )
            for bus_port in bus_ports
        ]
        a, b = (stack.enter_context(connect(s.url)) for s in servers)
        a.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)
        b.execute_command("CLUSTER", "ADDSLOTSRANGE", 8192, 16383)
        a.execute_command("CLUSTER", "MEET", "127.0.0.1", servers[1].port, bus_ports[1])
        deadline = time.monotonic() + 10
        while not all("cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in (a, b)):
            assert time.monotonic() < deadline, "the cluster did not form"
        yield stack.enter_context(connect(f"redis+cluster://127.0.0.1:{servers[0].port}")), b


def test_contract_5_audit_on_a_cluster_reads_every_primary(
    cluster: tuple[RedisClient, RedisClient], prefix: str
) -> None:
    client, second = cluster
    for i in range(20):  # spread over both primaries
        client.set(f"{prefix}{{m{i}}}:msg:{i:x}-id", "x", px=60_000)
    client.set(f"{prefix}{{m0}}:stray", "x")
    assert 0 < second.dbsize() < 21
    second.config_set("maxmemory-policy", "volatile-lru")
    report = audit(client, prefix, RETENTION_S, now_ms=1000)
    assert (report.keys, report.messages, report.without_ttl) == (21, 20, 1)
    assert report.oldest_message_age_ms == 1000
    assert report.settings.maxmemory_policy == "volatile-lru"
    assert not report.ok
