"""Smoke tests of main_baseline.py / main_forget.py run for real on tiny digits settings, and their bad-input paths."""
import json

import pytest
import torch

from conftest import TINY, run_main

FORGET = ["--class_to_replace", "-1", "--num_indexes_to_replace", "40", "--seed", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An original model and its Retrain reference, trained once for this module."""
    save = tmp_path_factory.mktemp("baseline")
    original = run_main("main_baseline.py", *TINY, *FORGET, "--save_dir", str(save))
    assert original.returncode == 0, original.stderr
    retrain = run_main("main_baseline.py", *TINY, *FORGET, "--save_dir", str(save), "--retrain")
    assert retrain.returncode == 0, retrain.stderr
    return save, original


def test_baseline_writes_checkpoints_plot_and_summary(trained):
    save, proc = trained
    best = save / "1resnet18_ep2model_SA_best.pth.tar"
    assert best.is_file() and (save / "1resnet18_ep2checkpoint.pth.tar").is_file()
    assert (save / "1resnet18_ep2model_SA_best.png").stat().st_size > 1000
    payload = torch.load(best, weights_only=True)
    assert payload["arch"] == "resnet18" and payload["dataset"] == "digits" and payload["width"] == 4
    assert payload["num_classes"] == 10 and payload["in_channels"] == 1 and payload["kind"] == "original"
    assert 0 <= payload["accuracy"]["test"] <= 100
    summary = json.loads((save / "1resnet18_ep2model_SA_best.json").read_text())
    assert summary["accuracy"]["test"] == payload["accuracy"]["test"]
    assert "test" in proc.stdout and str(best) in proc.stdout
    retrained = list(save.glob("1resnet18_ep2_retrain_random_c-1_n40_s1_*model.pth.tar"))
    assert len(retrained) == 1
    assert torch.load(retrained[0], weights_only=True)["kind"] == "retrain"
    assert not list(save.glob(".*.tmp"))


def test_forget_raw_and_retrain_fill_the_comparison(trained):
    save, _ = trained
    mask = str(save / "1resnet18_ep2model_SA_best.pth.tar")
    proc = run_main("main_forget.py", *TINY, *FORGET, "--save_dir", str(save), "--mask", mask, "--unlearn", "raw")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((save / "raweval_result.json").read_text())
    for key in ("accuracy", "UA", "RA", "TA", "MIA_efficacy", "SVC_MIA_forget_efficacy", "RTE_seconds", "rUA",
                "agreement", "avg_gap", "args", "split_hash"):
        assert key in result, key
    assert set(result["accuracy"]) == {"retain", "forget", "val", "test"}
    assert result["UA"] == pytest.approx(100 - result["accuracy"]["forget"])
    split_file = save / f"split_random_c-1_n40_s1_{result['split_hash'][:8]}.json"
    assert json.loads(split_file.read_text())["hash"] == result["split_hash"]
    # --model_path is the SalUn name of --mask
    proc = run_main("main_forget.py", *TINY, *FORGET, "--save_dir", str(save), "--model_path", mask, "--unlearn",
                    "retrain")
    assert proc.returncode == 0, proc.stderr
    retrained = json.loads((save / "retraineval_result.json").read_text())
    assert retrained["avg_gap"] == pytest.approx(0.0) and retrained["agreement"] == pytest.approx(100.0)


@pytest.mark.slow
@pytest.mark.integration
def test_resume_from_cli_after_a_real_kill(tmp_path):
    """Kill a training run mid-way (SIGKILL, as a preempted job), resume it, and get the uninterrupted weights. Only the
    killed run needs a process of its own; the others run in this one (the same thread count, the same numbers)."""
    import subprocess
    import sys
    import time

    from conftest import ROOT
    args = [*TINY, "--seed", "1", "--epochs", "16", "--decreasing_lr", "8,12"]
    assert run_main("main_baseline.py", *args, "--save_dir", str(tmp_path / "full")).returncode == 0
    full = torch.load(tmp_path / "full" / "1resnet18_ep16checkpoint.pth.tar", weights_only=True)["state_dict"]

    last = tmp_path / "cut" / "1resnet18_ep16checkpoint.pth.tar"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main_baseline.py"), *args,
                             "--save_dir", str(tmp_path / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    epoch = torch.load(last, weights_only=True)["epoch"]  # intact: checkpoints are written atomically
    assert 1 <= epoch < 16, "the run finished before it could be interrupted"
    resumed = run_main("main_baseline.py", *args, "--save_dir", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0 and f"resuming original from epoch {epoch}" in resumed.stdout
    again = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(v, again[k]) for k, v in full.items())


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("extra, fragments", [
    (["--dataset", "mnist"], ["invalid choice", "digits"]),
    (["--arch", "resnet1000"], ["invalid choice", "resnet18"]),
    (["--num_indexes_to_replace", "0", "--class_to_replace", "-1"], ["positive"]),
    (["--num_indexes_to_replace", "99999", "--class_to_replace", "-1"], ["1..", "training set"]),
    (["--class_to_replace", "12", "--num_indexes_to_replace", "5"], ["out of range", "0..9"]),
    (["--num_classes", "100"], ["disagrees", "10 classes"]),
    (["--seed", "0"], ["--seed", "positive"]),
])
def test_bad_baseline_input(tmp_path, extra, fragments):
    proc = run_main("main_baseline.py", *TINY, "--save_dir", str(tmp_path / "out"), "--retrain",
                    "--class_to_replace", "-1", "--num_indexes_to_replace", "10", *extra)
    _assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_dataset_offline(tmp_path):
    proc = run_main("main_baseline.py", "--dataset", "cifar10", "--data", str(tmp_path), "--no-download",
                    "--save_dir", str(tmp_path / "out"), "--epochs", "1")
    _assert_one_line_error(proc, "cifar-10-batches-py", "--data")


def test_unwritable_save_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_main("main_baseline.py", *TINY, "--save_dir", str(blocker / "sub"))
    _assert_one_line_error(proc, "is a file", "--save_dir")


def test_bad_checkpoints_for_forget(trained, tmp_path):
    save, _ = trained
    common = [*TINY, *FORGET, "--save_dir", str(tmp_path), "--unlearn", "raw"]
    _assert_one_line_error(run_main("main_forget.py", *common, "--mask", str(tmp_path / "nope.pth.tar")),
                           "does not exist")
    junk = tmp_path / "junk.pth.tar"
    junk.write_text("not a checkpoint")
    _assert_one_line_error(run_main("main_forget.py", *common, "--mask", str(junk)), "not a readable")
    mask = str(save / "1resnet18_ep2model_SA_best.pth.tar")
    _assert_one_line_error(run_main("main_forget.py", *common, "--mask", mask, "--arch", "vgg16_bn"),
                           "arch=resnet18", "arch=vgg16_bn")
    _assert_one_line_error(run_main("main_forget.py", *[a if a != "digits" else "digits_noisy" for a in common],
                                    "--mask", mask), "dataset=digits")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth.tar"
    code = ("import os, torch\n"
            f"class P:\n    def __reduce__(self):\n        return (os.mkdir, ({str(marker)!r},))\n"
            f"torch.save({{'state_dict': {{}}, 'x': P()}}, {str(evil)!r})\n")
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", code], check=True)
    _assert_one_line_error(run_main("main_forget.py", *common, "--mask", str(evil)), "refusing to load")
    assert not marker.exists()
    assert not (tmp_path / "rawevals_result.json").exists() and not (tmp_path / "raweval_result.json").exists()


def test_original_readme_flags_are_accepted():
    """Every flag of the original README's commands parses (with digits in place of CIFAR)."""
    from arg_parser import parse_config

    def parse_args(argv):
        return parse_config(argv, "mlflow_forget.py")  # the script that trains a missing --mask

    config = parse_args(["--save_dir", "./results/cifar10",
                       "--mask", "./results/cifar10/1resnet18_ep100model_SA_best.pth.tar",
                       "--unlearn", "VarGrad", "--unlearn_epochs", "4", "--unlearn_lr", "0.0001", "--data", "./data",
                       "--dataset", "cifar10", "--seed", "1", "--arch", "resnet18", "--epochs", "100",
                       "--num_indexes_to_replace", "450", "--beta", "0.9", "--quantile", "0.55",
                       "--class_to_replace", "-1"])
    assert config.method.hp["lr"] == 0.0001 and config.method.hp["quantile"] == 0.55 and config.data.num_classes == 10
    assert config.method.model_path.endswith("SA_best.pth.tar")
    config = parse_args(["--data", "./data", "--dataset", "cifar100", "--arch", "resnet18", "--save_dir", "./r",
                       "--epochs", "50", "--num_indexes_to_replace", "450", "--num_classes", "100"])
    assert config.data.num_classes == 100 and config.model.decreasing_lr == "91,136" and config.data.batch_size == 256
    assert parse_args(["--dataset", "digits"]).model.width == 16  # the dataset's recipe fills unset flags
    assert parse_args(["--dataset", "digits", "--epochs", "7"]).model.epochs == 7
    assert parse_args(["--dataset", "digits"]).device == "auto"


@pytest.mark.slow
def test_default_digits_recipe_reaches_97_percent(tmp_path):
    """The documented digits recipe (width-16 ResNet-18, 30 epochs) reaches >= 97 % test accuracy."""
    proc = run_main("main_baseline.py", "--dataset", "digits", "--seed", "1", "--save_dir", str(tmp_path),
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr
    payload = torch.load(tmp_path / "1resnet18_ep30model_SA_best.pth.tar", weights_only=True)
    assert payload["width"] == 16 and payload["epochs"] == 30
    assert payload["accuracy"]["test"] >= 97.0
