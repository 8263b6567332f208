"""A loopback TCP proxy in front of a test Redis, whose mode the test switches.

Each new connection is handled by the mode of the moment: "forward" (to the real Redis,
on its unix socket), "close" (accept and hang up at once) or "hang" (accept and never
answer). Connections already forwarded stay as they are.
"""

from __future__ import annotations

from typing import Literal

import trio

Mode = Literal["forward", "close", "hang"]


class RedisProxy:
    def __init__(self, unix_path: str) -> None:
        self._unix_path = unix_path
        self.mode: Mode = "forward"
        self.port = 0
        self.accepted: dict[Mode, int] = {"forward": 0, "close": 0, "hang": 0}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        mode = self.mode
        self.accepted[mode] += 1
        async with client:
            if mode == "close":
                return
            if mode == "hang":
                await trio.sleep_forever()
            server = await trio.open_unix_socket(self._unix_path)
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(_copy, client, server, nursery.cancel_scope)
                nursery.start_soon(_copy, server, client, nursery.cancel_scope)


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.cancel()
