"""Paired comparisons of method configurations over the held-out cells of a sweep.

Two configurations evaluated on the same cells (same dataset, architecture, scenario, forget set and seed) are compared
through their per-cell differences in Avg. Gap: the mean difference, a 95 % percentile-bootstrap confidence interval
(resampling the cells with a fixed numpy Generator, so the interval is reproducible) and the two-sided Wilcoxon
signed-rank p-value (scipy). Pairing removes what the cell itself contributes (an easy forget set, a lucky seed), which
an unpaired comparison of two means over 3-5 seeds cannot.

The `results.md` section "## Paired comparisons" holds each masked configuration against its own base (VarGrad vs
NGPlus, SRGradMask vs SRL, ...) and every configuration against SalUn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    from sweep.grid import Cell

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "Comparison", "bootstrap_ci", "compare", "comparison_pairs",
           "paired_section", "sentence", "wilcoxon_p"]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
SIGNIFICANCE = 0.05
REFERENCE_METHOD = "SalUn"  # every configuration is also compared with SalUn, the masked baseline the paper cites


@dataclass(frozen=True)
class Comparison:
    """`a` minus `b` over `n` paired cells (negative mean: `a` is closer to Retrain)."""

    a: str
    b: str
    scope: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    identical: bool

    @property
    def significant(self) -> bool:
        return not self.identical and self.p_value < SIGNIFICANCE


def bootstrap_ci(differences: Iterable[float], generator: np.random.Generator | None = None,
                 resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: `resamples` means of `len(differences)` cells drawn with replacement
    (one `generator.integers` call, so a fixed generator gives a fixed interval)."""
    values = np.asarray(list(differences), dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    generator = generator if generator is not None else np.random.default_rng(BOOTSTRAP_SEED)
    indices = generator.integers(0, len(values), size=(resamples, len(values)))
    means = values[indices].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: Iterable[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is zero (nothing to rank), nan without
    cells."""
    from scipy.stats import wilcoxon

    values = np.asarray(list(differences), dtype=float)
    if len(values) == 0:
        return math.nan
    if not np.any(values != 0.0):
        return 1.0
    return float(wilcoxon(values).pvalue)


def compare(a: str, b: str, scope: str, pairs: list[tuple[float, float]], seed: int = BOOTSTRAP_SEED) -> Comparison:
    """`pairs`: (a's value, b's value) per paired cell."""
    differences = [x - y for x, y in pairs]
    low, high = bootstrap_ci(differences, np.random.default_rng(seed))
    mean = float(np.mean(differences)) if differences else math.nan
    identical = bool(differences) and all(x == y for x, y in pairs)
    return Comparison(a, b, scope, len(differences), mean, low, high, wilcoxon_p(differences), identical)


def sentence(c: Comparison) -> str:
    """One plain sentence: who is closer to Retrain, by how much, and whether that is significant."""
    if c.n == 0:
        return f"{c.a} and {c.b} share no cell here."
    if c.identical:
        return (f"{c.a} and {c.b} give identical results on all {c.n} paired cells: on this data the two "
                f"configurations take the same steps (not a bug in the table).")
    closer, farther = (c.a, c.b) if c.mean < 0 else (c.b, c.a)
    amount = f"{abs(c.mean):.2f} points of Avg. Gap"
    if c.significant:
        return f"{closer} is closer to Retrain than {farther} by {amount}; significant (p = {c.p_value:.3g} < 0.05)."
    return (f"{closer} is closer to Retrain than {farther} by {amount} on average, but the difference is not "
            f"significant (p = {c.p_value:.3g}, 95 % CI [{c.ci_low:+.2f}, {c.ci_high:+.2f}], {c.n} cells).")


def comparison_pairs(configs: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(a, b) configuration ids to compare: each masked alias against its base, then everything against SalUn.
    `configs` maps a configuration id (its row label) to the method names it stands for."""
    from unlearn.registry import ALIASES

    owner = {name: config for config, names in configs.items() for name in names}
    pairs: list[tuple[str, str]] = []
    for alias in ALIASES.values():
        if alias.grad_mask and alias.name in owner and alias.base in owner:
            pair = (owner[alias.name], owner[alias.base])
            if pair[0] != pair[1] and pair not in pairs:
                pairs.append(pair)
    reference = owner.get(REFERENCE_METHOD)
    if reference is not None:
        pairs += [(config, reference) for config in configs if config != reference]
    return pairs


def _cell_values(cells: list["Cell"], out: Path, metric: str) -> tuple[dict[str, dict[tuple, float]],
                                                                       dict[str, list[str]]]:
    from sweep.grid import read_result

    values: dict[str, dict[tuple, float]] = {}
    names: dict[str, list[str]] = {}
    for cell in cells:
        if cell.kind != "method":
            continue
        result = read_result(cell, out)
        if result is None or metric not in result:
            continue
        config = cell.label or " = ".join(cell.names)
        names.setdefault(config, list(cell.names))
        values.setdefault(config, {})[(cell.dataset, cell.arch, cell.scenario, cell.setting, cell.seed)] = \
            float(result[metric])
    return values, names


def paired_comparisons(cells: list["Cell"], out: Path, metric: str = "avg_gap") -> list[Comparison]:
    values, names = _cell_values(cells, out, metric)
    comparisons: list[Comparison] = []
    scenarios = sorted({key[2] for per_config in values.values() for key in per_config})
    for a, b in comparison_pairs(names):
        shared = sorted(set(values[a]) & set(values[b]))
        scopes = scenarios + (["all"] if len(scenarios) > 1 else [])
        for scope in scopes:
            keys = [k for k in shared if scope == "all" or k[2] == scope]
            if keys:
                comparisons.append(compare(a, b, scope, [(values[a][k], values[b][k]) for k in keys]))
    return comparisons


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def paired_section(cells: list["Cell"], out: Path) -> str:
    """The markdown section "## Paired comparisons" (empty text when no pair of configurations shares a cell)."""
    comparisons = paired_comparisons(cells, out)
    if not comparisons:
        return ""
    lines = ["", "## Paired comparisons", "",
             "Difference in Avg. Gap (first minus second; negative: the first is closer to Retrain) over the cells "
             "both configurations ran on (same seed, same forget set); 95 % percentile-bootstrap interval "
             f"({BOOTSTRAP_RESAMPLES} resamples, numpy Generator seed {BOOTSTRAP_SEED}); two-sided Wilcoxon "
             "signed-rank p-value (scipy). With 5 cells the smallest possible p-value is 0.0625, so per-scenario rows "
             "of few seeds cannot reach 0.05: the 'all' rows pool the scenarios.", "",
             "| Comparison | cells | n | mean diff | 95 % CI | Wilcoxon p | verdict |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        ci = "n/a" if math.isnan(c.ci_low) else f"[{_number(c.ci_low)}, {_number(c.ci_high)}]"
        p = "n/a" if math.isnan(c.p_value) else f"{c.p_value:.3g}"
        lines.append(f"| {c.a} vs {c.b} | {c.scope} | {c.n} | {_number(c.mean)} | {ci} | {p} | {sentence(c)} |")
    return "\n".join(lines) + "\n"
