"""Acceptance, bad input: arbitrary text and JSON thrown at one live session.

Hypothesis runs in a worker thread and hands each generated frame to a Trio
task that owns the session (so the session outlives the examples); the
frame is followed by a probe (`ack` with a ref) whose `acked` answer marks
the end of that frame's answers. Each frame must get exactly one answer
(`error`, `accepted` or `acked`), or none when it was an `ack` without a
ref; under this test's limits (a body limit far above what it sends, no rate limit) no
frame may close the session, so a relay that hangs up on bad input fails it; meanwhile two
other sessions keep exchanging messages through the same relay.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    poll_until,
    raw_session,
    recv,
    send_json,
    token,
)
from trio_websocket import ConnectionClosed

from relay.client import open_relay

pytest_plugins = ["relay_fixtures"]

EXAMPLES = 200
ANSWERS = {"error", "accepted", "acked"}
ERROR_CODES = {
    "bad_frame",
    "unknown_type",
    "too_large",
    "bad_recipient",
    "ttl_too_long",
    "rate_limited",
    "mailbox_full",
    "ref_conflict",  # the fuzzer reuses refs across requests
    "storage_unavailable",
}  # and "internal", which would mean a bug: no input should reach it
MAILBOXES = ["bob", "fuzz", "carol", "x" * 128]

# -- strategies -------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=80)  # no lone surrogates
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
frame_shaped = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["send", "ack", "auth", "deliver", "welcome", "accepted"])
        | st.text(max_size=8)
        | json_values
    },
    optional={
        "ref": st.text(min_size=1, max_size=70) | json_values,
        "to": st.sampled_from(MAILBOXES)
        | st.lists(st.sampled_from(MAILBOXES) | st.text(max_size=12), max_size=4)
        | json_values,
        "body": st.text(max_size=200) | json_values,
        "ttl": st.integers(min_value=-3, max_value=3700) | json_values,
        "ids": st.lists(st.text(max_size=20) | json_values, max_size=4) | json_values,
        "token": st.text(max_size=40) | json_values,
        "from": st.text(max_size=12),
    },
)
REFS = st.text(min_size=1, max_size=64)
plausible_send = st.fixed_dictionaries(
    {
        "type": st.just("send"),
        "to": st.sampled_from(MAILBOXES)
        | st.lists(st.sampled_from(MAILBOXES), min_size=1, max_size=3, unique=True),
        "body": st.text(max_size=300),
    },
    optional={"ref": REFS, "ttl": st.integers(min_value=-1, max_value=70)},
)
plausible_ack = st.fixed_dictionaries(
    {
        "type": st.just("ack"),
        "ids": st.lists(
            st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True) | st.text(max_size=10),
            max_size=5,
        ),
    },
    optional={"ref": REFS | st.none()},
)
frames: st.SearchStrategy[str | bytes] = st.one_of(
    TEXT,
    st.binary(max_size=64),
    json_values.map(json.dumps),
    frame_shaped.map(json.dumps),
    plausible_send.map(json.dumps),
    plausible_ack.map(json.dumps),
    frame_shaped.map(lambda obj: json.dumps(obj, ensure_ascii=False)).filter(
        lambda text: _encodable(text)
    ),
)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# -- the session that receives the frames ---------------------------------------------


@attrs.frozen
class Outcome:
    answers: list[dict[str, Any]]
    closed: int | None  # the close code, when the relay closed the session


@attrs.define
class FuzzSession:
    """Owns the fuzzed session; `exchange` may be called from the Hypothesis thread."""

    url: str
    requests: trio.MemorySendChannel[tuple[str | bytes, trio.MemorySendChannel[Outcome]]]
    _incoming: trio.MemoryReceiveChannel[tuple[str | bytes, trio.MemorySendChannel[Outcome]]]
    probes: int = 0
    frames: int = 0
    reconnects: int = 0

    @classmethod
    def create(cls, url: str) -> FuzzSession:
        send, receive = trio.open_memory_channel[
            tuple[str | bytes, trio.MemorySendChannel[Outcome]]
        ](0)
        return cls(url, send, receive)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            async with raw_session(self.url, "fuzz") as (ws, _):
                if not started:
                    task_status.started()
                    started = True
                while True:
                    frame, reply = await self._incoming.receive()
                    outcome = await self._one(ws, frame)
                    await reply.send(outcome)
                    if outcome.closed is not None:
                        self.reconnects += 1
                        break

    async def _one(self, ws: Any, frame: str | bytes) -> Outcome:
        self.frames += 1
        self.probes += 1
        probe = f"\u2603probe-{self.probes}"
        answers: list[dict[str, Any]] = []
        try:
            with trio.fail_after(DEADLINE_S):
                await ws.send_message(frame)
                await send_json(ws, {"type": "ack", "ids": ["probe"], "ref": probe})
                while True:
                    answer = await recv(ws)
                    if answer.get("type") == "deliver":
                        continue
                    if answer.get("type") == "acked" and answer.get("ref") == probe:
                        return Outcome(answers, None)
                    answers.append(answer)
        except ConnectionClosed as closed:
            return Outcome(answers, closed.reason.code if closed.reason else None)

    def exchange(self, frame: str | bytes) -> Outcome:
        """From the Hypothesis thread: send one frame, return what it caused."""

        async def ask() -> Outcome:
            reply, result = trio.open_memory_channel[Outcome](1)
            await self.requests.send((frame, reply))
            return await result.receive()

        outcome: Outcome = trio.from_thread.run(ask)
        return outcome


def check_outcome(frame: str | bytes, outcome: Outcome) -> None:
    # 1008 needs a flood over the rate limit or a client that stops reading, 1009 a frame
    # over the frame limit: neither can happen here, so no frame may close the session.
    assert outcome.closed is None, (frame, outcome)
    assert len(outcome.answers) <= 1, (frame, outcome)
    if not outcome.answers:
        # only a well-formed ack without ref goes unanswered
        obj = orjson.loads(frame)
        assert isinstance(obj, dict) and obj.get("type") == "ack", (frame, outcome)
        assert obj.get("ref") is None, (frame, outcome)
        return
    (answer,) = outcome.answers
    assert answer.get("type") in ANSWERS, (frame, answer)
    if answer["type"] == "error":
        assert answer.get("code") in ERROR_CODES, (frame, answer)
        assert isinstance(answer.get("message"), str), (frame, answer)


def run_examples(exchange: Callable[[str | bytes], Outcome]) -> None:
    """The Hypothesis part, run in a worker thread."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(frame=frames)
    def one_frame(frame: str | bytes) -> None:
        check_outcome(frame, exchange(frame))

    one_frame()


