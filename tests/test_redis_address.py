"""`--redis-url`: every form parses to where the relay connects, and no password ever shows."""

from __future__ import annotations

import pytest

from relay.redis.address import parse, redact

SECRET = "s3cr%40t"  # "s3cr@t", URL-escaped


def test_one_server_forms_connect_as_given() -> None:
    for url in ("redis://h:1/2", f"rediss://u:{SECRET}@h:1", "unix:///tmp/r.sock"):
        address = parse(url)
        assert address.kind == "single" and address.url == url
    assert parse("rediss://h:1").tls and not parse("redis://h:1").tls


def test_a_cluster_address_lists_its_seeds_and_credentials() -> None:
    address = parse(f"redis+cluster://relay:{SECRET}@10.0.0.1:7000,10.0.0.2,[::1]:7002?tls=1")
    assert address.kind == "cluster"
    assert address.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (address.username, address.password, address.tls) == ("relay", "s3cr@t", True)
    assert address.node_url(("10.0.0.2", 6379)) == f"rediss://relay:{SECRET}@10.0.0.2:6379"
    assert address.node_url(("::1", 7002)).endswith("@[::1]:7002")
    assert parse("rediss+cluster://h:1").tls


def test_a_sentinel_address_names_its_master_and_database() -> None:
    url = f"redis+sentinel://:{SECRET}@s1:26379,s2/relaymaster/3?sentinel_password=pw"
    address = parse(url)
    assert address.kind == "sentinel"
    assert address.nodes == (("s1", 26379), ("s2", 26379))
    assert (address.master_name, address.db, address.password) == ("relaymaster", 3, "s3cr@t")
    assert address.node_url(("10.0.0.9", 6380)) == f"redis://:{SECRET}@10.0.0.9:6380/3"
    assert address.sentinel_url(("s1", 26379)) == "redis://:pw@s1:26379"
    assert parse("redis+sentinel://s1/m").sentinel_url(("s1", 26379)) == "redis://s1:26379"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"http://u:{SECRET}@h", "scheme 'http://'"),
        (f"redis+cluster://u:{SECRET}@h:1/0", "no path"),
        (f"redis+sentinel://u:{SECRET}@h:1", "/MASTER-NAME"),
        (f"redis+sentinel://u:{SECRET}@h:1/m/x", "must be a number"),
        (f"redis+cluster://u:{SECRET}@h:port", "not a number"),
        (f"redis+cluster://u:{SECRET}@h:70000", "out of range"),
        (f"redis+cluster://u:{SECRET}@h:1,,h:2", "empty host"),
    ],
)
def test_a_malformed_address_is_refused_without_its_password(url: str, says: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse(url)
    assert says in str(refused.value)
    assert "s3cr" not in str(refused.value)


def test_redacted_addresses_and_reprs_hold_no_password() -> None:
    for url in (
        f"redis://u:{SECRET}@h:1/0",
        f"redis+cluster://u:{SECRET}@h:1,h:2",
        f"redis+sentinel://:{SECRET}@h:1/m?sentinel_password={SECRET}&x=1",
    ):
        address = parse(url)
        for shown in (address.redacted(), repr(address), redact(url)):
            assert "s3cr" not in shown, shown
        assert "***" in address.redacted()
    assert redact("redis+sentinel://h:1/m?x=1") == "redis+sentinel://h:1/m?x=1"
