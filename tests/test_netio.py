"""relay.netio on real loopback sockets: what a read and a write at once return at the edges
(data in parts, a drained socket, the end of the stream, a closed or reset socket, a full
send buffer, a stream that is not a plain socket)."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from relay.netio import Reader, write_at_once

DEADLINE_S = 10


async def connected_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    return client, server


async def test_a_read_returns_what_arrived_and_waits_for_more_once_drained() -> None:
    client, server = await connected_pair()
    reader = Reader(server, 8)
    with trio.fail_after(DEADLINE_S):
        await client.send_all(b"0123456789ab")
        assert await reader.read() == b"01234567"  # full: the next read does not wait
        assert await reader.read() == b"89ab"  # drained: the next read waits
        async with trio.open_nursery() as nursery:
            got: list[bytes | bytearray] = []

            async def read_one() -> None:
                got.append(await reader.read())

            nursery.start_soon(read_one)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # waiting, not spinning
            await client.send_all(b"later")
        assert got == [b"later"]
        await client.aclose()
        assert await reader.read() == b""  # the end of the stream
    await server.aclose()


async def test_a_read_of_a_closed_socket_raises_closed_and_a_reset_one_broken() -> None:
    client, server = await connected_pair()
    reader = Reader(server, 1024)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:

            async def close_soon() -> None:
                await trio.testing.wait_all_tasks_blocked()
                await server.aclose()

            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await reader.read()  # closed while it waited
        with pytest.raises(trio.ClosedResourceError):
            await reader.read()  # closed before it started
    await client.aclose()

    client, server = await connected_pair()
    reader = Reader(server, 1024)
    # SO_LINGER 0: the close sends a reset
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()
    with trio.fail_after(DEADLINE_S), pytest.raises(trio.BrokenResourceError):
        await reader.read()
    await server.aclose()


async def test_write_at_once_takes_what_fits_and_nothing_from_other_streams() -> None:
    client, server = await connected_pair()
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = b"x" * (16 * 1024 * 1024)  # more than any socket buffer takes
    written = first = write_at_once(server, data)
    assert 0 < first < len(data)
    for _ in range(1000):  # the peer's receive buffer takes some more, then it is full
        if (more := write_at_once(server, data)) == 0:
            break  # full: nothing, and no wait
        written += more
    else:
        raise AssertionError("the socket never filled")
    drained = 0
    with trio.fail_after(DEADLINE_S):
        while drained < written:
            drained += len(await client.receive_some(1024 * 1024))
    assert drained == written
    memory_stream = trio.testing.MemorySendStream()
    assert write_at_once(memory_stream, b"abc") == 0  # not a plain socket: send_all's
    await server.aclose()
    assert write_at_once(server, b"abc") == 0  # closed: send_all says so
    await client.aclose()
