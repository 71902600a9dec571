"""Runs composed from the stages (`pipeline.stages`), shared by the entry scripts and the benchmark's cells.

The tracker is any object with the `tracking.NullTracker` interface; this module never imports mlflow itself, so
benchmark workers and `--no-track` runs never open the tracking store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from dataset import ImageData
from pipeline import paths
from pipeline.config import RunConfig
from pipeline.mia import per_example_mia
from pipeline.stages import (Diverged, Prepared, ensure_references, evaluate, prepare, save_diverged, unlearn,
                             write_outputs)
from utils import device_name, git_commit


def experiment_name(config: RunConfig) -> str:
    return config.tracking.experiment or f"{config.data.dataset}-{config.data.scenario}"


def run_name(config: RunConfig) -> str:
    return config.tracking.run_name or f"{config.method.name}-{config.data.forget_setting}-seed{config.data.seed}"


def run_tags(args: Mapping[str, Any], split_hash: str = "", device: str = "unknown") -> dict[str, str]:
    """Tags of a tracked run, from the flat record of its resolved command line (`RunConfig.flags`, or the "args" of
    a result JSON when the benchmark logs a finished cell)."""
    forget_class, count = args.get("class_to_replace"), args.get("num_indexes_to_replace")
    scenario = "random" if forget_class == -1 else ("classwise" if count is None else "subclass")
    return {
        "git_commit": git_commit(), "device": device, "torch_version": str(torch.__version__),
        "split_hash": split_hash, "dataset": str(args.get("dataset")), "arch": str(args.get("arch")),
        "method": str(args.get("unlearn")), "scenario": scenario, "seed": str(args.get("seed")), "world_size": "1",
    }


def run_params(config: RunConfig) -> dict[str, Any]:
    return {**config.args_record(), **{f"hp.{k}": v for k, v in config.method.hp.items()}}


def tracking_record(tracker, handle) -> dict | None:
    """Where the run lives, for the local result JSON (known from the start of the run)."""
    run_id = getattr(handle, "run_id", None)
    if run_id is None:
        return None
    return {"tracking_uri": tracker.uri, "experiment_id": handle.experiment_id, "run_id": run_id}


def unlearn_or_keep_last(p: Prepared, checkpoint: Path | None, **kwargs):
    """The unlearning stage; on divergence the last finite weights go to `checkpoint` (when one is written)."""
    try:
        return unlearn(p, **kwargs)
    except Diverged as exc:
        if checkpoint is not None:
            raise save_diverged(p, exc, checkpoint) from None
        raise


def with_attacks(p: Prepared, unl, result: dict) -> dict:
    """The per-example attack stage, when --mia asks for it (after the population metrics, as it trains models)."""
    mia = per_example_mia(p, unl)
    if mia:
        result["per_example_mia"] = mia
    return result


def forget(config: RunConfig, p: Prepared | None = None) -> dict:
    """main_forget.py: unlearn the given model, evaluate, write the result JSON and the checkpoint."""
    p = p or prepare(config)
    checkpoint = paths.forget_checkpoint(config) if config.output.save_model else None
    unl = unlearn_or_keep_last(p, checkpoint)
    result = with_attacks(p, unl, evaluate(p, unl))
    write_outputs(p, result, paths.forget_result(config), unl.model, checkpoint)
    return result


def tracked_forget(config: RunConfig, tracker, experiment_id: str | None = None, data: ImageData | None = None,
                   p: Prepared | None = None) -> dict:
    """mlflow_forget.py and the benchmark's method cells: references (trained when missing) -> unlearning with
    per-epoch evaluation -> result JSON (written before the last tracking calls, so an outage loses nothing) -> the
    tracker. Returns the result dict; `result["result_file"]` is where it was written."""
    from tracking import ending

    p = p or prepare(config, data=data)
    ensure_references(p)
    handle = tracker.start_run(experiment_id, run_name(config), tags=run_tags(config.flags, p.split.hash, device_name(p.device)),
                               parent_run_id=config.tracking.parent_run_id, params=run_params(config))
    result_path = paths.forget_result(config)
    checkpoint = paths.forget_checkpoint(config) if config.output.save_model else None
    with ending(handle):
        epoch_eval = config.eval.epoch_eval
        unl = unlearn_or_keep_last(p, checkpoint, epoch_eval=epoch_eval,
                                   on_epoch=(lambda epoch, metrics, stats: handle.log_epoch(epoch, metrics))
                                   if epoch_eval else None)
        result = with_attacks(p, unl, evaluate(p, unl))
        record = tracking_record(tracker, handle)
        if record:
            result["tracking"] = record
        write_outputs(p, result, result_path, unl.model, checkpoint)
        if not epoch_eval:  # one point: the final evaluation, with the last epoch's statistics
            handle.log_epoch(result["epochs_run"], result, (result.get("epoch_stats") or [{}])[-1])
        plot = None
        if config.output.plots and result.get("curves"):
            from plots import plot_epoch_curves

            plot = plot_epoch_curves(result["curves"], paths.curves_plot(result_path),
                                     title=f"{run_name(config)} ({config.data.dataset}, {config.model.arch})")
        handle.log_files(result_path, config=config.args_record(), split_file=Path(result["split_file"]),
                         plots=[plot] if plot else [])
    return result
