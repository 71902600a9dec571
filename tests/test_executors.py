"""Executors of the benchmark: submitit jobs (its local cluster stands in for SLURM) give the local executor's numbers,
an interrupted submitit sweep collects its running jobs instead of submitting them again, workers never touch mlflow,
and devices, clusters and a missing submitit are checked before any work."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

GRID = ["--datasets", "digits", "--scenarios", "random", "--epochs", "2", "--width", "4", "--unlearn_epochs", "1",
        "--no-progress"]
SUBMITIT_LOCAL = ["--executor", "submitit", "--cluster", "local", "--slurm-array-parallelism", "2"]

# Installed in every process of a run through PYTHONPATH: records, per process id, the watched modules it imports.
IMPORT_RECORDER = '''
import importlib.abc, os, sys

class _Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("mlflow", "sqlalchemy", "pipeline.runs"):
            with open(os.path.join(os.environ["IMPORT_LOG"], str(os.getpid())), "a") as log:
                log.write(name + "\\n")
        return None

sys.meta_path.insert(0, _Recorder())
'''


def environment(extra_path: Path | None = None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    path = f"{extra_path}:{ROOT}" if extra_path else str(ROOT)
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def benchmark(*args: str, cwd: Path, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *args], cwd=cwd, env=env or environment(),
                          capture_output=True, text=True, timeout=timeout)


def recorded_imports(folder: Path) -> dict[int, set[str]]:
    return {int(p.name): set(p.read_text().split()) for p in folder.iterdir()}


def run_recorded(cwd: Path, *args: str, threads: str = "1") -> tuple[subprocess.Popen, str, dict[int, set[str]]]:
    """benchmark.py with the import recorder in every process it starts; tracked in ./mlflow.db. `threads`: the
    process's OMP_NUM_THREADS ("" leaves torch's default, every core)."""
    hook, log = cwd / "hook", cwd / "imports"
    hook.mkdir()
    log.mkdir()
    (hook / "sitecustomize.py").write_text(IMPORT_RECORDER)
    env = environment(hook, IMPORT_LOG=str(log), OMP_NUM_THREADS=threads)
    if not threads:
        del env["OMP_NUM_THREADS"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmark.py"), *GRID, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=500)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return proc, stdout, recorded_imports(log)


@pytest.fixture(scope="module")
def both_executors(tmp_path_factory):
    """The same small benchmark (two methods, one seed) on the local pool, as submitit jobs, and in the submitting
    process (--jobs 1) with torch's default thread count: every cell fixes its own (--threads 1)."""
    runs = {}
    for name, flags, threads in (("local", ["--jobs", "2"], "1"), ("submitit", SUBMITIT_LOCAL, "1"),
                                 ("in-process", ["--jobs", "1"], "")):
        cwd = tmp_path_factory.mktemp(name)
        runs[name] = (cwd, *run_recorded(cwd, "--seeds", "1", "--methods", "GA", "FT", "--out", "out", *flags,
                                         threads=threads))
    return runs


