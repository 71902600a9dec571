"""Running cells: one cell in this process, in a worker or in a submitit job (`execute`), and self-contained command
lines for other schedulers (`command_line`, for GNU parallel or a hand-written job script). Where cells run (the
local process pool, submitit jobs) is `sweep.executors`.

This module is the one place that imports the run pipeline's stages (set up a run, train the references, unlearn).
The worker returns a cell's result in its report and the submitting process writes `<out>/cells/<key>.json`
(`deliver`), whatever the executor: the cell store and the tracking store have one writer each, the submitting process.
Reference models are the exception: workers write them under `<out>/models/` (files too large to send back), which is
how the original and Retrain models are trained once and shared by every worker, device and job.

A cell runs with `CELL_THREADS` CPU threads (its `--threads` flag, recorded in its result's args) whatever runs it:
the submitting process, a pool worker, a submitit job or an emitted command line. A different thread count changes
the order of floating-point reductions, which is enough to change a chaotic run's numbers.

A report's status says what the sweep does with the cell: "ok"; "failed" with "permanent" (the method's own failure:
divergence, a refused hyper-parameter) is remembered and not retried; "failed" without it (an `EnvironmentUserError`:
missing data, an unwritable folder) and "error" (a bug, a dead worker) are reported and retried by the next invocation.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from arg_parser import parse_config
from dataset import load_dataset
from evaluation import write_result
from pipeline import paths
from pipeline.config import RunConfig
from pipeline.forget_quality import retrained_models_of_run
from pipeline.runs import run_tags, tracked_forget
from pipeline.stages import ensure_original, ensure_retrain, prepare, retrain_reference_result
from scenarios import SCENARIOS
from sweep.grid import RESULT_KEYS, Cell, parse_cell, to_argv
from tracking import NullTracker  # imports mlflow only when a real tracker is opened, never here
from utils import DivergenceError, EnvironmentUserError, UserError, atomic_write_json, to_jsonable

__all__ = ["CELL_THREADS", "REPORT_KEYS", "command_line", "deliver", "execute", "log_path", "run_tags", "task_of",
           "valid_report", "write_cell_file"]

ROOT = Path(__file__).resolve().parents[1]
# CPU threads of every benchmark cell. One: small models gain little from more, parallel workers would fight over the
# cores, and every executor then computes the same numbers. Fixed for all cells, so it is not part of a cell's key.
CELL_THREADS = 1
REPORT_KEYS = ("key", "status", "error", "seconds", "cpu_seconds", "result")
STATUSES = ("ok", "failed", "error")

_DATA: dict[tuple, Any] = {}


def _dataset(config: RunConfig):
    key = (config.data.dataset, config.data.root)
    if key not in _DATA:
        _DATA[key] = load_dataset(config.data.dataset, config.data.root, download=config.data.download)
    return _DATA[key]


def execute(task: dict) -> dict:
    """Run one cell; its output goes to `<out>/logs/<kind>_<key>.log`.
    Returns {"key", "status", "error", "seconds", "cpu_seconds", "result", "permanent"}, plus "curves" (the finite
    epochs' evaluations) when the method diverged (CPU time: a cost that survives a busy machine). A cell with a
    result (a method, the Retrain row) writes it to a private staging file, never to the sweep's cell store: "result"
    is that JSON object, as the cell's own script would have written it at --result_json, for the submitting process
    to write (`deliver`). The cell runs with its --threads CPU threads; this process's own count is restored
    afterwards."""
    start, cpu_start = time.perf_counter(), time.process_time()
    log = Path(task["log"])
    status, error, result, permanent = "ok", None, None, False
    curves = None
    staging = None
    threads = torch.get_num_threads()
    torch.set_num_threads(task.get("threads") or threads)
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="cell-")) if task.get("result_json") else None
        argv = _replace_flag(task["argv"], "--result_json", str(staging / "result.json")) if staging else task["argv"]
        with open(log, "w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            try:
                _run_cell(task, argv)
                if staging is not None:
                    result = _as_if_written_at(json.loads((staging / "result.json").read_text()), task)
            except (DivergenceError, UserError) as exc:
                # The method's own failure is deterministic: remembered. The environment's may be gone next time.
                status, error = "failed", f"{type(exc).__name__}: {exc}"
                permanent = not isinstance(exc, EnvironmentUserError)
                curves = getattr(exc, "curves", None)  # a diverged run's finite epochs (pipeline.stages.Diverged)
                print(f"error: {exc}")
            except Exception as exc:  # a bug: reported, not cached, the sweep goes on
                status, error = "error", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
    except OSError as exc:  # no log folder, no staging folder: the environment, retried next time
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        torch.set_num_threads(threads)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return {"key": task["key"], "status": status, "error": error, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start, "result": result, "permanent": permanent,
            **({"curves": to_jsonable(curves)} if curves else {})}


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
        result = retrain_reference_result(run)
        if config.eval.forget_quality:
            models = retrained_models_of_run(run, config.model.width)
            result["forget_quality_retrained"] = {"num_models": config.eval.forget_quality,
                                                  "directory": str(models.directory),
                                                  "trained_now": len(models.trained_now), "seconds": models.seconds}
        write_result(config.output.result_json, result)
    else:
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
    """In the submitting process: write the cell's result file (atomically) from a worker's report. An out dir that
    stopped being writable stops the sweep with one line (an `EnvironmentUserError`): nothing more could be kept."""
    if report.get("status") == "ok" and report.get("result") is not None:
        write_cell_file(cell.result_path(out), report["result"])


def write_cell_file(path: Path, payload: dict) -> None:
    try:
        atomic_write_json(path, payload)
    except OSError as exc:
        raise EnvironmentUserError(f"cannot write '{path}' ({exc.strerror or exc}); the --out directory must stay "
                                   f"writable while the sweep runs") from None


def valid_report(report: Any, cell: Cell) -> bool:
    """A report that came back through a file (a submitit job's) is what `execute` returns for this cell: the right
    key, a known status, and for a finished cell that has a result, a complete result (as a cell file must be)."""
    if not isinstance(report, dict) or any(key not in report for key in REPORT_KEYS):
        return False
    if report["key"] != cell.key or report["status"] not in STATUSES:
        return False
    if not all(isinstance(report[k], (int, float)) and not isinstance(report[k], bool)
               for k in ("seconds", "cpu_seconds")):
        return False
    result = report["result"]
    if report["status"] == "ok" and cell.kind in ("method", "reference"):
        return isinstance(result, dict) and all(key in result for key in RESULT_KEYS)
    return result is None or isinstance(result, dict)


def task_of(cell: Cell, out: Path) -> dict:
    result_json = str(cell.result_path(out)) if cell.kind in ("method", "reference") else None
    argv = cell.argv + to_argv({"no_progress": True, "track": False, "no_plots": True, "no_save_model": True,
                                "result_json": result_json, "threads": CELL_THREADS})
    # The log path is absolute: a job on a cluster node may start in another directory.
    return {"key": cell.key, "kind": cell.kind, "scenario": cell.scenario, "argv": argv, "result_json": result_json,
            "threads": CELL_THREADS, "log": str(log_path(cell, out).absolute())}


def log_path(cell: Cell, out: Path) -> Path:
    return out / "logs" / f"{cell.kind}_{cell.key}.log"


def command_line(cell: Cell, out: Path, tracking: dict | None) -> str:
    """A self-contained shell line: absolute paths, the tracking URI in the environment, the cell's result file in the
    sweep's out dir (so benchmark.py later aggregates it instead of computing it again)."""
    scenario = SCENARIOS[cell.scenario]
    argv = cell.argv + to_argv({"no_save_model": True, "result_json": str(cell.result_path(out).resolve()),
                                "threads": CELL_THREADS,
                                "track": bool(tracking), "experiment": (tracking or {}).get("experiment"),
                                "parent_run_id": (tracking or {}).get("parent_run_id")})
    env = f"MLFLOW_TRACKING_URI={shlex.quote(tracking['uri'])} " if tracking else ""
    script = ROOT / scenario.script
    return (f"cd {shlex.quote(str(Path.cwd()))} && {env}{shlex.quote(sys.executable)} -u {shlex.quote(str(script))} "
            + " ".join(shlex.quote(a) for a in argv))
