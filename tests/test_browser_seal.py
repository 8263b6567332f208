"""seal.js in a real Chromium (the browser tests' set-up, test_browser_client.py) against
relay.seal: the known answers, bodies sealed on one side opened on the other, tampered `ct` and
`sig`, a wrong recipient and a wrong sender failing on both sides; relay.js with sealing on
talking to the Python client through a relay; and the demo page sealing between two pages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import test_browser_client
import trio
from relay_fixtures import DEADLINE_S, RelayFactory, http, token, unique
from test_browser_client import STEP_MS, http_origin, in_browser, open_page

from relay import seal
from relay.client import Event, Unopened, open_client, open_relay
from relay.redis.admin import RedisClient
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]
pytestmark = test_browser_client.pytestmark

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "seal_vectors.json").read_text())

# In the page: window.S is seal.js; helpers to read Python's files and to tamper.
SEAL_HARNESS = """
async (moduleUrl) => {
  window.S = await import(moduleUrl);
  const hex = (h) => Uint8Array.from(h.match(/../g) || [], (x) => parseInt(x, 16));
  window.hex = hex;
  window.flip = (sealed, field) => {
    const obj = JSON.parse(sealed);
    const bytes = S.unb64url(obj[field]);
    bytes[0] ^= 1;
    obj[field] = S.b64url(bytes);
    return JSON.stringify(obj);
  };
  window.failure = async (promise) => {
    try { await promise; return "opened"; } catch (e) { return e instanceof S.SealError ? e.reason : `not a SealError: ${e}`; }
  };
  window.vectorIdentity = (v) => S.identityFromPrivateBytes(hex(v.x25519_private), hex(v.ed25519_private), v.mailbox);
}
"""

PAGE_CHECKS = """
async ([vectors, files, fromPython]) => {
  const out = {};
  const alice = await vectorIdentity(vectors.sender);
  const bob = await vectorIdentity(vectors.recipient);
  const ctx = { sender: "alice", recipient: "bob" };
  out.publics = [S.b64url(alice.public.x25519), S.b64url(alice.public.ed25519)];
  out.known = [];
  for (const c of vectors.cases) {
    const sealed = await S.sealWith(c.body, bob.public, alice, ctx, { ephemeral: hex(vectors.ephemeral), iv: hex(vectors.iv) });
    out.known.push([sealed === c.sealed, await S.open(c.sealed, bob, alice.public, ctx) === c.body]);
  }
  // Python's identity files, as relay keygen writes them.
  const pyAlice = await S.importIdentity(files.alice);
  const pyBob = await S.importIdentity(files.bob);
  const carol = await S.importIdentity(files.carol);
  const mallory = S.importPublicKey(files.malloryPublic);
  out.opened = await S.open(fromPython, pyBob, pyAlice.public, ctx);
  out.pageFails = {
    ct: await failure(S.open(flip(fromPython, "ct"), pyBob, pyAlice.public, ctx)),
    sig: await failure(S.open(flip(fromPython, "sig"), pyBob, pyAlice.public, ctx)),
    epk: await failure(S.open(flip(fromPython, "epk"), pyBob, pyAlice.public, ctx)),
    iv: await failure(S.open(flip(fromPython, "iv"), pyBob, pyAlice.public, ctx)),
    recipient: await failure(S.open(fromPython, carol, pyAlice.public, { sender: "alice", recipient: "carol" })),
    sender: await failure(S.open(fromPython, pyBob, mallory, { sender: "mallory", recipient: "bob" })),
    notSealed: await failure(S.open("hello", pyBob, pyAlice.public, ctx)),
  };
  out.forPython = await S.seal("from the page ✓", pyBob.public, pyAlice, ctx);
  out.pageIdentity = await S.exportIdentity(await S.generateIdentity("dave"));
  out.reexported = await S.exportIdentity(pyAlice);
  out.lengths = [S.sealedLength(0), S.maxPlaintextBytes(65536)];
  return out;
}
"""


async def test_seal_js_and_relay_seal_agree_in_chromium(relay: RunningRelay) -> None:
    assert (await http(relay.port, "/seal.js")).status == 200
    ids = {name: seal.Identity.generate(name) for name in ("alice", "bob", "carol", "mallory")}
    files = {name: ids[name].to_json() for name in ("alice", "bob", "carol")}
    files["malloryPublic"] = ids["mallory"].public.to_json()
    context = seal.Context("alice", "bob")
    from_python = seal.seal("from python ✓", ids["bob"].public, ids["alice"], context)

    def scenario(browser: Any) -> dict[str, Any]:
        page = open_page(browser, http_origin(relay))
        page.evaluate(SEAL_HARNESS, f"{http_origin(relay)}/seal.js")
        result: dict[str, Any] = page.evaluate(PAGE_CHECKS, [VECTORS, files, from_python])
        return result

    out = await in_browser(scenario)
    assert out["publics"] == [
        seal.b64url(bytes.fromhex(VECTORS["sender"][k])) for k in ("x25519", "ed25519")
    ]
    assert out["known"] == [[True, True]] * len(VECTORS["cases"])
    assert out["opened"] == "from python ✓"
    assert out["pageFails"] == {
        "ct": "signature",
        "sig": "signature",
        "epk": "signature",
        "iv": "signature",
        "recipient": "signature",
        "sender": "signature",
        "notSealed": "malformed",
    }
    assert out["reexported"] == files["alice"]  # the same file format, byte for byte
    assert out["lengths"] == [seal.sealed_size(0), seal.max_plaintext_bytes(65536)]
    dave = seal.Identity.from_json(out["pageIdentity"])
    assert dave.mailbox == "dave"

    sealed = out["forPython"]
    assert seal.open(sealed, ids["bob"], ids["alice"].public, context) == "from the page ✓"
    fails = {
        "ct": (_flip(sealed, "ct"), ids["bob"], ids["alice"].public, context),
        "sig": (_flip(sealed, "sig"), ids["bob"], ids["alice"].public, context),
        "recipient": (sealed, ids["carol"], ids["alice"].public, seal.Context("alice", "carol")),
        "sender": (sealed, ids["bob"], ids["mallory"].public, seal.Context("mallory", "bob")),
    }
    for what, (body, recipient, sender, ctx) in fails.items():
        try:
            seal.open(body, recipient, sender, ctx)
        except seal.SealError:
            continue
        raise AssertionError(f"a page-sealed body with a wrong {what} opened in Python")


def _flip(sealed: str, field: str) -> str:
    obj = orjson.loads(sealed)
    data = bytearray(seal.unb64url(obj[field]))
    data[0] ^= 1
    obj[field] = seal.b64url(bytes(data))
    return orjson.dumps(obj).decode()


CLIENT_HARNESS = """
async ([origin, tok, identityFile, peerFile]) => {
  const { RelayClient } = await import(`${origin}/relay.js`);
  const S = await import(`${origin}/seal.js`);
  const identity = await S.importIdentity(identityFile);
  const peer = S.importPublicKey(peerFile);
  window.got = [];
  window.unopened = [];
  window.client = new RelayClient(`${origin.replace("http", "ws")}/v1`, {
    token: tok,
    identity,
    publicKey: async (mailbox) => (mailbox === peer.mailbox ? peer : null),
  });
  client.addEventListener("message", (e) => got.push(e.detail));
  client.addEventListener("unopened", (e) => unopened.push(e.detail));
  await client.connect();
}
"""


async def test_relay_js_and_the_python_client_exchange_sealed_messages(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    alice_id, bob_id, mallory_id = unique("alice"), unique("bob"), unique("mallory")
    alice, bob = seal.Identity.generate(alice_id), seal.Identity.generate(bob_id)
    directory = {bob_id: bob.public}
    events: list[Event] = []
    with trio.fail_after(DEADLINE_S):
        async with open_relay(relay.url, token(mallory_id)) as mallory:
            await mallory.send(bob_id, "plain text, not sealed")
        async with open_client(
            relay.url, token(alice_id), identity=alice, public_key=directory.get
        ) as client:
            await client.send(bob_id, "sealed in python")
        keys = list(redis_client.scan_iter(match=f"{prefix}{{{bob_id}}}:msg:*"))
        held = [str(v) for v in redis_client.mget(keys)]
        assert len(held) == 2 and not any("sealed in python" in v for v in held)

    def scenario(browser: Any) -> dict[str, Any]:
        page = open_page(browser, http_origin(relay))
        page.evaluate(
            CLIENT_HARNESS,
            [http_origin(relay), token(bob_id), bob.to_json(), alice.public.to_json()],
        )
        page.wait_for_function("got.length >= 1 && unopened.length >= 1")
        page.evaluate(f"client.send({json.dumps(alice_id)}, 'sealed in the page')")
        no_key = page.evaluate(
            f"client.send({json.dumps(mallory_id)}, 'x').then(() => 'sent', (e) => e.code)"
        )
        page.wait_for_function("client._acks.size === 0 && client._ackTimer === null")
        return {
            "got": page.evaluate("got"),
            "unopened": page.evaluate("unopened"),
            "noKey": no_key,
        }

    out = await in_browser(scenario)
    [message] = out["got"]
    assert (message["from"], message["body"], message["sealed"]) == (
        alice_id,
        "sealed in python",
        True,
    )
    [unopened] = out["unopened"]
    assert (unopened["from"], unopened["reason"]) == (mallory_id, "unknown_sender")
    assert "body" not in unopened
    assert out["noKey"] == "no_key"

    with trio.fail_after(DEADLINE_S):
        async with open_client(
            relay.url,
            token(alice_id),
            identity=alice,
            public_key={bob_id: bob.public}.get,
            on_event=events.append,
        ) as client:
            reply = await client.receive()
    assert (reply.sender, reply.body, reply.sealed) == (bob_id, "sealed in the page", True)
    assert not any(isinstance(e, Unopened) for e in events)


async def test_the_demo_page_seals_between_two_pages(make_relay: RelayFactory) -> None:
    relay = await make_relay(demo=True)

    def scenario(browser: Any) -> dict[str, str]:
        pages = {}
        for name in ("alice-s", "bob-s"):
            page = browser.new_page()
            page.set_default_timeout(STEP_MS)
            page.goto(f"{http_origin(relay)}/demo#token={token(name)}")
            page.wait_for_selector("#state.state-open")
            page.click("#keygen")
            page.wait_for_selector("#sealing.on")  # keys made, client reconnected with them
            pages[name] = page
        alice, bob = pages["alice-s"], pages["bob-s"]
        # Copy and paste of the public keys, each way.
        for mine, theirs in ((alice, bob), (bob, alice)):
            theirs.fill("#peerkey", mine.input_value("#mykey"))
            theirs.click("#trust")
        alice.wait_for_selector("#trusted >> text=bob-s")
        alice.fill("#to", "bob-s")
        alice.fill("#body", "sealed in the demo")
        alice.click("#send")
        bob.wait_for_selector("#messages li.theirs.sealed >> text=sealed in the demo")
        alice.wait_for_selector("#messages li.mine.sealed >> text=sealed in the demo")
        return {"bob": bob.inner_text("#messages"), "alice": alice.inner_text("#messages")}

    seen = await in_browser(scenario)
    assert "from alice-s" in seen["bob"] and "sealed" in seen["bob"]
