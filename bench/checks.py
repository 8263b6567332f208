"""Self-checks: what a run must never see, counted by kind, with the first few examples.

A `SessionChecker` follows one recipient session: messages of its single
sender carry sequence numbers 0, 1, 2, ... in their bodies, so a gap, a
repeat or a step back is seen as it happens. `Failures` collects what every
checker and probe found; `raise_if_any` turns it into `SelfCheckFailed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

import attrs

EXAMPLES_PER_KIND = 5

KINDS = {
    "lost": "accepted messages never delivered",
    "not_accepted": "sends the relay never accepted",
    "out_of_order": "deliveries out of order within a session",
    "duplicate": "messages delivered twice within a session",
    "after_ack": "messages delivered after they were acked",
    "after_expiry": "messages delivered after their expiry",
    "ack_count": "acks that deleted fewer messages than acked",
    "key_without_ttl": "relay keys without a TTL",
    "ttl_too_long": "relay keys with a TTL beyond the retention window",
    "keys_left": "relay keys left behind after everything was acked or expired",
    "relay_error": "error frames from the relay",
    "closed": "connections the relay closed during the run",
    "unexpected": "frames the bench did not expect",
    "worker": "load generator processes that failed",
    "timeout": "phases that did not finish in time",
}

EXPIRY_GRACE_MS = 20  # transit time allowed between the relay's read and our receipt


class SelfCheckFailed(Exception):
    """A run saw something the relay must never do (or could not finish)."""


@attrs.define
class Failures:
    counts: dict[str, int] = attrs.field(factory=dict)
    examples: dict[str, list[str]] = attrs.field(factory=dict)

    def add(self, kind: str, example: str, count: int = 1) -> None:
        assert kind in KINDS, kind
        self.counts[kind] = self.counts.get(kind, 0) + count
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES_PER_KIND:
            shown.append(example)

    def merge(self, other: Failures | Mapping[str, object]) -> None:
        data = other.to_json() if isinstance(other, Failures) else other
        counts = data.get("counts", {})
        examples = data.get("examples", {})
        assert isinstance(counts, dict) and isinstance(examples, dict)
        for kind, count in counts.items():
            shown = examples.get(kind) or [""]
            self.add(kind, shown[0], count)
            for example in shown[1:]:
                if len(self.examples[kind]) < EXAMPLES_PER_KIND:
                    self.examples[kind].append(example)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def lines(self) -> list[str]:
        return [
            f"{count} {KINDS[kind]} ({kind}), e.g. {'; '.join(self.examples.get(kind, []))}"
            for kind, count in sorted(self.counts.items())
        ]

    def to_json(self) -> dict[str, object]:
        return {
            "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def raise_if_any(self) -> None:
        if self.counts:
            raise SelfCheckFailed("self-check failed: " + " | ".join(self.lines()))


@attrs.define
class SessionChecker:
    """The deliveries of one session of one recipient, from one sender numbering 0, 1, 2..."""

    name: str
    failures: Failures
    next_seq: int = 0  # the sequence expected next
    delivered: int = 0  # distinct messages delivered in this session
    missing: set[int] = attrs.field(factory=set)  # skipped over, maybe still to come
    seen: set[str] = attrs.field(factory=set)  # ids delivered and not yet acked
    acked: set[str] = attrs.field(factory=set)

    def on_deliver(self, message_id: str, seq: int, expires_at_ms: int, now_ms: int) -> bool:
        """Check one delivery; True when it is a new message of this session."""
        if now_ms > expires_at_ms + EXPIRY_GRACE_MS:
            self.failures.add(
                "after_expiry",
                f"{self.name}: #{seq} at {now_ms}, {now_ms - expires_at_ms} ms after its expiry",
            )
        if message_id in self.acked:
            self.failures.add("after_ack", f"{self.name}: #{seq} ({message_id}) after its ack")
            return False
        if message_id in self.seen:
            self.failures.add("duplicate", f"{self.name}: #{seq} ({message_id}) twice")
            return False
        self.seen.add(message_id)
        self.delivered += 1
        if seq == self.next_seq:
            self.next_seq += 1
        elif seq > self.next_seq:
            self.missing.update(range(self.next_seq, seq))
            self.next_seq = seq + 1
        elif seq in self.missing:
            self.missing.discard(seq)
            self.failures.add("out_of_order", f"{self.name}: #{seq} after #{self.next_seq - 1}")
        else:
            self.failures.add("duplicate", f"{self.name}: #{seq} again (a new id {message_id})")
        return True

    def on_acked(self, ids: Iterable[str]) -> None:
        for message_id in ids:
            self.seen.discard(message_id)
            self.acked.add(message_id)

    def finish(self, sent: int, rejected: AbstractSet[int] = frozenset()) -> int:
        """Record as lost what was sent, not rejected, and not delivered; return how many."""
        tail = range(self.next_seq, sent)
        lost = len(self.missing - rejected) + len(tail) - sum(1 for s in rejected if s in tail)
        if lost:
            first = min([*(self.missing - rejected), *(s for s in tail if s not in rejected)])
            self.failures.add(
                "lost", f"{self.name}: {lost} of {sent} never delivered, from #{first}", lost
            )
        return lost
