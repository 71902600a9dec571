"""The Retrain model a run uses is the one of its full recipe, checked from the settings its checkpoint records; and a
reference model's checkpoint, which marks it as done, is written after its summary and curve plot."""
from __future__ import annotations

import pytest
import torch

from arg_parser import parse_config
from conftest import TINY
from pipeline import paths, stages
from pipeline.stages import ensure_original, ensure_retrain, find_retrain_checkpoint, prepare, stale_retrain_note
from sweep.grid import Cell, is_done
from utils import atomic_torch_save, load_checkpoint

FORGET = ["--class_to_replace", "-1", "--num_indexes_to_replace", "50", "--seed", "1", "--unlearn", "FT"]


def prepared(save_dir, *extra):
    return prepare(parse_config([*TINY, *FORGET, "--save_dir", str(save_dir), *extra], "mlflow_forget.py"),
                   announce=False)


def retrain_cell(save_dir, *extra) -> Cell:
    argv = [*TINY, *FORGET, "--save_dir", str(save_dir), *extra]
    return Cell(kind="retrain", key="r", dataset="digits", arch="resnet18", scenario="random", seed=1, argv=argv,
                split_tag=prepared(save_dir, *extra).split.tag)


@pytest.mark.slow
def test_a_retrain_of_another_recipe_is_trained_again_never_reused(tmp_path, one_thread):
    first = prepared(tmp_path, "--epochs", "3")
    assert ensure_retrain(first) is True
    ep3 = find_retrain_checkpoint(first)
    assert ep3 is not None and ensure_retrain(prepared(tmp_path, "--epochs", "3")) is False  # same recipe: reused
    assert is_done(retrain_cell(tmp_path, "--epochs", "3"), tmp_path)

    longer = prepared(tmp_path, "--epochs", "4")  # the case of the report: --epochs 3, then --epochs 4
    assert find_retrain_checkpoint(longer) is None and not is_done(retrain_cell(tmp_path, "--epochs", "4"), tmp_path)
    assert ensure_retrain(longer) is True
    assert load_checkpoint(find_retrain_checkpoint(longer))["epochs"] == 4

    # Same file name, another learning rate: the file is not this run's; it is retrained in place.
    other_lr = prepared(tmp_path, "--epochs", "3", "--lr", "0.07")
    assert find_retrain_checkpoint(other_lr) is None
    assert "lr=0.05" in stale_retrain_note(other_lr) and "lr=0.07" in stale_retrain_note(other_lr)
    assert not is_done(retrain_cell(tmp_path, "--epochs", "3", "--lr", "0.07"), tmp_path)
    assert ensure_retrain(other_lr) is True and find_retrain_checkpoint(other_lr) == ep3
    assert find_retrain_checkpoint(prepared(tmp_path, "--epochs", "3")) is None  # now the 0.05 one is stale

    # Seeds count too: another initialisation seed is another model.
    assert find_retrain_checkpoint(prepared(tmp_path, "--epochs", "3", "--lr", "0.07", "--train_seed", "5")) is None


def test_a_retrain_written_before_settings_were_recorded_is_judged_by_its_metadata(tmp_path):
    p = prepared(tmp_path, "--epochs", "3")
    path = paths.retrain_model(p.save_dir, p.config.data, p.config.model, p.split.tag)
    state = stages.build_model(p, p.config.model.width).state_dict()
    legacy = stages.retrain_metadata(p)
    atomic_torch_save(path, {**legacy, "state_dict": state})
    assert find_retrain_checkpoint(prepared(tmp_path, "--epochs", "3")) == path
    atomic_torch_save(path, {**legacy, "split_hash": "0" * 16, "state_dict": state})  # another split's model
    assert find_retrain_checkpoint(prepared(tmp_path, "--epochs", "3")) is None
    atomic_torch_save(path, {**legacy, "state_dict": state})
    assert find_retrain_checkpoint(prepared(tmp_path, "--epochs", "3", "--momentum", "0.5")) is None
    atomic_torch_save(path, {"state_dict": state})  # a bare state_dict: nothing to check it against
    assert find_retrain_checkpoint(prepared(tmp_path, "--epochs", "3")) is None


class Killed(BaseException):
    """Stands for kill -9 at the moment the checkpoint is written."""


@pytest.mark.slow
def test_companion_files_are_written_before_the_checkpoint(tmp_path, monkeypatch, one_thread):
    p = prepared(tmp_path, "--epochs", "2")
    path = paths.model_to_unlearn(p.config)
    real_save = stages.atomic_torch_save

    def killed_at_the_checkpoint(target, obj):
        if str(target) == str(path):
            raise Killed()
        return real_save(target, obj)

    monkeypatch.setattr(stages, "atomic_torch_save", killed_at_the_checkpoint)
    with pytest.raises(Killed):
        ensure_original(p, path)
    assert paths.companion(path, ".json").is_file() and paths.companion(path, ".png").is_file()
    assert not path.exists()  # not done: the next run trains it again
    monkeypatch.setattr(stages, "atomic_torch_save", real_save)
    assert ensure_original(p, path) is True and path.is_file()
    assert load_checkpoint(path)["train_settings"]["recipe.epochs"] == 2
    assert torch.load(path, weights_only=True)["state_dict"]
