"""One relay session, no reconnects: what tests and tools use to see every frame's effect
and every close code. Applications want relay.client.RelayClient, which reconnects.

    async with open_relay("ws://127.0.0.1:8080/v1", token) as relay:
        await relay.send("bob", "hello")
        async for message in relay.messages():
            print(message.body)
            await relay.ack([message.id])

Sends carry a random `ref` unless one is given (so a retry with the same ref
is safe; a ref is never reused for another request); pass `ref=None` to send
without one. When the session ends, `send` and `receive` raise ConnectionClosed
and `close_code` holds the relay's close code.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from relay.client_frames import SUBPROTOCOL, Message, RelayClientError, Welcome, new_ref

_AUTO = "auto"
UNCONFIRMED_RETRIES = 3  # a send answered `unconfirmed` is sent again with its ref this often
UNCONFIRMED_BACKOFF_S = 0.5  # before the first retry; doubles for each next one


@attrs.define(eq=False)
class _Pending:
    done: trio.Event = attrs.field(factory=trio.Event)
    frame: dict[str, Any] | None = None


class RelaySession:
    """One authenticated session; made by open_relay."""

    def __init__(self, ws: WebSocketConnection, welcome: Welcome) -> None:
        self.ws = ws
        self.welcome = welcome
        self._by_ref: dict[str, _Pending] = {}
        self._unreferenced: deque[_Pending] = deque()  # sends without ref, answered in order
        self._inbox_send, self._inbox = trio.open_memory_channel[Message](math.inf)
        self.close_code: int | None = None

    async def send(
        self,
        to: str | Sequence[str],
        body: str,
        *,
        ttl_s: int | None = None,
        ref: str | None = _AUTO,
    ) -> dict[str, Any]:
        """Send and wait for `accepted`; raise RelayClientError on an `error` answer.
        A send answered `unconfirmed` (it may have been stored) is sent again with the
        same ref, which stores at most one copy, up to UNCONFIRMED_RETRIES times."""
        frame: dict[str, Any] = {
            "type": "send",
            "to": to if isinstance(to, str) else list(to),
            "body": body,
        }
        if ttl_s is not None:
            frame["ttl"] = ttl_s
        if ref == _AUTO:
            ref = new_ref()
        attempt = 0
        while True:
            pending = _Pending()
            if ref is None:
                self._unreferenced.append(pending)
            else:
                frame["ref"] = ref
                self._by_ref[ref] = pending
            await self.ws.send_message(orjson.dumps(frame).decode())
            try:
                return await self._answer(pending)
            except RelayClientError as exc:
                if exc.code != "unconfirmed" or ref is None or attempt == UNCONFIRMED_RETRIES:
                    raise
            await trio.sleep(UNCONFIRMED_BACKOFF_S * 2**attempt)
            attempt += 1

    async def ack(self, ids: Sequence[str], *, wait: bool = True) -> int | None:
        """Acknowledge (delete) messages; with `wait`, return how many the relay deleted."""
        frame: dict[str, Any] = {"type": "ack", "ids": list(ids)}
        if not wait:
            await self.ws.send_message(orjson.dumps(frame).decode())
            return None
        ref = frame["ref"] = new_ref()
        pending = self._by_ref[ref] = _Pending()
        await self.ws.send_message(orjson.dumps(frame).decode())
        count: int = (await self._answer(pending))["count"]
        return count

    async def receive(self) -> Message:
        """The next delivered message; raises ConnectionClosed when the session ended."""
        try:
            return await self._inbox.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(self.ws.closed) from None

    async def messages(self) -> AsyncIterator[Message]:
        async for message in self._inbox:
            yield message

    async def _answer(self, pending: _Pending) -> dict[str, Any]:
        await pending.done.wait()
        if pending.frame is None:
            raise ConnectionClosed(self.ws.closed)
        if pending.frame["type"] == "error":
            raise RelayClientError(pending.frame["code"], pending.frame["message"])
        return pending.frame

    async def _read(self) -> None:
        try:
            while True:
                self._route(orjson.loads(await self.ws.get_message()))
        except ConnectionClosed as closed:
            self.close_code = closed.reason.code if closed.reason else None
        finally:
            self._inbox_send.close()
            for pending in [*self._by_ref.values(), *self._unreferenced]:
                pending.done.set()

    def _route(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "deliver":
            for m in frame["messages"]:
                self._inbox_send.send_nowait(Message.from_wire(m))
            return
        ref = frame.get("ref")
        if ref is not None and ref in self._by_ref:
            pending = self._by_ref.pop(ref)
        elif kind in ("accepted", "error") and self._unreferenced:
            pending = self._unreferenced.popleft()
        else:
            return
        pending.frame = frame
        pending.done.set()


@asynccontextmanager
async def open_relay(
    url: str,
    token: str,
    *,
    auth: Literal["header", "frame"] = "header",
    subprotocol: bool = True,
    max_message_size: int = 16 * 1024 * 1024,
) -> AsyncIterator[RelaySession]:
    """Connect, authenticate and wait for `welcome`.

    Raises ConnectionClosed (with the relay's close code) when the relay
    refuses the session.
    """
    headers = [(b"Authorization", f"Bearer {token}".encode())] if auth == "header" else []
    async with open_websocket_url(
        url,
        subprotocols=[SUBPROTOCOL] if subprotocol else None,
        extra_headers=headers,
        max_message_size=max_message_size,
    ) as ws:
        if auth == "frame":
            await ws.send_message(orjson.dumps({"type": "auth", "token": token}).decode())
        welcome = orjson.loads(await ws.get_message())
        if welcome.get("type") != "welcome":
            raise RelayClientError("unexpected", f"expected welcome, got {welcome.get('type')!r}")
        client = RelaySession(ws, welcome)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
