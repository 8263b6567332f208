"""JWT verification with integers for time: algorithms, claims, and one look for every failure."""

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from relay.auth import AUTH_FAILED, Identity, TokenRefused, Verifier, mint_token
from relay.errors import AuthError

NOW = 1_700_000_000
SECRET = "correct horse battery staple, 32+ bytes long"
OTHER_SECRET = "another secret that is long enough to be used"

ED_KEY = ed25519.Ed25519PrivateKey.generate()
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "bob", "iat": NOW, "exp": NOW + 3600}
    base.update(extra)
    return {name: value for name, value in base.items() if value is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    """Signed by hand: PyJWT's encoder refuses some of the malformed claims tested here."""
    return handmade({"alg": "HS256", "typ": "JWT"}, payload, secret.encode())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand: HMAC-SHA256 with any key (even a PEM), or unsigned."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    if hmac_key is None:
        return signing_input + "."
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def refuse(verifier: Verifier, token: str, now_s: float = NOW, *, why: str = "") -> TokenRefused:
    """Assert the token is refused with the fixed message, for the reason containing `why`."""
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now_s)
    error = info.value
    assert str(error) == AUTH_FAILED
    assert isinstance(error, TokenRefused)
    assert why in error.reason
    return error


HS = Verifier.create(secret=SECRET)


# --- HS256 and time ------------------------------------------------------------------------


def test_hs256_ok() -> None:
    token = mint_token(SECRET, "bob", 3600, NOW)
    assert HS.verify(token, NOW) == Identity(mailbox="bob", expires_at_s=NOW + 3600)
    assert HS.verify(token, NOW + 3599).mailbox == "bob"


def test_bytes_secret_is_the_same_secret() -> None:
    token = mint_token(SECRET.encode(), "bob", 60, NOW)
    assert Verifier.create(secret=SECRET.encode()).verify(token, NOW).mailbox == "bob"
    assert HS.verify(token, NOW).mailbox == "bob"


def test_expired() -> None:
    token = mint_token(SECRET, "bob", 3600, NOW)
    refuse(HS, token, NOW + 3600, why="expired")
    refuse(HS, token, NOW + 10**6, why="expired")


def test_leeway_extends_exp_and_nbf() -> None:
    lenient = Verifier.create(secret=SECRET, leeway_s=30)
    token = mint_token(SECRET, "bob", 3600, NOW)
    assert lenient.verify(token, NOW + 3620).mailbox == "bob"
    refuse(lenient, token, NOW + 3630, why="expired")
    early = hs256(claims(nbf=NOW + 20))
    assert lenient.verify(early, NOW).mailbox == "bob"
    refuse(HS, early, NOW, why="nbf")


def test_nbf_in_future() -> None:
    refuse(HS, hs256(claims(nbf=NOW + 60)), why="nbf")
    assert HS.verify(hs256(claims(nbf=NOW)), NOW).mailbox == "bob"


def test_iat_in_future() -> None:
    refuse(HS, hs256(claims(iat=NOW + 60)), why="iat")
    assert HS.verify(hs256(claims(iat=NOW - 60)), NOW).mailbox == "bob"


def test_fractional_times_are_numeric_dates() -> None:
    assert HS.verify(hs256(claims(exp=NOW + 0.5)), NOW).expires_at_s == NOW + 0.5


@pytest.mark.parametrize("bad", ["soon", True, [NOW + 60], {"t": 1}, 10**400])
@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_time_claims_must_be_finite_numbers(claim: str, bad: Any) -> None:
    refuse(HS, hs256(claims(**{claim: bad})), why=claim)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_exp_refused(bad: float) -> None:
    refuse(
        HS, hs256(claims(exp=bad)), why="exp"
    )  # Python's json, inside PyJWT, reads Infinity and NaN


def test_wrong_secret() -> None:
    refuse(HS, hs256(claims(), secret=OTHER_SECRET), why="signature")


def test_tampered_payload() -> None:
    header, _, signature = hs256(claims()).split(".")
    forged = b64(json.dumps(claims(sub="mallory")).encode())
    refuse(HS, f"{header}.{forged}.{signature}", why="signature")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", None, 5])
def test_alg_none_and_missing_alg_refused(alg: Any) -> None:
    refuse(HS, handmade({"alg": alg, "typ": "JWT"}, claims(), None), why="algorithm")
    refuse(HS, handmade({"alg": alg, "typ": "JWT"}, claims(), SECRET.encode()), why="algorithm")


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "...", "ey.ey.ey", "x" * 10_000])
def test_malformed_tokens_refused(token: str) -> None:
    refuse(HS, token)


