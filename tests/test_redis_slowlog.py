"""The slow log keeps the arguments of slow commands, message bodies among them: the relay
refuses a Redis whose slow log is on unless `--allow-slowlog`, and says so in its policy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import trio
from relay_fixtures import SECRET, RelayFactory, http

from relay.embedded import EmbeddedServer, free_loopback_port
from relay.errors import UnsafeRedis

pytest_plugins = ["relay_fixtures"]


@pytest.fixture
def slowlogging(redis_server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    """A private server of the test's kind with the slow log on (Debian's default)."""
    extra = ("--slowlog-log-slower-than", "10000")
    with EmbeddedServer(binary=redis_server.binary, extra_args=extra) as server:
        yield server


async def policy(port: int) -> dict[str, Any]:
    response = await http(port, "/.well-known/relay-policy")
    assert response.status == 200
    result: dict[str, Any] = orjson.loads(response.body)
    return result


async def test_relay_refuses_a_redis_with_the_slow_log_on(slowlogging: EmbeddedServer) -> None:
    args = ["serve", "--port", "0", "--ops-port", "0", "--redis-url", slowlogging.url]
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "relay", *args, "--jwt-secret", SECRET],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 2
    (line,) = done.stderr.decode().strip().splitlines()
    assert "slowlog-log-slower-than" in line and "--allow-slowlog" in line, line


async def test_allowed_slow_log_is_reported_in_the_policy(
    make_relay: RelayFactory, slowlogging: EmbeddedServer
) -> None:
    with pytest.raises(UnsafeRedis):
        await make_relay(redis_url=slowlogging.url)
    relay = await make_relay(
        redis_url=slowlogging.url, allow_slowlog=True, ops_port=free_loopback_port()
    )
    assert (await policy(relay.ops_port))["redis"]["slowlog"] == "on (allowed by --allow-slowlog)"


async def test_policy_reports_the_slow_log_off(make_relay: RelayFactory) -> None:
    relay = await make_relay(ops_port=free_loopback_port())
    redis = (await policy(relay.ops_port))["redis"]
    assert (redis["slowlog"], redis["persistence"], redis["eviction"]) == ("off", "off", "off")
