"""End to end, protocol.md's transport: path /v1, text frames of JSON objects, the relay.v1
subprotocol, keepalive pings, TLS, and a peer that floods pings while being refused.

Every test talks to a real relay (`serve_relay` on port 0) over real
WebSockets, on the test's Redis and key prefix. Tests that must see raw frames
or close codes use a plain trio-websocket connection; the others use
`relay.client`.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import orjson
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from relay_fixtures import (
    DEADLINE_S,
    SUBPROTOCOL,
    RelayFactory,
    answer,
    close_code,
    raw_session,
    raw_ws,
    recv,
    request,
    send_json,
    token,
)
from trio_websocket import ConnectionRejected, open_websocket_url

from relay.client import open_relay
from relay.codes import CloseCode
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
    assert rejected.value.status_code == 404


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
