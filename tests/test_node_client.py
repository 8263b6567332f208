"""relay.js in Node, when a Node with a global WebSocket is on the PATH (skipped otherwise):
the module's behaviour (not the UI) against a real relay; the script is tests/node/module_test.mjs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from relay_fixtures import RelayFactory, token

from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]

NODE_DEADLINE_S = 50.0


def _node_with_websocket() -> list[str] | None:
    """The command that runs Node with a global WebSocket, or None."""
    node = shutil.which("node")
    if node is None:
        return None
    for flags in ([], ["--experimental-websocket"]):
        probe = subprocess.run(
            [node, *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return [node, *flags]
    return None


async def test_the_module_in_node(relay: RunningRelay, make_relay: RelayFactory) -> None:
    command = _node_with_websocket()
    if command is None:
        pytest.skip("no node with a global WebSocket on the PATH (22+, or 20 with a flag)")
    limited = await make_relay(rate_limit_per_s=0.5, rate_burst=10)  # over the burst: refused
    script = Path(__file__).parent / "node" / "module_test.mjs"
    tokens = [token("alice-n"), token("bob-n"), token("bob-n"), token("dan-n"), token("eve-n")]
    with trio.fail_after(NODE_DEADLINE_S):
        result = await trio.run_process(
            [*command, str(script), relay.url, *tokens, limited.url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert "all ok" in output
    refused = limited.services.metrics.registry.get_sample_value(
        "relay_requests_rejected_total", {"code": "rate_limited"}
    )
    assert refused is not None and refused >= 3, output
