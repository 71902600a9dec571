"""Tests of the backdoor experiment (`backdoor.py`, `main_backdoor.py`), including its ASR convention and the
--paper_era one (docs/upstream.md).

The end-to-end tests run for real on plain `digits` (8x8; digits_noisy was not needed): the default 2x2 trigger sits at
rows/cols 4..5, which are all black in only 0.3 % of the clean training images, so the black patch is a distinctive
feature that a small model learns in a few epochs.

Settings (measured on seeds 1..5, CPU, one thread; the test pins them, so tuned method defaults do not change it):
* backdoored model: resnet18 width 8, 15 epochs, lr 0.05, milestone 10, batch 64; 130 poisoned samples (10 % of the
  1,298 training samples), target 0, default 2x2 trigger. Clean accuracy 96.4-98.1 %, ASR 92.0-97.5 %.
* FT: lr 0.1, 12 epochs; with the shared --decreasing_lr 10 the last 2 epochs run at 0.01. ASR after 1.9-8.6 %, clean
  accuracy 96.9-98.3 %. (Upstream's lr 0.01 for 10 epochs leaves the backdoor in place: ASR 92-94 %, seeds 1-3.)
* VarGrad (NGPlus + prob mask; Adam): lr 3e-3, 10 epochs. ASR after 0.3-3.7 %, clean accuracy 93.6-95.8 %. (The
  family default lr 1e-4 leaves ASR at 68-80 %: 3 forget steps per epoch.)
One thread per process: on 2 shared cores, two torch threads per process are several times slower for these models.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import scenarios.backdoor as bd
from dataset import make_split, to_unit_float
from utils import UserError, atomic_torch_save, load_checkpoint

RECIPE = ["--dataset", "digits", "--width", "8", "--epochs", "15", "--decreasing_lr", "10",
          "--num_indexes_to_replace", "130", "--class_to_replace", "0", "--seed", "1", "--no-progress"]
FT = ["--unlearn", "FT", "--unlearn_lr", "0.1", "--unlearn_epochs", "12"]
VARGRAD = ["--unlearn", "VarGrad", "--unlearn_lr", "0.003", "--unlearn_epochs", "10"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}



# ---------------------------------------------------------------------------------------------------------------------
# The trigger
# ---------------------------------------------------------------------------------------------------------------------

# Written out by hand (not from the formula): 2 pixels from the bottom-right corner.
PATCH = {(8, 2): [4, 5], (32, 4): [26, 27, 28, 29]}


def _image_batch(layout: str, size: int, dtype: str, lib: str, channels: int = 3, n: int = 2):
    """Images with no zero pixel, so every zero in the output comes from the trigger."""
    shape = {"HWC": (n, size, size, channels), "CHW": (n, channels, size, size), "HW": (n, size, size)}[layout]
    rng = np.random.RandomState(0)
    values = rng.randint(1, 256, size=shape)
    array = values.astype(np.uint8) if dtype == "uint8" else (values / 255.0).astype(np.float32)
    return torch.from_numpy(array) if lib == "torch" else array


def _expected(images, layout: str, rows: list[int]):
    """The hand-built expectation: a pixel-by-pixel copy with the listed rows x cols zeroed in every channel."""
    expected = np.array(images, copy=True) if not isinstance(images, torch.Tensor) else images.numpy().copy()
    for index in np.ndindex(*expected.shape):
        if layout == "HWC":
            r, c = index[-3], index[-2]
        else:
            r, c = index[-2], index[-1]
        if r in rows and c in rows:
            expected[index] = 0
    return expected


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("layout, channels", [("HWC", 3), ("CHW", 3), ("CHW", 1), ("HW", 1)])
@pytest.mark.parametrize("size, trigger", [(8, 2), (32, 4)])
def test_trigger_is_pixel_exact_on_every_layout(lib, dtype, layout, channels, size, trigger):
    images = _image_batch(layout, size, dtype, lib, channels)
    before = images.copy() if lib == "numpy" else images.clone()
    out = bd.add_trigger(images, trigger, layout)
    expected = _expected(before, layout, PATCH[(size, trigger)])
    got = out.numpy() if lib == "torch" else out
    assert type(out) is type(images) and got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)
    assert int((got == 0).sum()) == trigger * trigger * channels * len(got)
    # The input is not modified, and the output is a copy (writing to it leaves the input alone).
    assert np.array_equal(np.asarray(images), np.asarray(before))
    out[...] = 7
    assert np.array_equal(np.asarray(images), np.asarray(before))


@pytest.mark.parametrize("layout", ["HWC", "CHW", "HW"])
def test_trigger_on_a_single_image(layout):
    batch = _image_batch(layout, 8, "uint8", "numpy", channels=3)
    single = bd.add_trigger(batch[0], 2, layout)
    assert np.array_equal(single, bd.add_trigger(batch, 2, layout)[0])


def test_default_trigger_size_scales_with_the_image():
    assert bd.default_trigger_size(32) == 4 and bd.default_trigger_size(8) == 2 and bd.default_trigger_size(64) == 8


@pytest.mark.parametrize("size, trigger, fragment", [(8, 7, "allowed: 1..6"), (8, 9, "allowed: 1..6"),
                                                      (8, 0, "positive"), (32, 31, "allowed: 1..30")])
def test_trigger_that_does_not_fit_is_a_one_line_error(size, trigger, fragment):
    with pytest.raises(UserError) as info:
        bd.add_trigger(_image_batch("CHW", size, "uint8", "numpy"), trigger, "CHW")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_layout_and_wrong_rank_are_rejected():
    with pytest.raises(ValueError, match="layout"):
        bd.add_trigger(np.ones((2, 8, 8)), 2, "NHWC")
    with pytest.raises(ValueError, match="dimensions"):
        bd.add_trigger(np.ones((2, 2, 3, 8, 8)), 2, "CHW")


# ---------------------------------------------------------------------------------------------------------------------
# Poisoning and the attack success rate
# ---------------------------------------------------------------------------------------------------------------------

def parse_backdoor_args(argv):
    from arg_parser import parse_config

    return parse_config(argv, "main_backdoor.py")


def run_backdoor_cell(config):
    return bd.run_backdoor(bd.setup_backdoor(config))


def _args(tmp_path, *extra):
    return parse_backdoor_args([*RECIPE, "--save_dir", str(tmp_path / "out"), *extra])


def test_poisoned_samples_are_the_forget_selection_with_trigger_and_target(tmp_path, digits):
    run = bd.setup_backdoor(_args(tmp_path, "--class_to_replace", "3"))
    expected = make_split(digits, -1, 130, seed=1).forget
    assert np.array_equal(run.poison.indices, expected) and run.poison.target == 3 and run.poison.trigger_size == 2
    poisoned, clean = run.poisoned.data, run.clean.data
    idx = torch.as_tensor(expected)
    assert torch.equal(poisoned.train_images[idx], bd.add_trigger(clean.train_images[idx], 2, "CHW"))
    assert bool((poisoned.train_labels[idx] == 3).all())
    others = torch.ones(len(clean.train_labels), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(poisoned.train_images[others], clean.train_images[others])
    assert torch.equal(poisoned.train_labels[others], clean.train_labels[others])
    assert torch.equal(poisoned.test_images, clean.test_images) and torch.equal(poisoned.test_labels, clean.test_labels)
    assert torch.equal(clean.train_images, digits.train_images)  # the clean data was not modified
    assert poisoned.mean == clean.mean and poisoned.std == clean.std  # same normalisation as the clean model
    # Unlearning sees the poisoned samples (trigger + target label) as the forget set, the clean rest as retain.
    x_f, y_f = run.poisoned.splits.tensors("forget")
    assert bool((y_f == 3).all()) and bool((x_f[:, :, 4:6, 4:6] == 0).all())
    x_r, y_r = run.poisoned.splits.tensors("retain")
    clean_x_r, clean_y_r = run.clean.splits.tensors("retain")
    assert torch.equal(x_r, clean_x_r) and torch.equal(y_r, clean_y_r)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_poison_hash_depends_on_the_poisoning(tmp_path):
    hashes = {bd.setup_backdoor(_args(tmp_path, *extra)).poison.hash
              for extra in ([], ["--class_to_replace", "1"], ["--trigger_size", "3"], ["--seed", "2"],
                            ["--num_indexes_to_replace", "131"])}
    assert len(hashes) == 5
    assert bd.setup_backdoor(_args(tmp_path)).poison.hash == bd.setup_backdoor(_args(tmp_path)).poison.hash


class TriggerBlindOracle(nn.Module):
    """Classifies a test image by nearest stored test image with the trigger region blanked: always right, and blind
    to the trigger. It never predicts the target for another class, so its ASR must be 0."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, trigger: int, num_classes: int = 10):
        super().__init__()
        self.trigger, self.num_classes = trigger, num_classes
        self.keys = bd.add_trigger(to_unit_float(images), trigger, "CHW").flatten(1)
        self.labels = labels

    def forward(self, x):
        keyed = bd.add_trigger(x, self.trigger, "CHW").flatten(1)
        nearest = torch.cdist(keyed, self.keys).argmin(1)
        return nn.functional.one_hot(self.labels[nearest], self.num_classes).float()


