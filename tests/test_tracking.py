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

from conftest import ROOT

# The VarGrad authors' README command for mlflow_forget.py, offline (digits) and with a tiny budget.
EPOCHS, UNLEARN_EPOCHS = 2, 2
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only fight over the 2 cores


def readme_command(save_dir: str, *extra: str) -> list[str]:
    return ["--save_dir", save_dir, "--mask", f"{save_dir}/1resnet18_ep{EPOCHS}model_SA_best.pth.tar",
            "--unlearn", "VarGrad", "--unlearn_epochs", str(UNLEARN_EPOCHS), "--unlearn_lr", "0.0001", "--data", "./data",
            "--dataset", "digits", "--seed", "1", "--arch", "resnet18", "--epochs", str(EPOCHS),
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
    assert params["unlearn"] == "VarGrad" and params["quantile"] == "0.55" and params["seed"] == "1"
    assert params["unlearn_lr"] == "0.0001" and params["hp.grad_mask"] == "prob"
    tags = run.data.tags
    assert tags["split_hash"] == result["split_hash"] and tags["device"] == "cpu"
    assert tags["torch_version"].startswith("2.") and tags["git_commit"]

    metric_keys = ["UA", "RA", "TA", "MIA_efficacy", "rUA", "agreement", "avg_gap", "RTE_seconds", "kept_fraction",
                   *[f"SVC_MIA.{f}" for f in ("correctness", "confidence", "entropy", "m_entropy", "prob")]]
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
    assert any(a.startswith("plots/") and a.endswith(".png") for a in artifacts)
    local = Path(client.download_artifacts(run.info.run_id, "VarGradeval_result.json", str(cwd)))
    assert json.loads(local.read_text())["UA"] == pytest.approx(result["UA"])


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
    assert runs[0].data.params["dataset"] == "digits"
    assert "rawcheckpoint.pth.tar" in {p.name for p in (tmp_path / "results" / "digits").iterdir()}


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


def test_tracking_outage_keeps_the_local_result(remote_run, tmp_path, capsys):
    """The server goes away after the run started: one warning, the run finishes, the result JSON is written."""
    import torch

    import pipeline
    import tracking

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
    args = pipeline.parse_forget_args(command)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = pipeline.run_forget(args, tracker, "0")
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
    assert flat["accuracy.forget"] == 90.0 and flat["avg_gap"] == 3.0 and "method" not in flat
    assert epoch_metrics({"UA": 1.0}, {"kept_fraction": 0.2})["kept_fraction"] == 0.2
