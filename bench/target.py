"""The server under test: a relay given by --url, or one the bench starts (--spawn) and stops.

With --spawn the bench starts a private Valkey (relay.embedded, on a unix
socket, so it can count Redis commands and check keys), or with `--redis
cluster` a private 3-primary Redis Cluster (relay.embedded_cluster, on
loopback ports), and then the relay as a real process, `python -m relay
serve` (with `--workers N`, a supervisor and its N workers), pinned with
`taskset -c` when asked; with a RelayTree (--baseline), that commit's relay.
The calibration's echo server (echo_server.py) is started the same way. All
are stopped by PID at the end: SIGTERM, a wait, then SIGKILL; all get SIGTERM
if the bench itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from relay.embedded import EmbeddedServer, free_loopback_port
from relay.embedded_cluster import EmbeddedCluster

from . import wire
from .baseline import RelayTree
from .options import CLUSTER_PRIMARIES
from .relay_metrics import scrape

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class TargetError(Exception):
    """The relay could not be started or reached."""


@attrs.define
class Target:
    url: str
    secret: str
    redis_url: str | None
    key_prefix: str
    relay_pid: int | None
    spawned: bool
    metrics_urls: tuple[str, ...] = ()  # the relay's Prometheus /metrics (one per worker)
    welcome: dict[str, Any] = attrs.field(factory=dict)
    kind: str = "relay"  # or "echo": the calibration server, which stores nothing


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Spawned:
    """A server process on 127.0.0.1 (pinned with `taskset -c` when asked), stopped by PID.

    Its output goes to a log file in a private temporary directory, removed on stop.
    """

    def __init__(self, name: str, cpu: str | None) -> None:
        self.name = name
        self.cpu = cpu
        self.port = 0
        self._dir = tempfile.mkdtemp(prefix="relay-bench-")
        self._log_path = os.path.join(self._dir, f"{name}.log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, command: list[str], env: dict[str, str], cwd: str | None = None) -> None:
        """Start `command` and wait until it listens on `self.port`."""
        if self.cpu:
            if shutil.which("taskset") is None:
                raise TargetError("--relay-cpu needs taskset (util-linux)")
            command = ["taskset", "-c", self.cpu, *command]
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=cwd,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the bench only
            )
        self._wait_listening()

    def _wait_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise TargetError(
                    f"{self.name} exited with {self._process.returncode} on start:\n"
                    f"{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TargetError(f"{self.name} did not listen within {START_TIMEOUT_S} s")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self._log_path, errors="replace") as file:
                return "".join(file.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the process by its PID (SIGTERM, a wait, SIGKILL); remove the directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Spawned:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SpawnedRelay(Spawned):
    """A relay process on a private Valkey or Redis Cluster; a context manager that always
    cleans up. The Redis processes inherit the bench's own pinning (`--client-cpu`).

    With a `tree` (another commit's sources, see baseline.py) the relay is that
    commit's code, run by the same Python with the tree first on its path."""

    def __init__(
        self,
        relay_cpu: str | None,
        extra_args: list[str],
        tree: RelayTree | None = None,
        redis: str = "single",
        workers: int = 1,
    ) -> None:
        super().__init__("relay", relay_cpu)
        self.extra_args = extra_args
        self.tree = tree
        self.workers = workers
        self.secret = secrets.token_urlsafe(32)
        self.valkey = EmbeddedServer() if redis == "single" else None
        self.cluster = (
            EmbeddedCluster(primaries_count=CLUSTER_PRIMARIES) if redis == "cluster" else None
        )
        self.ops_port = 0
        self.dropped_args: list[str] = []  # flags the tree's relay does not know

    @property
    def redis_url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        assert self.valkey is not None
        return self.valkey.url

    @property
    def metrics_urls(self) -> tuple[str, ...]:
        """Worker i serves /metrics on the ops port + i (one worker: the ops port)."""
        return tuple(f"http://127.0.0.1:{self.ops_port + i}/metrics" for i in range(self.workers))

    def __enter__(self) -> SpawnedRelay:
        try:
            if self.cluster is not None:
                self.cluster.start()
            else:
                assert self.valkey is not None
                self.valkey.start()
            self._start_relay()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_relay(self) -> None:
        self.port, self.ops_port = free_loopback_port(), free_port_run(self.workers)
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--ops-port", str(self.ops_port)]
        args += ["--log-level", "warning", "--redis-url", self.redis_url, *self.extra_args]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        env = {**os.environ, "RELAY_JWT_SECRET": self.secret}  # not on the command line: ps
        cwd = None
        if self.tree is not None:
            args, self.dropped_args = self.tree.known_args(args)
            env["PYTHONPATH"] = self.tree.path
            cwd = self.tree.path  # `python -m` puts the working directory first on the path
        self.start([sys.executable, "-m", "relay", "serve", *args], env, cwd)
        self._wait_workers()

    def _wait_workers(self) -> None:
        """The port answers once one worker listens: wait until every worker's /metrics
        does, so that the kernel spreads the run's connections over all of them."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for url in self.metrics_urls:
            while scrape(url) is None:
                if self._process is None or self._process.poll() is not None:
                    raise TargetError(f"the relay exited on start:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TargetError(f"relay worker {url} did not answer in {START_TIMEOUT_S} s")
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the relay by its PID, then the Valkey or the cluster, then remove the
        private directory."""
        super().stop()
        if self.valkey is not None:
            self.valkey.stop()
        if self.cluster is not None:
            self.cluster.stop()


def free_port_run(count: int, attempts: int = 100) -> int:
    """A loopback port P such that P .. P + count - 1 are all free now."""
    for _ in range(attempts):
        first = free_loopback_port()
        if all(_bindable(first + i) for i in range(1, count)):
            return first
    raise TargetError(f"no run of {count} free loopback ports found")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SpawnedEcho(Spawned):
    """The calibration server (echo_server.py), pinned like the relay would be."""

    def __init__(self, cpu: str | None) -> None:
        super().__init__("echo server", cpu)
        self.secret = secrets.token_urlsafe(32)

    def __enter__(self) -> SpawnedEcho:
        try:
            self.port = free_loopback_port()
            command = [sys.executable, "-m", f"{__package__}.echo_server"]
            env = {**os.environ, "RELAY_JWT_SECRET": self.secret}
            self.start([*command, "--port", str(self.port)], env)
        except BaseException:
            self.stop()
            raise
        return self


async def _probe(url: str, secret: str, box: str) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        conn = await wire.connect(nursery, url, secret, box)
        await conn.ws.aclose()
    return conn.welcome


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def probe(url: str, secret: str, box: str) -> dict[str, Any]:
    """Connect once and return the relay's welcome, or raise TargetError saying why not."""
    try:
        return trio.run(_probe, url, secret, box)
    except Exception as group:
        exc = first_leaf(group)
        if isinstance(exc, ConnectionClosed):
            code = exc.reason.code if exc.reason else None
            hint = " (wrong --jwt-secret?)" if code == 4401 else ""
            raise TargetError(f"{url} closed the connection with {code}{hint}") from None
        if isinstance(exc, OSError | HandshakeError | trio.TooSlowError | wire.Unexpected):
            raise TargetError(
                f"cannot reach a relay at {url}: {type(exc).__name__}: {exc}"
            ) from None
        raise
