"""sweep.stats: paired differences, bootstrap interval, Wilcoxon p-value, sentences and the results.md section, checked
against values computed by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sweep.grid import Cell
from sweep.stats import (BOOTSTRAP_RESAMPLES, bootstrap_ci, compare, comparison_pairs, paired_section, sentence,
                         wilcoxon_p)


def test_bootstrap_interval_is_the_percentiles_of_resampled_means_from_the_fixed_generator():
    differences = [1.0, -2.0, 3.0, 4.0, 5.0]
    low, high = bootstrap_ci(differences, np.random.default_rng(7), resamples=2000)
    # By hand: the same generator draws the same index matrix; each row is one resample of the five cells.
    rng = np.random.default_rng(7)
    indices = rng.integers(0, 5, size=(2000, 5))
    means = [sum(differences[i] for i in row) / 5 for row in indices]
    assert low == pytest.approx(np.percentile(means, 2.5))
    assert high == pytest.approx(np.percentile(means, 97.5))
    assert low < np.mean(differences) < high
    # Reproducible: the default generator is seeded, so two calls agree.
    assert bootstrap_ci(differences) == bootstrap_ci(differences)


def test_bootstrap_of_a_constant_difference_is_that_constant():
    assert bootstrap_ci([2.5, 2.5, 2.5]) == (2.5, 2.5)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_wilcoxon_exact_p_values_by_hand():
    # Five positive differences: W- = 0 has probability 1/32 under the null; two-sided p = 2/32.
    assert wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    # Ranks 1..5, only rank 2 negative: W- = 2; subsets of {1..5} with sum <= 2 are {}, {1}, {2}: p = 2 * 3/32.
    assert wilcoxon_p([1.0, -2.0, 3.0, 4.0, 5.0]) == pytest.approx(6 / 32)
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(wilcoxon_p([]))


def test_compare_mean_identity_and_significance():
    pairs = [(1.0, 3.0), (2.0, 5.0), (0.5, 4.5), (1.0, 2.0), (2.0, 4.0), (1.0, 3.5), (0.0, 2.0), (1.5, 3.0)]
    c = compare("VarGrad", "NGPlus", "all", pairs)
    assert c.n == 8
    assert c.mean == pytest.approx(np.mean([a - b for a, b in pairs]))
    assert c.p_value == pytest.approx(2 / 256)  # all eight differences negative: exact two-sided 2 / 2^8
    assert c.significant and not c.identical
    assert sentence(c).startswith("VarGrad is closer to Retrain than NGPlus by 2.25 points")
    assert "significant (p = 0.00781 < 0.05)" in sentence(c)

    same = compare("RL", "SalUn", "random", [(3.2, 3.2), (4.0, 4.0)])
    assert same.identical and same.mean == 0.0 and same.p_value == 1.0 and not same.significant
    assert "identical results on all 2 paired cells" in sentence(same)

    weak = compare("A", "B", "random", [(1.0, 2.0), (2.0, 1.5), (3.0, 3.5)])
    assert not weak.significant
    assert "not significant" in sentence(weak) and sentence(weak).startswith("A is closer to Retrain than B")


def test_comparison_pairs_masked_against_base_and_everything_against_salun():
    configs = {"NGradMask = VarGrad": ["NGradMask", "VarGrad"], "NGPlus": ["NGPlus"], "SRGradMask": ["SRGradMask"],
               "SRL": ["SRL"], "SalUn": ["SalUn"], "RL": ["RL"]}
    pairs = comparison_pairs(configs)
    assert ("NGradMask = VarGrad", "NGPlus") in pairs and ("SRGradMask", "SRL") in pairs
    assert pairs.count(("NGradMask = VarGrad", "NGPlus")) == 1  # two alias names, one configuration, one comparison
    assert {b for a, b in pairs if b == "SalUn"} == {"SalUn"}
    assert {a for a, b in pairs if b == "SalUn"} == set(configs) - {"SalUn"}


def _cell(tmp: Path, label: str, names: list[str], scenario: str, seed: int, gap: float) -> Cell:
    key = f"{label}-{scenario}-{seed}".replace(" ", "").replace("=", "")
    cell = Cell("method", key, "digits", "resnet18", scenario, seed, [], names=names, label=label,
                setting="random130" if scenario == "random" else "class0")
    (tmp / "cells").mkdir(exist_ok=True)
    (tmp / "cells" / f"{key}.json").write_text(json.dumps({"args": {}, "RTE_seconds": 1.0, "avg_gap": gap}))
    return cell


def test_paired_section_from_cell_results(tmp_path):
    gaps = {"NGPlus": [5.0, 6.0, 7.0, 8.0, 9.0], "VarGrad": [4.0, 5.5, 6.0, 7.0, 8.5], "SalUn": [3.0, 3.0, 3.0, 3.0, 3.0],
            "RL": [3.0, 3.0, 3.0, 3.0, 3.0]}
    cells = [_cell(tmp_path, name, [name], "random", seed + 1, values[seed])
             for name, values in gaps.items() for seed in range(5)]
    cells.append(_cell(tmp_path, "NGPlus", ["NGPlus"], "classwise", 1, 10.0))  # unpaired: VarGrad lacks it
    text = paired_section(cells, tmp_path)
    assert text.startswith("\n## Paired comparisons")
    row = next(line for line in text.splitlines() if line.startswith("| VarGrad vs NGPlus | random"))
    assert "| 5 | -0.80 |" in row  # mean of (-1, -0.5, -1, -1, -0.5)
    assert "| 0.0625 |" in row     # five negative differences: the smallest two-sided exact p with 5 cells
    rl = next(line for line in text.splitlines() if line.startswith("| RL vs SalUn | random"))
    assert "identical results on all 5 paired cells" in rl
    assert f"{BOOTSTRAP_RESAMPLES} resamples" in text
    assert paired_section([], tmp_path) == ""
