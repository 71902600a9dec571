"""benchmark.py --tune, the search itself: an equal and fine enough budget, the same epoch maximum for every iterative
method, diverged trials that keep their finite epochs, choices on the edge of their range flagged in the tuned file
and the table, and the sensitivity figure."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_tune import _result

import pipeline.stages as stages
from pipeline.stages import Diverged
from sweep import Settings, Sweep
from sweep.grid import Cell
from sweep.report import _settings_text
from sweep.tune import (
    DEFAULT_TRIALS,
    Selection,
    edge_flags,
    mark_edges,
    search_space,
    select,
    selections,
    sensitivity,
    sensitivity_figures,
    trial_result,
    trial_values,
)
from unlearn import list_methods, resolve_method
from unlearn.common import MAX_TUNED_EPOCHS
from utils import DivergenceError

# The module (the package's `sweep.execute` attribute is the function of that name).
execute_module = importlib.import_module("sweep.execute")

TUNED = [n for n in list_methods() if n not in ("raw", "retrain")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------------
# Budget and ranges
# ---------------------------------------------------------------------------------------------------------------------

def test_default_budget_is_8_trials_for_every_configuration():
    assert DEFAULT_TRIALS == 8
    assert {len(trial_values(name, DEFAULT_TRIALS)) for name in TUNED} == {8}


def test_every_iterative_method_has_the_same_epoch_maximum():
    maxima = {name: search_space(name)["unlearn_epochs"] for name in TUNED if not resolve_method(name).cls.one_shot}
    assert set(maxima.values()) == {("per_epoch", MAX_TUNED_EPOCHS)}, maxima


@pytest.mark.parametrize("name", [n for n in TUNED if "unlearn_lr" in search_space(n)])
def test_learning_rate_ranges_span_at_least_three_decades(name):
    kind, low, high = search_space(name)["unlearn_lr"]
    assert kind == "log" and math.log10(high / low) >= 3 - 1e-9


@pytest.mark.parametrize("name, scenario, flag, value", [
    # The search with 4 trials: FT's lr 0.147 was its top design point, BE's 2.37e-6 its lowest, RL's 0.0169 its
    # highest.
    ("FT", "random", "unlearn_lr", 0.147), ("FT_l1", "classwise", "unlearn_lr", 0.147),
    ("SRL", "random", "unlearn_lr", 0.00178), ("BE", "classwise", "unlearn_lr", 2.37e-06),
    ("RL", "classwise", "unlearn_lr", 0.0169), ("SalUn", "classwise", "unlearn_lr", 0.0169),
    # The search with 8 trials (commit defe565): the top design point of GA (0.0195), SalUn (0.0649) and BE
    # (0.000562), the lowest of BS (1.65e-6) and SSD's lowest alpha (1.33).
    ("GA", "classwise", "unlearn_lr", 0.0195), ("SalUn", "classwise", "unlearn_lr", 0.0649),
    ("BE", "classwise", "unlearn_lr", 0.000562), ("BS", "classwise", "unlearn_lr", 1.65e-06),
    ("SSD", "classwise", "alpha", 1.33),
    # The search with a 30-epoch maximum (commit d8408ec): FF's lowest alpha (1.78e-8), where the class-wise score
    # was already flat (the forgotten class's row is zeroed whatever the noise).
    ("FF", "classwise", "alpha", 1.78e-08)])
def test_the_previous_edge_choices_now_lie_inside_the_range(name, scenario, flag, value):
    """Every pick of an earlier shipped search that sat on an edge of its range is strictly inside the widened
    design."""
    design = sorted({values[flag] for values in trial_values(name, DEFAULT_TRIALS)})
    assert design[0] < value < design[-1], (scenario, design)


def test_the_epoch_maximum_lies_beyond_the_previous_one():
    """The search with a maximum of 20 epochs chose 20 for five class-wise configurations; runs of 40 epochs put
    their best epoch between 20 and 30."""
    assert MAX_TUNED_EPOCHS > 20


# ---------------------------------------------------------------------------------------------------------------------
# Edge flags
# ---------------------------------------------------------------------------------------------------------------------

SPACE = {"unlearn_lr": ("log", 1e-4, 1e-2), "unlearn_epochs": ("per_epoch", 20)}
DESIGN = [{"unlearn_lr": lr, "unlearn_epochs": 20} for lr in (0.000178, 0.000562, 0.00178, 0.00562)]


@pytest.mark.parametrize("values, expected", [
    ({"unlearn_lr": 0.00562, "unlearn_epochs": 7}, {"unlearn_lr": "high"}),          # top design point
    ({"unlearn_lr": 0.000178, "unlearn_epochs": 7}, {"unlearn_lr": "low"}),          # lowest design point
    ({"unlearn_lr": 0.000562, "unlearn_epochs": 1}, {}),     # one epoch: no shorter run exists, not an edge
    ({"unlearn_lr": 0.000178, "unlearn_epochs": 1}, {"unlearn_lr": "low"}),          # ... the lr says "less" alone
    ({"unlearn_lr": 0.00178, "unlearn_epochs": 20}, {"unlearn_epochs": "high"}),     # the declared maximum
    ({"unlearn_lr": 0.00562, "unlearn_epochs": 20}, {"unlearn_lr": "high", "unlearn_epochs": "high"}),
    ({"unlearn_lr": 0.00178, "unlearn_epochs": 19}, {}),                             # inside on both
])
def test_edge_flags_by_hand(values, expected):
    assert edge_flags(values, DESIGN, SPACE) == expected


def test_edge_flags_of_a_design_dimension_and_of_choices():
    # Epochs in the design (horizon-dependent): the edges are the smallest and largest epoch counts tried (3, 16),
    # not 1 and the maximum.
    design = [{"unlearn_lr": 0.1, "unlearn_epochs": e} for e in (11, 6, 16, 3)]
    assert edge_flags({"unlearn_lr": 0.1, "unlearn_epochs": 16}, design, SPACE, epochs_in_design=True) == \
        {"unlearn_epochs": "high"}
    assert edge_flags({"unlearn_lr": 0.1, "unlearn_epochs": 6}, design, SPACE, epochs_in_design=True) == {}
    assert edge_flags({"unlearn_lr": 0.1, "unlearn_epochs": 3}, design, SPACE, epochs_in_design=True) == \
        {"unlearn_epochs": "low"}  # 1 and 2 were never tried
    assert edge_flags({"unlearn_lr": 0.1, "unlearn_epochs": 1}, design + [{"unlearn_lr": 0.1, "unlearn_epochs": 1}],
                      SPACE, epochs_in_design=True) == {}  # the smallest design epoch is 1: no shorter run
    # One value tried (lr): no edge; an unordered choice: no edge.
    space = {"unlearn_lr": ("log", 1e-4, 1e-2), "mode": ("choice", "a", "b")}
    assert edge_flags({"unlearn_lr": 0.1, "mode": "b"}, [{"unlearn_lr": 0.1, "mode": "a"},
                                                        {"unlearn_lr": 0.1, "mode": "b"}], space) == {}


# ---------------------------------------------------------------------------------------------------------------------
# Selection with diverged trials and horizon-dependent trials, on hand-made results
# ---------------------------------------------------------------------------------------------------------------------

def test_a_diverged_trial_keeps_its_finite_epochs_as_candidates():
    # Trial 1's second cell diverged in epoch 2: its epoch 1 is still a candidate, its epochs 2-3 are not (the other
    # cell's epoch 2 alone is no mean over the tuning cells).
    partial = {"curves": _result((1.0, 90, 99, 90))["curves"], "diverged": True}
    trials = [
        [_result((4.0, 99, 100, 90), (3.0, 95, 100, 90)), _result((5.0, 98, 100, 88), (4.0, 93, 99, 88))],
        [_result((2.0, 92, 99, 90), (0.1, 80, 97, 90)), partial],
    ]
    assert select(trials, "random", "gap") == (1, 1, 1.5)  # (2.0 + 1.0) / 2; trial 0's best is (3 + 4) / 2 = 3.5
    # Dropping the diverged trial whole (the old rule) would have picked trial 0.
    assert select([trials[0], [trials[1][0], None]], "random", "gap") == (0, 2, 3.5)


def test_a_horizon_dependent_trial_is_scored_only_at_its_own_epoch_count():
    trials = [[_result((1.0, 90, 99, 90), (3.0, 90, 99, 90))], [_result((2.5, 90, 99, 90))]]
    # Read off the curves, trial 0's epoch 1 would win; each trial ran its own horizon (2 and 1 epochs): trial 1 wins.
    assert select(trials, "random", "gap") == (0, 1, 1.0)
    assert select(trials, "random", "gap", horizons=[2, 1]) == (1, 1, 2.5)
    # A horizon-dependent trial that diverged before its last epoch has no candidate.
    partial = {"curves": _result((0.5, 90, 99, 90))["curves"], "diverged": True}
    assert select([[partial], trials[1]], "random", "gap", horizons=[2, 1]) == (1, 1, 2.5)


def _cell(key: str, name: str, scenario: str = "random", family: bool = False, config: str = "") -> Cell:
    return Cell("method", key, "digits", "resnet18", scenario, 101, [], names=[name], family=family,
                config=config or name)


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _finished(*epochs) -> dict:
    return {"args": {}, "RTE_seconds": 1.0, **_result(*epochs)}


def test_trial_result_reads_a_diverged_cells_curves_from_its_failure_record(tmp_path):
    cell = _cell("k1", "GA")
    assert trial_result(cell, tmp_path) is None  # never ran
    _write(cell.failure_path(tmp_path), {"error": "DivergenceError: ...", "argv": []})
    assert trial_result(cell, tmp_path) is None  # failed before its first evaluation
    curves = _result((2.0, 92, 99, 90))["curves"]
    _write(cell.failure_path(tmp_path), {"error": "DivergenceError: ...", "argv": [], "curves": curves})
    assert trial_result(cell, tmp_path) == {"curves": curves, "diverged": True}
    _write(cell.result_path(tmp_path), _finished((1.0, 90, 99, 90)))
    assert trial_result(cell, tmp_path)["RTE_seconds"] == 1.0  # a complete result wins


@pytest.fixture
def tuning_run(tmp_path):
    """FT (8 trials, one random tuning cell each): trial i's score at epoch e is (8 - i) + e / 10, so the top design
    point (trial 8) wins at epoch 1; trial 3 diverged in its second epoch; trial 5 diverged in its first."""
    cells, trial_of = [], {}
    for index in range(8):
        cell = _cell(f"ft{index}", "FT", config="FT")
        cells.append(cell)
        trial_of[cell.key] = ("FT", index)
        epochs = [((8 - index) + e / 10, 90, 99, 90) for e in range(1, 4)]
        if index == 2:
            _write(cell.failure_path(tmp_path), {"error": "DivergenceError", "argv": [],
                                                 "curves": _result(epochs[0])["curves"]})
        elif index == 4:
            _write(cell.failure_path(tmp_path), {"error": "DivergenceError", "argv": []})
        else:
            _write(cell.result_path(tmp_path), _finished(*epochs))
    return tmp_path, cells, trial_of, SimpleNamespace(trials=8, criterion="gap", tolerance=0.0)


def test_selections_flag_a_choice_on_the_edge(tuning_run):
    out, cells, trial_of, plan = tuning_run
    [chosen] = selections(cells, out, plan, trial_of, "gap")
    top = trial_values("FT", 8)[7]["unlearn_lr"]
    assert (chosen.trial, chosen.epoch, chosen.score) == (7, 1, pytest.approx(1.1))
    assert chosen.values == {"unlearn_lr": top, "unlearn_epochs": 1}
    assert chosen.edges == {"unlearn_lr": "high"}  # epoch 1 is no edge


def test_edge_flags_reach_the_table_settings_column():
    selection = Selection("FT", ("FT",), "random", 7, 1, 1.1, {"unlearn_lr": 1.95, "unlearn_epochs": 1}, 8, 1,
                          {"unlearn_lr": "high"})
    cell = _cell("e1", "FT")
    cell.hp = {"lr": 1.95, "epochs": 1}
    other = _cell("e2", "FT", scenario="classwise")
    notes = mark_edges([cell, other], [selection])
    assert cell.edges == {"unlearn_lr": "high"} and other.edges == {}
    assert _settings_text(cell) == "lr=1.95 [high edge], epochs=1"
    assert len(notes) == 1 and "[high edge]" in notes[0]
    assert mark_edges([other], [selection]) == []  # nothing on an edge: no note


# ---------------------------------------------------------------------------------------------------------------------
# The sensitivity figure
# ---------------------------------------------------------------------------------------------------------------------

def test_sensitivity_points_are_each_trials_best_epoch(tuning_run):
    out, cells, trial_of, plan = tuning_run
    panels = sensitivity(cells, out, plan, trial_of, "gap")
    entry = panels["random"]["FT"]
    lrs = [values["unlearn_lr"] for values in trial_values("FT", 8)]
    expected = [(lrs[i], (8 - i) + 0.1) for i in range(8) if i != 4]  # trial 5 left no finite epoch
    assert entry["points"] == [(lr, pytest.approx(score)) for lr, score in expected]
    assert entry["runs"] == "FT" and entry["masking_family"] is False and entry["horizon_dependent"] is False


def test_sensitivity_figure_is_a_png_per_scenario(tuning_run, tmp_path):
    out, cells, trial_of, plan = tuning_run
    panels = sensitivity(cells, out, plan, trial_of, "gap")
    panels["classwise"] = {"NGradMask = VarGrad": {"runs": "NGPlus + prob", "masking_family": True,
                                                   "horizon_dependent": False, "points": [(1e-4, 3.0), (1e-3, 2.0)]},
                           "FT_l1 = FT_prune": {"runs": "FT_l1", "masking_family": False, "horizon_dependent": True,
                                                "points": [(1e-2, 4.0)]}}
    figures = sensitivity_figures(panels, tmp_path / "figures", plan)
    assert [f.name for f in figures] == ["sensitivity_random.png", "sensitivity_classwise.png"]
    for figure in figures:
        content = figure.read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000
    assert sensitivity_figures({"random": {"FT": {**panels["random"]["FT"], "points": []}}}, tmp_path, plan) == []


# ---------------------------------------------------------------------------------------------------------------------
# A diverged cell's curves, from the unlearning stage to the failure record
# ---------------------------------------------------------------------------------------------------------------------

def test_the_cell_report_carries_a_diverged_runs_curves(tmp_path, monkeypatch):
    curves = [{"epoch": 1, "UA": 5.0}]

    def diverge(task, argv):
        raise Diverged("GA diverged at epoch 2", 2, torch.nn.Linear(1, 1), curves)

    monkeypatch.setattr(execute_module, "_run_cell", diverge)
    report = execute_module.execute({"key": "k", "kind": "method", "scenario": "random", "argv": [],
                                     "result_json": None, "log": str(tmp_path / "logs" / "k.log"), "threads": 1})
    assert report["status"] == "failed" and report["curves"] == curves


@pytest.mark.slow
@pytest.mark.integration
def test_a_diverged_cell_keeps_its_evaluated_epochs_in_its_failure_record(tmp_path, monkeypatch):
    """The real unlearning stage evaluates epoch 1, then the method diverges in epoch 2: the failure record holds
    epoch 1's evaluation, and the tuner reads it as that cell's candidates."""
    def one_epoch_then_diverge(method, epochs, on_epoch=None, progress=True):
        method.setup()
        method.run_epoch(1)
        on_epoch(1, method.evaluation_model(), {"loss": 1.0}, 0.0)
        raise DivergenceError(f"{method.name} diverged at epoch 2", 2)

    monkeypatch.setattr(stages, "run_unlearning", one_epoch_then_diverge)
    out = tmp_path / "out"
    outcome = Sweep(Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random"], methods=["GA"], seeds=[1],
                             out=out, epochs=1, unlearn_epochs=3, width=4, jobs=1, device="cpu", epoch_eval="all"),
                    progress=False).run()
    assert len(outcome.failed) == 1 and "diverged at epoch 2" in outcome.failed[0]
    [record] = [json.loads(p.read_text()) for p in (out / "cells").glob("*.failed.json")]
    assert [entry["epoch"] for entry in record["curves"]] == [1] and "avg_gap" in record["curves"][0]
    [cell] = [c for c in Sweep(Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random"], methods=["GA"],
                                        seeds=[1], out=out, epochs=1, unlearn_epochs=3, width=4, jobs=1, device="cpu",
                                        epoch_eval="all"), progress=False).cells if c.kind == "method"]
    assert trial_result(cell, out) == {"curves": record["curves"], "diverged": True}
