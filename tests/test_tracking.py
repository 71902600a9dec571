"""mlflow_forget.py and tracking.py: a real `mlflow server`, the SQLite default, an unreachable server, an outage."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# The VarGrad authors' README command for mlflow_forget.py, offline (digits) and with a tiny budget.
EPOCHS, UNLEARN_EPOCHS = 2, 2
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only fight over the 2 cores


def readme_command(save_dir: str, *extra: str) -> list[str]:
    return ["--save_dir", save_dir, "--mask", f"{save_dir}/1resnet18_ep{EPOCHS}model_SA_best.pth.tar",
            "--unlearn", "VarGrad", "--unlearn_epochs", str(UNLEARN_EPOCHS), "--unlearn_lr", "0.0001",
            "--data", "./data", "--dataset", "digits", "--seed", "1", "--arch", "resnet18", "--epochs", str(EPOCHS),
            "--num_indexes_to_replace", "130", "--beta", "0.9", "--quantile", "0.55", "--class_to_replace", "-1",
            "--width", "4", "--no-progress", *extra]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment_without_tracking(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, **ONE_THREAD, **extra}


def run_clean(script: str, *args: str, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """run_script, but with exactly this environment (run_script merges into os.environ)."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on a free local port (SQLite backend in a temp dir), killed at teardown."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    # No job runner (it starts a pool of consumer processes that the tests do not need).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("mlflow server did not become healthy within 120 s")
            time.sleep(0.5)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its own workers, nothing else
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


@pytest.fixture(scope="module")
def remote_run(mlflow_server, tmp_path_factory):
    """The README command against the server, in a fresh directory: the original and Retrain models are missing."""
    cwd = tmp_path_factory.mktemp("remote_run")
    proc = run_clean("mlflow_forget.py", *readme_command("./results/digits"), cwd=cwd,
                     env=environment_without_tracking(MLFLOW_TRACKING_URI=mlflow_server))
    return mlflow_server, cwd, proc


@pytest.mark.slow
@pytest.mark.integration
def test_readme_command_against_a_tracking_server(remote_run):
    from mlflow.tracking import MlflowClient

    uri, cwd, proc = remote_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    save_dir = cwd / "results" / "digits"
    # Trained first because missing, at the --mask path given, then the Retrain reference of this split.
    assert (save_dir / f"1resnet18_ep{EPOCHS}model_SA_best.pth.tar").is_file()
    assert list(save_dir.glob(f"1resnet18_ep{EPOCHS}_retrain_random_c-1_n130_s1_*model.pth.tar"))
    assert "is missing: training it" in proc.stdout
    result = json.loads((save_dir / "VarGradeval_result.json").read_text())
    assert not (cwd / "mlflow.db").exists(), "a remote server was given: nothing is tracked locally"

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("digits-random")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "VarGrad-random130-seed1"
    assert result["tracking"]["run_id"] == run.info.run_id and result["tracking"]["tracking_uri"] == uri

    params = run.data.params
    assert params["method"] == "VarGrad" and params["method.config"] == "NGPlus+prob"
    assert params["hp.quantile"] == "0.55" and params["data.seed"] == "1" and params["train.epochs"] == str(EPOCHS)
    assert params["hp.lr"] == "0.0001" and params["hp.grad_mask"] == "prob" and params["hp.beta"] == "0.9"
    assert not {"unlearn", "track", "no_plots", "result_json", "save_dir", "data.root"} & set(params)
    assert "None" not in params.values()
    tags = run.data.tags
    assert tags["split_hash"] == result["split_hash"] and tags["device"] == "cpu"
    assert tags["torch_version"].startswith("2.") and tags["git_commit"]

    metric_keys = ["UA", "RA", "TA", "MIA_efficacy", "rUA", "agreement", "avg_gap", "RTE_seconds", "kept_fraction",
                   *[f"SVC_MIA.{f}" for f in ("correctness", "entropy", "m_entropy", "prob")],
                   *[f"retrain.{k}" for k in ("UA", "RA", "TA", "MIA_efficacy")]]
    assert not {"accuracy.forget", "accuracy.test", "accuracy.retain", "SVC_MIA.confidence"} & set(run.data.metrics)
    assert run.data.metrics["retrain.UA"] == pytest.approx(result["retrain"]["UA"])
    for key in metric_keys:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, UNLEARN_EPOCHS + 1)), key
    ua = sorted(client.get_metric_history(run.info.run_id, "UA"), key=lambda m: m.step)
    assert ua[-1].value == pytest.approx(result["UA"])
    rte = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "RTE_seconds"), key=lambda m: m.step)]
    assert rte == sorted(rte), "RTE is cumulative"
    kept = client.get_metric_history(run.info.run_id, "kept_fraction")
    assert all(0.0 < m.value <= 1.0 for m in kept)

    def walk(path=None):
        for info in client.list_artifacts(run.info.run_id, path):
            yield from walk(info.path) if info.is_dir else [info.path]

    artifacts = set(walk())
    assert "VarGradeval_result.json" in artifacts and "config.yaml" in artifacts
    assert any(a.startswith("split/split_random_c-1_n130_s1_") for a in artifacts)
    assert any(a.startswith("plots/") and a.endswith("_curves.png") for a in artifacts)
    # this run trained both reference models: their training curves are its artifacts
    assert {"plots/1resnet18_ep2model_SA_best.png"} <= artifacts
    assert any(a.startswith("plots/1resnet18_ep2_retrain_") for a in artifacts)
    assert run.info.end_time - run.info.start_time >= 1000 * result["RTE_seconds"]
    local = Path(client.download_artifacts(run.info.run_id, "VarGradeval_result.json", str(cwd)))
    assert json.loads(local.read_text())["UA"] == pytest.approx(result["UA"])


