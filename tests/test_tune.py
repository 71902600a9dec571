"""benchmark.py --tune: declared search spaces, the fixed design, equal budgets, disjoint tuning and evaluation cells,
selection by hand-computed scores, the tuned file through --config, bad input, and a tiny end-to-end run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, run_main
from sweep.settings import Settings, default_config_path, load_settings_file, method_combos
from sweep.tune import (
    CRITERIA,
    DEFAULT_EVAL_SEEDS,
    DEFAULT_SELECT_TOLERANCE,
    DEFAULT_TRIAL_PATIENCE,
    DEFAULT_TRIALS,
    DEFAULT_TUNE_CLASSES,
    DEFAULT_TUNE_SEEDS,
    design,
    design_values,
    epoch_scores,
    epochs_flag,
    evaluation_cells,
    plan_from_args,
    search_space,
    select,
    trial_values,
    tuning_cells,
)
from unlearn import HParam, list_methods, match_methods, method_hparams, resolve_method
from unlearn.common import MAX_TUNED_EPOCHS
from unlearn.hparams import searched

REFERENCE_ROWS = {"raw", "retrain"}  # the original model and the Retrain reference: nothing to tune


def benchmark_here(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`benchmark` in this process (`run_main`): for runs that stop before any cell (bad input, --emit-commands)."""
    return run_main("benchmark.py", *args, cwd=cwd, env={"MLFLOW_TRACKING_URI": None, "OMP_NUM_THREADS": "1"})


def benchmark(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------------
# Search spaces and the design
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in list_methods() if n not in REFERENCE_ROWS])
def test_every_registered_method_declares_a_valid_search_space(name):
    space = search_space(name)
    assert space, f"{name} declares no search space"
    method = resolve_method(name)
    by_flag = {hp.flag: hp for hp in method_hparams(method)}
    if not method.cls.one_shot:  # epoch-based: learning rate on a log scale, epochs read off the curves
        assert space["unlearn_lr"][0] == "log"
        assert space["unlearn_epochs"][0] == "per_epoch"
    assert "beta" not in space and "quantile" not in space, "the masking family gets no extra dimension"
    for values in trial_values(name, 5):
        assert set(values) == set(space)
        for flag, value in values.items():
            assert by_flag[flag].validate(value, name) == value  # every trial is a legal value


def test_reference_rows_have_nothing_to_tune():
    assert all(not search_space(name) for name in REFERENCE_ROWS)


def test_masked_alias_gets_exactly_its_bases_trials():
    assert trial_values("VarGrad", 4) == trial_values("NGPlus", 4)
    assert trial_values("SRGradMask", 4) == trial_values("SRL", 4)
    assert trial_values("SCRUBGradMask", 4) == trial_values("SCRUB", 4)


def test_invalid_search_declarations_fail_at_import_time():
    lr = HParam("lr", float, 0.01, "lr", low=0.0, low_open=True)
    epochs = HParam("epochs", int, 10, "epochs", low=1)
    for bad in [("log", 0.0, 1.0), ("log", 1.0, 0.1), ("cubic", 1.0, 2.0), ("per_epoch", 10), ("choice",),
                ("linear", -1.0, 1.0)]:  # the last leaves lr's allowed range (> 0)
        with pytest.raises(ValueError):
            lr.replace(search=bad)
    for bad in [("per_epoch", 0), ("per_epoch", 2.5), ("log", 1.0, 10.0)]:
        with pytest.raises(ValueError):
            epochs.replace(search=bad)
    assert searched((lr, epochs), lr=("log", 1e-3, 1e-1))[0].search == ("log", 1e-3, 1e-1)
    with pytest.raises(ValueError):
        searched((lr,), momentum=("linear", 0.0, 1.0))


def test_design_points_by_hand():
    assert design(4, 1) == [(0.125,), (0.375,), (0.625,), (0.875,)]
    # Second coordinate: radical inverse in base 2 of 1, 2, 3, 4 = 0.5, 0.25, 0.75, 0.125 (Hammersley).
    assert design(4, 2) == [(0.125, 0.5), (0.375, 0.25), (0.625, 0.75), (0.875, 0.125)]


