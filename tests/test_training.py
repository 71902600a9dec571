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
