"""The tracked unlearning run shared by mlflow_forget.py and benchmark.py.

One run: make sure the original model (at --mask) and the Retrain reference of the split exist (trained when missing,
under a file lock so that parallel jobs of a sweep train each one once), unlearn with evaluation after every epoch, write
the result JSON, and hand everything to a tracker. The tracker is any object with the `tracking.NullTracker` interface;
this module never imports mlflow itself (`tracking.py` does), so benchmark workers and `--no-track` runs stay light.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from arg_parser import parse_args
from experiment import (Run, find_retrain_checkpoint, load_model, method_hyperparameters, original_checkpoint_path,
                        result_paths, retrain_checkpoint_path, setup_run, train_reference, unlearn_and_evaluate)
from evaluation import build_result, evaluate_model, write_result
from tracking import ending, link_result
from unlearn import resolve_hyperparameters, resolve_method
from utils import UserError, device_name, git_commit

def add_forget_flags(parser: argparse.ArgumentParser) -> None:
    """The flags mlflow_forget.py adds to the shared parser (benchmark cells are mlflow_forget.py command lines)."""
    g = parser.add_argument_group("tracking and outputs")
    g.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                   help="log to mlflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    g.add_argument("--experiment", default=None, help="mlflow experiment (default: '<dataset>-<scenario>')")
    g.add_argument("--run_name", default=None, help="mlflow run name (default: '<method>-<forget setting>-seed<seed>')")
    g.add_argument("--parent_run_id", default=None, help="nest the run under this mlflow run (a benchmark sweep)")
    g.add_argument("--result_json", default=None,
                   help="where to write the result JSON (default: {save_dir}/{unlearn}eval_result.json)")
    g.add_argument("--no-save-model", dest="no_save_model", action="store_true",
                   help="do not write the unlearned checkpoint (benchmark cells keep only their result JSON)")
    g.add_argument("--no-epoch-eval", dest="no_epoch_eval", action="store_true",
                   help="evaluate only after the last unlearning epoch (no per-epoch curves)")
    g.add_argument("--no-plots", dest="no_plots", action="store_true", help="do not draw the per-epoch curve plot")


def parse_forget_args(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    return parse_args(argv, description=description, extra=add_forget_flags)


# ---------------------------------------------------------------------------------------------------------------------
# Names derived from the arguments (known before anything is loaded, so the tracking check can come first)
# ---------------------------------------------------------------------------------------------------------------------

def scenario_of(args: argparse.Namespace) -> str:
    """random / classwise / subclass, as `dataset.make_split` names them (from the arguments alone)."""
    if args.class_to_replace == -1:
        return "random"
    return "classwise" if args.num_indexes_to_replace is None else "subclass"


def forget_setting(args: argparse.Namespace) -> str:
    scenario = scenario_of(args)
    if scenario == "random":
        return f"random{args.num_indexes_to_replace}"
    if scenario == "classwise":
        return f"class{args.class_to_replace}"
    return f"class{args.class_to_replace}n{args.num_indexes_to_replace}"


def experiment_name(args: argparse.Namespace) -> str:
    return args.experiment or f"{args.dataset}-{scenario_of(args)}"


def run_name(args: argparse.Namespace) -> str:
    return args.run_name or f"{args.unlearn}-{forget_setting(args)}-seed{args.seed}"


def result_json_path(args: argparse.Namespace) -> Path:
    return Path(args.result_json) if args.result_json else result_paths(args)["result"]


def resolved_hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The method's hyper-parameters after defaults, dataset defaults, alias overrides and flags (as the run uses)."""
    method = resolve_method(args.unlearn, args.grad_mask)
    return resolve_hyperparameters(method, method_hyperparameters(args), dataset=args.dataset)


