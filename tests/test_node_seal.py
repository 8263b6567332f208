"""seal.js in Node, when its WebCrypto has X25519 and Ed25519 (Node 20+; skipped otherwise):
the known answers, bodies sealed in Python opened in Node and the other way, tampering; the
script is tests/node/seal_test.mjs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
import trio

from relay import seal

NODE_DEADLINE_S = 25.0
HERE = Path(__file__).parent
PROBE = """crypto.subtle.generateKey({name: "X25519"}, true, ["deriveBits"])
  .then(() => crypto.subtle.generateKey({name: "Ed25519"}, true, ["sign"]))
  .then(() => process.exit(0), () => process.exit(1));"""


def _node_with_curves() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    probe = subprocess.run([node, "-e", PROBE], capture_output=True, check=False)
    return node if probe.returncode == 0 else None


async def test_seal_js_in_node_agrees_with_relay_seal(tmp_path: Path) -> None:
    node = _node_with_curves()
    if node is None:
        pytest.skip("no node whose WebCrypto has X25519 and Ed25519 on the PATH (Node 20+)")
    alice, bob = seal.Identity.generate("alice"), seal.Identity.generate("bob")
    context = seal.Context("alice", "bob")
    exchange = tmp_path / "exchange.json"
    exchange.write_bytes(
        orjson.dumps(
            {
                "alice": alice.to_json(),
                "bob": bob.to_json(),
                "fromPython": seal.seal("from python ✓", bob.public, alice, context),
            }
        )
    )
    script = HERE / "node" / "seal_test.mjs"
    with trio.fail_after(NODE_DEADLINE_S):
        result = await trio.run_process(
            [node, str(script), str(HERE / "seal_vectors.json"), str(exchange)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert "all ok" in output
    [line] = [line for line in result.stdout.splitlines() if line.startswith(b"{")]
    sealed = orjson.loads(line)["forPython"]
    assert seal.open(sealed, bob, alice.public, context) == "from node ✓"
