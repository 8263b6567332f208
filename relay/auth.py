"""JWT verification, pure given the configured keys and the caller's `now_s`.

Which algorithm may verify a token is decided by the keys configured here, never by the
token: HS256 only with a shared secret, EdDSA / ES256 / RS256 only with a public key of
that type. PyJWT checks the signature; time, audience, issuer and subject are checked here
against the `now_s` the caller passes in, because PyJWT would read the wall clock.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.types import Options

from relay import policy
from relay.errors import AuthError

AUTH_FAILED = "invalid token"
"""The only message an `AuthError` ever carries: every failure looks the same."""

HS256_MIN_SECRET_BYTES = 32  # RFC 7518 section 3.2: at least the hash output size
RSA_MIN_BITS = 2048
MAX_TOKEN_CHARS = 8192  # refuse before parsing: nothing legitimate comes close

# The signature is checked by PyJWT; the claims are checked by `_check_claims`.
_DECODE_OPTIONS: Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "require": ["exp", "sub"],
    "enforce_minimum_key_length": True,
}


@attrs.frozen
class Identity:
    """Who a verified token speaks for, and until when (epoch seconds)."""

    mailbox: str
    expires_at_s: float


class TokenRefused(AuthError):
    """The one error `verify` raises. `reason` is for debug logs only, never for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(AUTH_FAILED)
        self.reason = reason


def _hs256_key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if len(key) < HS256_MIN_SECRET_BYTES:
        raise ValueError(f"HS256 secret must be at least {HS256_MIN_SECRET_BYTES} bytes")
    try:
        return HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
    except jwt.InvalidKeyError:
        raise ValueError("HS256 secret must not be a PEM, SSH or DER key") from None


def _load_public_key(pem: str | bytes) -> tuple[str, Any]:
    """The algorithm a PEM public key verifies, and the loaded key."""
    try:
        key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a usable PEM public key: {exc}") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA", key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC public key on {key.curve.name}: only P-256 (ES256) is allowed")
        return "ES256", key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < RSA_MIN_BITS:
            raise ValueError(f"RSA public key of {key.key_size} bits: at least {RSA_MIN_BITS}")
        return "RS256", key
    raise ValueError(f"unsupported public key type {type(key).__name__}")


@attrs.frozen(eq=False)
class Verifier:
    """Verifies relay tokens. Build it with `Verifier.create`, which loads keys once."""

    keys_by_alg: Mapping[str, tuple[Any, ...]] = attrs.field(repr=False)
    audience: str | None = None
    issuer: str | None = None
    leeway_s: float = 0

    @classmethod
    def create(
        cls,
        secret: str | bytes | None = None,
        public_key_pems: Sequence[str | bytes] = (),
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 0,
    ) -> "Verifier":
        """Raises ValueError for a missing, weak or unsupported key."""
        keys: dict[str, list[Any]] = {}
        if secret is not None:
            keys["HS256"] = [_hs256_key(secret)]
        for pem in public_key_pems:
            alg, key = _load_public_key(pem)
            keys.setdefault(alg, []).append(key)
        if not keys:
            raise ValueError("no HS256 secret and no public key configured")
        if leeway_s < 0:
            raise ValueError("leeway_s must not be negative")
        return cls(
            keys_by_alg={alg: tuple(found) for alg, found in keys.items()},
            audience=audience,
            issuer=issuer,
            leeway_s=leeway_s,
        )

    def verify(self, token: str, now_s: float) -> Identity:
        """The identity `token` proves at `now_s`; raises AuthError on any failure."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRefused("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise TokenRefused(f"malformed token: {type(exc).__name__}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.keys_by_alg:
            raise TokenRefused(f"algorithm not allowed: {str(alg)[:16]!r}")
        claims = self._decode(token, alg, self.keys_by_alg[alg])
        return self._check_claims(claims, now_s)

    def _decode(self, token: str, alg: str, keys: tuple[Any, ...]) -> dict[str, Any]:
        """Claims of a token whose signature one of `keys` verifies, with `alg` only."""
        for key in keys:
            try:
                return jwt.decode(token, key, algorithms=[alg], options=_DECODE_OPTIONS)
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise TokenRefused(f"undecodable token: {type(exc).__name__}") from None
        raise TokenRefused("bad signature")

    def _check_claims(self, claims: dict[str, Any], now_s: float) -> Identity:
        exp = _numeric_date(claims, "exp")
        if exp is None:
            raise TokenRefused("exp missing or not a finite number")
        if exp <= now_s - self.leeway_s:
            raise TokenRefused("expired")
        for claim in ("nbf", "iat"):
            if claim in claims:
                moment = _numeric_date(claims, claim)
                if moment is None or moment > now_s + self.leeway_s:
                    raise TokenRefused(f"{claim} invalid or in the future")
        if self.audience is None:
            if "aud" in claims:
                raise TokenRefused("aud present but no audience configured")
        elif not _audience_matches(claims.get("aud"), self.audience):
            raise TokenRefused("aud mismatch")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise TokenRefused("iss mismatch")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not policy.is_valid_mailbox(sub):
            raise TokenRefused("sub is not a mailbox id")
        return Identity(mailbox=sub, expires_at_s=exp)


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """A finite JSON number claim (RFC 7519 NumericDate), or None."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        moment = float(value)
    except OverflowError:
        return None
    return moment if math.isfinite(moment) else None


def _audience_matches(aud: object, audience: str) -> bool:
    if isinstance(aud, str):
        return aud == audience
    return isinstance(aud, list) and audience in aud


def mint_token(
    secret: str | bytes,
    mailbox: str,
    ttl_s: int,
    now_s: float,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """An HS256 token for `mailbox`, valid from `now_s` for `ttl_s` seconds (CLI and tests)."""
    if not policy.is_valid_mailbox(mailbox):
        raise ValueError(f"not a mailbox id ({policy.MAILBOX_ID_RULE})")
    if ttl_s < 1:
        raise ValueError("ttl_s must be at least 1")
    now = int(now_s)
    claims: dict[str, Any] = {"sub": mailbox, "iat": now, "exp": now + ttl_s}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, _hs256_key(secret), algorithm="HS256")
