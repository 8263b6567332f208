"""`relay probe`: check a live deployment's promise from outside, with what a user has.

It reads the public policy document, opens sessions on the relay with the user's token,
sends messages to its own mailbox only, and watches what the relay does with them:

1. `policy`: /.well-known/relay-policy answers JSON on the relay's own address.
2. `policy_matches_welcome`: the limits it states are the ones a session's welcome states.
3. `ttl_limit`: a send with a ttl beyond the stated largest is refused (`ttl_too_long`).
4. `expiry`: a message sent with a short ttl and never acked is not delivered once its
   ttl has passed, and the next welcome's `expired` counts it.
5. `ack_deletes`: a message received and acked does not come back in the next session.
6. `ref_dedupe`: a send repeated with its `ref` is answered `duplicate` and stored once.
7. `ref_conflict`: the same `ref` with another body is refused and stores nothing.
8. `query_token_refused`: a (valid) token in the URL's query string opens no session.
9. `alg_none_refused`: an unsigned (`alg: none`) token for its own mailbox opens none.
10. `redis_persistence`, `redis_eviction`, `redis_slowlog`, `bodies_logged`: what the
    policy says the relay found when it checked its Redis. A setting the relay was allowed
    to run with (`on (allowed by --allow-…)`) fails: the promise does not hold there.
    One it could not read (`unverified`, managed Redis) is a warning.

"Received in full" is known without waiting on a clock: after the probe's own sends it
sends a marker message; messages of a mailbox arrive in the order accepted, so everything
waiting arrived before the marker. Only the expiry check waits, for the ttl to pass.

Every message it sends goes to its own mailbox and is acked before it leaves, except the
one meant to expire. Messages in the mailbox that it did not send are neither acked nor
reported. Exit status (relay.probe_cli): 0 when no check failed (warnings allowed), 1 when
one failed or could not run.
"""

from __future__ import annotations

import base64
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    open_websocket_url,
)

from relay.client_frames import SUBPROTOCOL, Message, RelayClientError, new_ref
from relay.client_session import RelaySession, open_relay
from relay.errors import first_leaf

Status = Literal["pass", "warn", "fail"]
POLICY_PATH = "/.well-known/relay-policy"
WELCOME_FIELDS = ("retention_s", "max_body_bytes", "max_frame_bytes", "max_inflight", "epoch")
REDIS_CHECKS = (
    ("redis_persistence", "persistence", "Redis writes nothing to disk"),
    ("redis_eviction", "eviction", "Redis never evicts a waiting message"),
    ("redis_slowlog", "slowlog", "Redis's slow log keeps no commands (bodies)"),
)
EXPIRY_MARGIN_S = 1.0  # waited past the short ttl before looking again
EPOCH_SETTLE_S = 3.0  # the policy follows the epoch within a second or so (policy_document)


class ProbeError(Exception):
    """A step could not be done at all (no session, no answer in time); it fails its check."""


STEP_FAILURES = (
    ProbeError,
    RelayClientError,
    ConnectionClosed,
    HandshakeError,
    OSError,
    trio.TooSlowError,
)


@attrs.frozen
class Check:
    name: str
    status: Status
    saw: str  # what the probe saw, in words
    details: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "saw": self.saw, **self.details}


@attrs.frozen
class Report:
    url: str
    policy_url: str
    mailbox: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "policy_url": self.policy_url,
            "mailbox": self.mailbox,
            "ok": self.ok,
            "counts": {
                s: sum(c.status == s for c in self.checks) for s in ("pass", "warn", "fail")
            },
            "checks": [check.to_dict() for check in self.checks],
        }

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2).decode()

    def to_text(self) -> str:
        lines = [f"relay probe of {self.url} as mailbox {self.mailbox}"]
        lines += [f"{c.status.upper():4}  {c.name}: {c.saw}" for c in self.checks]
        counts = self.to_dict()["counts"]
        verdict = "every check held" if self.ok else "some checks FAILED"
        lines.append(
            f"{verdict} ({counts['pass']} passed, {counts['warn']} warned, {counts['fail']} failed)"
        )
        return "\n".join(lines)


