"""Runs composed from the stages (`pipeline.stages`), shared by the entry scripts and the benchmark's cells.

The tracker is any object with the `tracking.NullTracker` interface; this module never imports mlflow itself, so
benchmark workers and `--no-track` runs never open the tracking store.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dataset import ImageData
from pipeline import paths
from pipeline.config import RunConfig
from pipeline.forget_quality import warn_constant_method, with_forget_quality
from pipeline.mia import per_example_mia
from pipeline.stages import (
    Diverged,
    Prepared,
    ensure_references,
    evaluate,
    find_retrain_checkpoint,
    prepare,
    retrain_evaluation,
    save_diverged,
    unlearn,
    write_outputs,
)
from plots import plot_epoch_curves
from tracking import ending, log_final_metrics
from utils import device_name, git_commit


def experiment_name(config: RunConfig) -> str:
    return config.tracking.experiment or f"{config.data.dataset}-{config.data.scenario}"


def run_name(config: RunConfig, names: Sequence[str] = ()) -> str:
    """`<method as asked>-<forget setting>-seed<seed>`; with `names` (aliases of one configuration, as a benchmark
    row holds them) every name is in it, e.g. `NGradMask=VarGrad-random130-seed1`."""
    shown = "=".join(names) if names else config.method.name
    return config.tracking.run_name or f"{shown}-{config.data.forget_setting}-seed{config.data.seed}"


def run_tags(args: Mapping[str, Any], split_hash: str = "", device: str = "unknown",
             names: Sequence[str] = ()) -> dict[str, str]:
    """Tags of a tracked run, from the flat record of its resolved command line (`RunConfig.flags`, or the "args" of
    a result JSON when the benchmark logs a finished cell); `names`: every name of the configuration (aliases)."""
    forget_class, count = args.get("class_to_replace"), args.get("num_indexes_to_replace")
    scenario = "random" if forget_class == -1 else ("classwise" if count is None else "subclass")
    names = list(names) or [str(args.get("unlearn"))]
    tags = {
        "git_commit": git_commit(), "device": device, "torch_version": str(torch.__version__),
        "split_hash": split_hash, "dataset": str(args.get("dataset")), "arch": str(args.get("arch")),
        "method": names[0], "scenario": scenario, "seed": str(args.get("seed")), "world_size": "1",
    }
    if len(names) > 1:
        tags["aliases"] = " ".join(names)
    return tags


def run_params(config: RunConfig) -> dict[str, Any]:
    """What a run is, in two groups: `data.*` (data and forget set) and `train.*` (the recipe of the original and
    Retrain models), then `hp.*`, exactly the hyper-parameters the method uses, `method` (the name asked for) and
    `method.config` (what it runs). No internal flag (tracking, output, display) and no missing value."""
    d, m = config.data, config.model
    data = {"dataset": d.dataset, "split": d.split_mode, "scenario": d.scenario,
            "forget_class": None if d.class_to_replace == -1 else d.class_to_replace,
            "forget_count": d.num_indexes_to_replace, "seed": d.seed, "batch_size": d.batch_size, "augment": d.augment,
            "train_subset": d.train_subset}
    train = {"arch": m.arch, "width": m.width, "epochs": m.epochs, "lr": m.lr, "momentum": m.momentum,
             "weight_decay": m.weight_decay, "milestones": m.decreasing_lr, "warmup": m.warmup,
             "train_seed": m.train_seed, "amp": m.amp}
    params: dict[str, Any] = {"method": config.method.name, "method.config": config.method.label}
    params.update({f"data.{k}": v for k, v in data.items()})
    params.update({f"train.{k}": v for k, v in train.items()})
    params.update({f"hp.{k}": v for k, v in config.method.hp.items()})
    return {k: v for k, v in params.items() if v is not None}


def model_curve_plots(p: Prepared, trained: Mapping[str, bool]) -> list[Path]:
    """The training-curve plots of the reference models that this run trained (a run that trained a model holds its
    curves; models found on disk were trained, and logged, by an earlier run)."""
    plots = []
    if trained.get("original"):
        plots.append(paths.companion(paths.model_to_unlearn(p.config), ".png"))
    retrain_model = find_retrain_checkpoint(p) if trained.get("retrain") else None
    if retrain_model is not None:
        plots.append(paths.companion(retrain_model, ".png"))
    return [plot for plot in plots if plot.is_file()]


def tracking_record(tracker, handle) -> dict | None:
    """Where the run lives, for the local result JSON (known from the start of the run); None once tracking broke,
    so a result never points at a run that misses part of it."""
    run_id = getattr(handle, "run_id", None)
    if run_id is None or getattr(tracker, "broken", None):
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
    warn_constant_method(config)
    p = p or prepare(config)
    checkpoint = paths.forget_checkpoint(config) if config.output.save_model else None
    unl = unlearn_or_keep_last(p, checkpoint)
    result = with_forget_quality(p, unl, with_attacks(p, unl, evaluate(p, unl)))
    write_outputs(p, result, paths.forget_result(config), unl.model, checkpoint)
    return result


def tracked_forget(config: RunConfig, tracker, experiment_id: str | None = None, data: ImageData | None = None,
                   p: Prepared | None = None) -> dict:
    """mlflow_forget.py and the benchmark's method cells: references (trained when missing) -> unlearning with
    per-epoch evaluation -> result JSON (written before the last tracking calls, so an outage loses nothing) -> the
    tracker. Returns the result dict; `result["result_file"]` is where it was written."""
    warn_constant_method(config)
    p = p or prepare(config, data=data)
    trained = ensure_references(p)
    # Retrain's final values: a reference logged beside every epoch (evaluated once, cached for the unlearning stage).
    retrain_eval, _ = retrain_evaluation(p) if config.method.base != "retrain" else (None, None)
    reference = dict(retrain_eval.metrics) if retrain_eval is not None else None
    started_at = int(time.time() * 1000)
    handle = tracker.start_run(experiment_id, run_name(config),
                               tags=run_tags(config.flags, p.split.hash, device_name(p.device)),
                               parent_run_id=config.tracking.parent_run_id, params=run_params(config),
                               start_time_ms=started_at)
    result_path = paths.forget_result(config)
    checkpoint = paths.forget_checkpoint(config) if config.output.save_model else None
    with ending(handle):
        epoch_eval = config.eval.epoch_eval
        unl = unlearn_or_keep_last(p, checkpoint, epoch_eval=epoch_eval,
                                   on_epoch=(lambda epoch, metrics, stats: handle.log_epoch(epoch, metrics,
                                                                                            reference=reference))
                                   if epoch_eval else None)
        result = with_forget_quality(p, unl, with_attacks(p, unl, evaluate(p, unl)))
        if reference is not None:
            result["retrain"] = reference
        # The work's own start and end (unix ms): a benchmark logs its cells after the fact with these times.
        result["started_at"], result["finished_at"] = started_at, int(time.time() * 1000)
        record = tracking_record(tracker, handle)
        if record:
            result["tracking"] = record
        write_outputs(p, result, result_path, unl.model, checkpoint)
        if not epoch_eval:  # one point: the final evaluation, with the last epoch's statistics
            handle.log_epoch(result["epochs_run"], result, (result.get("epoch_stats") or [{}])[-1], reference=reference)
        log_final_metrics(handle, result)
        plots = model_curve_plots(p, trained)
        if config.output.plots and result.get("curves"):
            plots.append(plot_epoch_curves(result["curves"], paths.curves_plot(result_path),
                                           title=f"{run_name(config)} ({config.data.dataset}, {config.model.arch})",
                                           reference=reference))
        handle.log_files(result_path, config=config.args_record(), split_file=Path(result["split_file"]), plots=plots)
    return result