# --- public keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("private_key", "alg"), [(ED_KEY, "EdDSA"), (EC_KEY, "ES256"), (RSA_KEY, "RS256")]
)
def test_public_key_algorithms(private_key: Any, alg: str) -> None:
    verifier = Verifier.create(public_key_pems=(public_pem(private_key),))
    token = jwt.encode(claims(), private_key, algorithm=alg)
    assert verifier.verify(token, NOW) == Identity(mailbox="bob", expires_at_s=NOW + 3600)
    refuse(
        verifier, mint_token(SECRET, "bob", 60, NOW), why="algorithm"
    )  # no secret configured: no HS256


def test_pem_given_as_str() -> None:
    verifier = Verifier.create(public_key_pems=(public_pem(ED_KEY).decode(),))
    assert verifier.verify(jwt.encode(claims(), ED_KEY, algorithm="EdDSA"), NOW).mailbox == "bob"


def test_public_key_algorithm_only_with_a_key_of_that_type() -> None:
    verifier = Verifier.create(secret=SECRET, public_key_pems=(public_pem(ED_KEY),))
    refuse(verifier, jwt.encode(claims(), RSA_KEY, algorithm="RS256"), why="algorithm")
    refuse(verifier, jwt.encode(claims(), EC_KEY, algorithm="ES256"), why="algorithm")
    refuse(HS, jwt.encode(claims(), ED_KEY, algorithm="EdDSA"), why="algorithm")


def test_token_signed_by_an_unconfigured_key_of_a_configured_type() -> None:
    verifier = Verifier.create(public_key_pems=(public_pem(EC_KEY),))
    stranger = ec.generate_private_key(ec.SECP256R1())
    refuse(verifier, jwt.encode(claims(), stranger, algorithm="ES256"), why="signature")


def test_any_of_several_keys_of_one_type_verifies() -> None:
    second = ed25519.Ed25519PrivateKey.generate()
    verifier = Verifier.create(public_key_pems=(public_pem(ED_KEY), public_pem(second)))
    for key in (ED_KEY, second):
        assert verifier.verify(jwt.encode(claims(), key, algorithm="EdDSA"), NOW).mailbox == "bob"


@pytest.mark.parametrize("extra_secret", [None, SECRET])
def test_algorithm_confusion_refused(extra_secret: str | None) -> None:
    """An HS256 token whose HMAC key is the RSA public key PEM must never verify."""
    pem = public_pem(RSA_KEY)
    verifier = Verifier.create(secret=extra_secret, public_key_pems=(pem,))
    why = "algorithm" if extra_secret is None else "signature"
    for key in (pem, pem.strip(), pem.replace(b"\n", b"\r\n")):
        refuse(verifier, handmade({"alg": "HS256", "typ": "JWT"}, claims(), key), why=why)


def test_rs256_token_not_verified_with_the_secret_as_key() -> None:
    refuse(HS, handmade({"alg": "RS256", "typ": "JWT"}, claims(), SECRET.encode()), why="algorithm")


# --- audience, issuer, subject -------------------------------------------------------------


def test_audience_and_issuer_match() -> None:
    verifier = Verifier.create(secret=SECRET, audience="relay", issuer="https://idp")
    token = mint_token(SECRET, "bob", 60, NOW, audience="relay", issuer="https://idp")
    assert verifier.verify(token, NOW).mailbox == "bob"
    listed = hs256(claims(aud=["other", "relay"], iss="https://idp"))
    assert verifier.verify(listed, NOW).mailbox == "bob"


@pytest.mark.parametrize("aud", [None, "other", ["other"], [], "", 5])
def test_audience_mismatch_or_missing(aud: Any) -> None:
    verifier = Verifier.create(secret=SECRET, audience="relay")
    refuse(verifier, hs256(claims(aud=aud)), why="aud")


@pytest.mark.parametrize("aud", ["relay", ["relay"], [], ""])
def test_aud_refused_when_no_audience_configured(aud: Any) -> None:
    refuse(HS, hs256(claims(aud=aud)), why="aud")


@pytest.mark.parametrize("iss", [None, "https://evil", ["https://idp"], 5])
def test_issuer_mismatch_or_missing(iss: Any) -> None:
    verifier = Verifier.create(secret=SECRET, issuer="https://idp")
    refuse(verifier, hs256(claims(iss=iss)), why="iss")


def test_any_issuer_when_none_configured() -> None:
    assert HS.verify(hs256(claims(iss="whoever")), NOW).mailbox == "bob"