@attrs.frozen
class ProbeOptions:
    url: str  # the relay's ws:// or wss:// /v1 URL
    mailbox: str
    token: Callable[[], str]  # a valid token for `mailbox` (the same one, or a fresh one)
    claims: dict[str, Any]  # the token's claims: the alg-none forgery copies them
    ttl_s: int = 5
    timeout_s: float = 10.0
    policy_url: str | None = None


def policy_url_for(url: str) -> str:
    """The policy document's URL on the relay's own address: ws(s)://host/…/v1 becomes
    http(s)://host/…/.well-known/relay-policy (a path before /v1 is kept, for a relay
    served under a prefix)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not a ws:// or wss:// URL: {url[:80]!r}")
    base = parts.path.removesuffix("/").removesuffix("/v1")
    return urlunsplit((scheme, parts.netloc, base + POLICY_PATH, "", ""))


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a token, read without verifying it (the probe only needs its `sub`)."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        raise ValueError("the token is not a JWT") from None
    if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
        raise ValueError("the token has no sub claim") from None
    return claims


def forge_unsigned(claims: dict[str, Any]) -> str:
    """An `alg: none` token with these claims and no signature: a relay must refuse it."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def run_probe(options: ProbeOptions) -> Report:
    """Every check, in order; a step that cannot be done fails its check, not the probe."""
    probe = _Probe(options)
    try:
        await probe.run()
    finally:
        with trio.CancelScope(shield=True):
            await probe.clean_up()
    policy_url = options.policy_url or policy_url_for(options.url)
    return Report(options.url, policy_url, options.mailbox, probe.checks)


