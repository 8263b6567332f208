"""PNG plots of a run with matplotlib (Agg): latency distributions and deliveries over time."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from hdrh.histogram import HdrHistogram
from matplotlib.ticker import FixedLocator, FuncFormatter

from .measure import BUCKET_S

MAX_PERCENTILE = 99.999


def _percentile_curve(hist: HdrHistogram) -> tuple[list[float], list[float]]:
    """x = 1 / (1 - percentile) (the HDR plot's axis), y = latency in ms."""
    xs, ys = [], []
    for item in hist.get_percentile_iterator(5):
        p = min(item.percentile_level_iterated_to, MAX_PERCENTILE)
        xs.append(1.0 / (1.0 - p / 100.0))
        ys.append(item.value_iterated_to / 1000.0)
        if p >= MAX_PERCENTILE:
            break
    return xs, ys


def latency_plot(histograms: dict[str, HdrHistogram], title: str, path: str) -> bool:
    curves = {name: h for name, h in histograms.items() if h.get_total_count()}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, hist in curves.items():
        xs, ys = _percentile_curve(hist)
        ax.plot(xs, ys, label=f"{name} (n={hist.get_total_count():,})")
    ax.set_xscale("log")
    ticks = [2, 10, 100, 1000, 10000, 100000]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"p{100 - 100 / x:g}"))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def throughput_plot(series: dict[str, dict[int, int]], title: str, path: str) -> bool:
    series = {label: b for label, b in series.items() if b}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, buckets in series.items():
        first, last = min(buckets), max(buckets)
        xs = [(b - first) * BUCKET_S for b in range(first, last + 1)]
        ys = [buckets.get(b, 0) / BUCKET_S for b in range(first, last + 1)]
        ax.plot(xs, ys, label=label, drawstyle="steps-post")
    ax.set_xlabel(f"seconds since the first delivery ({BUCKET_S:g} s buckets)")
    ax.set_ylabel("deliveries per second")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def draw(
    histograms: dict[str, HdrHistogram],
    series: dict[str, dict[int, int]],
    out_dir: str,
    stem: str,
    title: str,
) -> list[str]:
    """Write the plots that have data; their file names (relative to `out_dir`)."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if latency_plot(
        histograms, f"{title}: latency distribution", os.path.join(out_dir, f"{stem}-latency.png")
    ):
        written.append(f"{stem}-latency.png")
    if throughput_plot(
        series, f"{title}: deliveries over time", os.path.join(out_dir, f"{stem}-throughput.png")
    ):
        written.append(f"{stem}-throughput.png")
    return written
