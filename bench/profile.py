"""`--profile`: where the relay's time goes, sampled with py-spy while the workload runs.

py-spy (in the `bench` extra) attaches to the relay's PID from the run's
first gate to its last, sampling every thread (and with `--workers N`, every
worker: `--subprocesses`), without pausing the relay
(`--nonblocking`). The collapsed stacks are written next to the results (for
flamegraph.pl or speedscope), and the report lists each thread's share of the
samples and the functions that used the most, by themselves and inclusively.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from typing import Any

RATE_HZ = 200
STOP_TIMEOUT_S = 30.0
TOP = 15
# Frames every sample of the main thread passes through: they say nothing.
ENTRY_FRAMES = (
    "main (relay/cli.py",
    "run_serve (relay/cli.py",
    "<module> (relay/__main__.py",
    "<module> (relay/workers.py",
    "run_worker (relay/workers.py",
)


def py_spy() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.path.exists(beside) else shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, path: str, subprocesses: bool = False) -> None:
        self.pid = pid
        self.path = path  # collapsed stacks ("raw" format)
        self.subprocesses = subprocesses  # `--workers N`: sample the workers too
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = py_spy()
        if binary is None:
            raise FileNotFoundError("--profile needs py-spy: pip install 'ephemeral-relay[bench]'")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        command = [binary, "record", "-p", str(self.pid), "-r", str(RATE_HZ), "-f", "raw"]
        command += ["-o", self.path, "--threads", "--nonblocking"]
        if self.subprocesses:
            command.append("--subprocesses")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> dict[str, Any]:
        """Stop sampling (SIGINT makes py-spy write its output) and summarise the stacks."""
        process, self._process = self._process, None
        if process is None:
            return {}
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        error = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.stderr:
            process.stderr.close()
        if not os.path.exists(self.path):
            return {"error": error.strip()[-500:] or f"py-spy exited with {process.returncode}"}
        return summarize(self.path)


def summarize(path: str) -> dict[str, Any]:
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(path) as file:
        for line in file:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            while frames[0].startswith("process "):  # --subprocesses: supervisor, worker
                frames = frames[1:]
            total += n
            threads[_thread_name(frames[0])] += n
            own[frames[-1]] += n
            for frame in set(frames[1:]):
                inclusive[frame] += n

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(TOP)]

    relay_frames = Counter(
        {f: n for f, n in inclusive.items() if "relay/" in f and not f.startswith(ENTRY_FRAMES)}
    )
    return {
        "samples": total,
        "rate_hz": RATE_HZ,
        "file": os.path.basename(path),
        "threads_pct": share(threads),
        "top_self_pct": share(own) if total else [],
        "top_relay_inclusive_pct": share(relay_frames) if total else [],
    }


def _thread_name(frame: str) -> str:
    """`thread (1234): MainThread` -> `MainThread` (Trio renames worker threads per job)."""
    return frame.split(": ", 1)[1] if ": " in frame else frame