async def ping_pong(url: str, counter: list[int]) -> None:
    """A second pair of sessions that keeps sending and receiving while the fuzzing runs."""
    async with open_relay(url, token("carol")) as carol, open_relay(url, token("dave")) as dave:
        n = 0
        while True:
            with trio.fail_after(DEADLINE_S):
                await carol.send("dave", f"ping {n}")
                message = await dave.receive()
                assert message.body == f"ping {n}"
                assert message.sender == "carol"
                assert await dave.ack([message.id]) == 1
            counter[0] += 1
            n += 1


async def test_acceptance_bad_input_every_frame_answered_server_survives_others_unaffected(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(
        retention_s=60,
        max_body_bytes=4096,
        rate_limit_per_s=1_000_000,  # this test is about what is sent, not how fast
        rate_burst=1_000_000,
    )
    session = FuzzSession.create(relay.url)
    exchanged = [0]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            nursery.start_soon(ping_pong, relay.url, exchanged)
            await trio.to_thread.run_sync(run_examples, session.exchange)
            during = exchanged[0]
            after = during + 3
            await poll_until(lambda: exchanged[0] >= after, 0.01)  # and they go on
            nursery.cancel_scope.cancel()
    assert session.frames >= EXAMPLES
    assert session.reconnects == 0
    assert during > 0, "the other sessions exchanged nothing while the fuzzing ran"
    with trio.fail_after(DEADLINE_S):  # and the relay takes new sessions
        async with open_relay(relay.url, token("erin")) as erin:
            await erin.send("erin", "still here")
            assert (await erin.receive()).body == "still here"
