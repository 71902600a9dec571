"""Training loop, exact resume, weights-only checkpoints (a crafted pickle must never run)."""
import os

import pytest
import torch

from dataset import SplitData, load_dataset, make_split
from models import create_model
from training import TrainRecipe, parse_milestones, train_model
from utils import UserError, atomic_torch_save, load_checkpoint


@pytest.fixture(scope="module")
def splits():
    data = load_dataset("digits")
    return SplitData(data, make_split(data, -1, 50, seed=1), batch_size=128)


def _model(seed=1):
    torch.manual_seed(seed)
    return create_model("resnet20s", 10, in_channels=1, width=4)


def test_lr_schedule_matches_multisteplr():
    recipe = TrainRecipe(epochs=10, lr=0.1, milestones=(3, 6))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 6], gamma=0.1)
    for epoch in range(10):
        assert recipe.lr_at(epoch) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert TrainRecipe(lr=0.1, warmup=2).lr_at(0) == pytest.approx(0.05)
    assert parse_milestones("91,136") == (91, 136) and parse_milestones("") == ()
    with pytest.raises(UserError):
        parse_milestones("a,b")


def test_training_learns_and_is_deterministic(splits):
    recipe = TrainRecipe(epochs=3, lr=0.05, batch_size=64, milestones=(2,))
    a = train_model(_model(), splits, recipe, seed=3, progress=False)
    b = train_model(_model(), splits, recipe, seed=3, progress=False)
    assert a.history["train_acc"][-1] > 50.0
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert a.best_epoch >= 1 and a.best_val == max(a.history["val_acc"])


def test_resume_equals_uninterrupted(splits, tmp_path):
    recipe = TrainRecipe(epochs=4, lr=0.05, batch_size=64, milestones=(2,))
    full = train_model(_model(), splits, recipe, seed=5, progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_two(epoch, stats):
        if epoch == 2:
            raise Interrupt

    last = tmp_path / "last.pth.tar"
    with pytest.raises(Interrupt):
        train_model(_model(), splits, recipe, seed=5, last_checkpoint=last, progress=False, on_epoch=stop_after_two)
    assert load_checkpoint(last)["epoch"] == 2
    resumed = train_model(_model(seed=99), splits, recipe, seed=5, last_checkpoint=last, resume=True, progress=False)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.history == full.history


def test_checkpoint_roundtrip_weights_only(tmp_path):
    model = _model()
    path = atomic_torch_save(tmp_path / "m.pth.tar", {"state_dict": model.state_dict(), "arch": "resnet20s", "epoch": 3,
                                                      "accuracy": {"test": 90.5}})
    payload = torch.load(path, weights_only=True)
    assert payload["arch"] == "resnet20s" and payload["accuracy"]["test"] == 90.5
    restored = _model(seed=2)
    restored.load_state_dict(load_checkpoint(path)["state_dict"])
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())


class _Payload:
    """Unpickling this would create a marker file: the loader must refuse before running it."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "x": _Payload()}, path)
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth.tar"
    junk.write_text("hello")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth.tar")
    torch.save({"weights": 1}, tmp_path / "other.pth.tar")
    with pytest.raises(UserError, match="no 'state_dict'"):
        load_checkpoint(tmp_path / "other.pth.tar")


# ---------------------------------------------------------------------------------------------------------------------
# A resume continues only a checkpoint trained with the requested settings
# ---------------------------------------------------------------------------------------------------------------------

META = {"kind": "original", "arch": "resnet20s", "dataset": "digits", "num_classes": 10, "in_channels": 1, "width": 4,
        "seed": 1, "train_seed": 1, "epochs": 2, "split_hash": None, "split_tag": None, "torch_version": "2.0.0"}
RECIPE = TrainRecipe(epochs=2, lr=0.05, batch_size=64, milestones=(1,))


@pytest.fixture(scope="module")
def rolling(splits, tmp_path_factory):
    """A finished 2-epoch run's rolling checkpoint (resuming it trains nothing more)."""
    path = tmp_path_factory.mktemp("rolling") / "last.pth.tar"
    train_model(_model(), splits, RECIPE, seed=1, last_checkpoint=path, metadata=META, progress=False)
    return path


