"""The end of a run: a rich table on the terminal, a JSON result and a Markdown summary."""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Sequence
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from . import compare
from .measured import Measured
from .options import CLUSTER_PRIMARIES, BenchOptions
from .outcome import Outcome, us


def _redact(url: str | None) -> str | None:
    return re.sub(r"//[^@/]*@", "//***@", url) if url else url


def _server(options: BenchOptions, m: Measured) -> dict[str, Any]:
    target = m.target
    welcome = {k: v for k, v in target.welcome.items() if k not in ("type", "mailbox", "session")}
    return {
        "kind": target.kind,
        "url": target.url,
        "spawned": target.spawned,
        "pid": target.relay_pid,
        "redis_url": _redact(target.redis_url),
        "welcome": welcome,
        "relay_cpu": options.relay_cpu,
        "client_cpu": options.client_cpu,
        "workers": options.workers if target.kind == "relay" else 1,
        "redis": options.redis if target.spawned and target.kind == "relay" else None,
    }


def redis_text(relay: dict[str, Any]) -> str:
    """The relay's workers and the Redis it ran on, for the report's header."""
    workers = relay.get("workers", 1)
    kind = relay.get("redis")
    if kind == "cluster":
        where = f"spawned Redis Cluster, {CLUSTER_PRIMARIES} primaries ({relay['redis_url']})"
    elif kind == "single":
        where = "spawned Valkey (one server)"
    else:
        where = relay.get("redis_url") or "not known"
    return f"{workers} worker(s); {where}"


def _loop(o: BenchOptions) -> dict[str, Any]:
    return {
        "workload": o.workload,
        "pairs": o.pairs,
        "window": o.window,
        "messages": o.messages,
        "rate": o.rate,
        "body_bytes": o.body_bytes,
    }


def build(
    options: BenchOptions,
    main: Measured,
    calibration: Measured | None,
    baseline: Measured | None,
    context: dict[str, Any],
    runs: Sequence[Measured] = (),
) -> dict[str, Any]:
    """The JSON result of a run (no secrets in it): the workload on this relay, and the
    calibration and the baseline when they ran, with the comparisons. With --repeat, `main`
    and `baseline` are each side's median run, and `runs` all of them, as they ran."""
    opts = {k: v for k, v in attrs.asdict(options).items() if k != "jwt_secret"}
    opts["redis_url"] = _redact(options.redis_url)
    workload = options.workload
    ceiling_run = main if workload == "calibrate" else calibration
    ceiling = (
        compare.headline(ceiling_run.options.workload, ceiling_run.outcome.metrics)
        if ceiling_run
        else None
    )
    failures = [
        f"{m.label}: {line}" for m in (calibration, baseline) if m for line in m.failures.lines()
    ]
    failures += [
        f"{m.label} run {n}: {line}"
        for n, m in enumerate(runs, 1)
        if m is not main and m is not baseline
        for line in m.failures.lines()
    ]
    result: dict[str, Any] = {
        "workload": workload,
        "ok": all(m.ok for m in (main, calibration, baseline, *runs) if m),
        **context,
        "options": opts,
        "relay": _server(options, main),
        "sent": main.outcome.sent,
        "delivered": main.outcome.delivered,
        "failures": main.failures.lines() + failures,
        "failure_counts": dict(main.failures.counts),
        "results": main.outcome.metrics,
        "headline": compare.headline(workload, main.outcome.metrics),
        "targets": main.outcome.targets,
        "notes": main.outcome.notes,
        "calibration": None,
        "vs_ceiling": [],
        "baseline": None,
        "vs_baseline": [],
        "repeats": _repeats(workload, runs, main, baseline) if runs else None,
    }
    if ceiling is not None and ceiling_run is not None:
        result["calibration"] = {
            "server": "echo server: bare trio + wsproto, the relay protocol, no storage",
            "loop": _loop(ceiling_run.options),
            "ceiling": ceiling,
            "ok": ceiling_run.ok,
            "failure_counts": dict(ceiling_run.failures.counts),
            "rows": ceiling_run.outcome.rows,
            "results": ceiling_run.outcome.metrics,
            "pid": ceiling_run.target.relay_pid,
        }
        if workload != "calibrate":
            result["vs_ceiling"] = compare.versus_ceiling(workload, main.outcome.metrics, ceiling)
    if baseline is not None:
        result["baseline"] = {
            "ref": options.baseline,
            "commit": baseline.commit,
            "dropped_args": baseline.dropped_args,
            "ok": baseline.ok,
            "failure_counts": dict(baseline.failures.counts),
            "relay": _server(options, baseline),
            "sent": baseline.outcome.sent,
            "delivered": baseline.outcome.delivered,
            "headline": compare.headline(workload, baseline.outcome.metrics),
            "vs_ceiling": compare.versus_ceiling(workload, baseline.outcome.metrics, ceiling)
            if ceiling
            else [],
            "rows": baseline.outcome.rows,
            "results": baseline.outcome.metrics,
        }
        result["vs_baseline"] = compare.versus_baseline(
            workload, main.outcome.metrics, baseline.outcome.metrics
        )
    return result