class Constant(nn.Module):
    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


def test_asr_leaves_out_the_target_class_unless_paper_era(tmp_path):
    run = bd.setup_backdoor(_args(tmp_path))
    data, target = run.clean.data, run.poison.target
    share = 100.0 * float((data.test_labels == target).double().mean())
    oracle = TriggerBlindOracle(data.test_images, data.test_labels, run.poison.trigger_size)
    metrics = bd.backdoor_metrics(oracle, run.clean.splits, run.poison)
    assert metrics == {"clean_acc": 100.0, "asr": 0.0}
    # Counting target-class images (upstream) credits the attack with every correct target-class prediction.
    paper = bd.backdoor_metrics(oracle, run.clean.splits, run.poison, count_target_class=True)
    assert paper["asr"] == pytest.approx(share) and 0 < share < 20
    always_target = bd.backdoor_metrics(Constant(target), run.clean.splits, run.poison)
    assert always_target == {"clean_acc": pytest.approx(share), "asr": 100.0}
    assert bd.backdoor_metrics(Constant(target + 1), run.clean.splits, run.poison)["asr"] == 0.0
    images, labels = bd.attack_test_set(data, run.clean.split, run.poison)
    assert len(labels) == int((data.test_labels != target).sum()) and bool((images[:, :, 4:6, 4:6] == 0).all())
    assert bd.setup_backdoor(_args(tmp_path, "--paper_era")).count_target_class


