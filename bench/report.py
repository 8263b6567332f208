"""The end of a run: a rich table on the terminal, a JSON result and a Markdown summary."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from .checks import Failures
from .options import BenchOptions
from .outcome import Outcome
from .target import Target


def _redact(url: str | None) -> str | None:
    return re.sub(r"//[^@/]*@", "//***@", url) if url else url


def build(
    options: BenchOptions,
    target: Target,
    outcome: Outcome,
    failures: Failures,
    context: dict[str, Any],
) -> dict[str, Any]:
    """The JSON result of a run (no secrets in it)."""
    opts = {k: v for k, v in attrs.asdict(options).items() if k != "jwt_secret"}
    opts["redis_url"] = _redact(options.redis_url)
    welcome = {k: v for k, v in target.welcome.items() if k not in ("type", "mailbox", "session")}
    return {
        "workload": options.workload,
        "ok": not failures,
        **context,
        "options": opts,
        "relay": {
            "url": target.url,
            "spawned": target.spawned,
            "pid": target.relay_pid,
            "redis_url": _redact(target.redis_url),
            "welcome": welcome,
            "relay_cpu": options.relay_cpu,
            "client_cpu": options.client_cpu,
        },
        "sent": outcome.sent,
        "delivered": outcome.delivered,
        "failures": failures.lines(),
        "failure_counts": dict(failures.counts),
        "results": outcome.metrics,
        "targets": outcome.targets,
        "notes": outcome.notes,
    }


def write(result: dict[str, Any], outcome: Outcome, out_dir: str, stem: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{stem}.json")
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(json_path, "w") as file:
        json.dump(result, file, indent=2, default=str)
        file.write("\n")
    with open(md_path, "w") as file:
        file.write(markdown(result, outcome))
    return json_path, md_path


def _target_text(t: dict[str, Any]) -> tuple[str, str, str]:
    value = "-" if t["value"] is None else f"{t['value']:,}"
    verdict = (
        "met"
        if t["met"]
        else (f"missed by {t['gap_pct']}%" if t["gap_pct"] is not None else "missed")
    )
    return f"{t['name']} {t['op']} {t['limit']:,} {t['unit']}", value, verdict


def markdown(result: dict[str, Any], outcome: Outcome) -> str:
    m = result["machine"]
    git = result["git"]
    lines = [
        f"# relay bench {result['workload']}: {'OK' if result['ok'] else 'FAILED'}",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{result['command']}` |",
        f"| date (UTC) | {result['date']} |",
        f"| git commit | `{git['commit']}`{' (dirty tree)' if git['dirty'] else ''} |",
        f"| machine | {m['cpu_model']}, {m['nproc']} CPUs, {m['memory_mib']} MiB, {m['platform']} |",
        f"| load average at start | {m['load_average']} |",
        f"| relay | {result['relay']['url']} ({'spawned' if result['relay']['spawned'] else 'given'}),"
        f" relay CPU {result['relay']['relay_cpu'] or 'not pinned'},"
        f" generator CPU {result['relay']['client_cpu'] or 'not pinned'},"
        f" {result['options']['procs']} generator process(es) |",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in outcome.rows],
        "",
    ]
    if outcome.targets:
        lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += ["| {} | {} | {} |".format(*_target_text(t)) for t in outcome.targets]
        lines.append("")
    lines += ["## Self-checks", ""]
    if result["failures"]:
        lines += [f"- FAILED: {line}" for line in result["failures"]]
    else:
        lines.append(
            "All passed: nothing lost, out of order, duplicated, delivered after its ack or "
            "expiry; no key without TTL; no key left behind (where Redis was known)."
        )
    lines.append("")
    profile = result.get("profile")
    if profile:
        lines += _profile_lines(profile)
    if outcome.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in outcome.notes], ""]
    if result.get("plots"):
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in result["plots"]], ""]
    return "\n".join(lines)


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    if "error" in profile:
        return ["## Profile", "", f"py-spy failed: {profile['error']}", ""]
    lines = [
        "## Profile (py-spy, relay process)",
        "",
        f"{profile['samples']:,} samples at {profile['rate_hz']} Hz over all threads; "
        f"collapsed stacks in `{profile['file']}` (flamegraph.pl, speedscope).",
        "",
        "| thread | % of samples |",
        "|---|---|",
        *[f"| {name} | {pct} |" for name, pct in profile["threads_pct"]],
        "",
        "| function (self) | % |",
        "|---|---|",
        *[f"| `{name}` | {pct} |" for name, pct in profile["top_self_pct"]],
        "",
        "| relay function (inclusive) | % |",
        "|---|---|",
        *[f"| `{name}` | {pct} |" for name, pct in profile["top_relay_inclusive_pct"]],
        "",
    ]
    return lines


def show(console: Console, result: dict[str, Any], outcome: Outcome) -> None:
    table = Table(title=f"relay bench {result['workload']}", show_lines=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for name, value in outcome.rows:
        table.add_row(name, value)
    console.print(table)
    if outcome.targets:
        targets = Table(title="targets (issue 5)")
        for column in ("target", "measured", "verdict"):
            targets.add_column(column)
        for t in outcome.targets:
            target, value, verdict = _target_text(t)
            targets.add_row(target, value, verdict, style=None if t["met"] else "yellow")
        console.print(targets)
    profile = result.get("profile")
    if profile and "error" not in profile:
        top = Table(title=f"relay profile: {profile['samples']:,} samples (top relay functions)")
        top.add_column("function (inclusive)")
        top.add_column("%", justify="right")
        for name, pct in profile["top_relay_inclusive_pct"][:8]:
            top.add_row(name, f"{pct}")
        console.print(top)
    elif profile:
        console.print(f"[yellow]profile: {profile['error']}[/]")
    for note in outcome.notes:
        console.print(f"note: {note}")
    if result["failures"]:
        console.print("[bold red]SELF-CHECK FAILED[/]")
        for line in result["failures"]:
            console.print(f"[red]  {line}[/]")
    else:
        console.print("[bold green]self-checks passed[/]")