def test_trial_values_by_hand():
    # lr log-uniform on [1e-4, 1e-2] at u = 1/8, 3/8, 5/8, 7/8 -> 10^(-4 + 2u), 3 significant digits;
    # epochs at the declared maximum (the epoch is read off per-epoch evaluation).
    space = {"unlearn_lr": ("log", 1e-4, 1e-2), "unlearn_epochs": ("per_epoch", 20)}
    assert design_values(space, 4) == [{"unlearn_lr": lr, "unlearn_epochs": 20}
                                       for lr in (0.000178, 0.000562, 0.00178, 0.00562)]
    # A horizon-dependent method: the same learning rates (first coordinate), the epochs along the second coordinate
    # (radical inverse in base 2 of 1..4 = 0.5, 0.25, 0.75, 0.125) cut into 20 equal parts: 1 + floor(20 u).
    assert design_values(space, 4, epochs_in_design=True) == [
        {"unlearn_lr": 0.000178, "unlearn_epochs": 11}, {"unlearn_lr": 0.000562, "unlearn_epochs": 6},
        {"unlearn_lr": 0.00178, "unlearn_epochs": 16}, {"unlearn_lr": 0.00562, "unlearn_epochs": 3}]
    # SSD: alpha log on [1, 30] along the first coordinate, lambda linear on [0.25, 1] along the second.
    first = design_values({"alpha": ("log", 1.0, 30.0), "ssd_lambda": ("linear", 0.25, 1.0)}, 4)[0]
    assert first == {"alpha": float(f"{30 ** 0.125:.3g}"), "ssd_lambda": 0.625}
    # The registry's declarations go through the same function.
    assert trial_values("NGPlus", 8) == design_values(search_space("NGPlus"), 8)
    assert trial_values("FT_l1", 8) == design_values(search_space("FT_l1"), 8, epochs_in_design=True)


# ---------------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------------

def _result(*epochs: tuple[float, float, float, float]) -> dict:
    """Curves of one cell: per epoch (val_gap, forget accuracy, retain accuracy, validation accuracy)."""
    return {"curves": [{"epoch": e + 1, "val_gap": g, "accuracy": {"forget": f, "retain": r, "val": v}}
                       for e, (g, f, r, v) in enumerate(epochs)]}


def test_selection_picks_the_best_trial_and_epoch_by_hand_computed_scores():
    trials = [
        [_result((5.0, 99, 100, 90), (4.0, 95, 100, 90)), _result((6.0, 98, 100, 88), (5.0, 93, 99, 88))],
        [_result((3.0, 92, 99, 90), (2.5, 80, 97, 90)), _result((2.0, 90, 99, 88), (4.0, 70, 90, 88))],
        [_result((1.0, 91, 100, 90), (0.5, 89, 100, 90)), None],  # one tuning cell failed: the trial is out
    ]
    # gap: trial 2 epoch 1 = (3 + 2) / 2 = 2.5; epoch 2 = (2.5 + 4) / 2 = 3.25; trial 1 best is 4.5.
    assert select(trials, "random", "gap") == (1, 1, 2.5)
    # retrain_free, random: |forget - val| + (100 - retain), mean over the two cells.
    # trial 1 e1: (9 + 0 + 10 + 0) / 2 = 9.5; e2: (5 + 0 + 5 + 1) / 2 = 5.5
    # trial 2 e1: (2 + 1 + 2 + 1) / 2 = 3.0; e2: (10 + 3 + 18 + 10) / 2 = 20.5
    assert select(trials, "random", "retrain_free") == (1, 1, 3.0)
    # class-wise: the target forget accuracy is 0 -> trial 2 epoch 2 = (80 + 3 + 70 + 10) / 2 = 81.5 is best.
    assert select(trials, "classwise", "retrain_free") == (1, 2, 81.5)
    assert select([[None], []], "random", "gap") == (-1, None, math.inf)


def test_selection_ties_go_to_the_earlier_trial_and_fewer_epochs():
    same = _result((2.0, 90, 100, 90), (2.0, 90, 100, 90))
    assert select([[same], [same]], "random", "gap") == (0, 1, 2.0)


def test_one_shot_result_without_curves_scores_its_final_numbers():
    result = {"val_gap": 1.5, "epochs_run": 1, "accuracy": {"forget": 90.0, "retain": 99.0, "val": 88.0}}
    assert epoch_scores(result, "random", "gap") == {1: 1.5}
    assert epoch_scores(result, "random", "retrain_free") == {1: 3.0}
    assert set(CRITERIA) == {"gap", "retrain_free"}