def test_missing_exp() -> None:
    refuse(HS, hs256({"sub": "bob", "iat": NOW}), why="MissingRequiredClaim")


def test_missing_sub() -> None:
    refuse(HS, hs256({"exp": NOW + 60, "iat": NOW}), why="MissingRequiredClaim")


@pytest.mark.parametrize("sub", ["", "bob smith", "a" * 129, "b\u00f6b", 42, ["bob"]])
def test_sub_must_be_a_mailbox_id(sub: Any) -> None:
    refuse(HS, hs256(claims(sub=sub)), why="sub")


def test_sub_with_every_allowed_character() -> None:
    mailbox = "Az09._:@/-"
    assert HS.verify(hs256(claims(sub=mailbox)), NOW).mailbox == mailbox


# --- one look for every failure ------------------------------------------------------------


def test_every_failure_has_the_same_message_and_no_token() -> None:
    rs = Verifier.create(public_key_pems=(public_pem(RSA_KEY),))
    aud = Verifier.create(secret=SECRET, audience="relay", issuer="https://idp")
    cases = [
        (HS, mint_token(SECRET, "bob", 60, NOW - 120)),
        (HS, hs256(claims(nbf=NOW + 60))),
        (HS, hs256(claims(iat=NOW + 60))),
        (HS, hs256(claims(), secret=OTHER_SECRET)),
        (HS, handmade({"alg": "none"}, claims(), None)),
        (rs, handmade({"alg": "HS256"}, claims(), public_pem(RSA_KEY))),
        (aud, hs256(claims(aud="other", iss="https://idp"))),
        (aud, hs256(claims(aud="relay", iss="https://evil"))),
        (HS, hs256({"sub": "bob"})),
        (HS, hs256({"exp": NOW + 60})),
        (HS, hs256(claims(sub="not a mailbox"))),
        (HS, "garbage"),
    ]
    reasons = set()
    for verifier, token in cases:
        error = refuse(verifier, token)
        assert error.args == (AUTH_FAILED,)
        assert token not in error.reason
        reasons.add(error.reason)
    assert len(reasons) > 5  # the detail is kept for debug logs


@given(st.text(max_size=300))
def test_fuzz_arbitrary_token_only_raises_auth_error(token: str) -> None:
    with pytest.raises(AuthError):
        HS.verify(token, NOW)


@given(
    st.dictionaries(
        st.sampled_from(["alg", "typ", "kid", "crit", "b64"]),
        st.none() | st.booleans() | st.text(max_size=8) | st.lists(st.text(max_size=4), max_size=2),
    )
)
def test_fuzz_headers_only_raise_auth_error(header: dict[str, Any]) -> None:
    with pytest.raises(AuthError):
        HS.verify(handmade(header, claims(), OTHER_SECRET.encode()), NOW)


# --- configuration -------------------------------------------------------------------------


def test_create_needs_a_key() -> None:
    with pytest.raises(ValueError, match="no HS256 secret"):
        Verifier.create()


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_short_secret_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Verifier.create(secret=secret)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        mint_token(secret, "bob", 60, NOW)


def test_pem_as_secret_refused() -> None:
    with pytest.raises(ValueError, match="PEM"):
        Verifier.create(secret=public_pem(RSA_KEY))


@pytest.mark.parametrize(
    "private_key",
    [
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
        ed448.Ed448PrivateKey.generate(),
    ],
)
def test_unsupported_public_keys_refused(private_key: Any) -> None:
    with pytest.raises(ValueError):
        Verifier.create(public_key_pems=(public_pem(private_key),))


def test_garbage_pem_refused() -> None:
    with pytest.raises(ValueError, match="PEM"):
        Verifier.create(public_key_pems=(b"-----BEGIN PUBLIC KEY-----\nnope\n",))


def test_negative_leeway_refused() -> None:
    with pytest.raises(ValueError, match="leeway"):
        Verifier.create(secret=SECRET, leeway_s=-1)


def test_verifier_repr_hides_the_secret() -> None:
    assert SECRET not in repr(HS)
    assert SECRET.encode().hex() not in repr(HS)


def test_mint_token_claims() -> None:
    token = mint_token(SECRET, "bob", 60, NOW + 0.9, audience="relay", issuer="https://idp")
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "sub": "bob",
        "iat": NOW,
        "exp": NOW + 60,
        "aud": "relay",
        "iss": "https://idp",
    }


@pytest.mark.parametrize(("mailbox", "ttl_s"), [("bad id", 60), ("bob", 0)])
def test_mint_token_refuses_bad_input(mailbox: str, ttl_s: int) -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, mailbox, ttl_s, NOW)
