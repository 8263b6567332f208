"""Sealed bodies: end-to-end encryption and signing of a message body, so the relay (its
Redis, its logs, its operator) holds only ciphertext. relay/web/seal.js is the same in
the browser; README.md, "Sealed messages", documents the construction byte by byte.

    from relay import seal

    alice, bob = seal.Identity.generate("alice"), seal.Identity.generate("bob")
    body = seal.seal("hi", bob.public, alice, seal.Context("alice", "bob"))
    assert seal.open(body, bob, alice.public, seal.Context("alice", "bob")) == "hi"

A sealed body is one JSON object, `{"v":1,"alg":ALG,"epk":…,"iv":…,"ct":…,"sig":…}`
(base64url, no padding): a fresh X25519 key pair per message (`epk`, its public half)
agrees a key with the recipient's X25519 key; HKDF-SHA-256 makes an AES-256-GCM key of
it; the ciphertext's associated data names sender and recipient mailbox; the sender's
Ed25519 key signs a length-prefixed transcript of everything (never the JSON text).
`open` raises SealError for anything that is not exactly that, for these parties.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from typing import Any

import attrs
import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.policy import MAILBOX_ID_RULE, is_valid_mailbox

VERSION = 1
ALG = "x25519-hkdf-sha256-aes256gcm-ed25519"
LABEL = b"relay-seal/1"
HKDF_INFO = LABEL + b" " + ALG.encode()
AAD_LABEL = LABEL + b" aad"
SIG_LABEL = LABEL + b" sig"
KEY_BYTES, IV_BYTES, TAG_BYTES, SIG_BYTES = 32, 12, 16, 64
IDENTITY_TYPE, PUBLIC_KEY_TYPE = "relay-identity", "relay-public-key"
FIELDS = ("v", "alg", "epk", "iv", "ct", "sig")


class SealError(Exception):
    """A sealed body did not open. `reason` is `malformed` (not a sealed body, or not
    UTF-8 inside), `unsupported` (another version or algorithm), `signature` (not signed by
    this sender for this recipient and these mailboxes, or altered), `decrypt` (the
    ciphertext does not decrypt: altered, or for another key) or `mailbox` (a key names
    another mailbox than the context)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@attrs.frozen
class Context:
    """Who sends to whom: the mailbox ids bound into every sealed body (the relay's `from`
    and the recipient's own mailbox when opening)."""

    sender: str
    recipient: str


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: object, size: int | None = None) -> bytes:
    """Strict base64url without padding: only the canonical spelling of some bytes (of
    `size` bytes, when given); ValueError otherwise."""
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not a base64url string")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error:
        raise ValueError("not base64url") from None
    if b64url(data) != text:
        raise ValueError("not canonical base64url")
    if size is not None and len(data) != size:
        raise ValueError(f"{len(data)} bytes, expected {size}")
    return data


