"""The admin paths through Sentinel: `connect` asks a Sentinel for the primary, and the
checks and `relay audit` name it. One Debian redis-sentinel watches one redis-server."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import redis

from relay.audit import audit
from relay.cli import main
from relay.embedded import EmbeddedServer, die_with_parent, free_loopback_port, wait_until
from relay.redis.admin import connect, node_name
from relay.redis.checks import read_node_settings

PASSWORD = "pw-of-the-primary"


@pytest.fixture
def sentinel_url() -> Iterator[tuple[str, int]]:
    """A `redis+sentinel://` URL with the primary's password, and the primary's port."""
    binary, server = shutil.which("redis-sentinel"), shutil.which("redis-server")
    if binary is None or server is None:
        pytest.skip("redis-sentinel or redis-server is not installed")
    with EmbeddedServer(binary=server, port=free_loopback_port()) as primary:
        assert primary.port is not None
        with redis.Redis(unix_socket_path=primary.socket_path) as setup:
            setup.config_set("requirepass", PASSWORD)
        folder = tempfile.mkdtemp(prefix="relay-sentinel-")
        port = free_loopback_port()
        conf = os.path.join(folder, "sentinel.conf")
        with open(conf, "w") as file:
            file.write(
                f'port {port}\nbind 127.0.0.1\ndaemonize no\nlogfile ""\ndir {folder}\n'
                f"sentinel monitor main 127.0.0.1 {primary.port} 1\n"
                f"sentinel auth-pass main {PASSWORD}\n"
            )
        sentinel = subprocess.Popen(
            [binary, conf], stdout=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        try:
            wait_until("the Sentinel comes up", lambda: _knows_primary(port), 10)
            yield f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/main", primary.port
        finally:
            sentinel.terminate()
            sentinel.wait(10)
            shutil.rmtree(folder, ignore_errors=True)


def _knows_primary(port: int) -> bool:
    try:
        with redis.Redis("127.0.0.1", port, socket_timeout=1) as sentinel:
            return (
                sentinel.execute_command("SENTINEL", "get-master-addr-by-name", "main") is not None
            )
    except redis.ConnectionError:
        return False


def test_admin_connect_through_sentinel_names_the_primary(
    sentinel_url: tuple[str, int], prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url, port = sentinel_url
    with connect(url) as client:
        assert isinstance(client, redis.Redis)
        assert client.ping()
        assert node_name(client) == f"127.0.0.1:{port}"
        assert [n.node for n in read_node_settings(client)] == [f"127.0.0.1:{port}"]
        client.set(f"{prefix}{{m}}:stray", "x")
        report = audit(client, prefix, 3600, now_ms=0)
    assert report.violations == (f"127.0.0.1:{port}: 1 keys under {prefix!r} have no TTL",)
    assert main(["audit", "--redis-url", url, "--key-prefix", prefix]) == 1
    assert f"{prefix}{{m}}:stray on 127.0.0.1:{port}" in capsys.readouterr().out

    wrong = url.replace(PASSWORD, "not-the-password")
    assert main(["audit", "--redis-url", wrong, "--key-prefix", prefix]) == 2
    captured = capsys.readouterr()
    assert "cannot audit Redis" in captured.err
    assert "not-the-password" not in captured.out + captured.err
