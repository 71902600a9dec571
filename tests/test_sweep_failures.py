"""How a sweep meets failures: a pool worker that dies, a failure caused by the environment, a cell file that cannot be
parsed, an out dir that stops being writable, and a second benchmark on the same out dir."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sweep.executors as executors
from conftest import ROOT, run_main
from sweep import Settings, Sweep
from sweep.grid import Cell, is_done, read_cell_json
from sweep.lock import LOCK_FILE, OutDirLock
from utils import DivergenceError, EnvironmentUserError, UserError

# The module (the package's `sweep.execute` attribute is the function of that name).
execute_module = importlib.import_module("sweep.execute")

GRID = ["--datasets", "digits", "--scenarios", "random", "--seeds", "1", "--epochs", "2", "--width", "4",
        "--unlearn_epochs", "1", "--no-progress", "--no-track"]


def settings(out: Path, methods: list[str], jobs: int = 1) -> Settings:
    return Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random"], methods=methods, seeds=[1],
                    out=out, epochs=2, unlearn_epochs=1, width=4, jobs=jobs, device="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Cell functions for the pool's workers: module-level, so a spawned worker imports them by name
# ---------------------------------------------------------------------------------------------------------------------

def die_on_ga(task: dict) -> dict:
    """The cell function, except that the worker running GA's cell is killed as the kernel's OOM killer would."""
    if task["kind"] == "method" and "GA" in task["argv"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return execute_module.execute(task)


def quick(task: dict) -> dict:
    """A cell that succeeds at once, except two that meet through marker files in the out dir, so that the test needs
    no timing: "slow-*" runs until its pool breaks (on a second start it returns), and "die-*" kills its worker as soon
    as the slow cell is running."""
    out = Path(task["log"]).parents[1]
    if task["key"].startswith("slow"):
        marker = out / f"{task['key']}.started"
        if not marker.exists():
            marker.touch()
            time.sleep(120.0)  # the broken pool terminates this worker long before
    elif task["key"].startswith("die"):
        deadline = time.monotonic() + 120.0
        while not list(out.glob("slow*.started")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return {"key": task["key"], "status": "ok", "error": None, "seconds": 0.0, "cpu_seconds": 0.0, "result": None,
            "permanent": False, "pid": os.getpid()}


class FakeRun:
    run_id = None  # no child runs are logged under it

    def __init__(self):
        self.status = "RUNNING"

    def end(self, status: str) -> None:
        self.status = status


class FakeTracker:
    uri = "fake://"

    def end_stale_runs(self, *args) -> None:
        pass

    def start_run(self, *args, **kwargs) -> FakeRun:
        self.run = FakeRun()
        return self.run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An out dir whose original and Retrain models (and Retrain row) exist; tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "out"
    outcome = Sweep(settings(out, ["FT"]), progress=False).run()
    assert not outcome.errors and not outcome.failed, outcome.errors + outcome.failed
    return out


def copy_of(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    (out / LOCK_FILE).unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# A worker that dies
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_dead_worker_fails_its_own_cell_and_the_cells_sharing_its_pool_run_again(tmp_path):
    cells = [Cell("method", key, "digits", "resnet18", "random", 1, []) for key in ("slow-1", "die-2", "after-3")]
    reports: dict[str, dict] = {}
    started = time.monotonic()
    with executors.LocalPools([executors.Slot("cpu", None, 2)], run=quick) as pools:
        executors.schedule(cells, tmp_path, set(), set(), lambda cell, report: reports.__setitem__(cell.key, report),
                           lambda cell: None, pools)
        # The slow cell sleeps 120 s unless the death breaks its pool: a death that went unseen until it woke up
        # (a worker started after the pool's manager thread last looked) would take that long.
        assert time.monotonic() - started < 60, "the worker's death was noticed only when the other cell ended"
        assert len(pools.rerun) >= 1, "the cell that shared the pool was run again"
    assert set(reports) == {"slow-1", "die-2", "after-3"}
    died = reports["die-2"]
    assert died["status"] == "error" and "killed by SIGKILL" in died["error"]
    assert str(tmp_path / "logs" / "method_die-2.log") in died["error"], "the report names the cell's log"
    assert reports["slow-1"]["status"] == "ok" and reports["after-3"]["status"] == "ok", "on a restarted pool"


def test_a_pool_starts_all_its_workers_at_the_first_submit():
    """So that the pool's manager thread watches every worker from the start (`start_pool`)."""
    with executors.start_pool(2, None) as pool:
        pool.submit(os.getpid).result(timeout=120)
        assert len(pool._processes) == 2


