"""What Redis itself spends per relayed message: commands and CPU, this checkout against another.

Drives the real mailbox store (relay.store_redis on relay.redis.pump) against a
fresh Valkey for every run (bench/redis_cost_worker.py), and reads what Redis
did from `INFO commandstats` (calls, counting the commands that scripts run) and
`INFO cpu` (used_cpu_user + used_cpu_sys). Workloads:

- `online`: `--tasks` (50) tasks each send a message (with a random ref) to the
  `--mailboxes` (50) in turn and ack every `--ack-batch` (1) messages, as an
  online recipient does: it gets them from the send's publish, nothing is
  fetched. A subscriber on every mailbox's channel takes the publishes.
- `pairs`: each task keeps `--window` (8) sends in flight to a mailbox of its
  own and acks them with one ack, as a relay that reads a sender's frames in
  batches and delivers several messages per frame does.
- `backlog`: sends to offline mailboxes (phase `store`), then every mailbox
  starts a session, fetches pages of 100 and acks each page (phase `drain`).

With `--baseline REF` the relay package of git commit REF (extracted with `git
archive` into a temporary directory) runs the same workloads in the same run,
interleaved round by round; each run has its own process and its own Valkey.
CPU is the median over `--rounds`; call counts do not vary.

CPU time on a shared or virtual machine is noisy. `--callgrind` runs each
Valkey under valgrind's callgrind (Debian's `valgrind` package) and reports
the instructions Redis executed per message instead: exact and repeatable, and
about 50 times slower, so use a few thousand messages.

    python -m relay_bench.redis_cost [--baseline main] [--messages 20000] [--rounds 3]
        [--workload online|pairs|backlog ...] [--tasks 50] [--mailboxes 50]
        [--window 8] [--ack-batch 1] [--body-bytes 100] [--redis-cpu N] [--callgrind]
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from relay.embedded import EmbeddedServer, valkey_binary
from relay.redis.admin import RedisClient, connect

WORKLOADS = ("online", "pairs", "backlog")
SCRIPT_COMMANDS = ("evalsha", "eval", "fcall")
VALGRIND_START_S = 60.0


class Meter:
    """Redis's work so far: command counts and CPU from INFO, and under callgrind the
    instructions executed (counted from zero at each `reset`)."""

    def __init__(self, client: RedisClient, callgrind: tuple[int, str] | None) -> None:
        self.client = client
        self.callgrind = callgrind  # (pid, output directory)

    def snapshot(self) -> dict[str, Any]:
        info = self.client.info("all")
        stats = {k.removeprefix("cmdstat_"): v for k, v in info.items() if k.startswith("cmdstat_")}
        shot = {
            "calls": {k: int(v["calls"]) for k, v in stats.items()},
            "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            "instructions": 0,
        }
        if self.callgrind is not None:
            pid, out = self.callgrind
            subprocess.run(
                ["callgrind_control", "--dump", str(pid)], capture_output=True, check=True
            )
            shot["instructions"] = _last_dump_total(out)
            subprocess.run(
                ["callgrind_control", "--zero", str(pid)], capture_output=True, check=True
            )
        return shot


def _last_dump_total(directory: str) -> int:
    newest = max(glob.glob(os.path.join(directory, "callgrind.*")), key=os.path.getmtime)
    with open(newest) as dump:
        for line in dump:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {newest}")


def _delta(before: dict[str, Any], after: dict[str, Any], messages: int) -> dict[str, Any]:
    calls = {k: v - before["calls"].get(k, 0) for k, v in after["calls"].items()}
    calls["info"] = calls.get("info", 0) - 1  # the `before` snapshot's own INFO
    calls = {k: v for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v > 0}
    per = max(messages, 1)
    return {
        "calls_per_msg": sum(calls.values()) / per,
        "scripts_per_msg": sum(calls.get(k, 0) for k in SCRIPT_COMMANDS) / per,
        "by_command": {k: v / per for k, v in calls.items()},
        "cpu_us_per_msg": (after["cpu_s"] - before["cpu_s"]) * 1e6 / per,
        "instructions_per_msg": after["instructions"] / per,  # counted from `before` on
    }


@contextmanager
def _server(callgrind: bool, redis_cpu: int | None) -> Iterator[tuple[EmbeddedServer, Meter]]:
    """A fresh Valkey (under callgrind when asked) and a meter on it."""
    with ExitStack() as stack:
        binary, out = valkey_binary(), None
        if callgrind:
            out = stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-cost-cg-"))
            binary = os.path.join(out, "valkey-under-callgrind")
            with open(binary, "w") as wrapper:  # exec keeps the PID: callgrind_control finds it
                wrapper.write(
                    "#!/bin/sh\nexec valgrind --tool=callgrind "
                    f'--callgrind-out-file={out}/callgrind.%p {valkey_binary()} "$@"\n'
                )
            os.chmod(binary, 0o700)
        server = EmbeddedServer(binary=binary)
        server.start(timeout_s=VALGRIND_START_S if callgrind else 10.0)
        stack.callback(server.stop)
        if redis_cpu is not None:
            os.sched_setaffinity(server.pid, {redis_cpu})
        client = connect(server.url, timeout_s=60.0)
        stack.callback(client.close)
        yield server, Meter(client, (server.pid, out) if out is not None else None)


def run_once(
    tree: str | None, workload: str, options: dict[str, Any], callgrind: bool, cpu: int | None
) -> dict[str, dict[str, Any]]:
    """One workload against a fresh Valkey in a fresh worker process; Redis's work per phase."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "relay_bench.redis_cost_worker"]
    phases: dict[str, dict[str, Any]] = {}
    with _server(callgrind, cpu) as (server, meter):
        # Not from the current directory: `python -m` puts it first on sys.path, before
        # PYTHONPATH, and a checkout there would shadow the tree under test.
        worker = subprocess.Popen(
            [*command, server.url, workload, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree or tempfile.gettempdir(),
        )
        assert worker.stdin is not None and worker.stdout is not None
        try:
            before = None
            for line in worker.stdout:
                if line.startswith("done"):
                    break
                _, phase, messages = line.split()
                now = meter.snapshot()
                if before is not None:
                    phases[phase] = _delta(before, now, int(messages))
                before = now
                worker.stdin.write("go\n")
                worker.stdin.flush()
        finally:
            worker.stdin.close()
            if worker.wait(timeout=3600) != 0:
                raise RuntimeError(f"the {workload} worker failed (exit {worker.returncode})")
    return phases


def _checkout() -> str:
    import relay

    return os.path.dirname(os.path.dirname(os.path.abspath(relay.__file__)))


def _commit(ref: str) -> str:
    done = subprocess.run(
        ["git", "-C", _checkout(), "rev-parse", "--short", ref], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


@contextmanager
def _relay_tree(ref: str | None) -> Iterator[str | None]:
    """A directory holding the relay package of git commit `ref`; None: this checkout's."""
    if ref is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="relay-cost-") as tree:
        archive = subprocess.run(
            ["git", "-C", _checkout(), "archive", "--format=tar", ref, "relay"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        yield tree


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    cpu = [r["cpu_us_per_msg"] for r in runs]
    return {
        **runs[0],
        "cpu_us_per_msg": statistics.median(cpu),
        "cpu_range": (min(cpu), max(cpu)),
        "instructions_per_msg": statistics.median(r["instructions_per_msg"] for r in runs),
    }


def _report(label: str, r: dict[str, Any], callgrind: bool) -> str:
    cost = (
        f"{r['instructions_per_msg'] / 1000:7.1f}k instructions/msg"
        if callgrind
        else f"CPU {r['cpu_us_per_msg']:6.1f} us/msg ({r['cpu_range'][0]:.1f}-{r['cpu_range'][1]:.1f})"
    )
    top = ", ".join(f"{k} {v:.2f}" for k, v in r["by_command"].items())
    return (
        f"  {label:<28} {r['calls_per_msg']:6.2f} calls/msg ({r['scripts_per_msg']:.2f} scripts)"
        f"  {cost}\n      {top}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", metavar="REF", help="also run the relay of this git commit")
    parser.add_argument("--workload", choices=WORKLOADS, action="append", help="(repeatable)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--mailboxes", type=int, default=50)
    parser.add_argument("--window", type=int, default=8, help="sends in flight per pair (pairs)")
    parser.add_argument("--ack-batch", type=int, default=1, help="messages per ack (online)")
    parser.add_argument("--body-bytes", type=int, default=100)
    parser.add_argument("--redis-cpu", type=int, help="pin each Valkey to this CPU")
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    args = parser.parse_args()
    if args.callgrind and not shutil.which("valgrind"):
        parser.error("--callgrind needs valgrind (apt-get install valgrind)")
    options = {
        k: getattr(args, k)
        for k in ("messages", "tasks", "mailboxes", "window", "ack_batch", "body_bytes")
    }
    workloads = args.workload or list(WORKLOADS)
    variants: list[tuple[str, str | None]] = [(f"this checkout ({_commit('HEAD')})", None)]
    if args.baseline:
        variants.insert(0, (f"{args.baseline} ({_commit(args.baseline)})", args.baseline))
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{json.dumps(options)}; {args.rounds} rounds{'; callgrind' if args.callgrind else ''}",
        flush=True,
    )
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        trees = [stack.enter_context(_relay_tree(ref)) for _, ref in variants]
        for _ in range(args.rounds):
            for (label, _), tree in zip(variants, trees, strict=True):
                for workload in workloads:
                    phases = run_once(tree, workload, options, args.callgrind, args.redis_cpu)
                    for phase, r in phases.items():
                        results.setdefault((workload, phase, label), []).append(r)
    key = "instructions_per_msg" if args.callgrind else "cpu_us_per_msg"
    for workload, phase in dict.fromkeys((w, p) for w, p, _ in results):
        print(f"{workload} / {phase}:")
        medians = [_median(results[(workload, phase, label)]) for label, _ in variants]
        for (label, _), r in zip(variants, medians, strict=True):
            print(_report(label, r, args.callgrind))
        if len(medians) == 2:
            old, new = medians
            print(
                f"  this / {args.baseline}: calls {new['calls_per_msg'] / old['calls_per_msg']:.2f}x,"
                f" {'instructions' if args.callgrind else 'CPU'} {new[key] / old[key]:.2f}x"
            )


if __name__ == "__main__":
    main()
