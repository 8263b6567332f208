"""The Redis implementation of the mailbox store.

Keys of mailbox m, with the configurable prefix `relay:` (see README's "What is stored"):

    relay:{m}:msg:<id>   string  "<tag>\n<envelope>"; PX = the message's ttl, set once
    relay:{m}:idx        zset    id -> seq; PX >= its longest-lived member's ttl
    relay:{m}:tally      hash    n, e, b, s, m: a cache of the index (counts, bytes, last
                                 seq, soonest expiry; relay/lua/tally.lua); PX = retention
    relay:{m}:ref:<tag>  string  "<id> <expires_at_ms> <fingerprint>"; PX = the message's
                                 ttl, cut to the dedupe window when the message is acked
    relay:{m}:ch         channel the store publishes "<seq> <envelope>" on
    relay:epoch          string  the storage's epoch; PX = retention, refreshed by use

A ref record's tag is a keyed-free hash of (sender, ref): it names neither, and
with random refs cannot be linked to a sender. The fingerprint is a hash of the
request (recipients, body, ttl), so a reused ref with another request is told
apart from a retry without keeping the body.

Every write happens inside one Lua script per mailbox (relay/lua/), and every
key it writes gets a TTL in the same script; the sends to one mailbox that meet
in a pump batch run as one script (`_join_sends`). Message ids start with the send
time in hexadecimal milliseconds, so `relay audit` can tell a message's age
from its key name without reading its body.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import attrs
import orjson
import redis

from relay import policy
from relay.errors import (
    MailboxFull,
    RefConflict,
    RelayError,
    StorageUnavailable,
    Unconfirmed,
)
from relay.redis.pump import Command, LuaScript, Merge, RedisPump
from relay.store import (
    FETCH_BYTES,
    Accepted,
    Delivery,
    Page,
    SendRequest,
    SessionStart,
    envelope_id,
)


def _load(name: str, *parts: str) -> LuaScript:
    """A script of relay/lua/, after common.lua and the shared `parts` it uses."""
    lua = resources.files("relay") / "lua"
    files = ("common", *parts, name)
    return LuaScript(name, "\n".join((lua / f"{f}.lua").read_text() for f in files))


SEND, START = _load("send", "tally"), _load("start", "tally")
FETCH, ACK, EPOCH, UNSEND = (_load(n) for n in ("fetch", "ack", "epoch", "unsend"))

TAG_BYTES = 22  # as in common.lua
NO_REF = "." * TAG_BYTES  # the tag of a message sent without a ref (not base64url)
EPOCH_REFRESH_S = 1.0  # sends refresh the epoch's TTL at most this often per process


def _digest(*parts: str) -> str:
    """SHA-256 over a length-prefixed encoding of `parts`, base64url, 132 bits."""
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode()
        hasher.update(len(data).to_bytes(4, "big"))
        hasher.update(data)
    return base64.urlsafe_b64encode(hasher.digest()).decode()[:TAG_BYTES]


def ref_tag(sender: str, ref: str) -> str:
    """The hash naming a ref record: neither the sender nor the ref appears in clear."""
    return _digest("ref", sender, ref)


def fingerprint(recipients: Sequence[str], body: str, ttl_s: int) -> str:
    """What a ref record remembers of its request, to tell a retry from a reuse."""
    return _digest("req", *sorted(recipients), "", body, str(ttl_s))


def new_message_id(now_ms: int) -> str:
    return f"{now_ms:x}-{secrets.token_urlsafe(6)}"


def glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def message_sent_ms(message_id: str) -> int | None:
    """The send time encoded in a message id, or None when it is not one of ours."""
    head, _, _ = message_id.partition("-")
    try:
        return int(head, 16)
    except ValueError:
        return None


@attrs.frozen
class Keys:
    """Names of the keys of one mailbox under a prefix."""

    base: str

    @classmethod
    def of(cls, prefix: str, mailbox: str) -> Keys:
        return cls(f"{prefix}{{{mailbox}}}:")

    @property
    def idx(self) -> str:
        return self.base + "idx"

    @property
    def tally(self) -> str:
        return self.base + "tally"

    @property
    def msg_prefix(self) -> str:
        return self.base + "msg:"

    @property
    def channel(self) -> str:
        return self.base + "ch"

    def msg(self, message_id: str) -> str:
        return self.base + "msg:" + message_id

    @property
    def ref_prefix(self) -> str:
        return self.base + "ref:"

    def ref(self, sender: str, ref: str) -> str:
        return self.ref_prefix + ref_tag(sender, ref)


@attrs.frozen
class Quota:
    max_messages: int = 10_000
    max_bytes: int = 64 * 1024 * 1024


@attrs.frozen
class _PreparedSend:
    send: SendRequest
    ids: dict[str, str]  # recipient -> message id
    expires_at_ms: int
    tag: str
    commands: list[Command]


class RedisMailboxStore:
    """MailboxStore on Redis, reached through a RedisPump."""

    def __init__(
        self,
        pump: RedisPump,
        *,
        prefix: str = "relay:",
        retention_s: int = 7 * 24 * 3600,
        dedupe_window_s: int = 600,
        quota: Quota = Quota(),
    ) -> None:
        self.pump = pump
        self.prefix = prefix
        self.retention_s = retention_s
        self.dedupe_window_s = dedupe_window_s
        self.quota = quota
        self._epoch_refreshed = -EPOCH_REFRESH_S  # time.monotonic() of the last refresh
        self._epoch: str | None = None  # the epoch as last read

    def keys(self, mailbox: str) -> Keys:
        return Keys.of(self.prefix, mailbox)

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        body: str,
        ttl_s: int,
        ref: str | None,
        now_ms: int,
    ) -> Accepted:
        (outcome,) = await self.send_many(
            sender, [SendRequest(recipients, body, ttl_s, ref)], now_ms
        )
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def send_many(
        self, sender: str, sends: Sequence[SendRequest], now_ms: int
    ) -> list[Accepted | Exception]:
        """Several sends of one sender as one pump request (one batch, in this order): the
        outcome of each, what `send` would return or raise."""
        prepared = [self._prepare(sender, send, now_ms) for send in sends]
        commands = [command for one in prepared for command in one.commands]
        commands.extend(self._epoch_refresh())
        results = await self.pump.execute_many(commands)
        outcomes: list[Accepted | Exception] = []
        undo: list[tuple[int, _PreparedSend, list[tuple[str, str]]]] = []
        offset = 0
        for index, one in enumerate(prepared):
            count = len(one.commands)
            outcome, stored = self._outcome(one, results[offset : offset + count])
            outcomes.append(outcome)
            if isinstance(outcome, Exception) and stored:
                undo.append((index, one, stored))
            offset += count
        if undo:
            # The copies of every failed send of the batch are deleted in one pump request:
            # while Redis stalls, each request can take the whole timeout.
            undone = await self._unsend(
                [(one.send.ref, one.tag, stored) for _, one, stored in undo]
            )
            for (index, _, _), deleted in zip(undo, undone, strict=True):
                if not deleted:
                    outcomes[index] = Unconfirmed(
                        "the send failed and some copies may still be stored"
                    )
        return outcomes

    def _prepare(self, sender: str, send: SendRequest, now_ms: int) -> _PreparedSend:
        expires_at_ms = policy.expires_at_ms(now_ms, send.ttl_s)
        tail = orjson.dumps(
            {"from": sender, "body": send.body, "sent_at": now_ms, "expires_at": expires_at_ms}
        ).decode()[1:]
        ids = {r: new_message_id(now_ms) for r in send.recipients}
        ref = send.ref
        tag = NO_REF if ref is None else ref_tag(sender, ref)
        request = "" if ref is None else fingerprint(send.recipients, send.body, send.ttl_s)
        commands = []
        for recipient, message_id in ids.items():
            keys = self.keys(recipient)
            args = (
                message_id,
                f'{{"id":"{message_id}",{tail}',
                send.ttl_s * 1000,
                self.quota.max_messages,
                self.quota.max_bytes,
                self.pump.publish,
                "0" if ref is None else "1",
                f"{message_id} {expires_at_ms} {request}",
                self.retention_s * 1000,
                request,
                tag,
            )
            # Sends to one mailbox that meet in a pump batch run as one script.
            merge = Merge((SEND.sha, keys.idx, *args[3:6], args[8]), _join_sends, _split_sends)
            commands.append(
                Command.call(
                    SEND,
                    (
                        keys.idx,
                        keys.tally,
                        keys.msg(message_id),
                        keys.ref_prefix + tag,
                        keys.channel,
                    ),
                    args,
                    merge,
                )
            )
        return _PreparedSend(send, ids, expires_at_ms, tag, commands)

    def _outcome(
        self, one: _PreparedSend, results: Sequence[Any]
    ) -> tuple[Accepted | Exception, list[tuple[str, str]]]:
        """What the replies to one send's commands mean, and the copies (recipient, id) they
        stored: a failed send's are to be deleted again (all or none)."""
        ids, expires_at_ms, ref = one.ids, one.expires_at_ms, one.send.ref
        stored: list[tuple[str, str]] = []  # copies this call created
        duplicate = False
        failure: Exception | None = None
        for recipient, result in zip(one.send.recipients, results, strict=False):
            try:
                if isinstance(result, Exception):
                    raise _storage_error(result)
                if result[0] == 0:
                    stored.append((recipient, ids[recipient]))
                elif result[0] == 1:
                    prior_id, prior_expiry, _ = str(result[1]).split(" ")
                    ids[recipient] = prior_id
                    expires_at_ms = int(prior_expiry)
                    duplicate = True
                elif result[0] == 2:
                    raise RefConflict(f"ref {ref!r} was used before for another request")
                else:
                    raise MailboxFull(
                        f"mailbox {recipient} is full ({result[2]} {result[1]} at most)"
                    )
            except Exception as exc:  # also a ref record the relay cannot read
                # An unconfirmed copy outranks any other failure: it may be stored.
                if failure is None or isinstance(exc, Unconfirmed):
                    failure = exc
        if failure is not None:
            return failure, stored  # maybe shared by every send of the batch: not to be changed
        return Accepted(ids=ids, expires_at_ms=expires_at_ms, duplicate=duplicate), stored

    async def _unsend(
        self, sends: Sequence[tuple[str | None, str, list[tuple[str, str]]]]
    ) -> list[bool]:
        """Delete, best effort, the copies failed sends stored (ref, tag, copies), each
        with its ref record; for each send, whether every one is known deleted."""
        commands = []
        for ref, tag, stored in sends:
            for recipient, message_id in stored:
                keys = self.keys(recipient)
                commands.append(
                    Command.call(
                        UNSEND,
                        (keys.idx, keys.tally, keys.msg(message_id), keys.ref_prefix + tag),
                        (message_id, "0" if ref is None else "1"),
                    )
                )
        results = await self.pump.execute_many(commands)
        deleted, offset = [], 0
        for _, _, stored in sends:
            replies = results[offset : offset + len(stored)]
            deleted.append(not any(isinstance(reply, Exception) for reply in replies))
            offset += len(stored)
        return deleted

    async def start_session(self, mailbox: str, notice: str = "") -> SessionStart:
        keys = self.keys(mailbox)
        start = Command.call(
            START,
            (keys.idx, keys.tally, keys.channel),
            (keys.msg_prefix, self.retention_s * 1000, self.pump.publish, notice),
        )
        epoch = self._epoch_command()
        started, current = await self.pump.execute_many([start, epoch])
        if isinstance(current, Exception) and self._epoch is not None:
            # The epoch lives in one slot: while its cluster primary fails over, the
            # sessions of every other slot still start, with the epoch as last read.
            current = self._epoch
        for result in (started, current):
            if isinstance(result, Exception):
                raise _storage_error(result)
        self._epoch = str(current)
        self._epoch_refreshed = time.monotonic()
        expired, waiting, _ = started
        return SessionStart(expired=int(expired), waiting=int(waiting), epoch=str(current))

    def _epoch_command(self) -> Command:
        """Read the storage's epoch, making a new one when Redis lost it, and keep it
        alive as long as anything it covers (its TTL is the retention, from its last use)."""
        return Command.call(
            EPOCH, (self.prefix + "epoch",), (secrets.token_urlsafe(12), self.retention_s * 1000)
        )

    def _epoch_refresh(self) -> list[Command]:
        """The epoch refresh a send carries, at most once per EPOCH_REFRESH_S."""
        now = time.monotonic()
        if now - self._epoch_refreshed < EPOCH_REFRESH_S:
            return []
        self._epoch_refreshed = now
        return [self._epoch_command()]

    async def fetch(
        self, mailbox: str, after: int, limit: int, max_bytes: int = FETCH_BYTES
    ) -> Page:
        keys = self.keys(mailbox)
        more, *flat = await self._script(
            FETCH, (keys.idx,), (keys.msg_prefix, after, limit, max_bytes)
        )
        deliveries = []
        for i in range(0, len(flat), 2):
            envelope = flat[i + 1][TAG_BYTES + 1 :]  # a stored value is "<tag>\n<envelope>"
            message_id = envelope_id(envelope)
            if message_id is not None:  # every envelope the store wrote has one
                deliveries.append(Delivery(int(flat[i]), message_id, envelope))
        return Page(deliveries, more == 1)

    async def ack(self, mailbox: str, ids: Sequence[str]) -> int:
        (deleted,) = await self.pump.execute_many([self._ack_command(self.keys(mailbox), ids)])
        if isinstance(deleted, Exception):
            raise _storage_error(deleted)
        return int(deleted)

    def _ack_command(self, keys: Keys, ids: Sequence[str]) -> Command:
        unique = list(dict.fromkeys(ids))
        return Command.call(
            ACK,
            (keys.idx, keys.tally, *(keys.msg(i) for i in unique)),
            (self.dedupe_window_s * 1000, keys.ref_prefix, *unique),
        )

    async def sample_oldest(
        self, cursor: int, count: int = 1000, node: str | None = None
    ) -> tuple[int, int | None]:
        """One SCAN step over mailbox indexes (on one primary of a cluster: `node`, a
        label of `pump.nodes()`): the next cursor, and the earliest send time (ms)
        among the oldest waiting messages of the mailboxes seen."""
        pattern = glob_escape(self.prefix) + "*:idx"
        scan = Command(("SCAN", cursor, "MATCH", pattern, "COUNT", count), node=node)
        (reply,) = await self.pump.execute_many([scan])
        if isinstance(reply, Exception):
            raise reply
        cursor, keys = reply
        heads = await self.pump.execute_many([Command(("ZRANGE", key, 0, 0)) for key in keys])
        sent = [message_sent_ms(h[0]) for h in heads if isinstance(h, list) and h]
        known = [ms for ms in sent if ms is not None]
        return int(cursor), min(known) if known else None

    async def _script(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self.pump.run_script(script, keys, args)
        except redis.RedisError as exc:
            raise _storage_error(exc) from exc


def _join_sends(commands: Sequence[Command]) -> Command:
    """Sends to one mailbox as one run of send.lua: the first with all its keys and
    arguments, each further one with the arguments of its own (send.lua's layout)."""
    keys: list[Any] = []
    args: list[Any] = []
    for command in commands:
        count = command.args[2]
        own_keys, own_args = command.args[3 : 3 + count], command.args[3 + count :]
        if not keys:
            keys, args = list(own_keys), list(own_args)
        else:  # id, envelope, ttl, ref record ('' for none), tag
            record = own_args[7] if own_args[6] == "1" else ""
            args += (own_args[0], own_args[1], own_args[2], record, own_args[10])
    return Command.call(SEND, keys, args)


def _split_sends(reply: Any, count: int) -> list[Any]:
    """The result of each send of a joined send.lua run, shaped as a lone run's."""
    results = []
    for i in range(0, 3 * count, 3):
        kind, first, second = reply[i : i + 3]
        results.append(
            [kind, first, second] if kind == -1 else [kind, first] if kind < 2 else [kind]
        )
    return results


def _storage_error(exc: Exception) -> Exception:
    """Map a Redis failure to the error a client is told."""
    if isinstance(exc, RelayError):
        return exc
    if isinstance(exc, redis.ResponseError) and str(exc).startswith("OOM"):
        return StorageUnavailable("Redis is out of memory")
    if isinstance(exc, redis.RedisError):
        return StorageUnavailable(f"Redis error: {type(exc).__name__}")
    return exc