@pytest.mark.slow
@pytest.mark.integration
def test_a_sweep_whose_worker_is_killed_finishes_and_reports_the_death(trained, tmp_path, monkeypatch):
    out = copy_of(trained, tmp_path)
    monkeypatch.setattr(executors, "execute", die_on_ga)
    outcome = Sweep(settings(out, ["GA", "FT"], jobs=2), progress=False).run()
    (error,) = outcome.errors
    assert error.startswith("method GA") and "killed by SIGKILL" in error and "method_" in error, error
    assert [row["method"] for row in outcome.rows if row["seeds"]] == ["Retrain", "FT"], "the sweep went on"
    assert not list((out / "cells").glob("*.failed.json")), "a dead worker is not the method's failure"
    assert (out / "results.md").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Which failures are remembered
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc, permanent", [(EnvironmentUserError("svhn files missing"), False),
                                            (UserError("--unlearn_lr -1 is out of range"), True),
                                            (DivergenceError("non-finite loss", epoch=2), True)])
def test_only_a_methods_own_failure_is_permanent(tmp_path, monkeypatch, exc, permanent):
    def fail(task, argv):
        raise exc

    monkeypatch.setattr(execute_module, "_run_cell", fail)
    report = execute_module.execute({"key": "k", "kind": "method", "scenario": "random", "argv": [],
                                     "result_json": None, "log": str(tmp_path / "logs" / "k.log"), "threads": 1})
    assert report["status"] == "failed" and report["permanent"] is permanent
    assert report["error"] == f"{type(exc).__name__}: {exc}"


def test_a_missing_dataset_and_an_unwritable_folder_are_environment_errors(tmp_path):
    from dataset import load_dataset
    from utils import ensure_writable_dir, load_checkpoint

    with pytest.raises(EnvironmentUserError, match="cifar10 files missing"):
        load_dataset("cifar10", tmp_path, download=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(EnvironmentUserError, match="cannot write to directory"):
        ensure_writable_dir(tmp_path / "file" / "below")
    # A model file missing or damaged is fixed by replacing the file: not a method's failure to remember.
    with pytest.raises(EnvironmentUserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth.tar")
    with pytest.raises(EnvironmentUserError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "file")


@pytest.mark.slow
@pytest.mark.integration
def test_an_environment_error_is_retried_without_rerun_and_a_methods_failure_is_not(trained, tmp_path, monkeypatch):
    out = copy_of(trained, tmp_path)
    run_cell = execute_module._run_cell

    def failing(error: Exception):
        def run(task, argv):
            if task["kind"] == "method":
                raise error
            return run_cell(task, argv)
        return run

    monkeypatch.setattr(execute_module, "_run_cell", failing(EnvironmentUserError("data missing")))
    first = Sweep(settings(out, ["GA"]), progress=False).run()
    assert len(first.failed) == 1 and "retried at the next invocation" in first.failed[0]
    assert not list((out / "cells").glob("*.failed.json"))
    monkeypatch.setattr(execute_module, "_run_cell", run_cell)  # the data is back
    second = Sweep(settings(out, ["GA"]), progress=False).run()
    assert second.computed == 1 and not second.failed and second.method_rows_with_results == 1

    monkeypatch.setattr(execute_module, "_run_cell", failing(UserError("a refused hyper-parameter")))
    third = Sweep(settings(out, ["RL"]), progress=False).run()
    assert len(third.failed) == 1 and len(list((out / "cells").glob("*.failed.json"))) == 1
    fourth = Sweep(settings(out, ["RL"]), progress=False).run()
    assert fourth.computed == 0 and fourth.reused == 4, "remembered: not run again without --rerun"


# ---------------------------------------------------------------------------------------------------------------------
# The cell store
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"[" * 100_000, b"{\"args\": " + b"[" * 50_000, b"\xff\xfe{}", b"1" * 5000,
                                     b"{\"UA\": 1", b"[]"])
