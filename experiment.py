"""Glue shared by the entry scripts, the benchmark and the tests.

Data flows one way: arguments -> data and split -> model -> method -> evaluation -> result files. Tracking is not done
here: callers pass callbacks (`on_epoch`) and read return values.
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dataset import ImageData, Split, SplitData, load_dataset, make_split
from evaluation import Evaluation, build_result, evaluate_model, write_result
from models import create_model
from training import TrainRecipe, parse_milestones, plot_history, train_model
from unlearn import UnlearnContext, resolve_hyperparameters, resolve_method, run_unlearning
from utils import (DivergenceError, UserError, atomic_torch_save, atomic_write_json, device_name, ensure_writable_dir,
                   load_checkpoint, make_generator, resolve_device, set_seed, to_jsonable)

# Hyper-parameters handed to methods: CLI name -> method hp name. None on the CLI means "method default".
METHOD_HP_FLAGS = {
    "unlearn_lr": "lr", "unlearn_epochs": "epochs", "alpha": "alpha", "beta": "beta", "quantile": "quantile",
    "rho": "rho", "ema": "ema", "scrub_kl": "scrub_kl", "augment": "augment", "mask_path": "mask_path",
    "salun_ratio": "salun_ratio", "mask_ratio": "mask_ratio", "mask_semantics": "mask_semantics",
    "rl_schedule": "rl_schedule", "rl_labels": "rl_labels", "no_l1_epochs": "no_l1_epochs", "momentum": "momentum",
    "weight_decay": "weight_decay", "decreasing_lr": "decreasing_lr", "ssd_lambda": "ssd_lambda",
    "paper_era": "paper_era", "batch_size": "batch_size",
}


@dataclass
class Run:
    """One experiment's resolved inputs: arguments, device, data on that device and the split."""

    args: argparse.Namespace
    device: torch.device
    data: ImageData
    split: Split
    splits: SplitData
    save_dir: Path
    _retrain_eval: dict = field(default_factory=dict, repr=False)

    @property
    def recipe(self) -> TrainRecipe:
        a = self.args
        return TrainRecipe(epochs=a.epochs, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                           batch_size=a.batch_size, milestones=parse_milestones(a.decreasing_lr), warmup=a.warmup)

    @property
    def progress(self) -> bool:
        return not getattr(self.args, "no_progress", False)


def describe_scenario(split: Split) -> str:
    if split.scenario == "classwise":
        return f"class-wise forgetting of class {split.class_to_replace} ({len(split.forget)} samples; class removed from test)"
    if split.scenario == "subclass":
        return f"sub-class forgetting: {len(split.forget)} samples of class {split.class_to_replace}"
    return f"random forgetting: {len(split.forget)} samples across all classes"


def setup_run(args: argparse.Namespace, need_forget: bool = True, data: ImageData | None = None) -> Run:
    """Resolve device, load the dataset, carve the split (printing the scenario, as upstream's default class 0 surprises).

    `data`: the dataset, already loaded by the caller (e.g. to validate against it before anything is written)."""
    device = resolve_device(args.device)
    save_dir = ensure_writable_dir(args.save_dir)
    if data is None:
        data = load_dataset(args.dataset, args.data, download=not getattr(args, "no_download", False))
    data = data.to(device)
    if args.num_indexes_to_replace is None and args.class_to_replace == -1 and not need_forget:
        split = make_split(data, 0, None, seed=args.seed, split_mode=args.split)  # any split: only `train` is used
    else:
        split = make_split(data, args.class_to_replace, args.num_indexes_to_replace, seed=args.seed, split_mode=args.split)
    if need_forget:
        print(f"{args.dataset}: {describe_scenario(split)}; retain {len(split.retain)}, val {len(split.val)}, "
              f"test {len(split.test)}; split {split.hash} on {device_name(device)}")
    splits = SplitData(data, split, batch_size=args.batch_size, augment=not args.no_aug)
    return Run(args=args, device=device, data=data, split=split, splits=splits, save_dir=save_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, data: ImageData, init_seed: int | None = None) -> torch.nn.Module:
    """A fresh model; with `init_seed` its initialisation is reproducible (Retrain shares the original's init)."""
    if init_seed is not None:
        torch.manual_seed(init_seed)
    return create_model(args.arch, num_classes=data.num_classes, in_channels=data.in_channels, width=args.width,
                        mean=data.mean, std=data.std)