def _repeats(
    workload: str, runs: Sequence[Measured], main: Measured, baseline: Measured | None
) -> dict[str, Any]:
    """Every run's headline numbers in the order they ran, and each side's medians."""
    sides = {
        side: [r.outcome.metrics for r in runs if r.label == side] for side in ("relay", "baseline")
    }
    medians = {side: compare.medians(workload, m) for side, m in sides.items() if m}
    ratios = {}
    paired: dict[str, float | None] = {}
    if "baseline" in medians:
        ratios = {
            key: compare.ratio(value, medians["baseline"][key])
            for key, value in medians["relay"].items()
        }
        paired = _paired_ratios(workload, runs)
    return {
        "by": compare.MEDIAN_BY[workload],
        "runs": [
            {
                "label": r.label,
                "ok": r.ok,
                "median_run": r is main or r is baseline,
                "headline": compare.headline(workload, r.outcome.metrics),
            }
            for r in runs
        ],
        "medians": medians,
        "median_ratios": ratios,
        "paired_ratios": paired,
    }


def _paired_ratios(workload: str, runs: Sequence[Measured]) -> dict[str, float | None]:
    """Per headline number, the geometric mean over the turns of relay / baseline within
    each turn (two runs next to each other): where the machine's speed drifts between
    runs, this tells a difference sooner than the ratio of the medians does."""
    turns = [runs[i : i + 2] for i in range(0, len(runs) - 1, 2)]
    headlines = [
        {r.label: compare.headline(workload, r.outcome.metrics) for r in turn} for turn in turns
    ]
    paired: dict[str, float | None] = {}
    for item in compare.ITEMS[workload]:
        values = [compare.ratio(t["relay"][item.key], t["baseline"][item.key]) for t in headlines]
        known = [v for v in values if v]  # a ratio is None where a side has no value
        paired[item.key] = (
            round(statistics.geometric_mean(known), 3) if len(known) == len(values) > 0 else None
        )
    return paired


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


def value_text(value: float | None, unit: str) -> str:
    """A headline number in its unit, for tables."""
    if value is None:
        return "-"
    if unit == "µs":
        return us(value)
    if unit == "bytes":
        return f"{value / 1024:.1f} KiB"
    if unit == "cores":
        return f"{value:.0%} of a core"
    if unit == "x":
        return f"x{value:g}"
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def ceiling_text(result: dict[str, Any]) -> str:
    """One line: what the calibration measured, or that it did not run."""
    cal = result.get("calibration")
    if not cal:
        return "not measured (--no-calibrate)"
    c, loop = cal["ceiling"], cal["loop"]
    shape = f"{loop['workload']} loop, {loop['pairs']} pairs x {loop['messages']:,}"
    if loop["workload"] == "latency":
        shape += f" at {loop['rate']:,.0f} msgs/s"
    numbers = ", ".join(
        f"{name}{text}"
        for key, name, unit in (
            ("msgs_per_s", "", "msgs/s"),
            ("relay_cpu_us_per_msg", "", "µs/msg"),
            ("p50_us", "p50 ", "µs"),
            ("p99_us", "p99 ", "µs"),
        )
        if (text := value_text(c.get(key), unit)) != "-"
    )
    failed = "" if cal["ok"] else " (SELF-CHECK FAILED)"
    return f"echo server (trio + wsproto, no storage), {shape}: {numbers}{failed}"


TextTable = tuple[str, list[str], list[list[str]]]  # title, header, rows


