"""Paired comparisons of method configurations over the held-out cells of a sweep.

Unit. Comparisons are made per dataset, architecture and scenario, never pooled across scenarios (two scenarios sit
on different scales and share original models). Inside one scenario the unit is the seed: in the benchmark each
evaluation seed trains its own original model, so one seed is one independent replication. Two configurations are
paired on the cells both ran (same seed, same forget set); when a seed holds several cells (several forget classes
trained from one original model), each configuration's values are averaged over that seed's shared cells first, so the
test still sees one value per seed. The compared value is the per-seed difference in Avg. Gap (first minus second;
negative: the first is closer to Retrain).

Test. The default is the exact paired permutation (sign-flip) test of the mean difference: under the null hypothesis
that the two configurations are exchangeable within a seed, each difference is as likely to carry either sign, so the
observed |mean| is ranked among the |mean| of all 2^n sign assignments (enumerated for n <= EXACT_LIMIT; beyond that,
MONTE_CARLO_DRAWS fixed-seed random assignments with p = (1 + hits) / (1 + draws), which is still a valid p-value).
Two-sided; a tolerance absorbs floating-point ties with the observed statistic. `--test wilcoxon` uses scipy's
signed-rank test with `method="exact"` and `zero_method="wilcox"` (zero differences are dropped, ties are rounded
conservatively: the behaviour of scipy >= 1.15, which honours an explicit `method="exact"`; earlier releases switched
to the normal approximation when there were zeros or ties). With n units neither test can go below 2 / 2^n: 3 seeds
reach 0.25, 5 seeds 0.0625, 6 seeds 0.03125 (`min_p`).

Interval. A 95 % t interval of the mean difference, mean +- t(0.975, n - 1) s / sqrt(n). The sign-flip test is the
permutation form of the paired t test (same statistic, the mean difference; its permutation distribution is close
to Student's t for moderate n), so the t interval describes the quantity the test is about, on the same units. It is
finite from 2 units on, where the inversion of the exact sign-flip test has no bound at all below 6 units (no shift can
be rejected at 5 %), which would leave the plain benchmark's 3-seed plot without intervals. The interval is
descriptive: it is not corrected for multiplicity, and at the border it can disagree with the test; the verdict is
read from the test.

Correction. Holm's step-down correction within each family of one scenario: family "masked vs base" (each masked
configuration against its own base: VarGrad vs NGPlus, SRGradMask vs SRL, ...) and family "vs SalUn" (every
configuration against SalUn); a pair with identical results (p = 1) counts in the family too. Raw and adjusted
p-values are printed; the verdict reads the adjusted one. With m
comparisons in a family the smallest adjusted p-value is m * 2 / 2^n: when that is not below 0.05 the family prints
no verdict at all and says which p-value its units could reach.

A verdict says: across these seeds, the difference between the two configurations is unlikely under exchangeability
(family-wise error 5 %). It does not say how large the difference is (read the mean and interval), that it holds on
other data, architectures or forget sets, or that a comparison without a verdict found no difference.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as scipy_stats

from plots import plot_forest
from sweep.grid import read_result
from unlearn.registry import ALIASES

if TYPE_CHECKING:
    from sweep.grid import Cell

__all__ = ["ALPHA", "EXACT_LIMIT", "FAMILIES", "MONTE_CARLO_DRAWS", "TESTS", "Comparison", "compare",
           "comparison_pairs", "holm", "min_p", "min_units", "paired_comparisons", "paired_report", "paired_section",
           "paired_p", "sentence", "sign_flip_p", "t_interval", "wilcoxon_p"]

ALPHA = 0.05
LEVEL = 0.95
TESTS = ("sign_flip", "wilcoxon")
TEST_NAMES = {"sign_flip": "exact paired sign-flip (permutation) test of the mean difference",
              "wilcoxon": "exact Wilcoxon signed-rank test (scipy, zero differences dropped)"}
EXACT_LIMIT = 20              # 2^20 sign assignments (8 MB of sums) still enumerate in well under a second
MONTE_CARLO_DRAWS = 100_000   # beyond EXACT_LIMIT units
MONTE_CARLO_SEED = 0
REFERENCE_METHOD = "SalUn"  # every configuration is also compared with SalUn, the masked baseline the paper cites
MASKED_FAMILY = "masked vs base"
REFERENCE_FAMILY = f"vs {REFERENCE_METHOD}"
FAMILIES = (MASKED_FAMILY, REFERENCE_FAMILY)


# ---------------------------------------------------------------------------------------------------------------------
# Tests, interval, correction
# ---------------------------------------------------------------------------------------------------------------------

def _values(differences: Iterable[float]) -> np.ndarray:
    return np.asarray(list(differences), dtype=float)


def sign_flip_p(differences: Iterable[float]) -> float:
    """Two-sided p-value of the paired sign-flip test of the mean difference: the fraction of sign assignments whose
    |sum| reaches the observed |sum| (exact for n <= EXACT_LIMIT); nan without units."""
    values = _values(differences)
    n = len(values)
    if n == 0:
        return math.nan
    observed = abs(float(values.sum()))
    # Sums of equal mathematical value can differ in the last bits (another addition order): count those as reached.
    tolerance = 1e-9 * float(np.abs(values).sum())
    if n <= EXACT_LIMIT:
        sums = np.zeros(1)
        for value in values:  # all 2^n signed sums, doubling the list once per unit
            sums = np.concatenate((sums + value, sums - value))
        return float(np.count_nonzero(np.abs(sums) >= observed - tolerance)) / len(sums)
    generator = np.random.default_rng(MONTE_CARLO_SEED)
    hits, left = 0, MONTE_CARLO_DRAWS
    while left:
        batch = min(left, 10_000)
        signs = generator.integers(0, 2, size=(batch, n)) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ values) >= observed - tolerance))
        left -= batch
    return (1 + hits) / (1 + MONTE_CARLO_DRAWS)


def wilcoxon_p(differences: Iterable[float]) -> float:
    """Two-sided exact Wilcoxon signed-rank p-value with zero differences dropped (`zero_method="wilcox"`); 1.0 when
    every difference is zero (nothing to rank), nan without units."""
    values = _values(differences)
    if len(values) == 0:
        return math.nan
    # Differences equal up to floating-point noise would get distinct ranks (noise-sized ones would count as non-zero);
    # rounding to 10 decimals of a point (far below any difference that matters) makes them ties and zeros again.
    values = np.round(values, 10)
    if not np.any(values != 0.0):
        return 1.0
    return float(scipy_stats.wilcoxon(values, zero_method="wilcox", method="exact", alternative="two-sided").pvalue)


def paired_p(differences: Iterable[float], test: str = "sign_flip") -> float:
    if test == "sign_flip":
        return sign_flip_p(differences)
    if test == "wilcoxon":
        return wilcoxon_p(differences)
    raise ValueError(f"unknown test {test!r}; allowed: {', '.join(TESTS)}")


def min_p(n: int, test: str = "sign_flip") -> float:
    """The smallest two-sided p-value `test` can give with `n` units: 2 / 2^n for both tests (every difference of one
    sign), 1 / (1 + draws) when the sign-flip test samples; nan without units."""
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; allowed: {', '.join(TESTS)}")
    if n <= 0:
        return math.nan
    exact = min(1.0, 2.0 / 2.0 ** n)
    if test == "sign_flip" and n > EXACT_LIMIT:
        return max(exact, 1.0 / (1 + MONTE_CARLO_DRAWS))
    return exact


def min_units(test: str = "sign_flip", alpha: float = ALPHA) -> int:
    """The fewest units with which `test` can give p < alpha (6 for alpha = 0.05: 2 / 2^5 = 0.0625)."""
    n = 1
    while not min_p(n, test) < alpha:
        n += 1
    return n


def t_interval(differences: Iterable[float], level: float = LEVEL) -> tuple[float, float]:
    """mean +- t(1 - (1 - level) / 2, n - 1) * s / sqrt(n) with the sample standard deviation s; nan below 2 units
    (no spread is known)."""
    values = _values(differences)
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean = float(values.mean())
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * float(values.std(ddof=1)) / math.sqrt(n)
    return mean - half, mean + half


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest raw p times (m - i + 1), made
    non-decreasing along the sorted order and capped at 1. nan entries stay nan and do not count in m."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """`a` minus `b` over `n` paired units (negative mean: `a` is closer to Retrain). `cells` counts the paired cells
    behind the units (more than `n` when a seed holds several forget sets). `p_adjusted` is Holm's within `family`;
    `reachable` says whether that family could give an adjusted p below ALPHA with its units at all."""

    a: str
    b: str
    scope: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    identical: bool
    family: str = ""
    cells: int = 0
    test: str = "sign_flip"
    p_adjusted: float = math.nan
    reachable: bool = True

    @property
    def significant(self) -> bool:
        p = self.p_value if math.isnan(self.p_adjusted) else self.p_adjusted
        return self.reachable and not self.identical and p < ALPHA


def compare(a: str, b: str, scope: str, pairs: list[tuple[float, float]], test: str = "sign_flip",
            family: str = "", cells: int | None = None) -> Comparison:
    """`pairs`: (a's value, b's value) per unit."""
    differences = [x - y for x, y in pairs]
    low, high = t_interval(differences)
    mean = float(np.mean(differences)) if differences else math.nan
    identical = bool(differences) and all(x == y for x, y in pairs)
    return Comparison(a, b, scope, len(differences), mean, low, high, paired_p(differences, test), identical, family,
                      len(differences) if cells is None else cells, test, reachable=min_p(len(pairs), test) < ALPHA)


def with_holm(comparisons: list[Comparison]) -> list[Comparison]:
    """Holm-adjusted p-values within each (scope, family); a family whose smallest reachable adjusted p-value
    (m times the smallest raw one) is not below ALPHA is marked unreachable."""
    out = list(comparisons)
    groups: dict[tuple[str, str], list[int]] = {}
    for index, c in enumerate(comparisons):
        groups.setdefault((c.scope, c.family), []).append(index)
    for indices in groups.values():
        adjusted = holm([comparisons[i].p_value for i in indices])
        # m counts the comparisons that have a p-value, as holm() does
        tested = [i for i in indices if not math.isnan(comparisons[i].p_value)]
        floor = min((min_p(comparisons[i].n, comparisons[i].test) for i in tested), default=math.inf)
        reachable = min(1.0, len(tested) * floor) < ALPHA
        for i, p in zip(indices, adjusted, strict=True):
            out[i] = replace(comparisons[i], p_adjusted=p, reachable=reachable)
    return out


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def sentence(c: Comparison) -> str:
    """One plain sentence: who is closer to Retrain, by how much, and the verdict (from the adjusted p-value)."""
    if c.n == 0:
        return f"{c.a} and {c.b} share no unit here."
    if c.identical:
        return (f"{c.a} and {c.b} give identical results on all {c.n} paired units: on this data the two "
                f"configurations take the same steps (not a bug in the table).")
    closer, farther = (c.a, c.b) if c.mean < 0 else (c.b, c.a)
    amount = f"{abs(c.mean):.2f} points of Avg. Gap"
    if not c.reachable:
        return (f"{closer} is closer to Retrain than {farther} by {amount} on average; no verdict: these units cannot "
                f"reach an adjusted p-value below {ALPHA}.")
    p = c.p_value if math.isnan(c.p_adjusted) else c.p_adjusted
    kind = "adjusted p" if not math.isnan(c.p_adjusted) else "p"
    if c.significant:
        return f"{closer} is closer to Retrain than {farther} by {amount}; significant ({kind} = {_p(p)} < {ALPHA})."
    return f"{closer} is closer to Retrain than {farther} by {amount} on average; not significant ({kind} = {_p(p)})."


def comparison_pairs(configs: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """(a, b, family) of the configurations to compare: each masked alias against its base (family MASKED_FAMILY),
    then everything against SalUn (family REFERENCE_FAMILY). `configs` maps a configuration id (its row label) to the
    method names it stands for."""
    owner = {name: config for config, names in configs.items() for name in names}
    pairs: list[tuple[str, str, str]] = []
    for alias in ALIASES.values():
        if alias.grad_mask and alias.name in owner and alias.base in owner:
            pair = (owner[alias.name], owner[alias.base], MASKED_FAMILY)
            if pair[0] != pair[1] and pair not in pairs:
                pairs.append(pair)
    reference = owner.get(REFERENCE_METHOD)
    if reference is not None:
        pairs += [(config, reference, REFERENCE_FAMILY) for config in configs if config != reference]
    return pairs


def per_unit(values_a: dict[tuple, float], values_b: dict[tuple, float]) -> tuple[list[tuple[float, float]], int]:
    """Paired values per unit from {(setting, seed): value} of two configurations: the cells both have, averaged per
    seed. Returns the (a, b) pairs in seed order and the number of paired cells behind them."""
    shared = sorted(set(values_a) & set(values_b), key=lambda key: (key[1], str(key[0])))
    by_seed: dict[int, list[tuple]] = {}
    for key in shared:
        by_seed.setdefault(key[1], []).append(key)
    pairs = [(float(np.mean([values_a[k] for k in keys])), float(np.mean([values_b[k] for k in keys])))
             for _, keys in sorted(by_seed.items())]
    return pairs, len(shared)


def _cell_values(cells: list[Cell], out: Path, metric: str) -> tuple[dict[str, dict[tuple, dict[tuple, float]]],
                                                                       dict[str, list[str]]]:
    """config -> (dataset, arch, scenario) -> (setting, seed) -> value, and config -> its method names."""
    values: dict[str, dict[tuple, dict[tuple, float]]] = {}
    names: dict[str, list[str]] = {}
    for cell in cells:
        if cell.kind != "method":
            continue
        result = read_result(cell, out)
        if result is None or metric not in result:
            continue
        config = cell.label or " = ".join(cell.names)
        names.setdefault(config, list(cell.names))
        scope = (cell.dataset, cell.arch, cell.scenario)
        values.setdefault(config, {}).setdefault(scope, {})[(cell.setting, cell.seed)] = float(result[metric])
    return values, names


def scope_label(scope: tuple[str, str, str], several: bool) -> str:
    """A scope's name in the table: the scenario, prefixed by dataset and architecture when the sweep has several."""
    return "/".join(scope) if several else scope[2]


