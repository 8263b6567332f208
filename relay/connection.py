"""From a WebSocket upgrade request to an authenticated session.

Serves only `/v1` (404 otherwise), refuses a foreign `Origin` with HTTP 403
before the upgrade (a handshake without one is not from a browser, and is
accepted), enforces the connection caps (503, 429 per client address),
selects the `relay.v1` subprotocol when offered, and authenticates by the
`Authorization: Bearer` header or by an `auth` frame sent first within
`auth_timeout`. Every authentication failure closes with 4401 and the same
reason; nothing else is processed before authentication succeeds.
"""

from __future__ import annotations

import logging
import time

import trio

from relay import protocol
from relay.auth import Identity, Verifier
from relay.codes import CLOSE_REASONS, CloseCode
from relay.errors import AuthError, ClientError
from relay.limits import client_address
from relay.metrics import close_code_label
from relay.session import CLOSE_TIMEOUT_S, Services, Session
from relay.websocket import Upgrade, WebSocket

log = logging.getLogger(__name__)

SUBPROTOCOL = "relay.v1"
PATH = "/v1"


class Refused(Exception):
    """Authentication failed; carries the close code to send."""

    def __init__(self, code: CloseCode) -> None:
        self.code = code


class PeerLeft(Exception):
    """The peer closed or broke the connection before authenticating."""


async def handle_request(
    upgrade: Upgrade, stream: trio.abc.Stream, peer: str, services: Services, verifier: Verifier
) -> None:
    """Serve one upgrade request to its end; the caller closes the stream afterwards.
    A fault is logged here: one client must not hurt the others."""
    address = await _admit(upgrade, stream, peer, services)
    if address is None:
        return
    # Counted from before the upgrade, so handshakes arriving together cannot pass a cap together.
    services.connections[address] += 1
    metrics = services.metrics
    metrics.connections_opened.inc()
    config = services.config
    code: int = CloseCode.NORMAL
    try:
        offered = SUBPROTOCOL in upgrade.subprotocols
        await stream.send_all(upgrade.accept(SUBPROTOCOL if offered else None))
        received, upgrade.received = upgrade.received, b""
        ws = WebSocket(
            stream,
            max_message_bytes=config.frame_limit_bytes,
            send_timeout_s=config.send_timeout_s,
            received=received,
        )
        del received
        try:
            identity = await _authenticate(ws, upgrade, services, verifier)
        except Refused as refused:
            code = refused.code
            await ws.aclose(code, CLOSE_REASONS[refused.code], CLOSE_TIMEOUT_S)
            return
        except PeerLeft:
            code = ws.protocol.code or CloseCode.NORMAL
            await ws.aclose(code, "", CLOSE_TIMEOUT_S)
            return
        code = await Session(ws, identity.mailbox, identity.expires_at_s, services).run()
    except trio.BrokenResourceError:
        code = 1006  # the peer hung up during the upgrade
    except Exception:
        log.exception("connection handler failed")
        code = 1011
    finally:
        services.connections[address] -= 1
        if services.connections[address] <= 0:
            del services.connections[address]
        metrics.connections_closed.labels(close_code_label(code)).inc()


async def _admit(
    upgrade: Upgrade, stream: trio.abc.Stream, peer: str, services: Services
) -> str | None:
    """The client's address when the handshake may proceed; None after refusing it over HTTP."""
    config = services.config
    refusal: tuple[int, bytes] | None = None
    address = peer
    origin = upgrade.header(b"origin")
    if upgrade.path.partition("?")[0] != PATH:
        refusal = 404, b"the relay serves WebSockets at /v1\n"
    # No Origin: not a browser, so no cross-site risk; browsers always send one.
    elif config.allowed_origins and origin is not None and origin not in config.allowed_origins:
        refusal = 403, b"origin not allowed\n"
    elif services.connections.total() >= config.max_connections:
        refusal = 503, b"too many connections\n"
    else:
        forwarded = upgrade.header(b"x-forwarded-for")
        address = client_address(peer, forwarded, services.trusted_proxies)
        if services.connections[address] >= config.max_connections_per_ip:
            refusal = 429, b"too many connections from this address\n"
    if refusal is None:
        return address
    status, body = refusal
    services.metrics.handshakes_refused.labels(str(status)).inc()
    await stream.send_all(upgrade.refuse(status, body))
    return None


async def _authenticate(
    ws: WebSocket, upgrade: Upgrade, services: Services, verifier: Verifier
) -> Identity:
    header = upgrade.header(b"authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise Refused(CloseCode.UNAUTHORIZED)
        return _verify(verifier, token.strip())
    with trio.move_on_after(services.config.auth_timeout_s):
        messages = await ws.receive()
        while not messages:
            if ws.protocol.ended:
                raise PeerLeft
            messages = await ws.receive()
        first, rest = messages[0], messages[1:]
        ws.unread(rest)  # sent after the auth frame: the session's, once it starts
        if not isinstance(first, str):
            raise Refused(CloseCode.UNAUTHORIZED)
        try:
            frame = protocol.parse_frame(first, services.limits)
        except ClientError:
            raise Refused(CloseCode.UNAUTHORIZED) from None
        if not isinstance(frame, protocol.AuthFrame):
            raise Refused(CloseCode.UNAUTHORIZED)
        return _verify(verifier, frame.token)
    raise Refused(CloseCode.AUTH_TIMEOUT)


def _verify(verifier: Verifier, token: str) -> Identity:
    try:
        return verifier.verify(token, time.time())
    except AuthError as exc:
        log.warning("authentication refused: %s", getattr(exc, "reason", "invalid token"))
        raise Refused(CloseCode.UNAUTHORIZED) from None
