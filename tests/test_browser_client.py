"""relay.js in a real Chromium (Debian's, driven by playwright) against real relays and Redis.

Playwright's sync API runs in a worker thread (`trio.to_thread.run_sync`); the
thread reaches back into the test's event loop with `trio.from_thread.run` to
kill or restart a relay mid-test. Skipped, with the reason, where chromium or
playwright is missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from process_fixtures import (
    RestartableRelay,
    restartable_relay,
    run_cli,
    stop_process,
    user_env,
)
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    answer,
    msg_key,
    poll_until,
    raw_session,
    request,
    send_json,
    token,
    unique,
)

from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient, connect
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]

CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_DEADLINE_S = 25.0  # one whole browser test
STEP_MS = 10_000  # one playwright step
SENDS = 60  # of the killed-relay test
PAUSE_ATTEMPTS = 3  # pauses of Redis tried until a send in flight is answered `unconfirmed`

# In CI (.ci/run) a skip is a failure: there the browser tests must really run.
_REQUIRED = os.environ.get("RELAY_BROWSER_TEST_REQUIRED") == "1"
pytestmark = [
    pytest.mark.skipif(
        not _REQUIRED and importlib.util.find_spec("playwright") is None,
        reason="the playwright package is not installed (pip install playwright)",
    ),
    pytest.mark.skipif(
        not _REQUIRED and not os.path.exists(CHROMIUM),
        reason=f"no chromium at {CHROMIUM} (apt-get install chromium, or set RELAY_TEST_CHROMIUM)",
    ),
]

T = TypeVar("T")

# Installed in a page: window.start(url, token | null, options) makes a RelayClient that
# records what it sees in window.got / window.events; token null means "ask Python".
HARNESS = """
async ([moduleUrl, url, tok, options]) => {
  const { RelayClient, RelayError } = await import(moduleUrl);
  window.RelayError = RelayError;
  window.got = [];
  window.events = [];
  const client = new RelayClient(url, {
    token: tok === null ? () => window.getToken() : tok,
    minBackoffMs: 50,
    maxBackoffMs: 300,
    ...options,
  });
  client.addEventListener("message", (e) => window.got.push(e.detail));
  for (const type of ["welcome", "state", "close", "expired", "epoch"]) {
    client.addEventListener(type, (e) => window.events.push([type, e.detail]));
  }
  window.client = client;
  if (options.noWait) { client.connect().catch(() => {}); return null; }
  const welcome = await client.connect();
  return welcome.mailbox;
}
"""


def _with_browser(fn: Callable[[Any], T]) -> T:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            return fn(browser)
        finally:
            browser.close()


async def in_browser(fn: Callable[[Any], T], deadline_s: float = BROWSER_DEADLINE_S) -> T:
    """Run `fn(browser)` in a worker thread with a fresh Chromium, within the test deadline."""
    with trio.fail_after(deadline_s):
        return await trio.to_thread.run_sync(_with_browser, fn)


def open_page(browser: Any, origin: str) -> Any:
    """A page on the relay's origin (showing /relay.js: any same-origin document will do)."""
    page = browser.new_page()
    page.set_default_timeout(STEP_MS)
    page.goto(f"{origin}/relay.js")
    return page


def start_client(page: Any, port: int, tok: str | None, **options: Any) -> Any:
    origin = f"http://127.0.0.1:{port}"
    return page.evaluate(HARNESS, [f"{origin}/relay.js", f"ws://127.0.0.1:{port}/v1", tok, options])


def http_origin(relay: RunningRelay) -> str:
    return f"http://127.0.0.1:{relay.port}"


