"""`relay bench` end to end (a spawned relay, a tiny throughput run), and its self-checks.

The benchmark needs the `bench` extra (rich, hdrhistogram, matplotlib); without
it these tests are skipped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rich")
pytest.importorskip("hdrh")
pytest.importorskip("matplotlib")

from relay_bench.checks import Failures, SelfCheckFailed, SessionChecker

RUN_TIMEOUT_S = 120
TINY = ("--pairs", "2", "--messages", "50")
TINY_RUN = ("throughput", "--spawn", *TINY)


def bench(
    cwd: Path, *args: str, timeout_s: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`relay bench ARGS` as a user runs it, in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "relay", "bench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def result_of(done: subprocess.CompletedProcess[str], out: Path, workload: str) -> dict[str, Any]:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob(f"{workload}-*.json")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def test_throughput_run_delivers_everything_and_passes_its_checks(tmp_path: Path) -> None:
    """Without --out, results go to ./bench-results of the current directory; the echo
    server's calibration runs first, and the result says its fraction of that ceiling."""
    result = result_of(bench(tmp_path, *TINY_RUN), tmp_path / "bench-results", "throughput")
    assert result["ok"] is True
    assert result["failures"] == []
    assert result["sent"] == result["delivered"] == 100
    assert result["results"]["keys_left"] == 0
    assert result["git"]["commit"]
    assert result["calibration"]["ceiling"]["msgs_per_s"] > 0
    fractions = {row["key"]: row for row in result["vs_ceiling"]}
    assert fractions["msgs_per_s"]["ratio"] > 0
    assert fractions["msgs_per_s"]["ceiling"] == result["calibration"]["ceiling"]["msgs_per_s"]
    assert result["headline"]["redis_cpu_us_per_msg"] > 0  # Redis CPU per relayed message
    markdown = next((tmp_path / "bench-results").glob("throughput-*.md")).read_text()
    assert "| calibration ceiling | echo server" in markdown
    assert "## Against the ceiling (echo server)" in markdown
    assert list((tmp_path / "bench-results").glob("throughput-*-latency.png"))


def test_calibrate_measures_the_echo_servers_ceiling(tmp_path: Path) -> None:
    """`relay bench calibrate` needs no relay: the echo server answers the generator. 1,000
    messages: /proc counts CPU in 10 ms ticks, and 100 echoes can take less than one."""
    done = bench(tmp_path, "calibrate", "--pairs", "2", "--messages", "500", "--out", "out")
    result = result_of(done, tmp_path / "out", "calibrate")
    assert result["ok"] is True, result["failures"]
    assert result["relay"]["kind"] == "echo"
    assert result["sent"] == result["delivered"] == 1000
    calibration = result["calibration"]
    assert calibration["loop"]["workload"] == "throughput"
    assert calibration["loop"]["pairs"] == 2
    ceiling = calibration["ceiling"]
    assert ceiling["msgs_per_s"] > 0 and ceiling["relay_cpu_us_per_msg"] > 0
    assert 0 < ceiling["p50_us"] <= ceiling["p99_us"]
    assert result["targets"] == []  # the targets are a relay's
    assert "calibration ceiling: echo server" in done.stdout


def test_flood_runs_the_pairs_without_and_with_a_flooding_client(tmp_path: Path) -> None:
    done = bench(
        tmp_path, "flood", "--spawn", "--pairs", "2", "--rate", "40", "--messages", "40",
        "--no-calibrate", "--out", "out",
    )  # fmt: skip
    result = result_of(done, tmp_path / "out", "flood")
    assert result["ok"] is True, result["failures"]
    metrics = result["results"]
    for phase in ("quiet", "flood"):
        assert metrics[phase]["accepted"] == metrics[phase]["delivered"] == 80
        assert metrics[phase]["latency_us"]["count"] == 80
    flooder = metrics["flooder"]
    assert flooder["sent"] > 0
    answered = flooder["accepted"] + sum(flooder["refused"].values())
    assert answered + flooder["unanswered"] == flooder["sent"]
    assert flooder["sink_delivered"] >= flooder["accepted"]
    assert metrics["p99_ratio"] > 0
    assert metrics["keys_left"] == 0
    assert [t["name"] for t in result["targets"]] == ["flood p99, 2x quiet p99"]
    assert result["calibration"] is None  # --no-calibrate


