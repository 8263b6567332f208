"""End to end, protocol.md point by point: transport, authentication, client frames, errors, close codes.

Every test talks to a real relay (`serve_relay` on port 0) over real
WebSockets, on the test's Redis and key prefix. Tests that must see raw frames
or close codes use a plain trio-websocket connection; the others use
`relay.client`.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jwt
import orjson
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from relay_fixtures import (
    DEADLINE_S,
    SECRET,
    SUBPROTOCOL,
    RelayFactory,
    answer,
    close_code,
    keys_under,
    poll_until,
    raw_session,
    raw_ws,
    receive_until,
    recv,
    request,
    send_json,
    signed_token,
    token,
    unsigned_token,
    valid_claims,
    wall_ms,
)
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from relay.client import RelayClientError, open_relay
from relay.codes import CLOSE_REASONS, CloseCode
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis_sync import RedisClient
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]


# -- transport ----------------------------------------------------------------


async def test_transport_path_v1_text_frames_carry_json_objects(relay: RunningRelay) -> None:
    assert relay.url.endswith("/v1")
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(relay.url, bearer=token("alice")) as ws:
            welcome = await ws.get_message()
            assert isinstance(welcome, str)
            assert isinstance(orjson.loads(welcome), dict)
            await send_json(ws, {"type": "send", "ref": "r1", "to": "alice", "body": "x"})
            frames = [await ws.get_message(), await ws.get_message()]
            assert all(isinstance(frame, str) for frame in frames)
            parsed = [orjson.loads(frame) for frame in frames]
            assert sorted(frame["type"] for frame in parsed) == ["accepted", "deliver"]


async def test_transport_only_path_v1_is_served(relay: RunningRelay) -> None:
    other = relay.url.removesuffix("/v1") + "/v2"
    with trio.fail_after(DEADLINE_S), pytest.raises(ConnectionRejected) as rejected:
        async with raw_ws(other, bearer=token("alice")) as ws:
            await ws.get_message()
    assert rejected.value.status_code in (400, 404)


async def test_transport_binary_frame_answers_bad_frame_and_keeps_connection(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            await ws.send_message(b'{"type": "send", "to": "bob", "body": "x"}')
            error = await answer(ws)
            assert error["type"] == "error"
            assert error["code"] == "bad_frame"
            accepted = await request(ws, {"type": "send", "ref": "r2", "to": "bob", "body": "x"})
            assert accepted["type"] == "accepted"


async def test_transport_subprotocol_relay_v1_selected_when_offered(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(
            relay.url, bearer=token("alice"), subprotocols=["chat", SUBPROTOCOL]
        ) as ws:
            assert ws.subprotocol == SUBPROTOCOL
            assert (await recv(ws))["type"] == "welcome"


async def test_transport_no_subprotocol_when_none_offered(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_ws(relay.url, bearer=token("alice")) as ws:
            assert ws.subprotocol is None
            assert (await recv(ws))["type"] == "welcome"


async def test_transport_keepalive_closes_connection_that_answers_no_ping(
    make_relay: RelayFactory,
) -> None:
    """A client whose reader is blocked answers no ping: the relay closes it after idle_timeout.

    The client's trio-websocket reader stops (and answers no ping) while an
    unread message waits in its zero-size queue; the sleep is the idle time
    itself, the point of this test.
    """
    relay = await make_relay(ping_interval_s=0.2, idle_timeout_s=0.3)
    with trio.fail_after(DEADLINE_S):
        async with (
            open_relay(relay.url, token("alice")) as alice,
            raw_ws(relay.url, bearer=token("bob"), message_queue_size=0) as bob,
        ):
            assert (await recv(bob))["type"] == "welcome"
            await alice.send("bob", "blocks the reader")
            await trio.sleep(1.0)  # > ping_interval + idle_timeout, < CLOSE_TIMEOUT_S after
            assert (await recv(bob))["type"] == "deliver"
            assert await close_code(bob) == CloseCode.NORMAL


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_transport_tls_by_the_relay_when_given_certificate_and_key(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    relay = await make_relay(tls_cert=str(cert), tls_key=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    url = f"wss://127.0.0.1:{relay.port}/v1"
    with trio.fail_after(DEADLINE_S):
        async with open_websocket_url(
            url,
            ssl_context=context,
            extra_headers=[(b"Authorization", f"Bearer {token('alice')}".encode())],
        ) as ws:
            assert (await recv(ws))["type"] == "welcome"
            frame = await request(ws, {"type": "send", "ref": "s", "to": "bob", "body": "x"})
            assert frame["type"] == "accepted"


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
    relay = await make_relay(retention_s=4321, max_body_bytes=2048, max_inflight=7)
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
        "max_inflight",
        "server_time",
        "expired",
    }
    assert welcome["type"] == "welcome"
    assert welcome["mailbox"] == "bob@example.org/phone-1"
    assert isinstance(welcome["session"], str) and welcome["session"]
    assert welcome["retention_s"] == 4321
    assert welcome["max_body_bytes"] == 2048
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


# -- send -------------------------------------------------------------------------


async def test_send_accepted_has_ref_ids_per_recipient_and_expires_at(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            before = wall_ms()
            accepted = await request(
                ws, {"type": "send", "ref": "c-17", "to": ["bob", "carol"], "body": "hi", "ttl": 60}
            )
            after = wall_ms()
    assert set(accepted) == {"type", "ref", "ids", "expires_at"}
    assert accepted["type"] == "accepted"
    assert accepted["ref"] == "c-17"
    assert set(accepted["ids"]) == {"bob", "carol"}
    assert all(isinstance(i, str) and i for i in accepted["ids"].values())
    assert accepted["ids"]["bob"] != accepted["ids"]["carol"]
    assert before + 60_000 <= accepted["expires_at"] <= after + 60_000


async def test_send_to_list_each_recipient_gets_its_own_copy(relay: RunningRelay) -> None:
    recipients = ["bob", "carol", "dave"]
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            accepted = await alice.send(recipients, "to all three")
        for mailbox in recipients:
            async with open_relay(relay.url, token(mailbox)) as client:
                message = await client.receive()
                assert message.body == "to all three"
                assert message.sender == "alice"
                assert message.id == accepted["ids"][mailbox]
                assert await client.ack([message.id]) == 1


async def test_send_ttl_defaults_to_retention(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay(retention_s=900)
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            before = wall_ms()
            accepted = await alice.send("bob", "no ttl given")
            after = wall_ms()
    assert before + 900_000 <= accepted["expires_at"] <= after + 900_000
    pttl = redis_client.pttl(f"{prefix}{{bob}}:msg:{accepted['ids']['bob']}")
    assert 890_000 < pttl <= 900_000


async def test_send_ttl_over_retention_is_ttl_too_long_naming_both_numbers(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(retention_s=3600)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(
                ws, {"type": "send", "ref": "t1", "to": "bob", "body": "x", "ttl": 3601}
            )
            assert error["type"] == "error"
            assert error["code"] == "ttl_too_long"
            assert error["ref"] == "t1"
            assert "3601" in error["message"] and "3600" in error["message"]
            ok = await request(
                ws, {"type": "send", "ref": "t2", "to": "bob", "body": "x", "ttl": 3600}
            )
            assert ok["type"] == "accepted"


@pytest.mark.parametrize("ttl", [0, -5, "60", 1.5, True, [60]])
async def test_send_ttl_below_1_or_not_an_integer_is_bad_frame(
    relay: RunningRelay, ttl: object
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(
                ws, {"type": "send", "ref": "t0", "to": "bob", "body": "x", "ttl": ttl}
            )
    assert (error["type"], error["code"], error["ref"]) == ("error", "bad_frame", "t0")


async def test_send_body_over_max_body_bytes_is_too_large_not_a_close(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(max_body_bytes=1024)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for body in ("x" * 1025, "é" * 513, '"' * 1025):  # bytes of UTF-8, not characters
                error = await request(ws, {"type": "send", "ref": "big", "to": "bob", "body": body})
                assert (error["type"], error["code"], error["ref"]) == ("error", "too_large", "big")
            for body in ("x" * 1024, "é" * 512, '"' * 1024):
                ok = await request(ws, {"type": "send", "ref": None, "to": "bob", "body": body})
                assert ok["type"] == "accepted"


async def test_send_frame_over_frame_limit_closes_1009(make_relay: RelayFactory) -> None:
    relay = await make_relay(max_body_bytes=1024)
    limit = relay.services.config.frame_limit_bytes
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            await send_json(ws, {"type": "send", "to": "bob", "body": "x" * (limit + 1)})
            assert await close_code(ws) == CloseCode.TOO_BIG


@pytest.mark.parametrize(
    "to",
    [
        "bad id with spaces",
        "x" * 129,
        "",
        "bob}",
        "émile",
        ["bob", "not ok!"],
        [],
        ["r0", "r1", "r2", "r3"],  # max_recipients is 3 here
        ["bob", "carol", "bob"],
    ],
    ids=["space", "too-long", "empty", "brace", "non-ascii", "one-bad", "none", "too-many", "dup"],
)
async def test_send_bad_recipient(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str, to: object
) -> None:
    relay = await make_relay(max_recipients=3)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(ws, {"type": "send", "ref": "br", "to": to, "body": "x"})
            assert (error["type"], error["code"], error["ref"]) == ("error", "bad_recipient", "br")
            ok = await request(
                ws, {"type": "send", "ref": "ok", "to": ["r0", "r1", "r2"], "body": "x"}
            )
            assert ok["type"] == "accepted"
    assert not any("{bob}" in key for key in keys_under(redis_client, prefix))  # nothing stored


async def test_send_same_ref_is_idempotent_one_copy_same_answer(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    frame = {"type": "send", "ref": "once", "to": ["bob", "carol"], "body": "only once", "ttl": 60}
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            first = await request(ws, frame)
            second = await request(ws, frame)
            third = await request(ws, {**frame, "body": "changed body, same ref"})
            await request(ws, {"type": "send", "ref": "end", "to": ["bob", "carol"], "body": "end"})
        assert first["type"] == "accepted"
        assert second == first
        assert third == first
        async with open_relay(relay.url, token("bob")) as bob:
            got = await receive_until(bob, "end")
    assert [m.body for m in got] == ["only once", "end"]
    assert got[0].id == first["ids"]["bob"]
    assert len([k for k in keys_under(redis_client, prefix) if "{carol}:msg:" in k]) == 2


async def test_send_same_ref_after_the_copy_was_acked_stores_nothing_new(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            first = await alice.send("bob", "once", ref="retry")
            async with open_relay(relay.url, token("bob")) as bob:
                message = await bob.receive()
                assert await bob.ack([message.id]) == 1
                assert await alice.send("bob", "once", ref="retry") == first  # a late retry
                await alice.send("bob", "end")
                assert [m.body for m in await receive_until(bob, "end")] == ["end"]


async def test_send_ref_is_idempotent_only_within_the_first_copys_ttl(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            first = await alice.send("bob", "short", ref="brief", ttl_s=1)
            key = f"{prefix}{{bob}}:msg:{first['ids']['bob']}"
            await poll_until(lambda: not redis_client.exists(key))  # Redis runs the ttl out
            second = await alice.send("bob", "short", ref="brief", ttl_s=1)
    assert second["ids"]["bob"] != first["ids"]["bob"]
    assert second["expires_at"] > first["expires_at"]


async def test_send_same_ref_from_another_sender_is_another_message(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (alice, _):
            from_alice = await request(
                alice, {"type": "send", "ref": "r", "to": "bob", "body": "a"}
            )
        async with raw_session(relay.url, "carol") as (carol, _):
            from_carol = await request(
                carol, {"type": "send", "ref": "r", "to": "bob", "body": "c"}
            )
        assert from_alice["ids"]["bob"] != from_carol["ids"]["bob"]
        async with open_relay(relay.url, token("bob")) as bob:
            got = await receive_until(bob, "c")
    assert [(m.sender, m.body) for m in got] == [("alice", "a"), ("carol", "c")]


async def test_send_mailbox_full(make_relay: RelayFactory) -> None:
    relay = await make_relay(max_mailbox_messages=2)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for n in range(2):
                ok = await request(ws, {"type": "send", "ref": f"m{n}", "to": "bob", "body": "x"})
                assert ok["type"] == "accepted"
            error = await request(ws, {"type": "send", "ref": "m2", "to": "bob", "body": "x"})
            assert (error["type"], error["code"], error["ref"]) == ("error", "mailbox_full", "m2")
            ok = await request(ws, {"type": "send", "ref": "m3", "to": "carol", "body": "x"})
            assert ok["type"] == "accepted"


async def test_send_mailbox_full_by_bytes(make_relay: RelayFactory) -> None:
    relay = await make_relay(max_mailbox_bytes=1500)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            ok = await request(ws, {"type": "send", "ref": "b0", "to": "bob", "body": "x" * 600})
            assert ok["type"] == "accepted"
            error = await request(
                ws, {"type": "send", "ref": "b1", "to": "bob", "body": "x" * 1000}
            )
            assert (error["type"], error["code"], error["ref"]) == ("error", "mailbox_full", "b1")
            ok = await request(ws, {"type": "send", "ref": "b2", "to": "bob", "body": "x" * 100})
            assert ok["type"] == "accepted"


async def test_send_all_or_nothing_when_one_recipient_mailbox_is_full(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay(max_mailbox_messages=2)
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            await alice.send("carol", "c1")
            await alice.send("carol", "c2")
            for recipients in (["bob", "carol"], ["carol", "bob"]):
                with pytest.raises(RelayClientError) as refused:
                    await alice.send(recipients, "all or nothing", ref="multi")
                assert refused.value.code == "mailbox_full"
            assert not any("{bob}" in key for key in keys_under(redis_client, prefix))
            await alice.send("bob", "marker")
            async with open_relay(relay.url, token("bob")) as bob:
                got = await bob.receive()
                assert got.body == "marker"  # not "all or nothing"
                await bob.ack([got.id])
            # make room at carol's: the retry with the same ref stores one copy each
            async with open_relay(relay.url, token("carol")) as carol:
                first, second = await carol.receive(), await carol.receive()
                assert await carol.ack([first.id, second.id]) == 2
            accepted = await alice.send(["bob", "carol"], "all or nothing", ref="multi")
            again = await alice.send(["bob", "carol"], "all or nothing", ref="multi")
            assert again == accepted
            await alice.send(["bob", "carol"], "end")
        for mailbox in ("bob", "carol"):
            async with open_relay(relay.url, token(mailbox)) as client:
                got_all = await receive_until(client, "end")
                assert [m.body for m in got_all] == ["all or nothing", "end"]


async def test_unknown_type(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for kind in ("subscribe", "deliver", "welcome", "accepted", "SEND", ""):
                error = await request(ws, {"type": kind, "ref": "u"})
                assert (error["type"], error["code"], error["ref"]) == (
                    "error",
                    "unknown_type",
                    "u",
                )


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"type": "send", "to": "bob", "body": "x"',  # truncated
        "[]",
        '"send"',
        "42",
        "null",
        '{"to": "bob", "body": "x"}',  # no type
        '{"type": 7, "to": "bob", "body": "x"}',
        '{"type": "send", "body": "x"}',  # no to
        '{"type": "send", "to": "bob"}',  # no body
        '{"type": "send", "to": 7, "body": "x"}',
        '{"type": "send", "to": ["bob", 7], "body": "x"}',
        '{"type": "send", "to": "bob", "body": 7}',
        '{"type": "send", "to": "bob", "body": "x", "ref": 7}',
        '{"type": "send", "to": "bob", "body": "x", "ref": ""}',
        '{"type": "send", "to": "bob", "body": "x", "ref": "' + "r" * 65 + '"}',
        '{"type": "ack"}',
        '{"type": "ack", "ids": []}',
        '{"type": "ack", "ids": "abc"}',
        '{"type": "ack", "ids": [7]}',
        '{"type": "auth"}',
    ],
)
async def test_bad_frame_not_json_not_object_missing_or_wrong_typed_field(
    relay: RunningRelay, text: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            await ws.send_message(text)
            error = await answer(ws)
            assert error["type"] == "error"
            assert error["code"] == "bad_frame"
            assert isinstance(error["message"], str) and error["message"]
            ok = await request(ws, {"type": "send", "ref": "next", "to": "bob", "body": "x"})
            assert ok["type"] == "accepted"


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


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"type": "send", "to": "bad id", "body": "x"}, "bad_recipient"),
    ({"type": "send", "to": "bob", "body": "x", "ttl": 10**9}, "ttl_too_long"),
    ({"type": "send", "to": "bob", "body": "x", "ttl": 0}, "bad_frame"),
    ({"type": "send", "to": "bob", "body": 5}, "bad_frame"),
    ({"type": "send", "body": "x"}, "bad_frame"),
    ({"type": "send", "to": "bob", "body": "x" * 70_000}, "too_large"),
    ({"type": "ack", "ids": "x"}, "bad_frame"),
    ({"type": "ack", "ids": ["not an id!"]}, "bad_frame"),
    ({"type": "nope"}, "unknown_type"),
]


async def test_every_error_frame_carries_the_request_ref_and_never_closes(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for n, (frame, code) in enumerate(BAD_REQUESTS):
                error = await request(ws, {**frame, "ref": f"e{n}"})
                assert error == {
                    "type": "error",
                    "ref": f"e{n}",
                    "code": code,
                    "message": error["message"],
                }, frame
                assert isinstance(error["message"], str) and error["message"]
                ok = await request(ws, {"type": "send", "ref": f"ok{n}", "to": "bob", "body": "x"})
                assert ok["type"] == "accepted"  # the error did not close the connection


@pytest.fixture
def private_redis(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the same kind as the shared one, on a TCP port, free to stop."""
    server = EmbeddedServer(binary=redis_server.binary, port=free_loopback_port())
    server.start()
    yield server
    server.stop()


