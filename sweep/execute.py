"""Running cells: one cell in this process or in a worker (`execute`), the local process pool, and self-contained
command lines for other schedulers (SLURM, GNU parallel).

This module is the one place that imports the run pipeline's stages (set up a run, train the references, unlearn).
Workers exit on their own when the process that started them dies (`_worker_init`), so a `kill -9` of benchmark.py
leaves no worker behind holding a model and its data.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import multiprocessing
import os
import shlex
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from dataset import load_dataset
from pipeline import paths
from pipeline.config import RunConfig
from pipeline.runs import run_tags, tracked_forget
from pipeline.stages import ensure_original, ensure_retrain, prepare, retrain_reference_result
from scenarios import SCENARIOS
from sweep.grid import Cell, parse_cell, to_argv
from utils import DivergenceError, UserError

__all__ = ["command_line", "execute", "run_pool", "run_tags", "task_of"]

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


def _worker_init(parent_pid: int) -> None:
    import torch

    torch.set_num_threads(1)  # small models: one thread per worker beats threads fighting over the cores
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def execute(task: dict) -> dict:
    """Run one cell; its output goes to `<out>/logs/<kind>_<key>.log`.
    Returns {"key", "status", "error", "seconds", "cpu_seconds"} (CPU time: a cost that survives a busy machine)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    log_path = Path(task["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    status, error = "ok", None
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            scenario = SCENARIOS.get(task["scenario"])
            if task["kind"] == "method" and scenario is not None and scenario.run_cell is not None:
                scenario.run_cell(task["argv"])
            else:
                config = parse_cell(task["argv"])
                run = prepare(config, data=_dataset(config))
                if task["kind"] == "original":
                    ensure_original(run, paths.original_model(config.output.save_dir, config.data, config.model))
                elif task["kind"] == "retrain":
                    ensure_retrain(run)
                elif task["kind"] == "reference":
                    from evaluation import write_result

                    write_result(config.output.result_json, retrain_reference_result(run))
                else:
                    from tracking import NullTracker

                    tracked_forget(config, NullTracker(), p=run)
        except (DivergenceError, UserError) as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            print(f"error: {exc}")
        except Exception as exc:  # a bug: reported, not cached, the sweep goes on
            status, error = "error", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    return {"key": task["key"], "status": status, "error": error, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start}


def task_of(cell: Cell, out: Path) -> dict:
    result_json = str(cell.result_path(out)) if cell.kind in ("method", "reference") else None
    argv = cell.argv + to_argv({"no_progress": True, "track": False, "no_plots": True, "no_save_model": True,
                                "result_json": result_json})
    return {"key": cell.key, "kind": cell.kind, "scenario": cell.scenario, "argv": argv,
            "log": str(out / "logs" / f"{cell.kind}_{cell.key}.log")}


def run_pool(pending: list[Cell], out: Path, jobs: int, finished: set[str], dead: set[str],
             handle: Callable[[Cell, dict], None], skip: Callable[[Cell], None]) -> None:
    """Run `pending` on `jobs` worker processes, each cell as soon as its dependencies are in `finished`; a cell whose
    dependency is in `dead` is skipped (`skip(cell)`, and it joins `dead`). `handle(cell, report)` sees each report in
    this process and updates `finished` / `dead`."""
    pending = list(pending)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    running: dict[futures.Future, Cell] = {}
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                     initargs=(os.getpid(),)) as pool:
        while pending or running:
            for cell in list(pending):
                if any(d in dead for d in cell.deps):
                    pending.remove(cell)
                    dead.add(cell.key)
                    skip(cell)
                elif len(running) < jobs and all(d in finished for d in cell.deps):
                    pending.remove(cell)
                    running[pool.submit(execute, task_of(cell, out))] = cell
            if not running:
                if pending:  # dependencies that are neither finished nor pending: cannot happen, but never hang
                    raise RuntimeError(f"unschedulable cells: {[c.key for c in pending]}")
                break
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                handle(running.pop(future), future.result())


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
