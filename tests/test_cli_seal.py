"""Sealed messages on the command line, the README way: `relay keygen` for each side, `relay
send --key --seal-to`, `relay listen --key --trust`, each a process of its own against a relay
process; what Redis holds meanwhile is ciphertext only."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import trio
from process_fixtures import cli_identity, relay_process, run_cli
from relay_fixtures import keys_under, poll_until, token, unique

from relay.redis.admin import RedisClient
from relay.seal import Identity, PublicKey

pytest_plugins = ["relay_fixtures"]

CLI_DEADLINE_S = 30.0


async def relay_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CLI_DEADLINE_S):
        return await run_cli(*args)


def lines(result: subprocess.CompletedProcess[bytes]) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace")


async def keygen(tmp_path: Path, mailbox: str) -> tuple[str, str]:
    """`relay keygen DIR/MAILBOX.key --as MAILBOX`: the identity file and the public-key file."""
    path = tmp_path / f"{mailbox}.key"
    result = await relay_cli("keygen", str(path), "--as", mailbox)
    assert result.returncode == 0, stderr(result)
    return str(path), str(path) + ".pub"


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A client whose replies stay bytes (DUMP's are no text)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def stored_values(client: redis.Redis, prefix: str, mailbox: str) -> list[bytes]:
    """GET and DUMP of every message key of `mailbox`."""
    keys = client.scan_iter(match=f"{prefix}{{{mailbox}}}:msg:*")
    values = [value for key in keys for value in (client.get(key), client.dump(key))]
    return [value for value in values if isinstance(value, bytes)]


async def test_keygen_writes_a_private_file_for_you_only_and_a_public_one(tmp_path: Path) -> None:
    path = tmp_path / "alice.key"
    result = await relay_cli("keygen", str(path), "--as", "alice")
    assert result.returncode == 0, stderr(result)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    identity = Identity.from_json(await trio.Path(path).read_bytes())
    public = PublicKey.from_json(await trio.Path(f"{path}.pub").read_bytes())
    assert identity.mailbox == "alice" and public == identity.public
    assert PublicKey.from_json(result.stdout) == public  # printed, to copy and paste
    before = path.read_bytes()
    again = await relay_cli("keygen", str(path))
    assert again.returncode == 2 and "exists" in stderr(again)
    assert path.read_bytes() == before


async def test_a_sealed_message_from_keygen_to_listen_in_separate_processes(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> None:
    alice_key, alice_pub = await keygen(tmp_path, "alice")
    bob_key, bob_pub = await keygen(tmp_path, "bob")
    secret = f"meet at noon {unique('x')}"
    async with relay_process(redis_url, prefix, tmp_path / "relay.log") as relay:
        sent = await relay_cli(
            "send", *cli_identity(relay, "alice"), "--key", alice_key, "--seal-to", bob_pub, secret
        )
        assert sent.returncode == 0, stderr(sent)
        assert list(lines(sent)[0]["ids"]) == ["bob"]  # type: ignore[call-overload]
        stored = stored_values(raw_redis, prefix, "bob")
        assert len(stored) == 2  # GET and DUMP of the one message
        assert any(b"x25519-hkdf-sha256-aes256gcm-ed25519" in value for value in stored)
        assert not any(b"meet at noon" in value for value in stored), stored

        heard = await relay_cli(
            "listen",
            *cli_identity(relay, "bob"),
            "--key",
            bob_key,
            "--trust",
            alice_pub,
            "--count",
            "1",
        )
        assert heard.returncode == 0, stderr(heard)
        [line] = lines(heard)
        assert line["from"] == "alice" and line["body"] == secret and line["sealed"] is True
        with trio.fail_after(CLI_DEADLINE_S):  # acked as listen closed: gone
            await poll_until(lambda: stored_values(raw_redis, prefix, "bob") == [])
    assert secret not in relay.log()


async def test_listen_reports_what_does_not_open_without_its_body(
    redis_url: str, prefix: str, tmp_path: Path, redis_client: RedisClient
) -> None:
    _, alice_pub = await keygen(tmp_path, "alice")
    mallory_key, _ = await keygen(tmp_path, "mallory")
    bob_key, bob_pub = await keygen(tmp_path, "bob")
    async with relay_process(redis_url, prefix, tmp_path / "relay.log") as relay:
        for args in (
            ["--as", "mallory", "--key", mallory_key, "--seal-to", bob_pub, "sealed by mallory"],
            ["--as", "alice", "--to", "bob", "plain text from alice"],
        ):
            sent = await relay_cli("send", *cli_identity(relay, "x")[:4], *args)
            assert sent.returncode == 0, stderr(sent)
        heard = await relay_cli(
            "listen",
            *cli_identity(relay, "bob"),
            "--key",
            bob_key,
            "--trust",
            f"alice={alice_pub}",
            "--count",
            "2",
        )
        assert heard.returncode == 0, stderr(heard)
        got = lines(heard)
        assert [(line["from"], line["unopened"]) for line in got] == [
            ("mallory", "unknown_sender"),
            ("alice", "malformed"),
        ]
        assert all("body" not in line for line in got)
        assert "did not open" in stderr(heard)
        with trio.fail_after(CLI_DEADLINE_S):  # reported, and acked
            await poll_until(lambda: keys_under(redis_client, f"{prefix}{{bob}}:msg:") == [])


async def test_keys_that_do_not_fit_are_one_line_errors(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    alice_key, _ = await keygen(tmp_path, "alice")
    bob_key, bob_pub = await keygen(tmp_path, "bob")
    unnamed = tmp_path / "unnamed.pub"
    unnamed.write_text(Identity.generate().public.to_json())
    async with relay_process(redis_url, prefix, tmp_path / "relay.log") as relay:
        usage: dict[str, list[str]] = {
            "go together": ["send", *cli_identity(relay, "alice"), "--seal-to", bob_pub, "x"],
            "not --as's": [
                "send",
                *cli_identity(relay, "mallory"),
                "--key",
                alice_key,
                "--seal-to",
                bob_pub,
                "x",
            ],
            "send to it alone": [
                "send",
                *cli_identity(relay, "alice"),
                "--key",
                alice_key,
                "--seal-to",
                bob_pub,
                "--to",
                "carol",
                "x",
            ],
            "--key and --trust": ["listen", *cli_identity(relay, "bob"), "--key", bob_key],
            "names no mailbox": [
                "listen",
                *cli_identity(relay, "bob"),
                "--key",
                bob_key,
                "--trust",
                str(unnamed),
            ],
        }
        for expected, args in usage.items():
            result = await relay_cli(*args)
            assert result.returncode == 2, (expected, stderr(result))
            assert expected in stderr(result) and len(stderr(result).splitlines()) == 1, stderr(
                result
            )
        # Only the welcome says whose a ready token is: alice's keys, mallory's token.
        mismatch = await relay_cli(
            "send",
            "--url",
            relay.url,
            "--token",
            token("mallory"),
            "--key",
            alice_key,
            "--seal-to",
            bob_pub,
            "x",
        )
        assert mismatch.returncode == 1
        assert "cannot seal" in stderr(mismatch) and len(stderr(mismatch).splitlines()) == 1