def model_metadata(run: Run, kind: str, **extra: Any) -> dict:
    a = run.args
    return {"kind": kind, "arch": a.arch, "dataset": a.dataset, "num_classes": run.data.num_classes,
            "in_channels": run.data.in_channels, "width": a.width, "seed": a.seed, "train_seed": a.train_seed,
            "epochs": a.epochs, "torch_version": str(torch.__version__), **to_jsonable(extra)}


def original_checkpoint_path(args: argparse.Namespace) -> Path:
    """The name the seed README passes to --mask: {save_dir}/{seed}{arch}_ep{epochs}model_SA_best.pth.tar."""
    return Path(args.save_dir) / f"{args.seed}{args.arch}_ep{args.epochs}model_SA_best.pth.tar"


def original_last_path(args: argparse.Namespace) -> Path:
    return Path(args.save_dir) / f"{args.seed}{args.arch}_ep{args.epochs}checkpoint.pth.tar"


def retrain_checkpoint_path(args: argparse.Namespace, split: Split) -> Path:
    return Path(args.save_dir) / f"{args.seed}{args.arch}_ep{args.epochs}_retrain_{split.tag}model.pth.tar"


def check_metadata(payload: dict, path: Path, args: argparse.Namespace, data: ImageData) -> None:
    """One-line error when a checkpoint was written for another arch, dataset or class count."""
    expected = {"arch": args.arch, "dataset": args.dataset, "num_classes": data.num_classes,
                "in_channels": data.in_channels}
    for key, want in expected.items():
        have = payload.get(key)
        if have is not None and have != want:
            raise UserError(f"checkpoint '{path}' was written for {key}={have}, but {key}={want} was requested; "
                            f"pass matching --{'dataset' if key in ('num_classes', 'in_channels') else key}")
    width = payload.get("width")
    if width is not None and args.width is not None and width != args.width:
        raise UserError(f"checkpoint '{path}' has width {width}, but --width {args.width} was requested")


def load_model(path: str | Path, run: Run) -> tuple[torch.nn.Module, dict]:
    """Load a weights-only checkpoint into a freshly built model, after checking its metadata."""
    path = Path(path)
    payload = load_checkpoint(path)
    check_metadata(payload, path, run.args, run.data)
    args = run.args
    if args.width is None and payload.get("width") is not None:
        args = copy.copy(args)
        args.width = payload["width"]
    model = build_model(args, run.data).to(run.device)
    state = payload["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint '{path}' does not fit --arch {run.args.arch} on {run.args.dataset} ({first[:150]})") from exc
    return model, payload


def train_reference(run: Run, retrain: bool, resume: bool = False, checkpoint_path: str | Path | None = None) -> dict:
    """Train the original model (on the whole training split) or the Retrain reference (on the retain set).

    Original: best-by-validation weights -> `checkpoint_path` (default `original_checkpoint_path`; mlflow_forget.py
    passes its --mask), rolling checkpoint for --resume, curve plot.
    Retrain: same recipe and initialisation seed on the retain set; the final weights are kept.
    """
    args = run.args
    set_seed(args.seed)
    model = build_model(args, run.data, init_seed=args.train_seed).to(run.device)
    if retrain:
        best_path = retrain_checkpoint_path(args, run.split)
        last_path = best_path.with_name(best_path.name.replace("model.pth.tar", "checkpoint.pth.tar"))
        part, kind, split_hash = "retain", "retrain", run.split.hash
    else:
        best_path = Path(checkpoint_path) if checkpoint_path else original_checkpoint_path(args)
        last_path = (original_last_path(args) if best_path == original_checkpoint_path(args)
                     else best_path.with_name(f"resume_{best_path.name}"))
        part, kind, split_hash = "train", "original", None
    meta = model_metadata(run, kind, split_hash=split_hash, split_tag=run.split.tag if retrain else None)
    result = train_model(model, run.splits, run.recipe, seed=args.seed, part=part, last_checkpoint=last_path,
                         resume=resume, metadata=meta, progress=run.progress, desc=kind)
    state = result.model.state_dict() if retrain else result.best_state
    model.load_state_dict(state)
    evaluation = evaluate_model(model, run.splits, with_mia=retrain)
    accuracy = {"train": result.history["train_acc"][-1], "val": result.best_val if not retrain else
                result.history["val_acc"][-1], "test": evaluation.accuracy["test"]}
    atomic_torch_save(best_path, {**meta, "state_dict": state, "epoch": result.best_epoch if not retrain else args.epochs,
                                  "accuracy": accuracy, "history": result.history, "train_seconds": result.seconds})
    plot_history(result.history, best_path.with_suffix("").with_suffix(".png"), title=f"{kind} {args.arch} {args.dataset}")
    summary = {"checkpoint": str(best_path), "kind": kind, "accuracy": accuracy, "best_epoch": result.best_epoch,
               "train_seconds": result.seconds, "device": device_name(run.device), "split_hash": run.split.hash,
               "evaluation": evaluation.accuracy, "args": vars(args)}
    atomic_write_json(best_path.with_suffix("").with_suffix(".json"), summary)
    return summary


