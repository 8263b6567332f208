"""`relay serve --workers N` gives up, exiting 2, on a worker that can never start
(here: a Redis whose slow log is on), instead of restarting it every second forever."""

from __future__ import annotations

import trio
from process_fixtures import run_cli
from relay_fixtures import SECRET

from relay.embedded import EmbeddedServer, free_loopback_port

GIVE_UP_S = 60.0  # three quick deaths of two workers, with backoff, on a small machine


async def test_workers_give_up_on_a_worker_that_cannot_start() -> None:
    with EmbeddedServer(extra_args=("--slowlog-log-slower-than", "10000")) as redis:
        args = ["serve", "--workers", "2", "--port", str(free_loopback_port()), "--ops-port", "0"]
        args += ["--redis-url", redis.url, "--jwt-secret", SECRET]
        with trio.fail_after(GIVE_UP_S):
            done = await run_cli(*args)
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    assert done.returncode == 2, lines
    assert "giving up" in lines[-1] and lines[-1].startswith("relay serve: worker"), lines
    assert any("slowlog-log-slower-than" in line for line in lines), lines
    assert "Traceback" not in done.stderr.decode(errors="replace")
