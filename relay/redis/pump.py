"""Batch Redis commands from many Trio tasks into pipelines on one Trio-native connection.

Callers `await pump.execute(...)`; one pump task takes every command pending
at that moment, writes them as one pipeline, reads the replies in order, and
hands each caller its own. At low load a batch holds one command (one round
trip); under load batches grow while the Trio loop serves WebSockets during
each round trip, and throughput follows. Under load a batch also waits a few
scheduler passes while other tasks keep adding to it (`_next_batch`).

The topology (`relay.redis.topology`) routes each command: to the one server,
to the primary Sentinel names, or to the cluster primary that owns the slot of
its first key; each node has its own pipeline in a batch, run side by side.
Replies that prove a command did not run (MOVED, ASK, TRYAGAIN, CLUSTERDOWN,
READONLY) resend it where the reply says, up to MAX_REDIRECTIONS times.

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
  timeout of its own (on a cluster: those that go to the broken node only);
  the next batch opens a fresh connection, so the pump recovers by itself once
  Redis is back;
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

from relay.errors import StorageUnavailable
from relay.redis.address import parse
from relay.redis.cluster import redirection
from relay.redis.connection import pack
from relay.redis.link import NodeLink
from relay.redis.topology import Topology, topology_for

log = logging.getLogger(__name__)

COALESCE_PASSES = 4  # scheduler passes a batch waits at most for more requests
MAX_REDIRECTIONS = 5  # resends of one command that MOVED, ASK, TRYAGAIN… proved unrun
REDIRECT_WAIT_S = 0.05  # the first wait after TRYAGAIN or CLUSTERDOWN; doubles each time


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
    """One Redis command, or one script call when `script` is set; `node` pins a
    command without keys (SCAN) to one primary, by its label."""

    args: tuple[Any, ...]
    script: LuaScript | None = None
    merge: Merge | None = None
    node: str | None = None

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
RedirectionObserver = Callable[[str], None]  # told "moved", "ask", "wait" or "reresolve"


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
        on_redirection: RedirectionObserver | None = None,
    ) -> None:
        self.url = url
        self.topology: Topology = topology_for(parse(url), timeout_s=timeout_s)
        self.publish = self.topology.publish  # the command the scripts publish with
        self._timeout_s = timeout_s
        self._send, self._receive = trio.open_memory_channel[_Request](max_pending)
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._on_redirection = on_redirection
        self._carried: list[_Request] = []  # queued behind a broken batch, for other nodes
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

    def nodes(self) -> list[str]:
        """The labels of the primaries, for commands that run on each (`Command.node`)."""
        return [link.label for link in self.topology.links()]

    def problem(self) -> str | None:
        """Why some commands cannot be served now (no primary owns a slot), for /readyz."""
        return self.topology.problem()

    def statistics(self) -> PumpStatistics:
        return PumpStatistics(
            batches=self._batches,
            commands=self._commands,
            queued=self._receive.statistics().current_buffer_used + len(self._carried),
            last_batch_size=self._last_batch_size,
            last_batch_s=self._last_batch_s,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pump loop. Cancel it to stop: the batch in flight finishes, queued callers
        get StorageUnavailable."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.topology.run)
                task_status.started()
                await self._serve()
        finally:
            self._send.close()
            self._fail_queued()
            for link in self.topology.links():
                await link.discard()

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                # A batch once started runs to its end (bounded by timeout_s), so
                # its callers learn what happened to commands Redis may have run.
                with trio.CancelScope(shield=True):
                    broken = await self._run_batch([r for r in batch if not r.abandoned])
                if broken:
                    why = "; ".join(f"{link.label}: {link.broken}" for link in broken)
                    self._fail_queued(f"Redis unavailable ({why}); not sent", broken)
                    for link in broken:
                        link.broken = None
            finally:
                for request in batch:
                    if len(request.results) != len(request.commands):
                        request.results = _failed(request, "the Redis pump stopped")
                    request.done.set()

    async def _next_batch(self) -> list[_Request]:
        """Wait for one request, then take every request pending, up to max_batch.
        Under load (the last batch held several requests), then let the other tasks run
        and take theirs too, until two scheduler passes in a row bring nothing (at most
        COALESCE_PASSES passes): requests that tasks start one after another (a
        session's sends, each starting the next) leave together, in fewer and larger
        pipelines, and a session's sends to one mailbox run as one script. A lone
        request after a quiet spell leaves at once."""
        batch = [self._carried.pop(0) if self._carried else await self._receive.receive()]
        size = len(batch[0].commands)
        idle = 0
        for passes in range(COALESCE_PASSES + 1):
            taken = size
            while size < self._max_batch:
                try:
                    request = (
                        self._carried.pop(0) if self._carried else self._receive.receive_nowait()
                    )
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

    async def _run_batch(self, batch: list[_Request]) -> list[NodeLink]:
        """Run the batch; the links that lost their connection doing it."""
        commands = [c for r in batch for c in r.commands]
        if not commands:
            return []
        started = time.perf_counter()
        results, broken = await self._execute(commands)
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
        return broken

    async def _execute(self, commands: list[Command]) -> tuple[list[Any], list[NodeLink]]:
        """Each command's reply, and the links that broke. Commands are merged, packed,
        routed, sent (one pipeline per node), and resent where a reply proves they did
        not run."""
        results: list[Any] = [None] * len(commands)
        units: list[tuple[Command, list[int], bytes]] = []  # what is sent, whose reply it is
        for command, owners in _merged(commands):
            try:
                units.append((command, owners, pack(command.args)))
            except (TypeError, UnicodeError) as exc:  # this command cannot be sent at all
                if len(owners) == 1:
                    results[owners[0]] = redis.DataError(f"cannot encode the command: {exc}")
                    continue
                for i in owners:  # each on its own, so that only the bad one fails
                    try:
                        units.append((commands[i], [i], pack(commands[i].args)))
                    except (TypeError, UnicodeError) as exc:
                        results[i] = redis.DataError(f"cannot encode the command: {exc}")
        replies, used = await self._send_routed(units)
        for (_, owners, _), reply in zip(units, replies, strict=True):
            if len(owners) == 1:
                results[owners[0]] = reply
                continue
            merge = commands[owners[0]].merge
            assert merge is not None
            for i, own in zip(owners, _split(merge, reply, len(owners)), strict=True):
                results[i] = own
        broken = [link for link in used if link.broken is not None]
        for link in broken:
            self.topology.lost(link)
        return results, broken

    async def _send_routed(
        self, units: list[tuple[Command, list[int], bytes]]
    ) -> tuple[list[Any], set[NodeLink]]:
        """Each unit's reply, and the links the units went to."""
        replies: list[Any] = [None] * len(units)
        used: set[NodeLink] = set()
        todo = list(range(len(units)))
        redirected: dict[int, NodeLink] = {}  # resend to this link (MOVED, ASK)
        asking: set[int] = set()  # resend after ASKING (ASK)
        for attempt in range(MAX_REDIRECTIONS + 1):
            groups: dict[NodeLink, list[int]] = {}
            for k in todo:
                command = units[k][0]
                try:
                    link = redirected.get(k) or self.topology.link_for(command.args, command.node)
                except StorageUnavailable as exc:
                    replies[k] = exc
                    continue
                groups.setdefault(link, []).append(k)
            if len(groups) == 1:
                ((link, ks),) = groups.items()
                await self._send_to(link, ks, units, replies, asking)
            else:
                async with trio.open_nursery() as nursery:
                    for link, ks in groups.items():
                        nursery.start_soon(self._send_to, link, ks, units, replies, asking)
            used.update(groups)
            if not self.topology.resends:  # one server: its replies are final
                break
            todo, wait = [], False
            for k in (k for ks in groups.values() for k in ks):
                found = redirection(replies[k])
                if found is None or attempt == MAX_REDIRECTIONS:
                    continue
                if self._on_redirection is not None:
                    self._on_redirection(found.how)
                target = self.topology.redirected(found)
                redirected.pop(k, None)
                asking.discard(k)
                if target is not None:
                    redirected[k] = target
                if found.how == "ask":
                    asking.add(k)
                wait = wait or found.how == "wait"
                todo.append(k)
            if not todo:
                break
            if wait:
                await trio.sleep(REDIRECT_WAIT_S * 2**attempt)
        return replies, used

    async def _send_to(
        self,
        link: NodeLink,
        ks: list[int],
        units: list[tuple[Command, list[int], bytes]],
        replies: list[Any],
        asking: set[int],
    ) -> None:
        """Send units `ks` to one link; ASK's resends go after an ASKING of their own."""
        packed: list[bytes] = []
        sources: list[str | None] = []
        for k in ks:
            if k in asking:
                packed.append(ASKING)
                sources.append(None)
            command = units[k][0]
            packed.append(units[k][2])
            sources.append(command.script.source if command.script is not None else None)
        answers = iter(await link.run(packed, sources))
        for k in ks:
            if k in asking:
                next(answers)  # ASKING's +OK (or its error: then the command's tells)
            replies[k] = next(answers)

    def _fail_queued(
        self, why: str = "the Redis pump stopped", broken: list[NodeLink] | None = None
    ) -> None:
        """Answer queued requests StorageUnavailable (none of it was sent): all of them,
        or, after `broken` links, those that go to no other link."""
        queued, self._carried = self._carried, []
        while True:
            try:
                queued.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        for request in queued:
            if broken is not None and not self._only_to(request, broken):
                self._carried.append(request)
                continue
            request.results = _failed(request, why)
            request.done.set()

    def _only_to(self, request: _Request, links: list[NodeLink]) -> bool:
        """Whether every command of the request goes to one of `links`."""
        for command in request.commands:
            try:
                if self.topology.link_for(command.args, command.node) not in links:
                    return False
            except StorageUnavailable:
                continue
        return True


ASKING = pack(("ASKING",))


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
