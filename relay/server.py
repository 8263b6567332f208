"""serve_relay: Redis (or the embedded Valkey), the store, the hub and the WebSocket listeners.

Start it with `await nursery.start(serve_relay, config)`; it returns a
`RunningRelay` once it accepts connections. `RunningRelay.shutdown()` stops
accepting, closes every session with 1001 (their messages stay queued), gives
them `drain_timeout` to finish, then stops the pump, the hub and the embedded
Valkey.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable
from functools import partial

import attrs
import redis
import trio

from relay import protocol
from relay.auth import Verifier
from relay.codes import CloseCode
from relay.config import Config
from relay.connection import handle_request
from relay.embedded import EmbeddedServer
from relay.errors import RelayError
from relay.hub import Hub
from relay.limits import parse_networks
from relay.metrics import Metrics
from relay.ops import OpsEndpoints, serve_ops
from relay.policy_document import PolicyDocument
from relay.redis.admin import connect
from relay.redis.checks import (
    NodeSettings,
    check_nodes,
    least_safe,
    read_node_settings,
    redis_allowances,
)
from relay.redis.pump import Command, RedisPump
from relay.session import CLOSE_TIMEOUT_S, Services
from relay.store_redis import Quota, RedisMailboxStore
from relay.web_routes import WebFile, head_too_large, is_upgrade, respond
from relay.websocket import BadUpgrade, HeadTooLarge, Upgrade, read_opening

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
READINESS_TIMEOUT_S = 1.0
SAMPLE_INTERVAL_S = 30.0


@attrs.define(eq=False)
class RunningRelay:
    port: int
    ops_port: int  # 0 when disabled
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
        log.info(
            "started embedded Valkey (pid %d); messages live in memory only, and stopping "
            "the relay discards them; its URL (for relay audit --redis-url): %s",
            embedded.pid,
            embedded.url,
        )
    redis_url = config.redis_url or (embedded.url if embedded else "")
    try:
        nodes = await trio.to_thread.run_sync(_read_settings, redis_url)
        for warning in check_nodes(nodes, redis_allowances(config)):
            log.warning("%s", warning)
        settings = least_safe(nodes)
        metrics = Metrics(config.worker_id or 0)
        pump = RedisPump(
            redis_url,
            timeout_s=config.redis_timeout_s,
            on_batch=metrics.observe_batch,
            on_redirection=lambda reply: metrics.redis_redirections.labels(reply).inc(),
        )
        store = RedisMailboxStore(
            pump,
            prefix=config.key_prefix,
            retention_s=config.retention_s,
            dedupe_window_s=config.dedupe_window_s,
            quota=Quota(config.max_mailbox_messages, config.max_mailbox_bytes),
        )
        hub = Hub(
            pump.topology,
            lambda mailbox: store.keys(mailbox).channel,
            on_reconnect=metrics.hub_reconnects.inc,
            on_ignored=metrics.hub_ignored_notices.inc,
            heartbeat_s=config.hub_heartbeat_s,
            unhealthy_after_s=config.hub_unhealthy_after_s,
        )
        limits = protocol.Limits(
            max_body_bytes=config.max_body_bytes,
            max_recipients=config.max_recipients,
            retention_s=config.retention_s,
        )
        services = Services(
            config=config,
            store=store,
            hub=hub,
            limits=limits,
            metrics=metrics,
            trusted_proxies=parse_networks(config.trusted_proxies),
        )
        metrics.connections.set_function(services.connections.total)
        policy = PolicyDocument(config, settings)
        async with trio.open_nursery() as background:
            await background.start(pump.run)
            await background.start(policy.follow_epoch, pump)
            await background.start(hub.run)
            await background.start(services.ticker.run)
            ops_port = 0
            if config.ops_port:
                endpoints = OpsEndpoints(
                    metrics,
                    partial(_readiness, services, pump),
                    policy.body,
                    lambda: [p] if (p := hub.health_problem()) else [],
                )
                port = config.ops_port + (config.worker_id or 0)
                ops_port = await background.start(serve_ops, endpoints, config.host, port)
                log.info(
                    "ops endpoints at http://%s:%d/ (healthz, readyz, metrics)",
                    config.host,
                    ops_port,
                )
            background.start_soon(_sample_oldest, store, metrics)
            await _serve_websockets(
                config, services, verifier, policy.file, redis_url, ops_port, task_status
            )
            background.cancel_scope.cancel()
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("stopped embedded Valkey")


def _read_settings(redis_url: str) -> list[NodeSettings]:
    client = connect(redis_url)
    try:
        return read_node_settings(client)
    finally:
        client.close()


async def serve_until_signal(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningRelay = await nursery.start(serve_relay, config)
            async for _ in signals:
                running.shutdown()
                break


async def open_listener(host: str, port: int, *, reuse_port: bool) -> trio.SocketListener:
    """A TCP listener; with `reuse_port`, several processes share the port (SO_REUSEPORT)."""
    ((family, kind, proto, _, address),) = (
        await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    )[:1]
    sock = trio.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _serve_websockets(
    config: Config,
    services: Services,
    verifier: Verifier,
    policy: Callable[[], WebFile],
    redis_url: str,
    ops_port: int,
    task_status: trio.TaskStatus[RunningRelay],
) -> None:
    listener = await open_listener(config.host, config.port, reuse_port=config.workers > 1)
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = [listener]
    if config.tls_cert and config.tls_key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.tls_cert, config.tls_key)
        listeners = [trio.SSLListener(listener, context, https_compatible=True)]

    async with trio.open_nursery() as connections:
        listening = trio.CancelScope()

        async def listen(*, task_status: trio.TaskStatus[object]) -> None:
            with listening:
                await trio.serve_listeners(
                    partial(_serve_stream, services, verifier, policy),
                    listeners,
                    handler_nursery=connections,
                    task_status=task_status,
                )

        await connections.start(listen)
        port = listener.socket.getsockname()[1]
        running = RunningRelay(port, ops_port, redis_url, services)
        log.info("relay worker %d listening on %s:%d", config.worker_id or 0, config.host, port)
        task_status.started(running)
        await running._stop.wait()

        log.info("shutting down: closing %d sessions with 1001", len(services.sessions))
        listening.cancel()
        services.draining = True
        for session in list(services.sessions):
            session.close(CloseCode.GOING_AWAY)
        connections.cancel_scope.deadline = trio.current_time() + config.drain_timeout_s


async def _serve_stream(
    services: Services, verifier: Verifier, policy: Callable[[], WebFile], stream: trio.abc.Stream
) -> None:
    """One TCP connection: its request head within the auth timeout; a plain HTTP request
    is answered by web_routes, an upgrade goes to the connection handler. The stream is
    closed in every case (also after a refused handshake)."""
    config = services.config
    try:
        upgrade = None
        with trio.move_on_after(config.auth_timeout_s):
            upgrade = await _read_upgrade(stream, config.demo, policy)
        if upgrade is not None:
            await handle_request(upgrade, stream, peer_address(stream), services, verifier)
    except trio.BrokenResourceError as exc:  # the peer hung up or broke TLS: misbehaviour
        log.warning("connection broken by the peer: %s", exc)
    except Exception:
        # A fault; never let one connection take the server down.
        log.exception("connection ended by an unexpected error")
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            await stream.aclose()


async def _read_upgrade(
    stream: trio.abc.Stream, demo: bool, policy: Callable[[], WebFile]
) -> Upgrade | None:
    """The upgrade request; None after answering a plain or a bad request."""
    try:
        head, received = await read_opening(stream)
    except HeadTooLarge:
        await stream.send_all(head_too_large())
        return None
    if not is_upgrade(head):
        if head:
            await stream.send_all(respond(head, demo=demo, policy=policy))
        return None
    try:
        return Upgrade.parse(head, received)
    except BadUpgrade as bad:
        await stream.send_all(bad.response)
        return None


def peer_address(stream: trio.abc.Stream) -> str:
    """The address of the peer, for the per-address connection cap."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        try:
            return str(inner.socket.getpeername()[0])
        except OSError:
            pass
    return repr(stream)


