"""PNG plots of a run with matplotlib (Agg): latency distributions and deliveries over time.

Each plot names the workload, the commit and the machine in its title, and the
date and command in a footer. The latency plot marks every curve's p50 and
p99 and draws the latency targets (µs) as lines; the throughput plot draws the
throughput targets (msgs/s) and the calibration's ceiling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from hdrh.histogram import HdrHistogram
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter

from .measure import BUCKET_S

MAX_PERCENTILE = 99.999
MARKED = (50.0, 99.0)  # percentiles marked on each latency curve
FOOTER_CHARS = 160


@attrs.frozen
class Labels:
    title: str  # "relay bench WORKLOAD @ COMMIT"
    machine: str
    footer: str

    @classmethod
    def of(cls, result: dict[str, Any]) -> Labels:
        git, m = result["git"], result["machine"]
        commit = (git.get("commit") or "no git")[:10] + (" (dirty)" if git.get("dirty") else "")
        command = result["command"]
        if len(command) > FOOTER_CHARS:
            command = command[: FOOTER_CHARS - 1] + "…"
        return cls(
            title=f"relay bench {result['workload']} @ {commit}",
            machine=f"{m['cpu_model']}, {m['nproc']} CPUs, {m['memory_mib']} MiB",
            footer=f"{result['date']} · {command}",
        )


def _percentile_x(p: float) -> float:
    """The HDR plot's axis: 1 / (1 - percentile)."""
    return 1.0 / (1.0 - min(p, MAX_PERCENTILE) / 100.0)


def _percentile_curve(hist: HdrHistogram) -> tuple[list[float], list[float]]:
    """x = 1 / (1 - percentile), y = latency in ms."""
    xs, ys = [], []
    for item in hist.get_percentile_iterator(5):
        p = min(item.percentile_level_iterated_to, MAX_PERCENTILE)
        xs.append(_percentile_x(p))
        ys.append(item.value_iterated_to / 1000.0)
        if p >= MAX_PERCENTILE:
            break
    return xs, ys


def _figure(labels: Labels, what: str) -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=(9, 5.2))
    ax.set_title(f"{labels.title}: {what}\n{labels.machine}", fontsize=10)
    fig.text(0.01, 0.01, labels.footer, fontsize=6.5, color="0.35")
    return fig, ax


def _save(fig: Figure, path: str) -> None:
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _style(name: str) -> str:
    """Dashed for the baseline's curves, solid for this relay's (and the ceiling's)."""
    return "--" if name.startswith("baseline") else "-"


def _target_lines(ax: Axes, targets: Sequence[dict[str, Any]], unit: str, scale: float) -> None:
    for t in targets:
        if t["unit"] != unit:
            continue
        limit = t["limit"] * scale
        shown = f"{limit:.3g} ms" if unit == "µs" else f"{limit:,.0f} {unit}"
        ax.axhline(
            limit,
            color="black",
            linestyle=":",
            linewidth=1.2,
            label=f"target: {t['name']} {t['op']} {shown}",
        )


def latency_plot(
    histograms: dict[str, HdrHistogram],
    labels: Labels,
    path: str,
    targets: Sequence[dict[str, Any]] = (),
) -> bool:
    curves = {name: h for name, h in histograms.items() if h.get_total_count()}
    if not curves:
        return False
    fig, ax = _figure(labels, "latency distribution")
    for i, (name, hist) in enumerate(curves.items()):
        xs, ys = _percentile_curve(hist)
        (line,) = ax.plot(xs, ys, _style(name), label=f"{name} (n={hist.get_total_count():,})")
        for p in MARKED:
            value = hist.get_value_at_percentile(p) / 1000.0
            ax.plot([_percentile_x(p)], [value], "o", color=line.get_color(), markersize=4)
            ax.annotate(
                f"p{p:g} {value:.3g} ms",
                (_percentile_x(p), value),
                textcoords="offset points",
                xytext=(4, 4 + 9 * i),  # apart when curves meet
                fontsize=7,
                color=line.get_color(),
            )
    for p in MARKED:
        ax.axvline(_percentile_x(p), color="0.6", linewidth=0.8, linestyle=":")
    _target_lines(ax, targets, "µs", 1 / 1000.0)
    ax.set_xscale("log")
    ticks = [2, 10, 100, 1000, 10000, 100000]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"p{100 - 100 / x:g}"))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def throughput_plot(
    series: dict[str, dict[int, int]],
    labels: Labels,
    path: str,
    targets: Sequence[dict[str, Any]] = (),
    ceiling_msgs_per_s: float | None = None,
) -> bool:
    series = {label: b for label, b in series.items() if b}
    if not series:
        return False
    fig, ax = _figure(labels, "deliveries over time")
    for label, buckets in series.items():
        first, last = min(buckets), max(buckets)
        xs = [(b - first) * BUCKET_S for b in range(first, last + 1)]
        ys = [buckets.get(b, 0) / BUCKET_S for b in range(first, last + 1)]
        ax.plot(xs, ys, _style(label), label=label, drawstyle="steps-post")
    _target_lines(ax, targets, "msgs/s", 1.0)
    if ceiling_msgs_per_s:
        ax.axhline(
            ceiling_msgs_per_s,
            color="0.45",
            linestyle="-.",
            linewidth=1,
            label=f"ceiling (echo server): {ceiling_msgs_per_s:,.0f} msgs/s",
        )
    ax.set_xlabel(f"seconds since each round's first delivery ({BUCKET_S:g} s buckets)")
    ax.set_ylabel("deliveries per second")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def draw(
    histograms: dict[str, HdrHistogram],
    series: dict[str, dict[int, int]],
    out_dir: str,
    stem: str,
    labels: Labels,
    targets: Sequence[dict[str, Any]] = (),
    ceiling_msgs_per_s: float | None = None,
) -> list[str]:
    """Write the plots that have data; their file names (relative to `out_dir`)."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if latency_plot(histograms, labels, os.path.join(out_dir, f"{stem}-latency.png"), targets):
        written.append(f"{stem}-latency.png")
    if throughput_plot(
        series,
        labels,
        os.path.join(out_dir, f"{stem}-throughput.png"),
        targets,
        ceiling_msgs_per_s,
    ):
        written.append(f"{stem}-throughput.png")
    return written
