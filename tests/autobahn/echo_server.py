"""A test-only echo server over the relay's WebSocket engine (relay.websocket), for the
Autobahn|Testsuite fuzzingclient: every message comes back as it came, text or binary.

`python tests/autobahn/echo_server.py PORT` listens on 127.0.0.1:PORT until killed. The
handshake, framing, limits and close handshake are the relay's own; only the app (echo)
and the message limit (16 MiB + 1 KiB, for cases 9.1/9.2) differ.
"""

from __future__ import annotations

import sys
from functools import partial

import trio

from relay.websocket import BadUpgrade, Upgrade, WebSocket, read_opening

MAX_MESSAGE_BYTES = 16 * 1024 * 1024 + 1024  # case 9.x sends messages of up to 16 MiB
SEND_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 2.0


async def echo(stream: trio.abc.Stream) -> None:
    try:
        head, received = await read_opening(stream)
        try:
            upgrade = Upgrade.parse(head, received)
        except BadUpgrade as bad:
            await stream.send_all(bad.response)
            return
        await stream.send_all(upgrade.accept(None))
        ws = WebSocket(
            stream,
            max_message_bytes=MAX_MESSAGE_BYTES,
            send_timeout_s=SEND_TIMEOUT_S,
            received=upgrade.received,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.run_writer)
            try:
                while not ws.protocol.ended and not ws.broken:
                    for message in await ws.receive():
                        ws.send(message)
            finally:
                ws.finish_writing()
        await ws.aclose(1000, "", CLOSE_TIMEOUT_S)
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def main(port: int) -> None:
    await trio.serve_tcp(partial(echo), port, host="127.0.0.1")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
