"""Prometheus metrics of one relay process. No mailbox id is ever a label value."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from relay.codes import CloseCode

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The codes protocol v1 defines, and those a WebSocket reports by itself (1005 no code given,
# 1006 dropped, 1011 the relay's handler failed). Any other code a client sends is "other",
# so one client cannot create a time series per code.
LABELLED_CLOSE_CODES = frozenset(int(c) for c in CloseCode) | {1005, 1006, 1011, 1013}


def close_code_label(code: int) -> str:
    return str(code) if code in LABELLED_CLOSE_CODES else "other"


class BatchHistogram(Collector):
    """A histogram observed a batch of values at a time, without a lock per value.

    prometheus_client's Histogram takes locks and searches its buckets in Python
    for every observation; delivery observes each message, so this one counts a
    batch with `bisect` into plain lists (the relay runs on one thread, and so
    does the scrape)."""

    def __init__(
        self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds = self._counts, self._bounds
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self._sum += total

    def collect(self) -> Iterator[Metric]:
        buckets = []
        cumulative = 0
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), float(cumulative)))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )


class Metrics:
    """All metrics, registered in a registry of their own (one per process)."""

    def __init__(self, worker: int = 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("relay_worker_info", "This process's worker id", ["worker"], registry=r).labels(
            str(worker)
        ).set(1)
        self.connections = Gauge("relay_connections", "Open WebSocket connections", registry=r)
        self.connections_opened = Counter(
            "relay_connections_opened", "WebSocket connections accepted", registry=r
        )
        self.connections_closed = Counter(
            "relay_connections_closed",
            "WebSocket connections closed, by close code (codes the protocol does not define: other)",
            ["code"],
            registry=r,
        )
        self.handshakes_refused = Counter(
            "relay_handshakes_refused",
            "Handshakes refused before the upgrade, by HTTP status",
            ["status"],
            registry=r,
        )
        self.accepted = Counter("relay_messages_accepted", "Message copies stored", registry=r)
        self.delivered = Counter(
            "relay_messages_delivered", "Messages delivered to a session", registry=r
        )
        self.ack_frames = Counter(
            "relay_ack_frames_received", "Ack frames received from clients", registry=r
        )
        self.acked = Counter("relay_messages_acked", "Messages deleted by an ack", registry=r)
        self.expired = Counter(
            "relay_messages_expired_undelivered",
            "Messages that expired before their ack (counted when their mailbox connects)",
            registry=r,
        )
        self.frames_delayed = Counter(
            "relay_frames_delayed",
            "Frames that waited for their connection's rate budget (the connection was not read meanwhile)",
            registry=r,
        )
        self.rejected = Counter(
            "relay_requests_rejected", "Error frames sent, by error code", ["code"], registry=r
        )
        self.delivery_latency = BatchHistogram(
            "relay_delivery_latency_seconds",
            "From storing a message to delivering it",
            LATENCY_BUCKETS_S,
            r,
        )
        self.redis_batch_size = Histogram(
            "relay_redis_batch_commands",
            "Commands per Redis pipeline",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.redis_batch_latency = Histogram(
            "relay_redis_batch_seconds",
            "Time to run one Redis pipeline",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.hub_reconnects = Counter("relay_hub_reconnects", "Pub/sub reconnects", registry=r)
        self.redis_redirections = Counter(
            "relay_redis_redirections",
            "Redis commands resent because a reply proved they did not run, by reply "
            "(moved, ask, wait: TRYAGAIN or CLUSTERDOWN, reresolve: READONLY)",
            ["reply"],
            registry=r,
        )
        self.hub_ignored_notices = Counter(
            "relay_hub_ignored_notices",
            "Pub/sub replies and notices the relay did not publish or expect, ignored",
            registry=r,
        )
        self.oldest_undelivered_age = Gauge(
            "relay_oldest_undelivered_age_seconds",
            "Age of the oldest waiting message among the mailboxes sampled",
            registry=r,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.redis_batch_size.observe(size)
        self.redis_batch_latency.observe(seconds)