async def _readiness(services: Services, pump: RedisPump) -> list[str]:
    problems = []
    if services.draining:
        problems.append("shutting down")
    if (hub_problem := services.hub.problem) is not None:
        problems.append(hub_problem)
    if (topology_problem := pump.problem()) is not None:
        problems.append(topology_problem)
    with trio.move_on_after(READINESS_TIMEOUT_S):
        nodes = pump.nodes()
        replies = await pump.execute_many([Command(("PING",), node=node) for node in nodes])
        unreachable = [n for n, r in zip(nodes, replies, strict=True) if isinstance(r, Exception)]
        if unreachable:
            where = f" ({', '.join(unreachable)})" if len(replies) > 1 else ""
            problems.append(f"Redis unreachable{where}")
        return problems
    problems.append("Redis did not answer PING in time")
    return problems


async def _sample_oldest(store: RedisMailboxStore, metrics: Metrics) -> None:
    """Now and then, look at some mailboxes' oldest waiting message (metrics only)."""
    cursors: dict[str, int] = {}  # one SCAN cursor per primary
    while True:
        await trio.sleep(SAMPLE_INTERVAL_S)
        oldest: list[int] = []
        try:
            for node in store.pump.nodes():
                cursors[node], oldest_ms = await store.sample_oldest(
                    cursors.get(node, 0), node=node
                )
                if oldest_ms is not None:
                    oldest.append(oldest_ms)
        except (redis.RedisError, RelayError):
            continue
        age_s = max(time.time() - min(oldest) / 1000, 0.0) if oldest else 0.0
        metrics.oldest_undelivered_age.set(age_s)
