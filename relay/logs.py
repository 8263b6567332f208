"""Logging set-up, and the pseudonyms under which logs name mailboxes.

Logs never carry message bodies or tokens. Mailbox ids appear only as a keyed
hash (HMAC-SHA256 with a key made per process unless configured), so a log
line can be correlated within a run but not traced back to a user; with
debug logging on, ids are shown as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sys

import orjson

_key = secrets.token_bytes(32)
_plain = False

# Libraries whose DEBUG lines carry frames or replies, and so bodies and tokens:
# held at INFO whatever the root level, from the moment the relay is imported.
PAYLOAD_LOGGERS = ("trio-websocket", "redis")
for _name in PAYLOAD_LOGGERS:
    logging.getLogger(_name).setLevel(logging.INFO)


def pseudonym(mailbox: str) -> str:
    if _plain:
        return mailbox
    return "m-" + hmac.new(_key, mailbox.encode(), hashlib.sha256).hexdigest()[:12]


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(
    level: str = "info",
    fmt: str = "text",
    pseudonym_key: str | None = None,
    worker: int | None = None,
) -> None:
    """Configure the root logger; called once, by the command line only."""
    global _key, _plain
    if pseudonym_key is not None:
        _key = pseudonym_key.encode()
    _plain = level == "debug"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        where = "" if worker is None else f" worker={worker}"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
