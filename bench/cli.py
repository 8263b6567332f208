"""`relay bench WORKLOAD ...`: run one workload against a relay and report it (after the
calibration on the echo server, and with the baseline relay when asked).

Exit status: 0 when every self-check passed (targets missed or not), 1 when a
self-check failed or the run could not finish, 2 on a usage error or when the
relay could not be started or reached.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.console import Console

from . import compare, plots, report
from .baseline import BaselineError, RelayTree
from .calibrate import calibration_options
from .measured import Measured, Refused, measure, profile_path
from .options import BenchOptions, from_args
from .system import command_line, git_commit, machine, pin_self, raise_open_files, utc_now
from .target import TargetError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        options = from_args(args)
    except ValueError as exc:
        err.print(f"relay bench: {exc}")
        return EXIT_USAGE
    pin_self(options.client_cpu)  # the generator, and the Valkey started below, inherit it
    raise_open_files(2 * options.connections + 1024)
    context = {
        "command": command_line(),
        "date": utc_now().isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine(),
    }
    stem = f"{options.workload}-{utc_now().strftime('%Y%m%dT%H%M%SZ')}"
    try:
        main, calibration, baseline, runs = _measure_all(options, err, stem)
    except (TargetError, BaselineError, Refused) as exc:
        err.print(f"relay bench {options.workload}: {exc}")
        return EXIT_USAGE
    if baseline is not None:
        compare.baseline_targets(
            options, main.outcome, main.outcome.metrics, baseline.outcome.metrics
        )
    result = report.build(options, main, calibration, baseline, context, runs)
    if main.profile:
        result["profile"] = main.profile
    result["plots"] = plots.draw(
        _curves(main, calibration, baseline),
        _series(main, baseline),
        options.out,
        stem,
        plots.Labels.of(result),
        main.outcome.targets,
        _ceiling_rate(result),
    )
    json_path, md_path = report.write(result, main.outcome, options.out, stem)
    report.show(Console(), result, main.outcome)
    err.print(f"wrote {json_path}, {md_path} and {len(result['plots'])} plot(s)")
    return EXIT_OK if result["ok"] else EXIT_FAILED


def _measure_all(
    options: BenchOptions, err: Console, stem: str
) -> tuple[Measured, Measured | None, Measured | None, list[Measured]]:
    """The calibration (unless skipped), the workload, and the baseline (with --baseline);
    with --repeat, the median run of each side, and every run in the order they ran."""
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(RelayTree(options.baseline)) if options.baseline else None
        profile = profile_path(options, stem)
        if options.workload == "calibrate":
            err.print("calibration: the echo server under the throughput loop")
            echo = measure("calibration", calibration_options(options), err, profile)
            return echo, None, None, []
        calibration: Measured | None = None
        if options.calibrate:
            err.print("calibration: the echo server first (skip it with --no-calibrate)")
            calibration = measure("calibration", calibration_options(options), err)
        runs: list[Measured] = []
        for turn in range(options.repeat):
            # ABBA: the relay that runs first in a pair pays for it (bench/results/SUMMARY.md)
            sides = ["relay", "baseline"] if turn % 2 == 0 else ["baseline", "relay"]
            of = f" (run {turn + 1} of {options.repeat})" if options.repeat > 1 else ""
            for side in sides:
                if side == "relay":
                    err.print(f"{options.workload}: this checkout's relay{of}")
                    runs.append(measure("relay", options, err, profile))
                elif tree is not None:
                    err.print(
                        f"{options.workload}: the baseline relay, {tree.ref}"
                        f" ({tree.commit[:10]}){of}"
                    )
                    runs.append(measure("baseline", options, err, tree=tree))
        main = _median_run(options.workload, [r for r in runs if r.label == "relay"])
        others = [r for r in runs if r.label == "baseline"]
        baseline = _median_run(options.workload, others) if others else None
        return main, calibration, baseline, runs if options.repeat > 1 else []


def _median_run(workload: str, runs: list[Measured]) -> Measured:
    return runs[compare.median_index(workload, [r.outcome.metrics for r in runs])]


def _curves(
    main: Measured, calibration: Measured | None, baseline: Measured | None
) -> dict[str, HdrHistogram]:
    """This relay's latency curves, and the first of the baseline's and the calibration's."""
    curves = dict(main.outcome.histograms)
    for prefix, other in (("baseline", baseline), ("ceiling (echo)", calibration)):
        if other is not None and other.outcome.histograms:
            name, hist = next(iter(other.outcome.histograms.items()))
            curves[f"{prefix}: {name}"] = hist
    return curves


def _series(main: Measured, baseline: Measured | None) -> dict[str, dict[int, int]]:
    series = dict(main.outcome.series)
    if baseline is not None:
        series.update({f"baseline: {k}": v for k, v in baseline.outcome.series.items()})
    return series


def _ceiling_rate(result: dict[str, Any]) -> float | None:
    """The ceiling's msgs/s where it is one (a closed loop: an open loop's is its rate)."""
    cal = result.get("calibration")
    if not cal or cal["loop"]["workload"] != "throughput":
        return None
    rate: float | None = cal["ceiling"].get("msgs_per_s")
    return rate


def main(argv: list[str] | None = None) -> int:
    """`python -m relay_bench.cli WORKLOAD ...`, the same as `relay bench`."""
    from .options import add_arguments

    parser = argparse.ArgumentParser(prog="relay bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
