"""End to end: what the logs never contain (tokens, bodies), and `--workers`.

Real relays over real WebSockets (and `relay serve --workers 2` as a subprocess), and
real HTTP to the ops port through a tiny client of our own (relay_fixtures.http). Every
I/O step has a deadline; waits for state no frame announces poll with one.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from relay_fixtures import (
    DEADLINE_S,
    SECRET,
    TEARDOWN_S,
    close_code,
    http,
    poll_until,
    raw_session,
    raw_ws,
    recv,
    relay_config,
    request,
    scrape,
    send_json,
    serving,
    signed_token,
    token,
    unique,
    unsigned_token,
    valid_claims,
)
from trio_websocket import ConnectionClosed

from relay.client import open_relay
from relay.embedded import EmbeddedServer, free_loopback_port

pytest_plugins = ["relay_fixtures"]


WORKER_START_S = 30.0  # three Python processes start on a small machine


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free on the loopback (the ops ports of two
    workers)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports")


# -- logs ------------------------------------------------------------------------------


async def test_debug_logs_never_contain_tokens_or_bodies(
    caplog: pytest.LogCaptureFixture, redis_url: str, prefix: str
) -> None:
    caplog.set_level(logging.DEBUG)  # the root level, as `relay serve --log-level debug` sets it
    body = unique("SECRET-BODY")
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    now = int(time.time())
    tokens = {
        "alice": token(alice),
        "bob": token(bob),
        "bob2": token(bob),
        "carol": token(carol),
        "wrong_key": signed_token(valid_claims(alice), key="x" * 48),
        "expired": signed_token({"sub": alice, "iat": now - 100, "exp": now - 10}),
        "future": signed_token({"sub": alice, "iat": now + 999, "exp": now + 9999}),
        "alg_none": unsigned_token(valid_claims(alice)),
        "bad_sub": signed_token({"sub": "no spaces allowed " + body, "exp": now + 60}),
        "garbage": "not-a-jwt-" + unique("garbage"),
    }
    refused = [tokens[k] for k in ("wrong_key", "expired", "future", "alg_none", "bad_sub")]
    refused.append(tokens["garbage"])
    config = relay_config(redis_url, prefix, auth_timeout_s=1.0, log_level="debug")

    async with serving(config) as relay:
        url = relay.url
        with trio.fail_after(DEADLINE_S * 3):
            for bad in refused:  # every way a token is refused, by header and by frame
                async with raw_ws(url, bearer=bad) as ws:
                    assert await close_code(ws) == 4401
                async with raw_ws(url) as ws:
                    await send_json(ws, {"type": "auth", "token": bad})
                    assert await close_code(ws) == 4401
            basic = [(b"Authorization", f"Basic {tokens['alice']}".encode())]
            async with raw_ws(url, headers=basic) as ws:
                assert await close_code(ws) == 4401
            async with raw_ws(url) as ws:  # an auth frame that is not JSON
                await ws.send_message('{"type": "auth", "token": "' + tokens["alice"])
                assert await close_code(ws) == 4401
            async with raw_ws(url) as ws:  # a send before auth
                await send_json(ws, {"type": "send", "to": bob, "body": body})
                assert await close_code(ws) == 4401
            async with raw_ws(url + "?token=" + tokens["alice"]) as ws:  # never in the URL
                assert await close_code(ws) == 4408

            async with (
                raw_session(url, alice) as (sender, _),
                open_relay(url, tokens["bob"], auth="frame") as receiver,
            ):
                # Online delivery, a retried ref, two recipients, then the offline path.
                sent = await request(sender, {"type": "send", "ref": "r1", "to": bob, "body": body})
                again = await request(
                    sender, {"type": "send", "ref": "r1", "to": bob, "body": body}
                )
                assert again == {**sent, "duplicate": True}
                multi = await request(
                    sender, {"type": "send", "ref": "r2", "to": [bob, carol], "body": body + "-2"}
                )
                assert multi["type"] == "accepted"
                first = [await receiver.receive(), await receiver.receive()]
                assert [m.body for m in first] == [body, body + "-2"]
                assert await receiver.ack([m.id for m in first]) == 2
                await receiver.ack(["0-unknown"], wait=False)

                # Every error path, each frame carrying the body or a token.
                bad_frames: list[tuple[object, str]] = [
                    (
                        {"type": "send", "ref": "e1", "to": bob, "body": body, "ttl": 10**9},
                        "ttl_too_long",
                    ),
                    ({"type": "send", "ref": "e2", "to": bob, "body": body * 3000}, "too_large"),
                    (
                        {"type": "send", "ref": "e3", "to": "bad recipient", "body": body},
                        "bad_recipient",
                    ),
                    ({"type": "send", "ref": "e4", "to": bob, "body": [body]}, "bad_frame"),
                    ({"type": "auth", "ref": "e5", "token": tokens["alice"]}, "bad_frame"),
                    ({"type": "nope", "ref": "e6", "body": body}, "unknown_type"),
                    ({"type": "ack", "ref": "e7", "ids": body}, "bad_frame"),
                ]
                for frame, code in bad_frames:
                    error = await request(sender, frame)
                    assert (error["type"], error["code"]) == ("error", code), error
                await sender.send_message('{"type": "send", "to": "' + bob + '", "body": "' + body)
                assert (await recv(sender))["code"] == "bad_frame"
                await sender.send_message(body.encode())  # binary frames are reserved
                assert (await recv(sender))["code"] == "bad_frame"

                # A newer session replaces this one (4409).
                async with open_relay(url, tokens["bob2"]):
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await receiver.receive()
                    assert receiver.close_code == 4409

            async with open_relay(url, tokens["carol"], auth="frame") as client:
                waiting = await client.receive()  # stored while carol was offline
                assert waiting.body == body + "-2"
                assert await client.ack([waiting.id]) == 1

            # A live session when the relay shuts down (1001) is logged too.
            async with open_relay(url, tokens["alice"]) as client:
                await client.send(alice, body + "-3")
                relay.shutdown()
                with pytest.raises(ConnectionClosed):
                    while True:
                        await client.receive()
                assert client.close_code == 1001

    records = caplog.get_records("call")
    assert any(r.levelno == logging.DEBUG and r.name.startswith("relay") for r in records), (
        "no DEBUG record of the relay was captured: the test would prove nothing"
    )
    texts = [caplog.text]
    for record in records:
        texts += [record.getMessage(), repr(record.args), record.exc_text or ""]
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
    everything = "\n".join(texts)
    for secret in [body, *tokens.values()]:
        assert secret not in everything, f"{secret[:40]!r} appears in the logs"
    # Nor any piece of one: every 8 characters of each signature and of the body's random part.
    random_parts = [body.rsplit("-", 1)[1], tokens["garbage"].rsplit("-", 1)[1]]
    random_parts += [t.rsplit(".", 1)[1] for t in tokens.values() if t.count(".") == 2]
    for part in filter(None, random_parts):
        for start in range(len(part) - 7):
            piece = part[start : start + 8]
            assert piece not in everything, f"{piece!r} (of {part[:20]!r}...) appears in the logs"
    # The libraries that would log frames stay at INFO even with the root at DEBUG.
    for name in ("trio-websocket", "redis"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.INFO


# -- workers ----------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def is_running(pid: int) -> bool:
    """True for a live process; a zombie (exited, not reaped yet) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def is_ready(ops_port: int) -> bool:
    try:
        return (await http(ops_port, "/readyz")).status == 200
    except OSError:
        return False


