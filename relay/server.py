"""serve_relay: Redis (or the embedded Valkey), the store, the hub and the WebSocket listeners.

Start it with `await nursery.start(serve_relay, config)`; it returns a
`RunningRelay` once it accepts connections. `RunningRelay.shutdown()` stops
accepting, closes every session with 1001 (their messages stay queued), gives
them `drain_timeout` to finish, then stops the pump, the hub and the embedded
Valkey.
"""

from __future__ import annotations

import logging
import ssl

import attrs
import trio
from trio_websocket import WebSocketRequest, WebSocketServer

from relay import protocol
from relay.auth import Verifier
from relay.codes import CloseCode
from relay.config import Config
from relay.connection import handle_request
from relay.embedded import EmbeddedServer
from relay.hub import Hub
from relay.redis_checks import check_settings, read_settings
from relay.redis_pump import RedisPump, connect
from relay.session import CLOSE_TIMEOUT_S, Services
from relay.store_redis import Quota, RedisMailboxStore

log = logging.getLogger(__name__)

RECEIVE_BUFFER_BYTES = 64 * 1024  # trio-websocket's 4 KiB default costs throughput
MESSAGE_QUEUE_SIZE = 4


@attrs.define(eq=False)
class RunningRelay:
    port: int
    redis_url: str
    services: Services
    _stop: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def shutdown(self) -> None:
        self._stop.set()


def make_verifier(config: Config) -> Verifier:
    pems = []
    for path in config.jwt_public_keys:
        with open(path, "rb") as file:
            pems.append(file.read())
    return Verifier.create(
        secret=config.jwt_secret,
        public_key_pems=tuple(pems),
        audience=config.jwt_audience,
        issuer=config.jwt_issuer,
    )


async def serve_relay(
    config: Config, *, task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED
) -> None:
    verifier = make_verifier(config)
    embedded: EmbeddedServer | None = None
    if config.redis_url is None:
        embedded = EmbeddedServer()
        embedded.start()  # from the main thread: it dies with this process
        log.info("started embedded Valkey (pid %d); messages live in memory only", embedded.pid)
    redis_url = config.redis_url or (embedded.url if embedded else "")
    client = connect(redis_url)
    try:
        settings = await trio.to_thread.run_sync(read_settings, client)
        for warning in check_settings(
            settings,
            allow_persistent=config.allow_persistent_redis,
            allow_eviction=config.allow_eviction,
        ):
            log.warning("%s", warning)
        pump = RedisPump(client)
        store = RedisMailboxStore(
            pump,
            prefix=config.key_prefix,
            retention_s=config.retention_s,
            quota=Quota(config.max_mailbox_messages, config.max_mailbox_bytes),
        )
        hub = Hub(client, lambda mailbox: store.keys(mailbox).channel)
        limits = protocol.Limits(
            max_body_bytes=config.max_body_bytes,
            max_recipients=config.max_recipients,
            retention_s=config.retention_s,
        )
        services = Services(config=config, store=store, hub=hub, limits=limits)
        async with trio.open_nursery() as background:
            await background.start(pump.run)
            await background.start(hub.run)
            await _serve_websockets(config, services, verifier, redis_url, task_status)
            background.cancel_scope.cancel()
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
            log.info("stopped embedded Valkey")


async def _serve_websockets(
    config: Config,
    services: Services,
    verifier: Verifier,
    redis_url: str,
    task_status: trio.TaskStatus[RunningRelay],
) -> None:
    if config.tls_cert and config.tls_key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.tls_cert, config.tls_key)
        listeners: (
            list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
        ) = await trio.open_ssl_over_tcp_listeners(config.port, context, host=config.host)
    else:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)

    async def handler(request: WebSocketRequest) -> None:
        await handle_request(request, services, verifier)

    async with trio.open_nursery() as connections:
        server = WebSocketServer(
            handler,
            listeners,
            handler_nursery=connections,
            message_queue_size=MESSAGE_QUEUE_SIZE,
            max_message_size=config.frame_limit_bytes,
            receive_buffer_size=RECEIVE_BUFFER_BYTES,
            connect_timeout=config.auth_timeout_s,
            disconnect_timeout=CLOSE_TIMEOUT_S,
        )
        listening = trio.CancelScope()

        async def listen(*, task_status: trio.TaskStatus[WebSocketServer]) -> None:
            with listening:
                await server.run(task_status=task_status)

        await connections.start(listen)
        running = RunningRelay(server.port, redis_url, services)
        log.info("relay listening on %s:%d", config.host, server.port)
        task_status.started(running)
        await running._stop.wait()

        log.info("shutting down: closing %d sessions with 1001", len(services.sessions))
        listening.cancel()
        services.draining = True
        for session in list(services.sessions):
            session.close(CloseCode.GOING_AWAY)
        connections.cancel_scope.deadline = trio.current_time() + config.drain_timeout_s