@pytest.mark.slow
@pytest.mark.integration
def test_sqlite_default_in_the_working_directory(remote_run, tmp_path):
    from mlflow.tracking import MlflowClient

    _, remote_cwd, proc = remote_run
    assert proc.returncode == 0
    shutil.copytree(remote_cwd / "results", tmp_path / "results")  # trained models: no training here
    command = readme_command("./results/digits", "--experiment", "local", "--no-plots")
    command[command.index("VarGrad")] = "raw"  # the original model as it is: tracking is what is tested here
    proc = run_clean("mlflow_forget.py", *command, cwd=tmp_path, env=environment_without_tracking())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is missing" not in proc.stdout
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("local")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["raw-random130-seed1"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "avg_gap")] == [1]
    assert runs[0].data.params["data.dataset"] == "digits"
    assert "rawcheckpoint.pth.tar" in {p.name for p in (tmp_path / "results" / "digits").iterdir()}


@pytest.mark.integration
@pytest.mark.parametrize("script", ["mlflow_forget.py", "benchmark.py"])
def test_unreachable_server_is_one_line_and_writes_nothing(script, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    args = readme_command("./results/digits") if script == "mlflow_forget.py" else [
        "--datasets", "digits", "--methods", "GA", "--seeds", "1", "--epochs", "1", "--out", "out"]
    proc = run_clean(script, *args, cwd=tmp_path, env=environment_without_tracking(MLFLOW_TRACKING_URI=closed),
                     timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the mlflow tracking server" in lines[0] and closed in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.integration
def test_tracking_outage_keeps_the_local_result(remote_run, tmp_path, capsys):
    """The server goes away after the run started: one warning, the run finishes, the result JSON is written."""
    import torch

    import tracking
    from arg_parser import parse_config
    from pipeline.runs import tracked_forget

    _, remote_cwd, _ = remote_run
    shutil.copytree(remote_cwd / "results", tmp_path / "results")

    class Created:
        class info:
            run_id = "0" * 32

    class GoneAway:
        def create_run(self, *args, **kwargs):
            return Created()

        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise ConnectionError("connection refused")
            return fail

    tracker = tracking.MlflowTracker.__new__(tracking.MlflowTracker)
    tracker.uri, tracker.broken, tracker.client = "http://127.0.0.1:1", None, GoneAway()
    save_dir = str(tmp_path / "results" / "digits")
    command = readme_command(save_dir, "--no-plots")
    command[command.index("--unlearn_epochs") + 1] = "1"
    config = parse_config(command, "mlflow_forget.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = tracked_forget(config, tracker, "0")
    finally:
        torch.set_num_threads(threads)
    written = json.loads((Path(save_dir) / "VarGradeval_result.json").read_text())
    assert written["UA"] == pytest.approx(result["UA"]) and "tracking" not in written
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tracking stopped" in line]
    assert len(warnings) == 1


def test_epoch_metrics_flattening():
    from tracking import epoch_metrics

    metrics = {"accuracy": {"forget": 90.0, "test": 80.0}, "UA": 10.0, "RA": 99.0, "TA": 80.0, "MIA_efficacy": 12.0,
               "SVC_MIA_forget_efficacy": {"confidence": 12.0, "entropy": 30.0}, "RTE_seconds": 1.5, "rUA": 2.0,
               "agreement": 95.0, "avg_gap": 3.0, "stat_kept_fraction": 0.4, "stat_loss": 0.7, "method": "x"}
    flat = epoch_metrics(metrics)
    assert flat["kept_fraction"] == 0.4 and flat["stat.loss"] == 0.7 and flat["SVC_MIA.entropy"] == 30.0
    assert flat["avg_gap"] == 3.0 and "method" not in flat
    # one name per number: UA is 100 - accuracy.forget, TA accuracy.test, MIA_efficacy SVC_MIA.confidence
    assert "accuracy.forget" not in flat and "accuracy.test" not in flat and "SVC_MIA.confidence" not in flat
    assert epoch_metrics({"UA": 1.0}, {"kept_fraction": 0.2})["kept_fraction"] == 0.2


def test_runs_view_link_and_experiment_description(tmp_path):
    from mlflow.tracking import MlflowClient

    from tracking import EXPERIMENT_KIND, how_to_browse, open_tracker, runs_view_link

    assert runs_view_link("http://host:5000/", "7") == "http://host:5000/#/experiments/7/runs?compareRunsMode=TABLE"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "mlflow ui --backend-store-uri " + uri in how_to_browse(uri, "3")
    tracker, experiment_id = open_tracker("described", uri)
    tags = MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags
    assert "Retrain" in tags["mlflow.note.content"] and tags["mlflow.experimentKind"] == EXPERIMENT_KIND


# A tiny tracked benchmark, read back through mlflow's own client: a masked method (VarGrad) and an SGD baseline (GA).
BENCHMARK = ["--datasets", "digits", "--methods", "VarGrad", "GA", "--seeds", "1", "2", "--epochs", "2", "--width",
             "4", "--unlearn_epochs", "2", "--scenarios", "random", "--jobs", "1", "--no-progress", "--out", "out"]


@pytest.fixture(scope="module")
def tracked_benchmark(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("tracked_benchmark")
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    proc = run_clean("benchmark.py", *BENCHMARK, "--data", str(ROOT / "data"), cwd=cwd,
                     env=environment_without_tracking(MLFLOW_TRACKING_URI=uri), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return uri, cwd, proc


@pytest.mark.slow
@pytest.mark.integration
def test_tracked_benchmark_reads_back_complete(tracked_benchmark):
    from mlflow.tracking import MlflowClient

    uri, cwd, proc = tracked_benchmark
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("benchmark-digits")
    assert f"#/experiments/{experiment.experiment_id}/runs" in proc.stdout  # the link to the runs view is printed
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("sweep") == "benchmark")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    # the name asked for (VarGrad, an alias) is the run name; what it runs is a tag
    assert set(children) == {f"{name}-random130-seed{seed}" for name in ("VarGrad", "GA", "Retrain")
                             for seed in (1, 2)}
    masked, sgd = children["VarGrad-random130-seed1"], children["GA-random130-seed1"]
    assert masked.data.tags["method.config"] == "NGPlus + prob" and masked.data.tags["method"] == "VarGrad"
    train = {f"train.{k}" for k in ("arch", "width", "epochs", "lr", "momentum", "weight_decay", "milestones",
                                    "warmup", "train_seed", "amp")}
    data = {f"data.{k}" for k in ("dataset", "split", "scenario", "forget_count", "seed", "batch_size", "augment")}
    common = {"method", "method.config"} | train | data
    assert set(masked.data.params) == common | {f"hp.{k}" for k in ("lr", "epochs", "beta", "augment", "batch_size",
                                                                     "quantile", "rho", "ema", "grad_mask")}
    result = json.loads((cwd / "out" / "cells" / f"{masked.data.tags['cell_key']}.json").read_text())
    assert {k[3:] for k in masked.data.params if k.startswith("hp.")} == set(result["hyperparameters"])
    sgd_result = json.loads((cwd / "out" / "cells" / f"{sgd.data.tags['cell_key']}.json").read_text())
    # exactly what GA uses; a setting it uses but that is unset (no mask file) is no parameter
    assert set(sgd.data.params) == common | {f"hp.{k}" for k, v in sgd_result["hyperparameters"].items()
                                             if v is not None}
    assert {"hp.lr", "hp.epochs"} <= set(sgd.data.params)
    assert "hp.quantile" not in sgd.data.params and "hp.salun_ratio" not in sgd.data.params
    assert "None" not in {**masked.data.params, **sgd.data.params}.values()
    assert masked.data.params["method"] == "VarGrad" and masked.data.params["method.config"] == "NGPlus+prob"
    retrain = children["Retrain-random130-seed1"]
    assert train <= set(retrain.data.params) and retrain.data.params["method"] == "Retrain"
    # per-epoch history of a method outside the masking family, with the Retrain reference beside it
    assert [m.step for m in sorted(client.get_metric_history(sgd.info.run_id, "UA"), key=lambda m: m.step)] == [1, 2]
    reference = client.get_metric_history(sgd.info.run_id, "retrain.UA")
    assert [m.step for m in sorted(reference, key=lambda m: m.step)] == [1, 2]
    assert reference[0].value == pytest.approx(sgd_result["retrain"]["UA"])
    # real durations: at least the unlearning time (Retrain: its training time)
    for run in (masked, sgd, retrain):
        cell = json.loads((cwd / "out" / "cells" / f"{run.data.tags['cell_key']}.json").read_text())
        assert run.info.end_time - run.info.start_time >= int(1000 * cell["RTE_seconds"]), run.info.run_name

    def walk(run_id, path=None):
        for info in client.list_artifacts(run_id, path):
            yield from walk(run_id, info.path) if info.is_dir else [info.path]

    artifacts = set(walk(parent.info.run_id))
    assert {"results.md", "results.csv", "plots/avg_gap_digits_resnet18.png", "plots/tradeoff_digits_resnet18.png",
            "plots/curves_digits_resnet18.png", "plots/1resnet18_ep2model_SA_best.png"} <= artifacts
    assert any(a.startswith("plots/") and "_retrain_" in a for a in walk(retrain.info.run_id))
    assert parent.data.params["methods"] == "GA VarGrad" and parent.data.params["width"] == "{'digits': 4}"
    # where the cells ran: the executor and its workers per device (--jobs 1 on CPU: one worker)
    assert parent.data.params["executor"] == "local" and "forget_quality" not in parent.data.params
    if not torch.cuda.is_available():
        assert parent.data.params["workers"] == "cpu x1" and parent.data.params["jobs"] == "1"
    # artifact files honour the umask (0644 under the usual 022), not mlflow's private temporary files (0600)
    local = Path(client.download_artifacts(masked.info.run_id, "config.yaml", str(cwd)))
    stored = Path(urllib.request.url2pathname(client.get_run(masked.info.run_id).info.artifact_uri.removeprefix("file://")))
    assert (stored / "config.yaml").stat().st_mode & 0o044 == 0o044, oct((stored / "config.yaml").stat().st_mode)
    assert local.is_file()


def test_final_metrics_flatten_forget_quality_and_attack_summaries():
    from tracking import final_metrics

    result = {"UA": 3.0, "epochs_run": 4,
              "forget_quality": {"num_models": 8, "forget_score": 0.25, "final_score": 0.2, "retain_acc_ratio": 0.9,
                                 "test_acc_ratio": 0.8, "epsilon_quantiles": {"q50": 1.5}, "scores_file": "x.npz"},
              "per_example_mia": {"lira_online": {"auc": 0.61, "tpr_at_1pct_fpr": 0.04},
                                  "gap_lira_online": {"auc": -0.02, "tpr_at_1pct_fpr": 0.0},
                                  "ulira": None, "ulira_note": "no Retrain model", "reference_models_trained_now": 0,
                                  "seconds": {"lira_online": 0.01}, "scores_file": "s.npz"}}
    assert final_metrics(result) == {
        "forget_quality.forget_score": 0.25, "forget_quality.final_score": 0.2,
        "forget_quality.retain_acc_ratio": 0.9, "forget_quality.test_acc_ratio": 0.8,
        "mia.lira_online.auc": 0.61, "mia.lira_online.tpr_at_1pct_fpr": 0.04,
        "mia.gap_lira_online.auc": -0.02, "mia.gap_lira_online.tpr_at_1pct_fpr": 0.0}
    assert final_metrics({"UA": 3.0}) == {}
