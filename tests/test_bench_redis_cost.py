"""`python -m relay_bench.redis_cost` as bench/README.md tells one to run it: this checkout
against a git commit (here HEAD, the same scripts), tiny workloads, real Valkeys."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN_TIMEOUT_S = 300
TINY = ("--messages", "80", "--tasks", "4", "--mailboxes", "4", "--window", "4", "--rounds", "1")
CHECKOUT = Path(__file__).resolve().parent.parent
RECORDED_BASELINE = "6804477"  # bench/results' baseline: from before relay/redis/ existed


def run_cost(tmp_path: Path, *args: str, baseline: str = "HEAD") -> str:
    done = subprocess.run(
        [sys.executable, "-m", "relay_bench.redis_cost", "--baseline", baseline, *TINY, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(autouse=True)
def needs_git_checkout() -> None:
    if shutil.which("git") is None or not (CHECKOUT / ".git").exists():
        pytest.skip("--baseline needs a git checkout")


def test_every_workload_reports_calls_and_cpu_per_message_for_both(tmp_path: Path) -> None:
    out = run_cost(tmp_path)
    parts = re.split(r"^(\w+ / \w+):$", out, flags=re.MULTILINE)
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert list(sections) == [
        "online / online",
        "pairs / pairs",
        "backlog / store",
        "backlog / drain",
    ]
    for section in sections.values():
        rows = re.findall(
            r"([\d.]+) calls/msg \(([\d.]+) scripts\)\s+CPU\s+([\d.]+) us/msg", section
        )
        assert len(rows) == 2, section  # the baseline and this checkout
        for calls, scripts, cpu in rows:
            assert float(calls) > float(scripts) > 0 and float(cpu) > 0
        assert re.search(r"this / HEAD: calls [\d.]+x, CPU [\d.]+x", section), section
    assert "evalsha" in out and "publish" in out  # the commands, by name


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_callgrind_counts_instructions_per_message(tmp_path: Path) -> None:
    out = run_cost(tmp_path, "--callgrind", "--workload", "pairs")
    counts = [float(x) for x in re.findall(r"([\d.]+)k instructions/msg", out)]
    assert len(counts) == 2 and all(c > 1 for c in counts), out
    assert re.search(r"this / HEAD: calls [\d.]+x, instructions [\d.]+x", out), out


def test_the_recorded_baseline_commit_runs_as_the_results_say(tmp_path: Path) -> None:
    """Its pump and connection live in other modules, and its fetch returns a list."""
    known = subprocess.run(
        ["git", "-C", str(CHECKOUT), "cat-file", "-e", f"{RECORDED_BASELINE}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    if known.returncode != 0:
        pytest.skip(f"{RECORDED_BASELINE} is not in this clone's history")
    out = run_cost(tmp_path, "--workload", "backlog", baseline=RECORDED_BASELINE)
    drain = out.split("backlog / drain:")[1]
    rows = re.findall(r"([\d.]+) calls/msg \(([\d.]+) scripts\)", drain)
    assert len(rows) == 2 and all(float(calls) > 0 for calls, _ in rows), out
    assert re.search(rf"this / {RECORDED_BASELINE}: calls [\d.]+x, CPU [\d.]+x", drain), out
