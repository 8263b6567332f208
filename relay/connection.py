"""From a WebSocket handshake to an authenticated session.

Refuses a foreign `Origin` with HTTP 403 before the upgrade (a handshake without
one is not from a browser, and is accepted), selects the
`relay.v1` subprotocol when offered, and authenticates by the `Authorization:
Bearer` header or by an `auth` frame sent first within `auth_timeout`. Every
authentication failure closes with 4401 and the same reason; nothing else is
processed before authentication succeeds.
"""

from __future__ import annotations

import logging
import time

import trio
from trio_websocket import ConnectionClosed, Endpoint, WebSocketConnection, WebSocketRequest

from relay import protocol
from relay.auth import Identity, Verifier
from relay.codes import CLOSE_REASONS, CloseCode
from relay.errors import AuthError, ClientError
from relay.limits import client_address
from relay.metrics import close_code_label
from relay.session import CLOSE_TIMEOUT_S, Services, Session

log = logging.getLogger(__name__)

SUBPROTOCOL = "relay.v1"
PATH = "/v1"


class Refused(Exception):
    """Authentication failed; carries the close code to send."""

    def __init__(self, code: CloseCode) -> None:
        self.code = code


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def handle_request(request: WebSocketRequest, services: Services, verifier: Verifier) -> None:
    """Serve one connection to its end. Never raises: one client must not hurt the others."""
    try:
        address = await _admit(request, services)
    except ConnectionClosed:
        return
    except Exception:
        log.exception("handshake failed")
        return
    if address is None:
        return
    # Counted from before the upgrade, so handshakes arriving together cannot pass a cap together.
    services.connections[address] += 1
    metrics = services.metrics
    metrics.connections_opened.inc()
    code: int = CloseCode.NORMAL
    try:
        offered = SUBPROTOCOL in request.proposed_subprotocols
        ws = await request.accept(subprotocol=SUBPROTOCOL if offered else None)
        try:
            identity = await _authenticate(ws, request, services, verifier)
        except Refused as refused:
            code = refused.code
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await ws.aclose(refused.code, CLOSE_REASONS[refused.code])
            return
        code = await Session(ws, identity.mailbox, identity.expires_at_s, services).run()
    except ConnectionClosed as closed:
        code = closed.reason.code if closed.reason else CloseCode.NORMAL
    except Exception:
        log.exception("connection handler failed")
        code = 1011
    finally:
        services.connections[address] -= 1
        if services.connections[address] <= 0:
            del services.connections[address]
        metrics.connections_closed.labels(close_code_label(code)).inc()


async def _admit(request: WebSocketRequest, services: Services) -> str | None:
    """The client's address when the handshake may proceed; None after refusing it over HTTP."""
    config = services.config
    if request.path.partition("?")[0] != PATH:
        await _refuse(request, services, 404, b"the relay serves WebSockets at /v1\n")
        return None
    origin = _header(request, b"origin")
    # No Origin: not a browser, so no cross-site risk; browsers always send one.
    if config.allowed_origins and origin is not None and origin not in config.allowed_origins:
        await _refuse(request, services, 403, b"origin not allowed\n")
        return None
    if services.connections.total() >= config.max_connections:
        await _refuse(request, services, 503, b"too many connections\n")
        return None
    peer = request.remote.address if isinstance(request.remote, Endpoint) else request.remote
    forwarded = _header(request, b"x-forwarded-for")
    address = client_address(str(peer), forwarded, services.trusted_proxies)
    if services.connections[address] >= config.max_connections_per_ip:
        await _refuse(request, services, 429, b"too many connections from this address\n")
        return None
    return address


async def _refuse(request: WebSocketRequest, services: Services, status: int, body: bytes) -> None:
    services.metrics.handshakes_refused.labels(str(status)).inc()
    await request.reject(status, body=body)


async def _authenticate(
    ws: WebSocketConnection, request: WebSocketRequest, services: Services, verifier: Verifier
) -> Identity:
    header = _header(request, b"authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise Refused(CloseCode.UNAUTHORIZED)
        return _verify(verifier, token.strip())
    with trio.move_on_after(services.config.auth_timeout_s):
        message = await ws.get_message()
        if not isinstance(message, str):
            raise Refused(CloseCode.UNAUTHORIZED)
        try:
            frame = protocol.parse_frame(message, services.limits)
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