async def _send_until_accepted(ws: Any, ref: str) -> dict[str, Any]:
    """Redis is back: poll with sends until one is accepted (the pump reconnects)."""
    while True:
        frame = await request(ws, {"type": "send", "ref": ref, "to": "bob", "body": "x"})
        if frame["type"] == "accepted":
            return frame
        assert frame["code"] == "storage_unavailable"
        await trio.sleep(0.1)


async def test_send_storage_unavailable_when_redis_is_down_connection_stays(
    make_relay: RelayFactory, private_redis: EmbeddedServer
) -> None:
    relay = await make_relay(redis_url=private_redis.url)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            assert (await request(ws, {"type": "send", "ref": "up", "to": "bob", "body": "x"}))[
                "type"
            ] == "accepted"
            private_redis.stop()
            for n in range(2):
                error = await request(
                    ws, {"type": "send", "ref": f"down{n}", "to": "bob", "body": "x"}
                )
                assert (error["type"], error["code"], error["ref"]) == (
                    "error",
                    "storage_unavailable",
                    f"down{n}",
                )
            restarted = EmbeddedServer(binary=private_redis.binary, port=private_redis.port)
            restarted.start()
            try:
                assert (await _send_until_accepted(ws, "back"))["ref"] == "back"
            finally:
                restarted.stop()


