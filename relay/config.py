"""The relay's configuration: one frozen value built from flags, `RELAY_*` env and a TOML file.

Precedence: command-line flags over environment variables over the TOML file
(`--config FILE`) over defaults. Each option has one name: `--max-body-bytes`
on the command line, `RELAY_MAX_BODY_BYTES` in the environment, and
`max-body-bytes` (or `max_body_bytes`) in the file. Fields carry their unit
in their name (`retention_s`); options that take durations accept `90s`,
`15m`, `2h`, `7d` or plain seconds, and sizes accept `64MiB`, `512KiB` or plain bytes.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import attrs

from relay.auth import HS256_MIN_SECRET_BYTES
from relay.policy import parse_duration, parse_size
from relay.redis import address as redis_address

# Quoted: argparse's class is generic only in typeshed.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@attrs.frozen
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    ops_port: int = 9090  # 0 disables the ops listener
    redis_url: str | None = None  # None: start the embedded Valkey
    jwt_secret: str | None = None
    jwt_public_keys: tuple[str, ...] = ()  # PEM file paths
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    retention_s: int = 7 * 24 * 3600
    dedupe_window_s: int = 600  # an acked message's ref record lives this long (late retries)
    max_body_bytes: int = 64 * 1024
    max_inflight: int = 256
    max_recipients: int = 100
    max_mailbox_messages: int = 10_000
    max_mailbox_bytes: int = 64 * 1024 * 1024
    max_frame_bytes: int = 1024 * 1024  # largest deliver frame sent (one message may exceed it)
    allowed_origins: tuple[str, ...] = ()
    allow_persistent_redis: bool = False
    allow_eviction: bool = False
    allow_slowlog: bool = False
    key_prefix: str = "relay:"
    auth_timeout_s: float = 5.0
    ping_interval_s: float = 20.0
    idle_timeout_s: float = 60.0
    send_timeout_s: float = 10.0
    drain_timeout_s: float = 10.0
    redis_timeout_s: float = 5.0  # a Redis request unanswered this long fails
    backstop_drain_s: float = 30.0
    hub_heartbeat_s: float = 15.0  # PING on the pub/sub connection this often
    hub_unhealthy_after_s: float = 60.0  # /healthz fails when pub/sub is down this long
    rate_limit_per_s: float = 100.0
    rate_burst: int = 200
    max_connections: int = 10_000
    max_connections_per_ip: int = 1_000
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For is believed
    workers: int = 1
    worker_id: int | None = None  # set by the supervisor of --workers
    log_key: str | None = None  # key of the mailbox pseudonyms in logs
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    demo: bool = False  # serve the demo chat page at /demo

    @property
    def frame_limit_bytes(self) -> int:
        """Largest frame accepted: room for a body at its limit even fully JSON-escaped,
        plus the recipient list, so an oversize body is answered `too_large`, not 1009."""
        return 6 * self.max_body_bytes + 64 * 1024

    @property
    def deliver_frame_bytes(self) -> int:
        """Largest frame the relay sends (welcome's max_frame_bytes): the configured
        cap, or room for one message at the body limit when that is larger."""
        return max(self.max_frame_bytes, self.frame_limit_bytes)


def _seconds(text: str) -> float:
    return float(parse_duration(text))


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _rate(text: str) -> float:
    value = float(text.removesuffix("/s"))
    if value <= 0:
        raise ValueError(f"a rate must be positive, got {text!r}")
    return value


def _network(text: str) -> str:
    ipaddress.ip_network(text, strict=False)  # raises ValueError with the reason
    return text


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return text.lower()

    return parse


@attrs.frozen
class Option:
    flag: str  # without the leading dashes
    field: str
    parse: Callable[[str], Any]
    help: str
    repeatable: bool = False
    boolean: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("host", "host", str, "address to listen on"),
    Option("port", "port", int, "WebSocket port"),
    Option("ops-port", "ops_port", int, "port of /healthz /readyz /metrics; 0 disables"),
    Option(
        "redis-url",
        "redis_url",
        str,
        "redis://, rediss://, unix://, redis+cluster://host:port,… or "
        "redis+sentinel://host:port,…/MASTER-NAME URL",
    ),
    Option("jwt-secret", "jwt_secret", str, "HS256 shared secret for tokens"),
    Option(
        "jwt-public-key",
        "jwt_public_keys",
        str,
        "PEM public key file (EdDSA, ES256, RS256)",
        repeatable=True,
    ),
    Option("jwt-audience", "jwt_audience", str, "required `aud` of tokens"),
    Option("jwt-issuer", "jwt_issuer", str, "required `iss` of tokens"),
    Option("retention", "retention_s", parse_duration, "longest time a message is kept (e.g. 7d)"),
    Option(
        "dedupe-window",
        "dedupe_window_s",
        parse_duration,
        "how long a delivered message's ref is remembered for retries (e.g. 10m)",
    ),
    Option("max-body-bytes", "max_body_bytes", parse_size, "largest message body in UTF-8 bytes"),
    Option("max-inflight", "max_inflight", int, "delivered-but-unacked messages per session"),
    Option("max-recipients", "max_recipients", int, "recipients of one send"),
    Option("max-mailbox-messages", "max_mailbox_messages", int, "messages waiting per mailbox"),
    Option("max-mailbox-bytes", "max_mailbox_bytes", parse_size, "bytes waiting per mailbox"),
    Option(
        "max-frame-bytes", "max_frame_bytes", parse_size, "largest deliver frame sent to a client"
    ),
    Option(
        "allowed-origin",
        "allowed_origins",
        str,
        "allowed Origin of browser handshakes",
        repeatable=True,
    ),
    Option(
        "allow-persistent-redis",
        "allow_persistent_redis",
        _bool,
        "run against a Redis that persists to disk",
        boolean=True,
    ),
    Option(
        "allow-eviction",
        "allow_eviction",
        _bool,
        "run against a Redis that may evict keys",
        boolean=True,
    ),
    Option(
        "allow-slowlog",
        "allow_slowlog",
        _bool,
        "run against a Redis whose slow log is on (it may keep message bodies)",
        boolean=True,
    ),
    Option("key-prefix", "key_prefix", str, "prefix of every Redis key the relay writes"),
    Option("auth-timeout", "auth_timeout_s", _seconds, "time allowed for the auth frame"),
    Option("ping-interval", "ping_interval_s", _seconds, "WebSocket ping interval"),
    Option("idle-timeout", "idle_timeout_s", _seconds, "close a connection silent for this long"),
    Option(
        "send-timeout",
        "send_timeout_s",
        _seconds,
        "close a client that does not read for this long",
    ),
    Option("drain-timeout", "drain_timeout_s", _seconds, "time sessions get to close on shutdown"),
    Option("redis-timeout", "redis_timeout_s", _seconds, "time a Redis request may take"),
    Option(
        "backstop-drain", "backstop_drain_s", _seconds, "period of the safety re-read of mailboxes"
    ),
    Option("hub-heartbeat", "hub_heartbeat_s", _seconds, "PING period of the pub/sub connection"),
    Option(
        "hub-unhealthy-after",
        "hub_unhealthy_after_s",
        _seconds,
        "/healthz fails once pub/sub has been down this long",
    ),
    Option("rate-limit", "rate_limit_per_s", _rate, "frames a second per connection (e.g. 100/s)"),
    Option("rate-burst", "rate_burst", int, "frames a connection may send at once above the rate"),
    Option("max-connections", "max_connections", int, "connections per process; more get HTTP 503"),
    Option(
        "max-connections-per-ip",
        "max_connections_per_ip",
        int,
        "connections per client address; more get HTTP 429",
    ),
    Option(
        "trusted-proxy",
        "trusted_proxies",
        _network,
        "CIDR of a proxy whose X-Forwarded-For is believed",
        repeatable=True,
    ),
    Option("workers", "workers", int, "relay processes sharing the port (SO_REUSEPORT)"),
    Option(
        "log-key",
        "log_key",
        str,
        "key of the keyed hash that names mailboxes in logs (default: random per process)",
    ),
    Option("tls-cert", "tls_cert", str, "PEM certificate: serve wss:// directly"),
    Option("tls-key", "tls_key", str, "PEM private key for --tls-cert"),
    Option("log-level", "log_level", _choice("debug", "info", "warning", "error"), "log level"),
    Option("log-format", "log_format", _choice("text", "json"), "log line format"),
    Option("demo", "demo", _bool, "serve the demo chat page at /demo", boolean=True),
)


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse shows an ArgumentTypeError's own message, and hides a ValueError's."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_arguments(parser: argparse.ArgumentParser, flags: Iterable[str] | None = None) -> None:
    """Add the options (all, or those named) as flags whose absence leaves the attribute unset."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with options (env RELAY_CONFIG)"
    )
    for option in OPTIONS:
        if flags is not None and option.flag not in flags:
            continue
        if option.boolean:
            parser.add_argument(
                f"--{option.flag}",
                dest=option.field,
                action="store_true",
                default=argparse.SUPPRESS,
                help=option.help,
            )
        else:
            parser.add_argument(
                f"--{option.flag}",
                dest=option.field,
                type=argparse_type(option.parse),
                action="append" if option.repeatable else "store",
                default=argparse.SUPPRESS,
                help=option.help,
            )


