"""The tuning criterion reads the training pool only: the validation gap (UA, RA, VA, MIA_efficacy_val) by hand, the
selection-only evaluation (no test forward pass; the same values as the full evaluation), the reuse of the last epoch's
evaluation, and a tiny tuning run whose selection does not move when the test set is replaced."""
from __future__ import annotations

import importlib
import math
import shutil

import numpy as np
import pytest
import torch

from arg_parser import parse_config
from dataset import ImageData, SplitData, load_dataset, make_split
from evaluation import SELECTION_PARTS, Evaluation, compare_to_retrain, evaluate_model, selection_entry, val_gap
from evaluation.metrics import selection_val_mask, validation_mia
from models import create_model
from sweep.tune import epoch_scores, select
from utils import UserError

# ---------------------------------------------------------------------------------------------------------------------
# The score by hand
# ---------------------------------------------------------------------------------------------------------------------


def test_val_gap_by_hand():
    method = {"UA": 10.0, "RA": 99.0, "VA": 90.0, "MIA_efficacy_val": 20.0, "TA": 0.0, "MIA_efficacy": 0.0}
    retrain = {"UA": 15.0, "RA": 100.0, "VA": 88.0, "MIA_efficacy_val": 12.0, "TA": 99.0, "MIA_efficacy": 99.0}
    # |10 - 15| + |99 - 100| + |90 - 88| + |20 - 12| = 5 + 1 + 2 + 8 = 16, over 4 metrics; TA and MIA_efficacy unread
    assert val_gap(method, retrain) == pytest.approx(4.0)


def _evaluation(forget, retain, va, mia_val, preds, test=None, conf=None):
    accuracy = {"forget": forget, "retain": retain, "val": va}
    svc = {}
    if test is not None:
        accuracy["test"] = test
        svc = {f: conf for f in ("correctness", "confidence", "entropy", "m_entropy", "prob")}
    return Evaluation(accuracy=accuracy, svc=svc, forget_predictions=np.asarray(preds),
                      selection={"VA": va, "MIA_efficacy_val": mia_val})


def test_comparison_and_curve_entry_of_a_selection_only_evaluation_by_hand():
    method = _evaluation(forget=90.0, retain=99.0, va=90.0, mia_val=20.0, preds=[0, 1, 2, 3])
    retrain = _evaluation(forget=85.0, retain=100.0, va=88.0, mia_val=12.0, preds=[0, 1, 5, 5], test=87.0, conf=0.1)
    # No test set in the method's evaluation: no Avg. Gap, but the validation gap (the example above) and the
    # forget-set comparisons.
    assert compare_to_retrain(method, retrain) == pytest.approx({"rUA": 5.0, "agreement": 50.0, "val_gap": 4.0})
    entry = selection_entry(method, 1.5, retrain)
    assert entry.pop("accuracy") == {"forget": 90.0, "retain": 99.0, "val": 90.0}
    assert entry == pytest.approx({"UA": 10.0, "RA": 99.0, "VA": 90.0, "MIA_efficacy_val": 20.0, "RTE_seconds": 1.5,
                                   "rUA": 5.0, "agreement": 50.0, "val_gap": 4.0})
    assert not {"TA", "MIA_efficacy", "avg_gap", "SVC_MIA_forget_efficacy"} & set(entry)
    with pytest.raises(ValueError, match="test set"):
        selection_entry(retrain, 1.0)


def test_gap_rule_scores_the_validation_gap_never_avg_gap():
    """A curve whose test-based Avg. Gap points the other way: the gap rule follows val_gap."""
    def cell(*epochs):
        return {"curves": [{"epoch": e + 1, "val_gap": v, "avg_gap": a, "TA": 0.0,
                            "accuracy": {"forget": 90.0, "retain": 100.0, "val": 90.0}}
                           for e, (v, a) in enumerate(epochs)]}
    trials = [[cell((3.0, 0.1), (2.0, 0.1))], [cell((1.0, 50.0), (4.0, 50.0))]]
    assert epoch_scores(trials[0][0], "random", "gap") == {1: 3.0, 2: 2.0}
    assert select(trials, "random", "gap") == (1, 1, 1.0)
    with pytest.raises(ValueError, match="val_gap"):
        epoch_scores({"curves": [{"epoch": 1, "avg_gap": 1.0}]}, "random", "gap")


def test_validation_split_of_the_selection_drops_the_forgotten_class_as_the_test_set_does(digits):
    labels = torch.tensor([0, 1, 2, 0, 3])
    random_split = make_split(digits, -1, 20, seed=1)
    classwise = make_split(digits, 0, None, seed=1)
    assert selection_val_mask(labels, random_split).tolist() == [True] * 5
    assert selection_val_mask(labels, classwise).tolist() == [False, True, True, False, True]
    assert selection_val_mask(labels, None).tolist() == [True] * 5


