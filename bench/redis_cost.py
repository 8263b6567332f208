"""What Redis itself spends per relayed message: commands and CPU, this checkout against another.

Drives the real mailbox store (relay.store_redis on relay.redis_pump) against a
fresh Valkey for every run, and reads what Redis did from `INFO commandstats`
(calls, counting the commands scripts run) and `INFO cpu`. Two workloads:

- `online`: `--tasks` (50) tasks each send a message (with a random ref) to
  one of `--mailboxes` (50) mailboxes and ack it at once, as an online
  recipient does: it gets the message from the send's publish, so nothing is
  fetched. A subscriber on every mailbox's channel takes the publishes.
- `backlog`: the same sends to offline mailboxes (phase `store`), then every
  mailbox starts a session, fetches pages of 100 and acks each page with one
  ack (phase `drain`).

With `--baseline REF` the relay package of git commit REF (extracted with
`git archive` into a temporary directory) runs the same workloads in the same
run, interleaved round by round; each run is its own process and its own
Valkey. Redis CPU is the median over `--rounds`.

    python -m relay_bench.redis_cost [--baseline main] [--messages 20000] [--rounds 3]
        [--tasks 50] [--mailboxes 50] [--body-bytes 100] [--ack-batch 1] [--redis-cpu N]

A run's worker speaks a line protocol on stdin/stdout: it prints `mark PHASE
MESSAGES` at each phase boundary and waits for a line before it goes on, so
the snapshots taken meanwhile hold only the phase's own commands.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WORKLOADS = ("online", "pairs", "backlog")
PREFIX = "cost:"
FETCH_PAGE = 100  # as relay/session.py reads
TTL_S = 3600
SCRIPT_COMMANDS = ("evalsha", "eval", "fcall")


# -- the worker (runs in a child process, with the relay package under test) ----------------


async def _worker(url: str, workload: str, o: dict[str, Any]) -> None:
    import trio

    from relay.redis_conn import RedisConnection, pack
    from relay.redis_pump import RedisPump
    from relay.store_redis import RedisMailboxStore

    pump = RedisPump(url)
    store = RedisMailboxStore(pump, prefix=PREFIX, retention_s=TTL_S)
    body = "x" * o["body_bytes"]
    boxes = [f"box{i}" for i in range(o["mailboxes"])]
    per_task = o["messages"] // o["tasks"]
    messages = per_task * o["tasks"]

    async def mark(phase: str, count: int) -> None:
        print(f"mark {phase} {count}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)

    async def subscriber(task_status: trio.TaskStatus[None]) -> None:
        connection = await RedisConnection.open(url)
        channels = [store.keys(b).channel for b in boxes]
        await connection.send(pack(("SUBSCRIBE", *channels)))
        for _ in channels:
            await connection.reply()
        task_status.started()
        while True:
            await connection.reply()

    async def online(task: int) -> None:
        ids: list[tuple[str, str]] = []
        for n in range(per_task):
            box = boxes[(task + n * o["tasks"]) % len(boxes)]
            now = time.time_ns() // 1_000_000
            accepted = await store.send(f"s{task}", [box], body, TTL_S, secrets.token_hex(8), now)
            ids.append((box, accepted.ids[box]))
            if len(ids) == o["ack_batch"] or n == per_task - 1:
                for b in {b for b, _ in ids}:
                    await store.ack(b, [i for bb, i in ids if bb == b])
                ids.clear()

    async def pair(task: int) -> None:
        box = boxes[task % len(boxes)]
        ids: list[str] = []

        async def send_one() -> None:
            now = time.time_ns() // 1_000_000
            accepted = await store.send(f"s{task}", [box], body, TTL_S, secrets.token_hex(8), now)
            ids.append(accepted.ids[box])

        for _ in range(per_task // o["window"]):
            async with trio.open_nursery() as window:
                for _ in range(o["window"]):
                    window.start_soon(send_one)
            await store.ack(box, ids)
            ids.clear()

    async def store_only(task: int) -> None:
        for n in range(per_task):
            box = boxes[(task + n * o["tasks"]) % len(boxes)]
            now = time.time_ns() // 1_000_000
            await store.send(f"s{task}", [box], body, TTL_S, secrets.token_hex(8), now)

    async def drain(box: str) -> None:
        await store.start_session(box)
        after = 0
        while page := await store.fetch(box, after, FETCH_PAGE):
            after = page[-1].seq
            await store.ack(box, [d.id for d in page])

    async def run_all(fn: Any, args: list[Any]) -> None:
        async with trio.open_nursery() as nursery:
            for a in args:
                nursery.start_soon(fn, a)

    async with trio.open_nursery() as nursery:
        await nursery.start(pump.run)
        await nursery.start(subscriber)
        # Warm up (scripts loaded, connections open) on mailboxes of their own.
        for k in range(3):
            warm = f"warm{k}"
            accepted = await store.send("w", [warm], body, TTL_S, None, time.time_ns() // 10**6)
            await store.start_session(warm)
            await store.fetch(warm, 0, 10)
            await store.ack(warm, list(accepted.ids.values()))
        await mark("start", 0)
        if workload == "online":
            await run_all(online, list(range(o["tasks"])))
            await mark("online", messages)
        elif workload == "pairs":
            await run_all(pair, list(range(o["tasks"])))
            await mark("pairs", per_task // o["window"] * o["window"] * o["tasks"])
        else:
            await run_all(store_only, list(range(o["tasks"])))
            await mark("store", messages)
            await run_all(drain, boxes)
            await mark("drain", messages)
        nursery.cancel_scope.cancel()


def worker_main(url: str, workload: str, options: str) -> None:
    import trio

    trio.run(_worker, url, workload, json.loads(options))
    print("done", flush=True)


# -- the driver -----------------------------------------------------------------------------


def _snapshot(client: Any) -> dict[str, Any]:
    info = client.info("all")
    stats = {k.removeprefix("cmdstat_"): v for k, v in info.items() if k.startswith("cmdstat_")}
    return {
        "calls": {k: int(v["calls"]) for k, v in stats.items()},
        "usec": {k: int(v["usec"]) for k, v in stats.items()},
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
    }


def _delta(before: dict[str, Any], after: dict[str, Any], messages: int) -> dict[str, Any]:
    calls = {
        k: v - before["calls"].get(k, 0)
        for k, v in after["calls"].items()
        if v - before["calls"].get(k, 0) > 0
    }
    calls["info"] = calls.get("info", 0) - 1  # the `before` snapshot's own INFO
    calls = {k: v for k, v in calls.items() if v > 0}
    usec = {k: v - before["usec"].get(k, 0) for k, v in after["usec"].items()}
    scripts_usec = sum(usec.get(k, 0) for k in SCRIPT_COMMANDS)
    inner_usec = sum(v for k, v in usec.items() if k not in SCRIPT_COMMANDS and k != "info")
    per = max(messages, 1)
    return {
        "messages": messages,
        "calls_per_msg": sum(calls.values()) / per,
        "by_command": {k: v / per for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
        "scripts_per_msg": sum(calls.get(k, 0) for k in SCRIPT_COMMANDS) / per,
        "cpu_us_per_msg": (after["cpu_s"] - before["cpu_s"]) * 1e6 / per,
        "script_us_per_msg": scripts_usec / per,
        "inner_us_per_msg": inner_usec / per,
        "usec_per_call": {k: usec[k] / v for k, v in calls.items() if k in usec},
    }


@contextmanager
def _relay_tree(ref: str | None) -> Iterator[str | None]:
    """A directory holding the relay package of git commit `ref`, or None for this checkout."""
    if ref is None:
        yield None
        return
    import relay

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(relay.__file__)))
    with tempfile.TemporaryDirectory(prefix="relay-cost-") as tree:
        archive = subprocess.run(
            ["git", "-C", checkout, "archive", "--format=tar", ref, "relay"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        yield tree


def run_once(
    tree: str | None, workload: str, options: dict[str, Any], redis_cpu: int | None
) -> dict[str, dict[str, Any]]:
    """One workload in a fresh Valkey and a fresh worker process; per phase, Redis's work."""
    from relay.embedded import EmbeddedServer
    from relay.redis_sync import connect

    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    with EmbeddedServer() as server:
        if redis_cpu is not None:
            os.sched_setaffinity(server.pid, {redis_cpu})
        client = connect(server.url, timeout_s=30)
        command = [sys.executable, "-m", "relay_bench.redis_cost", "--worker", server.url]
        command += [workload, json.dumps(options)]
        # Not run from the current directory: `python -m` puts it first on sys.path,
        # before PYTHONPATH, and a checkout there would shadow the tree under test.
        worker = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree or tempfile.gettempdir(),
        )
        assert worker.stdin is not None and worker.stdout is not None
        phases: dict[str, dict[str, Any]] = {}
        try:
            before = None
            for line in worker.stdout:
                if line.startswith("done"):
                    break
                _, phase, count = line.split()
                now = _snapshot(client)
                if before is not None:
                    phases[phase] = _delta(before, now, int(count))
                before = now
                worker.stdin.write("go\n")
                worker.stdin.flush()
        finally:
            worker.stdin.close()
            if worker.wait(timeout=600) != 0:
                raise RuntimeError(f"the {workload} worker failed ({worker.returncode})")
            client.close()
    return phases


