"""Fuzz the hub: arbitrary bytes published on a live session's mailbox channel (through a
real Redis), and arbitrary RESP replies read by the hub's own connection code, never end
the relay. Hypothesis runs in a worker thread; each example's I/O runs on the test's Trio
thread (trio.from_thread), against real processes.
"""

from __future__ import annotations

import re
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from relay_fixtures import DEADLINE_S, RelayFactory, receive_until, token

from relay.client import open_relay
from relay.hub import Hub
from relay.redis.address import parse
from relay.redis.admin import RedisClient
from relay.redis.connection import ConnectionLost, RedisConnection
from relay.redis.topology import Topology
from relay.store_redis import Keys

pytest_plugins = ["relay_fixtures"]

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None
)

# A well-formed "replaced" notice closes the session it names as older (4409), as it must.
REPLACED_NOTICE = re.compile(rb"!r [A-Za-z0-9_-]{1,64}")

# Payloads near what the relay publishes, and anything at all.
notices = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda seq, rest: f"{seq} {rest}".encode(),
        st.one_of(st.integers(min_value=-(2**70), max_value=2**70).map(str), st.text(max_size=8)),
        st.one_of(st.text(max_size=80), st.just('{"id":"'), st.just('{"id":"x"')),
    ),
    st.text(max_size=80).map(lambda t: ("!r " + t).encode()),
)


async def test_arbitrary_publishes_on_a_live_mailbox_channel_never_end_the_relay(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay()
    channel = Keys.of(prefix, "bob").channel
    async with (
        open_relay(relay.url, token("alice")) as alice,
        open_relay(relay.url, token("bob")) as bob,
    ):
        marks = iter(range(10**6))

        async def exchange() -> None:
            body = f"marker {next(marks)}"
            with trio.fail_after(DEADLINE_S):
                await alice.send("bob", body)
                await receive_until(bob, body)

        @FUZZ
        @given(notices)
        def publish_then_exchange(payload: bytes) -> None:
            assume(not REPLACED_NOTICE.fullmatch(payload))
            assert redis_client.publish(channel, payload) == 1  # bob's session still listens
            trio.from_thread.run(exchange)

        await trio.to_thread.run_sync(publish_then_exchange)
    assert relay.services.metrics.hub_reconnects._value.get() == 0
    assert relay.services.metrics.hub_ignored_notices._value.get() > 0


class Recorder:
    """A subscriber that keeps what the hub hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_message(self, seq: int, message_id: str, envelope: str) -> None:
        self.calls.append((seq, message_id, envelope))

    def on_replaced(self, session_id: str) -> None:
        self.calls.append((session_id,))

    def resync(self) -> None:
        self.calls.append(())

    def notices_arrived(self) -> None:
        self.calls.append(("arrived",))


def resp(value: Any) -> bytes:
    """RESP2 encoding of a value drawn by `replies`."""
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(resp(v) for v in value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, tuple):  # (b"-", text) or (b"+", text): error or simple string
        kind, text = value
        return bytes(kind + text.replace(b"\r\n", b"") + b"\r\n")
    return b"$%d\r\n%s\r\n" % (len(value), value)


words = st.sampled_from(
    [b"message", b"subscribe", b"unsubscribe", b"pong", b"PONG", b"ch", b"", b"1 x"]
)
atoms = st.one_of(
    words,
    st.binary(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.none(),
    st.tuples(st.sampled_from([b"-", b"+"]), st.one_of(words, st.binary(max_size=20))),
)
replies = st.recursive(atoms, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


async def feed(hub: Hub, data: bytes) -> None:
    """Give `data` to a RedisConnection as if Redis sent it; hand every reply to the hub."""
    ours, theirs = trio.testing.memory_stream_pair()
    connection = RedisConnection(ours)
    await theirs.send_all(data)
    await theirs.aclose()
    with trio.fail_after(DEADLINE_S):
        while True:
            try:
                reply = await connection.reply()
            except ConnectionLost:
                return  # all read
            except Exception:  # a protocol error: the hub reconnects on it, by design
                return
            hub.handle_reply(reply)


async def test_arbitrary_resp_replies_never_raise_out_of_the_hub() -> None:
    hub = Hub(Topology(parse("redis://127.0.0.1:1"), timeout_s=1), lambda mailbox: mailbox)
    recorder = Recorder()
    hub._wanted["ch"] = {recorder}

    @FUZZ
    @given(st.lists(replies, max_size=5), st.binary(max_size=60))
    def replies_then_garbage(values: list[Any], garbage: bytes) -> None:
        trio.from_thread.run(feed, hub, b"".join(resp(v) for v in values))
        trio.from_thread.run(feed, hub, garbage)

    await trio.to_thread.run_sync(replies_then_garbage)