def load(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Merge file, environment and flags into a Config; raise ValueError on a bad value."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = getattr(args, "config", None) or environ.get("RELAY_CONFIG")
    if path:
        values.update(_from_file(path))
    values.update(_from_env(environ))
    values.update({o.field: getattr(args, o.field) for o in OPTIONS if hasattr(args, o.field)})
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    config = Config(**values)
    _validate(config)
    return config


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option in OPTIONS:
        name = "RELAY_" + option.flag.upper().replace("-", "_")
        if name not in environ:
            continue
        raw = environ[name]
        try:
            if option.repeatable:
                values[option.field] = [
                    option.parse(p.strip()) for p in raw.split(",") if p.strip()
                ]
            else:
                values[option.field] = option.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return values


def _from_file(path: str) -> dict[str, Any]:
    with open(path, "rb") as file:
        table = tomllib.load(file)
    by_name = {o.flag: o for o in OPTIONS} | {o.flag.replace("-", "_"): o for o in OPTIONS}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        option = by_name.get(key)
        if option is None:
            raise ValueError(f"{path}: unknown option {key!r}")
        try:
            if option.repeatable:
                items = raw if isinstance(raw, list) else [raw]
                values[option.field] = [option.parse(str(item)) for item in items]
            elif isinstance(raw, bool):
                values[option.field] = raw
            else:
                values[option.field] = option.parse(str(raw))
        except ValueError as exc:
            raise ValueError(f"{path}: {key}: {exc}") from None
    return values


def _validate(config: Config) -> None:
    positive = (
        "rate_limit_per_s",
        "rate_burst",
        "max_connections",
        "max_connections_per_ip",
        "workers",
        "retention_s",
        "dedupe_window_s",
        "max_body_bytes",
        "max_inflight",
        "max_recipients",
        "max_mailbox_messages",
        "max_mailbox_bytes",
        "max_frame_bytes",
        "redis_timeout_s",
    )
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if not 0 <= config.port < 65536 or not 0 <= config.ops_port < 65536:
        raise ValueError("ports must be between 0 and 65535")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.idle_timeout_s <= 0 or config.ping_interval_s <= 0:
        raise ValueError("ping interval and idle timeout must be positive")
    if config.jwt_secret is not None and len(config.jwt_secret.encode()) < HS256_MIN_SECRET_BYTES:
        raise ValueError(f"--jwt-secret must be at least {HS256_MIN_SECRET_BYTES} bytes")
    if config.redis_url is not None:
        redis_address.parse(config.redis_url)  # a ValueError names no password
