"""The forgetting-quality stage (`--forget_quality N`, pipeline/forget_quality.py) end to end on digits with the tiny
recipe and N = 4: raw scores 0, the Retrain sanity row scores above the other methods, the retrained models are
trained once and then read from the cache, the result JSON, the .npz and the .png are written; bad input exits 2."""
from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

import pipeline.forget_quality as fq_stage
from arg_parser import parse_config
from conftest import TINY, run_main, run_script
from dataset import SplitData, load_dataset, make_split
from evaluation.reference_models import ModelSpec, ReferenceConfig, derived_seed
from pipeline import paths
from pipeline.stages import prepare, train_reference, unlearn
from training import TrainRecipe

N = 4
FLAGS = TINY + ["--class_to_replace", "-1", "--num_indexes_to_replace", "60", "--seed", "1"]
RESULT_KEYS = {"num_models", "forget_score", "final_score", "retain_acc_ratio", "test_acc_ratio",
               "epsilon_quantiles", "scores_file"}


# FT for one epoch, not its digits default of 10: what is tested is the stage around it, run N times.
FT_FLAGS = ["--unlearn", "FT", "--unlearn_epochs", "1"]


def forget_run(save_dir: Path, method: str, *extra: str):
    method_flags = FT_FLAGS if method == "FT" else ["--unlearn", method]
    return run_main("main_forget.py", *FLAGS, "--save_dir", str(save_dir), *method_flags,
                    "--forget_quality", str(N), *extra)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny original model, then raw, retrain and FT with --forget_quality 4 through main_forget.py."""
    save_dir = tmp_path_factory.mktemp("fq")
    p = prepare(parse_config(FLAGS + ["--save_dir", str(save_dir)], "main_baseline.py"), need_forget=False)
    train_reference(p, retrain=False)
    runs = {}
    for method in ("raw", "retrain", "FT"):
        proc = forget_run(save_dir, method)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads((save_dir / f"{method}eval_result.json").read_text())
        runs[method] = (proc, result)
    return save_dir, runs


@pytest.mark.slow
def test_result_keys_and_files(workspace):
    save_dir, runs = workspace
    for method, (_, result) in runs.items():
        quality = result["forget_quality"]
        assert RESULT_KEYS <= set(quality), sorted(quality)
        assert quality["num_models"] == N and 0.0 <= quality["forget_score"] <= 1.0
        assert quality["final_score"] == pytest.approx(
            quality["forget_score"] * quality["retain_acc_ratio"] * quality["test_acc_ratio"])
        scores = Path(quality["scores_file"])
        assert scores == save_dir / f"{method}forget_quality.npz"
        with np.load(scores) as arrays:
            assert arrays["unlearned_phi"].shape == arrays["retrained_phi"].shape == (N, 60)
            assert arrays["epsilons"].shape == (60,) and arrays["forget_indices"].shape == (60,)
            assert arrays["points"].mean() == pytest.approx(quality["forget_score"])
        png = Path(quality["plot_file"])
        assert png == save_dir / f"{method}forget_quality.png" and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_raw_scores_zero_and_is_announced_before_any_work(workspace):
    _, runs = workspace
    proc, result = runs["raw"]
    quality = result["forget_quality"]
    assert quality["forget_score"] == 0.0 and quality["final_score"] == 0.0
    assert quality["identical_runs"] is True
    assert quality["epsilon_quantiles"]["q10"] == 50.0  # every example: a spike against the retrained spread
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("warning: --forget_quality with raw: the method is deterministic")
    assert sum("deterministic" in line for line in lines) == 1


@pytest.mark.slow
def test_retrain_sanity_row_scores_above_every_other_method(workspace):
    _, runs = workspace
    scores = {method: result["forget_quality"]["forget_score"] for method, (_, result) in runs.items()}
    assert scores["retrain"] > max(scores["raw"], scores["FT"]), scores
    assert runs["retrain"][1]["forget_quality"]["identical_runs"] is False
    assert "deterministic" not in runs["retrain"][0].stdout and "deterministic" not in runs["FT"][0].stdout


@pytest.mark.slow
def test_retrained_models_are_trained_once_and_shared(workspace):
    save_dir, runs = workspace
    first = runs["raw"][1]["forget_quality"]
    assert first["retrained_trained_now"] == N
    directory = Path(first["retrained_models_dir"])
    assert directory.parent == save_dir / paths.REFERENCE_CACHE
    for method in ("retrain", "FT"):
        quality = runs[method][1]["forget_quality"]
        assert quality["retrained_trained_now"] == 0 and quality["retrained_models_dir"] == str(directory)
    assert sorted(f.name for f in directory.glob("retrain_*.pth.tar")) == [f"retrain_{k:03d}.pth.tar" for k in range(N)]
    with np.load(runs["raw"][1]["forget_quality"]["scores_file"]) as raw, \
            np.load(runs["FT"][1]["forget_quality"]["scores_file"]) as ft:
        assert np.array_equal(raw["retrained_phi"], ft["retrained_phi"])


@pytest.mark.slow
def test_cached_stage_trains_and_evaluates_no_retrained_model(workspace, monkeypatch):
    """In process: a fifth retrained model is the only one trained for N = 5; a second call reads every number from
    the cache (training or evaluating a retrained model would fail here)."""
    save_dir, _ = workspace
    config = parse_config(FLAGS + ["--save_dir", str(save_dir), "--unlearn", "raw", "--forget_quality", "5"])
    p = prepare(config)
    unl = unlearn(p)
    first = fq_stage.forget_quality(p, unl, write_files=False, log=lambda message: None)
    assert first["retrained_trained_now"] == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(fq_stage, "train_models", refuse)
    calls = []
    original_outcome = fq_stage.model_outcome
    monkeypatch.setattr(fq_stage, "model_outcome",
                        lambda model, splits: calls.append(1) or original_outcome(model, splits))
    second = fq_stage.forget_quality(p, unl, write_files=False, log=lambda message: None)
    assert second["retrained_trained_now"] == 0 and len(calls) == 5  # the 5 unlearning runs only
    assert second["forget_score"] == first["forget_score"] == 0.0


@pytest.mark.slow
def test_worker_processes_give_the_same_numbers(workspace):
    save_dir, _ = workspace
    p = prepare(parse_config(FLAGS + ["--save_dir", str(save_dir), *FT_FLAGS, "--forget_quality", "3"]))
    unl = unlearn(p)
    alone = fq_stage.unlearn_repeatedly(p, unl, 3, jobs=1)
    workers = fq_stage.unlearn_repeatedly(p, unl, 3, jobs=2)
    assert np.array_equal(alone.outcomes.phi, workers.outcomes.phi) and np.array_equal(alone.seeds, workers.seeds)
    assert np.array_equal(alone.outcomes.retain_acc, workers.outcomes.retain_acc)
    assert not alone.identical  # FT's runs differ by their data order


def test_seeds_of_runs_and_retrained_models_never_meet():
    retrained = {s for k in range(64) for s in fq_stage.retrained_seeds(k)}
    runs = {s for k in range(64) for s in fq_stage.unlearning_seeds(0, k)}
    assert len(retrained) == 128 and len(runs) == 192 and not retrained & runs
    assert fq_stage.unlearning_seeds(1, 0) != fq_stage.unlearning_seeds(2, 0)
    assert fq_stage.retrained_seeds(3) == (derived_seed(0, fq_stage.SEED_STREAM, 3, 0),
                                           derived_seed(0, fq_stage.SEED_STREAM, 3, 1))


def test_deterministic_methods_are_named_before_any_work(tmp_path):
    def note(method):
        return fq_stage.constant_method_note(parse_config(
            FLAGS + ["--save_dir", str(tmp_path), "--unlearn", method, "--forget_quality", "4"]))

    assert "SSD" in note("SSD") and "wfisher" in note("IU") and "raw" in note("raw")
    assert note("FT") is None and note("retrain") is None and note("SalUn") is None
    off = parse_config(FLAGS + ["--save_dir", str(tmp_path), "--unlearn", "SSD"])
    assert fq_stage.constant_method_note(off) is None


@pytest.mark.parametrize("value, fragment", [("1", "N >= 3"), ("2", "N >= 3"), ("-1", "out of range")])
def test_bad_forget_quality_exits_2_before_any_work(tmp_path, value, fragment):
    save_dir = tmp_path / "out"
    proc = run_main("main_forget.py", *FLAGS, "--save_dir", str(save_dir), "--unlearn", "FT",
                    "--forget_quality", value)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not save_dir.exists()


# ---------------------------------------------------------------------------------------------------------------------
# benchmark.py --forget_quality N: the F and Final columns
# ---------------------------------------------------------------------------------------------------------------------

BENCH = ["--datasets", "digits", "--seeds", "1", "--scenarios", "random", "--epochs", "2", "--width", "4",
         "--unlearn_epochs", "1", "--no-progress", "--no-track", "--jobs", "2"]


def benchmark_run(cwd: Path, *extra: str):
    return run_script("benchmark.py", *BENCH, "--out", str(cwd / "out"), *extra, cwd=cwd,
                      env={"OMP_NUM_THREADS": "1"}, timeout=600)


def test_benchmark_cells_depend_on_the_retrained_models_only_when_asked(tmp_path):
    from sweep.grid import build_cells
    from sweep.settings import Settings

    def cells(quality: int):
        settings = Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random"], methods=["FT"], seeds=[1],
                            out=tmp_path, width=4, epochs=2, jobs=2, forget_quality=quality)
        return {cell.kind: cell for cell in build_cells(settings)[0]}

    off, on = cells(0), cells(3)
    assert "--forget_quality" not in off["method"].argv + off["reference"].argv
    assert off["reference"].key not in off["method"].deps
    # The original and Retrain models do not depend on the score; the Retrain row and the method cells do.
    assert on["original"].key == off["original"].key and on["retrain"].key == off["retrain"].key
    assert on["reference"].key != off["reference"].key and on["method"].key != off["method"].key
    assert on["reference"].key in on["method"].deps
    reference = on["reference"].argv
    assert reference[reference.index("--forget_quality") + 1] == "3" and reference[reference.index("--jobs") + 1] == "2"


@pytest.mark.slow
@pytest.mark.integration
def test_benchmark_adds_f_and_final_columns(tmp_path):
    proc = benchmark_run(tmp_path, "--methods", "FT", "raw", "--forget_quality", "3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert "| Avg. Gap |" in header and "| F | Final |" in header
    rows = {row["method"]: row for row in csv.DictReader((out / "results.csv").open())}
    results = {r["args"]["unlearn"]: r for r in (json.loads(p.read_text()) for p in (out / "cells").glob("*.json"))}
    for method in ("FT", "raw"):
        quality = results[method]["forget_quality"]
        assert quality["num_models"] == 3
        assert float(rows[method]["forget_score_mean"]) == pytest.approx(quality["forget_score"])
        assert float(rows[method]["final_score_mean"]) == pytest.approx(quality["final_score"])
    assert results["raw"]["forget_quality"]["forget_score"] == 0.0
    assert "| raw |" in table and "| 0.000 ± 0.000 | 0.000 ± 0.000 |" in table
    # The Retrain row's cell trained the retrained models once; both method cells read them.
    trained = results["retrain"]["forget_quality_retrained"]
    assert trained["num_models"] == 3 and trained["trained_now"] == 3
    assert all(results[m]["forget_quality"]["retrained_trained_now"] == 0 for m in ("FT", "raw"))
    assert len(list(Path(trained["directory"]).glob("retrain_*.pth.tar"))) == 3
    assert math.isnan(float(rows["Retrain"]["forget_score_mean"])) and "F = forgetting quality" in table

    again = benchmark_run(tmp_path, "--methods", "FT", "raw", "--forget_quality", "3")
    assert again.returncode == 0 and "computed 0 cell(s)" in again.stdout, again.stdout[-1500:]


@pytest.mark.parametrize("value, fragment", [("2", "N >= 3"), ("-3", "out of range")])
def test_benchmark_bad_forget_quality_exits_2_before_any_work(tmp_path, value, fragment):
    proc = run_main("benchmark.py", *BENCH, "--out", str(tmp_path / "out"), "--methods", "FT", "--forget_quality",
                    value, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_scores_are_tracked_metrics(workspace, tmp_path):
    """mlflow_forget.py logs F, Final and the two ratios as `forget_quality.*` metrics of its run (the retrained
    models of the workspace are reused), and a benchmark cell logged after the fact gets the same metrics."""
    from mlflow.tracking import MlflowClient

    from tracking import final_metrics, log_result_run

    save_dir, runs = workspace
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_main("mlflow_forget.py", *FLAGS, "--save_dir", str(save_dir), *FT_FLAGS, "--forget_quality", str(N),
                    "--result_json", str(tmp_path / "ft.json"), env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    quality = json.loads((tmp_path / "ft.json").read_text())["forget_quality"]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["forget_quality.forget_score"] == pytest.approx(quality["forget_score"])
    assert run.data.metrics["forget_quality.final_score"] == pytest.approx(quality["final_score"])
    assert run.data.metrics["forget_quality.test_acc_ratio"] == pytest.approx(quality["test_acc_ratio"])

    class Recorder:
        record, run_id = None, "r"
        metrics: dict = {}

        def start_run(self, *args, **kwargs):
            return self

        def log_epoch(self, *args, **kwargs):
            pass

        def log_metrics(self, values, step=0, timestamp_ms=None):
            self.metrics.update(values)

        def log_files(self, *args, **kwargs):
            pass

        def end(self, *args, **kwargs):
            pass

    recorder = Recorder()
    raw = runs["raw"][1]
    log_result_run(recorder, "0", "raw", raw, save_dir / "raweval_result.json", {}, {})
    assert recorder.metrics == final_metrics(raw) and recorder.metrics["forget_quality.forget_score"] == 0.0
    assert final_metrics({"UA": 1.0}) == {}


def test_signals_file_is_read_and_written_under_the_folder_lock(tmp_path, monkeypatch):
    """The retrained models' signals file is shared by every run on the split: it is read, extended and written only
    while the folder's lock is held, so two runs never interleave a read-modify-write."""
    data = load_dataset("digits")
    split = make_split(data, -1, 40, seed=1)
    splits = SplitData(data, split, batch_size=128, augment=False)
    spec = ModelSpec("resnet20s", data.num_classes, data.in_channels, 4, data.mean, data.std)
    config = ReferenceConfig("digits", spec, TrainRecipe(epochs=1, lr=0.05, batch_size=128, milestones=()),
                             num_models=3, augment=False)
    held: list[Path] = []

    @contextlib.contextmanager
    def recording_lock(target):
        held.append(Path(target))
        try:
            yield
        finally:
            held.pop()

    seen = []

    def outcomes_under_lock(directory, *args):
        seen.append(list(held))
        return fq_stage.Outcomes.empty(len(split.forget))

    monkeypatch.setattr(fq_stage, "file_lock", recording_lock)
    monkeypatch.setattr(fq_stage, "checkpoint_matches", lambda path, key, index: True)  # nothing to train
    monkeypatch.setattr(fq_stage, "_retrained_outcomes", outcomes_under_lock)
    models = fq_stage.ensure_retrained(config, data, splits, tmp_path, 3, log=lambda message: None)
    assert seen == [[models.directory]] and held == []
