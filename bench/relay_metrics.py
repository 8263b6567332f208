"""The relay's own account of a run, from its Prometheus `/metrics` (the ops port).

The spawned relay gets an ops port on 127.0.0.1 (with `--workers N`, worker i
serves it on the ops port + i, and the bench sums them); with --url,
`--metrics-url` points at one. Between two scrapes the bench reports how the Redis pump
batched (commands per pipeline, time per pipeline, and how busy the pump
was) and the relay's own store-to-deliver latency.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence
from typing import Any

TIMEOUT_S = 5.0
WANTED = (
    "relay_redis_batch_commands_sum",
    "relay_redis_batch_commands_count",
    "relay_redis_batch_seconds_sum",
    "relay_delivery_latency_seconds_sum",
    "relay_delivery_latency_seconds_count",
    "relay_messages_accepted_total",
    "relay_messages_delivered_total",
    "relay_messages_acked_total",
    "relay_requests_rejected_total",
    "relay_connections",
)


def scrape(url: str) -> dict[str, float] | None:
    """The wanted samples (summed over their labels), or None when the scrape fails."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            text = response.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name in WANTED:
            found[name] = found.get(name, 0.0) + float(value)
    return found


def scrape_all(urls: Sequence[str]) -> dict[str, float] | None:
    """The wanted samples summed over the relay's workers (one URL each); None when there
    are none, or when one scrape fails."""
    total: dict[str, float] = {}
    for url in urls:
        found = scrape(url)
        if found is None:
            return None
        for name, value in found.items():
            total[name] = total.get(name, 0.0) + value
    return total or None


def delta(
    before: dict[str, float] | None, after: dict[str, float] | None, wall_s: float
) -> dict[str, Any]:
    if not before or not after:
        return {}

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = d("relay_redis_batch_commands_count")
    delivered = d("relay_delivery_latency_seconds_count")
    return {
        "redis_batches": int(batches),
        "commands_per_batch": round(d("relay_redis_batch_commands_sum") / batches, 1)
        if batches
        else None,
        "batch_ms": round(1000 * d("relay_redis_batch_seconds_sum") / batches, 2)
        if batches
        else None,
        # time with a pipeline in flight, per second of wall time (up to 2: two in flight)
        "pump_busy": round(d("relay_redis_batch_seconds_sum") / wall_s, 2) if wall_s > 0 else None,
        "store_to_deliver_ms": round(1000 * d("relay_delivery_latency_seconds_sum") / delivered, 2)
        if delivered
        else None,
        "accepted": int(d("relay_messages_accepted_total")),
        "delivered": int(d("relay_messages_delivered_total")),
        "acked": int(d("relay_messages_acked_total")),
        "rejected": int(d("relay_requests_rejected_total")),
    }
