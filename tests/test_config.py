"""Configuration: flags over environment over TOML file over defaults, and key files in use."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from relay_fixtures import DEADLINE_S, RelayFactory

from relay.client import open_relay
from relay.config import Config, add_arguments, load

pytest_plugins = ["relay_fixtures"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_when_nothing_is_given() -> None:
    config = load(parse([]), environ={})
    assert config == Config()
    assert (config.retention_s, config.max_body_bytes, config.key_prefix) == (
        604800,
        65536,
        "relay:",
    )


def test_flags_win_over_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    file = tmp_path / "relay.toml"
    file.write_text('port = 1111\nmax-inflight = 7\nretention = "2h"\nkey_prefix = "f:"\n')
    environ = {"RELAY_PORT": "2222", "RELAY_MAX_INFLIGHT": "8"}
    config = load(parse(["--config", str(file), "--port", "3333"]), environ=environ)
    assert config.port == 3333  # flag
    assert config.max_inflight == 8  # environment
    assert config.retention_s == 7200  # file, a duration
    assert config.key_prefix == "f:"  # file, with an underscore name


def test_durations_and_repeatable_options_from_the_environment() -> None:
    environ = {
        "RELAY_RETENTION": "90s",
        "RELAY_IDLE_TIMEOUT": "15m",
        "RELAY_ALLOWED_ORIGIN": "https://a.example, https://b.example",
        "RELAY_ALLOW_EVICTION": "yes",
        "RELAY_RATE_LIMIT": "50/s",
    }
    config = load(parse([]), environ=environ)
    assert config.retention_s == 90
    assert config.idle_timeout_s == 900.0
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert config.allow_eviction is True
    assert config.rate_limit_per_s == 50.0


def test_repeatable_flags_collect_every_value() -> None:
    config = load(
        parse(["--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example"]),
        environ={},
    )
    assert config.allowed_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RELAY_RETENTION": "7 days"}, "RELAY_RETENTION"),
        ({"RELAY_PORT": "http"}, "RELAY_PORT"),
        ({"RELAY_MAX_INFLIGHT": "0"}, "max_inflight must be positive"),
        ({"RELAY_TLS_CERT": "cert.pem"}, "--tls-cert and --tls-key go together"),
        ({"RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT"),
    ],
)
def test_a_bad_value_is_refused_with_its_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load(parse([]), environ=environ)


def test_an_unknown_file_option_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "relay.toml"
    file.write_text("max-body = 10\n")
    with pytest.raises(ValueError, match="unknown option 'max-body'"):
        load(parse(["--config", str(file)]), environ={})


def test_a_bad_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        parse(["--retention", "forever"])
    assert usage.value.code == 2
    assert "invalid duration" in capsys.readouterr().err


def test_frame_limit_leaves_room_for_a_fully_escaped_body() -> None:
    config = Config(max_body_bytes=1000)
    assert config.frame_limit_bytes >= 6 * 1000


async def test_jwt_public_key_file_verifies_eddsa_tokens(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem)
    relay = await make_relay(jwt_secret=None, jwt_public_keys=(str(key_file),))
    now = int(time.time())
    token = jwt.encode({"sub": "ed", "iat": now, "exp": now + 60}, private, algorithm="EdDSA")
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token) as client:
            assert client.welcome["mailbox"] == "ed"


def test_sizes_accept_units_like_durations() -> None:
    environ = {"RELAY_MAX_MAILBOX_BYTES": "64MiB"}
    config = load(parse(["--max-body-bytes", "512KiB"]), environ=environ)
    assert (config.max_body_bytes, config.max_mailbox_bytes) == (512 * 1024, 64 * 1024 * 1024)
    assert load(parse(["--max-body-bytes", "1000"]), environ={}).max_body_bytes == 1000
    with pytest.raises(SystemExit):
        parse(["--max-body-bytes", "64MB"])


def test_short_jwt_secret_and_foreign_redis_url_are_refused_while_loading() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        load(parse(["--jwt-secret", "short"]), environ={})
    with pytest.raises(ValueError, match="redis://") as refused:
        load(parse(["--redis-url", "http://user:hunter2@host/0"]), environ={})
    assert "hunter2" not in str(refused.value)
