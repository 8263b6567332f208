"""The edges of a connection: a handshake without Origin, close codes a client makes up,
and a fault inside a connection (logged at ERROR with a traceback, the relay stays up)."""

from __future__ import annotations

import logging

import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    RelayFactory,
    poll_until,
    raw_session,
    raw_ws,
    recv,
    scrape,
    token,
    unique,
)
from trio_websocket import ConnectionRejected

import relay.server
from relay.embedded import free_loopback_port

pytest_plugins = ["relay_fixtures"]

ALLOWED = "https://chat.example"


async def test_allowed_origin_accepts_a_handshake_without_origin(make_relay: RelayFactory) -> None:
    relay = await make_relay(allowed_origins=(ALLOWED,))
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(relay.url, bearer=token("bob")) as ws:  # no Origin header: not a browser
            assert (await recv(ws))["type"] == "welcome"
        async with raw_ws(relay.url, bearer=token("bob"), origin=ALLOWED) as ws:
            assert (await recv(ws))["type"] == "welcome"
        with pytest.raises(ConnectionRejected) as refused:
            async with raw_ws(relay.url, bearer=token("bob"), origin="https://evil.example"):
                pass
        assert refused.value.status_code == 403


async def test_close_codes_the_protocol_does_not_define_are_labelled_other(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(ops_port=free_loopback_port())
    with trio.fail_after(DEADLINE_S):
        for code in (3999, 4999, 4001):
            async with raw_session(relay.url, unique("m")) as (ws, _):
                await ws.aclose(code)
        async with raw_session(relay.url, unique("m")) as (ws, _):
            await ws.aclose(1000)

        async def counted() -> bool:  # the relay counts a close after its handler returns
            closed = await scrape(relay.ops_port)
            return closed.value("relay_connections_closed_total", code="1000") >= 1

        await poll_until(counted)
        metrics = await scrape(relay.ops_port)
    assert metrics.value("relay_connections_closed_total", code="other") == 3
    assert 'code="3999"' not in metrics.text and 'code="4001"' not in metrics.text


async def test_a_fault_in_a_connection_is_logged_at_error_with_a_traceback(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = await make_relay()

    async def broken(*args: object) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(relay_module, "handle_request", broken)
    with trio.fail_after(DEADLINE_S):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        async with stream:
            await stream.send_all(UPGRADE % relay.port)
            while await stream.receive_some(4096):
                pass  # the relay closes the connection after the fault
    faults = [
        r for r in caplog.records if r.name == "relay.server" and r.levelno >= logging.WARNING
    ]
    assert [(r.levelno, "injected fault" in (r.exc_text or "")) for r in faults] == [
        (logging.ERROR, True)
    ]
    monkeypatch.undo()
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "bob"):
            pass  # still serving


relay_module = relay.server
UPGRADE = (
    b"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
