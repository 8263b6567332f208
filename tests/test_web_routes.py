"""Plain HTTP on the WebSocket port: the browser client's files, /demo behind --demo, 404
for every other path; the upgrade path stays /v1."""

from __future__ import annotations

from pathlib import Path

import trio
from process_fixtures import relay_process
from relay_fixtures import DEADLINE_S, RelayFactory, http, raw_session

from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]


async def test_plain_get_of_a_wrong_path_is_404(relay: RunningRelay) -> None:
    for path in ("/", "/v2", "/relay.js.map", "/demo"):
        response = await http(relay.port, path)
        assert response.status == 404, (path, response)
    assert (await http(relay.port, "/v1")).status == 426


async def test_relay_js_is_served_with_an_etag_and_revalidates(relay: RunningRelay) -> None:
    response = await http(relay.port, "/relay.js")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["cache-control"] == "no-cache"
    assert b"export class RelayClient" in response.body
    etag = response.headers["etag"]
    again = await http(relay.port, "/relay.js", f"If-None-Match: {etag}")
    assert again.status == 304 and again.body == b""
    types = await http(relay.port, "/relay.d.ts")
    assert types.status == 200
    assert types.headers["content-type"].startswith("application/typescript")
    assert types.headers["etag"] != etag
    head = await http(relay.port, "/relay.js", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert (await http(relay.port, "/relay.js", method="POST")).status == 405


async def test_demo_is_served_only_with_demo(make_relay: RelayFactory) -> None:
    relay = await make_relay(demo=True)
    response = await http(relay.port, "/demo")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "content-security-policy" in response.headers
    assert b"/relay.js" in response.body


async def test_websockets_still_work_behind_the_http_routes(relay: RunningRelay) -> None:
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "alice") as (_, welcome):
            assert welcome["mailbox"] == "alice"


async def test_an_oversize_request_head_is_refused(relay: RunningRelay) -> None:
    response = await http(relay.port, "/relay.js", "X-Big: " + "a" * 20000)
    assert response.status == 431


async def test_relay_serve_demo_flag_serves_the_demo_page(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    async with relay_process(redis_url, prefix, tmp_path / "relay.log", "--demo") as relay:
        port = int(relay.url.split(":")[2].split("/")[0])
        response = await http(port, "/demo")
        assert response.status == 200, relay.log()
        assert b'from "/relay.js"' in response.body
