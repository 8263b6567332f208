"""Contract point 4: the relay refuses a Redis that persists to disk, may evict messages,
or keeps a slow log."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay.embedded import EmbeddedServer
from relay.errors import UnsafeRedis
from relay.redis.admin import RedisClient, connect
from relay.redis.checks import Allowed, RedisSettings, check_settings, read_settings

SAFE = RedisSettings(
    save="", appendonly="no", maxmemory_policy="noeviction", slowlog_log_slower_than="-1"
)
NONE = Allowed()
ALL = Allowed(persistent=True, eviction=True, slowlog=True)


@pytest.fixture
def private_server(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the same kind as the shared one, free to be made unsafe."""
    with EmbeddedServer(binary=redis_server.binary) as server:
        yield server


@pytest.fixture
def private_client(private_server: EmbeddedServer) -> Iterator[RedisClient]:
    with connect(private_server.url) as client:
        yield client
        # A server still writing its first append-only file ignores SIGTERM for a while.
        client.config_set("appendonly", "no")


def test_contract_4_safe_server_starts_without_warnings(redis_client: RedisClient) -> None:
    settings = read_settings(redis_client)
    assert settings == SAFE
    assert check_settings(settings, NONE) == []


@pytest.mark.parametrize(
    ("name", "value", "flag", "allow"),
    [
        ("appendonly", "yes", "--allow-persistent-redis", "persistent"),
        ("save", "3600 1", "--allow-persistent-redis", "persistent"),
        ("maxmemory-policy", "volatile-lru", "--allow-eviction", "eviction"),
        ("slowlog-log-slower-than", "10000", "--allow-slowlog", "slowlog"),
    ],
)
def test_contract_4_unsafe_setting_refused_unless_allowed(
    private_client: RedisClient, name: str, value: str, flag: str, allow: str
) -> None:
    private_client.config_set(name, value)
    settings = read_settings(private_client)
    assert getattr(settings, name.replace("-", "_")) == value

    others = {k: True for k in ("persistent", "eviction", "slowlog") if k != allow}
    with pytest.raises(UnsafeRedis) as refused:
        check_settings(settings, Allowed(**others, **{allow: False}))
    message = str(refused.value)
    assert name in message and repr(value) in message and flag in message

    warnings = check_settings(settings, Allowed(**{allow: True}))
    assert len(warnings) == 1
    assert name in warnings[0] and flag in warnings[0]


def test_contract_4_refusal_names_every_unsafe_setting() -> None:
    settings = RedisSettings(
        save="60 1", appendonly="yes", maxmemory_policy="allkeys-lru", slowlog_log_slower_than="0"
    )
    with pytest.raises(UnsafeRedis) as refused:
        check_settings(settings, NONE)
    message = str(refused.value)
    for part in ("save", "appendonly", "maxmemory-policy", "slowlog", "outlive", "evicted"):
        assert part in message
    assert len(check_settings(settings, ALL)) == 4


def test_contract_4_unreadable_config_warns_what_to_check(
    private_server: EmbeddedServer, private_client: RedisClient
) -> None:
    """Managed Redis often refuses CONFIG; here an ACL user without it stands in."""
    private_client.acl_setuser(
        "limited", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-config"]
    )
    with connect(f"unix://limited:secret@{private_server.socket_path}") as limited:
        settings = read_settings(limited)
    assert settings == RedisSettings(
        save=None, appendonly=None, maxmemory_policy=None, slowlog_log_slower_than=None
    )

    warnings = check_settings(settings, NONE)
    assert len(warnings) == 4
    for warning, name, safe in zip(
        warnings,
        ("save", "appendonly", "maxmemory-policy", "slowlog-log-slower-than"),
        ('""', "no", "noeviction", "-1"),
        strict=True,
    ):
        assert "could not verify" in warning and name in warning and safe in warning
