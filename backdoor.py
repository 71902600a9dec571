"""Backdoor ("Trojan model") cleanse experiment (UPSTREAM.md §8, §10 item 16).

A black square trigger is stamped on `--num_indexes_to_replace` training samples drawn across all classes (the
forget-set machinery with class -1, from the original model's training split) and their label is set to the target
`--class_to_replace`. A model trained on that poisoned set learns "trigger -> target". Unlearning then gets the poisoned
samples (with trigger and target label) as the forget set and the clean rest of the training split as the retain set;
success = the attack success rate (ASR) falls while clean test accuracy stays.

Differences from upstream (Unlearn-Sparse `main_backdoor.py`), all deliberate:
* dense training with the project's training loop (upstream: OMP pruning, which needs `--rewind_epoch > 0`);
* the trigger works on any image layout (upstream: H x W x C arrays only);
* ASR counts only triggered test images whose true class is not the target: a target-class image classified as the
  target is a correct prediction, not a successful attack. `--paper_era` counts all, as upstream did;
* the split is always the consistent one: the poisoned model is trained here on exactly retain + poisoned samples, so
  upstream's split-seed quirk (`--split upstream`) has no meaning for this experiment.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from arg_parser import build_parser, resolve_args
from dataset import ImageData, Split, SplitData, TensorLoader, load_dataset, make_split, num_classes_of
from evaluation import predict, write_result
from experiment import (Run, build_model, load_model, method_hyperparameters, model_metadata, setup_run,
                        unlearn_and_evaluate)
from pipeline import add_forget_flags, file_lock, run_tags
from tracking import NullRun, ending, link_result
from training import plot_history, train_model
from unlearn import resolve_hyperparameters, resolve_method
from utils import UserError, atomic_torch_save, device_name, set_seed, sha256_of_array

TRIGGER_MARGIN = 2  # pixels between the trigger and the bottom/right image border (upstream)
LAYOUTS = ("HWC", "CHW", "HW")
RESULT_SUFFIX = "backdoor_result.json"


# ---------------------------------------------------------------------------------------------------------------------
# Trigger
# ---------------------------------------------------------------------------------------------------------------------

def default_trigger_size(image_size: int) -> int:
    """Upstream's 4 on 32x32 images, scaled with the image: 2 on the 8x8 digits."""
    return max(2, image_size // 8)


def check_trigger_size(size: int, height: int, width: int) -> None:
    largest = min(height, width) - TRIGGER_MARGIN
    if size < 1:
        raise UserError(f"--trigger_size must be a positive number of pixels, got {size}; allowed: 1..{largest} for "
                        f"{height}x{width} images")
    if size > largest:
        raise UserError(f"--trigger_size {size} does not fit a {height}x{width} image with the {TRIGGER_MARGIN}-pixel "
                        f"margin; allowed: 1..{largest}")


def _spatial_axes(layout: str) -> tuple[int, int]:
    """Row and column axes, counted from the end so that one image and a batch of images both work."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown image layout '{layout}'; allowed: {', '.join(LAYOUTS)}")
    return (-3, -2) if layout == "HWC" else (-2, -1)


def add_trigger(images, size: int, layout: str):
    """A copy of `images` (numpy array or tensor; one image or a batch) with the trigger stamped on every image.

    Rows and columns [H - 2 - size, H - 2) (resp. W) are set to 0 in all channels: a black size x size square 2 pixels
    from the bottom-right corner. Layouts: "HWC" (CIFAR's raw N x H x W x C arrays), "CHW" (SVHN's torchvision layout
    and the project's in-memory N x C x H x W), "HW" (digits' N x H x W). Works for uint8 and float images alike
    (0 is black in both). The input is never modified.
    """
    row_axis, col_axis = _spatial_axes(layout)
    ndim = images.ndim
    if ndim not in (len(layout), len(layout) + 1):
        raise ValueError(f"layout {layout} expects {len(layout)} or {len(layout) + 1} dimensions, got shape "
                         f"{tuple(images.shape)}")
    height, width = images.shape[row_axis], images.shape[col_axis]
    check_trigger_size(size, height, width)
    out = images.clone() if isinstance(images, torch.Tensor) else np.array(images, copy=True)
    index = [slice(None)] * ndim
    index[row_axis] = slice(height - TRIGGER_MARGIN - size, height - TRIGGER_MARGIN)
    index[col_axis] = slice(width - TRIGGER_MARGIN - size, width - TRIGGER_MARGIN)
    out[tuple(index)] = 0
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Poisoning
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Poison:
    """Which training samples are poisoned (indices into the train arrays), with which trigger and target label."""

    dataset: str
    target: int
    trigger_size: int
    indices: np.ndarray

    @property
    def hash(self) -> str:
        name_code = [ord(c) for c in self.dataset]
        return sha256_of_array(np.concatenate([name_code, [self.target, self.trigger_size, len(self.indices)],
                                               self.indices]))

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "target": self.target, "trigger_size": self.trigger_size,
                "num_poisoned": int(len(self.indices)), "hash": self.hash, "indices": self.indices.tolist()}


def poison_data(data: ImageData, poison: Poison) -> ImageData:
    """A copy of `data` whose poisoned training samples carry the trigger and the target label; test set untouched.

    The trigger goes on the stored (raw) image, so train-time augmentation later moves it with the image, as upstream.
    """
    idx = torch.as_tensor(poison.indices, device=data.train_images.device)
    images, labels = data.train_images.clone(), data.train_labels.clone()
    images[idx] = add_trigger(images[idx], poison.trigger_size, "CHW")
    labels[idx] = poison.target
    return dataclasses.replace(data, train_images=images, train_labels=labels)


def attack_test_set(data: ImageData, split: Split, poison: Poison, count_target_class: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered test images and their true labels (target-class images left out unless `count_target_class`)."""
    idx = torch.as_tensor(split.test, device=data.test_images.device)
    images, labels = data.test_images[idx], data.test_labels[idx]
    if not count_target_class:
        keep = labels != poison.target
        images, labels = images[keep], labels[keep]
    return add_trigger(images, poison.trigger_size, "CHW"), labels


def asr_note(poison: Poison, count_target_class: bool) -> str:
    if count_target_class:
        return (f"ASR counts all triggered test images, target class {poison.target} included (--paper_era, as "
                f"upstream; a target-class image predicted as the target is then counted as an attack)")
    return (f"ASR excludes test images of the target class {poison.target}: predicting the target for them is a "
            f"correct answer, not a successful attack (--paper_era counts them, as upstream)")


@torch.no_grad()
def backdoor_metrics(model: torch.nn.Module, clean: SplitData, poison: Poison, count_target_class: bool = False
                     ) -> dict[str, float]:
    """Clean test accuracy and ASR (fraction of triggered test images classified as the target), both in %."""
    test_logits, test_labels = predict(model, clean.eval_loader("test"))
    images, labels = attack_test_set(clean.data, clean.split, poison, count_target_class)
    attack_logits, _ = predict(model, TensorLoader(images, labels, batch_size=max(clean.batch_size, 512)))
    clean_acc = 100.0 * float((test_logits.argmax(1) == test_labels).double().mean())
    asr = 100.0 * float((attack_logits.argmax(1) == poison.target).double().mean()) if len(labels) else float("nan")
    return {"clean_acc": clean_acc, "asr": asr}


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------

def add_backdoor_flags(parser: argparse.ArgumentParser) -> None:
    """mlflow_forget.py's output and tracking flags (so benchmark cells and emitted command lines work unchanged), but
    tracking is on only with --track or when MLFLOW_TRACKING_URI is set (a plain run writes local files only)."""
    add_forget_flags(parser)
    parser.set_defaults(track=None)
    for action in parser._actions:
        if action.dest == "track":
            action.help = ("log to mlflow (default: only when MLFLOW_TRACKING_URI is set; --track without it uses "
                           "sqlite:///mlflow.db in the working directory)")


def tracking_enabled(args: argparse.Namespace, environ: dict | None = None) -> bool:
    if args.track is not None:
        return bool(args.track)
    return bool((os.environ if environ is None else environ).get("MLFLOW_TRACKING_URI"))


def _raise_user_error(message: str):
    raise UserError(message)


def check_backdoor_args(args: argparse.Namespace) -> None:
    """Checks that need no data: the target label and the poison count are required and in range."""
    classes = num_classes_of(args.dataset)
    if not 0 <= args.class_to_replace < classes:
        raise UserError(f"--class_to_replace {args.class_to_replace} (the backdoor target label) is out of range; "
                        f"allowed: 0..{classes - 1} for {args.dataset}")
    if args.num_indexes_to_replace is None:
        raise UserError("--num_indexes_to_replace (the number of poisoned training samples) is required, e.g. 10 % of "
                        "the training set (4500 on CIFAR-10)")


def parse_backdoor_args(argv: Sequence[str] | None = None, description: str = "") -> argparse.Namespace:
    """The shared parser plus backdoor checks; every usage error is one line 'error: ...' (via utils.cli_main)."""
    parser = build_parser(description, extra=add_backdoor_flags, prog="main_backdoor.py")
    parser.error = _raise_user_error  # one format ("error: ...") for argparse's, resolve_args' and our own errors
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.list_methods:
        return args
    check_backdoor_args(args)  # before resolve_args, whose class check would also allow -1
    return resolve_args(args, parser)


# ---------------------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class BackdoorRun:
    clean: Run        # clean data and split (clean test set; the split's forget = the poisoned positions)
    poisoned: Run     # same split on the poisoned data: forget = triggered samples with the target label
    poison: Poison
    model_path: Path

    @property
    def count_target_class(self) -> bool:
        return bool(self.clean.args.paper_era)


def backdoor_model_path(args: argparse.Namespace, poison: Poison) -> Path:
    return Path(args.save_dir) / (f"{args.seed}{args.arch}_ep{args.epochs}_backdoor_t{poison.target}"
                                  f"_n{len(poison.indices)}_ts{poison.trigger_size}_{poison.hash[:8]}"
                                  f"model_SA_best.pth.tar")


def result_path(args: argparse.Namespace) -> Path:
    """--result_json, else {save_dir}/{unlearn}backdoor_result.json."""
    return Path(args.result_json) if getattr(args, "result_json", None) else \
        Path(args.save_dir) / f"{args.unlearn}{RESULT_SUFFIX}"


def checkpoint_path(args: argparse.Namespace) -> Path:
    return Path(args.save_dir) / f"{args.unlearn}backdoor_checkpoint.pth.tar"


def experiment_name(args: argparse.Namespace) -> str:
    return getattr(args, "experiment", None) or f"{args.dataset}-backdoor"


def run_name(args: argparse.Namespace) -> str:
    return getattr(args, "run_name", None) or \
        f"{args.unlearn}-backdoor-t{args.class_to_replace}n{args.num_indexes_to_replace}-seed{args.seed}"


def check_backdoor_inputs(args: argparse.Namespace) -> tuple[argparse.Namespace, ImageData]:
    """Every check that needs the data, before anything is written: method, trigger size, poison count.
    Returns the arguments with the trigger size resolved and the split made consistent, and the (clean) dataset."""
    check_backdoor_args(args)
    resolve_method(args.unlearn, args.grad_mask)  # an unknown method fails before any training
    data = load_dataset(args.dataset, args.data, download=not getattr(args, "no_download", False))
    size = args.trigger_size if args.trigger_size is not None else default_trigger_size(data.image_size)
    check_trigger_size(size, *data.train_images.shape[-2:])
    make_split(data, -1, args.num_indexes_to_replace, seed=args.seed)  # poison count out of range -> UserError
    args = copy.copy(args)
    if args.split != "consistent":
        print("note: the backdoor experiment always uses the consistent split (the poisoned model is trained here on "
              "exactly retain + poisoned samples); --split upstream is ignored")
    args.trigger_size, args.split = size, "consistent"
    return args, data


def setup_backdoor(args: argparse.Namespace, data: ImageData | None = None) -> BackdoorRun:
    """The clean and the poisoned run of one backdoor experiment (inputs checked first, unless `data` comes from
    `check_backdoor_inputs`)."""
    if data is None:
        args, data = check_backdoor_inputs(args)
    # The poisoned samples are chosen as a random forget set across all classes (upstream forces class -1).
    split_args = copy.copy(args)
    split_args.class_to_replace = -1
    clean = setup_run(split_args, need_forget=False, data=data)
    clean = dataclasses.replace(clean, args=args)
    poison = Poison(dataset=args.dataset, target=args.class_to_replace, trigger_size=args.trigger_size,
                    indices=clean.split.forget)
    poisoned_data = poison_data(clean.data, poison)
    poisoned = dataclasses.replace(clean, data=poisoned_data,
                                   splits=dataclasses.replace(clean.splits, data=poisoned_data), _retrain_eval={})
    model_path = Path(args.mask) if args.mask else backdoor_model_path(args, poison)
    return BackdoorRun(clean=clean, poisoned=poisoned, poison=poison, model_path=model_path)


def train_poisoned_model(bd: BackdoorRun, resume: bool = False, plot: bool = True) -> dict:
    """Train on retain + poisoned samples with the original model's recipe (training.train_model, as main_baseline.py);
    the best-by-validation weights (validation is clean) go to the model path with weights-only metadata."""
    run, args, poison = bd.poisoned, bd.poisoned.args, bd.poison
    set_seed(args.seed)
    model = build_model(args, run.data, init_seed=args.train_seed).to(run.device)
    meta = model_metadata(run, "backdoor", split_hash=run.split.hash, poison_hash=poison.hash, target=poison.target,
                          trigger_size=poison.trigger_size, num_poisoned=int(len(poison.indices)))
    name = bd.model_path.name
    last = bd.model_path.with_name((name[:-len(".pth.tar")] if name.endswith(".pth.tar") else name) + "_last.pth.tar")
    result = train_model(model, run.splits, run.recipe, seed=args.seed, part="train", last_checkpoint=last,
                         resume=resume, metadata=meta, progress=run.progress, desc="backdoor")
    model.load_state_dict(result.best_state)
    metrics = backdoor_metrics(model, bd.clean.splits, poison, bd.count_target_class)
    atomic_torch_save(bd.model_path, {**meta, "state_dict": result.best_state, "epoch": result.best_epoch,
                                      "best_val": result.best_val, "history": result.history,
                                      "train_seconds": result.seconds, **metrics})
    if plot:
        plot_history(result.history, bd.model_path.with_suffix("").with_suffix(".png"),
                     title=f"backdoored {args.arch} {args.dataset}")
    return {"best_epoch": result.best_epoch, "train_seconds": result.seconds, **metrics}


def check_backdoor_checkpoint(payload: dict, bd: BackdoorRun) -> None:
    """A --mask file must be the backdoored model of this very poisoning, or the forget set would be meaningless."""
    kind = payload.get("kind")
    if kind is None:
        print(f"note: '{bd.model_path}' has no metadata; assuming it was poisoned with these arguments")
        return
    if kind != "backdoor":
        raise UserError(f"'{bd.model_path}' is a '{kind}' model, not a backdoored one; pass a path that does not exist "
                        f"yet to train the poisoned model there")
    if payload.get("poison_hash") != bd.poison.hash:
        raise UserError(f"'{bd.model_path}' was poisoned differently (poison {payload.get('poison_hash')}, this run "
                        f"{bd.poison.hash}: target, trigger size, poison count or seed differ); pass another --mask")


def ensure_poisoned_model(bd: BackdoorRun) -> tuple[dict, dict | None]:
    """Load the backdoored model at the model path, or train it there first (under a file lock, so that parallel
    benchmark cells of one seed train it once). Returns (clean accuracy and ASR before unlearning, training summary)."""
    trained = None
    if not bd.model_path.is_file():
        with file_lock(bd.model_path):
            if not bd.model_path.is_file():  # another job may have trained it while this one waited
                print(f"backdoored model '{bd.model_path}' is missing: training it ({bd.clean.args.arch}, "
                      f"{bd.clean.args.epochs} epochs)", flush=True)
                trained = train_poisoned_model(bd, resume=bd.clean.args.resume,
                                               plot=not getattr(bd.clean.args, "no_plots", False))
                print(f"trained the backdoored model -> {bd.model_path} (best epoch {trained['best_epoch']}, "
                      f"{trained['train_seconds']:.1f} s)")
    if trained is not None:
        return {k: trained[k] for k in ("clean_acc", "asr")}, trained
    model, payload = load_model(bd.model_path, bd.clean)
    check_backdoor_checkpoint(payload, bd)
    print(f"loaded the backdoored model {bd.model_path}")
    return backdoor_metrics(model, bd.clean.splits, bd.poison, bd.count_target_class), None


def run_backdoor_cell(args: argparse.Namespace, tracker=None, experiment_id: str | None = None,
                      data: ImageData | None = None) -> dict:
    """The whole experiment for one (method, seed): train or load the backdoored model, measure clean accuracy and ASR,
    unlearn the poisoned samples with `args.unlearn`, measure again, write the result JSON (`result_path(args)`) and,
    unless --no-save-model, the unlearned checkpoint. `tracker`: a `tracking` tracker (None = no tracking).
    Returns the result dict (`result["result_file"]` is where it was written). The benchmark calls this per cell."""
    if data is None:
        args, data = check_backdoor_inputs(args)
    bd = setup_backdoor(args, data)
    args = bd.clean.args
    print(f"{args.dataset}: backdoor with target {bd.poison.target}, {len(bd.poison.indices)} poisoned of "
          f"{len(bd.clean.split.train)} training samples, {bd.poison.trigger_size}x{bd.poison.trigger_size} trigger; "
          f"retain {len(bd.clean.split.retain)}, val {len(bd.clean.split.val)}, test {len(bd.clean.split.test)}; "
          f"poison {bd.poison.hash} on {device_name(bd.clean.device)}")
    print(asr_note(bd.poison, bd.count_target_class))
    before, trained = ensure_poisoned_model(bd)
    print(f"before unlearning: clean accuracy {before['clean_acc']:.2f} %, ASR {before['asr']:.2f} %", flush=True)

    def after_metrics(model: torch.nn.Module) -> dict:
        after = backdoor_metrics(model, bd.clean.splits, bd.poison, bd.count_target_class)
        return {"clean_acc_unlearn": after["clean_acc"], "asr_unlearn": after["asr"]}

    model_info = {"path": str(bd.model_path), "trained_now": trained is not None}
    if trained is not None:
        model_info.update({k: trained[k] for k in ("best_epoch", "train_seconds")})
    extra = {**before, "scenario": "backdoor", "asr_counts_target_class": bd.count_target_class,
             "asr_note": asr_note(bd.poison, bd.count_target_class), "poison": bd.poison.to_json(),
             "backdoor_model": model_info}
    out_path = result_path(args)
    save_model = not getattr(args, "no_save_model", False)
    tracked = tracker is not None
    handle = NullRun()
    if tracked:
        hp = resolve_hyperparameters(resolve_method(args.unlearn, args.grad_mask), method_hyperparameters(args),
                                     dataset=args.dataset)
        tags = {**run_tags(args, bd.poisoned), "scenario": "backdoor", "poison_hash": bd.poison.hash}
        handle = tracker.start_run(experiment_id, run_name(args), tags=tags,
                                   parent_run_id=getattr(args, "parent_run_id", None),
                                   params={**vars(args), **{f"hp.{k}": v for k, v in hp.items()}})
        handle.log_metrics({"clean_acc": before["clean_acc"], "asr": before["asr"]}, step=0)
    epoch_eval = not getattr(args, "no_epoch_eval", False)  # curves with the ASR per epoch, as mlflow_forget.py

    def on_epoch(epoch: int, metrics: dict, stats: dict) -> None:
        if tracked:
            handle.log_epoch(epoch, metrics)
            handle.log_metrics({k: metrics[k] for k in ("clean_acc_unlearn", "asr_unlearn")}, step=epoch)

    with ending(handle):
        result = unlearn_and_evaluate(bd.poisoned, model_path=bd.model_path, per_epoch_eval=epoch_eval,
                                      on_epoch=on_epoch if epoch_eval else None, write_files=save_model,
                                      paths={"result": out_path, "checkpoint": checkpoint_path(args)},
                                      scenario_metrics=after_metrics, extra=extra)
        if not save_model:  # unlearn_and_evaluate wrote nothing: the result and the split indices still are
            split_file = Path(result["split_file"])
            if not split_file.is_file():
                bd.clean.split.save(split_file)
            write_result(out_path, result)
        if tracked:
            if not epoch_eval:  # otherwise the last epoch's entry already holds the final numbers
                handle.log_epoch(result["epochs_run"], result)
                handle.log_metrics({k: result[k] for k in ("clean_acc_unlearn", "asr_unlearn")},
                                   step=result["epochs_run"])
            handle.log_files(out_path, config=vars(args), split_file=Path(result["split_file"]))
    return link_result(handle, result, out_path)


def run_backdoor_argv(argv: Sequence[str]) -> dict:
    """A benchmark cell from its command line (the `run_cell` hook of the sweep's scenario registry; untracked: the
    sweep logs finished cells itself)."""
    return run_backdoor_cell(parse_backdoor_args(argv))


def format_backdoor_line(result: dict) -> str:
    return (f"clean accuracy {result['clean_acc']:.2f} -> {result['clean_acc_unlearn']:.2f} %, "
            f"ASR {result['asr']:.2f} -> {result['asr_unlearn']:.2f} %, RTE {result['RTE_seconds']:.2f} s")