def test_baseline_runs_a_second_relay_from_a_commit_and_prints_ratios(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    trees_before = set(Path(tempfile.gettempdir()).glob("relay-bench-baseline-*"))
    done = bench(tmp_path, *TINY_RUN, "--no-calibrate", "--baseline", "HEAD", "--out", "out")
    result = result_of(done, tmp_path / "out", "throughput")
    assert result["ok"] is True, result["failures"]
    baseline = result["baseline"]
    assert baseline["commit"] == head
    assert baseline["ok"] is True
    assert baseline["sent"] == baseline["delivered"] == 100
    assert baseline["relay"]["pid"] != result["relay"]["pid"]
    ratios = {row["key"]: row for row in result["vs_baseline"]}
    for key in ("msgs_per_s", "relay_cpu_us_per_msg", "p50_us", "p99_us", "redis_cpu_us_per_msg"):
        assert ratios[key]["ratio"] == pytest.approx(
            ratios[key]["this"] / ratios[key]["baseline"], rel=0.01
        )
    names = [t["name"] for t in result["targets"]]
    assert "msgs_per_s, 2.5x baseline" in names
    assert "this / baseline" in done.stdout
    assert set(Path(tempfile.gettempdir()).glob("relay-bench-baseline-*")) <= trees_before


def test_repeat_runs_the_two_relays_in_turns_and_reports_each_sides_median_run(
    tmp_path: Path,
) -> None:
    """--repeat 2 --baseline: relay, baseline, baseline, relay (neither always runs first);
    each side's reported run is its median by relay CPU per message, and every run's
    headline is kept."""
    done = bench(
        tmp_path, *TINY_RUN, "--no-calibrate", "--baseline", "HEAD", "--repeat", "2", "--out", "o"
    )
    result = result_of(done, tmp_path / "o", "throughput")
    assert result["ok"] is True, result["failures"]
    repeats = result["repeats"]
    runs = repeats["runs"]
    assert [r["label"] for r in runs] == ["relay", "baseline", "baseline", "relay"]
    assert all(r["ok"] for r in runs)
    for side, reported in (
        ("relay", result["headline"]),
        ("baseline", result["baseline"]["headline"]),
    ):
        mine = [r for r in runs if r["label"] == side]
        (median,) = [r for r in mine if r["median_run"]]
        assert median["headline"] == reported
        cpu = sorted(r["headline"]["relay_cpu_us_per_msg"] for r in mine)
        assert reported["relay_cpu_us_per_msg"] == cpu[0]  # the lower of two
        assert repeats["medians"][side]["relay_cpu_us_per_msg"] == pytest.approx(sum(cpu) / 2)
    ratio = repeats["median_ratios"]["msgs_per_s"]
    medians = repeats["medians"]
    assert ratio == pytest.approx(
        medians["relay"]["msgs_per_s"] / medians["baseline"]["msgs_per_s"], rel=0.01
    )
    # Paired: relay / baseline within each turn (runs 1 and 2, then 4 and 3), geometric mean.
    cpu = [r["headline"]["relay_cpu_us_per_msg"] for r in runs]
    assert repeats["paired_ratios"]["relay_cpu_us_per_msg"] == pytest.approx(
        (cpu[0] / cpu[1] * cpu[3] / cpu[2]) ** 0.5, rel=0.01
    )
    markdown = next((tmp_path / "o").glob("throughput-*.md")).read_text()
    assert "## Repeats" in markdown and "| relay / baseline | paired (geomean) |" in markdown


def test_repeat_is_checked(tmp_path: Path) -> None:
    for bad in ("0", "10"):
        done = bench(tmp_path, *TINY_RUN, "--repeat", bad)
        assert done.returncode == 2
        assert "--repeat" in done.stderr


def test_baseline_needs_a_spawned_relay_and_a_known_commit(tmp_path: Path) -> None:
    done = bench(tmp_path, "throughput", "--url", "ws://127.0.0.1:1/v1", "--baseline", "HEAD")
    assert done.returncode == 2
    assert "--baseline" in done.stderr
    done = bench(tmp_path, *TINY_RUN, "--no-calibrate", "--baseline", "no-such-ref-here")
    assert done.returncode == 2
    assert "no-such-ref-here" in done.stderr


def test_cluster_run_with_two_workers_checks_every_primary_and_stops_the_cluster(
    tmp_path: Path,
) -> None:
    """`--redis cluster` runs the relay on a 3-primary cluster: Redis counters are read on
    every primary and summed, the stored keys' TTLs are checked on each, and the nodes stop
    at the end; `--workers 2` sums the CPU and /metrics of both workers."""
    done = bench(tmp_path, "drain", "--spawn", *TINY, "--redis", "cluster", "--workers", "2",
                 "--no-calibrate", "--out", "out")  # fmt: skip
    result = result_of(done, tmp_path / "out", "drain")
    assert result["ok"] is True, result["failures"]
    assert result["relay"]["redis"] == "cluster"
    assert result["relay"]["redis_url"].startswith("redis+cluster://")
    assert result["relay"]["workers"] == 2
    metrics = result["results"]
    assert result["sent"] == result["delivered"] == 100
    assert metrics["keys_left"] == 0
    assert metrics["ttl_keys_checked"] >= 100  # the stored messages, found on the primaries
    drain = metrics["drain"]
    nodes = drain["redis"]["nodes"]
    assert len(nodes) == 3
    assert sum(n["calls_total"] for n in nodes.values()) == sum(drain["redis"]["calls"].values())
    assert drain["redis"]["cpu_us_per_msg"] > 0 and drain["redis"]["reads"] > 0
    assert drain["relay"]["processes"] == 3  # the supervisor and its two workers
    assert drain["relay"]["internals"]["delivered"] == 100  # both workers' /metrics
    for name in nodes:  # every node of the cluster was stopped
        host, _, port = name.rpartition(":")
        with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1):
            pass


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("throughput", "--url", "ws://127.0.0.1:1/v1", "--redis", "cluster"), "--redis cluster"),
        (("throughput", "--url", "ws://127.0.0.1:1/v1", "--workers", "2"), "--workers"),
        (("calibrate", "--redis", "cluster"), "no --redis or --workers"),
        (("throughput", "--spawn", "--workers", "0"), "--workers must be at least 1"),
    ],
)
def test_redis_and_workers_options_go_with_a_spawned_relay(
    tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    done = bench(tmp_path, *args, "--jwt-secret", "s" * 32)
    assert done.returncode == 2
    assert says in done.stderr


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