def _mailbox(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_valid_mailbox(value):
        raise ValueError(f"mailbox is not a mailbox id ({MAILBOX_ID_RULE})")
    return value


def _load(text: str | bytes, kind: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError(f"not a {kind} file: not JSON") from None
    if not isinstance(obj, dict) or obj.get("type") != kind or obj.get("v") != VERSION:
        raise ValueError(f"not a {kind} file (version {VERSION})")
    return obj


@attrs.frozen
class PublicKey:
    """What others need to seal to a mailbox and to check what it sealed: its X25519 and
    Ed25519 public keys (32 bytes each), and the mailbox they belong to, when named."""

    x25519: bytes
    ed25519: bytes
    mailbox: str | None = None

    def to_json(self) -> str:
        obj: dict[str, Any] = {"v": VERSION, "type": PUBLIC_KEY_TYPE}
        if self.mailbox is not None:
            obj["mailbox"] = self.mailbox
        obj |= {"x25519": b64url(self.x25519), "ed25519": b64url(self.ed25519)}
        return orjson.dumps(obj).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> PublicKey:
        """Read a public-key file's text; ValueError says what is wrong."""
        obj = _load(text, PUBLIC_KEY_TYPE)
        try:
            x25519 = unb64url(obj.get("x25519"), KEY_BYTES)
            ed25519 = unb64url(obj.get("ed25519"), KEY_BYTES)
        except ValueError as exc:
            raise ValueError(f"bad key in the public-key file: {exc}") from None
        return cls(x25519, ed25519, _mailbox(obj.get("mailbox")))


@attrs.frozen
class Identity:
    """A mailbox's private keys: X25519 to open what is sealed to it, Ed25519 to sign what
    it seals. Never leaves its owner; `public` is what others get."""

    x25519_private: X25519PrivateKey = attrs.field(repr=False, eq=False)
    ed25519_private: Ed25519PrivateKey = attrs.field(repr=False, eq=False)
    mailbox: str | None = None
    public: PublicKey = attrs.field(init=False)

    @public.default
    def _public(self) -> PublicKey:
        return PublicKey(
            self.x25519_private.public_key().public_bytes_raw(),
            self.ed25519_private.public_key().public_bytes_raw(),
            self.mailbox,
        )

    @classmethod
    def generate(cls, mailbox: str | None = None) -> Identity:
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate(), _mailbox(mailbox))

    @classmethod
    def from_private_bytes(
        cls, x25519: bytes, ed25519: bytes, mailbox: str | None = None
    ) -> Identity:
        return cls(
            X25519PrivateKey.from_private_bytes(x25519),
            Ed25519PrivateKey.from_private_bytes(ed25519),
            _mailbox(mailbox),
        )

    def to_json(self) -> str:
        """The private identity file's text: the public key file's fields plus the two
        private keys (the X25519 scalar and the Ed25519 seed)."""
        obj = orjson.loads(self.public.to_json()) | {
            "type": IDENTITY_TYPE,
            "x25519_private": b64url(self.x25519_private.private_bytes_raw()),
            "ed25519_private": b64url(self.ed25519_private.private_bytes_raw()),
        }
        return orjson.dumps(obj).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Identity:
        """Read a private identity file's text; ValueError when it is malformed or its
        public keys are not those of its private keys."""
        obj = _load(text, IDENTITY_TYPE)
        try:
            identity = cls.from_private_bytes(
                unb64url(obj.get("x25519_private"), KEY_BYTES),
                unb64url(obj.get("ed25519_private"), KEY_BYTES),
                _mailbox(obj.get("mailbox")),
            )
            public = (
                unb64url(obj.get("x25519"), KEY_BYTES),
                unb64url(obj.get("ed25519"), KEY_BYTES),
            )
        except ValueError as exc:
            raise ValueError(f"bad key in the identity file: {exc}") from None
        if public != (identity.public.x25519, identity.public.ed25519):
            raise ValueError("the identity file's public keys are not those of its private keys")
        return identity


# -- the construction --------------------------------------------------------------------


def _frame(data: bytes) -> bytes:
    """One field of a transcript: its length as 4 bytes big-endian, then the bytes."""
    return struct.pack(">I", len(data)) + data


def associated_data(context: Context) -> bytes:
    """The AES-GCM associated data: the mailboxes, so a body opens only between them."""
    return b"".join(map(_frame, (AAD_LABEL, context.sender.encode(), context.recipient.encode())))


def signed_bytes(
    context: Context, recipient_x25519: bytes, epk: bytes, iv: bytes, ct: bytes
) -> bytes:
    """What the sender's Ed25519 key signs: every field of the sealed body and of the
    context, each length-prefixed, in this order."""
    parts = (
        SIG_LABEL,
        ALG.encode(),
        context.sender.encode(),
        context.recipient.encode(),
        recipient_x25519,
        epk,
        iv,
        ct,
    )
    return b"".join(map(_frame, parts))


def _key(shared: bytes, epk: bytes, recipient_x25519: bytes) -> bytes:
    hkdf = HKDF(SHA256(), KEY_BYTES, salt=epk + recipient_x25519, info=HKDF_INFO)
    return hkdf.derive(shared)


def seal(body: str, recipient: PublicKey, sender: Identity, context: Context) -> str:
    """`body` sealed for `recipient` (its public key) and signed by `sender`, bound to
    `context`'s mailboxes: a JSON string to send as a message's body."""
    ephemeral = X25519PrivateKey.generate().private_bytes_raw()
    return seal_with(body, recipient, sender, context, ephemeral=ephemeral, iv=os.urandom(IV_BYTES))


def seal_with(
    body: str,
    recipient: PublicKey,
    sender: Identity,
    context: Context,
    *,
    ephemeral: bytes,
    iv: bytes,
) -> str:
    """`seal` with a given ephemeral X25519 private key and iv: for known-answer tests
    only (a reused ephemeral key or iv gives away what it sealed)."""
    mismatch = _mismatch(recipient.mailbox, sender.mailbox, context)
    if mismatch is not None:
        raise ValueError(mismatch)
    if len(iv) != IV_BYTES:
        raise ValueError(f"the iv must be {IV_BYTES} bytes")
    esk = X25519PrivateKey.from_private_bytes(ephemeral)
    epk = esk.public_key().public_bytes_raw()
    shared = esk.exchange(X25519PublicKey.from_public_bytes(recipient.x25519))
    key = _key(shared, epk, recipient.x25519)
    ct = AESGCM(key).encrypt(iv, body.encode("utf-8"), associated_data(context))
    sig = sender.ed25519_private.sign(signed_bytes(context, recipient.x25519, epk, iv, ct))
    parts = {"epk": epk, "iv": iv, "ct": ct, "sig": sig}
    sealed = {"v": VERSION, "alg": ALG} | {name: b64url(v) for name, v in parts.items()}
    return orjson.dumps(sealed).decode()


def _mismatch(recipient: str | None, sender: str | None, context: Context) -> str | None:
    """Why keys that name their mailboxes do not fit the context, or None."""
    for named, party in ((recipient, context.recipient), (sender, context.sender)):
        if named is not None and named != party:
            return f"the key of mailbox {named!r} used for {party!r}"
    return None


def _fields(sealed: str) -> tuple[bytes, bytes, bytes, bytes]:
    """epk, iv, ct and sig of a sealed body, or SealError."""
    try:
        obj = orjson.loads(sealed)
    except orjson.JSONDecodeError:
        raise SealError("malformed", "not a sealed body (not JSON)") from None
    if not isinstance(obj, dict) or set(obj) != set(FIELDS):
        raise SealError("malformed", f"not a sealed body (expected the fields {', '.join(FIELDS)})")
    if obj["v"] != VERSION or obj["alg"] != ALG:
        raise SealError("unsupported", f"version {obj['v']!r}, alg {str(obj['alg'])[:40]!r}")
    try:
        epk = unb64url(obj["epk"], KEY_BYTES)
        iv = unb64url(obj["iv"], IV_BYTES)
        ct = unb64url(obj["ct"])
        sig = unb64url(obj["sig"], SIG_BYTES)
    except ValueError as exc:
        raise SealError("malformed", f"bad field: {exc}") from None
    if len(ct) < TAG_BYTES:
        raise SealError("malformed", "ciphertext shorter than its tag")
    return epk, iv, ct, sig


def open(sealed: str, recipient: Identity, sender: PublicKey, context: Context) -> str:
    """The body `sender` sealed for `recipient` in `context`; SealError when it is not
    exactly that (never a body that was altered, replayed to another mailbox or claimed
    by another sender). Call it as `seal.open`: the name is the builtin's."""
    mismatch = _mismatch(recipient.mailbox, sender.mailbox, context)
    if mismatch is not None:
        raise SealError("mailbox", mismatch)
    epk, iv, ct, sig = _fields(sealed)
    own = recipient.public.x25519
    try:
        Ed25519PublicKey.from_public_bytes(sender.ed25519).verify(
            sig, signed_bytes(context, own, epk, iv, ct)
        )
    except InvalidSignature:
        raise SealError(
            "signature", "not sealed by this sender for this recipient, or altered"
        ) from None
    try:
        shared = recipient.x25519_private.exchange(X25519PublicKey.from_public_bytes(epk))
        body = AESGCM(_key(shared, epk, own)).decrypt(iv, ct, associated_data(context))
    except (InvalidTag, ValueError):  # ValueError: a low-order epk (an all-zero secret)
        raise SealError("decrypt", "the ciphertext does not decrypt") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise SealError("malformed", "the sealed body is not UTF-8 text") from None


def _b64url_length(size: int) -> int:
    return (4 * size + 2) // 3


_FIXED = len(orjson.dumps(dict.fromkeys(FIELDS, "") | {"v": VERSION, "alg": ALG})) + sum(
    map(_b64url_length, (KEY_BYTES, IV_BYTES, SIG_BYTES))
)


def sealed_size(body_bytes: int) -> int:
    """The sealed body's length (ASCII, so bytes too) for a body of `body_bytes` UTF-8 bytes."""
    return _FIXED + _b64url_length(body_bytes + TAG_BYTES)


def max_plaintext_bytes(max_body_bytes: int) -> int:
    """The largest body (UTF-8 bytes) whose sealed form fits the relay's `max_body_bytes`
    (negative when not even an empty body does)."""
    return (3 * (max_body_bytes - _FIXED)) // 4 - TAG_BYTES
