"""relay.seal: known answers, the documented construction rebuilt from the primitives, tampering
of each field, wrong recipients and senders, key files, and the size overhead.

tests/seal_vectors.json holds the known answers; relay/web/seal.js is held to the same file in
Chromium (test_browser_seal.py) and in Node (tests/node/seal_test.mjs).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import seal

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "seal_vectors.json").read_text())
ALICE_BOB = seal.Context("alice", "bob")


def vector_identity(who: str) -> seal.Identity:
    keys = VECTORS[who]
    return seal.Identity.from_private_bytes(
        bytes.fromhex(keys["x25519_private"]),
        bytes.fromhex(keys["ed25519_private"]),
        keys["mailbox"],
    )


ALICE, BOB = vector_identity("sender"), vector_identity("recipient")


def fields(sealed: str) -> dict[str, Any]:
    obj: dict[str, Any] = orjson.loads(sealed)
    return obj


def with_field(sealed: str, name: str, value: object) -> str:
    return orjson.dumps(fields(sealed) | {name: value}).decode()


def flip(text: str, at: int = 0) -> str:
    """The base64url field with one bit of its `at`-th byte flipped (still canonical)."""
    data = bytearray(seal.unb64url(text))
    data[at] ^= 0x01
    return seal.b64url(bytes(data))


# -- known answers ---------------------------------------------------------------------


def test_the_vector_keys_are_the_rfcs_and_seal_gives_the_known_bodies() -> None:
    for who, identity in (("sender", ALICE), ("recipient", BOB)):
        assert identity.public.x25519.hex() == VECTORS[who]["x25519"]  # RFC 7748 6.1
        assert identity.public.ed25519.hex() == VECTORS[who]["ed25519"]  # RFC 8032 7.1
    for case in VECTORS["cases"]:
        sealed = seal.seal_with(
            case["body"],
            BOB.public,
            ALICE,
            ALICE_BOB,
            ephemeral=bytes.fromhex(VECTORS["ephemeral"]),
            iv=bytes.fromhex(VECTORS["iv"]),
        )
        assert sealed == case["sealed"]
        assert seal.open(sealed, BOB, ALICE.public, ALICE_BOB) == case["body"]


def _frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def documented_seal(plaintext: bytes, epk_private: bytes, iv: bytes) -> str:
    """README's "Sealed messages" construction, step by step, with nothing of relay.seal."""
    alg = b"x25519-hkdf-sha256-aes256gcm-ed25519"
    esk = X25519PrivateKey.from_private_bytes(epk_private)
    epk = esk.public_key().public_bytes_raw()
    rpk = bytes.fromhex(VECTORS["recipient"]["x25519"])
    shared = esk.exchange(X25519PublicKey.from_public_bytes(rpk))
    key = HKDF(SHA256(), 32, salt=epk + rpk, info=b"relay-seal/1 " + alg).derive(shared)
    aad = _frame(b"relay-seal/1 aad") + _frame(b"alice") + _frame(b"bob")
    ct = AESGCM(key).encrypt(iv, plaintext, aad)
    signed = b"".join(map(_frame, (b"relay-seal/1 sig", alg, b"alice", b"bob", rpk, epk, iv, ct)))
    signer = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex(VECTORS["sender"]["ed25519_private"])
    )
    sig = signer.sign(signed)
    if epk_private == bytes.fromhex(VECTORS["ephemeral"]):
        assert (epk.hex(), shared.hex(), key.hex()) == (
            VECTORS["epk"],
            VECTORS["shared"],
            VECTORS["key"],
        )
    parts = {"epk": epk, "iv": iv, "ct": ct, "sig": sig}
    return orjson.dumps(
        {"v": 1, "alg": alg.decode()} | {k: seal.b64url(v) for k, v in parts.items()}
    ).decode()


def test_the_documented_construction_gives_the_known_bodies() -> None:
    ephemeral, iv = bytes.fromhex(VECTORS["ephemeral"]), bytes.fromhex(VECTORS["iv"])
    for case in VECTORS["cases"]:
        assert documented_seal(case["body"].encode(), ephemeral, iv) == case["sealed"]


def test_a_validly_sealed_body_that_is_not_utf8_fails_to_open() -> None:
    sealed = documented_seal(b"\xff\xfe not text", bytes(32), bytes(12))
    with pytest.raises(seal.SealError) as caught:
        seal.open(sealed, BOB, ALICE.public, ALICE_BOB)
    assert caught.value.reason == "malformed"


