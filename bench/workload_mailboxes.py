"""The workloads of offline mailboxes, parent side: drain and retention."""

from __future__ import annotations

import time

from . import worker_drain
from .measure import merge, percentiles
from .outcome import (
    Outcome,
    cores_text,
    cost_rows,
    keys_left_rows,
    latency_rows,
    merge_failures,
    public,
    rounds_of,
    summarize_round,
)
from .procs import SENT
from .runner import Run

DRAIN_TARGET = 20_000.0  # msgs/s
EXPIRY_GRACE_S = 0.5  # after the last key's TTL, before "every key gone" must hold


def drain(run: Run) -> Outcome:
    o = run.options
    outcome = Outcome()
    expected = 2 * o.pairs * o.messages
    results = run.run_workers(
        f"{__package__}.worker_drain:run", worker_drain.GATES["drain"], o.pairs, expected
    )
    merge_failures(run, results)
    if not results:
        return outcome
    store = rounds_of(results, "store")
    accepted = sum(r["accepted"] for r in store)
    starts = [r["first_send_s"] for r in store if r["first_send_s"]]
    ends = [r["last_accept_s"] for r in store if r["last_accept_s"]]
    store_s = max(ends) - min(starts) if starts and ends else None
    store_rate = round(accepted / store_s, 1) if store_s else None
    s = summarize_round(run, results, "drain")
    ttfm, _ = merge(r["ttfm"] for r in s["_rounds"])
    outcome.metrics = {
        "store": {
            "accepted": accepted,
            "duration_s": round(store_s, 4) if store_s else None,
            "msgs_per_s": store_rate,
            "relay": run.relay_cost("store:start", "store:end", accepted),
            "redis": run.redis_cost("store:start", "store:end", accepted),
        },
        "drain": public(s),
        "time_to_first_message_us": percentiles(ttfm),
    }
    outcome.histograms["age at delivery"] = s["_hist"]
    outcome.histograms["time to first message"] = ttfm
    outcome.series["drain"] = s["_buckets"]
    outcome.sent, outcome.delivered = accepted, s["delivered"]
    outcome.row(
        "store", f"{accepted:,} in {store_s and round(store_s, 3)} s = {store_rate or 0:,} msgs/s"
    )
    store_relay = outcome.metrics["store"]["relay"]
    if store_relay.get("cpu_s") is not None:
        outcome.row(
            "store: relay CPU",
            f"{store_relay['cpu_us_per_msg']} µs/msg, {cores_text(store_relay)}",
        )
    outcome.row(
        "drain", f"{s['delivered']:,} in {s['duration_s']} s = {s['msgs_per_s'] or 0:,} msgs/s"
    )
    latency_rows(
        outcome,
        "time to first message",
        outcome.metrics["time_to_first_message_us"],
        ("p50", "p99", "max"),
    )
    cost_rows(outcome, s, "drain")
    outcome.target("drain", s["msgs_per_s"], ">=", DRAIN_TARGET, "msgs/s")
    keys_left_rows(run, outcome)
    return outcome


def retention(run: Run) -> Outcome:
    o = run.options
    outcome = Outcome()
    run.ttl_interval_s = 0.25
    retention_s = run.retention_ms / 1000
    marks: dict[str, float] = {}

    def on_gate(name: str) -> None:
        if name == "store:end":
            marks["stored"] = time.monotonic()
            keys = run.probe.scan(10 * o.pairs * o.messages + 100) if run.probe else []
            marks["keys"] = len(keys)
            if not keys:
                run.failures.add("unexpected", "no keys of this run in Redis after the sends")
        elif name == "expired":
            until = marks["stored"] + retention_s + EXPIRY_GRACE_S
            run.console.log(f"waiting {until - time.monotonic():.1f} s for the retention window")
            while time.monotonic() < until:
                run.sample_ttls()
                time.sleep(0.05)
            marks["left"] = run.check_keys_left("the retention window", wait_s=0.0) or 0

    expected = o.pairs * o.messages
    results = run.run_workers(
        f"{__package__}.worker_drain:run",
        worker_drain.GATES["retention"],
        o.pairs,
        expected,
        on_gate,
        slot=SENT,
    )
    merge_failures(run, results)
    if not results:
        return outcome
    store = rounds_of(results, "store")
    outcome.sent = sum(r["accepted"] for r in store)
    outcome.delivered = outcome.sent  # nothing is to be delivered: the failures say otherwise
    late = sum(r.get("delivered_after_expiry", 0) for r in results)
    outcome.metrics = {
        "retention_s": retention_s,
        "accepted": outcome.sent,
        "keys_after_sends": marks.get("keys"),
        "keys_after_window": marks.get("left"),
        "ttl_samples": run.ttl_samples,
        "ttl_keys_checked": run.ttl_keys_seen,
        "welcome_expired": sum(r.get("welcome_expired", 0) for r in results),
        "delivered_after_expiry": late,
        "store_relay": run.relay_cost("store:start", "store:end", outcome.sent),
    }
    m = outcome.metrics
    outcome.row(
        "stored",
        f"{outcome.sent:,} messages, {m['keys_after_sends']} keys, retention {retention_s:g} s",
    )
    outcome.row(
        "TTL samples", f"{m['ttl_samples']} samples, {m['ttl_keys_checked']:,} key TTLs checked"
    )
    outcome.row("keys after the window", str(m["keys_after_window"]))
    outcome.row("delivered after expiry", str(late))
    outcome.row("welcome 'expired' (sum)", str(m["welcome_expired"]))
    if outcome.sent and m["welcome_expired"] < outcome.sent:
        outcome.notes.append(
            f"recipients were told of {m['welcome_expired']} of {outcome.sent} expired messages "
            "in welcome.expired (the relay's count lives as long as its mailbox keys)"
        )
    return outcome
