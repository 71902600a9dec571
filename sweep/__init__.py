"""The benchmark sweep behind benchmark.py: the grid of cells (`sweep.grid`), running them (`sweep.execute`), the
results table (`sweep.report`), and here the orchestration of one invocation (`Sweep`).

Each finished cell leaves `<out>/cells/<key>.json` (its result JSON, written atomically), so a sweep resumes after an
interruption without computing anything twice; `rerun=True` recomputes. Reference models live in
`<out>/models/<dataset>_w<width>/`. Tracking (one parent mlflow run, one nested child run per finished cell) happens in
the submitting process only, so an SQLite store sees one writer.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dataset import recipe_defaults
from pipeline import paths
from pipeline.runs import run_name, run_params
from sweep.execute import command_line, execute, run_tags, write_cell_file
from sweep.executors import execution_params, run_cells
from sweep.grid import (
    Cell,
    build_cells,
    cell_key,
    compute_split_tags,
    is_done,
    parse_cell,
    read_result,
    to_argv,
    train_size,
)
from sweep.report import aggregate, csv_table, markdown_table, write_plots
from sweep.settings import Settings, check_output_path, default_config_path, load_settings_file, method_combos
from sweep.stats import paired_report
from tracking import log_result_run
from utils import atomic_write_json, atomic_write_text, device_name, git_commit, resolve_device, to_jsonable

__all__ = ["Cell", "Settings", "Sweep", "SweepOutcome", "aggregate", "build_cells", "cell_key", "check_output_path",
           "command_line", "csv_table", "default_config_path", "execute", "is_done", "load_settings_file",
           "markdown_table", "method_combos", "to_argv", "train_size"]

# Tags of a benchmark's parent mlflow run; the out dir tells which earlier parent runs belong to this sweep.
SWEEP_TAG = ("sweep", "benchmark")
OUT_TAG = "out"


@dataclass
class SweepOutcome:
    rows: list[dict]
    table: str
    computed: int
    reused: int
    failed: list[str]
    errors: list[str]
    seconds: float
    files: list[Path]

    @property
    def method_rows_with_results(self) -> int:
        """Method rows (not the Retrain row) with a result for at least one seed."""
        return sum(1 for row in self.rows if not row["reference"] and row["seeds"])


class Sweep:
    """Runs the cells (references first, then methods as soon as their references exist), logs each finished cell as a
    nested child of one parent mlflow run (from this process only, so SQLite sees one writer), writes the table."""

    def __init__(self, settings: Settings, tracker=None, experiment_id: str | None = None, progress: bool = True):
        self.settings = settings
        self.out = settings.out
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.progress = progress
        self.cells, self.notes = build_cells(settings)
        self.parent = None

    #: Append the "## Paired comparisons" section (sweep.stats) to results.md; tuning trials switch it off.
    paired_comparisons: bool = True

    # -- emit ----------------------------------------------------------------------------------------------------------
    def emit_commands(self, path: Path, tracking: dict | None) -> int:
        todo = [c for c in self.cells if c.kind == "method" and (self.settings.rerun or not is_done(c, self.out))]
        lines = [command_line(cell, self.out, tracking) for cell in todo]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return len(lines)

    # -- run -----------------------------------------------------------------------------------------------------------
    def run(self) -> SweepOutcome:
        start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        compute_split_tags(self.cells, self.settings)
        if self.tracker is not None:
            self._start_parent()
        todo = [c for c in self.cells
                if (self.settings.rerun and c.kind in ("method", "reference")) or not is_done(c, self.out)]
        if self.settings.rerun:
            for cell in todo:
                cell.failure_path(self.out).unlink(missing_ok=True)
        todo_keys = {c.key for c in todo}
        reused = sum(1 for c in self.cells if c.key not in todo_keys)
        bar = tqdm(total=len(self.cells), initial=reused, desc="benchmark", unit="cell", disable=None if self.progress
                   else True, dynamic_ncols=True)
        failed: list[str] = []
        errors: list[str] = []
        computed = 0
        finished = {c.key for c in self.cells if c.key not in todo_keys}
        dead: set[str] = set()
        for cell in self.cells:  # cells finished earlier: logged now if this tracking backend has not seen them
            if cell.key in finished:
                self._track(cell)

        timings: dict[str, dict] = {}

        def handle(cell: Cell, report: dict) -> None:
            nonlocal computed
            computed += 1
            timings[cell.key] = {"kind": cell.kind, "label": cell.label, "scenario": cell.scenario, "seed": cell.seed,
                                 "status": report["status"], "seconds": report["seconds"],
                                 "cpu_seconds": report["cpu_seconds"]}
            if report["status"] == "ok":
                finished.add(cell.key)
                self._track(cell)
            else:
                dead.add(cell.key)
                message = f"{cell.kind} {cell.label or ''} ({cell.dataset}, {cell.scenario}, seed {cell.seed}): " \
                          f"{report['error']} (log: {self.out / 'logs'})"
                if report["status"] == "failed" and not report.get("permanent"):
                    message += "; retried at the next invocation"
                (failed if report["status"] == "failed" else errors).append(message)
                # The method's own failure (divergence, a refused hyper-parameter) is deterministic: remembered, not
                # retried. The environment's (missing data, an unwritable folder) may be gone next time: not kept.
                if report["status"] == "failed" and report.get("permanent") and cell.kind == "method":
                    # A diverged run's curves up to its last finite epoch stay candidates of a tuning trial.
                    write_cell_file(cell.failure_path(self.out), {"error": report["error"], "argv": cell.argv,
                                                                  **({"curves": report["curves"]}
                                                                     if report.get("curves") else {})})
            bar.update(1)
            bar.set_postfix(computed=computed, reused=reused, failed=len(failed) + len(errors))

        def skip(cell: Cell) -> None:  # a dependency failed: nothing to run
            bar.update(1)

        # References first: they unlock everything else.
        pending = sorted(todo, key=lambda c: c.kind not in ("original", "retrain"))
        try:
            run_cells(pending, self.settings, finished, dead, handle, skip)  # the executor the settings name
        except KeyboardInterrupt:
            self._end_parent("KILLED")
            raise
        except BaseException:  # the sweep itself stops (an out dir no longer writable, a bug): no run left RUNNING
            try:
                self._end_parent("FAILED")
            except Exception as exc:  # a broken tracker must not hide why the sweep stopped
                print(f"warning: could not close the parent run as FAILED ({exc})", file=sys.stderr)
            raise
        finally:
            bar.close()
        rows = aggregate(self.cells, self.out)
        notes = list(self.notes)
        if failed or errors:
            notes.append(f"{len(failed) + len(errors)} cell(s) failed in this invocation; see {self.out / 'logs'}.")
        table = markdown_table(rows, notes, self.settings.seeds)
        forest: list[Path] = []
        if self.paired_comparisons:
            section, forest = paired_report(self.cells, self.out, self.settings.test)
            table += section
        files = [atomic_write_text(self.out / "results.md", table), atomic_write_text(self.out / "results.csv",
                                                                                       csv_table(rows))]
        files += write_plots(rows, self.out) + forest
        seconds = time.perf_counter() - start
        summary = {"computed": computed, "reused": reused, "failed": failed, "errors": errors, "seconds": seconds,
                   "jobs": self.settings.jobs, "timings": timings,
                   "cells": {c.key: {"kind": c.kind, "label": c.label, "names": c.names, "scenario": c.scenario,
                                     "seed": c.seed, "argv": c.argv} for c in self.cells},
                   "settings": to_jsonable(vars(self.settings)), "git_commit": git_commit()}
        files.append(atomic_write_json(self.out / "sweep.json", summary))
        self._finish_parent(rows, files, failed or errors)
        return SweepOutcome(rows, table, computed, reused, failed, errors, seconds, files)

    # -- tracking ------------------------------------------------------------------------------------------------------
    def _start_parent(self) -> None:
        s = self.settings
        out = str(self.out.resolve())
        # A benchmark killed outright (kill -9, a lost node) could not end its parent run: it would stay RUNNING for
        # ever. Any parent run of this out dir still RUNNING now is such a leftover (a live one cannot exist: the
        # out dir is locked, sweep.lock).
        self.tracker.end_stale_runs(self.experiment_id, OUT_TAG, out, "KILLED")
        # What ran, resolved: the method names behind the patterns, each dataset's width and epochs.
        methods = sorted({name for cell in self.cells if cell.kind == "method" for name in cell.names}, key=str.lower)
        recipes = {d: recipe_defaults(d, s.train_subset) for d in s.datasets}
        widths = {d: s.width if s.width is not None else recipes[d].get("width") for d in s.datasets}
        epochs = {d: s.epochs if s.epochs is not None else recipes[d].get("epochs") for d in s.datasets}
        params = {"datasets": s.datasets, "archs": s.archs, "scenarios": s.scenarios, "methods": " ".join(methods),
                  "method_patterns": s.methods, "seeds": s.seeds, "epochs": epochs, "unlearn_epochs": s.unlearn_epochs,
                  "width": widths, "forget_fraction": s.forget_fraction, "forget_class": s.forget_class,
                  "epoch_eval": s.epoch_eval, "forget_quality": s.forget_quality or None, "grid": s.grid or None,
                  "config": s.config, "out": s.out, "cells": len(self.cells), "train_subset": s.train_subset,
                  "paired_test": s.test, **execution_params(s)}
        tags = {"git_commit": git_commit(), "device": device_name(resolve_device(s.device)),
                "torch_version": str(torch.__version__), SWEEP_TAG[0]: SWEEP_TAG[1], OUT_TAG: out}
        name = f"benchmark-{'+'.join(s.datasets)}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.parent = self.tracker.start_run(self.experiment_id, name, params=params, tags=tags)

    def _track(self, cell: Cell) -> None:
        """Log a finished method or Retrain-row cell as a child run, once per tracking backend."""
        if self.tracker is None or self.parent is None or self.parent.run_id is None:
            return
        if cell.kind not in ("method", "reference") or getattr(self.tracker, "broken", None):
            return
        result = read_result(cell, self.out)
        if result is None:
            return
        if (result.get("tracking") or {}).get("tracking_uri") == self.tracker.uri:
            return
        path = cell.result_path(self.out)
        config = parse_cell(cell.argv)
        params = run_params(config)
        if cell.kind == "reference":
            params["method"] = "Retrain"
        tags = {**run_tags(result["args"], split_hash=result.get("split_hash", ""),
                           device=result.get("device", "unknown"), names=cell.names),
                "cell_key": cell.key, "row": cell.label, "method.config": cell.config}
        name = run_name(config, cell.names)  # every alias of the row: NGradMask=VarGrad-random130-seed1
        plots, times = [], None
        if cell.kind == "reference" and result.get("retrain_model"):
            # The Retrain row is the Retrain model: its run holds the training curves, and lasts as long as the
            # training did (ending when the checkpoint was written).
            model = Path(result["retrain_model"])
            plots.append(paths.companion(model, ".png"))
            if model.is_file() and math.isfinite(result.get("RTE_seconds", math.nan)):
                end = int(model.stat().st_mtime * 1000)
                times = (end - int(result["RTE_seconds"] * 1000), end)
        handle = log_result_run(self.tracker, self.experiment_id, name, result, path, params, tags,
                                self.parent.run_id, plots=plots, times_ms=times)
        if handle.record:
            result["tracking"] = handle.record
            atomic_write_json(path, result)

    def _finish_parent(self, rows: list[dict], files: list[Path], had_failures: bool) -> None:
        if self.parent is None:
            return
        # The original models were trained by this sweep's cells, which have no run of their own: their training
        # curves belong to the sweep's run, beside the tables and the benchmark plots.
        model_plots = [paths.companion(Path(c.target), ".png") for c in self.cells if c.kind == "original"]
        self.parent.log_files(plots=[f for f in files if f.suffix == ".png"] + model_plots,
                              others=[f for f in files if f.suffix != ".png"])
        best = {}
        for row in rows:
            if not row["reference"] and row["seeds"] and not math.isnan(row["avg_gap_mean"]):
                key = f"{row['dataset']}.{row['arch']}.{row['scenario']}"
                if key not in best or row["avg_gap_mean"] < best[key]["avg_gap_mean"]:
                    best[key] = row
        self.parent.set_tags({f"best.{k}": row["method"] for k, row in best.items()})
        self.parent.log_metrics({f"best.{k}.avg_gap": row["avg_gap_mean"] for k, row in best.items()})
        self.parent.end("FAILED" if had_failures else "FINISHED")

    def _end_parent(self, status: str) -> None:
        if self.parent is not None:
            self.parent.end(status)