def test_paper_era_keeps_the_consistent_split(tmp_path):
    config = _args(tmp_path, "--paper_era")
    assert config.method.paper_era and config.data.split_mode == "consistent"


# ---------------------------------------------------------------------------------------------------------------------
# For real on digits: the backdoored model, FT, a masked method of the paper
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    """main_backdoor.py as a user runs it: trains the backdoored model, unlearns with FT, tracks with mlflow."""
    from conftest import run_script

    root = tmp_path_factory.mktemp("backdoor")
    save_dir = root / "out"
    env = {**ONE_THREAD, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    # cwd = the temporary folder: with a SQLite backend mlflow puts artifacts under ./mlruns of the working directory.
    proc = run_script("main_backdoor.py", *RECIPE, *FT, "--save_dir", str(save_dir), cwd=root, env=env, timeout=240)
    return save_dir, proc, root


@pytest.mark.slow
@pytest.mark.integration
def test_main_backdoor_trains_the_backdoor_and_ft_removes_it(ft_run):
    save_dir, proc, root = ft_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "excludes test images of the target class 0" in proc.stdout and "correct answer" in proc.stdout
    result = json.loads((save_dir / "FTbackdoor_result.json").read_text())
    for key in ("clean_acc", "asr", "clean_acc_unlearn", "asr_unlearn", "accuracy", "UA", "RA", "TA", "MIA_efficacy",
                "SVC_MIA_forget_efficacy", "RTE_seconds", "args", "split_hash"):
        assert key in result, key
    assert set(result["accuracy"]) == {"retain", "forget", "val", "test"}
    assert result["clean_acc"] >= 90.0 and result["asr"] >= 80.0, result
    assert result["clean_acc_unlearn"] >= 90.0 and result["asr_unlearn"] < 20.0, result
    assert result["TA"] == pytest.approx(result["clean_acc_unlearn"])  # the split's test set is the clean test set
    assert result["scenario"] == "backdoor" and result["method"] == "FT" and result["RTE_seconds"] > 0
    assert result["args"]["trigger_size"] == 2 and result["args"]["class_to_replace"] == 0
    assert result["poison"]["num_poisoned"] == 130 and not result["asr_counts_target_class"]

    model_path = save_dir / f"1resnet18_ep15_backdoor_t0_n130_ts2_{result['poison']['hash'][:8]}model_SA_best.pth.tar"
    payload = torch.load(model_path, weights_only=True)
    assert payload["kind"] == "backdoor" and payload["poison_hash"] == result["poison"]["hash"]
    assert payload["target"] == 0 and payload["trigger_size"] == 2 and payload["split_hash"] == result["split_hash"]
    assert payload["asr"] == pytest.approx(result["asr"]) and payload["epoch"] <= 15
    unlearned = torch.load(save_dir / "FTbackdoor_checkpoint.pth.tar", weights_only=True)
    assert unlearned["evaluation"]["asr_unlearn"] == pytest.approx(result["asr_unlearn"])

    # Tracked because MLFLOW_TRACKING_URI is set: the four headline numbers, per-epoch ASR, the result file.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits-backdoor")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.data.tags["scenario"] == "backdoor"
    for key in ("clean_acc", "asr", "clean_acc_unlearn", "asr_unlearn", "UA", "TA", "RTE_seconds"):
        assert key in tracked.data.metrics, key
    assert tracked.data.metrics["asr_unlearn"] == pytest.approx(result["asr_unlearn"])
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "asr_unlearn")] == list(range(1, 13))
    assert "FTbackdoor_result.json" in [a.path for a in client.list_artifacts(tracked.info.run_id)]
    assert result["tracking"]["run_id"] == tracked.info.run_id


