"""`relay probe` as README tells a user to run it: a separate process against a relay
process (or an in-process relay) on a real Redis; and the policy document on the public
port, which the probe reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from process_fixtures import relay_process, run_cli
from relay_fixtures import (
    DEADLINE_S,
    SECRET,
    HttpResponse,
    RelayFactory,
    http,
    keys_under,
    poll_until,
    raw_session,
    unsigned_token,
)

from relay.auth import Verifier
from relay.embedded import EmbeddedServer, free_loopback_port
from relay.errors import AuthError
from relay.probe import forge_unsigned, policy_url_for, unverified_claims
from relay.redis.admin import RedisClient, connect
from relay.server import RunningRelay

pytest_plugins = ["relay_fixtures"]

CHECKS = {
    "policy",
    "policy_matches_welcome",
    "ttl_limit",
    "expiry",
    "ack_deletes",
    "ref_dedupe",
    "ref_conflict",
    "query_token_refused",
    "alg_none_refused",
    "redis_persistence",
    "redis_eviction",
    "redis_slowlog",
    "bodies_logged",
}
POLICY = "/.well-known/relay-policy"
PERSISTENT = "on (allowed by --allow-persistent-redis)"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


def leftovers(redis_client: RedisClient, prefix: str, mailbox: str) -> list[str]:
    """Keys of the mailbox other than idempotency records (those may stay for the dedupe
    window, by contract)."""
    return [k for k in keys_under(redis_client, prefix) if mailbox in k and ":ref:" not in k]


async def policy_showing(port: int, epoch: str) -> HttpResponse:
    """Poll the public policy until it states `epoch` (it follows Redis within a second)."""
    response = await http(port, POLICY)

    async def states_it() -> bool:
        nonlocal response
        response = await http(port, POLICY)
        return bool(orjson.loads(response.body)["epoch"] == epoch)

    with trio.fail_after(DEADLINE_S):
        await poll_until(states_it, 0.1)
    return response


# -- relay probe, end to end -------------------------------------------------------


async def test_probe_with_a_token_from_relay_token_passes_against_a_default_relay(
    redis_url: str, redis_client: RedisClient, prefix: str, tmp_path: Path
) -> None:
    async with relay_process(redis_url, prefix, tmp_path / "relay.log") as relay:
        made = await run_cli("token", "probe-alice", "--ttl", "10m", RELAY_JWT_SECRET=SECRET)
        assert made.returncode == 0, made.stderr
        token = made.stdout.decode().strip()
        probe = await run_cli("probe", relay.url, "--token", token, "--ttl", "1")
        text = probe.stdout.decode()
        assert probe.returncode == 0, text + probe.stderr.decode() + relay.log()
        lines = text.splitlines()
        assert lines[0] == f"relay probe of {relay.url} as mailbox probe-alice"
        for name in CHECKS:
            assert any(line.startswith(f"PASS  {name}: ") for line in lines), (name, text)
        assert "counted expired 1" in text
        assert lines[-1] == f"every check held ({len(CHECKS)} passed, 0 warned, 0 failed)"
        # It cleaned up: no message, index or tally of its mailbox is left.
        assert leftovers(redis_client, prefix, "probe-alice") == []


async def test_probe_with_the_jwt_secret_reports_json_on_its_own_mailbox(
    redis_url: str, redis_client: RedisClient, prefix: str, tmp_path: Path
) -> None:
    async with relay_process(redis_url, prefix, tmp_path / "relay.log") as relay:
        probe = await run_cli("probe", relay.url, "--json", "--ttl", "1", RELAY_JWT_SECRET=SECRET)
    assert probe.returncode == 0, probe.stdout.decode() + probe.stderr.decode()
    report = orjson.loads(probe.stdout)
    assert report["ok"] is True
    assert report["url"] == relay.url
    assert report["policy_url"] == f"http://127.0.0.1:{port_of(relay.url)}{POLICY}"
    assert report["mailbox"].startswith("probe-")
    assert report["counts"] == {"pass": len(CHECKS), "warn": 0, "fail": 0}
    checks = by_name(report)
    assert set(checks) == CHECKS
    for check in report["checks"]:
        assert check["status"] == "pass", check
        assert isinstance(check["saw"], str) and check["saw"]
    assert checks["expiry"]["delivered_before_ttl"] is True
    assert checks["expiry"]["delivered_after_ttl"] is False
    assert checks["expiry"]["welcome_expired"] == 1
    assert checks["ref_dedupe"]["copies_delivered"] == 1
    assert checks["ref_conflict"]["code"] == "ref_conflict"
    assert checks["ack_deletes"]["acked_count"] == 1
    assert checks["policy_matches_welcome"]["welcome"]["retention_s"] == 604800
    assert checks["redis_persistence"]["state"] == "off"
    assert leftovers(redis_client, prefix, report["mailbox"]) == []


async def test_a_persisting_redis_allowed_is_stated_on_both_ports_and_fails_the_probe(
    redis_server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    """--allow-persistent-redis on a Redis with RDB `save` set: the relay runs, its policy
    says persistence is on (public port and ops port alike), and the probe exits 1 with
    only that check failed."""
    with EmbeddedServer(binary=redis_server.binary) as server:
        with connect(server.url) as client:
            client.config_set("save", "3600 1")  # nothing is due within the test
        ops_port = free_loopback_port()
        async with relay_process(
            server.url,
            prefix,
            tmp_path / "relay.log",
            "--allow-persistent-redis",
            "--ops-port",
            str(ops_port),
        ) as relay:
            public = await http(port_of(relay.url), POLICY)
            ops = await http(ops_port, POLICY)
            probe = await run_cli(
                "probe", relay.url, "--json", "--ttl", "1", RELAY_JWT_SECRET=SECRET
            )
    assert orjson.loads(public.body)["redis"]["persistence"] == PERSISTENT
    assert orjson.loads(ops.body)["redis"]["persistence"] == PERSISTENT
    assert probe.returncode == 1, probe.stdout.decode() + probe.stderr.decode()
    report = orjson.loads(probe.stdout)
    assert report["ok"] is False
    failed = {c["name"] for c in report["checks"] if c["status"] != "pass"}
    assert failed == {"redis_persistence"}
    check = by_name(report)["redis_persistence"]
    assert check["status"] == "fail" and check["state"] == PERSISTENT


async def test_a_policy_that_claims_other_limits_than_the_welcome_fails_the_probe(
    make_relay: RelayFactory,
) -> None:
    """The probe compares, it does not trust: pointed (--policy-url) at the policy of a relay
    with a 1 h retention while it talks to one with 7 days, it fails the comparison, and the
    ttl beyond the claimed limit is accepted, which fails the ttl check too."""
    talked_to = await make_relay()
    claimed = await make_relay(retention_s=3600)
    other_policy = f"http://127.0.0.1:{claimed.port}{POLICY}"
    probe = await run_cli(
        "probe",
        talked_to.url,
        "--json",
        "--ttl",
        "1",
        "--policy-url",
        other_policy,
        RELAY_JWT_SECRET=SECRET,
    )
    assert probe.returncode == 1, probe.stdout.decode() + probe.stderr.decode()
    report = orjson.loads(probe.stdout)
    checks = by_name(report)
    assert report["policy_url"] == other_policy
    assert checks["policy_matches_welcome"]["status"] == "fail"
    assert "retention_s: policy 3600, welcome 604800" in checks["policy_matches_welcome"]["saw"]
    assert checks["ttl_limit"]["status"] == "fail"
    assert "3601" in checks["ttl_limit"]["saw"]
    assert checks["expiry"]["status"] == "pass"


async def test_probe_of_an_unreachable_relay_fails_every_check_and_usage_errors_exit_2() -> None:
    url = f"ws://127.0.0.1:{free_loopback_port()}/v1"
    probe = await run_cli("probe", url, "--json", "--timeout", "2", RELAY_JWT_SECRET=SECRET)
    assert probe.returncode == 1
    report = orjson.loads(probe.stdout)
    assert {c["status"] for c in report["checks"]} == {"fail"}
    assert set(by_name(report)) == CHECKS
    assert (await run_cli("probe", url)).returncode == 2  # neither --token nor a secret
    assert (await run_cli("probe", url, "--token", "not-a-jwt")).returncode == 2
    bad_url = await run_cli("probe", "http://127.0.0.1/v1", RELAY_JWT_SECRET=SECRET)
    assert bad_url.returncode == 2
    assert b"not a ws:// or wss:// URL" in bad_url.stderr


# -- the policy document on the public port ---------------------------------------------


async def test_public_port_serves_the_ops_ports_policy_with_the_sessions_epoch(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(ops_port=free_loopback_port(), retention_s=7200, max_inflight=9)
    with trio.fail_after(DEADLINE_S):
        async with raw_session(relay.url, "policy-reader") as (_, welcome):
            pass

    await policy_showing(relay.port, welcome["epoch"])
    public = await http(relay.port, POLICY)
    ops = await http(relay.ops_port, POLICY)
    assert public.status == ops.status == 200
    assert public.body == ops.body
    policy = orjson.loads(public.body)
    for field in ("retention_s", "max_body_bytes", "max_frame_bytes", "max_inflight", "epoch"):
        assert policy[field] == welcome[field], field
    assert policy["max_ttl_s"] == 7200 and policy["max_inflight"] == 9
    assert policy["dedupe_window_s"] == 600
    assert policy["bodies_logged"] is False


async def test_policy_route_headers_etag_head_and_other_paths(relay: RunningRelay) -> None:
    response = await http(relay.port, POLICY)
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["access-control-allow-origin"] == "*"
    assert int(response.headers["content-length"]) == len(response.body)
    etag = response.headers["etag"]
    again = await http(relay.port, POLICY, f"If-None-Match: {etag}")
    assert again.status == 304 and again.body == b""
    head = await http(relay.port, POLICY, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["etag"] == etag
    assert (await http(relay.port, POLICY + "?x=1")).status == 200
    assert (await http(relay.port, POLICY, method="POST")).status == 405
    for path in ("/.well-known/", "/.well-known/other", POLICY + "/x", "/relay-policy"):
        assert (await http(relay.port, path)).status == 404, path


async def test_policy_etag_changes_when_the_epoch_appears(make_relay: RelayFactory) -> None:
    """A fresh storage has no epoch until its first session: the document says null, then
    the epoch, under a new ETag (so a revalidating reader sees the change)."""
    relay = await make_relay()
    before = await http(relay.port, POLICY)
    assert orjson.loads(before.body)["epoch"] is None
    async with raw_session(relay.url, "first-session") as (_, welcome):
        pass
    after = await policy_showing(relay.port, welcome["epoch"])
    assert after.headers["etag"] != before.headers["etag"]
    revalidated = await http(relay.port, POLICY, f"If-None-Match: {before.headers['etag']}")
    assert revalidated.status == 200 and revalidated.body == after.body


# -- the probe's pieces ------------------------------------------------------------


def test_policy_url_is_derived_from_the_websocket_url() -> None:
    assert policy_url_for("ws://relay.example:8080/v1") == "http://relay.example:8080" + POLICY
    assert policy_url_for("wss://relay.example/v1") == "https://relay.example" + POLICY
    assert policy_url_for("wss://example.org/chat/v1/") == "https://example.org/chat" + POLICY


def test_the_forged_token_is_alg_none_for_the_own_mailbox_and_a_verifier_refuses_it() -> None:
    claims = {"sub": "probe-x", "exp": 4_000_000_000}
    forged = forge_unsigned(claims)
    assert forged == unsigned_token(claims)
    assert unverified_claims(forged)["sub"] == "probe-x"
    with pytest.raises(AuthError):
        Verifier.create(secret=SECRET).verify(forged, now_s=1_000_000_000)
