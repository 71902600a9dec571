"""Running cells: one cell in this process, in a worker or in a submitit job (`execute`), the local process pool, and
self-contained command lines for other schedulers (`command_line`, for GNU parallel or a hand-written job script).

This module is the one place that imports the run pipeline's stages (set up a run, train the references, unlearn).
The worker returns a cell's result in its report and the submitting process writes `<out>/cells/<key>.json`
(`deliver`), whatever the executor: the cell store and the tracking store have one writer each, the submitting process.
Reference models are the exception: workers write them under `<out>/models/` (files too large to send back), which is
how the original and Retrain models are trained once and shared by every worker, device and job.
Pool workers exit on their own when the process that started them dies (`_worker_init`), so a `kill -9` of
benchmark.py leaves no worker behind holding a model and its data.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from arg_parser import parse_config
from dataset import load_dataset
from pipeline import paths
from pipeline.config import RunConfig
from pipeline.runs import run_tags, tracked_forget
from pipeline.stages import ensure_original, ensure_retrain, prepare, retrain_reference_result
from scenarios import SCENARIOS
from sweep.grid import Cell, parse_cell, to_argv
from utils import DivergenceError, UserError, atomic_write_json, to_jsonable

__all__ = ["command_line", "deliver", "execute", "run_pool", "run_tags", "start_pool", "task_of"]

ROOT = Path(__file__).resolve().parents[1]
PARENT_POLL_SECONDS = 0.5

_DATA: dict[tuple, Any] = {}


def _dataset(config: RunConfig):
    key = (config.data.dataset, config.data.root)
    if key not in _DATA:
        _DATA[key] = load_dataset(config.data.dataset, config.data.root, download=config.data.download)
    return _DATA[key]


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker blocks on its task queue, whose write end it holds itself, so it never sees the parent go: watch the
    # parent's pid instead (getppid changes once the parent is gone and the worker is re-parented).
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # no cleanup to run: every file a cell writes is written atomically


def _worker_init(parent_pid: int, visible_gpus: str | None = None) -> None:
    """`visible_gpus`: pins the worker to its device (CUDA_VISIBLE_DEVICES, set before CUDA starts in this process;
    "" hides every GPU); None leaves the environment as it is."""
    if visible_gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
    import torch

    torch.set_num_threads(1)  # small models: one thread per worker beats threads fighting over the cores
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def execute(task: dict) -> dict:
    """Run one cell; its output goes to `<out>/logs/<kind>_<key>.log`.
    Returns {"key", "status", "error", "seconds", "cpu_seconds", "result"} (CPU time: a cost that survives a busy
    machine). A cell with a result (a method, the Retrain row) writes it to a private staging file, never to the
    sweep's cell store: "result" is that JSON object, as the cell's own script would have written it at --result_json,
    for the submitting process to write (`deliver`)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    log_path = Path(task["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    status, error, result = "ok", None, None
    staging = Path(tempfile.mkdtemp(prefix="cell-")) if task.get("result_json") else None
    argv = _replace_flag(task["argv"], "--result_json", str(staging / "result.json")) if staging else task["argv"]
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                _run_cell(task, argv)
                if staging is not None:
                    result = _as_if_written_at(json.loads((staging / "result.json").read_text()), task)
            except (DivergenceError, UserError) as exc:
                status, error = "failed", f"{type(exc).__name__}: {exc}"
                print(f"error: {exc}")
            except Exception as exc:  # a bug: reported, not cached, the sweep goes on
                status, error = "error", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return {"key": task["key"], "status": status, "error": error, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start, "result": result}


def _run_cell(task: dict, argv: list[str]) -> None:
    scenario = SCENARIOS.get(task["scenario"])
    if task["kind"] == "method" and scenario is not None and scenario.run_cell is not None:
        scenario.run_cell(argv)
        return
    config = parse_cell(argv)
    run = prepare(config, data=_dataset(config))
    if task["kind"] == "original":
        ensure_original(run, paths.original_model(config.output.save_dir, config.data, config.model))
    elif task["kind"] == "retrain":
        ensure_retrain(run)
    elif task["kind"] == "reference":
        from evaluation import write_result

        result = retrain_reference_result(run)
        if config.eval.forget_quality:
            from pipeline.forget_quality import retrained_models_of_run

            models = retrained_models_of_run(run, config.model.width)
            result["forget_quality_retrained"] = {"num_models": config.eval.forget_quality,
                                                  "directory": str(models.directory),
                                                  "trained_now": len(models.trained_now), "seconds": models.seconds}
        write_result(config.output.result_json, result)
    else:
        from tracking import NullTracker  # tracking imports mlflow only when a real tracker is opened

        tracked_forget(config, NullTracker(), p=run)


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    position = argv.index(flag)
    return argv[:position + 1] + [value] + argv[position + 2:]


def _as_if_written_at(result: dict, task: dict) -> dict:
    """The staged result with the one value that names the staging file (its record of --result_json) set back to what
    the cell's command line says, so the file the submitting process writes is the file the cell's script writes."""
    args = result.get("args")
    if isinstance(args, dict) and "result_json" in args:
        scenario = SCENARIOS.get(task["scenario"])
        script = scenario.script if task["kind"] == "method" and scenario is not None else None
        config = parse_cell(task["argv"]) if script is None else parse_config(task["argv"], script)
        args["result_json"] = to_jsonable(config.flags["result_json"])
    return result


def deliver(cell: Cell, report: dict, out: Path) -> None:
    """In the submitting process: write the cell's result file (atomically) from a worker's report."""
    if report.get("status") == "ok" and report.get("result") is not None:
        atomic_write_json(cell.result_path(out), report["result"])


def task_of(cell: Cell, out: Path) -> dict:
    result_json = str(cell.result_path(out)) if cell.kind in ("method", "reference") else None
    argv = cell.argv + to_argv({"no_progress": True, "track": False, "no_plots": True, "no_save_model": True,
                                "result_json": result_json})
    # The log path is absolute: a job on a cluster node may start in another directory.
    return {"key": cell.key, "kind": cell.kind, "scenario": cell.scenario, "argv": argv, "result_json": result_json,
            "log": str((out / "logs" / f"{cell.kind}_{cell.key}.log").absolute())}


def run_pool(pending: list[Cell], out: Path, jobs: int, finished: set[str], dead: set[str],
             handle: Callable[[Cell, dict], None], skip: Callable[[Cell], None]) -> None:
    """Run `pending` on `jobs` CPU worker processes, each cell as soon as its dependencies are in `finished`; a cell
    whose dependency is in `dead` is skipped (`skip(cell)`, and it joins `dead`). `handle(cell, report)` sees each
    report in this process, after the cell's result file is written, and updates `finished` / `dead`."""
    from sweep.executors import LocalPools, Slot, schedule

    with LocalPools([Slot("cpu", None, jobs)]) as pools:
        schedule(pending, out, finished, dead, handle, skip, pools)


def start_pool(workers: int, visible_gpus: str | None) -> futures.ProcessPoolExecutor:
    """`workers` worker processes (fresh interpreters: no forked torch thread pools), pinned to `visible_gpus`."""
    return futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(os.getpid(), visible_gpus))


def command_line(cell: Cell, out: Path, tracking: dict | None) -> str:
    """A self-contained shell line: absolute paths, the tracking URI in the environment, the cell's result file in the
    sweep's out dir (so benchmark.py later aggregates it instead of computing it again)."""
    scenario = SCENARIOS[cell.scenario]
    argv = cell.argv + to_argv({"no_save_model": True, "result_json": str(cell.result_path(out).resolve()),
                                "track": bool(tracking), "experiment": (tracking or {}).get("experiment"),
                                "parent_run_id": (tracking or {}).get("parent_run_id")})
    env = f"MLFLOW_TRACKING_URI={shlex.quote(tracking['uri'])} " if tracking else ""
    script = ROOT / scenario.script
    return (f"cd {shlex.quote(str(Path.cwd()))} && {env}{shlex.quote(sys.executable)} -u {shlex.quote(str(script))} "
            + " ".join(shlex.quote(a) for a in argv))