async def test_ack_storage_unavailable_error_carries_the_ref(
    make_relay: RelayFactory, private_redis: EmbeddedServer
) -> None:
    relay = await make_relay(redis_url=private_redis.url)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            private_redis.stop()
            error = await request(ws, {"type": "ack", "ids": ["abc"], "ref": "a-down"})
            assert (error["type"], error["code"]) == ("error", "storage_unavailable")
            assert error.get("ref") == "a-down"


def _poison_ref_record(redis_client: RedisClient, prefix: str) -> None:
    """An idempotency record the relay cannot parse: the only way found to reach `internal`.

    Nothing a client sends makes the relay fail internally, so this test corrupts
    Redis behind its back (the record layout is relay/store_redis.py's Keys.ref).
    """
    redis_client.set(f"{prefix}{{bob}}:ref:5:alice:poisoned", "garbage", px=60_000)


async def test_error_internal_is_answered_and_keeps_the_connection(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    _poison_ref_record(redis_client, prefix)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(ws, {"type": "send", "ref": "poisoned", "to": "bob", "body": "x"})
            assert (error["type"], error["code"]) == ("error", "internal")
            assert "garbage" not in error["message"]
            ok = await request(ws, {"type": "send", "ref": "fine", "to": "bob", "body": "x"})
            assert ok["type"] == "accepted"


async def test_error_internal_carries_the_request_ref(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    _poison_ref_record(redis_client, prefix)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            error = await request(ws, {"type": "send", "ref": "poisoned", "to": "bob", "body": "x"})
    assert (error["type"], error["code"]) == ("error", "internal")
    assert error.get("ref") == "poisoned"


# -- ack --------------------------------------------------------------------------


async def test_ack_answers_acked_with_the_count_of_deleted_messages(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            for n in range(3):
                await alice.send("bob", f"m{n}")
        async with raw_session(relay.url, "bob") as (ws, _):
            ids: list[str] = []
            while len(ids) < 3:
                frame = await recv(ws)
                assert frame["type"] == "deliver"
                ids += [m["id"] for m in frame["messages"]]
            acked = await request(ws, {"type": "ack", "ids": ids[:2], "ref": "a-3"})
            assert acked == {"type": "acked", "ref": "a-3", "count": 2}
            acked = await request(ws, {"type": "ack", "ids": ids, "ref": "a-4"})
            assert acked == {"type": "acked", "ref": "a-4", "count": 1}


async def test_ack_is_idempotent_second_ack_and_unknown_ids_count_0(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            await alice.send("bob", "once")
        async with open_relay(relay.url, token("bob")) as bob:
            message = await bob.receive()
            assert await bob.ack([message.id, message.id]) == 1
            assert await bob.ack([message.id]) == 0
            assert await bob.ack(["unknown-id", "18c0ffee000-AAAAAAAA"]) == 0


async def test_ack_without_ref_gets_no_answer_but_deletes(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            accepted = await alice.send("bob", "ack me silently")
        key = f"{prefix}{{bob}}:msg:{accepted['ids']['bob']}"
        assert redis_client.exists(key) == 1
        async with raw_session(relay.url, "bob") as (ws, _):
            deliver = await recv(ws)
            assert deliver["type"] == "deliver"
            await send_json(ws, {"type": "ack", "ids": [accepted["ids"]["bob"]]})
            # frames are handled in order: the answer to this one comes after the first was done
            probe = await request(ws, {"type": "ack", "ids": ["probe"], "ref": "probe"})
            assert probe == {"type": "acked", "ref": "probe", "count": 0}
            assert redis_client.exists(key) == 0


async def test_ack_deletes_only_messages_of_the_sessions_own_mailbox(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token("alice")) as alice:
            accepted = await alice.send("bob", "for bob")
            assert await alice.ack([accepted["ids"]["bob"]]) == 0
        assert redis_client.exists(f"{prefix}{{bob}}:msg:{accepted['ids']['bob']}") == 1
        async with open_relay(relay.url, token("bob")) as bob:
            assert (await bob.receive()).id == accepted["ids"]["bob"]


# -- close codes --------------------------------------------------------------------


async def test_close_1000_normal_when_the_client_closes(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            await ws.aclose(CloseCode.NORMAL)
            assert ws.closed is not None and ws.closed.code == CloseCode.NORMAL
        await poll_until(lambda: not relay.services.sessions)  # ended on the relay's side too
        async with open_relay(relay.url, token("alice")) as alice:  # no 4409 for anyone
            await alice.send("alice", "again")
            assert (await alice.receive()).body == "again"


async def test_close_1001_on_server_shutdown_messages_stay_queued(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str
) -> None:
    relay = await make_relay()
    with trio.fail_after(DEADLINE_S):
        async with (
            raw_session(relay.url, "alice") as (alice, _),
            raw_session(relay.url, "bob") as (bob, _),
        ):
            accepted = await request(
                alice, {"type": "send", "ref": "kept", "to": "carol", "body": "x"}
            )
            relay.shutdown()
            assert await close_code(alice) == CloseCode.GOING_AWAY
            assert await close_code(bob) == CloseCode.GOING_AWAY
    assert redis_client.exists(f"{prefix}{{carol}}:msg:{accepted['ids']['carol']}") == 1
    second = await make_relay()
    with trio.fail_after(DEADLINE_S):
        async with open_relay(second.url, token("carol")) as carol:
            assert (await carol.receive()).id == accepted["ids"]["carol"]


async def test_close_1008_policy_when_a_client_keeps_sending_over_its_rate_limit(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(rate_limit_per_s=0.01, rate_burst=2)
    codes: list[str] = []
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            try:
                for n in range(20):
                    frame = await request(
                        ws, {"type": "send", "ref": f"r{n}", "to": "bob", "body": "x"}
                    )
                    codes.append(frame.get("code", frame["type"]))
            except ConnectionClosed as closed:
                assert closed.reason is not None
                assert closed.reason.code == CloseCode.POLICY
            else:
                raise AssertionError(f"never closed: {codes}")
    assert codes[:2] == ["accepted", "accepted"]
    assert set(codes[2:]) == {"rate_limited"}


async def test_send_over_the_rate_limit_is_rate_limited_with_ref(make_relay: RelayFactory) -> None:
    relay = await make_relay(rate_limit_per_s=0.01, rate_burst=3)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (ws, _):
            for n in range(3):
                ok = await request(ws, {"type": "send", "ref": f"r{n}", "to": "bob", "body": "x"})
                assert ok["type"] == "accepted"
            error = await request(ws, {"type": "send", "ref": "over", "to": "bob", "body": "x"})
            assert (error["type"], error["code"], error["ref"]) == ("error", "rate_limited", "over")
            error = await request(ws, {"type": "ack", "ids": ["x"], "ref": "ack-over"})
            assert (error["type"], error["code"], error["ref"]) == (
                "error",
                "rate_limited",
                "ack-over",
            )


async def test_peer_pinging_while_refused_does_not_take_the_server_down(
    relay: RunningRelay,
) -> None:
    """A client whose token is refused floods pings while the relay closes with 4401:
    the pong the library cannot send any more must end that connection only."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Ping, Request

    with trio.fail_after(DEADLINE_S):
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
            ws = WSConnection(ConnectionType.CLIENT)
            headers = [(b"authorization", b"Bearer not-a-token")]
            await stream.send_all(
                ws.send(Request(host="127.0.0.1", target="/v1", extra_headers=headers))
            )
            ws.receive_data(await stream.receive_some(65536))
            try:
                await stream.send_all(b"".join(ws.send(Ping(b"x")) for _ in range(200)))
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            await stream.aclose()
        async with open_relay(relay.url, token("after-the-pings")) as client:
            assert client.welcome["mailbox"] == "after-the-pings"
