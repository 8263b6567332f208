"""`relay serve --workers N`: N relay processes sharing one port, under one supervisor.

The supervisor starts the embedded Valkey (when no Redis URL is given) once
for all, reserves the port, and runs each worker as `python -m relay.workers`
with its configuration in the environment. Workers bind the port with
SO_REUSEPORT, so the kernel spreads connections over them; worker i serves its
ops endpoints on `ops_port + i`. A worker that dies is restarted, after a
backoff that grows while it keeps dying soon after its start; after
GIVE_UP_AFTER such quick deaths in a row the supervisor gives up (its error
names the worker's exit status; the worker printed its reason). SIGTERM or
SIGINT to the supervisor drains every worker (1001 to their sessions) and
stops the embedded Valkey. Workers die with the supervisor (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import attrs
import orjson
import redis
import trio

from relay import logs
from relay.config import Config
from relay.embedded import EmbeddedServer, die_with_parent
from relay.errors import RelayError, first_leaf
from relay.server import serve_until_signal

log = logging.getLogger(__name__)

CONFIG_ENV = "RELAY_WORKER_CONFIG"
RESTART_DELAY_S = 0.5  # doubled after each quick death in a row
QUICK_DEATH_S = 10.0  # a worker that dies sooner than this after its start died "quickly"
GIVE_UP_AFTER = 3
STOP_GRACE_S = 5.0
EXIT_CANNOT_START = 2


class WorkerFailed(RelayError):
    """A worker keeps dying right after its start: restarting it again will not help."""


def run_supervisor(config: Config) -> None:
    """Run the workers until SIGTERM/SIGINT."""
    embedded: EmbeddedServer | None = None
    reservation = _reserve_port(config.host, config.port)
    try:
        if config.redis_url is None:
            embedded = EmbeddedServer()
            embedded.start()
            log.info(
                "started embedded Valkey (pid %d) for %d workers; messages live in memory "
                "only, and stopping the relay discards them; its URL: %s",
                embedded.pid,
                config.workers,
                embedded.url,
            )
        shared = attrs.evolve(
            config,
            redis_url=config.redis_url or (embedded.url if embedded else None),
            port=reservation.getsockname()[1],
            log_key=config.log_key or os.urandom(16).hex(),
        )
        trio.run(_supervise, shared)
    finally:
        reservation.close()
        if embedded is not None:
            embedded.stop()
            log.info("stopped embedded Valkey")


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) the port the workers will share, so port 0 picks one for all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


async def _supervise(config: Config) -> None:
    stopping = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for worker_id in range(config.workers):
                nursery.start_soon(
                    _keep_running, attrs.evolve(config, worker_id=worker_id), stopping
                )
            log.info("supervising %d workers on %s:%d", config.workers, config.host, config.port)
            async for _ in signals:
                log.info("stopping: draining %d workers", config.workers)
                stopping.set()
                break


async def _keep_running(config: Config, stopping: trio.Event) -> None:
    quick_deaths = 0
    while not stopping.is_set():
        started = trio.current_time()
        # Popen from this (the main) thread: the parent-death signal follows the forking thread.
        process = subprocess.Popen(  # noqa: ASYNC220 - see above
            [sys.executable, "-m", "relay.workers"],
            env={**os.environ, CONFIG_ENV: orjson.dumps(attrs.asdict(config)).decode()},
            preexec_fn=die_with_parent,
        )
        try:
            async with trio.open_nursery() as nursery:
                grace_s = config.drain_timeout_s + STOP_GRACE_S
                nursery.start_soon(_stop_when, stopping, process, grace_s)
                code = await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
                nursery.cancel_scope.cancel()
        finally:
            if process.poll() is None:  # the supervisor is failing: take the worker along
                process.terminate()
        if stopping.is_set():
            return
        quick = trio.current_time() - started < QUICK_DEATH_S
        quick_deaths = quick_deaths + 1 if quick else 0
        if quick_deaths >= GIVE_UP_AFTER:
            raise WorkerFailed(
                f"worker {config.worker_id} exited with {code} {quick_deaths} times in a row "
                "right after starting; giving up (its error is above)"
            )
        delay = RESTART_DELAY_S * 2**quick_deaths
        log.error("worker %s exited with %s; restarting in %.1f s", config.worker_id, code, delay)
        await trio.sleep(delay)


async def _stop_when(
    stopping: trio.Event, process: subprocess.Popen[bytes], grace_s: float
) -> None:
    """On stop: SIGTERM (the worker drains), and SIGKILL if it is still there after the grace."""
    await stopping.wait()
    process.send_signal(signal.SIGTERM)
    await trio.sleep(grace_s)
    if process.poll() is None:
        log.error("worker did not stop within %.0f s; killing it", grace_s)
        process.kill()


def run_worker() -> None:
    """Entry point of one worker process (the supervisor sets its configuration)."""
    values: dict[str, Any] = orjson.loads(os.environ[CONFIG_ENV])
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    config = Config(**fields)
    logs.configure(config.log_level, config.log_format, config.log_key, config.worker_id)
    problems: list[str] = []
    try:
        trio.run(serve_until_signal, config)
    except* (RelayError, OSError, redis.RedisError) as group:
        problems.append(str(first_leaf(group)))
    if problems:
        print(f"relay worker {config.worker_id}: {problems[0]}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CANNOT_START)


if __name__ == "__main__":
    run_worker()
