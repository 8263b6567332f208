"""Startup checks of the ephemerality contract, point 4 (protocol.md).

A Redis that snapshots (`save`) or logs (`appendonly yes`) keeps copies of
messages on disk that outlive their deletion in memory; a `maxmemory-policy`
other than `noeviction` lets Redis drop undelivered messages silently when it
runs out of memory; a slow log (`slowlog-log-slower-than` not negative) keeps
the arguments of slow commands, message bodies among them. Managed Redis often
disables CONFIG: then the settings cannot be verified, and the operator is told
what to check by hand. Every primary of a cluster is checked, and each finding
names its node.
"""

from __future__ import annotations

from typing import Literal

import attrs
import redis

from relay.config import Config
from relay.errors import UnsafeRedis
from relay.redis.admin import RedisClient, primaries

ALLOW_PERSISTENT_FLAG = "--allow-persistent-redis"
ALLOW_EVICTION_FLAG = "--allow-eviction"
ALLOW_SLOWLOG_FLAG = "--allow-slowlog"

_PERSISTED = "messages written to disk would outlive their deletion from memory"
_EVICTED = "undelivered messages could be silently evicted when Redis runs out of memory"
_SLOWLOGGED = "the slow log keeps the arguments of slow commands, message bodies among them"
# setting -> (its safe value, why it matters, the flag that allows an unsafe value)
_RULES = {
    "save": ('""', _PERSISTED, ALLOW_PERSISTENT_FLAG),
    "appendonly": ("no", _PERSISTED, ALLOW_PERSISTENT_FLAG),
    "maxmemory-policy": ("noeviction", _EVICTED, ALLOW_EVICTION_FLAG),
    "slowlog-log-slower-than": ("-1", _SLOWLOGGED, ALLOW_SLOWLOG_FLAG),
}

Verdict = Literal["safe", "allowed", "violation", "unverified"]


@attrs.frozen
class RedisSettings:
    """The settings that matter to the contract; None where CONFIG GET was refused."""

    save: str | None
    appendonly: str | None
    maxmemory_policy: str | None
    slowlog_log_slower_than: str | None


@attrs.frozen
class Allowed:
    """The unsafe settings the operator allowed with a flag."""

    persistent: bool = False
    eviction: bool = False
    slowlog: bool = False


NOTHING_ALLOWED = Allowed()


def redis_allowances(config: Config) -> Allowed:
    return Allowed(config.allow_persistent_redis, config.allow_eviction, config.allow_slowlog)


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


@attrs.frozen
class NodeSettings:
    """The settings of one primary, named `host:port` (or its socket path)."""

    node: str
    settings: RedisSettings


def _least_safe(name: str, values: list[str | None]) -> str | None:
    """An unsafe value if any server has one, else None if any could not be read."""
    for value in values:
        if value is not None and not _is_safe(name, value):
            return value
    if None in values:
        return None
    return values[0]


def read_server_settings(server: redis.Redis) -> RedisSettings:
    """Read one server's settings with CONFIG GET."""
    return RedisSettings(
        save=_read(server, "save"),
        appendonly=_read(server, "appendonly"),
        maxmemory_policy=_read(server, "maxmemory-policy"),
        slowlog_log_slower_than=_read(server, "slowlog-log-slower-than"),
    )


def read_node_settings(client: RedisClient) -> list[NodeSettings]:
    """Read the settings of every primary."""
    return [NodeSettings(node, read_server_settings(server)) for node, server in primaries(client)]


def least_safe(nodes: list[NodeSettings]) -> RedisSettings:
    """Each setting's least safe value over the nodes: what the policy document shows."""
    every = [n.settings for n in nodes]
    return RedisSettings(
        save=_least_safe("save", [s.save for s in every]),
        appendonly=_least_safe("appendonly", [s.appendonly for s in every]),
        maxmemory_policy=_least_safe("maxmemory-policy", [s.maxmemory_policy for s in every]),
        slowlog_log_slower_than=_least_safe(
            "slowlog-log-slower-than", [s.slowlog_log_slower_than for s in every]
        ),
    )


def read_settings(client: RedisClient) -> RedisSettings:
    """The least safe settings of all primaries (see `least_safe`)."""
    return least_safe(read_node_settings(client))


def _checked(settings: RedisSettings, allowed: Allowed) -> list[tuple[str, str | None, bool]]:
    """(setting, its value, whether an unsafe value is allowed) for each checked setting."""
    return [
        ("save", settings.save, allowed.persistent),
        ("appendonly", settings.appendonly, allowed.persistent),
        ("maxmemory-policy", settings.maxmemory_policy, allowed.eviction),
        ("slowlog-log-slower-than", settings.slowlog_log_slower_than, allowed.slowlog),
    ]


def _verdict(name: str, value: str | None, allowed: bool) -> Verdict:
    if value is None:
        return "unverified"
    if _is_safe(name, value):
        return "safe"
    return "allowed" if allowed else "violation"


def verdicts(settings: RedisSettings, allowed: Allowed) -> dict[str, Verdict]:
    """Each checked setting's verdict: what the startup check and the policy both report."""
    return {name: _verdict(name, value, ok) for name, value, ok in _checked(settings, allowed)}


def evaluate_settings(settings: RedisSettings, allowed: Allowed) -> tuple[list[str], list[str]]:
    """The violations and the warnings these settings give, as messages for the operator."""
    violations: list[str] = []
    warnings: list[str] = []
    for name, value, ok in _checked(settings, allowed):
        safe, why, flag = _RULES[name]
        verdict = _verdict(name, value, ok)
        if verdict == "unverified":
            warnings.append(
                f"could not verify Redis setting {name} (CONFIG GET was refused): "
                f"check by hand that it is {safe}, otherwise {why}"
            )
        elif verdict == "allowed":
            warnings.append(f"Redis setting {name} is {value!r}: {why} (allowed by {flag})")
        elif verdict == "violation":
            violations.append(
                f"Redis setting {name} is {value!r}: {why}; set {name} {safe} or pass {flag}"
            )
    return violations, warnings


def check_settings(settings: RedisSettings, allowed: Allowed) -> list[str]:
    """Raise UnsafeRedis if the settings break the contract; return the warnings to log."""
    violations, warnings = evaluate_settings(settings, allowed)
    if violations:
        raise UnsafeRedis("; ".join(violations))
    return warnings


def evaluate_nodes(nodes: list[NodeSettings], allowed: Allowed) -> tuple[list[str], list[str]]:
    """`evaluate_settings` on every node; each message starts with the node's name."""
    violations: list[str] = []
    warnings: list[str] = []
    for node in nodes:
        found, warned = evaluate_settings(node.settings, allowed)
        violations += [f"{node.node}: {v}" for v in found]
        warnings += [f"{node.node}: {w}" for w in warned]
    return violations, warnings


def check_nodes(nodes: list[NodeSettings], allowed: Allowed) -> list[str]:
    """Raise UnsafeRedis if any node breaks the contract (naming it); return the warnings."""
    violations, warnings = evaluate_nodes(nodes, allowed)
    if violations:
        raise UnsafeRedis("; ".join(violations))
    return warnings
