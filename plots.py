"""Plots of unlearning runs and benchmark tables (matplotlib, Agg backend, written atomically as PNG).

Every benchmark plot answers "which method is closest to Retrain?": Retrain is drawn as a reference (a zero line, a
star, a dashed line), and a method family (the methods built on one base: NGPlus and its masked variants, SRL, SCRUB,
the relabelling methods, ...) has one colour in every plot, so a method is found again from plot to plot; members of a
family differ by marker and line style.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

from utils import pyplot, save_figure

CURVE_METRICS = (("UA", "UA (100 - forget acc.)"), ("RA", "RA (retain acc.)"), ("TA", "TA (test acc.)"),
                 ("MIA_efficacy", "MIA-Efficacy"))

# base method (the registered class a configuration runs) -> family shown in legends
FAMILY_OF_BASE = {
    "NGPlus": "NG+ and its masks", "SRL": "SRL and its masks", "SCRUB": "SCRUB and its masks",
    "RL": "relabelling (RL, SalUn)", "SalUn": "relabelling (RL, SalUn)", "SalUn_soft": "relabelling (RL, SalUn)",
    "FT": "fine-tuning", "FT_l1": "fine-tuning", "GA": "gradient ascent",
    "wfisher": "Fisher / influence", "fisher_new": "Fisher / influence",
    "boundary_expanding": "boundary", "boundary_shrink": "boundary", "SSD": "SSD", "raw": "original model",
}
RETRAIN_FAMILY = "Retrain"
OTHER_FAMILY = "other"
# One fixed colour per family (never drawn from a cycling palette, so that a family keeps its colour in every plot
# whatever else is in it).
FAMILY_COLOURS = {
    "NG+ and its masks": "#d62728", "SRL and its masks": "#1f77b4", "SCRUB and its masks": "#2ca02c",
    "relabelling (RL, SalUn)": "#ff7f0e", "fine-tuning": "#9467bd", "gradient ascent": "#8c564b",
    "Fisher / influence": "#e377c2", "boundary": "#17becf", "SSD": "#bcbd22", "original model": "#7f7f7f",
    RETRAIN_FAMILY: "#000000", OTHER_FAMILY: "#aaaaaa",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
FORGET_GAP_LABEL = "forget-accuracy gap to Retrain (points)"
TEST_ACCURACY_LABEL = "test accuracy (%)"


def family_of(config: str) -> str:
    """The family of a method configuration, from what it runs ("NGPlus + prob" -> NG+; the Retrain row -> Retrain)."""
    if "Retrain" in config or config.strip() == "retrain":
        return RETRAIN_FAMILY
    return FAMILY_OF_BASE.get(config.split(" + ")[0].strip(), OTHER_FAMILY)


def family_colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, FAMILY_COLOURS[OTHER_FAMILY])


def member_styles(items: list[tuple[str, str]]) -> dict[str, dict]:
    """(label, family) pairs -> {label: {"color", "marker", "linestyle"}}: the family's colour, and within a family a
    marker and line style by the label's rank in alphabetical order (stable across plots of the same methods)."""
    styles: dict[str, dict] = {}
    by_family: dict[str, list[str]] = {}
    for label, family in items:
        by_family.setdefault(family, [])
        if label not in by_family[family]:
            by_family[family].append(label)
    for family, labels in by_family.items():
        for rank, label in enumerate(sorted(labels)):
            styles[label] = {"color": family_colour(family), "marker": MARKERS[rank % len(MARKERS)],
                             "linestyle": LINE_STYLES[rank % len(LINE_STYLES)]}
    return styles


