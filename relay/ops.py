"""The ops port: /healthz, /readyz, /metrics and /.well-known/relay-policy, with h11 on Trio.

One request per connection (`Connection: close`); anything else than GET or
HEAD of these paths is answered 404 or 405.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 16 * 1024


@attrs.frozen
class OpsEndpoints:
    metrics: Metrics
    readiness: Callable[[], Awaitable[list[str]]]  # what is not ready; empty when ready
    policy: Callable[[], bytes]  # the policy document (relay.policy_document), as JSON
    health: Callable[[], list[str]] = lambda: []  # what is broken beyond waiting; empty: alive


async def serve_ops(
    endpoints: OpsEndpoints,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_serve_one, endpoints), listeners)


async def _serve_one(endpoints: OpsEndpoints, stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            request = await _read_request(connection, stream)
            if request is None:
                return
            status, content_type, body = await _route(endpoints, request)
            if request.method == b"HEAD":
                body = b""
            headers = [
                ("content-type", content_type),
                ("content-length", str(len(body))),
                ("cache-control", "no-store"),
                ("connection", "close"),
            ]
            await stream.send_all(
                connection.send(h11.Response(status_code=status, headers=headers))
            )
            await stream.send_all(connection.send(h11.Data(data=body)))
            await stream.send_all(connection.send(h11.EndOfMessage()))
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("ops request failed")
    finally:
        await stream.aclose()


async def _read_request(
    connection: h11.Connection, stream: trio.SocketStream
) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
            continue
        if isinstance(event, h11.Request):
            return event
        return None


async def _route(endpoints: OpsEndpoints, request: h11.Request) -> tuple[int, str, bytes]:
    if request.method not in (b"GET", b"HEAD"):
        return 405, "text/plain", b"method not allowed\n"
    path = request.target.split(b"?", 1)[0]
    if path == b"/healthz":
        if broken := endpoints.health():
            return 503, "text/plain", ("unhealthy: " + "; ".join(broken) + "\n").encode()
        return 200, "text/plain", b"ok\n"
    if path == b"/readyz":
        problems = await endpoints.readiness()
        if problems:
            return 503, "text/plain", ("not ready: " + "; ".join(problems) + "\n").encode()
        return 200, "text/plain", b"ready\n"
    if path == b"/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest(endpoints.metrics.registry)
    if path == b"/.well-known/relay-policy":
        return 200, "application/json", endpoints.policy()
    return 404, "text/plain", b"not found\n"
