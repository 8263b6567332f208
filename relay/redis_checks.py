"""Startup checks of the ephemerality contract, point 4 (protocol.md).

A Redis that snapshots (`save`) or logs (`appendonly yes`) keeps copies of
messages on disk that outlive their deletion in memory; a `maxmemory-policy`
other than `noeviction` lets Redis drop undelivered messages silently when it
runs out of memory; a slow log (`slowlog-log-slower-than` >= 0) keeps the
arguments of slow commands, message bodies among them, after the message is
gone. Managed Redis often disables CONFIG: then the settings
cannot be verified, and the operator is told what to check by hand.
"""

from __future__ import annotations

import attrs
import redis
from redis.cluster import ClusterNode

from relay.errors import UnsafeRedis
from relay.redis_sync import RedisClient

ALLOW_PERSISTENT_FLAG = "--allow-persistent-redis"
ALLOW_EVICTION_FLAG = "--allow-eviction"
ALLOW_SLOWLOG_FLAG = "--allow-slowlog"

_PERSISTED = "messages written to disk would outlive their deletion from memory"
_EVICTED = "undelivered messages could be silently evicted when Redis runs out of memory"
_SLOWLOGGED = "the slow log keeps command arguments, message bodies among them"
# setting -> (its safe value, why it matters, the flag that allows an unsafe value)
_RULES = {
    "save": ('""', _PERSISTED, ALLOW_PERSISTENT_FLAG),
    "appendonly": ("no", _PERSISTED, ALLOW_PERSISTENT_FLAG),
    "maxmemory-policy": ("noeviction", _EVICTED, ALLOW_EVICTION_FLAG),
    "slowlog-log-slower-than": ("-1", _SLOWLOGGED, ALLOW_SLOWLOG_FLAG),
}


@attrs.frozen
class RedisSettings:
    """The settings that matter to the contract; None where CONFIG GET was refused."""

    save: str | None
    appendonly: str | None
    maxmemory_policy: str | None
    slowlog_log_slower_than: str | None


def _is_safe(name: str, value: str) -> bool:
    if name == "save":
        return not value.strip()
    if name == "appendonly":
        return value != "yes"
    if name == "slowlog-log-slower-than":
        return value.strip().startswith("-")  # a negative threshold turns the slow log off
    return value == "noeviction"


def _read(server: redis.Redis, name: str) -> str | None:
    try:
        return server.config_get(name).get(name)
    except redis.ResponseError:  # includes NoPermissionError; CONFIG disabled or renamed
        return None


def _least_safe(name: str, values: list[str | None]) -> str | None:
    """An unsafe value if any server has one, else None if any could not be read."""
    for value in values:
        if value is not None and not _is_safe(name, value):
            return value
    if None in values:
        return None
    return values[0]


def read_settings(client: RedisClient) -> RedisSettings:
    """Read the settings with CONFIG GET; on a cluster, the least safe value of all primaries."""
    if isinstance(client, redis.RedisCluster):
        primaries: list[ClusterNode] = client.get_primaries()  # type: ignore[no-untyped-call]
        servers = [client.get_redis_connection(node) for node in primaries]
    else:
        servers = [client]

    def least_safe(name: str) -> str | None:
        return _least_safe(name, [_read(server, name) for server in servers])

    return RedisSettings(
        save=least_safe("save"),
        appendonly=least_safe("appendonly"),
        maxmemory_policy=least_safe("maxmemory-policy"),
        slowlog_log_slower_than=least_safe("slowlog-log-slower-than"),
    )


def evaluate_settings(
    settings: RedisSettings,
    *,
    allow_persistent: bool,
    allow_eviction: bool,
    allow_slowlog: bool = False,
) -> tuple[list[str], list[str]]:
    """The violations and the warnings these settings give, as messages for the operator."""
    violations: list[str] = []
    warnings: list[str] = []
    for name, value, allowed in (
        ("save", settings.save, allow_persistent),
        ("appendonly", settings.appendonly, allow_persistent),
        ("maxmemory-policy", settings.maxmemory_policy, allow_eviction),
        ("slowlog-log-slower-than", settings.slowlog_log_slower_than, allow_slowlog),
    ):
        safe, why, flag = _RULES[name]
        if value is None:
            warnings.append(
                f"could not verify Redis setting {name} (CONFIG GET was refused): "
                f"check by hand that it is {safe}, otherwise {why}"
            )
        elif not _is_safe(name, value):
            problem = f"Redis setting {name} is {value!r}: {why}"
            if allowed:
                warnings.append(f"{problem} (allowed by {flag})")
            else:
                violations.append(f"{problem}; set {name} {safe} or pass {flag}")
    return violations, warnings


def check_settings(
    settings: RedisSettings,
    *,
    allow_persistent: bool,
    allow_eviction: bool,
    allow_slowlog: bool = False,
) -> list[str]:
    """Raise UnsafeRedis if the settings break the contract; return the warnings to log."""
    violations, warnings = evaluate_settings(
        settings,
        allow_persistent=allow_persistent,
        allow_eviction=allow_eviction,
        allow_slowlog=allow_slowlog,
    )
    if violations:
        raise UnsafeRedis("; ".join(violations))
    return warnings


def _state(settings: RedisSettings, names: tuple[str, ...], on: str, off: str) -> str:
    values = [getattr(settings, name.replace("-", "_")) for name in names]
    flag = _RULES[names[0]][2]
    if any(v is not None and not _is_safe(n, v) for n, v in zip(names, values, strict=True)):
        return f"{on} (allowed by {flag})"  # the relay runs, so the flag allowed it
    return "unverified" if None in values else off


def describe_settings(settings: RedisSettings) -> dict[str, str]:
    """The settings as /.well-known/relay-policy reports them, by the same rules as the checks."""
    return {
        "persistence": _state(settings, ("save", "appendonly"), "on", "off"),
        "maxmemory_policy": settings.maxmemory_policy or "unverified",
        "slowlog": _state(settings, ("slowlog-log-slower-than",), "on", "off"),
    }
