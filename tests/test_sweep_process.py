"""benchmark.py as a process: its workers die with it, and its next invocation ends the parent mlflow run it left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

GRID = ["--datasets", "digits", "--seeds", "1", "--scenarios", "random", "--epochs", "2", "--width", "4",
        "--unlearn_epochs", "1", "--methods", "GA", "--out", "out", "--no-progress"]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running: a zombie (dead, not yet reaped by whoever adopted it) counts as gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_takes_the_workers_along_and_the_next_run_ends_the_stale_parent_run(tmp_path):
    from mlflow.tracking import MlflowClient

    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmark.py"), *GRID, "--jobs", "2"], cwd=tmp_path,
                            env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        workers: list[int] = []
        while time.monotonic() < deadline:  # both workers started, and a cell running
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            workers = [p for p in children(proc.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()] if alive(proc.pid) else []
            logs = tmp_path / "out" / "logs"
            if len(workers) == 2 and logs.is_dir() and any(logs.iterdir()):
                break
            time.sleep(0.2)
        assert len(workers) == 2, "the benchmark did not start its two workers in time"
        others = [p for p in children(proc.pid) if p not in workers]  # e.g. multiprocessing's resource tracker
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone_by = time.monotonic() + 10
        while any(alive(p) for p in workers + others) and time.monotonic() < gone_by:
            time.sleep(0.2)
        left = [p for p in workers + others if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in left:  # do not leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers of a killed benchmark are still running"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmark-digits")
    (killed,) = client.search_runs([experiment.experiment_id])
    assert killed.info.status == "RUNNING" and killed.data.tags["out"] == str((tmp_path / "out").resolve())

    again = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *GRID, "--jobs", "1"], cwd=tmp_path,
                           env=environment(), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert runs[killed.info.run_id].info.status == "KILLED"
    parents = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
