"""What the bench reads from the relay's Redis: command counts, CPU, memory, keys and TTLs.

Only keys of this run's mailboxes are looked at (`<prefix>{bench-<run id>-*`),
so a shared Redis is fine for the checks; the command counts are Redis-wide
and include whatever else runs there. On a Redis Cluster every primary is
read: counters and CPU are summed over the nodes (and reported per node too),
keys are scanned on each. The probe counts its own commands
(INFO, SCAN, PTTL) and takes them out of the deltas it reports.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import redis

from relay.redis.admin import connect, primaries

SCAN_COUNT = 1000
MAX_SCANS = 200  # bounds one sample: at most this many SCAN round trips
SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall")
OWN_READS = "reads"  # in `own`: the probe's round trips (each one read event of Redis's)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisProbe:
    """One plain client per primary (the one server, or every primary of a cluster):
    counters are read from each and summed, keys are scanned on each."""

    def __init__(self, url: str, prefix: str, run_id: str) -> None:
        self.client = connect(url, timeout_s=10.0)
        self.nodes = primaries(self.client)  # (host:port, client): fixed for the run
        self.pattern = f"{_glob_escape(prefix)}{{bench-{run_id}-*"
        # commands this probe sent, by node and cmdstat name
        self.own: dict[str, Counter[str]] = {name: Counter() for name, _ in self.nodes}

    def close(self) -> None:
        self.client.close()

    def snapshot(self) -> dict[str, Any]:
        """Command counts, CPU seconds and memory of Redis now: each node's, and summed."""
        nodes = {}
        for name, client in self.nodes:
            info = client.info("all")
            self.own[name]["cmdstat_info"] += 1
            self.own[name][OWN_READS] += 1
            nodes[name] = {
                "calls": {k: int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_")},
                "own": dict(self.own[name]),
                "cpu_s": float(info.get("used_cpu_user", 0.0))
                + float(info.get("used_cpu_sys", 0.0)),
                "used_memory": int(info.get("used_memory", 0)),
                "reads": int(info.get("total_reads_processed", 0)),
                "version": info.get("valkey_version") or info.get("redis_version"),
            }
        return {**_summed(list(nodes.values())), "nodes": nodes}

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any], messages: int) -> dict[str, Any]:
        """Redis's work between two snapshots, less the probe's own commands, per message;
        with several nodes, each node's too (`nodes`)."""
        found = _delta(before, after, messages)
        nodes = after.get("nodes", {})
        if len(nodes) > 1:
            found["nodes"] = {
                name: _delta(before["nodes"][name], node, messages, brief=True)
                for name, node in nodes.items()
                if name in before.get("nodes", {})
            }
        return found

    def scan(self, limit: int) -> list[str]:
        """Up to `limit` keys of this run (bounded number of SCAN calls per node)."""
        return [key for _, keys in self._scan_nodes(limit) for key in keys][:limit]

    def _scan_nodes(self, limit: int) -> list[tuple[redis.Redis, list[str]]]:
        found: list[tuple[redis.Redis, list[str]]] = []
        total = 0
        for name, client in self.nodes:
            keys: list[str] = []
            cursor = 0
            for _ in range(MAX_SCANS):
                cursor, batch = client.scan(cursor, match=self.pattern, count=SCAN_COUNT)
                self.own[name]["cmdstat_scan"] += 1
                self.own[name][OWN_READS] += 1
                keys.extend(str(k) for k in batch)
                if cursor == 0 or total + len(keys) >= limit:
                    break
            found.append((client, keys))
            total += len(keys)
            if total >= limit:
                break
        return found

    def sample_ttls(
        self, retention_ms: int, limit: int = 2000
    ) -> tuple[int, list[tuple[str, int]]]:
        """How many keys were sampled, and those with no TTL (-1) or one beyond retention."""
        seen, bad = 0, []
        names = {id(client): name for name, client in self.nodes}
        for client, keys in self._scan_nodes(limit):
            if not keys:
                continue
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.pttl(key)
                ttls = pipe.execute()
            self.own[names[id(client)]]["cmdstat_pttl"] += len(keys)
            self.own[names[id(client)]][OWN_READS] += 1
            seen += len(keys)
            bad += [(k, t) for k, t in zip(keys, ttls, strict=True) if t == -1 or t > retention_ms]
        return seen, bad


def _summed(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    calls: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for node in nodes:
        calls.update(node["calls"])
        own.update(node["own"])
    return {
        "calls": dict(calls),
        "own": dict(own),
        "cpu_s": sum(n["cpu_s"] for n in nodes),
        "used_memory": sum(n["used_memory"] for n in nodes),
        "reads": sum(n["reads"] for n in nodes),
        "version": nodes[0]["version"],
    }


def _delta(
    before: dict[str, Any], after: dict[str, Any], messages: int, brief: bool = False
) -> dict[str, Any]:
    calls: dict[str, int] = {}
    for name, count in after["calls"].items():
        own = after["own"].get(name, 0) - before["own"].get(name, 0)
        diff = count - before["calls"].get(name, 0) - own
        if diff > 0:
            calls[name.removeprefix("cmdstat_")] = diff
    total = sum(calls.values())
    scripts = sum(calls.get(n.removeprefix("cmdstat_"), 0) for n in SCRIPT_COMMANDS)
    per = max(messages, 1)
    own_reads = after["own"].get(OWN_READS, 0) - before["own"].get(OWN_READS, 0)
    reads = after.get("reads", 0) - before.get("reads", 0) - own_reads
    found = {
        "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "calls_per_msg": round(total / per, 2),
        "scripts_per_msg": round(scripts / per, 3),
        "cpu_us_per_msg": round((after["cpu_s"] - before["cpu_s"]) * 1e6 / per, 1),
        "cpu_s": round(after["cpu_s"] - before["cpu_s"], 3),
        "memory_delta_bytes": after["used_memory"] - before["used_memory"],
        # read events: about one per pipeline a client wrote (a big one may take several)
        "reads": reads,
        "reads_per_msg": round(reads / per, 3),
        "calls_per_read": round(total / reads, 1) if reads > 0 else None,
    }
    if brief:
        found["calls_total"] = total
        del found["calls"]
    return found