@asynccontextmanager
async def killed_at_exit(process: trio.Process, others: list[int]) -> AsyncIterator[None]:
    """Whatever happens, stop the process and the recorded children by PID."""
    try:
        yield
    finally:
        for pid in others:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        with trio.move_on_after(TEARDOWN_S) as scope:
            scope.shield = True
            await process.wait()


async def test_workers_serve_a_client_each_and_exit_cleanly_on_sigterm(tmp_path: Path) -> None:
    port, ops = free_loopback_port(), free_port_pair()
    stderr_path = tmp_path / "relay.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    workers: list[int] = []
    with EmbeddedServer() as redis, stderr_path.open("wb") as stderr:
        command = [sys.executable, "-m", "relay", "serve", "--workers", "2", "--port", str(port)]
        command += ["--ops-port", str(ops), "--redis-url", redis.url, "--jwt-secret", SECRET]
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env
        )

        def log_text() -> str:
            return stderr_path.read_text(errors="replace")

        async def both_ready() -> bool:
            assert process.poll() is None, f"supervisor exited:\n{log_text()}"
            return await is_ready(ops) and await is_ready(ops + 1)

        async with killed_at_exit(process, workers):
            with trio.fail_after(WORKER_START_S):
                await poll_until(both_ready, 0.1)
            workers += children_of(process.pid)
            assert len(workers) == 2, workers

            served = {0: 0.0, 1: 0.0}
            url = f"ws://127.0.0.1:{port}/v1"
            with trio.fail_after(DEADLINE_S * 2):
                for attempt in range(100):  # each on a new TCP connection, until both served
                    mailbox = unique(f"w{attempt}")
                    async with open_relay(url, token(mailbox)) as client:
                        await client.send(mailbox, "to myself")
                        message = await client.receive()
                        assert await client.ack([message.id]) == 1
                    for worker in (0, 1):
                        metrics = await scrape(ops + worker)
                        assert metrics.value("relay_worker_info", worker=str(worker)) == 1
                        served[worker] = metrics.value("relay_messages_delivered_total")
                    if all(served.values()):
                        break
            assert all(served.values()), f"one worker served every client: {served}"

            # A worker that dies is restarted (on the same ops port).
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)

            async def restarted() -> bool:
                assert process.poll() is None, f"supervisor exited:\n{log_text()}"
                current = children_of(process.pid)
                if victim in current or len(current) != 2:
                    return False
                return await is_ready(ops) and await is_ready(ops + 1)

            with trio.fail_after(WORKER_START_S):
                await poll_until(restarted, 0.1)
            workers += [pid for pid in children_of(process.pid) if pid not in workers]

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(DEADLINE_S * 2):
                code = await process.wait()
            assert code == 0, log_text()
            left = [pid for pid in workers if is_running(pid)]
            assert not left, f"workers still running after the supervisor exited: {left}"

    text = log_text()
    assert re.search(r"\bworker=0\b", text), text
    assert re.search(r"\bworker=1\b", text), text
