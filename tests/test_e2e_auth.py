"""End to end, protocol.md's authentication: bearer header or auth frame, the refusals (4401,
4408, HTTP 403 for a foreign Origin), the welcome frame, token expiry, one live session per
mailbox (4409), and an auth frame after authentication.

Every test talks to a real relay (`serve_relay` on port 0) over real
WebSockets, on the test's Redis and key prefix. Tests that must see raw frames
or close codes use a plain trio-websocket connection; the others use
`relay.client`.
"""

from __future__ import annotations

from typing import Literal

import jwt
import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    SECRET,
    RelayFactory,
    answer,
    close_code,
    keys_under,
    raw_session,
    raw_ws,
    recv,
    request,
    send_json,
    signed_token,
    token,
    unsigned_token,
    valid_claims,
    wall_ms,
)
from trio_websocket import ConnectionClosed, ConnectionRejected

from relay.client import open_relay
from relay.codes import CLOSE_REASONS, CloseCode
from relay.redis.admin import RedisClient
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]


# -- authentication -------------------------------------------------------------


async def test_auth_authorization_bearer_header(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(relay.url, bearer=token("alice")) as ws:
            welcome = await recv(ws)
            assert welcome["type"] == "welcome"
            assert welcome["mailbox"] == "alice"


async def test_auth_frame_first_within_auth_timeout(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(relay.url) as ws:
            await send_json(ws, {"type": "auth", "token": token("alice")})
            welcome = await recv(ws)
            assert welcome["type"] == "welcome"
            assert welcome["mailbox"] == "alice"
        async with open_relay(relay.url, token("bob"), auth="frame") as bob:
            assert bob.welcome["mailbox"] == "bob"


@pytest.mark.parametrize("name", ["token", "access_token", "jwt", "auth"])
async def test_auth_token_in_url_query_string_is_not_accepted(
    make_relay: RelayFactory, name: str
) -> None:
    relay = await make_relay(auth_timeout_s=0.5)
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(f"{relay.url}?{name}={token('alice')}") as ws:
            assert await close_code(ws) == CloseCode.AUTH_TIMEOUT


def _refused_tokens() -> dict[str, str]:
    """Tokens the relay (audience "relay-test", issuer "relay-issuer") must refuse, by what is wrong."""
    good = {**valid_claims("alice"), "aud": "relay-test", "iss": "relay-issuer"}
    return {
        "bad signature": signed_token(good, key="another-secret-that-is-also-32-bytes-long"),
        "expired": signed_token({**good, "iat": good["iat"] - 7200, "exp": good["iat"] - 3600}),
        "alg none": unsigned_token(good),
        "wrong audience": signed_token({**good, "aud": "another-service"}),
        "wrong issuer": signed_token({**good, "iss": "someone-else"}),
        "no issuer": signed_token({k: v for k, v in good.items() if k != "iss"}),
        "alg HS512": jwt.encode(good, SECRET * 2, algorithm="HS512"),
        "no exp": signed_token({"sub": "alice", "aud": "relay-test"}),
        "nbf in the future": signed_token({**good, "nbf": good["exp"] - 60}),
        "sub not a mailbox id": signed_token({**good, "sub": "not a mailbox!"}),
        "not a jwt": "this-is-not-a-token",
    }


@pytest.mark.parametrize("how", ["header", "frame"])
async def test_auth_failures_all_close_4401_with_the_same_reason(
    make_relay: RelayFactory, how: Literal["header", "frame"]
) -> None:
    relay = await make_relay(jwt_audience="relay-test", jwt_issuer="relay-issuer")
    seen: dict[str, tuple[int, str | None]] = {}
    with trio.fail_after(DEADLINE_S):
        for what, bad in _refused_tokens().items():
            async with raw_ws(relay.url, bearer=bad if how == "header" else None) as ws:
                if how == "frame":
                    await send_json(ws, {"type": "auth", "token": bad})
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()  # no welcome
                reason = closed.value.reason
                assert reason is not None
                seen[what] = (reason.code, reason.reason)
        # the same relay accepts a good token, so the refusals above are about the tokens
        good = signed_token({**valid_claims("alice"), "aud": "relay-test", "iss": "relay-issuer"})
        async with open_relay(relay.url, good, auth=how) as alice:
            assert alice.welcome["mailbox"] == "alice"
    assert set(seen.values()) == {
        (CloseCode.UNAUTHORIZED, CLOSE_REASONS[CloseCode.UNAUTHORIZED])
    }, seen


@pytest.mark.parametrize("value", ["Basic YWxpY2U6cHc=", "Bearer", "Token {token}", "{token}"])
async def test_auth_authorization_header_other_than_bearer_closes_4401(
    relay: RunningRelay, value: str
) -> None:
    header = value.format(token=token("alice")).encode()
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(relay.url, headers=[(b"Authorization", header)]) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    reason = closed.value.reason
    assert reason is not None
    assert (reason.code, reason.reason) == (
        CloseCode.UNAUTHORIZED,
        CLOSE_REASONS[CloseCode.UNAUTHORIZED],
    )


async def test_auth_timeout_closes_4408(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_timeout_s=0.5)
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(relay.url) as ws:
            started = trio.current_time()
            assert await close_code(ws) == CloseCode.AUTH_TIMEOUT
            assert trio.current_time() - started >= 0.4


@pytest.mark.parametrize(
    "first",
    [
        {"type": "send", "ref": "r1", "to": "bob", "body": "before auth"},
        {"type": "ack", "ids": ["x"], "ref": "a1"},
        {"type": "welcome"},
        "not json",
        b"binary",
    ],
    ids=["send", "ack", "unknown", "not-json", "binary"],
)
async def test_auth_non_auth_first_frame_closes_4401_and_is_not_processed(
    relay: RunningRelay, redis_client: RedisClient, prefix: str, first: object
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(relay.url) as ws:
            if isinstance(first, bytes | str):
                await ws.send_message(first)
            else:
                await send_json(ws, first)
            assert await close_code(ws) == CloseCode.UNAUTHORIZED
    assert keys_under(redis_client, prefix) == []  # nothing was stored for "bob"


async def test_auth_welcome_has_exactly_the_protocol_fields_with_configured_values(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(
        retention_s=4321, max_body_bytes=2048, max_inflight=7, max_frame_bytes=300_000
    )
    with trio.fail_after(DEADLINE_S):
        before = wall_ms()
        async with raw_session(relay.url, "bob@example.org/phone-1") as (_, welcome):
            after = wall_ms()
    assert set(welcome) == {
        "type",
        "mailbox",
        "session",
        "retention_s",
        "max_body_bytes",
        "max_frame_bytes",
        "max_inflight",
        "server_time",
        "expired",
        "epoch",
    }
    assert welcome["type"] == "welcome"
    assert welcome["mailbox"] == "bob@example.org/phone-1"
    assert isinstance(welcome["session"], str) and welcome["session"]
    assert welcome["retention_s"] == 4321
    assert welcome["max_body_bytes"] == 2048
    assert welcome["max_frame_bytes"] == 300_000
    assert welcome["max_inflight"] == 7
    assert before - 1000 <= welcome["server_time"] <= after + 1000
    assert welcome["expired"] == 0


async def test_auth_session_ends_4401_when_token_exp_passes(relay: RunningRelay) -> None:
    with trio.fail_after(6):
        async with raw_ws(relay.url, bearer=token("alice", ttl_s=2)) as ws:
            assert (await recv(ws))["type"] == "welcome"
            assert await close_code(ws) == CloseCode.UNAUTHORIZED


async def test_auth_origin_not_in_allowed_origins_gets_http_403(make_relay: RelayFactory) -> None:
    # drain_timeout: refused handshakes linger in the relay (see the test below)
    relay = await make_relay(allowed_origins=("https://app.example",), drain_timeout_s=0.2)
    with trio.fail_after(DEADLINE_S):
        for origin in ("https://evil.example", "https://app.example.evil", "http://app.example"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with raw_ws(relay.url, bearer=token("alice"), origin=origin):
                    pass
            assert rejected.value.status_code == 403
        async with raw_ws(relay.url, bearer=token("alice"), origin="https://app.example") as ws:
            assert (await recv(ws))["type"] == "welcome"


async def test_auth_origin_refusal_closes_the_tcp_connection(make_relay: RelayFactory) -> None:
    relay = await make_relay(allowed_origins=("https://app.example",), drain_timeout_s=0.2)
    handshake = (
        "GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token('alice')}\r\nOrigin: https://evil.example\r\n\r\n"
    )
    response = b""
    with trio.fail_after(DEADLINE_S):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        async with stream:
            await stream.send_all(handshake.encode())
            with trio.move_on_after(1.5):  # the relay should hang up right after its answer
                while chunk := await stream.receive_some():
                    response += chunk
                response += b"<EOF>"
    assert response.startswith(b"HTTP/1.1 403")
    assert response.endswith(b"<EOF>"), response


async def test_auth_one_live_session_per_mailbox_older_closed_4409(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            raw_session(relay.url, "alice") as (old, _),
            open_relay(relay.url, token("alice")) as new,
        ):
            assert await close_code(old) == CloseCode.REPLACED
            await new.send("alice", "the newer session works")
            assert (await new.receive()).body == "the newer session works"


async def test_auth_frame_after_authentication_is_an_error_not_a_new_identity(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(ws, {"type": "auth", "token": token("mallory"), "ref": "au"})
            assert error["type"] == "error"
            assert error["code"] == "bad_frame"
            await send_json(ws, {"type": "send", "ref": "s", "to": "bob", "body": "who am I"})
            assert (await answer(ws))["type"] == "accepted"
        async with open_relay(relay.url, token("bob")) as bob:
            assert (await bob.receive()).sender == "alice"


async def test_auth_frame_after_authentication_error_carries_the_ref(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(ws, {"type": "auth", "token": token("alice"), "ref": "au"})
    assert error["type"] == "error"
    assert error.get("ref") == "au"