def test_a_cell_file_that_cannot_be_parsed_is_missing(tmp_path, content):
    cell = Cell("method", "k", "digits", "resnet18", "random", 1, [])
    cell.result_path(tmp_path).parent.mkdir(parents=True)
    cell.result_path(tmp_path).write_bytes(content)
    cell.failure_path(tmp_path).write_bytes(content)
    assert read_cell_json(cell.result_path(tmp_path)) is None
    assert not is_done(cell, tmp_path)


@pytest.mark.slow
@pytest.mark.integration
def test_an_out_dir_that_stops_being_writable_is_one_line_and_the_parent_run_failed(trained, tmp_path, monkeypatch):
    out = copy_of(trained, tmp_path)
    real = execute_module.execute

    def then_break_the_store(task: dict) -> dict:
        report = real(task)
        if task["kind"] == "method":  # the cells folder goes (a full or unmounted disk, a removed folder)
            shutil.rmtree(out / "cells")
            (out / "cells").write_text("not a folder")
        return report

    monkeypatch.setattr(executors, "execute", then_break_the_store)
    tracker = FakeTracker()
    with pytest.raises(EnvironmentUserError, match="cannot write .*cells.*must stay writable"):
        Sweep(settings(out, ["GA"]), tracker=tracker, progress=False).run()
    assert tracker.run.status == "FAILED", "the parent run is closed, not left RUNNING"

    shutil.rmtree(out)
    out = copy_of(trained, tmp_path)
    proc = run_main("benchmark.py", *GRID, "--methods", "GA", "--jobs", "1", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: cannot write"), proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# One benchmark per out dir
# ---------------------------------------------------------------------------------------------------------------------

def test_a_second_benchmark_on_the_same_out_says_who_holds_it_and_does_nothing(tmp_path):
    out = tmp_path / "out"
    with OutDirLock(out, ["benchmark.py", "--out", "out", "--seeds", "7"]):
        proc = run_main("benchmark.py", *GRID, "--methods", "GA", "--out", str(out), cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"is in use by process {os.getpid()}" in proc.stderr
        assert "(benchmark.py --out out --seeds 7)" in proc.stderr
        assert [p.name for p in out.iterdir()] == [LOCK_FILE], "nothing else written"
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (out / LOCK_FILE).read_text() == "", "released: no holder recorded"


@pytest.mark.slow
def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from sweep.lock import OutDirLock\n"
                               "with OutDirLock(Path(sys.argv[1]), ['benchmark.py', '--dead']):\n"
                               "    print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} .*benchmark.py --dead"):
            OutDirLock(out, ["benchmark.py"]).__enter__()
        holder.send_signal(signal.SIGKILL)  # no chance to release: the record of a dead process stays behind
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    with OutDirLock(out, ["benchmark.py", "--again"]):
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["command"] == ["benchmark.py", "--again"]


# ---------------------------------------------------------------------------------------------------------------------
# A cell's thread count
# ---------------------------------------------------------------------------------------------------------------------

def test_threads_sets_the_runs_thread_count_and_a_cell_restores_the_callers(tmp_path, monkeypatch):
    import torch

    from arg_parser import parse_config
    from pipeline.stages import prepare

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        base = ["--dataset", "digits", "--num_indexes_to_replace", "10", "--data", str(tmp_path)]
        prepare(parse_config(base, "mlflow_forget.py"), announce=False)
        assert torch.get_num_threads() == 2, "no --threads: the script's default is left alone"
        prepare(parse_config([*base, "--threads", "1"], "mlflow_forget.py"), announce=False)
        assert torch.get_num_threads() == 1

        torch.set_num_threads(2)
        seen = []
        monkeypatch.setattr(execute_module, "_run_cell", lambda task, argv: seen.append(torch.get_num_threads()))
        execute_module.execute({"key": "k", "kind": "original", "scenario": "random", "argv": [], "result_json": None,
                                "log": str(tmp_path / "k.log"), "threads": 1})
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_every_way_of_running_a_cell_gives_it_one_thread(tmp_path):
    cell = Cell("method", "k", "digits", "resnet18", "random", 1, ["--unlearn", "GA", "--dataset", "digits"])
    task = execute_module.task_of(cell, tmp_path)
    assert task["threads"] == execute_module.CELL_THREADS == 1
    assert task["argv"][task["argv"].index("--threads") + 1] == "1"
    assert " --threads 1 " in execute_module.command_line(cell, tmp_path, None) + " "