def confidence_half_width(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the t-interval of a mean over n seeds (0 for a single seed: no spread is known)."""
    if n < 2 or not math.isfinite(std):
        return 0.0
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


def _integer_epochs(*axes) -> None:
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415  (matplotlib only when a figure is drawn)

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _family_legend(ax, families: list[str], title: str = "family") -> None:
    from matplotlib.patches import Patch  # noqa: PLC0415  (matplotlib only when a figure is drawn)

    handles = [Patch(color=family_colour(f), label=f) for f in dict.fromkeys(families)]
    ax.legend(handles=handles, title=title, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------------

def plot_epoch_curves(curves: list[dict], path: str | Path, title: str = "", reference: dict | None = None) -> Path:
    """One run: UA, RA, TA, MIA-Efficacy per unlearning epoch (left), Retrain's values as dashed lines of the same
    colour when `reference` holds them; Avg. Gap and kept fraction when known (right)."""
    plt = pyplot()
    epochs = [entry["epoch"] for entry in curves]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for (key, label), colour in zip(CURVE_METRICS, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        left.plot(epochs, [entry.get(key, math.nan) for entry in curves], marker="o", color=colour, label=label)
        if reference and key in reference:
            left.axhline(reference[key], color=colour, linestyle="--", linewidth=1, label=f"Retrain {key}")
    left.set_xlabel("unlearning epoch"), left.set_ylabel("%")
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if any("avg_gap" in entry for entry in curves):
        right.plot(epochs, [entry.get("avg_gap", math.nan) for entry in curves], marker="o", color="k",
                   label="Avg. Gap")
        right.axhline(0.0, color="grey", linewidth=0.8)
        right.set_ylabel("Avg. Gap to Retrain (points)")
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


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark plots
# ---------------------------------------------------------------------------------------------------------------------

def plot_avg_gap(points: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Avg. Gap to Retrain per method, one panel per scenario: a dot per method (mean over seeds) with its 95 %
    confidence interval, sorted best first, Retrain's zero line, families coloured.

    `points[scenario]` = [{"label", "family", "mean", "std", "n"}, ...]."""
    plt = pyplot()
    scenarios = list(points)
    height = max(3.0, 0.32 * max(len(v) for v in points.values()) + 1.5)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios) + 2.5, height), squeeze=False)
    families: list[str] = []
    for ax, scenario in zip(axes[0], scenarios):
        members = sorted((p for p in points[scenario] if math.isfinite(p["mean"])), key=lambda p: p["mean"])
        for rank, point in enumerate(members):
            half = confidence_half_width(point["std"], point["n"])
            colour = family_colour(point["family"])
            ax.errorbar(point["mean"], rank, xerr=half, marker="o", color=colour, capsize=3, linestyle="none")
            families.append(point["family"])
        ax.set_yticks(range(len(members)), [p["label"] for p in members], fontsize=8)
        ax.invert_yaxis()  # best (smallest gap) at the top
        ax.axvline(0.0, color="k", linewidth=1.2, label="Retrain (0)")
        ax.set_xlim(left=min(0.0, ax.get_xlim()[0]))
        ax.set_xlabel("Avg. Gap to Retrain (points; mean, 95 % CI over seeds)")
        ax.set_title(scenario)
        ax.grid(axis="x", alpha=0.3)
    _family_legend(axes[0][-1], families + [RETRAIN_FAMILY])
    fig.suptitle(title)
    return save_figure(fig, path)


