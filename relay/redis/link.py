"""One node's connection as the pump uses it: pipelines, the failure model, scripts.

A pipeline's commands are written as one write and their replies read in
order, within `timeout_s`. On a failure the connection is thrown away (never
reused with replies owed) and each command still owed a reply is answered
StorageUnavailable when it was never written (no connection, the login timed
out) or Unconfirmed once it was (Redis may have run it). A script the node
does not know (NOSCRIPT: a restart, SCRIPT FLUSH, a promoted replica) is
loaded on that node and run again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
import trio

from relay.errors import StorageUnavailable, Unconfirmed
from relay.redis.connection import ConnectionLost, RedisConnection, pack

Opener = Callable[[], Awaitable[RedisConnection]]


class NodeLink:
    """The pump's connection to one node, opened on first use and after each failure."""

    def __init__(self, label: str, opener: Opener, *, timeout_s: float) -> None:
        self.label = label  # "host:port", or what names the node in messages
        self._open = opener
        self._timeout_s = timeout_s
        self._connection: RedisConnection | None = None
        self.broken: str | None = None  # why the last pipeline lost its connection
        self.stale = False  # set when the node is known to have changed: reconnect

    async def run(self, packed: list[bytes], sources: Sequence[str | None]) -> list[Any]:
        """Run packed commands (`sources[k]`: the Lua source of command k when it is a
        script call) and return their replies, errors as values."""
        replies = await self._pipeline(packed)
        missing = [
            k
            for k, reply in enumerate(replies)
            if isinstance(reply, redis.exceptions.NoScriptError) and sources[k] is not None
        ]
        if missing:
            loads = [pack(("SCRIPT", "LOAD", s)) for s in {sources[k] for k in missing}]
            again = await self._pipeline(loads + [packed[k] for k in missing])
            for k, reply in zip(missing, again[len(loads) :], strict=True):
                replies[k] = reply
        return replies

    async def _pipeline(self, packed: list[bytes]) -> list[Any]:
        if not packed:
            return []
        replies: list[Any] = []
        written = False
        try:
            with trio.fail_after(self._timeout_s):
                connection = await self._connected()
                written = True  # from here on Redis may run any of them
                await connection.send(b"".join(packed))
                while len(replies) < len(packed):
                    replies.append(await connection.reply())
                return replies
        except (
            ConnectionLost,
            OSError,
            trio.TooSlowError,
            redis.RedisError,
            StorageUnavailable,  # no Sentinel named a primary that answers as one
        ) as exc:
            await self.discard()
            self.broken = why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            error: Exception = (
                Unconfirmed(f"Redis did not confirm the request ({why}); it may have been stored")
                if written
                else StorageUnavailable(f"Redis unavailable: {why}")
            )
            return replies + [error] * (len(packed) - len(replies))
        except BaseException:
            await self.discard()  # cancelled mid-batch: replies are owed on it
            raise

    async def _connected(self) -> RedisConnection:
        connection = self._connection
        # A connection whose end is already seen (a Redis restart, a proxy's idle
        # timeout) is not written to: what is written there ends up unconfirmed.
        if connection is not None and not self.stale and not connection.looks_closed():
            return connection
        self.stale = False
        await self.discard()
        self._connection = await self._open()
        return self._connection

    async def discard(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.aclose()