def _commit(ref: str) -> str:
    import relay

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(relay.__file__)))
    try:
        done = subprocess.run(
            ["git", "-C", checkout, "rev-parse", "--short", ref],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    return {
        **first,
        "cpu_us_per_msg": statistics.median(r["cpu_us_per_msg"] for r in runs),
        "script_us_per_msg": statistics.median(r["script_us_per_msg"] for r in runs),
        "inner_us_per_msg": statistics.median(r["inner_us_per_msg"] for r in runs),
        "cpu_spread": (
            min(r["cpu_us_per_msg"] for r in runs),
            max(r["cpu_us_per_msg"] for r in runs),
        ),
    }


def _line(label: str, r: dict[str, Any]) -> str:
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["by_command"].items())[:12])
    low, high = r["cpu_spread"]
    cost = ", ".join(f"{k} {v:.2f}" for k, v in r["usec_per_call"].items())
    return (
        f"  {label:<22} {r['calls_per_msg']:6.2f} calls/msg ({r['scripts_per_msg']:.2f} scripts)"
        f"  CPU {r['cpu_us_per_msg']:6.1f} µs/msg [{low:.1f}-{high:.1f}]"
        f"  scripts {r['script_us_per_msg']:6.1f} µs/msg (commands in them"
        f" {r['inner_us_per_msg']:.1f})\n      {top}\n      µs/call: {cost}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", metavar="REF", help="also run the relay of this git commit")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--mailboxes", type=int, default=50)
    parser.add_argument("--body-bytes", type=int, default=100)
    parser.add_argument("--ack-batch", type=int, default=1, help="ids per ack (online)")
    parser.add_argument("--window", type=int, default=8, help="sends in flight per pair (pairs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workload", choices=WORKLOADS, action="append")
    parser.add_argument("--redis-cpu", type=int, help="pin each Valkey to this CPU")
    args = parser.parse_args()
    options = {
        "messages": args.messages,
        "tasks": args.tasks,
        "mailboxes": args.mailboxes,
        "body_bytes": args.body_bytes,
        "ack_batch": args.ack_batch,
        "window": args.window,
    }
    workloads = args.workload or list(WORKLOADS)
    variants = [("this checkout", None)]
    if args.baseline:
        variants.insert(0, (f"baseline {args.baseline} ({_commit(args.baseline)})", args.baseline))
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"checkout at {_commit('HEAD')}; options {json.dumps(options)}; {args.rounds} rounds"
    )
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    with _relay_trees([ref for _, ref in variants]) as trees:
        for _ in range(args.rounds):
            for (label, _), tree in zip(variants, trees, strict=True):
                for workload in workloads:
                    for phase, r in run_once(tree, workload, options, args.redis_cpu).items():
                        results.setdefault((workload, phase, label), []).append(r)
    for workload in workloads:
        phases = dict.fromkeys(p for (w, p, _) in results if w == workload)
        for phase in phases:
            print(f"{workload} / {phase}:")
            medians = {
                label: _median_runs(results[(workload, phase, label)]) for label, _ in variants
            }
            for label, r in medians.items():
                print(_line(label, r))
            if len(variants) == 2:
                old, new = (medians[label] for label, _ in variants)
                print(
                    f"  new/old: calls {new['calls_per_msg'] / old['calls_per_msg']:.2f}x, "
                    f"CPU {new['cpu_us_per_msg'] / old['cpu_us_per_msg']:.2f}x, "
                    f"scripts {new['script_us_per_msg'] / old['script_us_per_msg']:.2f}x"
                )


@contextmanager
def _relay_trees(refs: list[str | None]) -> Iterator[list[str | None]]:
    if not refs:
        yield []
        return
    with _relay_tree(refs[0]) as tree, _relay_trees(refs[1:]) as rest:
        yield [tree, *rest]


if __name__ == "__main__":
    main()
