"""Backdoor ("Trojan model") cleanse: the scenario, its trigger and poisoning, and its run.

A black square trigger is stamped on `--num_indexes_to_replace` training samples drawn across all classes (the
forget-set machinery with class -1, from the original model's training split) and their label is set to the target
`--class_to_replace`. A model trained on that poisoned set learns "trigger -> target". Unlearning then gets the poisoned
samples (with trigger and target label) as the forget set and the clean rest of the training split as the retain set;
success = the attack success rate (ASR) falls while clean test accuracy stays.

Differences from upstream (Unlearn-Sparse `main_backdoor.py`), all deliberate (docs/upstream.md):
* dense training with the project's training loop (upstream: OMP pruning, which needs `--rewind_epoch > 0`);
* the trigger works on any image layout (upstream: H x W x C arrays only);
* ASR counts only triggered test images whose true class is not the target: a target-class image classified as the
  target is a correct prediction, not a successful attack. `--paper_era` counts all, as upstream did;
* the split is always the consistent one: the poisoned model is trained here on exactly retain + poisoned samples, so
  upstream's split-seed quirk (`--split upstream`) has no meaning for this experiment.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arg_parser import parse_config
from dataset import ImageData, Split, SplitData, TensorLoader
from evaluation import predict
from pipeline.config import RunConfig, frozen
from pipeline.paths import init_tag
from pipeline.runs import run_params, run_tags, tracking_record, unlearn_or_keep_last, with_attacks
from pipeline.stages import (
    Prepared,
    build_model,
    evaluate,
    load_data,
    load_model,
    model_metadata,
    prepare,
    write_outputs,
)
from scenarios import Scenario, forget_count, register_scenario
from tracking import NullRun, ending
from training import plot_history, train_model
from utils import UserError, atomic_torch_save, device_name, file_lock, set_seed, sha256_of_array

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
# The run: train (or load) the backdoored model, unlearn the poisoned samples, measure clean accuracy and ASR
# ---------------------------------------------------------------------------------------------------------------------

RESULT_NAME = "backdoor_result.json"
CHECKPOINT_NAME = "backdoor_checkpoint.pth.tar"
AFTER_KEYS = ("clean_acc_unlearn", "asr_unlearn")


@dataclass
class BackdoorRun:
    config: RunConfig     # as asked: class_to_replace is the target label
    clean: Prepared       # clean data and split (clean test set; the split's forget = the poisoned positions)
    poisoned: Prepared    # same split on the poisoned data: forget = triggered samples with the target label
    poison: Poison
    model_path: Path

    @property
    def count_target_class(self) -> bool:
        return self.config.method.paper_era


def backdoor_model_path(config: RunConfig, poison: Poison) -> Path:
    return config.output.save_dir / (f"{config.data.seed}{config.model.arch}{init_tag(config.model)}_ep"
                                     f"{config.model.epochs}_backdoor_t"
                                     f"{poison.target}_n{len(poison.indices)}_ts{poison.trigger_size}_"
                                     f"{poison.hash[:8]}model_SA_best.pth.tar")


def result_path(config: RunConfig) -> Path:
    """--result_json, else {save_dir}/{unlearn}backdoor_result.json."""
    return config.output.result_json or config.output.save_dir / f"{config.method.name}{RESULT_NAME}"


def checkpoint_path(config: RunConfig) -> Path:
    return config.output.save_dir / f"{config.method.name}{CHECKPOINT_NAME}"


def experiment_name(config: RunConfig) -> str:
    return config.tracking.experiment or f"{config.data.dataset}-backdoor"


def run_name(config: RunConfig) -> str:
    return config.tracking.run_name or (f"{config.method.name}-backdoor-t{config.data.class_to_replace}"
                                        f"n{config.data.num_indexes_to_replace}-seed{config.data.seed}")


def setup_backdoor(config: RunConfig, data: ImageData | None = None) -> BackdoorRun:
    """Every check that needs the data (trigger size, poison count), then the clean and the poisoned run."""
    data = data if data is not None else load_data(config)
    size = config.extras.get("trigger_size") or default_trigger_size(data.image_size)
    check_trigger_size(size, *data.train_images.shape[-2:])
    config = dataclasses.replace(config, flags=frozen({**config.flags, "trigger_size": size}),
                                 extras=frozen({**config.extras, "trigger_size": size}))  # the result records it
    # The poisoned samples are chosen as a random forget set across all classes (upstream forces class -1).
    as_random = dataclasses.replace(config, data=dataclasses.replace(config.data, class_to_replace=-1))
    clean = prepare(as_random, data=data, need_forget=False)
    poison = Poison(dataset=config.data.dataset, target=config.data.class_to_replace, trigger_size=size,
                    indices=clean.split.forget)
    poisoned = clean.with_data(poison_data(clean.data, poison))
    model_path = Path(config.method.model_path) if config.method.model_path else backdoor_model_path(config, poison)
    return BackdoorRun(config=config, clean=clean, poisoned=poisoned, poison=poison, model_path=model_path)


def train_poisoned_model(bd: BackdoorRun) -> dict:
    """Train on retain + poisoned samples with the original model's recipe (as main_baseline.py); the best-by-validation
    weights (validation is clean) go to the model path with weights-only metadata."""
    p, c, poison = bd.poisoned, bd.config, bd.poison
    set_seed(c.data.seed)
    model = build_model(p, c.model.width, init_seed=c.model.train_seed).to(p.device)
    meta = model_metadata(p, "backdoor", split_hash=p.split.hash, poison_hash=poison.hash, target=poison.target,
                          trigger_size=poison.trigger_size, num_poisoned=int(len(poison.indices)))
    name = bd.model_path.name
    last = bd.model_path.with_name((name[:-len(".pth.tar")] if name.endswith(".pth.tar") else name) + "_last.pth.tar")
    result = train_model(model, p.splits, c.model.recipe, seed=c.data.seed, part="train", last_checkpoint=last,
                         resume=c.output.resume, metadata=meta, progress=p.progress, desc="backdoor",
                         amp=c.model.amp)
    model.load_state_dict(result.best_state)
    metrics = backdoor_metrics(model, bd.clean.splits, poison, bd.count_target_class)
    atomic_torch_save(bd.model_path, {**meta, "state_dict": result.best_state, "epoch": result.best_epoch,
                                      "best_val": result.best_val, "history": result.history,
                                      "train_seconds": result.seconds, **metrics})
    if c.output.plots:
        plot_history(result.history, bd.model_path.with_suffix("").with_suffix(".png"),
                     title=f"backdoored model: {c.model.arch}, {c.data.dataset}, seed {c.data.seed}",
                     selected_epoch=result.best_epoch, selected_why="best validation accuracy, kept")
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
                print(f"backdoored model '{bd.model_path}' is missing: training it ({bd.config.model.arch}, "
                      f"{bd.config.model.epochs} epochs)", flush=True)
                trained = train_poisoned_model(bd)
                print(f"trained the backdoored model -> {bd.model_path} (best epoch {trained['best_epoch']}, "
                      f"{trained['train_seconds']:.1f} s)")
    if trained is not None:
        return {k: trained[k] for k in ("clean_acc", "asr")}, trained
    model, payload = load_model(bd.model_path, bd.clean)
    check_backdoor_checkpoint(payload, bd)
    print(f"loaded the backdoored model {bd.model_path}")
    return backdoor_metrics(model, bd.clean.splits, bd.poison, bd.count_target_class), None


def run_backdoor(bd: BackdoorRun, tracker=None, experiment_id: str | None = None) -> dict:
    """The whole experiment for one (method, seed): the backdoored model (trained or loaded), clean accuracy and ASR
    before, unlearning of the poisoned samples, the same after; the result JSON (written once) and, unless
    --no-save-model, the unlearned checkpoint. `tracker`: a `tracking` tracker (None = no tracking)."""
    c = bd.config
    print(f"{c.data.dataset}: backdoor with target {bd.poison.target}, {len(bd.poison.indices)} poisoned of "
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
    out_path = result_path(c)
    checkpoint = checkpoint_path(c) if c.output.save_model else None
    handle = NullRun()
    started_at = int(time.time() * 1000)  # unix ms: a benchmark logs this cell after the fact with its real times
    if tracker is not None:
        tags = {**run_tags(c.flags, bd.poisoned.split.hash, device_name(bd.poisoned.device)),
                "scenario": "backdoor", "poison_hash": bd.poison.hash}
        handle = tracker.start_run(experiment_id, run_name(c), tags=tags, parent_run_id=c.tracking.parent_run_id,
                                   params=run_params(c), start_time_ms=started_at)
        handle.log_metrics({"clean_acc": before["clean_acc"], "asr": before["asr"]}, step=0)
    epoch_eval = c.eval.epoch_eval  # curves with the ASR per epoch, as mlflow_forget.py

    def on_epoch(epoch: int, metrics: dict, stats: dict) -> None:
        handle.log_epoch(epoch, metrics)
        handle.log_metrics({k: metrics[k] for k in AFTER_KEYS}, step=epoch)

    with ending(handle):
        unl = unlearn_or_keep_last(bd.poisoned, checkpoint, model_path=bd.model_path, epoch_eval=epoch_eval,
                                   on_epoch=on_epoch if epoch_eval and tracker is not None else None,
                                   scenario_metrics=after_metrics)
        result = with_attacks(bd.poisoned, unl, evaluate(bd.poisoned, unl, scenario_metrics=after_metrics, extra=extra))
        result["started_at"], result["finished_at"] = started_at, int(time.time() * 1000)
        record = tracking_record(tracker, handle) if tracker is not None else None
        if record:
            result["tracking"] = record
        write_outputs(bd.poisoned, result, out_path, unl.model, checkpoint, scenario_keys=AFTER_KEYS)
        if tracker is not None:
            if not epoch_eval:  # otherwise the last epoch's entry already holds the final numbers
                handle.log_epoch(result["epochs_run"], result)
                handle.log_metrics({k: result[k] for k in AFTER_KEYS}, step=result["epochs_run"])
            handle.log_files(out_path, config=c.args_record(), split_file=Path(result["split_file"]))
    return result


def run_backdoor_argv(argv: list[str]) -> dict:
    """A benchmark cell from its command line (untracked: the sweep logs finished cells itself)."""
    return run_backdoor(setup_backdoor(parse_config(argv, "main_backdoor.py")))


def format_backdoor_line(result: dict) -> str:
    return (f"clean accuracy {result['clean_acc']:.2f} -> {result['clean_acc_unlearn']:.2f} %, "
            f"ASR {result['asr']:.2f} -> {result['asr_unlearn']:.2f} %, RTE {result['RTE_seconds']:.2f} s")


# ---------------------------------------------------------------------------------------------------------------------
# The scenario of the benchmark
# ---------------------------------------------------------------------------------------------------------------------

BACKDOOR_TARGET = 0  # upstream's default target label (--class_to_replace 0)
BACKDOOR_METRICS = (("clean_acc", "clean acc before"), ("asr", "ASR before"), ("clean_acc_unlearn", "clean acc after"),
                    ("asr_unlearn", "ASR after"), ("RTE_seconds", "RTE (s)"))

register_scenario(Scenario(
    "backdoor", f"backdoor cleanse: forget_fraction of the training split poisoned with the trigger, target class "
                f"{BACKDOOR_TARGET}; the poisoned samples are the forget set",
    lambda settings, train_size: {"class_to_replace": BACKDOOR_TARGET,
                                  "num_indexes_to_replace": forget_count(settings, train_size)},
    script="main_backdoor.py", run_cell=run_backdoor_argv, references=False, metrics=BACKDOOR_METRICS,
    note=f"backdoor: target class {BACKDOOR_TARGET}, forget_fraction of the training split poisoned; each cell trains "
         f"(once per seed, shared by the methods) or loads the backdoored model; clean acc = test accuracy on clean "
         f"images; ASR = % of triggered test images of the other classes classified as the target (main_backdoor.py)."))