# ---------------------------------------------------------------------------------------------------------------------
# Cells: equal budget, disjoint seeds and classes
# ---------------------------------------------------------------------------------------------------------------------

def _plan(*argv: str):
    from benchmark import build_parser

    args = build_parser().parse_args(["--tune", *argv])
    return args, plan_from_args(args)


def test_tuning_and_evaluation_cells_never_share_a_seed_or_a_class(tmp_path):
    args, plan = _plan("--methods", "GA", "VarGrad", "SSD", "--trials", "3")
    settings = Settings(datasets=["digits_noisy"], archs=["resnet18"], scenarios=["random", "classwise"],
                        methods=args.methods, seeds=[1], out=tmp_path)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    tune_cells, _, trial_of = tuning_cells(settings, plan, empty)
    eval_cells, _ = evaluation_cells(settings, plan, empty)

    def seeds_and_classes(cells):
        from sweep.grid import parse_cell

        runs = [parse_cell(c.argv) for c in cells]
        return ({r.seed for r in runs}, {r.data.class_to_replace for r in runs if r.data.class_to_replace >= 0})

    tune_seeds, tune_classes = seeds_and_classes(tune_cells)
    eval_seeds, eval_classes = seeds_and_classes(eval_cells)
    assert tune_seeds == {101} and eval_seeds == set(range(1, 12))
    assert tune_classes == {3} and eval_classes == {0, 1, 2, 4, 5, 6, 7, 8, 9}  # every class nobody tuned on
    assert not tune_seeds & eval_seeds and not tune_classes & eval_classes
    # One class per tuning seed, as in the held-out layout: seed 101 forgets class 3.
    from sweep.grid import parse_cell
    classwise = {(r.seed, r.data.class_to_replace) for r in map(parse_cell, (c.argv for c in tune_cells))
                 if r.data.class_to_replace >= 0}
    assert classwise == {(101, 3)} and plan.tune_classes_of == {101: 3}
    # Equal budget: 3 trials x 1 seed x (1 random + 1 class-wise cell) per configuration.
    assert Counter(config for config, _ in trial_of.values()) == {"GA": 6, "VarGrad": 6, "SSD": 6}
    assert all(c.hp["epochs"] == MAX_TUNED_EPOCHS for c in tune_cells if c.kind == "method" and c.names == ["VarGrad"])
    assert not any("--no_epoch_eval" in c.argv for c in tune_cells if c.kind == "method")


def test_tuned_file_round_trips_through_config(tmp_path):
    payload = {"VarGrad": {"scenarios": {"random": {"unlearn_lr": 0.00178, "unlearn_epochs": 7},
                                         "classwise": {"unlearn_lr": 0.00562, "unlearn_epochs": 12}}},
               "SSD": {"scenarios": {"random": {"alpha": 1.53, "ssd_lambda": 0.625}}},
               "provenance": {"criterion": "gap", "trials_per_method": 4}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(payload))
    loaded = load_settings_file(path, "hyper-parameter file")
    assert method_combos("VarGrad", "classwise", [loaded]) == [{"unlearn_epochs": 12, "unlearn_lr": 0.00562}]
    assert method_combos("SSD", "classwise", [loaded]) == [{}]
    args, plan = _plan("--methods", "VarGrad", "SSD", "--trials", "2", "--scenarios", "random")
    settings = Settings(datasets=["digits_noisy"], archs=["resnet18"], scenarios=["random"], methods=args.methods,
                        seeds=[1], out=tmp_path)
    cells, _ = evaluation_cells(settings, plan, path)
    hp = {c.names[0]: c.hp for c in cells if c.kind == "method" and c.seed == 1}
    assert (hp["VarGrad"]["lr"], hp["VarGrad"]["epochs"]) == (0.00178, 7)
    assert (hp["SSD"]["alpha"], hp["SSD"]["ssd_lambda"]) == (1.53, 0.625)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"provenance": [1]}))
    with pytest.raises(Exception, match="provenance"):
        load_settings_file(bad, "hyper-parameter file")