class _Probe:
    def __init__(self, options: ProbeOptions) -> None:
        self.options = options
        self.checks: list[Check] = []
        self.run_id = secrets.token_hex(6)
        self.to_ack: set[str] = set()  # ids of its own messages not known deleted yet
        self.policy: dict[str, Any] | None = None

    def record(self, name: str, status: Status, saw: str, **details: Any) -> None:
        self.checks.append(Check(name, status, saw, details))

    def body(self, purpose: str) -> str:
        return f"relay probe {self.run_id}: {purpose}"

    @contextmanager
    def step(self, *names: str) -> Iterator[None]:
        """Run a step; when it cannot be done, each named check not yet reported fails
        with the reason (a group from a session's nursery is judged by its first leaf)."""
        try:
            yield
        except Exception as exc:
            leaf = first_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if not isinstance(leaf, STEP_FAILURES):
                raise
            if isinstance(leaf, trio.TooSlowError):
                saw = f"could not run: no answer within {self.options.timeout_s:g} s"
            else:
                saw = f"could not run: {_describe(leaf)}"
            done = {check.name for check in self.checks}
            for name in names:
                if name not in done:
                    self.record(name, "fail", saw)

    async def run(self) -> None:
        with self.step("policy"):
            self.policy = await self.fetch_policy()
            self.record("policy", "pass", f"{self.policy_url} answered JSON")
        sent = ("policy_matches_welcome", "ttl_limit", "expiry", "ack_deletes", "ref_dedupe")
        with self.step(*sent, "ref_conflict"):
            await self.sessions()
        with self.step("query_token_refused"):
            await self.query_token_refused()
        with self.step("alg_none_refused"):
            await self.alg_none_refused()
        self.redis_checks()

    @property
    def policy_url(self) -> str:
        return self.options.policy_url or policy_url_for(self.options.url)

    async def fetch_policy(self) -> dict[str, Any]:
        with trio.fail_after(self.options.timeout_s):
            status, body = await trio.to_thread.run_sync(
                _http_get, self.policy_url, self.options.timeout_s
            )
        if status != 200:
            raise ProbeError(f"{self.policy_url} answered HTTP {status}")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ProbeError(f"{self.policy_url} did not answer JSON") from None
        if not isinstance(document, dict):
            raise ProbeError(f"{self.policy_url} answered JSON that is not an object")
        return document

    def session(self) -> AbstractAsyncContextManager[RelaySession]:
        """A session of the probe's mailbox (the caller bounds it in time)."""
        return open_relay(self.options.url, self.options.token())

    async def send(
        self, session: RelaySession, body: str, ttl_s: int, ref: str | None = None
    ) -> dict[str, Any]:
        with trio.fail_after(self.options.timeout_s):
            accepted = await session.send(
                self.options.mailbox, body, ttl_s=ttl_s, ref=ref or new_ref()
            )
        self.to_ack.add(accepted["ids"][self.options.mailbox])
        return accepted

    async def drain(self, session: RelaySession, ttl_s: int) -> list[Message]:
        """Everything delivered up to a marker sent now (then acked): all that waits."""
        marker = await self.send(session, self.body("marker"), ttl_s)
        marker_id = marker["ids"][self.options.mailbox]
        seen = []
        with trio.fail_after(self.options.timeout_s):
            while (message := await session.receive()).id != marker_id:
                seen.append(message)
        await self.ack(session, [marker_id])
        return seen

    async def ack(self, session: RelaySession, ids: list[str]) -> int:
        with trio.fail_after(self.options.timeout_s):
            count = await session.ack(ids)
        self.to_ack.difference_update(ids)
        return count or 0

    async def sessions(self) -> None:
        """Two sessions: the first sends and acks, the second comes after the short ttl."""
        options = self.options
        mailbox = options.mailbox
        session_s = 4 * options.timeout_s  # each step inside has its own deadline too
        with trio.fail_after(session_s):
            async with self.session() as first:
                welcome: dict[str, Any] = dict(first.welcome)
                await self.policy_matches_welcome(welcome)
                await self.ttl_limit(first, welcome)
                keep_s = min(welcome["retention_s"], 2 * options.ttl_s + 120)  # outlives the wait
                expiring = await self.send(first, self.body("expiring"), options.ttl_s)
                expiring_id = expiring["ids"][mailbox]
                self.to_ack.discard(expiring_id)  # meant to expire, never acked
                sent_at = trio.current_time()
                acked = await self.send(first, self.body("acked"), keep_s)
                acked_id = acked["ids"][mailbox]
                ref = new_ref()
                ref_body = self.body("sent twice with one ref")
                once = await self.send(first, ref_body, keep_s, ref)
                twice = await self.send(first, ref_body, keep_s, ref)
                conflict_body = self.body("another body under a used ref")
                try:
                    conflict: dict[str, Any] | str = await self.send(
                        first, conflict_body, keep_s, ref
                    )
                except RelayClientError as refused:
                    conflict = refused.code
                seen = await self.drain(first, keep_s)
                ack_count = await self.ack(first, [acked_id])
                await self.ack(first, [m.id for m in seen if m.body == ref_body])
        self.ref_checks(once, twice, conflict, [m.body for m in seen], ref_body, conflict_body)

        await trio.sleep_until(sent_at + options.ttl_s + EXPIRY_MARGIN_S)
        with trio.fail_after(session_s):
            async with self.session() as second:
                later = await self.drain(second, keep_s)
                expired = second.welcome["expired"]
        later_ids = {m.id for m in later}
        self.expiry_check(expiring_id in {m.id for m in seen}, expiring_id in later_ids, expired)
        received = acked_id in {m.id for m in seen}
        self.ack_check(received, ack_count, acked_id in later_ids)

    def ack_check(self, received: bool, ack_count: int, delivered_again: bool) -> None:
        details = {
            "received": received,
            "acked_count": ack_count,
            "delivered_again": delivered_again,
        }
        if received and ack_count == 1 and not delivered_again:
            saw = "received, acked (the relay deleted 1), and not delivered in the next session"
            self.record("ack_deletes", "pass", saw, **details)
        else:
            saw = f"received {received}, acked count {ack_count}, delivered again {delivered_again}"
            self.record("ack_deletes", "fail", saw, **details)

    async def policy_matches_welcome(self, welcome: dict[str, Any]) -> None:
        """Compare what both state; the epoch may take a moment to reach the document."""
        if self.policy is None:
            self.record("policy_matches_welcome", "fail", "no policy document to compare")
            return
        deadline = trio.current_time() + EPOCH_SETTLE_S
        while True:
            differences = _differences(self.policy, welcome)
            if set(differences) != {"epoch"} or trio.current_time() >= deadline:
                break
            await trio.sleep(0.2)
            self.policy = await self.fetch_policy()
        compared = {f: welcome.get(f) for f in WELCOME_FIELDS} | {
            "max_ttl_s": welcome.get("retention_s")
        }
        if differences:
            said = "; ".join(
                f"{k}: policy {p!r}, welcome {w!r}" for k, (p, w) in differences.items()
            )
            self.record("policy_matches_welcome", "fail", said, welcome=compared)
        else:
            said = ", ".join(f"{k} {v}" for k, v in compared.items())
            self.record("policy_matches_welcome", "pass", f"both say {said}", welcome=compared)

    async def ttl_limit(self, session: RelaySession, welcome: dict[str, Any]) -> None:
        stated = (self.policy or {}).get("max_ttl_s", welcome["retention_s"])
        too_long = int(stated) + 1
        try:
            await self.send(session, self.body("ttl beyond the limit"), too_long)
        except RelayClientError as refused:
            status: Status = "pass" if refused.code == "ttl_too_long" else "fail"
            self.record(
                "ttl_limit",
                status,
                f"ttl {too_long} s was refused with {refused.code}",
                code=refused.code,
            )
            return
        self.record(
            "ttl_limit", "fail", f"ttl {too_long} s beyond the stated {stated} s was accepted"
        )

    def ref_checks(
        self,
        once: dict[str, Any],
        twice: dict[str, Any],
        conflict: dict[str, Any] | str,
        bodies: list[str],
        ref_body: str,
        conflict_body: str,
    ) -> None:
        copies = bodies.count(ref_body)
        same_id = once["ids"] == twice["ids"]
        duplicate = twice.get("duplicate") is True
        details = {"duplicate": duplicate, "same_id": same_id, "copies_delivered": copies}
        if duplicate and same_id and copies == 1:
            saw = "the repeated send was answered duplicate with the same id; one copy delivered"
            self.record("ref_dedupe", "pass", saw, **details)
        else:
            saw = f"duplicate {duplicate}, same id {same_id}, {copies} copies delivered"
            self.record("ref_dedupe", "fail", saw, **details)
        stored = bodies.count(conflict_body)
        if conflict == "ref_conflict" and stored == 0:
            self.record(
                "ref_conflict",
                "pass",
                "the reused ref was refused with ref_conflict",
                code=conflict,
            )
        elif isinstance(conflict, str):
            self.record(
                "ref_conflict",
                "fail",
                f"answered {conflict}, {stored} copies delivered",
                code=conflict,
            )
        else:
            self.record(
                "ref_conflict", "fail", "a reused ref with another body was accepted", code=None
            )

    def expiry_check(self, delivered_before: bool, delivered_after: bool, expired: int) -> None:
        details = {
            "ttl_s": self.options.ttl_s,
            "delivered_before_ttl": delivered_before,
            "delivered_after_ttl": delivered_after,
            "welcome_expired": expired,
        }
        if delivered_before and not delivered_after and expired >= 1:
            saw = (
                f"delivered while alive, gone after its {self.options.ttl_s} s ttl; "
                f"the next welcome counted expired {expired}"
            )
            self.record("expiry", "pass", saw, **details)
        else:
            saw = (
                f"delivered before its ttl: {delivered_before}, after: {delivered_after}; "
                f"welcome expired {expired} (want >= 1)"
            )
            self.record("expiry", "fail", saw, **details)

    async def query_token_refused(self) -> None:
        token = self.options.token()
        url = f"{self.options.url}?access_token={token}&token={token}"
        saw = await self.refused_session(url, [])
        self.record("query_token_refused", "pass" if saw.startswith("refused") else "fail", saw)

    async def alg_none_refused(self) -> None:
        claims = self.options.claims | {"exp": int(time.time()) + 300}
        forged = forge_unsigned(claims)
        saw = await self.refused_session(
            self.options.url, [(b"Authorization", f"Bearer {forged}".encode())]
        )
        self.record("alg_none_refused", "pass" if saw.startswith("refused") else "fail", saw)

    async def refused_session(self, url: str, headers: list[tuple[bytes, bytes]]) -> str:
        """How the relay answered a connection that must open no session. Without a header,
        the first frame is not `auth`: a relay that took the query's token has already sent
        `welcome`; one that did not closes (4401)."""
        with trio.fail_after(self.options.timeout_s):
            try:
                async with open_websocket_url(
                    url, subprotocols=[SUBPROTOCOL], extra_headers=headers
                ) as ws:
                    if not headers:
                        await ws.send_message(orjson.dumps({"type": "ack", "ids": []}).decode())
                    frame = orjson.loads(await ws.get_message())
                    return f"a session opened: the relay answered {frame.get('type')!r}"
            except ConnectionRejected as rejected:
                return f"refused the handshake with HTTP {rejected.status_code}"
            except ConnectionClosed as closed:
                code = closed.reason.code if closed.reason else None
                if code in (4401, 4408):
                    return f"refused: closed with {code} before any welcome"
                return f"closed with {code} (expected 4401)"

    def redis_checks(self) -> None:
        if self.policy is None:
            for name, _, _ in REDIS_CHECKS:
                self.record(name, "fail", "no policy document")
            self.record("bodies_logged", "fail", "no policy document")
            return
        redis = self.policy.get("redis") or {}
        for name, key, promise in REDIS_CHECKS:
            state = str(redis.get(key, "missing"))
            if state == "off":
                self.record(name, "pass", f"{key} off: {promise}", state=state)
            elif state == "unverified":
                saw = f"{key} unverified: the relay could not read the setting (managed Redis?)"
                self.record(name, "warn", saw, state=state)
            else:
                saw = f"{key} {state}: not kept: {promise}"
                self.record(name, "fail", saw, state=state)
        logged = self.policy.get("bodies_logged")
        self.record(
            "bodies_logged",
            "pass" if logged is False else "fail",
            f"the policy says bodies_logged: {orjson.dumps(logged).decode()}",
        )

    async def clean_up(self) -> None:
        """Ack, best effort, what the probe sent and did not ack yet (a check failed midway)."""
        if not self.to_ack:
            return
        with trio.move_on_after(self.options.timeout_s):
            try:
                async with self.session() as session:
                    await self.ack(session, sorted(self.to_ack))
            except (RelayClientError, ConnectionClosed, HandshakeError, OSError):
                pass


def _differences(policy: dict[str, Any], welcome: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    stated = {f: policy.get(f) for f in WELCOME_FIELDS}
    stated["max_ttl_s"] = policy.get("max_ttl_s")
    told = {f: welcome.get(f) for f in WELCOME_FIELDS} | {"max_ttl_s": welcome.get("retention_s")}
    return {k: (stated[k], told[k]) for k in stated if stated[k] != told[k]}


def _http_get(url: str, timeout_s: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return error.code, b""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        code = exc.reason.code if exc.reason else None
        return f"the relay closed the session with {code}"
    if isinstance(exc, ConnectionRejected):
        return f"the relay refused the handshake with HTTP {exc.status_code}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot fetch the policy document: {exc.reason}"
    cause = exc.__cause__ or exc.__context__
    if not str(exc) and cause is not None:  # trio-websocket's HandshakeError says nothing
        return _describe(cause)
    return f"{type(exc).__name__}: {exc}"