# ---------------------------------------------------------------------------------------------------------------------
# Reference models: trained when missing, once even when many jobs of a sweep ask at the same time
# ---------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """An exclusive POSIX lock on a hidden file next to `target` (lockf also works on NFS, where sweeps often run)."""
    import fcntl

    lock_path = target.with_name(f".{target.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            # Safe to remove while held: every holder re-checks for the target after acquiring, and later arrivals
            # find the target (or take a fresh lock file).
            lock_path.unlink(missing_ok=True)
            fcntl.lockf(handle, fcntl.LOCK_UN)


def ensure_original(run: Run, path: Path) -> bool:
    """Train the original model into `path` unless it exists (same code as main_baseline.py). True when trained."""
    if path.is_file():
        return False
    with file_lock(path):
        if path.is_file():  # another job trained it while this one waited
            return False
        print(f"original model '{path}' is missing: training it ({run.args.arch}, {run.args.epochs} epochs)", flush=True)
        summary = train_reference(run, retrain=False, checkpoint_path=path)
        print(f"original model: test {summary['accuracy']['test']:.2f} % ({summary['train_seconds']:.1f} s)", flush=True)
    return True


def ensure_retrain(run: Run) -> bool:
    """Train the Retrain reference of this split into --save_dir unless one exists. True when trained."""
    if find_retrain_checkpoint(run) is not None:
        return False
    path = retrain_checkpoint_path(run.args, run.split)
    with file_lock(path):
        if find_retrain_checkpoint(run) is not None:
            return False
        print(f"Retrain reference for split {run.split.tag} is missing: training it ({run.args.epochs} epochs)", flush=True)
        summary = train_reference(run, retrain=True)
        print(f"Retrain reference: test {summary['accuracy']['test']:.2f} % ({summary['train_seconds']:.1f} s)", flush=True)
    return True


def ensure_references(run: Run) -> dict[str, bool]:
    """Both references of a run; Retrain is skipped when the method *is* retrain (it would train the same model twice)."""
    trained = {"original": ensure_original(run, Path(run.args.mask or original_checkpoint_path(run.args)))}
    trained["retrain"] = False if run.args.unlearn == "retrain" else ensure_retrain(run)
    return trained


def retrain_reference_result(run: Run) -> dict:
    """The Retrain row of a table: the Retrain reference evaluated like any method, its training time as RTE (so the
    row costs an evaluation, not a second identical training)."""
    path = find_retrain_checkpoint(run)
    if path is None:
        raise UserError(f"no Retrain reference for split {run.split.tag} in {run.args.save_dir}")
    model, payload = load_model(path, run)
    evaluation = evaluate_model(model, run.splits)
    extra = {"method": "Retrain", "reference": True, "scenario": run.split.scenario, "device": device_name(run.device),
             "retrain_model": str(path), "epochs_run": payload.get("epochs"), "hyperparameters": {}}
    return build_result(evaluation, vars(run.args), run.split.hash, float(payload.get("train_seconds", float("nan"))),
                        evaluation, extra)


# ---------------------------------------------------------------------------------------------------------------------
# The tracked run
# ---------------------------------------------------------------------------------------------------------------------

def run_tags(args: argparse.Namespace, run: Run | None = None, split_hash: str | None = None,
             device: str | None = None) -> dict[str, str]:
    return {
        "git_commit": git_commit(), "device": device or (device_name(run.device) if run else "unknown"),
        "torch_version": str(torch.__version__), "split_hash": split_hash or (run.split.hash if run else ""),
        "dataset": args.dataset, "arch": args.arch, "method": args.unlearn, "scenario": scenario_of(args),
        "seed": str(args.seed), "world_size": "1",
    }


def curves_plot_path(result_path: Path) -> Path:
    return result_path.with_name(result_path.name.removesuffix(".json") + "_curves.png")


def run_forget(args: argparse.Namespace, tracker, experiment_id: str | None = None, data=None) -> dict:
    """References (trained if missing) -> unlearning with per-epoch evaluation -> result JSON -> tracker.

    The result JSON is written before the last tracking calls, so a tracking outage never loses a result. Returns the
    result dict; `result["result_file"]` is where it was written.
    """
    run = setup_run(args, data=data)
    ensure_references(run)
    hp = resolved_hyperparameters(args)
    handle = tracker.start_run(experiment_id, run_name(args), tags=run_tags(args, run),
                               parent_run_id=args.parent_run_id,
                               params={**vars(args), **{f"hp.{k}": v for k, v in hp.items()}})
    result_path = result_json_path(args)

    def on_epoch(epoch: int, metrics: dict, stats: dict) -> None:
        handle.log_epoch(epoch, metrics)

    with ending(handle):
        epoch_eval = not args.no_epoch_eval
        result = unlearn_and_evaluate(run, model_path=args.mask, per_epoch_eval=epoch_eval,
                                      on_epoch=on_epoch if epoch_eval else None, write_files=not args.no_save_model,
                                      paths={**result_paths(args), "result": result_path})
        if args.no_save_model:  # unlearn_and_evaluate wrote nothing: the result and the split indices still are
            split_file = Path(result["split_file"])
            if not split_file.is_file():
                run.split.save(split_file)
            write_result(result_path, result)
        if not epoch_eval:  # one point: the final evaluation, with the last epoch's statistics
            handle.log_epoch(result["epochs_run"], result, (result.get("epoch_stats") or [{}])[-1])
        plot = None
        if not args.no_plots and result.get("curves"):
            from plots import plot_epoch_curves

            plot = plot_epoch_curves(result["curves"], curves_plot_path(result_path),
                                     title=f"{run_name(args)} ({args.dataset}, {args.arch})")
        handle.log_files(result_path, config=vars(args), split_file=Path(result["split_file"]),
                         plots=[plot] if plot else [])
    return link_result(handle, result, result_path)


def absolute(path: str | os.PathLike) -> str:
    return str(Path(path).expanduser().resolve())
