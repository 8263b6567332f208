"""Pure rules: mailbox ids, durations, ttl bounds, expiry (integers for time)."""

import pytest

from relay import policy
from relay.codes import ErrorCode
from relay.errors import BadFrame, TtlTooLong


@pytest.mark.parametrize(
    "mailbox",
    ["a", "bob", "Alice.Smith", "user_1", "org:team/device-2", "x@example.org", "a" * 128],
)
def test_mailbox_ids_valid(mailbox: str) -> None:
    assert policy.is_valid_mailbox(mailbox)


@pytest.mark.parametrize(
    "mailbox",
    [
        "",
        "a" * 129,
        "bob smith",
        "bob\n",
        "\nbob",
        "bób",  # non-ASCII: outside the charset even though it is one character
        "bob!",
        "a+b",
        "١٢٣",  # Arabic-Indic digits must not pass as [0-9]
    ],
)
def test_mailbox_ids_invalid(mailbox: str) -> None:
    assert not policy.is_valid_mailbox(mailbox)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 604800),
        ("3600", 3600),
        ("1", 1),
        (" 30s ", 30),
    ],
)
def test_parse_duration_accepts_units_and_plain_seconds(text: str, seconds: int) -> None:
    assert policy.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "s", "1.5h", "-5", "-5s", "10w", "10 s", "1H", "h1", "1e3", "٣s", "abc"]
)
def test_parse_duration_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        policy.parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "0d"])
def test_parse_duration_rejects_zero(text: str) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        policy.parse_duration(text)


def test_resolve_ttl_defaults_to_retention() -> None:
    assert policy.resolve_ttl_s(None, 604800) == 604800


@pytest.mark.parametrize("ttl", [1, 3600, 604800])
def test_resolve_ttl_within_bounds(ttl: int) -> None:
    assert policy.resolve_ttl_s(ttl, 604800) == ttl


def test_resolve_ttl_longer_than_retention_is_an_error_not_capped() -> None:
    with pytest.raises(TtlTooLong) as info:
        policy.resolve_ttl_s(900000, 604800)
    assert info.value.message == "ttl 900000 exceeds retention 604800 s"
    assert info.value.code is ErrorCode.TTL_TOO_LONG


@pytest.mark.parametrize("ttl", [0, -1])
def test_resolve_ttl_below_one_is_bad_frame(ttl: int) -> None:
    with pytest.raises(BadFrame) as info:
        policy.resolve_ttl_s(ttl, 604800)
    assert info.value.code is ErrorCode.BAD_FRAME


def test_expires_at_ms() -> None:
    assert policy.expires_at_ms(1_700_000_000_000, 3600) == 1_700_003_600_000
    assert policy.expires_at_ms(0, 1) == 1000
