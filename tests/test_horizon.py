"""The horizon property: the run that is shipped is the run that was scored.

`benchmark.py --tune` reads a method's epoch count off the per-epoch curves of one long run. That is only sound when
the model evaluated at epoch e of a longer run is exactly the model a fresh e-epoch run ships (its `finish` included).
Every registered iterative method either has that property, checked here bit for bit on a tiny model, or declares
itself horizon-dependent (`horizon_dependent`, with its reason); then the check shows the declaration is needed, and the
tuner makes its epoch count a dimension of the design instead of reading it off the curves.
"""
from __future__ import annotations

import copy

import pytest
import torch

import dataset
from models import create_model
from sweep.tune import epochs_flag, horizon_dependent, search_space, trial_values
from unlearn import (
    UnlearnContext,
    UnlearnMethod,
    declared_flags,
    list_methods,
    resolve_hyperparameters,
    resolve_method,
    run_unlearning,
)
from unlearn.common import MAX_TUNED_EPOCHS
from unlearn.registry import register_method
from utils import make_generator

ITERATIVE = [name for name in list_methods() if not resolve_method(name).cls.one_shot]
LONG = 3  # the longer run; fresh runs of 1 and 2 epochs are compared with its epochs 1 and 2
# Milestone 2: the step size drops after epoch 1 inside the compared horizon, so a schedule over the run's length (a
# MultiStepLR-like schedule that read E) would show up here too.
SCHEDULE = {"decreasing_lr": "2"}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def split_data():
    full = dataset.load_dataset("digits")
    small = dataset.ImageData(full.name, full.train_images[:160], full.train_labels[:160], full.test_images[:40],
                              full.test_labels[:40], full.num_classes, full.mean, full.std, full.augment)
    return dataset.SplitData(small, dataset.make_split(small, -1, 20, seed=1), batch_size=32)


@pytest.fixture(scope="module")
def start_model():
    torch.manual_seed(0)
    return create_model("resnet20s", 10, in_channels=1, width=4)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def run(name: str, epochs: int, data, start) -> tuple[dict[int, dict], dict]:
    """(epoch -> state of the model handed to the per-epoch evaluation, state of the model the run ships)."""
    resolved = resolve_method(name)
    flags = {hp.name: flag for flag, hp in declared_flags().items()}
    user = {"epochs": epochs, **{k: v for k, v in SCHEDULE.items() if k in {hp.name for hp in resolved.cls.hparams}}}
    # The digits defaults: tuned on these datasets, they move a small model without diverging.
    hp = resolve_hyperparameters(resolved, {flags[k]: v for k, v in user.items()}, "digits",
                                 recipe={"batch_size": data.batch_size})
    model = copy.deepcopy(start)
    torch.manual_seed(0)
    ctx = UnlearnContext(model=model, data=data, generator=make_generator(0), hp=hp, progress=False,
                         log=lambda message: None)
    method = resolved.cls(ctx)
    method.name = name
    evaluated: dict[int, dict] = {}
    run_unlearning(method, epochs, progress=False,
                   on_epoch=lambda epoch, eval_model, stats, rte: evaluated.__setitem__(epoch, _snapshot(eval_model)))
    return evaluated, _snapshot(method.evaluation_model())


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", ITERATIVE)
def test_epoch_e_of_a_longer_run_is_the_fresh_e_epoch_run(name, split_data, start_model):
    long_evaluated, long_shipped = run(name, LONG, split_data, start_model)
    assert not same_state(long_evaluated[1], _snapshot(start_model)), "the run left the model unchanged: no test"
    assert same_state(long_evaluated[LONG], long_shipped), "the last curve point is not the shipped model"
    matches = []
    for epochs in range(1, LONG):
        fresh_evaluated, fresh_shipped = run(name, epochs, split_data, start_model)
        assert same_state(fresh_evaluated[epochs], fresh_shipped)
        matches.append(same_state(long_evaluated[epochs], fresh_shipped))
    if horizon_dependent(name):
        # The declaration is needed: some epoch of the longer run is not what the shorter run ships ...
        assert not all(matches), f"{name} declares itself horizon-dependent but reproduces every shorter run"
    else:
        # ... and without it, every epoch of the longer run is exactly the fresh run, finish() included.
        assert all(matches), f"{name}: epoch e of a {LONG}-epoch run differs from a fresh e-epoch run " \
                             f"(declare horizon_dependent with a reason, or remove the dependence on the run length)"


@pytest.mark.parametrize("name", ITERATIVE)
def test_the_tune_plan_reads_epochs_off_the_curves_only_where_that_is_sound(name):
    flag = epochs_flag(name)
    assert flag is not None and search_space(name)[flag] == ("per_epoch", MAX_TUNED_EPOCHS)
    epochs = [values[flag] for values in trial_values(name, 8)]
    if horizon_dependent(name):
        cls = resolve_method(name).cls
        assert cls.horizon_reason, f"{name}: a horizon-dependent method says why"
        # A design dimension: each trial runs its own epoch count, spread over 1..maximum.
        assert len(set(epochs)) == 8 and all(1 <= e <= MAX_TUNED_EPOCHS for e in epochs)
    else:
        assert set(epochs) == {MAX_TUNED_EPOCHS}  # one long run per trial, the epoch read off its curves


def test_known_horizon_dependent_methods_are_declared():
    # FT_l1's alpha decays over the run's epochs, SalUn_soft's threshold index over the run's steps.
    assert {n for n in ITERATIVE if horizon_dependent(n)} == {"FT_l1", "FT_prune", "SalUn_soft", "RL_proximal"}


def test_a_horizon_dependent_method_must_give_its_reason(monkeypatch):
    from unlearn import registry

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    bare = type("Bare", (UnlearnMethod,), {"name": "BareHorizon", "summary": "toy", "horizon_dependent": True})
    with pytest.raises(ValueError, match="horizon_reason"):
        register_method(bare)