# -- round trips, and what fails to open ----------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_any_text_opens_as_it_was_sealed(body: str) -> None:
    sealed = seal.seal(body, BOB.public, ALICE, ALICE_BOB)
    assert seal.open(sealed, BOB, ALICE.public, ALICE_BOB) == body
    assert len(sealed) == seal.sealed_size(len(body.encode()))


def test_each_seal_has_its_own_ephemeral_key_and_iv() -> None:
    one, two = (fields(seal.seal("same", BOB.public, ALICE, ALICE_BOB)) for _ in range(2))
    assert one["epk"] != two["epk"] and one["iv"] != two["iv"] and one["ct"] != two["ct"]


@pytest.mark.parametrize("name", ["epk", "iv", "ct", "sig"])
def test_a_tampered_field_fails_to_open(name: str) -> None:
    sealed = seal.seal("pay bob 10", BOB.public, ALICE, ALICE_BOB)
    tampered = with_field(sealed, name, flip(fields(sealed)[name]))
    with pytest.raises(seal.SealError) as caught:
        seal.open(tampered, BOB, ALICE.public, ALICE_BOB)
    assert caught.value.reason == "signature"  # the signature covers every field


def test_a_tampered_ciphertext_under_a_fresh_signature_fails_to_decrypt() -> None:
    """The AEAD holds on its own: a sender who re-signs an altered ciphertext gets nothing."""
    sealed = fields(seal.seal("pay bob 10", BOB.public, ALICE, ALICE_BOB))
    raw = {k: seal.unb64url(sealed[k]) for k in ("epk", "iv", "ct")}
    raw["ct"] = seal.unb64url(flip(sealed["ct"], at=3))
    signed = seal.signed_bytes(ALICE_BOB, BOB.public.x25519, raw["epk"], raw["iv"], raw["ct"])
    resigned = sealed | {"ct": seal.b64url(raw["ct"])}
    resigned["sig"] = seal.b64url(ALICE.ed25519_private.sign(signed))
    with pytest.raises(seal.SealError) as caught:
        seal.open(orjson.dumps(resigned).decode(), BOB, ALICE.public, ALICE_BOB)
    assert caught.value.reason == "decrypt"


def test_a_body_sealed_for_bob_does_not_open_for_carol() -> None:
    carol = seal.Identity.generate("carol")
    sealed = seal.seal("for bob only", BOB.public, ALICE, ALICE_BOB)
    with pytest.raises(seal.SealError):  # replayed to carol's mailbox
        seal.open(sealed, carol, ALICE.public, seal.Context("alice", "carol"))
    unnamed = seal.Identity(carol.x25519_private, carol.ed25519_private)
    with pytest.raises(seal.SealError):  # carol's key, bob's context: still not hers
        seal.open(sealed, unnamed, ALICE.public, ALICE_BOB)


def test_a_body_opens_only_from_the_sender_that_sealed_it() -> None:
    mallory = seal.Identity.generate("mallory")
    sealed = seal.seal("from alice", BOB.public, ALICE, ALICE_BOB)
    with pytest.raises(seal.SealError):  # claimed by mallory (the relay says from: mallory)
        seal.open(sealed, BOB, mallory.public, seal.Context("mallory", "bob"))
    with pytest.raises(seal.SealError):  # checked against the wrong key
        seal.open(
            sealed, BOB, seal.PublicKey(mallory.public.x25519, mallory.public.ed25519), ALICE_BOB
        )


def test_a_ciphertext_claimed_and_resigned_by_another_sender_fails_to_decrypt() -> None:
    """Mallory re-signs alice's ciphertext as her own: the associated data names alice."""
    mallory = seal.Identity.generate("mallory")
    sealed = fields(seal.seal("from alice", BOB.public, ALICE, ALICE_BOB))
    claim = seal.Context("mallory", "bob")
    raw = [seal.unb64url(sealed[k]) for k in ("epk", "iv", "ct")]
    signed = seal.signed_bytes(claim, BOB.public.x25519, *raw)
    resigned = sealed | {"sig": seal.b64url(mallory.ed25519_private.sign(signed))}
    with pytest.raises(seal.SealError) as caught:
        seal.open(orjson.dumps(resigned).decode(), BOB, mallory.public, claim)
    assert caught.value.reason == "decrypt"