def _unchanged(path):
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize("change,key", [
    ({"metadata": {"dataset": "digits_noisy"}}, "dataset"),
    ({"metadata": {"train_seed": 2}}, "train_seed"),
    ({"metadata": {"split_hash": "abc", "kind": "retrain"}}, "kind"),
    ({"recipe": {"lr": 0.1}}, "recipe.lr"),
    ({"recipe": {"milestones": (2,)}}, "recipe.milestones"),
    ({"recipe": {"weight_decay": 0.0}}, "recipe.weight_decay"),
    ({"recipe": {"batch_size": 32}}, "recipe.batch_size"),
    ({"seed": 2}, "shuffle_seed"),
    ({"part": "retain"}, "train_part"),
])
def test_resume_refuses_other_settings_and_touches_nothing(splits, rolling, change, key):
    before = _unchanged(rolling)
    recipe = TrainRecipe(**{**RECIPE.__dict__, **change.get("recipe", {})})
    with pytest.raises(UserError) as info:
        train_model(_model(), splits, recipe, seed=change.get("seed", 1), part=change.get("part", "train"),
                    last_checkpoint=rolling, resume=True, metadata={**META, **change.get("metadata", {})},
                    progress=False)
    message = str(info.value)
    assert "\n" not in message and f"{key}=" in message and str(rolling) in message
    assert message.index(f" {key}=") < message.index("this run requests")  # the recorded value, then the requested one
    assert _unchanged(rolling) == before


def test_resume_checks_the_data_even_when_the_caller_records_nothing(splits, tmp_path):
    """Dataset, trained indices and augmentation are compared from the data itself, not only from the metadata."""
    import dataclasses

    cropped = dataclasses.replace(splits.data, augment="crop_flip")
    augmented = SplitData(cropped, splits.split, batch_size=128)
    last = tmp_path / "last.pth.tar"
    train_model(_model(), augmented, RECIPE, seed=1, part="retain", last_checkpoint=last, progress=False)
    noisy = load_dataset("digits_noisy")
    for data, key in ((SplitData(cropped, make_split(cropped, -1, 50, seed=2), batch_size=128), "train_indices"),
                      (SplitData(cropped, splits.split, batch_size=128, augment=False), "train_augment"),
                      (SplitData(noisy, make_split(noisy, -1, 50, seed=1), batch_size=128), "train_dataset")):
        with pytest.raises(UserError, match=f"{key}="):
            train_model(_model(), data, RECIPE, seed=1, part="retain", last_checkpoint=last, resume=True,
                        progress=False)


def test_resume_ignores_volatile_keys(splits, rolling):
    result = train_model(_model(), splits, RECIPE, seed=1, last_checkpoint=rolling, resume=True,
                         metadata={**META, "torch_version": "9.9", "git_commit": "abc"}, progress=False)
    assert len(result.history["train_loss"]) == RECIPE.epochs


def test_resume_with_a_model_that_does_not_fit_is_a_user_error(splits, rolling):
    before = _unchanged(rolling)
    wider = create_model("resnet20s", 10, in_channels=1, width=8)
    caller_without_width = {k: v for k, v in META.items() if k != "width"}
    with pytest.raises(UserError, match="do not fit"):
        train_model(wider, splits, RECIPE, seed=1, last_checkpoint=rolling, resume=True,
                    metadata=caller_without_width, progress=False)
    assert _unchanged(rolling) == before


def test_resume_refuses_a_checkpoint_without_recorded_settings(splits, rolling, tmp_path):
    legacy = tmp_path / "legacy.pth.tar"
    payload = load_checkpoint(rolling)
    del payload["resume_settings"]
    atomic_torch_save(legacy, payload)
    with pytest.raises(UserError, match="does not record the settings"):
        train_model(_model(), splits, RECIPE, seed=1, last_checkpoint=legacy, resume=True, metadata=META,
                    progress=False)


def test_resumed_run_reports_the_total_training_time(splits, tmp_path):
    recipe = TrainRecipe(epochs=3, lr=0.05, batch_size=64, milestones=(2,))
    last = tmp_path / "last.pth.tar"

    class Interrupt(Exception):
        pass

    def stop_after_two(epoch, stats):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_model(_model(), splits, recipe, seed=5, last_checkpoint=last, metadata=META, progress=False,
                    on_epoch=stop_after_two)
    payload = load_checkpoint(last)
    assert payload["elapsed_seconds"] > 0
    # Pretend the first two epochs took 1000 s, so the total cannot be mistaken for the third epoch's time alone.
    atomic_torch_save(last, {**payload, "elapsed_seconds": 1000.0})
    resumed = train_model(_model(), splits, recipe, seed=5, last_checkpoint=last, resume=True, metadata=META,
                          progress=False)
    assert 1000.0 < resumed.seconds < 1100.0
    assert load_checkpoint(last)["elapsed_seconds"] == pytest.approx(resumed.seconds)