def without_timing(value):
    """A result without what differs between two runs of one cell: times, and the id of its tracked run."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items()
                if k not in ("RTE_seconds", "started_at", "finished_at", "run_id")}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


@pytest.mark.slow
@pytest.mark.integration
def test_submitit_jobs_give_the_local_executors_numbers(both_executors):
    tables = {}
    for name, (cwd, _, stdout, _) in both_executors.items():
        assert "computed 5 cell(s), reused 0" in stdout, stdout[-2000:]  # original, Retrain, raw, GA, FT
        tables[name] = {row["method"]: {k: v for k, v in row.items() if not k.startswith("RTE")}
                        for row in csv.DictReader((cwd / "out" / "results.csv").open())}
    assert set(tables["local"]) == {"Retrain", "GA", "FT"}
    assert tables["submitit"] == tables["local"]
    assert tables["in-process"] == tables["local"]

    # Cell files: the same bytes but for timings and the out dir the paths name.
    local_cwd, sub_cwd = both_executors["local"][0], both_executors["submitit"][0]
    cells = sorted(p.name for p in (local_cwd / "out" / "cells").iterdir())
    assert len(cells) == 3  # Retrain, GA, FT
    for other in ("submitit", "in-process"):
        other_cwd = both_executors[other][0]
        assert cells == sorted(p.name for p in (other_cwd / "out" / "cells").iterdir()), other
        for name in cells:
            local = (local_cwd / "out" / "cells" / name).read_text().replace(str(local_cwd), "<cwd>")
            theirs = (other_cwd / "out" / "cells" / name).read_text().replace(str(other_cwd), "<cwd>")
            assert without_timing(json.loads(theirs)) == without_timing(json.loads(local)), (other, name)
            assert json.loads(theirs)["args"]["result_json"] == f"out/cells/{name}", "as the cell's command line says"
            assert json.loads(theirs)["args"]["threads"] == 1, "the cell's own thread count, recorded"

    jobs = json.loads((sub_cwd / "out" / "jobs.json").read_text())
    assert len(jobs) == 5 and {job["state"] for job in jobs.values()} == {"finished"}
    assert all((sub_cwd / "out" / job["stdout"]).is_file() for job in jobs.values()), "in <out>/submitit"
    assert {job["folder"].split("/")[0] for job in jobs.values()} == {"submitit"}, "relative to the out dir"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("executor", ["local", "submitit"])
def test_only_the_submitting_process_imports_mlflow(both_executors, executor):
    cwd, proc, _, imports = both_executors[executor]
    workers = [pid for pid, names in imports.items() if "pipeline.runs" in names and pid != proc.pid]
    assert workers, "the recorder saw no worker run a cell: it would not see a worker import mlflow either"
    assert "mlflow" in imports.get(proc.pid, set()), "the submitting process tracks"
    assert [pid for pid, names in imports.items() if names & {"mlflow", "sqlalchemy"}] == [proc.pid]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("benchmark-digits").experiment_id])
    assert sum("mlflow.parentRunId" in r.data.tags for r in runs) == 3, "one child run per method and Retrain cell"


class Payload:
    """Unpickling it runs code: it touches the file it names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
@pytest.mark.integration
def test_a_copied_out_dir_collects_its_jobs_from_their_json_reports_and_never_unpickles(both_executors, tmp_path,
                                                                                        monkeypatch):
    """A job recorded as submitted whose cell file is gone: the next invocation collects its report from the job's
    folder in this out dir (a copy, whose report differs from the original's), without loading the result pickle
    planted there."""
    import pickle

    import submitit

    import benchmark as entry
    from sweep.executors import REPORT_FILE

    original = both_executors["submitit"][0] / "out"
    out = tmp_path / "out"
    shutil.copytree(original, out, ignore=shutil.ignore_patterns("benchmark.lock"))
    jobs = json.loads((out / "jobs.json").read_text())
    key, record = next((k, r) for k, r in jobs.items() if r["kind"] == "method")
    cell_file = out / "cells" / f"{key}.json"
    expected = json.loads(cell_file.read_text())
    expected.pop("tracking")  # added when the cell was logged to the tracked run; this invocation is not tracked
    cell_file.unlink()
    record["state"] = "submitted"
    (out / "jobs.json").write_text(json.dumps(jobs))
    marker = tmp_path / "payload-ran"
    folder = out / record["folder"]
    report_file = folder / REPORT_FILE.replace("%j", record["job_id"])
    report = json.loads(report_file.read_text())
    report["result"]["UA"] = expected["UA"] = 12.5  # this copy's report, not the original's
    report_file.write_text(json.dumps(report))
    (folder / f"{record['job_id']}_0_result.pkl").write_bytes(pickle.dumps(("success", Payload(marker))))

    def refuse(*args, **kwargs):
        raise AssertionError("the submitting process unpickled a job's file")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(submitit.core.core.Job, "result", refuse)
    monkeypatch.setattr(submitit.core.core.Job, "results", refuse)
    args = [*GRID, "--seeds", "1", "--methods", "GA", "FT", "--no-track", "--out", str(out), *SUBMITIT_LOCAL]
    assert entry.main(args) == 0
    assert not marker.exists()
    assert json.loads((out / "jobs.json").read_text())[key]["state"] == "finished"
    assert without_timing(json.loads(cell_file.read_text())) == without_timing(expected)