def test_plain_benchmark_uses_the_shipped_tuned_file_and_says_so(tmp_path):
    """configs/tuned_digits_noisy.json (made by the README's --tune command) is the default for digits_noisy; the
    hand-chosen file stays reachable with --config, and both say which file they use."""
    shipped = ROOT / "configs" / "tuned_digits_noisy.json"
    assert default_config_path("digits_noisy") == shipped
    assert default_config_path("digits") == ROOT / "configs" / "benchmark_digits.json"  # no tuned file: hand-chosen
    for extra, expected in (([], "tuned_digits_noisy.json"),
                            (["--config", str(ROOT / "configs" / "benchmark_digits_noisy.json")],
                             "benchmark_digits_noisy.json")):
        proc = benchmark_here("--methods", "GA", "--seeds", "1", "--scenarios", "random", "--emit-commands",
                              str(tmp_path / "cells.txt"), "--no-track", "--out", str(tmp_path / "out"), *extra,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "digits_noisy: hyper-parameters from" in proc.stdout and expected in proc.stdout, proc.stdout
        # Run from outside the checkout (tmp_path): the file is named by its absolute path, not "../../...".
        assert f"from {ROOT / 'configs'}" in proc.stdout and "../" not in proc.stdout, proc.stdout


def test_a_file_inside_the_working_directory_is_named_relative_to_it(monkeypatch, tmp_path):
    from benchmark import _shown

    monkeypatch.chdir(ROOT)
    assert _shown(ROOT / "configs" / "tuned_digits_noisy.json") == "configs/tuned_digits_noisy.json"
    assert _shown(tmp_path / "x.json") == str(tmp_path / "x.json")


def test_shipped_tuned_file_is_complete_and_loads():
    """Every registered configuration with a search space has a tuned entry for both scenarios, chosen from the
    space the provenance records (an lr of its design, an epoch within its maximum), and the provenance says how it
    was made."""
    shipped = ROOT / "configs" / "tuned_digits_noisy.json"
    payload = load_settings_file(shipped, "hyper-parameter file")
    provenance = payload["provenance"]
    # Made by the current protocol: its default budget, layout, held-out seeds and search spaces.
    assert provenance["criterion"] == "gap" and provenance["trials_per_method"] == DEFAULT_TRIALS
    assert provenance["select_tolerance"] == DEFAULT_SELECT_TOLERANCE
    assert provenance["trial_patience"] == DEFAULT_TRIAL_PATIENCE
    assert provenance["tune_seeds"] == list(DEFAULT_TUNE_SEEDS) == [101]
    assert provenance["tune_classes"] == list(DEFAULT_TUNE_CLASSES) == [3]
    assert provenance["tune_classes_of"] == {"101": 3}
    assert provenance["eval_seeds"] == {s: list(seeds) for s, seeds in DEFAULT_EVAL_SEEDS.items()}
    assert provenance["command"].startswith("python benchmark.py --tune --jobs 2")
    for config, entry in provenance["methods"].items():
        assert entry["trials"] == DEFAULT_TRIALS, config
    tuned_names = [n for n in match_methods(["*"]) if n != "retrain" and search_space(n)]
    for name in tuned_names:
        assert provenance["search_space"][name] == {flag: list(space) for flag, space in search_space(name).items()}
        scenarios = payload[name]["scenarios"]
        assert set(scenarios) == {"random", "classwise"}, name
        recorded = {flag: tuple(space) for flag, space in provenance["search_space"][name].items()}
        for values in scenarios.values():
            design = design_values(recorded, provenance["trials_per_method"],
                                   name in provenance.get("epochs_in_design", {}))
            searched = {flag for flag, space in recorded.items() if space[0] != "per_epoch"}
            assert {flag: values[flag] for flag in searched} in [{f: t[f] for f in searched} for t in design], name
            epochs = epochs_flag(name)
            if epochs is not None:
                assert 1 <= values[epochs] <= recorded[epochs][1], name


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and the end-to-end run
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--trials", "0"], "--trials"),
    (["--tune-seeds", "3", "101"], "also an evaluation seed"),
    (["--seeds", "1", "101", "--tune-seeds", "101"], "also an evaluation seed"),
    (["--tune-classes", "0", "--forget_classes", "0", "1"], "also an evaluation class"),
    (["--forget_class", "0"], "--tune draws one held-out class per seed"),
    (["--forget_classes", "10"], "has classes 0-9"),
    (["--tune-classes", "-1"], "--tune-classes"),
    (["--tune-classes", "3", "7", "8"], "--tune-classes 3 8: no tuning seed forgets it"),
    (["--select", "best"], "--select"),
    (["--select-tolerance", "-1"], "--select-tolerance"), (["--select-tolerance", "101"], "--select-tolerance"),
    (["--trial-patience", "-2"], "--trial-patience"), (["--trial-patience", "x"], "--trial-patience"),
    (["--scenarios", "backdoor"], "--tune supports the scenarios"),
    (["--config", "configs/benchmark_digits_noisy.json"], "--config cannot be combined"),
])
def test_bad_tune_input_is_one_line_before_any_work(tmp_path, argv, message):
    proc = benchmark_here("--tune", "--no-track", "--out", str(tmp_path / "out"), *argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("argv", [["--trials", "3"], ["--select", "gap"], ["--tune-seeds", "9"],
                                  ["--no-compare-select"], ["--select-tolerance", "0.2"], ["--trial-patience", "4"]])
def test_tune_flags_need_tune(tmp_path, argv):
    proc = benchmark_here(*argv, "--no-track", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and f"{argv[0].replace('--no-', '--')} needs --tune" in proc.stderr, proc.stderr


# One masked configuration (VarGrad), 2 trials, one tuning seed and class; 6 held-out seeds, the fewest with which the
# paired test can reach p < 0.05. Class-wise, seed s forgets the s-th class of the pool 0 1 2 4 5 6 ... (no 3).
TINY_TUNE = ["--tune", "--datasets", "digits", "--epochs", "2", "--width", "4", "--methods", "VarGrad",
             "--trials", "2", "--seeds", "1", "2", "3", "4", "5", "6", "--tune-seeds", "11", "--tune-classes", "3",
             "--epoch-eval", "none", "--jobs", "2", "--no-progress", "--out", "out"]
TINY_EVAL_CLASSES = {1: 0, 2: 1, 3: 2, 4: 4, 5: 5, 6: 6}


@pytest.fixture(scope="module")
def tiny_tune(tmp_path_factory):
    """TINY_TUNE, tracked (the trials evaluate every epoch whatever --epoch-eval says; the held-out cells do not)."""
    cwd = tmp_path_factory.mktemp("tune")
    return cwd, benchmark(*TINY_TUNE, cwd=cwd, timeout=1200)  # the whole protocol: a guard against a hang, not a budget


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_tune_end_to_end(tiny_tune):
    cwd, proc = tiny_tune
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = cwd / "out"
    tuned = json.loads((out / "tuned.json").read_text())
    assert set(tuned) == {"VarGrad", "provenance"}
    provenance = tuned["provenance"]
    assert provenance["criterion"] == "gap" and provenance["trials_per_method"] == 2
    assert provenance["select_tolerance"] == DEFAULT_SELECT_TOLERANCE
    assert provenance["trial_patience"] == DEFAULT_TRIAL_PATIENCE
    assert provenance["tune_seeds"] == [11] and provenance["tune_classes"] == [3]
    assert provenance["eval_classes"] == {str(seed): c for seed, c in TINY_EVAL_CLASSES.items()}
    assert provenance["units"]["tuning"]["classwise"] == {"11": {"train_seed": 11, "forget_classes": [3]}}
    assert provenance["units"]["evaluation"]["classwise"] == {
        str(seed): {"train_seed": seed, "forget_classes": [c]} for seed, c in TINY_EVAL_CLASSES.items()}
    assert provenance["search_space"]["VarGrad"]["unlearn_lr"] == list(search_space("VarGrad")["unlearn_lr"])
    # Where each choice ended: a flag per dimension on an edge of what was tried (2 trials: both lrs are edges).
    on_edge = provenance["methods"]["VarGrad"]["on_edge"]
    assert set(on_edge) == {"random", "classwise"}
    assert all(edge.get("unlearn_lr") in ("low", "high") for edge in on_edge.values())
    assert all((out / "tune" / f"sensitivity_{s}.png").stat().st_size > 0 for s in ("random", "classwise"))

    # The budget, counted from what ran: 2 trials x 1 seed x (1 random + 1 class).
    sweep = json.loads((out / "tune" / "sweep.json").read_text())
    counts = Counter(" ".join(c["names"]) for c in sweep["cells"].values() if c["kind"] == "method")
    assert counts == {"VarGrad": 4}
    for cell in (c for c in sweep["cells"].values() if c["kind"] == "method"):  # a trial may end on a plateau
        argv = cell["argv"]
        assert argv[argv.index("--stop-patience") + 1] == str(DEFAULT_TRIAL_PATIENCE)
        assert argv[argv.index("--stop-tolerance") + 1] == str(DEFAULT_SELECT_TOLERANCE)
    assert all(t["status"] == "ok" for t in sweep["timings"].values())

    # The shipped values are a trial's learning rate and an epoch its curves reached, and the held-out cells ran them.
    for name, max_epochs in (("VarGrad", MAX_TUNED_EPOCHS),):
        for values in tuned[name]["scenarios"].values():
            assert {"unlearn_lr": values["unlearn_lr"], "unlearn_epochs": max_epochs} in trial_values(name, 2)
            assert 1 <= values["unlearn_epochs"] <= max_epochs
    held_out = json.loads((out / "sweep.json").read_text())
    ran = [c for c in held_out["cells"].values() if c["kind"] == "method"]
    assert {c["seed"] for c in held_out["cells"].values()} == set(TINY_EVAL_CLASSES)
    for cell in ran:
        values = tuned[cell["names"][0]]["scenarios"][cell["scenario"]]
        argv = cell["argv"]
        assert argv[argv.index("--unlearn_lr") + 1] == str(values["unlearn_lr"])
        assert argv[argv.index("--unlearn_epochs") + 1] == str(values["unlearn_epochs"])

    # Each held-out seed is its own replication: its initialisation, and class-wise its own class, in every result.
    for path in (out / "cells").glob("*.json"):
        result = json.loads(path.read_text())
        if "args" not in result:
            continue
        args = result["args"]
        assert args["train_seed"] == args["seed"], path
        if args["class_to_replace"] >= 0:
            assert args["class_to_replace"] == TINY_EVAL_CLASSES[args["seed"]], path

    results = (out / "results.md").read_text()
    assert "seed 4 -> class 4" in results
    assert "selected by `--select gap` from 2 trials per method on seeds 11 and classes 3" in results
    comparison = (out / "select_comparison.md").read_text()
    assert "## Selection rules on the held-out cells" in comparison and "| VarGrad | random |" in comparison
    assert (out / "results_select_retrain_free.md").is_file()
    assert "tuning:" in proc.stdout and "held-out evaluation:" in proc.stdout

    # One mlflow parent run; tuning and evaluation cells are its nested children.
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmark-digits")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    # runs are named <method>-<setting>-seed<n>
    seeds = Counter(r.info.run_name.rsplit("-seed", 1)[-1] for r in children)
    # Tuning trials and held-out cells under the one parent.
    assert seeds["11"] >= 4 and all(seeds[str(s)] >= 4 for s in TINY_EVAL_CLASSES), seeds


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_tune_second_invocation_recomputes_nothing(tiny_tune):
    cwd, _ = tiny_tune
    proc = benchmark(*TINY_TUNE, "--no-track", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "computed 0 cell(s)" in proc.stdout


def test_pooled_class_wise_rows_name_every_forgotten_class(tmp_path):
    """A held-out class-wise row pools classes 0, 1, 2: the table's heading and the row's setting name all three."""
    from sweep.grid import Cell
    from sweep.report import aggregate, markdown_table

    cells = []
    for forget_class in (0, 1, 2):
        cell = Cell("method", f"k{forget_class}", "digits", "resnet18", "classwise", 1, [], names=["GA"], label="GA",
                    setting=f"class{forget_class}")
        cell.result_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        cell.result_path(tmp_path).write_text(json.dumps({"args": {}, "RTE_seconds": 1.0, "UA": float(forget_class),
                                                          "avg_gap": 1.0}))
        cells.append(cell)
    (row,) = aggregate(cells, tmp_path)
    assert row["setting"] == "class0 class1 class2" and row["UA_mean"] == 1.0
    assert "### digits, resnet18, classwise forgetting (class0, class1, class2)" in markdown_table([row], [], [1])