@pytest.mark.slow
def test_masked_method_removes_the_backdoor_without_retraining(ft_run, one_thread, tmp_path):
    save_dir, proc, _ = ft_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    model_path = next(save_dir.glob("*_backdoor_*model_SA_best.pth.tar"))
    stamp = model_path.stat().st_mtime_ns
    result = run_backdoor_cell(parse_backdoor_args([*RECIPE, *VARGRAD, "--save_dir", str(save_dir)]))
    assert model_path.stat().st_mtime_ns == stamp and not result["backdoor_model"]["trained_now"]
    assert result["method"] == "NGPlus+prob" and result["hyperparameters"]["grad_mask"] == "prob"
    assert result["asr"] >= 80.0 and result["clean_acc"] >= 90.0
    assert result["asr_unlearn"] < 20.0 and result["clean_acc_unlearn"] >= 90.0, result
    assert json.loads((save_dir / "VarGradbackdoor_result.json").read_text())["asr_unlearn"] == result["asr_unlearn"]
    assert "tracking" not in result  # no --track, and MLFLOW_TRACKING_URI is not set here


@pytest.mark.slow
def test_a_mask_from_another_poisoning_or_a_clean_model_is_refused(ft_run, tmp_path):
    save_dir, proc, _ = ft_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    model_path = next(save_dir.glob("*_backdoor_*model_SA_best.pth.tar"))
    with pytest.raises(UserError, match="poisoned differently"):
        run_backdoor_cell(parse_backdoor_args([*RECIPE, *FT, "--class_to_replace", "1", "--save_dir",
                                                     str(tmp_path), "--mask", str(model_path)]))
    clean = {**load_checkpoint(model_path), "kind": "original"}
    atomic_torch_save(tmp_path / "clean.pth.tar", clean)
    with pytest.raises(UserError, match="not a backdoored one"):
        run_backdoor_cell(parse_backdoor_args([*RECIPE, *FT, "--save_dir", str(tmp_path), "--mask",
                                                     str(tmp_path / "clean.pth.tar")]))
    assert not list(tmp_path.glob("*result.json"))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------------------------------