def _wait_for(condition, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.integration
def test_kill_and_invoke_again_collects_running_jobs_and_reuses_finished_cells(tmp_path):
    args = [*GRID, "--seeds", "1", "--methods", "GA", "--out", "out", "--no-track", *SUBMITIT_LOCAL]
    jobs_file = tmp_path / "out" / "jobs.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmark.py"), *args], cwd=tmp_path, env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(jobs_file.is_file, 180, proc)  # the first array (original and Retrain models) is submitted
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = json.loads(jobs_file.read_text())
    assert {job["kind"] for job in before.values()} == {"original", "retrain"}
    assert {job["state"] for job in before.values()} == {"submitted"}
    try:
        again = benchmark(*args, cwd=tmp_path)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
        after = json.loads(jobs_file.read_text())
        for key, job in before.items():  # collected, not submitted a second time
            assert after[key]["job_id"] == job["job_id"] and after[key]["state"] == "finished"
        assert len(after) == 4 and "computed 4 cell(s), reused 0" in again.stdout
        third = benchmark(*args, cwd=tmp_path)
        assert third.returncode == 0 and "computed 0 cell(s), reused 4" in third.stdout
        assert json.loads(jobs_file.read_text()) == after, "nothing submitted"
    finally:
        for job in before.values():  # never leave a job of this test running
            try:
                os.kill(int(job["job_id"]), signal.SIGKILL)
            except OSError:
                pass


def test_a_job_that_dies_is_reported_with_its_log(tmp_path, monkeypatch):
    """A job killed from outside (out of memory, a lost node) is an error of its cell, with submitit's log path."""
    import sweep.executors as executors
    from sweep.grid import Cell

    jobs = executors.SubmititJobs("local", {"time": 5, "gpus_per_job": 0, "cpus_per_job": 1, "array_parallelism": 1,
                                            "folder": None}, tmp_path, 1)
    cell = Cell("method", "k1", "digits", "resnet18", "random", 1, ["--unlearn", "GA"])
    job = jobs.executor.submit(time.sleep, 20)
    jobs.running[cell.key] = (cell, job)
    jobs.records[cell.key] = {"job_id": job.job_id, "state": "submitted", "cluster": "local"}
    monkeypatch.setattr(job, "_results_timeout_s", 1, raising=False)
    job._process.kill()
    ((_, report),) = jobs.wait()
    assert report["status"] == "error" and str(job.paths.stderr) in report["error"]
    assert json.loads((tmp_path / "jobs.json").read_text())["k1"]["state"] == "failed"


