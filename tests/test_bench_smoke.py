"""`relay bench` end to end (a spawned relay, a tiny throughput run), and its self-checks.

The benchmark needs the `bench` extra (rich, hdrhistogram, matplotlib); without
it these tests are skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rich")
pytest.importorskip("hdrh")
pytest.importorskip("matplotlib")

from relay_bench.checks import Failures, SelfCheckFailed, SessionChecker

RUN_TIMEOUT_S = 60
TINY_RUN = ("throughput", "--spawn", "--pairs", "2", "--messages", "50")


def test_throughput_run_delivers_everything_and_passes_its_checks(tmp_path: Path) -> None:
    """Without --out, results go to ./bench-results of the current directory."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "bench", *TINY_RUN],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result_path,) = (tmp_path / "bench-results").glob("throughput-*.json")
    result = json.loads(result_path.read_text())
    assert result["ok"] is True
    assert result["failures"] == []
    assert result["sent"] == result["delivered"] == 100
    assert result["results"]["keys_left"] == 0
    assert result["git"]["commit"]
    assert list((tmp_path / "bench-results").glob("throughput-*.md"))
    assert list((tmp_path / "bench-results").glob("throughput-*-latency.png"))


def test_out_of_order_delivery_fails_the_run_loudly() -> None:
    failures = Failures()
    checker = SessionChecker("bob", failures)
    checker.on_deliver("id-0", 0, expires_at_ms=2_000, now_ms=1_000)
    checker.on_deliver("id-2", 2, expires_at_ms=2_000, now_ms=1_000)
    checker.on_deliver("id-1", 1, expires_at_ms=2_000, now_ms=1_000)  # late: out of order
    checker.finish(sent=3)
    assert failures.counts == {"out_of_order": 1}
    with pytest.raises(SelfCheckFailed, match="out of order"):
        failures.raise_if_any()


def test_checker_tells_lost_duplicate_after_ack_and_after_expiry_apart() -> None:
    failures = Failures()
    checker = SessionChecker("bob", failures)
    checker.on_deliver("id-0", 0, expires_at_ms=2_000, now_ms=1_000)
    checker.on_deliver("id-0", 0, expires_at_ms=2_000, now_ms=1_000)  # the same id again
    checker.on_acked(["id-0"])
    checker.on_deliver("id-0", 0, expires_at_ms=2_000, now_ms=1_000)  # after its ack
    checker.on_deliver("id-1", 1, expires_at_ms=2_000, now_ms=3_000)  # a second after expiry
    checker.finish(sent=4, rejected={3})  # #2 lost; #3 was refused, so not lost
    assert failures.counts == {"duplicate": 1, "after_ack": 1, "after_expiry": 1, "lost": 1}
