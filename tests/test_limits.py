"""Pure tests of relay/limits.py: the token bucket, the frame budget (delay, refusal and
abuse rules), and the client address behind trusted proxies. Time is passed in as plain
numbers."""

from __future__ import annotations

import ipaddress
import math

import pytest

from relay.limits import (
    FULL_READ_BYTES,
    MAX_DELAY_S,
    PATIENCE_BURSTS,
    FrameBudget,
    TokenBucket,
    client_address,
    parse_networks,
)

# -- TokenBucket --------------------------------------------------------------


def test_token_bucket_starts_full_and_allows_exactly_its_burst() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5, tokens=5, updated_s=0)
    assert [bucket.take(0) for _ in range(5)] == [True] * 5
    assert bucket.take(0) is False


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate_per_s=2, burst=4, tokens=0, updated_s=100)
    assert bucket.take(100) is False
    assert bucket.take(100.25) is False  # half a token
    assert bucket.take(100.5) is True  # one token after 0.5 s at 2/s
    assert bucket.take(100.5) is False
    assert [bucket.take(101.5) for _ in range(3)] == [True, True, False]  # 2 more after 1 s


def test_token_bucket_partial_tokens_add_up() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=10, tokens=0, updated_s=0)
    assert bucket.take(0.5) is False
    assert bucket.take(1) is True  # the half token of the first call was kept


def test_token_bucket_never_saves_more_than_its_burst() -> None:
    bucket = TokenBucket(rate_per_s=100, burst=3, tokens=0, updated_s=0)
    assert [bucket.take(3600) for _ in range(4)] == [True, True, True, False]


def test_token_bucket_time_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(rate_per_s=2, burst=10, tokens=0, updated_s=10)
    assert bucket.take(5) is False
    assert bucket.updated_s == 10  # the earlier time did not move the clock back
    assert bucket.take(10.25) is False  # only 0.5 token since 10, not since 5
    assert bucket.take(10.5) is True


# -- FrameBudget ----------------------------------------------------------------


def test_frame_budget_admits_the_burst_at_once_then_holds_back() -> None:
    budget = FrameBudget.create(rate_per_s=20, burst=10, now_s=0)
    assert [budget.admit(0) for _ in range(10)] == [0.0] * 10
    assert budget.admit(0) == pytest.approx(0.05)  # one token at 20/s
    assert budget.strikes == 0
    assert not budget.abusive(0)


def test_frame_budget_sending_at_the_rate_is_never_held_back() -> None:
    budget = FrameBudget.create(rate_per_s=4, burst=1, now_s=0)
    assert all(budget.admit(i / 4) == 0.0 for i in range(1000))  # exactly 4 frames a second
    assert budget.held_since_s is None
    assert not budget.abusive(1000 / 4)


def test_frame_budget_a_held_back_frame_is_admitted_after_its_wait() -> None:
    budget = FrameBudget.create(rate_per_s=10, burst=2, now_s=0)
    assert budget.admit(0) == budget.admit(0) == 0.0
    wait = budget.admit(0)
    assert wait == pytest.approx(0.1)
    assert budget.admit(wait) == 0.0
    assert budget.held_since_s == 0


def test_frame_budget_refuses_a_frame_that_would_wait_longer_than_the_max_delay() -> None:
    budget = FrameBudget.create(rate_per_s=0.5, burst=1, now_s=0)  # a frame every 2 s
    assert budget.admit(0) == 0.0
    assert budget.admit(0) == math.inf
    assert budget.strikes == 1
    assert budget.admit(2.0 - MAX_DELAY_S) == pytest.approx(MAX_DELAY_S)  # now short enough


def test_frame_budget_reads_with_refusals_become_abusive_after_more_than_burst() -> None:
    budget = FrameBudget.create(rate_per_s=0.01, burst=3, now_s=0)
    for _ in range(3):
        assert budget.admit(0) == 0.0
    for refused in range(1, 4):
        assert budget.admit(0) == math.inf
        budget.read_done(False, 100)
        assert not budget.abusive(0), f"abusive after only {refused} refusals"
    assert budget.admit(0) == math.inf
    assert budget.abusive(0)  # 4 strikes > burst 3


def test_frame_budget_a_queue_flushed_in_one_read_is_one_strike() -> None:
    budget = FrameBudget.create(rate_per_s=0.5, burst=10, now_s=0)
    admitted = [budget.admit(0) for _ in range(100)]
    assert admitted == [0.0] * 10 + [math.inf] * 90
    assert budget.strikes == 1 and not budget.abusive(0)
    budget.read_done(False, 10_000)
    assert budget.admit(0.1) == math.inf  # the next read's refusal is a strike of its own
    assert budget.strikes == pytest.approx(2 - 0.05)


