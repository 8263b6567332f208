"""RelayClient with sealing on (`identity`, `public_key`), as README shows it, against a real
relay and Redis: sealed both ways, ciphertext only in Redis, and every delivery that does not
open (plain text, unknown sender, replayed, claimed by another sender, altered) reported as
Unopened, never received as text, and acked."""

from __future__ import annotations

import orjson
import pytest
import trio
from relay_fixtures import DEADLINE_S, keys_under, poll_until, token, unique

from relay import seal
from relay.client import Event, Message, Unopened, open_client, open_relay
from relay.redis.admin import RedisClient
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]


def stored(redis_client: RedisClient, prefix: str, mailbox: str) -> list[str]:
    keys = list(redis_client.scan_iter(match=f"{prefix}{{{mailbox}}}:msg:*"))
    # a stored value is "<tag of its ref record>\n<envelope>" (relay/store_redis.py)
    values = [str(v).partition("\n")[2] for v in redis_client.mget(keys) if v is not None]
    return [orjson.loads(v)["body"] for v in values]


async def test_two_clients_exchange_sealed_messages_and_redis_holds_ciphertext(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    alice_id, bob_id = unique("alice"), unique("bob")
    alice, bob = seal.Identity.generate(alice_id), seal.Identity.generate(bob_id)
    directory = {alice_id: alice.public, bob_id: bob.public}  # the app's key distribution
    bodies = ["first", "second ✓", "x" * 1000]
    with trio.fail_after(DEADLINE_S):
        async with open_client(
            relay.url, token(alice_id), identity=alice, public_key=directory.get
        ) as sender:
            for body in bodies:
                accepted = await sender.send(bob_id, body)
                assert list(accepted.ids) == [bob_id]
        held = stored(redis_client, prefix, bob_id)
        assert len(held) == 3
        assert not any(body in sealed for body in bodies for sealed in held)
        context = seal.Context(alice_id, bob_id)
        assert sorted(seal.open(s, bob, alice.public, context) for s in held) == sorted(bodies)

        async with open_client(
            relay.url, token(bob_id), identity=bob, public_key=directory.get
        ) as receiver:
            got = [await receiver.receive() for _ in bodies]
            await receiver.send(alice_id, "got them")
        assert [(m.sender, m.body, m.sealed) for m in got] == [(alice_id, b, True) for b in bodies]
        await poll_until(lambda: stored(redis_client, prefix, bob_id) == [])
        reply = stored(redis_client, prefix, alice_id)
        assert len(reply) == 1 and "got them" not in reply[0]
        assert seal.open(reply[0], alice, bob.public, seal.Context(bob_id, alice_id)) == "got them"


async def test_deliveries_that_do_not_open_are_reported_and_acked_never_received(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    alice_id, bob_id, carol_id, mallory_id = (unique(n) for n in ("alice", "bob", "carol", "mal"))
    alice, bob, carol = (seal.Identity.generate(m) for m in (alice_id, bob_id, carol_id))
    mallory = seal.Identity.generate(mallory_id)
    trusted = {alice_id: alice.public, mallory_id: mallory.public}  # bob's directory

    def sealed(body: str, to: seal.Identity, by: seal.Identity = alice) -> str:
        assert to.mailbox is not None and by.mailbox is not None
        return seal.seal(body, to.public, by, seal.Context(by.mailbox, to.mailbox))

    for_bob = sealed("for bob", bob)
    tampered = orjson.loads(for_bob)
    ct = bytearray(seal.unb64url(tampered["ct"]))
    ct[0] ^= 1
    tampered["ct"] = seal.b64url(bytes(ct))
    stranger = seal.Identity.generate(unique("stranger"))
    injected = {  # sent by alice unless a sender is named; the reason bob is told
        "plain text": ("plain", None, "malformed"),
        "from a sender bob has no key for": (
            sealed("hi", bob, stranger),
            stranger,
            "unknown_sender",
        ),
        "replayed from carol's mailbox": (sealed("for carol", carol), None, "signature"),
        "alice's, claimed by mallory": (for_bob, mallory, "signature"),
        "altered": (orjson.dumps(tampered).decode(), None, "signature"),
    }
    with trio.fail_after(DEADLINE_S):
        for body, sender, _ in injected.values():
            mailbox = alice_id if sender is None else sender.mailbox
            assert mailbox is not None
            async with open_relay(relay.url, token(mailbox)) as raw:
                await raw.send(bob_id, body)
        async with open_relay(relay.url, token(alice_id)) as raw:
            await raw.send(bob_id, sealed("the real one", bob))

        events: list[Event] = []
        async with open_client(
            relay.url, token(bob_id), identity=bob, public_key=trusted.get, on_event=events.append
        ) as receiver:
            message: Message = await receiver.receive()
        unopened = [e for e in events if isinstance(e, Unopened)]
        assert (message.body, message.sender, message.sealed) == ("the real one", alice_id, True)
        assert [e.reason for e in unopened] == [reason for _, _, reason in injected.values()]
        assert all(e.message.body != "for bob" for e in unopened)
        await poll_until(lambda: keys_under(redis_client, f"{prefix}{{{bob_id}}}:msg:") == [])


async def test_a_sealed_send_needs_one_recipient_with_a_key(
    relay: RunningRelay, redis_client: RedisClient, prefix: str
) -> None:
    alice = seal.Identity.generate("alice-k")
    keys = {"bob-k": seal.Identity.generate("bob-k").public}
    with pytest.raises(ValueError, match="both identity and public_key"):
        async with open_client(relay.url, token("alice-k"), identity=alice):
            pass
    with trio.fail_after(DEADLINE_S):
        async with open_client(
            relay.url, token("alice-k"), identity=alice, public_key=keys.get
        ) as client:
            with pytest.raises(ValueError, match="no public key for 'carol-k'"):
                await client.send("carol-k", "x")
            with pytest.raises(ValueError, match="one mailbox"):
                await client.send(["bob-k", "carol-k"], "x")
            await client.send(["bob-k"], "a list of one is fine")
    assert stored(redis_client, prefix, "carol-k") == []
    assert len(stored(redis_client, prefix, "bob-k")) == 1


async def test_an_identity_of_another_mailbox_cannot_seal(relay: RunningRelay) -> None:
    alice = seal.Identity.generate("alice-m")
    keys = {"bob-m": seal.Identity.generate("bob-m").public}
    with trio.fail_after(DEADLINE_S):
        async with open_client(
            relay.url, token("mallory-m"), identity=alice, public_key=keys.get
        ) as client:
            with pytest.raises(ValueError, match="'alice-m' used for 'mallory-m'"):
                await client.send("bob-m", "x")
