"""The policy document: the promise as this deployment keeps it, served at
`/.well-known/relay-policy` on the WebSocket port and on the ops port, byte for byte the same.

Everything in it is fixed at startup (configuration, and the Redis settings as the startup
check read them) except the storage's epoch, which lives in Redis. `PolicyDocument.follow_epoch`
reads it (a plain GET, never a write) every EPOCH_POLL_S and re-renders the document when it
changed, so answering a request only returns bytes already made: no Redis round trip, no
waiting. The epoch is null until the first session of a fresh Redis has made one.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson
import redis
import trio

from relay import PROTOCOL_VERSION, __version__
from relay.config import Config
from relay.errors import RelayError
from relay.redis.checks import RedisSettings, Verdict, redis_allowances, verdicts
from relay.redis.pump import RedisPump
from relay.web_routes import WebFile

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
EPOCH_POLL_S = 1.0


def policy(config: Config, settings: RedisSettings, epoch: str | None) -> dict[str, Any]:
    """The promise, as this deployment keeps it. The limits a session's `welcome` states
    (retention_s, max_body_bytes, max_frame_bytes, max_inflight, epoch) carry the same
    names and values here, so anyone can compare the two (`relay probe` does)."""
    verdict = verdicts(settings, redis_allowances(config))
    return {
        "protocol": f"relay.v{PROTOCOL_VERSION}",
        "version": __version__,
        "retention_s": config.retention_s,
        "max_ttl_s": config.retention_s,
        "max_body_bytes": config.max_body_bytes,
        "max_frame_bytes": config.deliver_frame_bytes,
        "max_inflight": config.max_inflight,
        "message_deleted_on": ["ack", "ttl"],
        "dedupe_window_s": min(config.dedupe_window_s, config.retention_s),
        "epoch": epoch,
        "redis": {
            "persistence": _state(
                [verdict["save"], verdict["appendonly"]], "--allow-persistent-redis"
            ),
            "maxmemory_policy": settings.maxmemory_policy or "unverified",
            "eviction": _state([verdict["maxmemory-policy"]], "--allow-eviction"),
            "slowlog": _state([verdict["slowlog-log-slower-than"]], "--allow-slowlog"),
        },
        "bodies_logged": False,
        "mailboxes_in_logs": "plain (debug logging)"
        if config.log_level == "debug"
        else "keyed hash",
    }


def _state(verdicts: list[Verdict], flag: str) -> str:
    """One policy entry from the startup check's verdicts (a violation never gets this far):
    one setting known unsafe makes it on, whatever the others could not tell."""
    if "allowed" in verdicts:
        return f"on (allowed by {flag})"
    if "unverified" in verdicts:
        return "unverified"
    return "off"


class PolicyDocument:
    """The rendered document, re-rendered only when the epoch changes."""

    def __init__(self, config: Config, settings: RedisSettings) -> None:
        self._config = config
        self._settings = settings
        self._epoch_key = config.key_prefix + "epoch"
        self._epoch: str | None = None
        self._file = self._render()

    def file(self) -> WebFile:
        """The document as served on the WebSocket port (body, type, ETag)."""
        return self._file

    def body(self) -> bytes:
        return self._file.body

    def set_epoch(self, epoch: str | None) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._file = self._render()

    def _render(self) -> WebFile:
        body = orjson.dumps(
            policy(self._config, self._settings, self._epoch), option=orjson.OPT_INDENT_2
        )
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        return WebFile(body, CONTENT_TYPE, etag)

    async def follow_epoch(
        self, pump: RedisPump, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the epoch current: read once before reporting started, then every
        EPOCH_POLL_S. While Redis does not answer, the last epoch read stays."""
        await self._read_epoch(pump)
        task_status.started()
        while True:
            await trio.sleep(EPOCH_POLL_S)
            await self._read_epoch(pump)

    async def _read_epoch(self, pump: RedisPump) -> None:
        try:
            epoch = await pump.execute("GET", self._epoch_key)
        except (redis.RedisError, RelayError) as exc:
            log.debug("policy document: epoch not read: %s", type(exc).__name__)
            return
        self.set_epoch(None if epoch is None else str(epoch))