BAD_INPUT = [
    (["--trigger_size", "9"], "--trigger_size 9 does not fit a 8x8 image"),          # larger than the image
    (["--trigger_size", "7"], "--trigger_size 7 does not fit a 8x8 image with the 2-pixel margin"),
    (["--class_to_replace", "10"], "--class_to_replace 10 (the backdoor target label) is out of range; allowed: 0..9"),
    (["--class_to_replace", "-1"], "allowed: 0..9"),
    (["--num_indexes_to_replace", "5000"], "--num_indexes_to_replace 5000 is out of range; allowed: 1..1298"),
]


@pytest.mark.integration
def test_bad_input_from_the_command_line(run, tmp_path):
    """A real process once; the other cases go through the same `cli_main` in this process (interpreter start-up is
    most of a failing run's time)."""
    flags, fragment = BAD_INPUT[0]
    save_dir = tmp_path / "out"
    proc = run("main_backdoor.py", *RECIPE, *FT, "--save_dir", str(save_dir), *flags, env=ONE_THREAD, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert fragment in lines[0] and not save_dir.exists()


@pytest.mark.parametrize("flags, fragment", BAD_INPUT)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, flags, fragment):
    import main_backdoor
    from utils import cli_main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # tracking must not start either
    monkeypatch.chdir(tmp_path)
    save_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli_main(lambda: main_backdoor.main([*RECIPE, *FT, "--save_dir", str(save_dir), *flags]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert fragment in lines[0]
    assert not save_dir.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# benchmark.py --scenarios backdoor
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_benchmark_backdoor_scenario_table(ft_run, run, tmp_path):
    """One seed, VarGrad; the backdoored model of the fixture is placed where the sweep looks for it (same seed,
    recipe name and poisoning), so the cell only unlearns. No original or Retrain model is trained for this scenario."""
    import shutil

    save_dir, proc, _ = ft_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    models = tmp_path / "out" / "models" / "digits_w8"
    models.mkdir(parents=True)
    model = next(save_dir.glob("*_backdoor_*model_SA_best.pth.tar"))
    shutil.copy(model, models / model.name)
    (tmp_path / "grid.json").write_text(json.dumps({"VarGrad": {"unlearn_lr": 0.003}}))
    common = ["--datasets", "digits", "--scenarios", "backdoor", "--methods", "VarGrad", "--seeds", "1",
              "--epochs", "15", "--width", "8", "--grid", str(tmp_path / "grid.json"), "--out", str(tmp_path / "out"),
              "--no-track", "--no-progress"]
    # The cells: no original / Retrain references; an emitted command line runs main_backdoor.py.
    from scenarios import SCENARIOS
    from sweep import Settings, build_cells, command_line

    settings = Settings(datasets=["digits"], archs=["resnet18"], scenarios=["backdoor"], methods=["VarGrad", "FT"],
                        seeds=[1, 2], out=tmp_path / "out", epochs=15, width=8)
    cells, _ = build_cells(settings)
    assert [c.kind for c in cells] == ["method"] * 4 and all(not c.deps for c in cells)
    line = command_line(cells[0], tmp_path / "out", None)
    assert "main_backdoor.py" in line and "--class_to_replace 0" in line and "--num_indexes_to_replace 130" in line
    assert SCENARIOS["backdoor"].run_cell is not None

    proc = run("benchmark.py", *common, "--jobs", "1", env=ONE_THREAD, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| Method | clean acc before | ASR before | clean acc after | ASR after | RTE (s) |" in table
    (cell,) = list((tmp_path / "out" / "cells").glob("*.json"))
    result = json.loads(cell.read_text())
    assert result["scenario"] == "backdoor" and not result["backdoor_model"]["trained_now"]
    row = next(line for line in table.splitlines() if line.startswith("| VarGrad |"))
    assert f"{result['asr']:.2f} ± 0.00" in row and f"{result['asr_unlearn']:.2f} ± 0.00" in row
    assert result["asr_unlearn"] < 20.0
    assert sorted(p.name for p in models.glob("*.pth.tar")) == [model.name]  # nothing else was trained
