"""What the bench reads from the relay's Redis: command counts, CPU, memory, keys and TTLs.

Only keys of this run's mailboxes are looked at (`<prefix>{bench-<run id>-*`),
so a shared Redis is fine for the checks; the command counts are Redis-wide
and include whatever else runs there. The probe counts its own commands
(INFO, SCAN, PTTL) and takes them out of the deltas it reports.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from relay.redis.admin import connect

SCAN_COUNT = 1000
MAX_SCANS = 200  # bounds one sample: at most this many SCAN round trips
SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall")


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisProbe:
    def __init__(self, url: str, prefix: str, run_id: str) -> None:
        self.client = connect(url, timeout_s=10.0)
        self.pattern = f"{_glob_escape(prefix)}{{bench-{run_id}-*"
        self.own: Counter[str] = Counter()  # commands this probe sent, by cmdstat name

    def close(self) -> None:
        self.client.close()

    def snapshot(self) -> dict[str, Any]:
        """Command counts, CPU seconds and memory of Redis now."""
        info = self.client.info("all")
        self.own["cmdstat_info"] += 1
        calls = {k: int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_")}
        return {
            "calls": calls,
            "own": dict(self.own),
            "cpu_s": float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0)),
            "used_memory": int(info.get("used_memory", 0)),
            "version": info.get("valkey_version") or info.get("redis_version"),
        }

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any], messages: int) -> dict[str, Any]:
        """Redis's work between two snapshots, less the probe's own commands, per message."""
        calls: dict[str, int] = {}
        for name, count in after["calls"].items():
            own = after["own"].get(name, 0) - before["own"].get(name, 0)
            diff = count - before["calls"].get(name, 0) - own
            if diff > 0:
                calls[name.removeprefix("cmdstat_")] = diff
        total = sum(calls.values())
        scripts = sum(calls.get(n.removeprefix("cmdstat_"), 0) for n in SCRIPT_COMMANDS)
        per = max(messages, 1)
        return {
            "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "calls_per_msg": round(total / per, 2),
            "scripts_per_msg": round(scripts / per, 3),
            "cpu_us_per_msg": round((after["cpu_s"] - before["cpu_s"]) * 1e6 / per, 1),
            "cpu_s": round(after["cpu_s"] - before["cpu_s"], 3),
            "memory_delta_bytes": after["used_memory"] - before["used_memory"],
        }

    def scan(self, limit: int) -> list[str]:
        """Up to `limit` keys of this run (bounded number of SCAN calls)."""
        keys: list[str] = []
        cursor = 0
        for _ in range(MAX_SCANS):
            cursor, batch = self.client.scan(cursor, match=self.pattern, count=SCAN_COUNT)
            self.own["cmdstat_scan"] += 1
            keys.extend(str(k) for k in batch)
            if cursor == 0 or len(keys) >= limit:
                break
        return keys[:limit]

    def sample_ttls(
        self, retention_ms: int, limit: int = 2000
    ) -> tuple[int, list[tuple[str, int]]]:
        """How many keys were sampled, and those with no TTL (-1) or one beyond retention."""
        keys = self.scan(limit)
        if not keys:
            return 0, []
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pttl(key)
            ttls = pipe.execute()
        self.own["cmdstat_pttl"] += len(keys)
        bad = [(k, t) for k, t in zip(keys, ttls, strict=True) if t == -1 or t > retention_ms]
        return len(keys), bad