def find_retrain_checkpoint(run: Run) -> Path | None:
    """The Retrain reference of this split in --save_dir: the exact name first, else any recipe with the same split."""
    exact = retrain_checkpoint_path(run.args, run.split)
    if exact.is_file():
        return exact
    pattern = str(Path(run.args.save_dir) / f"{run.args.seed}{run.args.arch}_ep*_retrain_{run.split.tag}model.pth.tar")
    matches = sorted(glob.glob(pattern))
    return Path(matches[0]) if matches else None


def retrain_evaluation(run: Run) -> tuple[Evaluation | None, Path | None]:
    path = find_retrain_checkpoint(run)
    if path is None:
        return None, None
    key = (str(path), os.path.getmtime(path))
    if key not in run._retrain_eval:
        model, payload = load_model(path, run)
        if payload.get("split_hash") not in (None, run.split.hash):
            raise UserError(f"Retrain checkpoint '{path}' was trained for split {payload['split_hash']}, not {run.split.hash}")
        run._retrain_eval[key] = evaluate_model(model, run.splits)
    return run._retrain_eval[key], path


# ---------------------------------------------------------------------------------------------------------------------
# Unlearning
# ---------------------------------------------------------------------------------------------------------------------

def method_hyperparameters(args: argparse.Namespace) -> dict:
    return {hp: getattr(args, flag, None) for flag, hp in METHOD_HP_FLAGS.items()}


def result_paths(args: argparse.Namespace) -> dict[str, Path]:
    base = Path(args.save_dir)
    return {"result": base / f"{args.unlearn}eval_result.json", "checkpoint": base / f"{args.unlearn}checkpoint.pth.tar"}


EpochHook = Callable[[int, dict, dict], None]


