"""Plots of unlearning runs and benchmark tables (matplotlib, Agg backend, written atomically as PNG)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from utils import pyplot, save_figure

CURVE_METRICS = (("UA", "UA (100 - forget acc.)"), ("RA", "RA (retain acc.)"), ("TA", "TA (test acc.)"),
                 ("MIA_efficacy", "MIA-Efficacy"))




def _integer_epochs(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_epoch_curves(curves: list[dict], path: str | Path, title: str = "") -> Path:
    """One run: UA, RA, TA, MIA-Efficacy per unlearning epoch (left); Avg. Gap and kept fraction when known (right)."""
    plt = pyplot()
    epochs = [entry["epoch"] for entry in curves]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in CURVE_METRICS:
        left.plot(epochs, [entry.get(key, math.nan) for entry in curves], marker="o", label=label)
    left.set_xlabel("unlearning epoch"), left.set_ylabel("%"), left.legend(fontsize=8)
    if any("avg_gap" in entry for entry in curves):
        right.plot(epochs, [entry.get("avg_gap", math.nan) for entry in curves], marker="o", color="k", label="Avg. Gap")
        right.set_ylabel("Avg. Gap to Retrain (%)")
        right.legend(loc="upper left", fontsize=8)
    kept = [entry.get("stat_kept_fraction") for entry in curves]
    if any(value is not None for value in kept):
        twin = right.twinx()
        twin.plot(epochs, [math.nan if v is None else v for v in kept], marker="s", color="tab:purple",
                  label="kept fraction")
        twin.set_ylabel("fraction of coordinates kept"), twin.set_ylim(0, 1.05)
        twin.legend(loc="upper right", fontsize=8)
    right.set_xlabel("unlearning epoch")
    _integer_epochs(left, right)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_tradeoff(points: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Forget-accuracy gap to Retrain (|rUA|) against test accuracy, one panel per scenario, one point per method
    (mean over seeds, bars = std). Good methods sit low (forget like Retrain) and right (keep test accuracy).

    `points[scenario]` = [{"label", "TA", "TA_std", "gap", "gap_std", "reference": bool}, ...]."""
    plt = pyplot()
    scenarios = list(points)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 5), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        for point in points[scenario]:
            style = {"marker": "*", "markersize": 14, "color": "k"} if point.get("reference") else {"marker": "o"}
            ax.errorbar(point["TA"], point["gap"], xerr=point.get("TA_std", 0), yerr=point.get("gap_std", 0),
                        linestyle="none", capsize=2, **style)
            ax.annotate(point["label"], (point["TA"], point["gap"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("test accuracy TA (%)")
        ax.set_ylabel("forget-accuracy gap to Retrain |rUA| (%)")
        ax.set_title(scenario)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_family_curves(curves: dict[str, dict[str, list[list[dict]]]], path: str | Path, title: str = "") -> Path:
    """Per-epoch UA and TA of the masking family (mean over seeds), one row per scenario.

    `curves[scenario][label]` = one list of per-epoch entries per seed."""
    plt = pyplot()
    scenarios = list(curves)
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(11, 3.8 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        for label, runs in sorted(curves[scenario].items()):
            length = min(len(run) for run in runs)
            epochs = [runs[0][i]["epoch"] for i in range(length)]
            for col, key in enumerate(("UA", "TA")):
                values = np.array([[run[i].get(key, math.nan) for i in range(length)] for run in runs], dtype=float)
                axes[row][col].plot(epochs, values.mean(axis=0), marker="o", markersize=3, label=label)
        for col, key in enumerate(("UA (%)", "TA (%)")):
            axes[row][col].set_xlabel("unlearning epoch")
            axes[row][col].set_ylabel(key)
            axes[row][col].set_title(f"{scenario}: {key.split()[0]} per epoch")
            axes[row][col].grid(alpha=0.3)
        axes[row][1].legend(fontsize=7, ncol=2)
        _integer_epochs(*axes[row])
    fig.suptitle(title)
    return save_figure(fig, path)
