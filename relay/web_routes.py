"""Plain HTTP on the WebSocket port: `/relay.js`, `/relay.d.ts`, `/demo` (with `--demo`).

Pure functions from a request head to the complete response. The server reads
the head of every request (relay.websocket.read_opening); one that asks for a
WebSocket goes to the engine, any other is answered here (files, 404, 426 on
`/v1`), and the connection closes after the response. The upgrade path stays
`/v1` (connection.py).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import attrs
import h11

from relay.websocket import MAX_HEAD_BYTES


@attrs.frozen
class WebFile:
    body: bytes
    content_type: str
    etag: str


_FILES = {
    "/relay.js": ("relay.js", "text/javascript; charset=utf-8"),
    "/relay.d.ts": ("relay.d.ts", "application/typescript; charset=utf-8"),
    "/demo": ("demo.html", "text/html; charset=utf-8"),
}
DEMO_PATHS = frozenset({"/demo"})
DEMO_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self' ws: wss:; img-src 'self'; base-uri 'none'; form-action 'none'"
)


@functools.cache
def web_file(path: str) -> WebFile | None:
    """The file served at `path` (read once from the package), or None."""
    entry = _FILES.get(path)
    if entry is None:
        return None
    name, content_type = entry
    body = resources.files("relay").joinpath("web", name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    return WebFile(body, content_type, etag)


def is_upgrade(head: bytes) -> bool:
    """Whether the request asks for a WebSocket (then the engine handles it, also its
    errors); a request h11 cannot parse is not one."""
    request = _parse(head)
    if request is None:
        return False
    for name, value in request.headers:
        if name == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


def _parse(head: bytes) -> h11.Request | None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        connection.receive_data(head)
        event = connection.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


def respond(head: bytes, *, demo: bool) -> bytes:
    """The complete HTTP/1.1 response to a plain (non-upgrade) request; the connection
    closes after it."""
    request = _parse(head)
    if request is None:
        return _response(400, b"bad request\n")
    path = request.target.decode("latin-1").partition("?")[0]
    method = request.method
    file = None if path in DEMO_PATHS and not demo else web_file(path)
    if file is None:
        if path == "/v1":
            return _response(
                426, b"the relay serves WebSockets at /v1\n", [(b"Upgrade", b"websocket")]
            )
        return _response(404, b"not found; the relay serves WebSockets at /v1\n")
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"method not allowed\n", [(b"Allow", b"GET, HEAD")])
    headers = [
        (b"ETag", file.etag.encode()),
        (b"Cache-Control", b"no-cache"),
        (b"X-Content-Type-Options", b"nosniff"),
    ]
    if path not in DEMO_PATHS:  # the module may be imported by an app's page on another origin
        headers.append((b"Access-Control-Allow-Origin", b"*"))
    else:
        headers += [
            (b"Content-Security-Policy", DEMO_CSP.encode()),
            (b"Referrer-Policy", b"no-referrer"),
        ]
    if _etag_matches(request, file.etag):
        return _response(304, b"", headers, head_only=True)
    headers.append((b"Content-Type", file.content_type.encode()))
    return _response(200, file.body, headers, head_only=method == b"HEAD")


def head_too_large() -> bytes:
    return _response(431, b"request head too large\n")


def _etag_matches(request: h11.Request, etag: str) -> bool:
    for name, value in request.headers:
        if name == b"if-none-match":
            tags = [t.strip().removeprefix("W/") for t in value.decode("latin-1").split(",")]
            return etag in tags or "*" in tags
    return False


def _response(
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    head_only: bool = False,
) -> bytes:
    connection = h11.Connection(h11.SERVER)
    # h11 answers only a request it has seen; give it a minimal one.
    connection.receive_data(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
    connection.next_event()
    all_headers = [*(headers or [])]
    if status != 304:
        all_headers.append((b"Content-Length", str(len(body)).encode()))
        if not any(name == b"Content-Type" for name, _ in all_headers):
            all_headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
    all_headers.append((b"Connection", b"close"))
    out = connection.send(h11.Response(status_code=status, headers=all_headers)) or b""
    if body and not head_only:
        out += connection.send(h11.Data(data=body)) or b""
    return out
