"""Batch Redis commands from many Trio tasks into pipelines on one Trio-native connection.

Callers `await pump.execute(...)`; one pump task takes every command pending
at that moment, writes them as one pipeline, reads the replies in order, and
hands each caller its own. At low load a batch holds one command (one round
trip); under load batches grow while the Trio loop serves WebSockets during
each round trip, and throughput follows. Under load a batch also waits a few
scheduler passes while other tasks keep adding to it (`_next_batch`).

Failure model:
- a command that fails (a Lua error, a wrong type) fails only its own caller;
  a script Redis does not know (NOSCRIPT, after a restart or SCRIPT FLUSH) is
  loaded and run again;
- an argument that cannot be encoded fails only its own caller;
- a broken connection, or a batch whose replies do not come within
  `timeout_s`, throws the connection away (never reused with replies owed)
  and answers each command still owed a reply by what the pump knows of it:
  StorageUnavailable when it was never written (no connection, the login
  timed out), Unconfirmed once it was written (Redis may have run it). A
  batch is never sent twice. The requests queued behind a broken batch fail
  at once with StorageUnavailable, unsent, rather than each waiting out a
  timeout of its own; the next batch opens a fresh connection, so the pump
  recovers by itself once Redis is back;
- a caller cancelled before its batch was sent is dropped from the batch; a
  caller cancelled later does not cancel the command, it only stops waiting.

Commands that carry the same `Merge` key and meet in one batch run as one
command (the store joins the sends to one mailbox into one script run: Redis
then pays its fixed cost per script once). They are concurrent, so no caller
can tell the joined run from separate ones; a failure of the joined command
(an error reply, unconfirmed, unavailable) is each one's failure.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import attrs
import redis
import trio

from relay.errors import StorageUnavailable, Unconfirmed
from relay.redis.connection import ConnectionLost, RedisConnection, pack

log = logging.getLogger(__name__)

COALESCE_PASSES = 4  # scheduler passes a batch waits at most for more requests


@attrs.frozen
class LuaScript:
    """A Lua script, run by SHA and loaded on NOSCRIPT."""

    name: str
    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


@attrs.frozen
class Merge:
    """Commands of one batch with equal `key` may run as `join(those commands)`; its
    reply is the list of their replies, in order, or what `split(reply, count)` turns
    into that list."""

    key: Hashable
    join: Callable[[Sequence[Command]], Command]
    split: Callable[[Any, int], list[Any]] | None = None


@attrs.frozen
class Command:
    """One Redis command, or one script call when `script` is set."""

    args: tuple[Any, ...]
    script: LuaScript | None = None
    merge: Merge | None = None

    @classmethod
    def call(
        cls,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[Any],
        merge: Merge | None = None,
    ) -> Command:
        return cls(("EVALSHA", script.sha, len(keys), *keys, *args), script, merge)


@attrs.define(eq=False)
class _Request:
    commands: Sequence[Command]
    results: list[Any] = attrs.field(factory=list)
    done: trio.Event = attrs.field(factory=trio.Event)
    abandoned: bool = False


@attrs.frozen
class PumpStatistics:
    batches: int
    commands: int
    queued: int
    last_batch_size: int
    last_batch_s: float


BatchObserver = Callable[[int, float], None]


class RedisPump:
    """Runs commands for many tasks, batched. Start `run` in a nursery first."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        max_pending: int = 4096,
        max_batch: int = 1024,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._send, self._receive = trio.open_memory_channel[_Request](max_pending)
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._connection: RedisConnection | None = None
        self._broken: str | None = None  # why the last batch lost its connection
        self._loaded = False  # the last batch held several requests
        self._batches = 0
        self._commands = 0
        self._last_batch_size = 0
        self._last_batch_s = 0.0

    async def execute(self, *args: Any) -> Any:
        """Run one command; return its reply or raise its error."""
        (result,) = await self.execute_many([Command(args)])
        if isinstance(result, Exception):
            raise result
        return result

    async def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script call; return its reply or raise its error."""
        (result,) = await self.execute_many([Command.call(script, keys, args)])
        if isinstance(result, Exception):
            raise result
        return result

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Run several commands in one batch; each result is a reply or an exception."""
        request = _Request(commands)
        try:
            try:
                self._send.send_nowait(request)  # no extra trip through the scheduler
            except trio.WouldBlock:
                await self._send.send(request)  # the queue is full: wait (backpressure)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StorageUnavailable("the Redis pump is not running") from None
        try:
            await request.done.wait()
        except BaseException:
            request.abandoned = True
            raise
        return request.results

    def statistics(self) -> PumpStatistics:
        return PumpStatistics(
            batches=self._batches,
            commands=self._commands,
            queued=self._receive.statistics().current_buffer_used,
            last_batch_size=self._last_batch_size,
            last_batch_s=self._last_batch_s,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pump loop. Cancel it to stop: the batch in flight finishes, queued callers
        get StorageUnavailable."""
        task_status.started()
        try:
            while True:
                batch = await self._next_batch()
                try:
                    # A batch once started runs to its end (bounded by timeout_s), so
                    # its callers learn what happened to commands Redis may have run.
                    with trio.CancelScope(shield=True):
                        await self._run_batch([r for r in batch if not r.abandoned])
                    if self._broken is not None:
                        self._fail_queued(f"Redis unavailable: {self._broken}; not sent")
                        self._broken = None
                finally:
                    for request in batch:
                        if len(request.results) != len(request.commands):
                            request.results = _failed(request, "the Redis pump stopped")
                        request.done.set()
        finally:
            self._send.close()
            self._fail_queued()
            if self._connection is not None:
                await self._connection.aclose()

    async def _next_batch(self) -> list[_Request]:
        """Wait for one request, then take every request pending, up to max_batch.
        Under load (the last batch held several requests), then let the other tasks run
        and take theirs too, until two scheduler passes in a row bring nothing (at most
        COALESCE_PASSES passes): requests that tasks start one after another (a
        session's sends, each starting the next) leave together, in fewer and larger
        pipelines, and a session's sends to one mailbox run as one script. A lone
        request after a quiet spell leaves at once."""
        batch = [await self._receive.receive()]
        size = len(batch[0].commands)
        idle = 0
        for passes in range(COALESCE_PASSES + 1):
            taken = size
            while size < self._max_batch:
                try:
                    request = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                batch.append(request)
                size += len(request.commands)
            idle = idle + 1 if passes and size == taken else 0
            if size >= self._max_batch or passes == COALESCE_PASSES or idle == 2:
                break
            if not self._loaded and len(batch) == 1:
                break
            # The requests taken must be answered: this pass cannot be cancelled.
            await trio.lowlevel.cancel_shielded_checkpoint()
        self._loaded = len(batch) > 1
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        commands = [c for r in batch for c in r.commands]
        if not commands:
            return
        started = time.perf_counter()
        results = await self._execute(commands)
        elapsed = time.perf_counter() - started
        offset = 0
        for request in batch:
            request.results = results[offset : offset + len(request.commands)]
            offset += len(request.commands)
        self._batches += 1
        self._commands += len(commands)
        self._last_batch_size = len(commands)
        self._last_batch_s = elapsed
        if self._on_batch is not None:
            self._on_batch(len(commands), elapsed)

    async def _execute(self, commands: list[Command]) -> list[Any]:
        """One pipeline, then a second for the scripts Redis did not know."""
        results: list[Any] = [None] * len(commands)
        units: list[tuple[Command, list[int]]] = []  # what is sent, and whose reply it is
        packed: list[bytes] = []
        for command, owners in _merged(commands):
            try:
                packed.append(pack(command.args))
                units.append((command, owners))
            except (TypeError, UnicodeError) as exc:  # this command cannot be sent at all
                if len(owners) == 1:
                    results[owners[0]] = redis.DataError(f"cannot encode the command: {exc}")
                    continue
                for i in owners:  # each on its own, so that only the bad one fails
                    try:
                        packed.append(pack(commands[i].args))
                        units.append((commands[i], [i]))
                    except (TypeError, UnicodeError) as exc:
                        results[i] = redis.DataError(f"cannot encode the command: {exc}")
        replies = await self._pipeline(packed)
        missing = [
            k
            for k, reply in enumerate(replies)
            if isinstance(reply, redis.exceptions.NoScriptError)
        ]
        if missing:
            sources = {c.script.source for k in missing if (c := units[k][0]).script}
            loads = [pack(("SCRIPT", "LOAD", source)) for source in sources]
            again = await self._pipeline(loads + [packed[k] for k in missing])
            for k, reply in zip(missing, again[len(loads) :], strict=True):
                replies[k] = reply
        for (_, owners), reply in zip(units, replies, strict=True):
            if len(owners) == 1:
                results[owners[0]] = reply
                continue
            merge = commands[owners[0]].merge
            assert merge is not None
            for i, own in zip(owners, _split(merge, reply, len(owners)), strict=True):
                results[i] = own
        return results

    async def _pipeline(self, packed: list[bytes]) -> list[Any]:
        """Send packed commands on the connection and read their replies. On a failure
        the connection is thrown away and each command still owed a reply is answered
        StorageUnavailable if it was never written, Unconfirmed if it was."""
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
        except (ConnectionLost, OSError, trio.TooSlowError, redis.RedisError) as exc:
            await self._discard()
            self._broken = why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            error: Exception = (
                Unconfirmed(f"Redis did not confirm the request ({why}); it may have been stored")
                if written
                else StorageUnavailable(f"Redis unavailable: {why}")
            )
            return replies + [error] * (len(packed) - len(replies))
        except BaseException:
            await self._discard()  # cancelled mid-batch: replies are owed on it
            raise

    async def _connected(self) -> RedisConnection:
        connection = self._connection
        # A connection whose end is already seen (a Redis restart, a proxy's idle
        # timeout) is not written to: what is written there ends up unconfirmed.
        if connection is not None and not connection.looks_closed():
            return connection
        await self._discard()
        self._connection = await RedisConnection.open(self.url)
        return self._connection

    async def _discard(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.aclose()

    def _fail_queued(self, why: str = "the Redis pump stopped") -> None:
        """Answer every queued request StorageUnavailable: none of it was sent."""
        while True:
            try:
                request = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            request.results = _failed(request, why)
            request.done.set()


def _merged(commands: Sequence[Command]) -> list[tuple[Command, list[int]]]:
    """The commands to send, each with the positions in `commands` it answers: those
    that share a merge key are joined at the place of the first of them."""
    units: list[tuple[Command, list[int]]] = []
    groups: dict[Hashable, list[int]] = {}
    for i, command in enumerate(commands):
        if command.merge is None:
            units.append((command, [i]))
        elif (owners := groups.get(command.merge.key)) is not None:
            owners.append(i)
        else:
            groups[command.merge.key] = owners = [i]
            units.append((command, owners))
    return [
        (command.merge.join([commands[i] for i in owners]), owners)
        if command.merge is not None and len(owners) > 1
        else (command, owners)
        for command, owners in units
    ]


def _split(merge: Merge, reply: Any, count: int) -> list[Any]:
    """The replies of the `count` commands a joined one ran; an error of the joined
    command (or a reply of the wrong shape) is each one's."""
    if isinstance(reply, Exception):
        return [reply] * count
    try:
        parts = merge.split(reply, count) if merge.split is not None else reply
    except Exception as exc:  # a reply the split cannot read
        parts = exc
    if isinstance(parts, list) and len(parts) == count:
        return parts
    error = redis.ResponseError(
        f"a joined command answered {type(reply).__name__}, not {count} replies"
    )
    return [error] * count


def _failed(request: _Request, why: str) -> list[Any]:
    return [StorageUnavailable(why)] * len(request.commands)