def unlearn_and_evaluate(run: Run, model_path: str | Path | None = None, per_epoch_eval: bool = False,
                         on_epoch: EpochHook | None = None, write_files: bool = True,
                         paths: dict[str, Path] | None = None,
                         scenario_metrics: Callable[[torch.nn.Module], dict] | None = None,
                         extra: dict | None = None) -> dict:
    """Load the original model, run the method, evaluate, and write the result JSON and checkpoint atomically.

    With `per_epoch_eval`, the model is evaluated after every epoch (outside the RTE timer) and `on_epoch(epoch,
    metrics, stats)` receives the metrics (the same keys as the final result, plus cumulative RTE).
    Scripts with their own outputs (the backdoor experiment) pass `paths` ({"result", "checkpoint"}; default
    `result_paths(args)`), `scenario_metrics(model) -> dict` (metrics of the scenario, e.g. the backdoor's ASR: merged
    into the result and the checkpoint's evaluation, and into every epoch's metrics with per-epoch evaluation) and
    `extra` (more result keys; they override the defaults).
    """
    args = run.args
    method = resolve_method(args.unlearn, args.grad_mask)
    hp = resolve_hyperparameters(method, method_hyperparameters(args), dataset=args.dataset)
    model_path = Path(model_path or args.mask or original_checkpoint_path(args))
    model, payload = load_model(model_path, run)
    original_meta = {k: payload.get(k) for k in ("kind", "epoch", "accuracy", "arch", "dataset", "width")}
    retrain_eval, retrain_path = retrain_evaluation(run)
    if retrain_eval is None:
        print(f"note: no Retrain reference for split {run.split.tag} in {args.save_dir}; rUA, agreement and Avg. Gap "
              f"are left out (train it with main_baseline.py --retrain)")
    set_seed(args.unlearn_seed)
    width = payload.get("width") or args.width
    model_args = copy.copy(args)
    model_args.width = width
    ctx = UnlearnContext(
        model=model, data=run.splits, generator=make_generator(args.unlearn_seed), hp=hp,
        model_factory=lambda: build_model(model_args, run.data, init_seed=args.train_seed),
        train_recipe=run.recipe, retrain_seed=args.seed, artifacts_dir=run.save_dir, progress=run.progress,
    )
    instance = method.cls(ctx)
    instance.name = method.name

    curves: list[dict] = []

    def epoch_hook(epoch: int, eval_model: torch.nn.Module, stats: dict, rte: float) -> None:
        if not per_epoch_eval and on_epoch is None:
            return
        evaluation = evaluate_model(eval_model, run.splits)
        metrics = build_result(evaluation, {}, run.split.hash, rte, retrain_eval)
        metrics.pop("args"), metrics.pop("split_hash")
        if scenario_metrics:
            metrics.update(scenario_metrics(eval_model))
        metrics.update({f"stat_{k}": v for k, v in stats.items()})
        curves.append({"epoch": epoch, **metrics})
        if on_epoch:
            on_epoch(epoch, metrics, stats)

    with warnings.catch_warnings():
        warnings.simplefilter("once")
        try:
            outcome = run_unlearning(instance, hp.get("epochs", 1), on_epoch=epoch_hook, progress=run.progress)
        except DivergenceError as exc:  # keep the last finite weights (the driver restored them) before failing
            if write_files:
                target = (paths or result_paths(args))["checkpoint"]
                atomic_torch_save(target, {**model_metadata(run, "unlearned", split_hash=run.split.hash,
                                                            method=method.label, diverged_at_epoch=exc.epoch),
                                           "state_dict": instance.evaluation_model().state_dict()})
                exc.args = (f"{exc.args[0]}; last finite weights saved to {target}",)
            raise
    final_model = instance.evaluation_model()
    evaluation = evaluate_model(final_model, run.splits)
    split_file = run.save_dir / f"split_{run.split.tag}.json"
    if write_files and not split_file.is_file():
        run.split.save(split_file)
    caller_extra, extra = extra, {
        "method": method.label, "hyperparameters": hp, "device": device_name(run.device), "epochs_run": outcome.epochs_run,
        "epoch_stats": outcome.epoch_stats, "scenario": run.split.scenario, "split_file": str(split_file),
        "original_model": {"path": str(model_path), **original_meta},
        "retrain_model": str(retrain_path) if retrain_path else None,
    }
    if curves:
        extra["curves"] = curves
    if getattr(args, "mia", "svc") != "svc":  # per-example LiRA / RMIA / U-LiRA: experiment_mia.py
        from experiment_mia import run_per_example_mia
        extra["per_example_mia"] = run_per_example_mia(run, final_model, model_path, retrain_path, method, hp,
                                                       write_files=write_files)
    extra.update(caller_extra or {})
    final_scenario = scenario_metrics(final_model) if scenario_metrics else {}
    extra.update(final_scenario)
    result = build_result(evaluation, vars(args), run.split.hash, outcome.rte_seconds, retrain_eval, extra)
    if write_files:
        paths = paths or result_paths(args)
        atomic_torch_save(paths["checkpoint"], {**model_metadata(run, "unlearned", split_hash=run.split.hash,
                                                                method=method.label),
                                               "state_dict": final_model.state_dict(),
                                               "evaluation": {**{k: result[k] for k in ("accuracy", "UA", "RA", "TA",
                                                                                        "MIA_efficacy")},
                                                              **final_scenario}})
        write_result(paths["result"], result)
    return result


def format_result_line(result: dict) -> str:
    parts = [f"UA {result['UA']:.2f}", f"RA {result['RA']:.2f}", f"TA {result['TA']:.2f}",
             f"MIA-Eff {result['MIA_efficacy']:.2f}", f"RTE {result['RTE_seconds']:.2f}s"]
    if "avg_gap" in result:
        parts += [f"rUA {result['rUA']:+.2f}", f"agreement {result['agreement']:.2f}", f"Avg.Gap {result['avg_gap']:.2f}"]
    return ", ".join(parts)