def comparison_tables(result: dict[str, Any]) -> list[TextTable]:
    """The fractions of the ceiling and the ratios to the baseline, as tables."""
    tables: list[TextTable] = []
    header = ["metric", "this relay", "ceiling", "this / ceiling"]
    for who, rows in (("", result["vs_ceiling"]), ("baseline ", _baseline_vs_ceiling(result))):
        if rows:
            tables.append(
                (
                    f"{who}against the ceiling (echo server)".capitalize(),
                    header if not who else ["metric", "baseline", "ceiling", "baseline / ceiling"],
                    [
                        [
                            r["key"],
                            value_text(r["value"], r["unit"]),
                            value_text(r["ceiling"], r["unit"]),
                            "-" if r["ratio"] is None else f"{r['ratio']:g}",
                        ]
                        for r in rows
                    ],
                )
            )
    base = result.get("baseline")
    if base:
        title = f"Against the baseline {base['ref']} ({(base['commit'] or '')[:10]})"
        tables.append(
            (
                title,
                ["metric", "this relay", "baseline", "this / baseline"],
                [
                    [
                        r["key"],
                        value_text(r["this"], r["unit"]),
                        value_text(r["baseline"], r["unit"]),
                        "-" if r["ratio"] is None else f"{r['ratio']:g}",
                    ]
                    for r in result["vs_baseline"]
                ],
            )
        )
    repeats = result.get("repeats")
    if repeats:
        tables.append(_repeats_table(result["workload"], repeats))
    return tables


def _repeats_table(workload: str, repeats: dict[str, Any]) -> TextTable:
    """One row per headline number: each run's, as they ran (* marks a side's median run),
    then each side's median, the ratio of the medians and the paired ratio."""
    runs = repeats["runs"]
    header = [
        "metric",
        *[f"{n}: {r['label']}{' *' if r['median_run'] else ''}" for n, r in enumerate(runs, 1)],
        *[f"median: {side}" for side in repeats["medians"]],
    ]
    ratios, paired = repeats["median_ratios"], repeats["paired_ratios"]
    if ratios:
        header += ["relay / baseline", "paired (geomean)"]
    rows = []
    for item in compare.ITEMS[workload]:
        row = [item.key, *[value_text(r["headline"][item.key], item.unit) for r in runs]]
        row += [value_text(m[item.key], item.unit) for m in repeats["medians"].values()]
        if ratios:
            for value in (ratios[item.key], paired[item.key]):
                row.append("-" if value is None else f"{value:g}")
        rows.append(row)
    title = f"Repeats (* each side's median run by {repeats['by']}: the one reported above)"
    return title, header, rows


def _baseline_vs_ceiling(result: dict[str, Any]) -> list[dict[str, Any]]:
    base = result.get("baseline")
    return list(base["vs_ceiling"]) if base else []


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(row) + " |" for row in rows],
    ]


def markdown(result: dict[str, Any], outcome: Outcome) -> str:
    m = result["machine"]
    git = result["git"]
    relay = result["relay"]
    what = "echo server" if relay["kind"] == "echo" else "relay"
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
        f"| {what} | {relay['url']} ({'spawned' if relay['spawned'] else 'given'}),"
        f" {what} CPU {relay['relay_cpu'] or 'not pinned'},"
        f" generator CPU {relay['client_cpu'] or 'not pinned'},"
        f" {result['options']['procs']} generator process(es) |",
        f"| relay processes, Redis | {redis_text(relay)} |",
        f"| calibration ceiling | {ceiling_text(result)} |",
    ]
    base = result.get("baseline")
    if base:
        dropped = ", ".join(base["dropped_args"]) or "none"
        lines.append(
            f"| baseline | `{base['ref']}` = `{base['commit']}`, spawned the same way"
            f" (flags it does not know, left out: {dropped}) |"
        )
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in outcome.rows]
    lines.append("")
    if outcome.targets:
        lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += ["| {} | {} | {} |".format(*_target_text(t)) for t in outcome.targets]
        lines.append("")
    for title, header, rows in comparison_tables(result):
        lines += [f"## {title}", "", *_md_table(header, rows), ""]
    if base:
        lines += [f"## Baseline results ({base['ref']})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in base["rows"]]
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
    base = result.get("baseline")
    if base:
        table = Table(title=f"relay bench {result['workload']}: baseline {base['ref']}")
        table.add_column("metric", style="bold")
        table.add_column("value")
        for name, value in base["rows"]:
            table.add_row(name, value)
        console.print(table)
    if outcome.targets:
        targets = Table(title="targets")
        for column in ("target", "measured", "verdict"):
            targets.add_column(column)
        for t in outcome.targets:
            target, value, verdict = _target_text(t)
            targets.add_row(target, value, verdict, style=None if t["met"] else "yellow")
        console.print(targets)
    console.print(f"calibration ceiling: {ceiling_text(result)}")
    for title, header, rows in comparison_tables(result):
        table = Table(title=title)
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
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
