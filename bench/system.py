"""What the report says about the machine, and what the bench reads from /proc."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "platform": platform.platform(),
        "node": platform.node(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_mib": _memory_mib(),
        "load_average": load,
    }


def _memory_mib() -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def git_commit() -> dict[str, Any]:
    """The commit of the benchmark's own checkout (not of the current directory); None
    when it runs from an installed wheel."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def command_line() -> str:
    """The command as typed, whether run as `relay ...` or `python -m relay ...`."""
    return "relay " + shlex.join(sys.argv[1:])


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def process_cpu_s(pid: int, thread: int | None = None) -> float | None:
    """User plus system CPU seconds of a process (all its threads), from /proc/<pid>/stat;
    of one of its threads when `thread` (a TID; the main thread's is the PID) is given."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path) as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers), from the parent PIDs in /proc."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as file:
                ppid = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def machine_busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as file:
        fields = [int(x) for x in file.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as file:
            return int(file.read().split()[1]) * PAGE_BYTES
    except OSError:
        return None


def parse_cpus(text: str) -> set[int]:
    """CPUs of a taskset-style list: `1`, `0,2`, `0-3`."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {text!r}")
    return cpus


def pin_self(cpus: str | None) -> None:
    """Pin this process (and so the processes it starts later) to a CPU list."""
    if cpus:
        os.sched_setaffinity(0, parse_cpus(cpus))


def raise_open_files(wanted: int) -> int:
    """Raise the soft limit of open files towards `wanted` (capped at the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = (
        soft if soft >= wanted else min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    )
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
