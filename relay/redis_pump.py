"""Batch Redis commands from many Trio tasks into redis-py pipelines run in a worker thread.

redis-py has no Trio client. Measured on our machine class (design.md), the
fastest way to reach Redis from Trio is a single pump task that takes every
command pending at that moment, runs them as one non-transactional pipeline in
a worker thread, and hands each caller its own result. At low load a batch
holds one command (one round trip); under load batches grow, and so does
throughput.

Failure model:
- a command that fails (a Lua error, NOSCRIPT after a reload, a wrong type)
  fails only its own caller;
- a connection error or timeout fails every call of that batch with
  StorageUnavailable; redis-py discards that connection (it is never reused
  with unread replies) and the next batch connects afresh, so the pump
  recovers by itself after a Redis restart;
- a caller cancelled before its batch was sent is dropped from the batch; a
  caller cancelled later does not cancel the command, it only stops waiting.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from relay.errors import StorageUnavailable

RedisClient = redis.Redis | redis.RedisCluster


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
class Command:
    """One Redis command, or one script call when `script` is set."""

    args: tuple[Any, ...]
    script: LuaScript | None = None

    @classmethod
    def call(cls, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Command:
        return cls(("EVALSHA", script.sha, len(keys), *keys, *args), script)


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


def connect(url: str, *, timeout_s: float = 5.0, cluster: bool = False) -> RedisClient:
    """A redis-py client for `redis://`, `rediss://` or `unix://` URLs.

    One retry on a connection error covers a connection that went stale (for
    instance after a Redis restart, or one a proxy closed while idle). The
    commands of a batch whose reply was lost may so run twice: every script
    the relay runs is idempotent for that reason. A timeout is not retried.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "client_name": "relay",
    }
    if cluster:
        return redis.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


class RedisPump:
    """Runs commands for many tasks, batched. Start `run` in a nursery first."""

    def __init__(
        self,
        client: RedisClient,
        *,
        max_pending: int = 4096,
        max_batch: int = 1024,
        batches_in_flight: int = 2,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.client = client
        self._send, self._receive = trio.open_memory_channel[_Request](max_pending)
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._limiter = trio.CapacityLimiter(batches_in_flight)
        self._slots = trio.Semaphore(batches_in_flight)
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
            await self._send.send(request)
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
        """The pump loop. Cancel it to stop; batches in flight finish first."""
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    await self._slots.acquire()
                    try:
                        batch = await self._next_batch()
                    except BaseException:
                        self._slots.release()
                        raise
                    nursery.start_soon(self._run_batch, batch)
        finally:
            self._send.close()
            self._fail_queued()

    async def _next_batch(self) -> list[_Request]:
        """Wait for one request, then take every request already pending, up to max_batch."""
        batch = [await self._receive.receive()]
        size = len(batch[0].commands)
        while size < self._max_batch:
            try:
                request = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            batch.append(request)
            size += len(request.commands)
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        try:
            live = [r for r in batch if not r.abandoned]
            commands = [c for r in live for c in r.commands]
            started = time.perf_counter()
            results = await trio.to_thread.run_sync(
                self._execute_blocking, commands, limiter=self._limiter
            )
            elapsed = time.perf_counter() - started
            offset = 0
            for request in live:
                request.results = results[offset : offset + len(request.commands)]
                offset += len(request.commands)
            self._batches += 1
            self._commands += len(commands)
            self._last_batch_size = len(commands)
            self._last_batch_s = elapsed
            if self._on_batch is not None:
                self._on_batch(len(commands), elapsed)
        finally:
            self._slots.release()
            for request in batch:
                if len(request.results) != len(request.commands):
                    request.results = _failed(request, "the Redis pump stopped")
                request.done.set()

    def _execute_blocking(self, commands: list[Command]) -> list[Any]:
        """Runs in the worker thread: one pipeline, then a retry of NOSCRIPT failures."""
        try:
            results = self._pipeline(commands)
            missing = [
                i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)
            ]
            if missing:
                for source in {c.script.source for i in missing if (c := commands[i]).script}:
                    self.client.script_load(source)
                for i, result in zip(
                    missing, self._pipeline([commands[i] for i in missing]), strict=True
                ):
                    results[i] = result
            return results
        except (redis.DataError, UnicodeError, TypeError):
            # redis-py could not encode some argument, and so sent nothing.
            return self._without_unencodable(commands)
        except redis.RedisError as exc:
            # The whole batch failed at the connection level; redis-py already
            # dropped the connection, so the next batch starts on a fresh one.
            error = StorageUnavailable(f"Redis unavailable: {type(exc).__name__}")
            return [error] * len(commands)
        except Exception as exc:  # a bug: fail this batch's callers, keep the pump alive
            return [exc] * len(commands)

    def _without_unencodable(self, commands: list[Command]) -> list[Any]:
        """Fail the commands whose arguments cannot be encoded; run the others."""
        encoder = self.client.get_encoder()
        results: list[Any] = [None] * len(commands)
        good: list[int] = []
        for i, command in enumerate(commands):
            try:
                for arg in command.args:
                    encoder.encode(arg)
                good.append(i)
            except (redis.DataError, UnicodeError, TypeError) as exc:
                results[i] = exc
        if len(good) == len(commands):  # nothing to isolate: do not loop
            return [TypeError("a batch could not be encoded")] * len(commands)
        for i, result in zip(
            good, self._execute_blocking([commands[i] for i in good]), strict=True
        ):
            results[i] = result
        return results

    def _pipeline(self, commands: list[Command]) -> list[Any]:
        with self.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command.args)
            results: list[Any] = pipe.execute(raise_on_error=False)
            return results

    def _fail_queued(self) -> None:
        while True:
            try:
                request = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            request.results = _failed(request, "the Redis pump stopped")
            request.done.set()


def _failed(request: _Request, why: str) -> list[Any]:
    return [StorageUnavailable(why)] * len(request.commands)