def _axis_range(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    """Where the bulk of the points lies: the range of the values inside 3 interquartile ranges of the quartiles
    (all of them when there are few), padded. Values outside are drawn as arrows at the edge."""
    array = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(array) == 0:
        return 0.0, 1.0
    if len(array) >= 5:
        q1, q3 = np.percentile(array, [25, 75])
        spread = max(q3 - q1, 1.0)
        array = array[(array >= q1 - 3 * spread) & (array <= q3 + 3 * spread)]
    low, high = float(array.min()), float(array.max())
    margin = max((high - low) * pad, 1.0)
    return low - margin, high + margin


def plot_tradeoff(points: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Forget-accuracy gap to Retrain against test accuracy, one panel per scenario, one numbered point per method
    (mean over seeds, bars = std) listed in a key beside the panel; Retrain a black star. Good methods sit low (forget
    like Retrain) and right (keep test accuracy). Axes cover where the methods are; a point outside is an arrow at the
    edge with its number.

    `points[scenario]` = [{"label", "family", "TA", "TA_std", "gap", "gap_std", "reference": bool}, ...]."""
    plt = pyplot()
    scenarios = list(points)
    rows = max(len(v) for v in points.values())
    fig, axes = plt.subplots(1, len(scenarios), figsize=(9.5 * len(scenarios), max(5.0, 0.2 * rows + 2)),
                             squeeze=False)
    families: list[str] = []
    for ax, scenario in zip(axes[0], scenarios):
        members = sorted(points[scenario], key=lambda p: (not p.get("reference"), p["gap"], -p["TA"]))
        x_low, x_high = _axis_range([p["TA"] for p in members])
        y_low, y_high = _axis_range([p["gap"] for p in members])
        y_low = min(y_low, -1.0)
        key_lines = []
        labelled: list[list] = []  # [x, y, annotation, numbers]: points closer than 2 % of the axes share one label
        for number, point in enumerate(members, start=1):
            family = RETRAIN_FAMILY if point.get("reference") else point.get("family", OTHER_FAMILY)
            families.append(family)
            colour = family_colour(family)
            x, y = point["TA"], point["gap"]
            key_lines.append(f"{number:>2}  {point['label']}")
            clipped_x, clipped_y = min(max(x, x_low), x_high), min(max(y, y_low), y_high)
            if (clipped_x, clipped_y) != (x, y):  # an outlier: an arrow at the edge, pointing where it is
                dx = 0.0 if clipped_x == x else (x - clipped_x) / abs(x - clipped_x) * (x_high - x_low) * 0.04
                dy = 0.0 if clipped_y == y else (y - clipped_y) / abs(y - clipped_y) * (y_high - y_low) * 0.04
                ax.annotate("", xy=(clipped_x, clipped_y), xytext=(clipped_x - dx, clipped_y - dy),
                            arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.5})
                ax.annotate(f"{number} ({x:.0f}, {y:.0f})", (clipped_x - dx, clipped_y - dy), fontsize=7,
                            color=colour, ha="center", va="center")
                key_lines[-1] += f"  [off the axes: TA {x:.1f}, gap {y:.1f}]"
                continue
            style = {"marker": "*", "markersize": 15} if point.get("reference") else {"marker": "o", "markersize": 6}
            ax.errorbar(x, y, xerr=point.get("TA_std", 0), yerr=point.get("gap_std", 0), linestyle="none",
                        capsize=2, color=colour, alpha=0.9, **style)
            near = next((entry for entry in labelled if abs(entry[0] - x) < 0.02 * (x_high - x_low)
                         and abs(entry[1] - y) < 0.02 * (y_high - y_low)), None)
            if near is not None:
                near[3].append(number)
                near[2].set_text(",".join(map(str, near[3])))
                continue
            text = ax.annotate(str(number), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points",
                               color=colour)
            labelled.append([x, y, text, [number]])
        ax.set_xlim(x_low, x_high), ax.set_ylim(y_low, y_high)
        ax.axhline(0.0, color="k", linewidth=0.8)
        ax.set_xlabel(TEST_ACCURACY_LABEL)
        ax.set_ylabel(FORGET_GAP_LABEL)
        ax.set_title(f"{scenario}: lower = forgets like Retrain, right = keeps test accuracy", fontsize=10)
        ax.grid(alpha=0.3)
        ax.text(1.02, 0.0, "\n".join(key_lines), transform=ax.transAxes, fontsize=7, family="monospace",
                va="bottom", ha="left")
    _family_legend(axes[0][-1], families)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_method_curves(curves: dict[str, dict[str, dict]], path: str | Path, title: str = "") -> Path:
    """Per-epoch UA, RA, TA and MIA-Efficacy of every method with a history, one row per scenario: the mean over seeds
    with a band (min to max over seeds), Retrain's final value as a dashed black line; families coloured, members by
    line style. A method whose seeds ran fewer epochs than the longest method says so in the legend.

    `curves[scenario][label]` = {"family", "runs": one list of per-epoch entries per seed}; the Retrain reference is
    `curves[scenario]["Retrain"] = {"reference": {"UA": .., "RA": .., "TA": .., "MIA_efficacy": ..}}`."""
    plt = pyplot()
    scenarios = list(curves)
    fig, axes = plt.subplots(len(scenarios), len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS) + 3,
                                                                           3.6 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        methods = {label: entry for label, entry in curves[scenario].items() if entry.get("runs")}
        reference = next((entry["reference"] for entry in curves[scenario].values() if entry.get("reference")), None)
        styles = member_styles([(label, entry["family"]) for label, entry in methods.items()])
        longest = max((min(len(run) for run in entry["runs"]) for entry in methods.values()), default=0)
        for label, entry in sorted(methods.items(), key=lambda item: (item[1]["family"], item[0])):
            runs = entry["runs"]
            length = min(len(run) for run in runs)
            epochs = [runs[0][i]["epoch"] for i in range(length)]
            shown = label + (f" ({length} epochs)" if length < longest else "")
            for col, (key, _) in enumerate(CURVE_METRICS):
                values = np.array([[run[i].get(key, math.nan) for i in range(length)] for run in runs], dtype=float)
                if np.isnan(values).all():
                    continue  # not evaluated per epoch (a tuning trial computes no test-set metric)
                ax = axes[row][col]
                style = styles[label]
                ax.plot(epochs, np.nanmean(values, axis=0), color=style["color"], linestyle=style["linestyle"],
                        marker=style["marker"], markersize=3, linewidth=1.3, label=shown)
                if len(runs) > 1:
                    ax.fill_between(epochs, np.nanmin(values, axis=0), np.nanmax(values, axis=0),
                                    color=style["color"], alpha=0.12, linewidth=0)
        for col, (key, name) in enumerate(CURVE_METRICS):
            ax = axes[row][col]
            if reference and key in reference:
                ax.axhline(reference[key], color="k", linestyle="--", linewidth=1.2, label="Retrain")
            ax.set_xlabel("unlearning epoch")
            ax.set_ylabel(f"{name} (%)")
            ax.set_title(f"{scenario}: {key}", fontsize=10)
            ax.grid(alpha=0.3)
            _integer_epochs(ax)
        handles, labels = axes[row][0].get_legend_handles_labels()
        axes[row][-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                             borderaxespad=0.0, title="mean; band = min-max over seeds", title_fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_forest(panels: dict[str, dict[str, list[dict]]], path: str | Path, title: str = "") -> Path:
    """Paired differences per comparison: one row of panels per scenario, one panel per family (masked vs base, vs
    SalUn); a dot at the mean difference in Avg. Gap with its interval as a bar, the zero line (no difference), the
    comparisons sorted by their mean. Filled dot: significant after the family's correction; hollow: not significant;
    grey: no verdict (the units cannot reach significance).

    `panels[scenario][family]` = [{"label", "mean", "low", "high", "significant": True | False | None, "n"}, ...]."""
    plt = pyplot()
    scenarios = list(panels)
    families = list(dict.fromkeys(family for entry in panels.values() for family in entry))
    longest = max((len(members) for entry in panels.values() for members in entry.values()), default=1)
    fig, axes = plt.subplots(len(scenarios), len(families), squeeze=False,
                             figsize=(7.5 * len(families), max(2.5, 0.3 * longest + 1.6) * len(scenarios)))
    for row, scenario in enumerate(scenarios):
        for col, family in enumerate(families):
            ax = axes[row][col]
            members = sorted((m for m in panels[scenario].get(family, []) if math.isfinite(m["mean"])),
                             key=lambda m: m["mean"])
            for rank, member in enumerate(members):
                colour = "#7f7f7f" if member["significant"] is None else "#1f77b4"
                if math.isfinite(member["low"]) and math.isfinite(member["high"]):
                    ax.plot([member["low"], member["high"]], [rank, rank], color=colour, linewidth=1.5)
                ax.plot(member["mean"], rank, marker="o", markersize=6, color=colour,
                        markerfacecolor=colour if member["significant"] else "white")
            ax.set_yticks(range(len(members)), [m["label"] for m in members], fontsize=8)
            ax.set_ylim(len(members) - 0.5 if members else 0.5, -0.5)  # most negative (first closer) on top
            ax.axvline(0.0, color="k", linewidth=1)
            units = sorted({m["n"] for m in members})
            unreachable = members and all(m["significant"] is None for m in members)
            ax.set_title(f"{scenario}: {family} ({'/'.join(map(str, units)) or 0} seeds"
                         f"{'; no verdict reachable' if unreachable else ''})", fontsize=10)
            ax.set_xlabel("difference in Avg. Gap, first minus second (< 0: first closer to Retrain)", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_sensitivity(panel: dict[str, dict], path: str | Path, title: str = "",
                     score_label: str = "best tuning score") -> Path:
    """How robust each method is to its step size: for one scenario, each configuration's best mean tuning-cell score
    (its best epoch) against the learning rate of each trial, one line per configuration on a log x axis; the SGD
    baselines on the left panel (the one-shot methods search strengths, not step sizes), the masking family
    (bi-objective bases and their masks) on the right.
    Lower is better. A trial without a finite candidate (diverged from its first epoch) leaves a gap; a configuration
    whose epochs are a design dimension (horizon-dependent) is drawn dashed with "(epochs vary)" in its label.

    `panel[config]` = {"runs" (e.g. "NGPlus + prob"), "masking_family", "horizon_dependent",
    "points": [(lr, score), ...]}."""
    from matplotlib.ticker import NullFormatter  # noqa: PLC0415  (matplotlib only when a figure is drawn)

    plt = pyplot()
    groups = (("baselines", False), ("masking family", True))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.2), squeeze=False)
    styles = member_styles([(config, family_of(entry["runs"])) for config, entry in panel.items()])
    for ax, (name, masking) in zip(axes[0], groups):
        drawn = 0
        for config, entry in sorted(panel.items(), key=lambda item: (family_of(item[1]["runs"]), item[0].lower())):
            if bool(entry["masking_family"]) != masking or not entry["points"]:
                continue
            points = sorted(entry["points"])
            style = styles[config]
            label = config + (" (epochs vary)" if entry.get("horizon_dependent") else "")
            ax.plot([p[0] for p in points], [p[1] for p in points], color=style["color"], marker=style["marker"],
                    linestyle="--" if entry.get("horizon_dependent") else style["linestyle"], markersize=4,
                    linewidth=1.3, label=label)
            drawn += 1
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels on the decades only: minor labels overlap
        ax.set_xlabel("learning rate (trial)")
        ax.set_ylabel(score_label)
        ax.set_title(f"{name} ({drawn} configurations)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if drawn:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