def _probs(confidence: list[float], labels: list[int], classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.zeros(len(labels), classes, dtype=torch.float64)
    for i, (c, y) in enumerate(zip(confidence, labels, strict=True)):
        p[i] = (1.0 - c) / (classes - 1)
        p[i, y] = c
    return p, torch.tensor(labels)


def test_validation_mia_by_hand():
    """Members (the first retain samples) are confident, validation samples are not: a forget set that looks like the
    validation samples is called non-member throughout (100 %), one that looks like the retain set never (0 %)."""
    retain = _probs([0.99] * 6 + [0.5] * 4, [0] * 10)   # only the first 6 (as many as kept val samples) are shadows
    val = _probs([0.6] * 8, [0, 1, 0, 1, 0, 1, 0, 1])
    keep = torch.tensor([True] * 6 + [False] * 2)
    unseen = _probs([0.6, 0.62, 0.58], [0, 1, 0])
    seen = _probs([0.99, 0.99, 0.99], [0, 1, 0])
    assert validation_mia({"retain": retain, "val": val, "forget": unseen}, keep) == pytest.approx(100.0)
    assert validation_mia({"retain": retain, "val": val, "forget": seen}, keep) == pytest.approx(0.0)
    assert math.isnan(validation_mia({"retain": retain, "val": val, "forget": seen}, torch.zeros(8, dtype=torch.bool)))


# ---------------------------------------------------------------------------------------------------------------------
# The selection-only evaluation on a real (tiny, untrained) model
# ---------------------------------------------------------------------------------------------------------------------

class _PartsSeen(SplitData):
    """A SplitData that records which parts were evaluated."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    def eval_loader(self, part, batch_size=None):
        self.seen.append(part)
        return super().eval_loader(part, batch_size)


@pytest.fixture(scope="module")
def tiny_model(digits):
    torch.manual_seed(0)
    model = create_model("resnet18", digits.num_classes, digits.in_channels, 4, digits.mean, digits.std)
    return model.eval()


@pytest.mark.parametrize("forget_class", [-1, 2])
def test_selection_only_evaluation_reads_no_test_sample_and_matches_the_full_one(digits, tiny_model, forget_class):
    split = make_split(digits, forget_class, 60 if forget_class == -1 else None, seed=1)
    data = _PartsSeen(digits, split, batch_size=64)
    full = evaluate_model(tiny_model, data)
    data.seen.clear()
    selection = evaluate_model(tiny_model, data, parts=SELECTION_PARTS)
    assert sorted(data.seen) == sorted(SELECTION_PARTS)
    assert not selection.has_test and selection.svc == {} and selection.test_logits is None
    assert selection.selection_metrics == full.selection_metrics       # exactly the same numbers
    assert selection.accuracy == {k: v for k, v in full.accuracy.items() if k != "test"}
    # VA by hand: the validation split's accuracy, the forgotten class left out in class-wise forgetting.
    logits, labels = full.outputs["val"]
    keep = labels != forget_class
    assert full.selection["VA"] == pytest.approx(100.0 * float((logits.argmax(1) == labels)[keep].double().mean()))
    # The final evaluation from the last epoch's predictions: only the test set is predicted, the same numbers.
    data.seen.clear()
    again = evaluate_model(tiny_model, data, known=selection.outputs)
    assert data.seen == ["test"]
    assert again.accuracy == full.accuracy and again.svc == full.svc and again.selection == full.selection
    with pytest.raises(ValueError, match="parts"):
        evaluate_model(tiny_model, data, parts=("forget", "test"))


def test_selection_metrics_flag_needs_the_per_epoch_evaluation(tmp_path):
    argv = ["--dataset", "digits", "--num_indexes_to_replace", "20", "--save_dir", str(tmp_path), "--unlearn", "GA"]
    assert parse_config(argv, "mlflow_forget.py").eval.epoch_eval_metrics == "all"
    config = parse_config(argv + ["--epoch-eval-metrics", "selection"], "mlflow_forget.py")
    assert config.eval.epoch_eval_metrics == "selection" and config.flags["epoch_eval_metrics"] == "selection"
    with pytest.raises(UserError, match="--no-epoch-eval"):
        parse_config(argv + ["--epoch-eval-metrics", "selection", "--no-epoch-eval"], "mlflow_forget.py")


# ---------------------------------------------------------------------------------------------------------------------
# A tiny tuning run: the same selection when the test set is replaced
# ---------------------------------------------------------------------------------------------------------------------

def _perturbed_test_set(data: ImageData) -> ImageData:
    """The same training pool; the test images replaced by noise and the test labels shuffled."""
    generator = torch.Generator().manual_seed(123)
    images = torch.rand(data.test_images.shape, generator=generator)
    if not data.test_images.is_floating_point():
        images = (images * 255).to(data.test_images.dtype)
    labels = data.test_labels[torch.randperm(len(data.test_labels), generator=generator)]
    return ImageData(**{**{f: getattr(data, f) for f in data.__dataclass_fields__},
                        "test_images": images, "test_labels": labels})


def _tune(out, monkeypatch, perturb: bool, models_from=None):
    """Run the tuning cells of GA (at most 3 epochs) and SSD (2 trials, tuning seed 11, random and class 3) in this
    process and select. `models_from`: an out dir whose original and Retrain models are copied first (they are
    trained on the training pool alone, so the test set does not change them; copying saves training them again)."""
    import sweep.tune as tune
    from benchmark import build_parser
    from sweep.settings import Settings
    from sweep.tune import plan_from_args, selections, tuning_cells
    from utils import atomic_write_json

    declared = tune.search_space.__wrapped__ if hasattr(tune.search_space, "__wrapped__") else tune.search_space

    def short(name):  # the same trials with 3 epochs at most: a tiny run
        return {flag: ("per_epoch", min(space[1], 3)) if space[0] == "per_epoch" else space
                for flag, space in declared(name).items()}
    short.__wrapped__ = declared
    monkeypatch.setattr(tune, "search_space", short)
    if models_from is not None:
        shutil.copytree(models_from / "models", out / "models")

    execute_module = importlib.import_module("sweep.execute")  # the package exports a function of the same name
    loaded = load_dataset("digits")
    monkeypatch.setattr(execute_module, "_DATA", {})
    monkeypatch.setattr(execute_module, "load_dataset",
                        lambda *a, **k: _perturbed_test_set(loaded) if perturb else loaded)
    args = build_parser().parse_args(["--tune", "--datasets", "digits", "--epochs", "2", "--width", "4", "--methods",
                                      "GA", "SSD", "--trials", "2", "--seeds", "1", "--tune-seeds", "11",
                                      "--tune-classes", "3", "--forget_classes", "0", "--out", str(out)])
    plan = plan_from_args(args)
    settings = Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random", "classwise"],
                        methods=["GA", "SSD"], seeds=[11], out=out, epochs=2, width=4)
    cells, _, trial_of = tuning_cells(settings, plan, atomic_write_json(out / "no_config.json", {}))
    results = {}
    for cell in cells:  # references first
        report = execute_module.execute(execute_module.task_of(cell, out))
        assert report["status"] == "ok", (cell.kind, report["error"])
        execute_module.deliver(cell, report, out)
        if cell.kind == "method":
            results[cell.key] = report["result"]
    return {criterion: selections(cells, out, plan, trial_of, criterion) for criterion in ("gap", "retrain_free")}, \
        results, cells


@pytest.mark.slow
def test_selection_is_the_same_when_the_test_set_is_replaced(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    plain, plain_results, cells = _tune(tmp_path / "plain", monkeypatch, perturb=False)
    perturbed, perturbed_results, _ = _tune(tmp_path / "perturbed", monkeypatch, perturb=True,
                                            models_from=tmp_path / "plain")
    method_cells = [c for c in cells if c.kind == "method"]
    assert max(len(r["curves"]) for r in plain_results.values()) == 3  # GA's epochs, each a candidate
    assert all("--epoch-eval-metrics" in c.argv and "selection" in c.argv for c in method_cells)
    # The replacement reached the cells: their test-set numbers moved ...
    assert any(plain_results[k]["TA"] != perturbed_results[k]["TA"] for k in plain_results)
    # ... their curves hold no test-set output at all ...
    for result in plain_results.values():
        for entry in result["curves"]:
            assert not {"TA", "MIA_efficacy", "avg_gap", "SVC_MIA_forget_efficacy"} & set(entry)
            assert "test" not in entry["accuracy"] and "val_gap" in entry
    # ... and both rules choose the same trial and epoch with the same score.
    for criterion in ("gap", "retrain_free"):
        chosen = sorted((s.config, s.scenario, s.trial, s.epoch, s.score, tuple(sorted(s.values.items())))
                        for s in plain[criterion])
        assert chosen == sorted((s.config, s.scenario, s.trial, s.epoch, s.score, tuple(sorted(s.values.items())))
                                for s in perturbed[criterion])
        assert all(s.trial >= 0 and math.isfinite(s.score) for s in plain[criterion])


def test_final_evaluation_is_reused_only_for_unchanged_weights(tiny_model):
    """`unlearn` hands the last epoch's evaluation to `evaluate` only when the final model's state fingerprint is the
    one evaluated; any change to a weight or a BatchNorm statistic tells them apart."""
    import copy

    from pipeline.stages import _state_fingerprint

    model = copy.deepcopy(tiny_model)
    before = _state_fingerprint(model)
    assert _state_fingerprint(copy.deepcopy(model)) == before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert _state_fingerprint(model) != before
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    changed = _state_fingerprint(model)
    bn.running_mean[0] += 1.0
    assert _state_fingerprint(model) != changed