async def test_two_pages_exchange_200_messages_in_order_each_once_and_nothing_remains(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay(dedupe_window_s=1)

    def scenario(browser: Any) -> tuple[list[str], list[str], int, list[Any]]:
        alice, bob = open_page(browser, http_origin(relay)), open_page(browser, http_origin(relay))
        start_client(alice, relay.port, token("alice-b"))
        start_client(bob, relay.port, token("bob-b"))
        alice.evaluate(
            """async () => {
                 const sends = [];
                 for (let i = 0; i < 200; i++) sends.push(client.send("bob-b", `m${i}`, { ttl: 600 }));
                 await Promise.all(sends);
               }"""
        )
        bob.wait_for_function("window.got.length >= 200")
        bob.wait_for_function("client._acks.size === 0 && client._ackTimer === null")
        bodies = bob.evaluate("window.got.map((m) => m.body)")
        ids = bob.evaluate("window.got.map((m) => m.id)")
        once = [
            alice.evaluate("client.stats.sends"),
            welcomes(alice),
            welcomes(bob),
            closes(alice) + closes(bob),
            bob.evaluate("client.stats.duplicatesDropped"),
        ]
        return bodies, ids, bob.evaluate("client.stats.ackFrames"), once

    bodies, ids, ack_frames, once = await in_browser(scenario)
    assert bodies == [f"m{i}" for i in range(200)]
    assert len(set(ids)) == 200
    assert ack_frames >= 1
    assert once == [200, 1, 1, [], 0]  # each sent once, one session each, nothing redelivered
    with trio.fail_after(DEADLINE_S):  # acks delete the messages, the dedupe window the refs
        await poll_until(lambda: _keys(redis_client, prefix) == [])


def _keys(redis_client: RedisClient, prefix: str) -> list[str]:
    from relay_fixtures import keys_under

    return keys_under(redis_client, prefix)


@pytest.fixture
async def restartable(
    redis_url: str, prefix: str, tmp_path: Path
) -> AsyncIterator[RestartableRelay]:
    """A relay subprocess on a fixed port that a test pauses, kills and starts again."""
    async with restartable_relay(redis_url, prefix, tmp_path) as relay:
        yield relay


async def test_sends_pending_when_the_relay_is_killed_are_stored_exactly_once_after_restart(
    restartable: RestartableRelay, redis_client: RedisClient, prefix: str
) -> None:
    port = restartable.port

    def scenario(browser: Any) -> tuple[list[str], int]:
        page = open_page(browser, f"http://127.0.0.1:{port}")
        start_client(page, port, token("alice-k"))
        page.evaluate(
            """(n) => {
                 window.accepted = [];
                 window.sendErrors = [];
                 window.burst = (from, to) => {
                   for (let i = from; i < to; i++) {
                     client.send("carol-k", `k${i}`, { ttl: 600 }).then(
                       (a) => window.accepted.push(a), (e) => window.sendErrors.push(e.code));
                   }
                 };
               }"""
        )
        page.evaluate("burst(0, 10)")
        page.wait_for_function("window.accepted.length === 10")
        # The relay stops answering (SIGSTOP): these sends reach its socket, unanswered;
        # then it dies (SIGKILL) and a new one starts on the port. The page resends them.
        trio.from_thread.run_sync(restartable.pause)
        page.evaluate(f"burst(10, {SENDS})")
        page.wait_for_function(f"client.pendingCount === {SENDS - 10}")
        trio.from_thread.run(restartable.restart)
        page.wait_for_function(f"window.accepted.length + window.sendErrors.length === {SENDS}")
        return page.evaluate("window.sendErrors"), page.evaluate("client.stats.welcomes")

    errors, welcomes = await in_browser(scenario)
    assert errors == []
    assert welcomes == 2
    stored = _stored_bodies(redis_client, prefix, "carol-k")
    assert sorted(stored) == sorted(f"k{i}" for i in range(SENDS))  # each exactly once


def _stored_bodies(redis_client: RedisClient, prefix: str, mailbox: str) -> list[str]:
    import orjson

    keys = list(redis_client.scan_iter(match=f"{prefix}{{{mailbox}}}:msg:*"))
    values = [str(v).partition("\n")[2] for v in redis_client.mget(keys) if v is not None]
    return [orjson.loads(v)["body"] for v in values]


async def test_redelivered_messages_reach_the_listener_once(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice-r") as (alice, _):
            for i in range(5):
                await send_json(
                    alice, {"type": "send", "ref": f"r{i}", "to": "bob-r", "body": f"r{i}"}
                )
                assert (await answer(alice))["type"] == "accepted"

    def scenario(browser: Any) -> tuple[list[str], int, int]:
        page = open_page(browser, http_origin(relay))
        start_client(page, relay.port, token("bob-r"), autoAck=False)
        page.wait_for_function("window.got.length >= 5")
        page.evaluate("client._ws.close(4000, 'test: reconnect')")  # unacked: redelivered
        page.wait_for_function("client.stats.welcomes === 2 && client.stats.duplicatesDropped >= 5")
        page.evaluate("for (const m of window.got) client.ack(m.id)")
        page.wait_for_function("client._acks.size === 0")
        return (
            page.evaluate("window.got.map((m) => m.body)"),
            page.evaluate("client.stats.duplicatesDropped"),
            page.evaluate("client.stats.ackFrames"),
        )

    bodies, dropped, ack_frames = await in_browser(scenario)
    assert bodies == [f"r{i}" for i in range(5)]
    assert dropped == 5
    assert ack_frames == 1
    with trio.fail_after(DEADLINE_S):
        await poll_until(lambda: _stored_bodies(redis_client, prefix, "bob-r") == [])


async def test_acks_of_a_burst_are_batched(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice-a") as (alice, _):
            for i in range(100):
                await send_json(
                    alice, {"type": "send", "ref": f"a{i}", "to": "bob-a", "body": f"a{i}"}
                )
            for _ in range(100):
                assert (await answer(alice))["type"] == "accepted"
    registry = relay.services.metrics.registry
    before = registry.get_sample_value("relay_ack_frames_received_total") or 0.0

    def scenario(browser: Any) -> int:
        page = open_page(browser, http_origin(relay))
        start_client(page, relay.port, token("bob-a"))
        page.wait_for_function("window.got.length >= 100")
        page.wait_for_function("client._acks.size === 0 && client._ackTimer === null")
        count: int = page.evaluate("window.got.length")
        return count

    assert await in_browser(scenario) == 100
    with trio.fail_after(DEADLINE_S):
        await poll_until(lambda: _stored_bodies(redis_client, prefix, "bob-a") == [])
    frames = (registry.get_sample_value("relay_ack_frames_received_total") or 0.0) - before
    assert 1 <= frames <= 10, f"{frames} ack frames for 100 messages"


async def test_an_expiring_token_is_refreshed_and_a_newer_session_stops_the_older_page(
    relay: RunningRelay,
) -> None:
    issued: list[int] = []

    def get_token() -> str:
        issued.append(1)
        return token("dave-t", ttl_s=2 if len(issued) == 1 else 3600)  # the first runs out

    def scenario(browser: Any) -> dict[str, Any]:
        page = open_page(browser, http_origin(relay))
        page.expose_function("getToken", get_token)
        start_client(page, relay.port, None)
        page.wait_for_function("client.stats.welcomes >= 2", timeout=STEP_MS)
        closes = page.evaluate(
            "window.events.filter(([t]) => t === 'close').map(([, d]) => d.code)"
        )
        # The session resumed: a message to itself arrives.
        page.evaluate("client.send('dave-t', 'after refresh')")
        page.wait_for_function("window.got.some((m) => m.body === 'after refresh')")
        newer = open_page(browser, http_origin(relay))
        start_client(newer, relay.port, token("dave-t"))
        page.wait_for_function("client.state === 'closed'")
        return {
            "closes": closes,
            "final": page.evaluate("window.events.filter(([t]) => t === 'close').pop()[1]"),
            "reconnecting": page.evaluate("client._reconnectTimer !== null"),
            "newer": newer.evaluate("client.state"),
        }

    result = await in_browser(scenario)
    assert 4401 in result["closes"]
    assert len(issued) == 2  # the first token, then the refresh after 4401
    assert result["final"]["code"] == 4409 and result["final"]["final"] is True
    assert result["reconnecting"] is False
    assert result["newer"] == "open"


async def test_allowed_origin_admits_the_pages_origin_and_refuses_another(
    make_relay: RelayFactory,
) -> None:
    port = free_loopback_port()
    relay = await make_relay(port=port, allowed_origins=(f"http://127.0.0.1:{port}",))

    def scenario(browser: Any) -> tuple[str, list[int], int]:
        page = open_page(browser, http_origin(relay))
        mailbox: str = start_client(page, port, token("erin-o"))
        # localhost reaches the same relay but is another origin than 127.0.0.1.
        other = open_page(browser, f"http://localhost:{port}")
        start_client(other, port, token("erin-o"), noWait=True)
        other.wait_for_function("window.events.filter(([t]) => t === 'close').length >= 2")
        codes = other.evaluate(
            "window.events.filter(([t]) => t === 'close').map(([, d]) => d.code)"
        )
        welcomes: int = other.evaluate("client.stats.welcomes")
        other.evaluate("client.close()")
        return mailbox, codes, welcomes

    mailbox, codes, welcomes = await in_browser(scenario)
    assert mailbox == "erin-o"
    assert welcomes == 0 and set(codes) == {1006}
    refused = relay.services.metrics.registry.get_sample_value(
        "relay_handshakes_refused_total", {"status": "403"}
    )
    assert refused is not None and refused >= 2


async def test_the_demo_page_exchanges_a_message_between_two_pages(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await make_relay(demo=True)

    def scenario(browser: Any) -> str:
        pages = {}
        for name in ("alice-d", "bob-d"):
            page = browser.new_page()
            page.set_default_timeout(STEP_MS)
            page.goto(f"{http_origin(relay)}/demo#token={token(name)}")
            # A selector, not wait_for_function: the page's CSP forbids the eval that needs.
            page.wait_for_selector("#state.state-open")
            assert page.url.endswith("/demo")  # the token left the address bar
            pages[name] = page
        alice, bob = pages["alice-d"], pages["bob-d"]
        alice.fill("#to", "bob-d")
        alice.fill("#body", "hello from the demo")
        alice.click("#send")
        bob.wait_for_selector("#messages li.theirs >> text=hello from the demo")
        alice.wait_for_selector("#messages li.mine >> text=hello from the demo")
        bob.screenshot(path=str(tmp_path / "demo-bob.png"))
        alice.screenshot(path=str(tmp_path / "demo-alice.png"))
        text: str = bob.inner_text("#messages")
        return text

    text = await in_browser(scenario)
    assert "from alice-d" in text
    assert (tmp_path / "demo-bob.png").stat().st_size > 1000


async def test_the_readme_demo_flow_serve_demo_then_relay_token_then_two_pages(
    tmp_path: Path,
) -> None:
    """README's newcomer flow: `relay serve --demo` (embedded Valkey, a development secret it
    prints with `export` lines), `relay token alice` / `relay token bob` with those lines,
    then /demo in two pages, a token pasted into each, and a chat both ways."""
    port, log = free_loopback_port(), tmp_path / "serve.log"
    serve = [sys.executable, "-m", "relay", "serve", "--demo", "--port", str(port)]
    with log.open("wb") as file:
        process = await trio.lowlevel.open_process(
            [*serve, "--ops-port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=file,
            stderr=file,
            env=user_env(),
        )
    try:
        with trio.fail_after(BROWSER_DEADLINE_S):
            await poll_until(lambda: b"listening on" in log.read_bytes() or bool(process.poll()))
            text = log.read_text()
            exports = dict(re.findall(r"export (RELAY_\w+)=(\S+)", text))
            assert exports["RELAY_URL"] == f"ws://127.0.0.1:{port}/v1", text
            assert f"open http://127.0.0.1:{port}/demo in two tabs" in text, text
            tokens = {}
            for name in ("alice", "bob"):
                result = await run_cli("token", name, **exports)
                assert result.returncode == 0, result.stderr
                tokens[name] = result.stdout.decode().strip()

        def scenario(browser: Any) -> dict[str, str]:
            pages = {}
            for name, tok in tokens.items():
                page = browser.new_page()
                page.set_default_timeout(STEP_MS)
                page.goto(f"http://127.0.0.1:{port}/demo")
                page.fill("#token", tok)
                page.click("#connect")
                page.wait_for_selector("#state.state-open")
                pages[name] = page
            for sender, recipient in (("alice", "bob"), ("bob", "alice")):
                pages[sender].fill("#to", recipient)
                pages[sender].fill("#body", f"hi {recipient}")
                pages[sender].click("#send")
                pages[recipient].wait_for_selector(f"#messages li.theirs >> text=hi {recipient}")
            return {name: page.inner_text("#messages") for name, page in pages.items()}

        seen = await in_browser(scenario)
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process)
    assert "from alice" in seen["bob"] and "from bob" in seen["alice"]


# -- the watchdog, epochs, expiry, retries and backoff -------------------------------------


@pytest.fixture
def own_server(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the same kind as `redis_server`, on a fixed port, free to pause,
    stop and start again (empty: a new epoch). Started and stopped from the main thread
    (it dies with the thread that started it)."""
    server = EmbeddedServer(binary=redis_server.binary, port=free_loopback_port())
    server.start()
    yield server
    server.stop()


def welcomes(page: Any) -> int:
    count: int = page.evaluate("client.stats.welcomes")
    return count


def closes(page: Any) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = page.evaluate(
        "window.events.filter(([t]) => t === 'close').map(([, d]) => d)"
    )
    return details


async def test_the_idle_watchdog_reconnects_from_a_relay_that_answers_nothing(
    restartable: RestartableRelay,
) -> None:
    port = restartable.port

    def scenario(browser: Any) -> list[dict[str, Any]]:
        page = open_page(browser, f"http://127.0.0.1:{port}")
        start_client(page, port, token("ivy-w"), idleTimeoutMs=1000)
        # SIGSTOP: TCP stays up, nothing answers the probe; the watchdog gives up.
        trio.from_thread.run_sync(restartable.pause)
        try:
            page.wait_for_function("window.events.some(([t, d]) => t === 'close' && d.local)")
        finally:
            trio.from_thread.run_sync(restartable.resume)
        page.wait_for_function("client.stats.welcomes === 2")
        page.evaluate("client.send('ivy-w', 'awake')")
        page.wait_for_function("window.got.some((m) => m.body === 'awake')")
        return closes(page)

    seen = await in_browser(scenario)
    assert seen[0]["local"] is True and seen[0]["reason"] == "idle", seen
    assert all(c["final"] is False for c in seen)


async def test_the_epoch_event_after_the_storage_restarted_empty(
    own_server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    async with restartable_relay(own_server.url, prefix, tmp_path) as relay:

        def scenario(browser: Any) -> tuple[str, list[dict[str, str]], str]:
            page = open_page(browser, f"http://127.0.0.1:{relay.port}")
            start_client(page, relay.port, token("jo-e"))
            first: str = page.evaluate("client.epoch")
            trio.from_thread.run(relay.kill)  # the node goes down, its memory-only Valkey too
            trio.from_thread.run_sync(own_server.stop)
            trio.from_thread.run_sync(own_server.start)
            trio.from_thread.run(relay.start)
            page.wait_for_function("window.events.some(([t]) => t === 'epoch')")
            epochs = page.evaluate("window.events.filter(([t]) => t === 'epoch').map(([, d]) => d)")
            return first, epochs, page.evaluate("client.epoch")

        first, epochs, now = await in_browser(scenario)
    assert now != first
    assert epochs == [{"epoch": now, "previous": first}]


async def test_the_expired_event_counts_a_message_that_ran_out_before_the_session(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    kim = unique("kim")
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice-x") as (alice, _):
            gone = await request(alice, {"type": "send", "to": kim, "body": "gone", "ttl": 1})
            stays = await request(alice, {"type": "send", "to": kim, "body": "stays"})
            assert gone["type"] == stays["type"] == "accepted"
        await poll_until(lambda: not redis_client.exists(msg_key(prefix, kim, gone["ids"][kim])))

    def scenario(browser: Any) -> tuple[list[Any], list[str]]:
        page = open_page(browser, http_origin(relay))
        start_client(page, relay.port, token(kim))
        page.wait_for_function("window.got.length >= 1")
        expired = page.evaluate("window.events.filter(([t]) => t === 'expired').map(([, d]) => d)")
        return expired, page.evaluate("window.got.map((m) => m.body)")

    expired, bodies = await in_browser(scenario)
    assert expired == [{"count": 1}]
    assert bodies == ["stays"]


async def test_a_send_answered_unconfirmed_is_sent_again_and_stored_once(
    make_relay: RelayFactory, own_server: EmbeddedServer, prefix: str
) -> None:
    """Redis paused (SIGSTOP) past the relay's redis timeout: `unconfirmed` (maybe stored);
    the page sends it again with its ref until Redis answers.

    A send that reaches the relay while another command of its pipeline (the relay's own
    epoch poll, every second) already waits on the paused Redis is refused unsent,
    `storage_unavailable`, and must not be stored: then the pause is tried again."""
    relay = await make_relay(redis_url=own_server.url, redis_timeout_s=0.5)

    def stall(on: bool) -> None:
        os.kill(own_server.pid, signal.SIGSTOP if on else signal.SIGCONT)

    def send_while_paused(page: Any, attempt: int) -> Any:
        """The outcome of one send made while Redis is paused: its ids once stored after a
        retry, or the code it failed with."""
        page.evaluate(f"client.send('lee-u', 'warm up {attempt}')")  # Redis answers again
        before = page.evaluate("client.stats.sends")
        trio.from_thread.run_sync(stall, True)
        try:
            page.evaluate(
                f"""() => {{ window.outcome = undefined;
                     client.send('lee-u', 'while paused {attempt}').then(
                       (a) => {{ window.outcome = a.ids; }}, (e) => {{ window.outcome = e.code; }}); }}"""
            )
            # the first try and a retry, or a failure without a retry
            page.wait_for_function(
                f"client.stats.sends >= {before} + 2 || window.outcome !== undefined"
            )
        finally:
            trio.from_thread.run_sync(stall, False)
        page.wait_for_function("window.outcome !== undefined")
        return page.evaluate("window.outcome")

    def scenario(browser: Any) -> tuple[list[Any], int, list[dict[str, Any]]]:
        page = open_page(browser, http_origin(relay))
        start_client(page, relay.port, token("alice-u"))
        outcomes = []
        for attempt in range(PAUSE_ATTEMPTS):
            outcomes.append(send_while_paused(page, attempt))
            if outcomes[-1] != "storage_unavailable":
                break
        return outcomes, welcomes(page), closes(page)

    try:
        outcomes, sessions, closed = await in_browser(scenario)
    finally:
        stall(False)
    assert sessions == 1 and closed == []  # sent again on the same session
    *refused, outcome = outcomes
    assert refused == ["storage_unavailable"] * len(refused)
    assert isinstance(outcome, dict) and "lee-u" in outcome, outcomes
    unconfirmed = relay.services.metrics.registry.get_sample_value(
        "relay_requests_rejected_total", {"code": "unconfirmed"}
    )
    assert unconfirmed is not None and unconfirmed >= 1
    warm_ups = [f"warm up {n}" for n in range(len(outcomes))]
    own_client = connect(own_server.url)
    try:
        stored = sorted(_stored_bodies(own_client, prefix, "lee-u"))
    finally:
        own_client.close()
    assert stored == [*warm_ups, f"while paused {len(outcomes) - 1}"]


async def test_rate_limited_sends_are_sent_again_and_each_stored_once(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    # Below one frame a second a frame over the burst would wait longer than the relay
    # delays one (protocol.md, "Rate limits"), so it is refused rather than slowed. A read
    # with refusals is a strike, and more than the burst of them closes the session
    # (1008): the page retries refused sends one at a time, slowing down while they are
    # refused, whatever its reconnect backoff (the harness's is 300 ms at most).
    relay = await make_relay(rate_limit_per_s=0.5, rate_burst=10)
    sends = 14  # 4 over the burst, refused at first (the auth frame is not counted)

    def scenario(browser: Any) -> tuple[int, list[str], int, list[dict[str, Any]]]:
        page = open_page(browser, http_origin(relay))
        start_client(page, relay.port, token("alice-l"))
        errors: list[str] = page.evaluate(
            f"""async () => {{
                 const sends = [];
                 for (let i = 0; i < {sends}; i++) sends.push(client.send("max-l", `l${{i}}`));
                 const results = await Promise.allSettled(sends);
                 return results.filter((r) => r.status === "rejected").map((r) => r.reason.code);
               }}"""
        )
        return page.evaluate("client.stats.sends"), errors, welcomes(page), closes(page)

    # 4 frames at 0.5/s take 8 s; the retries' jitter can double that
    written, errors, sessions, closed = await in_browser(scenario, deadline_s=60.0)
    assert errors == []
    assert written > sends  # some went twice
    # One session throughout, never closed 1008 (a reconnect would send the refused sends
    # again too, and hide it).
    assert sessions == 1 and closed == []
    limited = relay.services.metrics.registry.get_sample_value(
        "relay_requests_rejected_total", {"code": "rate_limited"}
    )
    assert limited is not None and limited >= 1
    stored = _stored_bodies(redis_client, prefix, "max-l")
    assert sorted(stored) == sorted(f"l{i}" for i in range(sends))


async def test_the_page_backs_off_while_sessions_get_1013_and_resumes_with_the_storage(
    make_relay: RelayFactory, own_server: EmbeddedServer
) -> None:
    relay = await make_relay(redis_url=own_server.url)
    own_server.stop()  # the relay runs on; a session cannot start (each try takes ~5 s)

    def scenario(browser: Any) -> tuple[list[dict[str, Any]], int]:
        page = open_page(browser, http_origin(relay))
        start_client(page, relay.port, token("max-b"), noWait=True)
        page.wait_for_function(
            "window.events.filter(([t, d]) => t === 'close' && d.code === 1013).length >= 2",
            timeout=30_000,
        )
        trio.from_thread.run_sync(own_server.start)
        page.wait_for_function("client.stats.welcomes === 1", timeout=30_000)
        page.evaluate("client.send('max-b', 'storage is back')")
        page.wait_for_function("window.got.some((m) => m.body === 'storage is back')")
        return closes(page), page.evaluate("client.stats.connects")

    seen, connects = await in_browser(scenario, deadline_s=70.0)
    assert {c["code"] for c in seen} == {1013}
    assert connects == len(seen) + 1