def paired_comparisons(cells: list[Cell], out: Path, test: str = "sign_flip",
                       metric: str = "avg_gap") -> list[Comparison]:
    values, names = _cell_values(cells, out, metric)
    scopes = sorted({scope for per_config in values.values() for scope in per_config})
    several = len({scope[:2] for scope in scopes}) > 1
    comparisons: list[Comparison] = []
    for scope in scopes:
        for a, b, family in comparison_pairs(names):
            pairs, count = per_unit(values.get(a, {}).get(scope, {}), values.get(b, {}).get(scope, {}))
            if pairs:
                comparisons.append(compare(a, b, scope_label(scope, several), pairs, test, family, count))
    return with_holm(comparisons)


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def _interval(c: Comparison) -> str:
    return "n/a" if math.isnan(c.ci_low) else f"[{_number(c.ci_low)}, {_number(c.ci_high)}]"


def _verdict(c: Comparison) -> str:
    if c.n == 0 or c.identical:
        return "identical" if c.identical else "n/a"
    if not c.reachable:
        return "none (unreachable)"
    return "yes" if c.significant else "no"


def paired_section(cells: list[Cell], out: Path, test: str = "sign_flip",
                   comparisons: list[Comparison] | None = None) -> str:
    """The markdown section "## Paired comparisons" (empty text when no pair of configurations shares a cell)."""
    comparisons = paired_comparisons(cells, out, test) if comparisons is None else comparisons
    if not comparisons:
        return ""
    lines = ["", "## Paired comparisons", "",
             f"Per scenario, never pooled across scenarios; the unit is the seed (one original model each). Value: "
             f"difference in Avg. Gap, first minus second (negative: the first is closer to Retrain), over the seeds "
             f"both configurations ran. Test: two-sided {TEST_NAMES[test]}. Interval: 95 % t interval of the mean "
             f"difference (not corrected for multiplicity). Correction: Holm within each family of a scenario "
             f"('{MASKED_FAMILY}': each masked configuration against its base; '{REFERENCE_FAMILY}': every "
             f"configuration against {REFERENCE_METHOD}); the verdict reads the adjusted p-value at {ALPHA}. See "
             f"docs/evaluation.md for what a verdict means and does not mean.", ""]
    averaged = [c for c in comparisons if c.cells > c.n]
    if averaged:
        lines += ["Some seeds hold several cells (several forget sets from one original model): their values are "
                  "averaged per seed before the test, so the unit stays the seed ('cells' column).", ""]
    for scope in dict.fromkeys(c.scope for c in comparisons):
        for family in FAMILIES:
            members = [c for c in comparisons if c.scope == scope and c.family == family]
            if not members:
                continue
            units = sorted({c.n for c in members})
            floor = min(min_p(n, test) for n in units)
            reach = min(1.0, len(members) * floor)
            count = " or ".join(map(str, units))
            lines += [f"### {scope}: {family}", "",
                      f"{count} unit(s) (seeds) per comparison, {len(members)} comparison(s) in this family: the "
                      f"smallest p-value the test can reach is {_p(floor)}, the smallest Holm-adjusted one "
                      f"{_p(reach)}."]
            if reach >= ALPHA:
                lines.append(f"These units cannot reach an adjusted p-value below {ALPHA}: no significance verdict is "
                             f"given (means and intervals only). At least {min_units(test)} seeds per scenario are "
                             f"needed to reach p < {ALPHA} at all, more for a family of several comparisons.")
            lines += ["", "| Comparison | units | cells | mean diff | 95 % CI | p | Holm p | significant | summary |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for c in members:
                lines.append(f"| {c.a} vs {c.b} | {c.n} | {c.cells} | {_number(c.mean)} | {_interval(c)} | "
                             f"{_p(c.p_value)} | {_p(c.p_adjusted)} | {_verdict(c)} | {sentence(c)} |")
            lines.append("")
    return "\n".join(lines)


def forest_panels(comparisons: list[Comparison]) -> dict[str, dict[str, list[dict]]]:
    """scope -> family -> [{"label", "mean", "low", "high", "significant", "n"}] for plots.plot_forest."""
    panels: dict[str, dict[str, list[dict]]] = {}
    for c in comparisons:
        if c.n == 0:
            continue
        panels.setdefault(c.scope, {family: [] for family in FAMILIES})[c.family].append({
            "label": f"{c.a} vs {c.b}", "mean": c.mean, "low": c.ci_low, "high": c.ci_high,
            "significant": c.significant if c.reachable else None, "n": c.n})
    return panels


def paired_report(cells: list[Cell], out: Path, test: str = "sign_flip") -> tuple[str, list[Path]]:
    """The section "## Paired comparisons" and its forest plot (`<out>/forest.png`, one row of panels per scenario:
    masked vs base on the left, vs SalUn on the right); no plot when there is nothing to compare."""
    comparisons = paired_comparisons(cells, out, test)
    if not comparisons:
        return "", []
    text = paired_section(cells, out, test, comparisons)
    path = plot_forest(forest_panels(comparisons), out / "forest.png",
                       title=f"Paired differences in Avg. Gap (95 % t interval; filled: significant after Holm, "
                             f"{test.replace('_', '-')} test)")
    return text, [path]
