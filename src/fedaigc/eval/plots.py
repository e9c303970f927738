"""PNG plots for reports (matplotlib, no display needed): titled, axes labelled, with legends."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def grouped_bars(
    groups: list[str],
    series: dict[str, list[float]],
    title: str,
    ylabel: str,
    path: Path,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One group of bars per item of `groups`, one bar per series."""
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2) + _legend_width(outside=True), 3.6))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    _legend(ax, outside=True)  # bars fill the axes: a legend inside hides some
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def curves(
    series: dict[str, tuple[list[float], list[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: Path,
    integer_x: bool = True,
) -> Path:
    """One line per series of (x, y); `integer_x` for rounds, off for a continuous x such as a ratio."""
    fig, ax = plt.subplots(figsize=(6 + _legend_width(outside=len(series) > 4), 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ticks = sorted({x for xs, _ in series.values() for x in xs})
    if integer_x and len(ticks) <= 12:
        ax.set_xticks(ticks)  # every round, also when there is only one
    elif integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax, outside=len(series) > 4)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _legend_width(outside: bool) -> float:
    """Extra figure width (inches) for a legend beside the axes."""
    return 2.6 if outside else 0.0


def _legend(ax, outside: bool) -> None:
    """Beside the axes where inside it would hide data (bars, many lines); else where it fits best."""
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend()