def test_keys_that_name_another_mailbox_are_refused() -> None:
    with pytest.raises(ValueError, match="key of mailbox 'bob' used for 'carol'"):
        seal.seal("x", BOB.public, ALICE, seal.Context("alice", "carol"))
    sealed = seal.seal("x", BOB.public, ALICE, ALICE_BOB)
    with pytest.raises(seal.SealError) as caught:
        seal.open(sealed, BOB, ALICE.public, seal.Context("mallory", "bob"))
    assert caught.value.reason == "mailbox"


@pytest.mark.parametrize(
    ("sealed", "reason"),
    [
        ("hello", "malformed"),
        ("[1]", "malformed"),
        ('{"v":1}', "malformed"),
        ("extra", "malformed"),
        ("v2", "unsupported"),
        ("alg", "unsupported"),
        ("padded", "malformed"),
        ("noncanonical", "malformed"),
        ("short iv", "malformed"),
        ("short ct", "malformed"),
    ],
)
def test_what_is_not_a_sealed_body_fails_as_such(sealed: str, reason: str) -> None:
    good = seal.seal("x", BOB.public, ALICE, ALICE_BOB)
    f = fields(good)
    variants = {
        "extra": orjson.dumps(f | {"from": "alice"}).decode(),
        "v2": with_field(good, "v", 2),
        "alg": with_field(good, "alg", "x25519-hkdf-sha256-chacha20poly1305-ed25519"),
        "padded": with_field(good, "iv", f["iv"] + "=="),
        "noncanonical": with_field(good, "epk", f["epk"][:-1] + chr(ord(f["epk"][-1]) + 1)),
        "short iv": with_field(good, "iv", f["iv"][:-2]),
        "short ct": with_field(good, "ct", seal.b64url(b"\x00" * 15)),
    }
    with pytest.raises(seal.SealError) as caught:
        seal.open(variants.get(sealed, sealed), BOB, ALICE.public, ALICE_BOB)
    assert caught.value.reason == reason


# -- key files ---------------------------------------------------------------------------


def test_identity_and_public_key_files_round_trip() -> None:
    me = seal.Identity.generate("alice")
    again = seal.Identity.from_json(me.to_json())
    assert again == me and again.public == me.public
    assert seal.PublicKey.from_json(me.public.to_json()) == me.public
    file = orjson.loads(me.to_json())
    assert file["type"] == "relay-identity" and file["mailbox"] == "alice"
    public = orjson.loads(me.public.to_json())
    assert public == {k: file[k] for k in ("v", "mailbox", "x25519", "ed25519")} | {
        "type": "relay-public-key"
    }
    assert "private" not in me.public.to_json() and "private" not in repr(me)
    unnamed = seal.Identity.generate()
    assert "mailbox" not in orjson.loads(unnamed.to_json())


def test_bad_key_files_are_refused_with_the_reason() -> None:
    me = orjson.loads(seal.Identity.generate("alice").to_json())
    other = orjson.loads(seal.Identity.generate("alice").to_json())
    cases = {
        "public keys are not those": me | {"x25519": other["x25519"]},
        "not a relay-identity file": me | {"type": "relay-public-key"},
        "bad key": me | {"ed25519_private": me["ed25519_private"][:-1]},
        "not a mailbox id": me | {"mailbox": "no spaces"},
    }
    for message, obj in cases.items():
        with pytest.raises(ValueError, match=message):
            seal.Identity.from_json(orjson.dumps(obj))
    with pytest.raises(ValueError, match="not a relay-public-key file"):
        seal.PublicKey.from_json(orjson.dumps(me))  # an identity is not a public key
    with pytest.raises(ValueError, match="not JSON"):
        seal.PublicKey.from_json("ssh-ed25519 AAAA")


# -- size --------------------------------------------------------------------------------


def test_the_overhead_and_the_largest_body_that_fits_the_relays_limit() -> None:
    limit = 64 * 1024
    largest = seal.max_plaintext_bytes(limit)
    assert largest == 48962
    fits = seal.seal("é" * (largest // 2), BOB.public, ALICE, ALICE_BOB)
    assert len(fits) == seal.sealed_size(largest) <= limit
    assert seal.sealed_size(largest + 1) > limit
    assert seal.sealed_size(0) == len(VECTORS["cases"][1]["sealed"]) == 253
