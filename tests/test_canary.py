"""The canary (issue 13): a unique body is sent and acked, another runs out of time, and then
neither is anywhere a relay deployment could keep it: every key and value of every Redis
database, SLOWLOG, CLIENT LIST, the LATENCY reports, the files in Redis's `dir`, the relay's
log at `--log-level debug`, and every file changed under the temp directory during the test.
With sealing on, the clear text is in none of those places even before the ack (nor in the
memory of the Redis and relay processes), although that Redis logs every command's arguments.

A real relay process, a real Valkey / redis-server of the test's own; each search is first
shown to find what is there (a control), so a search that sees nothing proves something.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import redis
import trio
from process_fixtures import RelayProcess, relay_process
from relay_fixtures import msg_key, poll_until, token

from relay import seal
from relay.client import open_client, open_relay
from relay.embedded import EmbeddedServer

pytest_plugins = ["relay_fixtures"]

CHUNK_BYTES = 1 << 20
STEP_S = 30.0  # a relay process starting, then the scenario, on a small shared machine
EXPIRING_TTL_S = 3  # long enough for the searches made while it is stored, on a busy machine
# The worst a Redis can do with what it is sent: log every command with its arguments.
LOGS_EVERYTHING = ("--slowlog-log-slower-than", "0", "--slowlog-max-len", "100000")
LATENCY = ("--latency-monitor-threshold", "1")


def canary(kind: str) -> bytes:
    """A body found nowhere by chance (and short: the slow log keeps 128 bytes per argument)."""
    return f"canary-{kind}-{uuid.uuid4().hex}".encode()


def flatten(reply: object) -> bytes:
    """A Redis reply, however nested, as bytes to search."""
    if isinstance(reply, bytes):
        return reply
    if isinstance(reply, str | int | float):
        return str(reply).encode()
    if isinstance(reply, dict):
        return b"\n".join(flatten(k) + b" " + flatten(v) for k, v in reply.items())
    if isinstance(reply, list | tuple | set):
        return b"\n".join(flatten(item) for item in reply)
    return b""


def call(client: redis.Redis, *args: object) -> object:
    """One command, its reply as Redis sent it (bytes; none of redis-py's reshaping)."""
    connection = client.connection_pool.get_connection()
    try:
        connection.send_command(*args)  # type: ignore[no-untyped-call]
        reply: object = connection.read_response(disable_decoding=True)
        return reply
    finally:
        client.connection_pool.release(connection)


def _text(reply: object) -> list[str]:
    """A reply of names (CONFIG GET, TYPE) as text."""
    if isinstance(reply, dict):  # a RESP3 map
        reply = [part for pair in reply.items() for part in pair]
    items = reply if isinstance(reply, list) else [reply]
    return [item.decode() if isinstance(item, bytes) else str(item) for item in items]


def file_contains(path: Path, needle: bytes) -> bool:
    """Whether a regular file holds `needle`, read in chunks that overlap by len(needle) - 1."""
    try:
        with path.open("rb") as file:
            tail = b""
            while chunk := file.read(CHUNK_BYTES):
                if needle in tail + chunk:
                    return True
                tail = chunk[-(len(needle) - 1) :]
    except OSError:  # gone meanwhile, or not ours to read
        return False
    return False


def files_changed_since(root: Path, since_s: float) -> Iterator[Path]:
    for directory, _, names in os.walk(root, onerror=lambda _: None):
        for name in names:
            path = Path(directory, name)
            try:
                info = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_mtime >= since_s:
                yield path


@attrs.define
class Places:
    """Everywhere the canary must not be, for one Redis and one relay process."""

    server: EmbeddedServer
    relay: RelayProcess
    since_s: float

    def _redis(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, db=db)  # replies stay bytes

    def redis_texts(self) -> Iterator[tuple[str, bytes]]:
        """(where, what) for every key and value of every database, and every report."""
        admin = self._redis()
        try:
            for db in range(int(_text(call(admin, "CONFIG", "GET", "databases"))[-1])):
                yield from self._database(db)
            yield "SLOWLOG GET", flatten(call(admin, "SLOWLOG", "GET", "-1"))
            yield "CLIENT LIST", flatten(call(admin, "CLIENT", "LIST"))
            latest = call(admin, "LATENCY", "LATEST")
            yield "LATENCY LATEST", flatten(latest)
            assert isinstance(latest, list)
            for event in latest:
                history = call(admin, "LATENCY", "HISTORY", event[0])
                yield f"LATENCY HISTORY {event[0]!r}", flatten(history)
            yield "LATENCY DOCTOR", flatten(call(admin, "LATENCY", "DOCTOR"))
        finally:
            admin.close()

    def _database(self, db: int) -> Iterator[tuple[str, bytes]]:
        client = self._redis(db)
        read = {
            "string": ("GET",),
            "list": ("LRANGE", 0, -1),
            "set": ("SMEMBERS",),
            "zset": ("ZRANGE", 0, -1, "WITHSCORES"),
            "hash": ("HGETALL",),
            "stream": ("XRANGE", "-", "+"),
        }
        try:
            for key in client.scan_iter(count=1000):
                kind = _text(call(client, "TYPE", key))[0]
                yield f"db {db} key name {key!r}", key
                command, *more = read.get(kind, ("DUMP",))
                yield f"db {db} {kind} {key!r}", flatten(call(client, command, key, *more))
        finally:
            client.close()

    def files(self) -> Iterator[Path]:
        """The files in Redis's `dir`, the relay's log, and what changed under the temp dir."""
        admin = self._redis()
        try:
            directory = Path(_text(call(admin, "CONFIG", "GET", "dir"))[-1])
        finally:
            admin.close()
        yield from (p for p in directory.rglob("*") if p.is_file())
        yield self.relay.log_path
        yield from files_changed_since(Path(tempfile.gettempdir()), self.since_s)

    def in_redis(self, needle: bytes) -> list[str]:
        """Where in Redis `needle` is (quick: for the checks made while a message lives)."""
        return [where for where, text in self.redis_texts() if needle in text]

    def sightings(self, needle: bytes) -> list[str]:
        """Where `needle` is (empty: nowhere)."""
        seen = self.in_redis(needle)
        seen += [f"file {path}" for path in self.files() if file_contains(path, needle)]
        return seen


@pytest.fixture
def since_s() -> float:
    """The test's start (a second early: file times may be coarse)."""
    return time.time() - 1.0


def own_server(redis_server: EmbeddedServer, *extra: str) -> EmbeddedServer:
    """A Redis of the test's own, of the same kind as `redis_server`."""
    server = EmbeddedServer(binary=redis_server.binary, extra_args=(*LATENCY, *extra))
    server.start()
    return server


async def test_acked_and_expired_bodies_are_nowhere_after(
    redis_server: EmbeddedServer, prefix: str, tmp_path: Path, since_s: float
) -> None:
    server = own_server(redis_server)
    acked, expired = canary("acked"), canary("expired")
    try:
        async with relay_process(
            server.url, prefix, tmp_path / "relay.log", "--log-level", "debug"
        ) as relay:
            places = Places(server, relay, since_s)
            with trio.fail_after(STEP_S):
                async with open_relay(relay.url, token("alice")) as alice:
                    await alice.send("bob", acked.decode(), ttl_s=600)
                    gone = await alice.send("carol", expired.decode(), ttl_s=EXPIRING_TTL_S)
                # Controls: while stored, the search finds both (and the log names mailboxes).
                for body in (acked, expired):
                    assert any(w.startswith("db 0 string") for w in places.in_redis(body))
                assert b"alice" in relay.log_path.read_bytes()

                async with open_relay(relay.url, token("bob")) as bob:
                    message = await bob.receive()
                    assert message.body == acked.decode()
                    assert await bob.ack([message.id]) == 1
                key = msg_key(prefix, "carol", gone["ids"]["carol"])
                client = redis.Redis.from_url(server.url)
                try:
                    await poll_until(lambda: not client.exists(key))
                finally:
                    client.close()
                assert places.sightings(acked) == []
                assert places.sightings(expired) == []
    finally:
        server.stop()


def _identities() -> dict[str, seal.Identity]:
    return {name: seal.Identity.generate(name) for name in ("alice", "bob", "carol")}


async def _sealed_scenario(
    relay: RelayProcess, places: Places, prefix: str, pids: list[int]
) -> tuple[list[str], list[str], list[str]]:
    """Alice seals one canary for bob and one (ttl EXPIRING_TTL_S) for carol, and sends one control
    unsealed. Returns where the clear texts were seen before bob's ack, where after the ack
    and the expiry, and where the control was (it must be in the slow log)."""
    ids = _identities()
    keys = {name: identity.public for name, identity in ids.items()}
    acked, expired, control = canary("sealed"), canary("sealed-expired"), canary("plain")
    async with open_client(
        relay.url, token("alice"), identity=ids["alice"], public_key=keys.get
    ) as alice:
        await alice.send("bob", acked.decode(), ttl_s=600)
        gone = await alice.send("carol", expired.decode(), ttl_s=EXPIRING_TTL_S)
    # The sealed bodies are there, as ciphertext (bob's at least: carol's may have
    # expired already on a busy machine).
    stored = [w for w in places.in_redis(b'"body":"{\\"v\\":1,\\"alg\\"') if "db 0" in w]
    assert any("{bob}:msg:" in w for w in stored), stored
    async with open_relay(relay.url, token("alice")) as plain:
        await plain.send("dave", control.decode(), ttl_s=600)

    before = places.sightings(acked) + places.sightings(expired)
    before += [f"memory of {pid}" for pid in pids if memory_contains(pid, acked)]
    control_seen = places.sightings(control)

    async with open_client(
        relay.url, token("bob"), identity=ids["bob"], public_key=keys.get
    ) as bob:
        message = await bob.receive()
        assert (message.body, message.sealed) == (acked.decode(), True)
    client = redis.Redis.from_url(places.server.url)
    try:
        expired_key = msg_key(prefix, "carol", gone.ids["carol"])
        await poll_until(lambda: not client.exists(expired_key))
        await poll_until(lambda: not list(client.scan_iter(match=f"{prefix}{{bob}}:msg:*")))
    finally:
        client.close()
    after = places.sightings(acked) + places.sightings(expired)
    return before, after, control_seen


async def test_sealed_bodies_are_nowhere_even_before_the_ack(
    redis_server: EmbeddedServer, prefix: str, tmp_path: Path, since_s: float
) -> None:
    server = own_server(redis_server, *LOGS_EVERYTHING)
    try:
        async with relay_process(
            server.url, prefix, tmp_path / "relay.log", "--log-level", "debug", "--allow-slowlog"
        ) as relay:
            places = Places(server, relay, since_s)
            with trio.fail_after(STEP_S):
                before, after, control = await _sealed_scenario(relay, places, prefix, [])
    finally:
        server.stop()
    assert "SLOWLOG GET" in control, control  # this Redis logs what it is sent...
    assert before == []  # ...yet the sealed clear texts were nowhere while stored
    assert after == []


def memory_contains(pid: int, needle: bytes) -> bool:
    """Whether the readable memory of process `pid` holds `needle` (/proc/PID/mem; a child
    of this process is readable under the usual ptrace rules)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue  # [vvar] and the like
            if needle in data:
                return True
    return False


def _memory_readable(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/mem", "rb", 0):
            return True
    except OSError:
        return False


async def test_sealed_bodies_are_not_in_the_memory_of_redis_or_the_relay(
    redis_server: EmbeddedServer, prefix: str, tmp_path: Path, since_s: float
) -> None:
    server = own_server(redis_server)
    try:
        async with relay_process(server.url, prefix, tmp_path / "relay.log") as relay:
            pids = [server.pid, relay.process.pid]
            if not all(_memory_readable(pid) for pid in pids):
                pytest.skip("this machine forbids reading a child's /proc/PID/mem (ptrace)")
            places = Places(server, relay, since_s)
            with trio.fail_after(STEP_S):
                control = canary("in-memory")
                async with open_relay(relay.url, token("erin")) as erin:
                    await erin.send("frank", control.decode(), ttl_s=600)
                # Control: an unsealed body is in the memory of both processes.
                assert [memory_contains(pid, control) for pid in pids] == [True, True]
                before, _, _ = await _sealed_scenario(relay, places, prefix, pids)
    finally:
        server.stop()
    assert [b for b in before if b.startswith("memory")] == []
