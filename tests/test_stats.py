"""sweep.stats: the sign-flip and Wilcoxon tests, the t interval, Holm's correction, the unit (the seed), the results.md
section with its reachability statement, the forest plot, the selection-rule comparison on rows, and --tune's checks
of the statistics flags, against values computed by hand."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest

import benchmark
from sweep.grid import Cell
from sweep.stats import (
    EXACT_LIMIT,
    MASKED_FAMILY,
    MONTE_CARLO_DRAWS,
    REFERENCE_FAMILY,
    compare,
    comparison_pairs,
    holm,
    min_p,
    min_units,
    paired_comparisons,
    paired_report,
    paired_section,
    sentence,
    sign_flip_p,
    t_interval,
    wilcoxon_p,
)
from sweep.tune import _select_comparison
from utils import UserError

T_975_2 = 4.302652729911275   # Student's t, 97.5 % quantile, 2 degrees of freedom (table value 4.303)
T_975_4 = 2.7764451051977987  # 4 degrees of freedom (table value 2.776)


# ---------------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------------

def test_sign_flip_all_signs_equal_reaches_the_smallest_p():
    # Only the all-plus and all-minus assignments reach |sum| = 15: 2 of 32.
    assert sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    assert sign_flip_p([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(2 / 32)
    assert sign_flip_p([0.5] * 8) == pytest.approx(2 / 256)


def test_sign_flip_one_negative_by_hand():
    # Sum 11 of a total 15; flipping a subset T gives 15 - 2 sum(T): |S| >= 11 when sum(T) <= 2 ({}, {1}, {2}) or
    # sum(T) >= 13 (their complements): 6 of 32.
    assert sign_flip_p([1.0, -2.0, 3.0, 4.0, 5.0]) == pytest.approx(6 / 32)


def test_sign_flip_small_n_zeros_and_ties():
    assert math.isnan(sign_flip_p([]))
    assert sign_flip_p([3.0]) == 1.0                # n = 1: +3 and -3 both reach 3
    assert sign_flip_p([1.0, 3.0]) == pytest.approx(2 / 4)   # sums 4, -2, 2, -4: |S| >= 4 twice
    assert sign_flip_p([2.0, -2.0]) == 1.0          # observed 0: every assignment reaches it
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0      # nothing to flip
    # A zero changes no sum: {1, 2} gives +-3 and +-1, each twice over the 8 assignments: |S| >= 3 in 4 of 8.
    assert sign_flip_p([0.0, 1.0, 2.0]) == pytest.approx(4 / 8)
    # Tied magnitudes [1, 1, 1, -1]: sum 2; with k plus signs the sum is 2k - 4, C(4, k) ways: |S| >= 2 for k in
    # {0, 1, 3, 4}: (1 + 4 + 4 + 1) / 16.
    assert sign_flip_p([1.0, 1.0, 1.0, -1.0]) == pytest.approx(10 / 16)


def _exact_sign_flip(differences: list[float]) -> float:
    values = [Fraction(str(d)) for d in differences]
    observed = abs(sum(values))
    signs = list(itertools.product((1, -1), repeat=len(values)))
    return sum(1 for s in signs if abs(sum(a * b for a, b in zip(s, values, strict=True))) >= observed) / len(signs)


@pytest.mark.parametrize("differences", [[0.1, 0.2, -0.3, 0.3, 0.7], [0.1, 0.2, 0.3, -0.6, 0.05, 0.15],
                                         [1.1, 2.2, -3.3, 0.4]])
def test_sign_flip_counts_floating_point_ties_as_reached(differences):
    # Decimal inputs whose signed sums tie in exact arithmetic but not always in binary floating point.
    assert sign_flip_p(differences) == pytest.approx(_exact_sign_flip(differences))


def test_sign_flip_beyond_the_exact_limit_samples_with_a_fixed_generator():
    n = EXACT_LIMIT + 5
    # All positive: no random assignment but all-plus / all-minus reaches the sum (probability 2 / 2^25 per draw).
    assert sign_flip_p([1.0] * n) == pytest.approx(1 / (1 + MONTE_CARLO_DRAWS))
    values = [(-1.0) ** i * (i + 1) for i in range(n)]
    assert sign_flip_p(values) == sign_flip_p(values)  # reproducible
    assert 0.0 < sign_flip_p(values) <= 1.0


def test_wilcoxon_exact_with_zeros_dropped_and_ties():
    assert wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    # Ranks 1..5, only rank 2 negative: W- = 2; subsets of {1..5} with sum <= 2 are {}, {1}, {2}: p = 2 * 3 / 32.
    assert wilcoxon_p([1.0, -2.0, 3.0, 4.0, 5.0]) == pytest.approx(6 / 32)
    assert wilcoxon_p([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)  # the zero is dropped: n = 5
    assert wilcoxon_p([1.0, 1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 64)  # tied ranks, all positive: W- = 0
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(wilcoxon_p([]))


def test_min_p_and_units_needed():
    assert min_p(1) == 1.0 and min_p(2) == 0.5 and min_p(3) == 0.25 and min_p(5) == 0.0625 and min_p(6) == 0.03125
    assert min_p(3, "wilcoxon") == 0.25
    assert min_p(EXACT_LIMIT + 5) == pytest.approx(1 / (1 + MONTE_CARLO_DRAWS))
    assert min_units("sign_flip") == 6 and min_units("wilcoxon") == 6
    assert math.isnan(min_p(0))
    with pytest.raises(ValueError):
        min_p(3, "t")


# ---------------------------------------------------------------------------------------------------------------------
# Interval and correction
# ---------------------------------------------------------------------------------------------------------------------

def test_t_interval_by_hand():
    # [1, 2, 3]: mean 2, s = 1, half-width t(0.975, 2) / sqrt(3).
    low, high = t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - T_975_2 / math.sqrt(3)) and high == pytest.approx(2 + T_975_2 / math.sqrt(3))
    # [-1, -0.5, -1, -1, -0.5]: mean -0.8, s = sqrt(0.3 / 4), half-width t(0.975, 4) s / sqrt(5).
    low, high = t_interval([-1.0, -0.5, -1.0, -1.0, -0.5])
    half = T_975_4 * math.sqrt(0.075) / math.sqrt(5)
    assert (low, high) == (pytest.approx(-0.8 - half), pytest.approx(-0.8 + half))
    assert t_interval([2.5, 2.5, 2.5]) == (2.5, 2.5)
    assert all(math.isnan(v) for v in t_interval([1.0])) and all(math.isnan(v) for v in t_interval([]))


def test_holm_on_a_known_list():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, then kept monotone
    adjusted = holm([0.02, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm([]) == []


def test_compare_verdict_and_sentences():
    pairs = [(1.0, 3.0), (2.0, 5.0), (0.5, 4.5), (1.0, 2.0), (2.0, 4.0), (1.0, 3.5), (0.0, 2.0), (1.5, 3.0)]
    c = compare("VarGrad", "NGPlus", "random", pairs)
    assert c.n == 8 and c.mean == pytest.approx(-2.25)
    assert c.p_value == pytest.approx(2 / 256) and c.significant and not c.identical
    assert sentence(c) == ("VarGrad is closer to Retrain than NGPlus by 2.25 points of Avg. Gap; significant "
                           "(p = 0.00781 < 0.05).")
    same = compare("RL", "SalUn", "random", [(3.2, 3.2), (4.0, 4.0)])
    assert same.identical and same.mean == 0.0 and same.p_value == 1.0 and not same.significant
    assert "identical results on all 2 paired units" in sentence(same)
    # Three units cannot reach 0.05 (smallest p 0.25): no verdict, even with every difference of one sign.
    few = compare("A", "B", "random", [(1.0, 2.0), (1.0, 2.5), (1.0, 3.0)])
    assert few.p_value == pytest.approx(0.25) and not few.reachable and not few.significant
    assert "no verdict" in sentence(few)


def test_comparison_pairs_masked_against_base_and_everything_against_salun():
    configs = {"NGradMask = VarGrad": ["NGradMask", "VarGrad"], "NGPlus": ["NGPlus"], "SRGradMask": ["SRGradMask"],
               "SRL": ["SRL"], "SalUn": ["SalUn"], "RL": ["RL"]}
    pairs = comparison_pairs(configs)
    assert ("NGradMask = VarGrad", "NGPlus", MASKED_FAMILY) in pairs and ("SRGradMask", "SRL", MASKED_FAMILY) in pairs
    assert pairs.count(("NGradMask = VarGrad", "NGPlus", MASKED_FAMILY)) == 1  # two alias names, one configuration
    assert {a for a, b, family in pairs if family == REFERENCE_FAMILY} == set(configs) - {"SalUn"}
    assert {b for a, b, family in pairs if family == REFERENCE_FAMILY} == {"SalUn"}


# ---------------------------------------------------------------------------------------------------------------------
# From cells: unit, scope, families, section, forest plot
# ---------------------------------------------------------------------------------------------------------------------

def _cell(tmp: Path, label: str, scenario: str, seed: int, gap: float, setting: str | None = None,
          suffix: str = "") -> Cell:
    setting = setting or ("random130" if scenario == "random" else "class0")
    key = f"{label}-{scenario}-{setting}-{seed}{suffix}".replace(" ", "").replace("=", "")
    cell = Cell("method", key, "digits", "resnet18", scenario, seed, [], names=[label], label=label, setting=setting)
    (tmp / "cells").mkdir(exist_ok=True)
    (tmp / "cells" / f"{key}.json").write_text(json.dumps({"args": {}, "RTE_seconds": 1.0, "avg_gap": gap}))
    return cell


def _cells(tmp: Path, gaps: dict[str, list[float]], scenario: str = "random") -> list[Cell]:
    return [_cell(tmp, name, scenario, seed + 1, value) for name, values in gaps.items()
            for seed, value in enumerate(values)]


def test_three_seeds_state_the_smallest_p_and_give_no_verdict(tmp_path):
    gaps = {"NGPlus": [5.0, 6.0, 7.0], "VarGrad": [4.0, 5.5, 6.0], "SalUn": [3.0, 3.0, 3.0]}
    text = paired_section(_cells(tmp_path, gaps), tmp_path)
    assert "### random: masked vs base" in text and "### random: vs SalUn" in text
    assert "the smallest p-value the test can reach is 0.25" in text
    assert "no significance verdict is given" in text
    row = next(line for line in text.splitlines() if line.startswith("| VarGrad vs NGPlus |"))
    assert "| 3 | 3 | -0.83 |" in row and "| 0.25 | 0.25 | none (unreachable) |" in row
    assert "| yes |" not in text and "| no |" not in text
    assert "all" not in [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| ")]


def test_eight_seeds_give_holm_adjusted_verdicts_per_family(tmp_path):
    gaps = {"NGPlus": [5.0, 6.0, 7.0, 8.0, 9.0, 6.0, 7.0, 5.5],
            "VarGrad": [4.0, 5.5, 6.0, 7.0, 8.5, 5.0, 6.0, 5.0],     # below NGPlus on every seed
            "SalUn": [3.0] * 8, "RL": [3.0] * 8}
    comparisons = paired_comparisons(_cells(tmp_path, gaps), tmp_path)
    by_pair = {(c.a, c.b): c for c in comparisons}
    masked = by_pair[("VarGrad", "NGPlus")]
    assert masked.family == MASKED_FAMILY and masked.n == 8
    assert masked.p_value == pytest.approx(2 / 256) and masked.p_adjusted == pytest.approx(2 / 256)  # family of one
    assert masked.significant
    # vs SalUn: NGPlus, VarGrad (both above SalUn on every seed: p = 2/256) and RL (identical: p = 1); Holm over 3:
    # 3 * 2/256, then max(2 * 2/256, that), then 1.
    assert by_pair[("NGPlus", "SalUn")].p_adjusted == pytest.approx(6 / 256)
    assert by_pair[("VarGrad", "SalUn")].p_adjusted == pytest.approx(6 / 256)
    assert by_pair[("RL", "SalUn")].p_adjusted == 1.0 and by_pair[("RL", "SalUn")].identical
    text = paired_section([], tmp_path, comparisons=comparisons)
    row = next(line for line in text.splitlines() if line.startswith("| VarGrad vs SalUn |"))
    assert "| 0.00781 | 0.0234 | yes |" in row
    assert "smallest Holm-adjusted one 0.0234" in text


def test_a_family_whose_adjusted_p_cannot_reach_alpha_gives_no_verdict(tmp_path):
    # 6 seeds: smallest raw p 2/64 = 0.031 < 0.05, but 2 comparisons against SalUn: smallest adjusted 0.0625.
    gaps = {"NGPlus": [5.0, 6.0, 7.0, 8.0, 9.0, 6.0], "VarGrad": [4.0, 5.5, 6.0, 7.0, 8.5, 5.0], "SalUn": [3.0] * 6}
    comparisons = paired_comparisons(_cells(tmp_path, gaps), tmp_path)
    masked = next(c for c in comparisons if c.family == MASKED_FAMILY)
    assert masked.reachable and masked.significant  # a family of one: 0.031 < 0.05
    reference = [c for c in comparisons if c.family == REFERENCE_FAMILY]
    assert len(reference) == 2 and all(not c.reachable and not c.significant for c in reference)


def test_the_unit_is_the_seed_cells_of_one_seed_are_averaged(tmp_path):
    cells = []
    for seed in range(1, 7):
        for setting, extra in (("class0", 0.0), ("class1", 2.0)):
            cells.append(_cell(tmp_path, "NGPlus", "classwise", seed, 5.0 + extra, setting))
            cells.append(_cell(tmp_path, "VarGrad", "classwise", seed, 4.0 + extra + 0.1 * seed, setting))
    (c,) = [c for c in paired_comparisons(cells, tmp_path) if c.family == MASKED_FAMILY]
    assert c.n == 6 and c.cells == 12  # six seeds, twelve cells
    assert c.mean == pytest.approx(sum(-1.0 + 0.1 * s for s in range(1, 7)) / 6)
    text = paired_section(cells, tmp_path)
    assert "averaged per seed" in text


def test_scenarios_are_never_pooled(tmp_path):
    gaps = {"NGPlus": [5.0] * 6, "VarGrad": [4.0, 4.5, 4.2, 4.1, 4.3, 4.4]}
    cells = _cells(tmp_path, gaps, "random") + _cells(tmp_path, {k: [v + 10 for v in vs] for k, vs in gaps.items()},
                                                      "classwise")
    comparisons = paired_comparisons(cells, tmp_path)
    assert sorted(c.scope for c in comparisons) == ["classwise", "random"] and all(c.n == 6 for c in comparisons)


def test_paired_report_writes_the_forest_plot(tmp_path):
    gaps = {"NGPlus": [5.0, 6.0, 7.0], "VarGrad": [4.0, 5.5, 6.0], "SalUn": [3.0, 3.0, 3.0]}
    cells = _cells(tmp_path, gaps) + _cells(tmp_path, gaps, "classwise")
    text, files = paired_report(cells, tmp_path)
    assert text.startswith("\n## Paired comparisons") and files == [tmp_path / "forest.png"]
    assert (tmp_path / "forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paired_report([], tmp_path) == ("", [])


# ---------------------------------------------------------------------------------------------------------------------
# The selection-rule comparison: one unit per configuration row
# ---------------------------------------------------------------------------------------------------------------------

def test_select_comparison_uses_one_unit_per_row(tmp_path):
    plan = SimpleNamespace(criterion="gap", other_criterion="retrain_free")
    main, other = [], []
    for index in range(6):
        name = f"M{index}"
        for seed in (1, 2, 3):  # three cells per row: still one unit
            main.append(_cell(tmp_path, name, "random", seed, 2.0 + index))
            other.append(_cell(tmp_path, name, "random", seed, 2.5 + index + 0.1 * seed, suffix="-free"))
    for cell in other:
        cell.label += " [retrain_free]"
    text = _select_comparison(plan, [], [], main, other, tmp_path)
    # Each row loses 0.5 + 0.2 (the mean of 0.1, 0.2, 0.3): six rows, one sign: p = 2/64.
    assert "over 6 configuration rows" in text and "+0.70 points" in text
    assert "p = 0.0312, Holm p = 0.0312" in text and "significant (adjusted p = 0.0312 < 0.05)" in text


# ---------------------------------------------------------------------------------------------------------------------
# Bad input in --tune: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1", "2"], "--seeds: 2 evaluation seed(s) for random; the sign_flip test needs at least 6"),
    (["--seeds", "1", "2", "3", "4", "5", "--test", "wilcoxon"], "smallest p with 5: 0.0625"),
    (["--trials", "1"], "--trials 1: a choice needs at least 2 trials per method"),
    (["--tune-classes", "0", "--forget_classes", "0", "1"], "also an evaluation class"),
])
def test_bad_tune_statistics_input(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(UserError) as error:
        benchmark.main(["--tune", "--datasets", "digits", "--no-track", "--out", str(out), *argv])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()


def test_unknown_test_name_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.build_parser().parse_args(["--test", "ttest"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--test" in err and "sign_flip" in err


def test_six_seeds_pass_the_check():
    args = benchmark.build_parser().parse_args(["--tune", "--datasets", "digits", "--seeds", *map(str, range(1, 7))])
    from sweep.tune import check_tune_args

    check_tune_args(args, {"digits": 10})
    assert args.test == "sign_flip"


def test_the_sweep_attaches_the_forest_plot_to_its_parent_run(tmp_path):
    """Sweep.run writes forest.png beside results.md and hands it to the parent run as a plot."""
    from sweep import Settings, Sweep

    class Parent:
        run_id = "parent"

        def __init__(self):
            self.plots: list[Path] = []

        def log_files(self, plots=(), others=()):
            self.plots += list(plots)

        def set_tags(self, tags):
            pass

        def log_metrics(self, values):
            pass

        def end(self, status):
            self.status = status

    gaps = {"NGPlus": [5.0, 6.0, 7.0], "VarGrad": [4.0, 5.5, 6.0], "SalUn": [3.0, 3.0, 3.0]}
    cells = _cells(tmp_path, gaps)
    for cell in cells:  # complete results, so the table can be built and nothing is computed
        path = tmp_path / "cells" / f"{cell.key}.json"
        result = json.loads(path.read_text())
        path.write_text(json.dumps({**result, "UA": 10.0, "RA": 99.0, "TA": 95.0, "MIA_efficacy": 20.0}))
    sweep = Sweep.__new__(Sweep)
    sweep.settings = Settings(["digits"], ["resnet18"], ["random"], ["NGPlus", "VarGrad", "SalUn"], [1, 2, 3],
                              out=tmp_path, test="wilcoxon")
    sweep.out, sweep.tracker, sweep.experiment_id, sweep.progress = tmp_path, None, None, False
    sweep.cells, sweep.notes, sweep.parent = cells, [], Parent()
    outcome = sweep.run()
    assert outcome.computed == 0 and (tmp_path / "forest.png") in outcome.files
    assert (tmp_path / "forest.png") in sweep.parent.plots
    assert "exact Wilcoxon signed-rank test" in (tmp_path / "results.md").read_text()


def test_wilcoxon_treats_floating_point_noise_as_ties_and_zeros():
    # 0.3 - 0.1 - 0.2 is -2.8e-17, not 0: rounded, it is a zero and is dropped; 0.1 + 0.2 ties with 0.3.
    noisy = [0.3 - 0.1 - 0.2, 0.1 + 0.2, 0.3, 1.0, 2.0, 3.0]
    assert wilcoxon_p(noisy) == wilcoxon_p([0.0, 0.3, 0.3, 1.0, 2.0, 3.0]) == pytest.approx(2 / 32)


def test_select_comparison_with_too_few_rows_gives_no_verdict(tmp_path):
    plan = SimpleNamespace(criterion="gap", other_criterion="retrain_free")
    main = [_cell(tmp_path, name, "random", 1, 2.0) for name in ("GA", "FT")]
    other = [_cell(tmp_path, name, "random", 1, 3.0, suffix="-free") for name in ("GA", "FT")]
    text = _select_comparison(plan, [], [], main, other, tmp_path)
    assert "over 2 configuration rows" in text and "p = 0.5, Holm p = 0.5" in text
    assert "no verdict: these units cannot reach an adjusted p-value below 0.05" in text