def test_frame_budget_strikes_drain_at_the_allowed_rate() -> None:
    budget = FrameBudget.create(rate_per_s=0.1, burst=4, now_s=0)
    for _ in range(4):
        budget.admit(0)
    for _ in range(4):
        assert budget.admit(0) == math.inf  # 4 strikes (a token takes 10 s > the max delay)
        budget.read_done(False, 100)
    # 20 s later: 2 tokens back, and 2 strikes drained.
    assert [budget.admit(20) for _ in range(2)] == [0.0, 0.0]
    assert budget.admit(20) == math.inf
    assert budget.strikes == pytest.approx(3)
    assert not budget.abusive(20)


def test_frame_budget_held_back_read_after_read_past_its_patience_is_abusive() -> None:
    budget = FrameBudget.create(rate_per_s=20, burst=10, now_s=0)
    assert budget.patience_s == pytest.approx(PATIENCE_BURSTS * 10 / 20)
    now = 0.0
    for _ in range(10):
        budget.admit(now)
    while not budget.abusive(now):  # a flood: every read waits for its budget
        now += budget.admit(now)
        assert budget.admit(now) == 0.0
        budget.read_done(held_back=True, read_bytes=FULL_READ_BYTES)
        assert now < 2 * budget.patience_s, "a sustained flood never became abusive"
    assert now > budget.patience_s  # not before its patience was spent


def test_frame_budget_a_read_that_did_not_wait_ends_the_run() -> None:
    budget = FrameBudget.create(rate_per_s=20, burst=10, now_s=0)
    for _ in range(11):
        budget.admit(0)
    budget.read_done(held_back=True, read_bytes=FULL_READ_BYTES)
    assert budget.held_since_s == 0
    assert budget.admit(1.0) == 0.0  # the client paused: its budget refilled
    budget.read_done(held_back=False, read_bytes=FULL_READ_BYTES)
    assert budget.held_since_s is None
    assert not budget.abusive(100)


def test_frame_budget_small_reads_held_back_never_become_abusive() -> None:
    """A client far above its rate that waits for answers (a few frames in flight, so
    every read is small) is slowed down read after read, never closed."""
    budget = FrameBudget.create(rate_per_s=20, burst=10, now_s=0)
    now = 0.0
    while now < 3 * budget.patience_s:
        waited = False
        for _ in range(30):  # 30 frames in flight, one read
            wait = budget.admit(now)
            while wait > 0:
                waited = True
                now += wait
                assert not budget.abusive(now)
                wait = budget.admit(now)
        assert waited
        budget.read_done(held_back=True, read_bytes=30 * 120)
    assert not budget.abusive(now)


# -- client_address -------------------------------------------------------------

PROXIES = parse_networks(["10.0.0.0/8", "127.0.0.1/32"])


def test_client_address_is_the_peer_without_forwarded_for() -> None:
    assert client_address("10.1.2.3", None, PROXIES) == "10.1.2.3"


def test_client_address_ignores_forwarded_for_from_an_untrusted_peer() -> None:
    assert client_address("198.51.100.7", "203.0.113.9", PROXIES) == "198.51.100.7"
    assert client_address("198.51.100.7", "203.0.113.9", ()) == "198.51.100.7"


def test_client_address_from_a_trusted_proxy_is_the_forwarded_one() -> None:
    assert client_address("127.0.0.1", "203.0.113.9", PROXIES) == "203.0.113.9"


def test_client_address_is_the_rightmost_untrusted_hop() -> None:
    # The client may prepend anything; the hop our own proxy appended is the last one.
    spoofed = "1.2.3.4, 203.0.113.9, 10.0.0.2, 10.0.0.1"
    assert client_address("10.0.0.5", spoofed, PROXIES) == "203.0.113.9"


def test_client_address_is_the_peer_when_every_hop_is_a_trusted_proxy() -> None:
    assert client_address("10.0.0.5", "10.0.0.2, 127.0.0.1", PROXIES) == "10.0.0.5"


def test_client_address_skips_empty_hops_and_spaces() -> None:
    assert client_address("10.0.0.5", " , 203.0.113.9 ,  ,", PROXIES) == "203.0.113.9"
    assert client_address("10.0.0.5", "", PROXIES) == "10.0.0.5"


def test_client_address_of_a_peer_that_is_no_ip_is_the_peer() -> None:
    assert client_address("not-an-ip", "203.0.113.9", PROXIES) == "not-an-ip"


def test_client_address_ipv6_proxy_and_client() -> None:
    proxies = parse_networks(["::1/128", "fd00::/8"])
    assert client_address("::1", "2001:db8::7, fd00::2", proxies) == "2001:db8::7"
    assert client_address("2001:db8::1", "2001:db8::7", proxies) == "2001:db8::1"


def test_client_address_trusts_an_ipv4_mapped_ipv6_peer_of_a_trusted_ipv4_network() -> None:
    """A dual-stack listener on '::' reports an IPv4 proxy as ::ffff:a.b.c.d."""
    assert client_address("::ffff:10.0.0.5", "203.0.113.9", PROXIES) == "203.0.113.9"


def test_parse_networks_accepts_host_bits_and_single_addresses() -> None:
    assert parse_networks(["10.1.2.3/8", "127.0.0.1", "::1"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )


def test_parse_networks_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        parse_networks(["10.0.0.0/33"])
