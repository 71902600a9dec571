"""The results of a sweep: one row per (dataset, arch, scenario, method configuration) with mean and sample std over
seeds, as a markdown table, a CSV file and plots."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from plots import family_of, plot_avg_gap, plot_method_curves, plot_tradeoff
from scenarios import SCENARIOS, TABLE_METRICS, extra_metric_keys, table_metrics
from sweep.grid import Cell, method_flags, read_result

__all__ = ["QUALITY_METRICS", "aggregate", "csv_fields", "csv_table", "markdown_table", "write_plots"]

# Columns of `--forget_quality N`, read from each result's "forget_quality" entry: ((key, title), ...).
QUALITY_METRICS: tuple[tuple[str, str], ...] = (("forget_score", "F"), ("final_score", "Final"))
QUALITY_NOTE = ("F = forgetting quality as the NeurIPS 2023 unlearning competition scores it ({n} unlearning runs "
                "against {n} models retrained without the forget set, per forget example; 1 is best, 0 is "
                "distinguishable everywhere); Final = F x (retain accuracy ratio) x (test accuracy ratio). The Retrain "
                "row's cell trains the retrained models and has no F itself: `main_forget.py --unlearn retrain "
                "--forget_quality {n}` gives that sanity value.")


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    if len(array) == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(cells: list[Cell], out: Path) -> list[dict]:
    """One row per (dataset, arch, scenario, label): mean and sample std over seeds of the result JSONs. A cell
    without a complete result (never run, failed, or a damaged file) counts as a failed seed of its row."""
    groups: dict[tuple, list[tuple[Cell, dict | None]]] = {}
    for cell in cells:
        if cell.kind not in ("method", "reference"):
            continue
        groups.setdefault((cell.dataset, cell.arch, cell.scenario, cell.label), []).append(
            (cell, read_result(cell, out)))
    rows = []
    for (dataset, arch, scenario, label), members in groups.items():
        results = [r for _, r in members if r is not None]
        first = members[0][0]
        # Every forget setting of the row (class-wise held-out rows pool several classes: "class0 class1 class2").
        setting = " ".join(dict.fromkeys(c.setting for c, _ in members))
        row = {"dataset": dataset, "arch": arch, "scenario": scenario, "setting": setting, "method": label,
               "names": first.names,
               "config": first.config, "reference": first.kind == "reference", "family": first.family,
               "seeds": [c.seed for c, r in members if r is not None],
               "failed_seeds": [c.seed for c, r in members if r is None],
               "settings": _settings_text(first), "cells": [c.key for c, _ in members],
               "curves": [r["curves"] for r in results if r.get("curves")]}
        for key in dict(TABLE_METRICS + table_metrics(scenario)):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in results if key in r])
        for key, _ in QUALITY_METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r["forget_quality"][key] for r in results
                                                               if key in (r.get("forget_quality") or {})])
        row["forget_quality_models"] = max((int(r["forget_quality"].get("num_models", 0)) for r in results
                                            if r.get("forget_quality")), default=0)
        gaps = [abs(r["rUA"]) for r in results if "rUA" in r]
        row["forget_gap_mean"], row["forget_gap_std"] = _mean_std(gaps)
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["arch"], r["scenario"], not r["reference"],
                             math.inf if math.isnan(r["avg_gap_mean"]) else r["avg_gap_mean"], r["method"]))
    return rows


def _settings_text(cell: Cell) -> str:
    if cell.kind == "reference":
        return "training time as RTE"
    shown = {"lr": cell.hp.get("lr"), "epochs": cell.hp.get("epochs")}
    shown.update({method_flags().get(k, k): v for k, v in cell.overrides.items()})
    edges = {method_flags().get(k, k): side for k, side in cell.edges.items()}  # --tune: a choice on a range edge
    return ", ".join(f"{k}={v}" + (f" [{edges[k]} edge]" if k in edges else "") for k, v in shown.items()
                     if v is not None)


def _cell_text(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    digits = 3 if key in dict(QUALITY_METRICS) else 2  # scores in [0, 1]
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: list[dict], notes: list[str], seeds: list[int]) -> str:
    lines: list[str] = []
    sections: dict[tuple, list[dict]] = {}
    for row in rows:
        sections.setdefault((row["dataset"], row["arch"], row["scenario"]), []).append(row)
    quality_models = max((row.get("forget_quality_models", 0) for row in rows), default=0)
    for (dataset, arch, scenario), members in sections.items():
        settings = " ".join(dict.fromkeys(s for row in members for s in row["setting"].split()))
        lines += [f"### {dataset}, {arch}, {scenario} forgetting ({settings.replace(' ', ', ')})", ""]
        columns = table_metrics(scenario)
        if any(row.get("forget_quality_models") for row in members):
            columns += QUALITY_METRICS
        header = ["Method"] + [title for _, title in columns] + ["seeds", "settings"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in members:
            seeds_text = str(len(row["seeds"])) + (f" (failed: {row['failed_seeds']})" if row["failed_seeds"] else "")
            cells = [row["method"]] + [_cell_text(row, key) for key, _ in columns] + [seeds_text, row["settings"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Mean ± sample std over seeds {', '.join(map(str, seeds))}. UA = 100 - forget accuracy; "
                 f"MIA-Efficacy = SVC-MIA (confidence) on the forget set; "
                 f"Avg. Gap = mean |gap| to Retrain over UA, RA, TA, MIA-Efficacy; "
                 f"RTE = unlearning wall time (Retrain: its training time). Rows sorted by Avg. Gap.")
    if quality_models:
        lines.append(f"- {QUALITY_NOTE.format(n=quality_models)}")
    lines += [f"- {SCENARIOS[name].note}" for name in dict.fromkeys(s for _, _, s in sections)
              if name in SCENARIOS and SCENARIOS[name].note]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def csv_fields() -> list[str]:
    """The CSV columns: the row's identity, mean and std of the common metrics, then those of the registered
    scenarios' own metrics (empty where a row's scenario does not have them)."""
    return (["dataset", "arch", "scenario", "setting", "method", "names", "config", "seeds", "failed_seeds", "settings"]
            + [f"{key}_{stat}" for key, _ in TABLE_METRICS for stat in ("mean", "std")]
            + ["forget_gap_mean", "forget_gap_std"]
            + [f"{key}_{stat}" for key, _ in QUALITY_METRICS for stat in ("mean", "std")] + ["cells"]
            + [f"{key}_{stat}" for key in extra_metric_keys() for stat in ("mean", "std")])


def csv_table(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_fields(), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "names": " ".join(row["names"]), "seeds": " ".join(map(str, row["seeds"])),
                         "failed_seeds": " ".join(map(str, row["failed_seeds"])), "cells": " ".join(row["cells"])})
    return buffer.getvalue()


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    """Per (dataset, arch): the Avg. Gap chart, the trade-off plot and the per-epoch curves of every method with a
    history (`avg_gap_*.png`, `tradeoff_*.png`, `curves_*.png` in `out`). Returns the files written."""
    written = []
    for dataset, arch in sorted({(r["dataset"], r["arch"]) for r in rows}):
        members = [r for r in rows if r["dataset"] == dataset and r["arch"] == arch and r["seeds"]]
        gaps: dict[str, list[dict]] = {}
        points: dict[str, list[dict]] = {}
        curves: dict[str, dict[str, dict]] = {}
        for row in members:
            family = family_of(row["config"])
            if row["reference"]:
                curves.setdefault(row["scenario"], {})[row["method"]] = {
                    "family": family, "reference": {key: row[f"{key}_mean"] for key in ("UA", "RA", "TA",
                                                                                        "MIA_efficacy")}}
            elif not math.isnan(row["avg_gap_mean"]):
                gaps.setdefault(row["scenario"], []).append({
                    "label": row["method"], "family": family, "mean": row["avg_gap_mean"], "std": row["avg_gap_std"],
                    "n": len(row["seeds"])})
            if not math.isnan(row["forget_gap_mean"]):
                points.setdefault(row["scenario"], []).append({
                    "label": row["method"], "family": family, "TA": row["TA_mean"], "TA_std": row["TA_std"],
                    "gap": row["forget_gap_mean"], "gap_std": row["forget_gap_std"], "reference": row["reference"]})
            if not row["reference"] and row["curves"]:
                curves.setdefault(row["scenario"], {})[row["method"]] = {"family": family, "runs": row["curves"]}
        if gaps:
            written.append(plot_avg_gap(gaps, out / f"avg_gap_{dataset}_{arch}.png",
                                        title=f"{dataset}, {arch}: which method is closest to Retrain?"))
        if points:
            written.append(plot_tradeoff(points, out / f"tradeoff_{dataset}_{arch}.png",
                                         title=f"{dataset}, {arch}: forgetting vs test accuracy"))
        curves = {scenario: entry for scenario, entry in curves.items()
                  if any(value.get("runs") for value in entry.values())}
        if curves:
            written.append(plot_method_curves(curves, out / f"curves_{dataset}_{arch}.png",
                                              title=f"{dataset}, {arch}: per unlearning epoch"))
    return written
