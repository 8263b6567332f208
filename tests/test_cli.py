"""The `relay` command as a user runs it: real subprocesses, real relays, real Redis.

Every failure is one line on stderr naming the problem, with the documented
exit status (2: usage error or Redis unreachable; 1: the relay refused).
`relay listen` survives a relay restart and stops on 4401/4409 with a message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
import trio
from process_fixtures import run_cli
from relay_fixtures import SECRET, TEARDOWN_S, RelayFactory, msg_key, poll_until, unique

from relay.embedded import EmbeddedServer, free_loopback_port
from relay.redis.admin import RedisClient

pytest_plugins = ["relay_fixtures"]

CLI_DEADLINE_S = 30.0  # a Python interpreter importing the relay, on a small shared machine
ENV = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}


async def relay_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m relay ARGS` to its end within the deadline."""
    with trio.fail_after(CLI_DEADLINE_S):
        return await run_cli(*args)


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single stderr line of a failed command (asserts there is exactly one)."""
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1, result.stderr.decode(errors="replace")
    return lines[0]


def serve_args(port: int, redis_url: str, *more: str) -> list[str]:
    return ["serve", "--port", str(port), "--ops-port", "0", "--redis-url", redis_url, *more]


# -- relay serve ---------------------------------------------------------------------


async def test_serve_port_in_use_is_one_line_exit_2(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await relay_cli(*serve_args(port, redis_url, "--jwt-secret", SECRET))
    assert result.returncode == 2
    assert "address already in use" in one_line(result).lower()


async def test_serve_unreachable_redis_is_one_line_exit_2() -> None:
    url = f"redis://127.0.0.1:{free_loopback_port()}/0"
    result = await relay_cli(*serve_args(0, url, "--jwt-secret", SECRET))
    assert result.returncode == 2
    line = one_line(result)
    assert "redis" in line.lower() and "connect" in line.lower(), line


async def test_serve_short_jwt_secret_is_one_line_exit_2(redis_url: str) -> None:
    result = await relay_cli(*serve_args(0, redis_url, "--jwt-secret", "short"))
    assert result.returncode == 2
    assert "32 bytes" in one_line(result)


async def test_serve_http_redis_url_is_one_line_exit_2() -> None:
    result = await relay_cli(*serve_args(0, "http://127.0.0.1:6379/0", "--jwt-secret", SECRET))
    assert result.returncode == 2
    line = one_line(result)
    assert "http://" in line and "redis://" in line, line


# -- relay send ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--to", "bob", "--ttl", "30d", "hi"], "ttl_too_long"),
        (["--to", "not a mailbox", "hi"], "bad_recipient"),
        (["--to", "bob", "x" * 70_000], "too_large"),
    ],
)
async def test_send_refused_by_the_relay_is_one_line_exit_1(
    make_relay: RelayFactory, extra: list[str], code: str
) -> None:
    relay = await make_relay()
    result = await relay_cli(
        "send", "--url", relay.url, "--jwt-secret", SECRET, "--as", "alice", *extra
    )
    assert result.returncode == 1
    assert code in one_line(result)


async def test_send_to_a_closed_port_names_the_reason() -> None:
    url = f"ws://127.0.0.1:{free_loopback_port()}/v1"
    result = await relay_cli(
        "send", "--url", url, "--jwt-secret", SECRET, "--as", "a", "--to", "b", "x"
    )
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"relay send: cannot connect to {url}: "), line
    assert line.removeprefix(f"relay send: cannot connect to {url}: ").strip(), line


async def test_send_to_a_wrong_path_prints_the_http_status(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    url = relay.url.replace("/v1", "/nope")
    result = await relay_cli(
        "send", "--url", url, "--jwt-secret", SECRET, "--as", "a", "--to", "b", "x"
    )
    assert result.returncode == 1
    line = one_line(result)
    assert "HTTP 404" in line and "(" not in line, line


# -- relay listen --------------------------------------------------------------------


@asynccontextmanager
async def listener(url: str, mailbox: str, out: Path) -> AsyncIterator[trio.Process]:
    """`relay listen` as a subprocess writing to `out`; killed by PID if still running."""
    args = [sys.executable, "-m", "relay", "listen", "--url", url, "--jwt-secret", SECRET]
    with out.open("wb") as file:
        process = await trio.lowlevel.open_process(
            [*args, "--as", mailbox], stdin=subprocess.DEVNULL, stdout=file, stderr=file, env=ENV
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        with trio.move_on_after(TEARDOWN_S) as scope:
            scope.shield = True
            await process.wait()


def read_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def bodies(path: Path) -> list[str]:
    return [orjson.loads(line)["body"] for line in read_lines(path) if line.startswith("{")]


async def test_listen_exits_0_on_sigint(make_relay: RelayFactory, tmp_path: Path) -> None:
    relay = await make_relay()
    out = tmp_path / "listen.out"
    mailbox = unique("bob")
    async with listener(relay.url, mailbox, out) as process:
        with trio.fail_after(CLI_DEADLINE_S):
            await poll_until(lambda: relay.services.sessions != set() or process.poll() is not None)
            assert process.poll() is None, out.read_text()
            process.send_signal(signal.SIGINT)
            code = await process.wait()
    assert code == 0, out.read_text()
    assert "Traceback" not in out.read_text()


async def test_listen_stops_on_4409_with_a_message(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    from relay_fixtures import token

    from relay.client import open_relay

    relay = await make_relay()
    out = tmp_path / "listen.out"
    mailbox = unique("bob")
    async with listener(relay.url, mailbox, out) as process:
        with trio.fail_after(CLI_DEADLINE_S):
            await poll_until(lambda: bool(relay.services.sessions) or process.poll() is not None)
            async with open_relay(relay.url, token(mailbox)):
                code = await process.wait()
    assert code == 1
    assert "4409" in read_lines(out)[-1], out.read_text()


@asynccontextmanager
async def relay_process(port: int, redis_url: str, prefix: str, log: Path) -> AsyncIterator[str]:
    """`relay serve` as a subprocess on `port`; yields its URL once it accepts WebSockets."""
    args = [*serve_args(port, redis_url, "--jwt-secret", SECRET, "--key-prefix", prefix)]
    args += ["--drain-timeout", "2"]
    with log.open("wb") as file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relay", *args],
            stdin=subprocess.DEVNULL,
            stdout=file,
            stderr=file,
            env=ENV,
        )
    try:
        with trio.fail_after(CLI_DEADLINE_S):
            await poll_until(lambda: b"listening on" in log.read_bytes() or bool(process.poll()))
        assert process.poll() is None, "relay exited: see " + str(log)
        yield f"ws://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        with trio.move_on_after(TEARDOWN_S) as scope:
            scope.shield = True
            await process.wait()
        if process.poll() is None:
            process.kill()
            await process.wait()


async def test_listen_reconnects_after_a_relay_restart(
    redis_url: str, redis_client: RedisClient, prefix: str, tmp_path: Path
) -> None:
    from relay_fixtures import token

    from relay.client import open_relay

    port, mailbox = free_loopback_port(), unique("bob")
    out, log = tmp_path / "listen.out", tmp_path / "relay.log"
    url = f"ws://127.0.0.1:{port}/v1"
    # Started before the relay: its first connects fail, and it keeps trying.
    async with listener(url, mailbox, out) as process:
        async with relay_process(port, redis_url, prefix, log):
            with trio.fail_after(CLI_DEADLINE_S):
                async with open_relay(url, token("alice")) as alice:
                    await alice.send(mailbox, "before", ref=unique("r"))
                await poll_until(lambda: bodies(out) == ["before"] or process.poll() is not None)
                # acked before the relay stops (else it comes again: at-least-once)
                pattern = f"{prefix}{{{mailbox}}}:msg:*"
                await poll_until(lambda: not list(redis_client.scan_iter(match=pattern)))
        # That relay stopped (1001 to the listener); a new one comes up on the same port.
        async with relay_process(port, redis_url, prefix, tmp_path / "relay2.log"):
            with trio.fail_after(CLI_DEADLINE_S):
                async with open_relay(url, token("alice")) as alice:
                    await alice.send(mailbox, "after", ref=unique("r"))
                await poll_until(lambda: "after" in bodies(out) or process.poll() is not None)
        assert process.poll() is None, out.read_text()
    assert bodies(out) == ["before", "after"], out.read_text()
    assert "reconnecting" in out.read_text()


async def test_listen_prints_the_welcomes_expired_count(
    make_relay: RelayFactory, redis_client: RedisClient, prefix: str, tmp_path: Path
) -> None:
    from relay_fixtures import token

    from relay.client import open_relay

    relay = await make_relay()
    mailbox, out = unique("bob"), tmp_path / "listen.out"
    async with open_relay(relay.url, token("alice")) as alice:
        gone = await alice.send(mailbox, "gone soon", ttl_s=1, ref=unique("r"))
        await alice.send(mailbox, "stays", ref=unique("r"))
    with trio.fail_after(CLI_DEADLINE_S):
        await poll_until(
            lambda: not redis_client.exists(msg_key(prefix, mailbox, gone["ids"][mailbox]))
        )
    async with listener(relay.url, mailbox, out) as process:
        with trio.fail_after(CLI_DEADLINE_S):
            await poll_until(lambda: bodies(out) == ["stays"] or process.poll() is not None)
    assert "1 message(s) expired before they were delivered" in out.read_text()


async def test_listen_says_when_the_storage_was_reset(
    redis_server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    from process_fixtures import restartable_relay
    from relay_fixtures import token

    from relay.client import open_relay

    server = EmbeddedServer(binary=redis_server.binary, port=free_loopback_port())
    server.start()
    mailbox, out = unique("bob"), tmp_path / "listen.out"

    async def deliver(url: str, body: str, process: trio.Process) -> None:
        async with open_relay(url, token("alice")) as alice:
            await alice.send(mailbox, body)
        await poll_until(lambda: body in bodies(out) or process.poll() is not None)

    try:
        async with (
            restartable_relay(server.url, prefix, tmp_path) as relay,
            listener(relay.url, mailbox, out) as process,
        ):
            with trio.fail_after(CLI_DEADLINE_S):
                await deliver(relay.url, "before", process)
                await relay.kill()  # the node restarts, its memory-only Valkey too
                server.stop()
                server.start()
                await relay.start()
                await deliver(relay.url, "after", process)
            assert process.poll() is None, out.read_text()
    finally:
        server.stop()
    assert bodies(out) == ["before", "after"]
    assert "storage was reset" in out.read_text()


async def test_serve_logs_its_ops_url_and_embedded_valkey_url_for_audit(tmp_path: Path) -> None:
    port, ops, log = free_loopback_port(), free_loopback_port(), tmp_path / "relay.log"
    args = ["serve", "--port", str(port), "--ops-port", str(ops), "--jwt-secret", SECRET]
    with log.open("wb") as file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relay", *args],
            stdin=subprocess.DEVNULL,
            stdout=file,
            stderr=file,
            env=ENV,
        )
    try:
        with trio.fail_after(CLI_DEADLINE_S):
            await poll_until(lambda: b"listening on" in log.read_bytes() or bool(process.poll()))
        text = log.read_text()
        assert f"http://127.0.0.1:{ops}/" in text, text
        (url,) = (word for word in text.split() if word.startswith("unix://"))
        audited = await relay_cli("audit", "--redis-url", url)
        assert audited.returncode == 0, audited.stdout + audited.stderr
    finally:
        process.terminate()
        with trio.move_on_after(TEARDOWN_S) as scope:
            scope.shield = True
            await process.wait()
        if process.poll() is None:
            process.kill()


async def test_audit_help_claims_no_embedded_default() -> None:
    result = await relay_cli("audit", "--help")
    assert result.returncode == 0
    assert b"default: embedded" not in result.stdout and b"embedded Valkey" not in result.stdout
