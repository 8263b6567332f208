"""Real `python -m relay` processes for tests: a relay server, and the CLI's client commands.

Each is started on loopback with a free port and stopped by its PID: nothing is
left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import trio
from relay_fixtures import SECRET, accepts_connections, poll_until

from relay.embedded import free_loopback_port

STARTUP_S = 20.0  # a Python interpreter importing the relay, then Redis checks
STOP_S = 10.0


@attrs.define
class RelayProcess:
    url: str
    process: trio.Process
    log_path: Path
    returncode: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def _wait_listening(relay: RelayProcess, port: int) -> None:
    """Poll a TCP connect until the relay accepts; fail early if it exited."""

    async def listening() -> bool:
        if relay.process.poll() is not None:
            raise AssertionError(f"relay exited with {relay.process.returncode}:\n{relay.log()}")
        return await accepts_connections(port)

    await poll_until(listening)


async def stop_process(process: trio.Process) -> int:
    """SIGTERM, wait with a timeout, then SIGKILL: by PID, nothing left running."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(STOP_S):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


@asynccontextmanager
async def relay_process(
    redis_url: str, prefix: str, log_path: Path, *extra: str, port: int = 0
) -> AsyncIterator[RelayProcess]:
    port = port or free_loopback_port()
    args = [sys.executable, "-m", "relay", "serve", "--port", str(port), "--ops-port", "0"]
    args += ["--redis-url", redis_url, "--jwt-secret", SECRET, "--key-prefix", prefix]
    # The readiness probe is a bare TCP connection that never handshakes; the relay holds
    # such a connection for auth_timeout, also when shutting down: keep that short.
    args += ["--auth-timeout", "1", "--drain-timeout", "3", *extra]
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    relay = RelayProcess(f"ws://127.0.0.1:{port}/v1", process, log_path)
    try:
        with trio.fail_after(STARTUP_S):
            await _wait_listening(relay, port)
        yield relay
    finally:
        with trio.CancelScope(shield=True):
            relay.returncode = await stop_process(process)


@attrs.define
class RestartableRelay:
    """Relay subprocesses, one at a time, on one fixed port: a test kills one (SIGKILL: its
    clients see 1006, nothing is drained) and starts the next, or stops one (SIGSTOP) to
    make it a relay that answers nothing."""

    redis_url: str
    prefix: str
    log_dir: Path
    extra: tuple[str, ...]
    port: int = attrs.field(factory=free_loopback_port)
    current: RelayProcess | None = None
    _stack: AsyncExitStack = attrs.field(factory=AsyncExitStack)
    _starts: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    async def start(self) -> RelayProcess:
        assert self.current is None, "a relay runs already"
        self._starts += 1
        log = self.log_dir / f"relay-{self.port}-{self._starts}.log"
        self.current = await self._stack.enter_async_context(
            relay_process(self.redis_url, self.prefix, log, *self.extra, port=self.port)
        )
        return self.current

    async def kill(self) -> None:
        if self.current is not None:
            self.current.process.kill()
            await self.current.process.wait()
            self.current = None
        await self._stack.aclose()

    async def restart(self) -> RelayProcess:
        await self.kill()
        return await self.start()

    def pause(self) -> None:
        assert self.current is not None
        self.current.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.current is not None
        self.current.process.send_signal(signal.SIGCONT)


@asynccontextmanager
async def restartable_relay(
    redis_url: str, prefix: str, log_dir: Path, *extra: str
) -> AsyncIterator[RestartableRelay]:
    """A RestartableRelay, started; whatever relay runs at the end is killed by PID."""
    relay = RestartableRelay(redis_url, prefix, log_dir, extra)
    try:
        await relay.start()
        yield relay
    finally:
        with trio.CancelScope(shield=True):
            await relay.kill()


def user_env(**relay_vars: str) -> dict[str, str]:
    """This environment without `RELAY_*` variables, plus the given ones (the `export` lines
    `relay serve` prints, say)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return env | relay_vars


async def run_cli(*args: str, **relay_vars: str) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m relay ARGS` to its end, as a user runs the CLI; capture its output.
    Only ARGS and the given `RELAY_*` variables configure it."""
    return await trio.run_process(
        [sys.executable, "-m", "relay", *args],
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=user_env(**relay_vars),
    )


def cli_identity(relay: RelayProcess, mailbox: str) -> Sequence[str]:
    """The options that make a CLI command speak to `relay` as `mailbox`."""
    return ("--url", relay.url, "--jwt-secret", SECRET, "--as", mailbox)
