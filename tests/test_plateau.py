"""Cheaper tuning without a different answer: a trial ends once its selection scores stop improving (`PlateauStop`,
`--stop-patience`), and the choice is the fewest epochs among the candidates whose score is within noise of the
best (`select(..., tolerance)`), with a plateau of exactly equal scores resolved away from the design's ends."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import dataset
from conftest import TINY, run_main
from evaluation.selection import PlateauStop, available_scores, selection_score
from models import create_model
from sweep.grid import build_cells, cell_key, parse_cell
from sweep.settings import Settings
from sweep.tune import select
from unlearn import UnlearnContext, declared_flags, resolve_hyperparameters, resolve_method, run_unlearning
from utils import make_generator

# ---------------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------------


def _entry(gap: float | None = None, forget: float = 10.0, retain: float = 100.0, val: float = 90.0) -> dict:
    entry = {"accuracy": {"forget": forget, "retain": retain, "val": val}}
    if gap is not None:
        entry["val_gap"] = gap
    return entry


def test_selection_scores_by_hand():
    entry = _entry(gap=3.25, forget=80.0, retain=98.5, val=88.0)
    assert selection_score(entry, "random", "gap") == 3.25
    assert selection_score(entry, "random", "retrain_free") == pytest.approx(8.0 + 1.5)  # |80 - 88| + (100 - 98.5)
    assert selection_score(entry, "classwise", "retrain_free") == pytest.approx(80.0 + 1.5)  # target 0 class-wise
    assert available_scores(_entry(), "random") == {"retrain_free": pytest.approx(80.0)}  # no Retrain: no gap
    with pytest.raises(ValueError, match="no val_gap"):
        selection_score(_entry(), "random", "gap")
    with pytest.raises(ValueError, match="unknown selection criterion"):
        selection_score(entry, "random", "closest")


# ---------------------------------------------------------------------------------------------------------------------
# The plateau rule
# ---------------------------------------------------------------------------------------------------------------------

def _stops_at(scores: list[float], patience: int, tolerance: float) -> int | None:
    """The epoch at which PlateauStop ends a run whose gap is `scores` (the Retrain-free score held constant)."""
    rule = PlateauStop(patience, tolerance, "random")
    for epoch, score in enumerate(scores, start=1):
        if rule.update(epoch, _entry(gap=score, forget=90.0, val=90.0)):
            return epoch
    return None


def test_plateau_stop_by_hand():
    # The Retrain-free score is 0 at every epoch: it last improved at epoch 1, so only the gap decides.
    assert _stops_at([5, 4, 3, 2, 1], patience=2, tolerance=0.0) is None  # still improving
    assert _stops_at([5, 4, 4, 4, 4], patience=2, tolerance=0.0) == 4  # last improvement at epoch 2
    assert _stops_at([5, 4, 4, 4, 4], patience=3, tolerance=0.0) == 5
    # Steps smaller than the tolerance lower the best score but do not restart the count ...
    assert _stops_at([5.0, 4.8, 4.6, 4.4, 4.2], patience=3, tolerance=0.5) == 4
    # ... a step larger than the tolerance does (epoch 3 improves by 1.0 on 5.0).
    assert _stops_at([5.0, 4.8, 4.0, 3.9, 3.8, 3.7], patience=3, tolerance=0.5) == 6
    # A rise is no improvement; a non-finite score is skipped.
    assert _stops_at([2.0, 9.0, math.nan, 9.0], patience=3, tolerance=0.0) == 4


def test_plateau_stop_waits_for_every_criterion():
    rule = PlateauStop(2, 0.0, "random")
    # gap flat from epoch 1; the Retrain-free score (|forget - val|) keeps improving until epoch 3.
    forgets = [50.0, 60.0, 70.0, 70.0, 70.0]
    stops = [rule.update(epoch, _entry(gap=1.0, forget=f, val=90.0)) for epoch, f in enumerate(forgets, start=1)]
    assert stops == [False, False, False, False, True]


def _split_data():
    full = dataset.load_dataset("digits")
    small = dataset.ImageData(full.name, full.train_images[:160], full.train_labels[:160], full.test_images[:40],
                              full.test_labels[:40], full.num_classes, full.mean, full.std, full.augment)
    return dataset.SplitData(small, dataset.make_split(small, -1, 20, seed=1), batch_size=32)


def _run(name: str, epochs: int, stop_after: int | None, data, start):
    resolved = resolve_method(name)
    flags = {hp.name: flag for flag, hp in declared_flags().items()}
    hp = resolve_hyperparameters(resolved, {flags["epochs"]: epochs}, "digits", recipe={"batch_size": 32})
    torch.manual_seed(0)
    ctx = UnlearnContext(model=copy.deepcopy(start), data=data, generator=make_generator(0), hp=hp, progress=False,
                         log=lambda message: None)
    method = resolved.cls(ctx)
    method.name = name
    seen = []

    def on_epoch(epoch, model, stats, rte):
        seen.append(epoch)
        return stop_after is not None and epoch >= stop_after

    outcome = run_unlearning(method, epochs, on_epoch=on_epoch, progress=False)
    return outcome, seen, {k: v.detach().clone() for k, v in method.evaluation_model().state_dict().items()}


def test_a_run_the_hook_stops_is_the_fresh_run_of_that_length():
    torch.manual_seed(0)
    start = create_model("resnet20s", 10, in_channels=1, width=4)
    data = _split_data()
    stopped, seen, stopped_state = _run("NGPlus", 5, 2, data, start)
    assert seen == [1, 2] and stopped.epochs_run == 2 and len(stopped.epoch_stats) == 2
    fresh, _, fresh_state = _run("NGPlus", 2, None, data, start)
    assert fresh.epochs_run == 2
    assert all(torch.equal(stopped_state[k], fresh_state[k]) for k in fresh_state)
    untouched, _, _ = _run("NGPlus", 3, None, data, start)
    assert untouched.epochs_run == 3  # a hook that returns nothing never stops a run


# ---------------------------------------------------------------------------------------------------------------------
# --stop-patience on the command line
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_forget_stops_on_a_plateau_and_ships_that_epoch(tiny_models, tmp_path):
    save = tiny_models(*TINY, "--seed", "1")
    common = [*TINY, "--seed", "1", "--save_dir", str(save), "--no-track", "--no-save-model", "--unlearn", "NGPlus"]
    # Tolerance 100 points: no epoch after the first counts as an improvement, so patience 1 ends the run at epoch 2.
    stopped_json, fresh_json = tmp_path / "stopped.json", tmp_path / "fresh.json"
    proc = run_main("mlflow_forget.py", *common, "--unlearn_epochs", "6", "--stop-patience", "1",
                    "--stop-tolerance", "100", "--result_json", str(stopped_json))
    assert proc.returncode == 0, proc.stderr
    stopped = json.loads(stopped_json.read_text())
    assert stopped["epochs_run"] == 2 and [e["epoch"] for e in stopped["curves"]] == [1, 2]
    assert stopped["hyperparameters"]["epochs"] == 6  # what was asked; epochs_run is what ran
    proc = run_main("mlflow_forget.py", *common, "--unlearn_epochs", "2", "--result_json", str(fresh_json))
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(fresh_json.read_text())
    for key in ("UA", "RA", "TA", "MIA_efficacy", "accuracy"):
        assert stopped[key] == fresh[key], key


# ---------------------------------------------------------------------------------------------------------------------
# Sweep cells
# ---------------------------------------------------------------------------------------------------------------------

def _cells(tmp_path, patience: int, methods=("NGPlus", "FT_l1", "SSD")):
    settings = Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random"], methods=list(methods), seeds=[1],
                        out=tmp_path, epochs=2, unlearn_epochs=3, width=4, stop_patience=patience,
                        stop_tolerance=0.5)
    cells, _ = build_cells(settings)
    return {cell.names[0]: cell for cell in cells if cell.kind == "method"}


def test_only_cells_that_can_stop_early_get_the_stop_flags(tmp_path):
    cells = _cells(tmp_path, patience=4)
    assert cells["NGPlus"].argv[cells["NGPlus"].argv.index("--stop-patience") + 1] == "4"
    assert cells["NGPlus"].argv[cells["NGPlus"].argv.index("--stop-tolerance") + 1] == "0.5"
    # Horizon-dependent (its schedule spans the run) and one-shot (no epochs): every epoch runs.
    assert "--stop-patience" not in cells["FT_l1"].argv and "--stop-patience" not in cells["SSD"].argv


def test_the_stop_flags_change_a_cells_key_only_when_on(tmp_path):
    off, on = _cells(tmp_path, patience=0), _cells(tmp_path, patience=4)
    assert "--stop-patience" not in off["NGPlus"].argv
    assert off["NGPlus"].key != on["NGPlus"].key and off["FT_l1"].key == on["FT_l1"].key
    # Patience 0 given explicitly is the run without the flags: the same key, so earlier out dirs keep their cells.
    argv = off["NGPlus"].argv
    explicit = parse_cell([*argv, "--stop-patience", "0"])
    config = {"class": "NGPlus", "grad_mask": None, "hp": dict(explicit.method.hp)}
    assert cell_key("method", explicit, config) == cell_key("method", parse_cell(argv), config)


# ---------------------------------------------------------------------------------------------------------------------
# Selection within a tolerance
# ---------------------------------------------------------------------------------------------------------------------

def _trial(*gaps: float) -> list[dict]:
    """One tuning cell whose gap at epoch e is gaps[e - 1]."""
    return [{"curves": [{"epoch": e, **_entry(gap=g)} for e, g in enumerate(gaps, start=1)]}]


def test_the_fewest_epochs_within_the_tolerance_win():
    trials = [_trial(3.0, 2.0, 1.0), _trial(1.4, 1.2, 1.1)]
    assert select(trials, "random", "gap") == (0, 3, 1.0)  # the plain argmin
    assert select(trials, "random", "gap", tolerance=0.5) == (1, 1, 1.4)  # 1.4 <= 1.0 + 0.5, one epoch
    assert select(trials, "random", "gap", tolerance=0.3) == (1, 2, 1.2)
    # Among the candidates with the fewest epochs, the lowest score.
    assert select([_trial(1.3, 9.0), _trial(1.1, 9.0), _trial(9.0, 1.0)], "random", "gap", tolerance=0.5) == \
        (1, 1, 1.1)


def test_an_exact_plateau_goes_away_from_the_ends_of_the_design():
    flat = [_trial(0.0), _trial(0.0), _trial(0.0), _trial(5.0), _trial(7.0), _trial(9.0), _trial(9.5), _trial(9.9)]
    assert select(flat, "random", "gap") == (2, 1, 0.0)  # trials 1-3 tie: the one farthest from the ends
    top = [_trial(9.0)] * 6 + [_trial(0.0), _trial(0.0)]
    assert select(top, "random", "gap") == (6, 1, 0.0)
    assert select([_trial(1.0), _trial(1.0)], "random", "gap") == (0, 1, 1.0)  # equally far: the earlier trial


# ---------------------------------------------------------------------------------------------------------------------
# The Retrain evaluation, once per process
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_retrain_model_is_evaluated_once_per_process_and_again_when_its_file_changes(tiny_models):
    import os

    from arg_parser import parse_config
    from pipeline.stages import prepare, retrain_evaluation

    save = tiny_models(*TINY, "--seed", "1", retrain=True)
    argv = [*TINY, "--seed", "1", "--save_dir", str(save), "--unlearn", "FT", "--no-track"]

    def evaluated():
        return retrain_evaluation(prepare(parse_config(argv, "mlflow_forget.py"), announce=False))

    first, path = evaluated()
    assert first is not None and path is not None
    again, _ = evaluated()
    assert again is first, "a second run in the same process reuses the evaluation"
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a new version of the file
    fresh, _ = evaluated()
    assert fresh is not first and fresh.accuracy == first.accuracy and fresh.svc == first.svc
    assert (fresh.forget_predictions == first.forget_predictions).all()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert evaluated()[0] is not fresh, "another thread count is another evaluation"
    finally:
        torch.set_num_threads(threads)


def test_a_checkpoint_is_read_once_per_process_and_again_when_its_file_changes(tmp_path, monkeypatch):
    import os

    import pipeline.stages as stages
    from utils import atomic_torch_save

    path = tmp_path / "model.pth.tar"
    atomic_torch_save(path, {"state_dict": {"w": torch.ones(2)}, "epoch": 3})
    reads = []
    real = stages.load_checkpoint
    monkeypatch.setattr(stages, "load_checkpoint", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(stages, "_CHECKPOINTS", {})
    first = stages.read_checkpoint(path)
    first["epoch"] = 99  # the caller's own dict
    second = stages.read_checkpoint(path)
    assert len(reads) == 1 and second["epoch"] == 3 and torch.equal(second["state_dict"]["w"], torch.ones(2))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a new version of the file
    assert stages.read_checkpoint(path)["epoch"] == 3 and len(reads) == 2
    atomic_torch_save(path, {"state_dict": {"w": torch.zeros(2)}, "epoch": 4})  # rewritten: a new inode
    assert stages.read_checkpoint(path)["epoch"] == 4 and len(reads) == 3
    with pytest.raises(Exception, match="does not exist"):
        stages.read_checkpoint(tmp_path / "missing.pth.tar")