def test_plan_slots_pins_one_worker_per_gpu(monkeypatch):
    import torch

    from sweep.executors import Slot, plan_slots
    from utils import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert plan_slots(None, "auto", 8, None) == [Slot("cuda:0", "0", 1), Slot("cuda:1", "1", 1)]
    assert plan_slots(["cuda:1", "cpu"], "auto", 3, None) == [Slot("cuda:1", "1", 1), Slot("cpu", "", 3)]
    assert plan_slots(["cuda:0"], "auto", 8, 2) == [Slot("cuda:0", "0", 2)]
    assert plan_slots(None, "cpu", 4, None) == [Slot("cpu", None, 4)], "--device cpu: as before"
    with pytest.raises(UserError, match="cuda:0 to cuda:1"):
        plan_slots(["cuda:2"], "auto", 1, None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert plan_slots(None, "auto", 8, None) == [Slot("cuda:0", None, 1)], "one GPU: one worker, as before"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan_slots(None, "auto", 4, None) == [Slot("auto", None, 4)], "no GPU: --jobs CPU workers, as before"


def test_a_pinned_worker_sees_only_its_device():
    from sweep.executors import start_pool

    with start_pool(1, "1") as pool:
        assert pool.submit(os.getenv, "CUDA_VISIBLE_DEVICES").result(timeout=120) == "1"


@pytest.mark.integration  # benchmark.py in a process: CUDA_VISIBLE_DEVICES is read when CUDA starts
def test_bad_execution_input_is_one_line_before_any_work(tmp_path, monkeypatch):
    import benchmark as entry
    from utils import UserError

    proc = benchmark(*GRID, "--devices", "cuda:7", "--no-track", "--out", "out", cwd=tmp_path,
                     env=environment(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--devices cuda:7: this machine has no GPU" in proc.stderr
    proc = benchmark(*GRID, "--executor", "submitit", "--cluster", "nowhere", "--no-track", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--cluster" in proc.stderr

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    base = [*GRID, "--no-track", "--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match="sbatch is not on PATH"):
        entry.main([*base, "--executor", "submitit", "--cluster", "slurm"])
    for tool, code in (("sbatch", "exit 0"), ("sinfo", "echo 'sinfo: error: Unable to contact slurm controller' >&2; "
                                                     "exit 1")):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{code}\n")
        (bin_dir / tool).chmod(0o755)
    with pytest.raises(UserError, match="no SLURM controller answers .*Unable to contact"):
        entry.main([*base, "--executor", "submitit", "--cluster", "slurm"])

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(UserError, match=r"^--executor submitit needs the submitit package.*: pip install submitit$"):
        entry.main([*base, "--executor", "submitit", "--cluster", "local"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"], "nothing written"


def test_a_debug_job_hands_its_report_back_through_a_json_file_in_its_folder(tmp_path, monkeypatch):
    """submitit's debug cluster runs the job here: the cell's report still comes back as the job folder's JSON file,
    validated against the cell (a report of another cell, or a broken file, is an error of the job)."""
    import sweep.executors as executors
    from sweep.grid import Cell

    def fake(task: dict) -> dict:
        key = "another" if task["key"] == "wrong-key" else task["key"]
        return {"key": key, "status": "ok", "error": None, "seconds": 1.5, "cpu_seconds": 1.0, "permanent": False,
                "result": {"args": {}, "RTE_seconds": 1.5, "UA": 3.0}}

    monkeypatch.setattr(executors, "execute", fake)
    slurm = {"time": 5, "gpus_per_job": 0, "cpus_per_job": 1, "array_parallelism": 2, "folder": None}
    jobs = executors.SubmititJobs("debug", slurm, tmp_path, 2)
    cells = [Cell("method", key, "digits", "resnet18", "random", 1, ["--unlearn", "GA"]) for key in ("k1", "wrong-key")]
    jobs.start(cells, tmp_path)
    reports = {}
    while len(reports) < 2:
        reports.update({cell.key: report for cell, report in jobs.wait()})
    assert reports["k1"]["status"] == "ok" and reports["k1"]["result"]["UA"] == 3.0
    assert reports["wrong-key"]["status"] == "error" and "without a valid report" in reports["wrong-key"]["error"]
    record = json.loads((tmp_path / "jobs.json").read_text())["k1"]
    folder = tmp_path / record["folder"]
    assert not Path(record["folder"]).is_absolute() and folder.parent == tmp_path / "submitit"
    assert json.loads((folder / executors.REPORT_FILE.replace("%j", record["job_id"])).read_text())["key"] == "k1"


class RecordingExecutor:
    """Two slots; a cell ends at the next `wait` after its start, in start order; every call is recorded."""

    capacity = 2

    def __init__(self, events: list):
        self.events, self.running = events, []

    def adopt(self, cells, out):
        return []

    def start(self, cells, out):
        self.events += [("start", cell.key) for cell in cells]
        self.running += cells

    def wait(self):
        cell = self.running.pop(0)
        return [(cell, {"key": cell.key, "status": "ok", "result": None})]


def test_a_freed_slot_is_filled_before_the_finished_cell_is_handled(tmp_path):
    """The submitting process tracks a finished cell (slow): the next ready cell already runs meanwhile; a cell that
    waits for the finished one starts when the next slot frees."""
    from sweep.executors import schedule
    from sweep.grid import Cell

    a, b, c = (Cell("method", key, "digits", "resnet18", "random", 1, []) for key in "abc")
    after_a = Cell("method", "after-a", "digits", "resnet18", "random", 1, [], deps=["a"])
    events: list = []
    finished: set[str] = set()

    def handle(cell, report):
        events.append(("handle", cell.key))
        finished.add(cell.key)

    schedule([a, b, after_a, c], tmp_path, finished, set(), handle, lambda cell: None, RecordingExecutor(events))
    assert events[:6] == [("start", "a"), ("start", "b"), ("start", "c"), ("handle", "a"), ("start", "after-a"),
                          ("handle", "b")], events
    assert sorted(key for kind, key in events if kind == "handle") == ["a", "after-a", "b", "c"]
