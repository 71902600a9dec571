"""The stages of a run, each written once; entry scripts and benchmark cells compose them in this order:

    prepare (device, data, split)  ->  original / Retrain models (load, or train when missing)  ->  unlearn
    ->  evaluate (population metrics; per-example attacks in `pipeline.mia`)  ->  write files (each once, atomically)
    ->  track (`pipeline.tracked`)

A stage takes the typed `RunConfig` (or the `Prepared` run built from it) and plain values, and returns values;
nothing here reads an argparse namespace or imports mlflow.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dataset import ImageData, Split, SplitData, load_dataset, make_split
from evaluation import SELECTION_PARTS, Evaluation, build_result, evaluate_model, selection_entry, write_result
from evaluation.per_example_mia import check_forget_inside_training
from evaluation.selection import PlateauStop
from models import create_model
from pipeline import paths
from pipeline.config import RunConfig
from training import first_difference, plot_history, resume_settings, train_model
from unlearn import UnlearnContext, UnlearnOutcome, resolve_method, run_unlearning
from unlearn.registry import ResolvedMethod
from utils import (
    DivergenceError,
    UserError,
    atomic_torch_save,
    atomic_write_json,
    device_name,
    ensure_writable_dir,
    file_lock,
    load_checkpoint,
    make_generator,
    resolve_device,
    set_seed,
)

# ---------------------------------------------------------------------------------------------------------------------
# Data and split
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A configuration made concrete: the device, the data on it, the split and its loaders."""

    config: RunConfig
    device: torch.device
    data: ImageData
    split: Split
    splits: SplitData
    retrain_cache: dict = field(default_factory=dict, repr=False)

    @property
    def save_dir(self) -> Path:
        return self.config.output.save_dir

    @property
    def progress(self) -> bool:
        return self.config.output.progress

    def with_data(self, data: ImageData) -> Prepared:
        """The same split on other images (the backdoor's poisoned copy), with its own Retrain cache."""
        splits = SplitData(data, self.split, batch_size=self.splits.batch_size, augment=self.splits.augment)
        return Prepared(self.config, self.device, data, self.split, splits)


def describe_scenario(split: Split) -> str:
    if split.scenario == "classwise":
        return (f"class-wise forgetting of class {split.class_to_replace} "
                f"({len(split.forget)} samples; class removed from test)")
    if split.scenario == "subclass":
        return f"sub-class forgetting: {len(split.forget)} samples of class {split.class_to_replace}"
    return f"random forgetting: {len(split.forget)} samples across all classes"


def load_data(config: RunConfig) -> ImageData:
    return load_dataset(config.data.dataset, config.data.root, download=config.data.download)


# The smallest retain set a training batch can be made of (BatchNorm normalises over more than one sample).
MIN_RETAIN = 2


def make_run_split(config: RunConfig, data: ImageData, need_forget: bool = True) -> Split:
    """The forget / retain split; a forget set that leaves no retain sample is refused (nothing would be learnt)."""
    d = config.data
    if d.num_indexes_to_replace is None and d.class_to_replace == -1 and not need_forget:
        # any split: only `train` is used
        return make_split(data, 0, None, seed=d.seed, split_mode=d.split_mode, train_subset=d.train_subset)
    split = make_split(data, d.class_to_replace, d.num_indexes_to_replace, seed=d.seed, split_mode=d.split_mode,
                       train_subset=d.train_subset)
    if need_forget and len(split.retain) == 0:
        raise UserError(f"the forget set takes all {len(split.train)} training samples and leaves no retain set; "
                        f"allowed: --num_indexes_to_replace below {len(split.train)}")
    if need_forget and len(split.retain) < MIN_RETAIN:
        # Retrain and every method that trains on the retain set would fail in BatchNorm, which needs more than one
        # sample per training batch.
        raise UserError(f"the forget set leaves {len(split.retain)} retain sample of {len(split.train)}, too few for "
                        f"a training batch (BatchNorm needs at least {MIN_RETAIN}); allowed: --num_indexes_to_replace "
                        f"up to {len(split.train) - MIN_RETAIN}")
    return split


def prepare(config: RunConfig, data: ImageData | None = None, need_forget: bool = True,
            announce: bool = True) -> Prepared:
    """Device, data (loaded unless given) and split. Validates the forget set before anything is written. Sets the
    run's CPU thread count when --threads is given (the caller restores its own, if it needs to)."""
    if config.flags.get("threads"):
        torch.set_num_threads(config.flags["threads"])
    device = resolve_device(config.device)
    data = (data if data is not None else load_data(config)).to(device)
    split = make_run_split(config, data, need_forget)
    if need_forget:
        check_forget_inside_training(config.eval.mia, split)  # the attacks run after training: refuse now
    if need_forget and announce:
        print(f"{config.data.dataset}: {describe_scenario(split)}; retain {len(split.retain)}, val {len(split.val)}, "
              f"test {len(split.test)}; split {split.hash} on {device_name(device)}")
    splits = SplitData(data, split, batch_size=config.data.batch_size, augment=config.data.augment)
    return Prepared(config=config, device=device, data=data, split=split, splits=splits)


# ---------------------------------------------------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def build_model(p: Prepared, width: int | None, init_seed: int | None = None) -> torch.nn.Module:
    """A fresh model; with `init_seed` its initialisation is reproducible (Retrain shares the original's init)."""
    if init_seed is not None:
        torch.manual_seed(init_seed)
    return create_model(p.config.model.arch, num_classes=p.data.num_classes, in_channels=p.data.in_channels,
                        width=width, mean=p.data.mean, std=p.data.std)


def model_metadata(p: Prepared, kind: str, **extra: Any) -> dict:
    """What a checkpoint records about the settings that made it (compared on --resume and on load)."""
    c = p.config
    recipe = c.model.recipe
    return {"kind": kind, "arch": c.model.arch, "dataset": c.data.dataset, "num_classes": p.data.num_classes,
            "in_channels": p.data.in_channels, "width": c.model.width, "seed": c.data.seed,
            "train_seed": c.model.train_seed, "epochs": c.model.epochs, "lr": recipe.lr, "momentum": recipe.momentum,
            "weight_decay": recipe.weight_decay, "batch_size": recipe.batch_size,
            "milestones": list(recipe.milestones), "warmup": recipe.warmup, "augment": c.data.augment,
            "torch_version": str(torch.__version__),
            # recorded only when on, so checkpoints written before --amp existed still resume with it off
            **({"amp": c.model.amp} if c.model.amp != "off" else {}),
            **({"train_subset": c.data.train_subset} if c.data.train_subset is not None else {}), **extra}


def check_metadata(payload: dict, path: Path, p: Prepared) -> None:
    """One-line error when a checkpoint was written for another arch, dataset, class count or width."""
    c = p.config
    expected = {"arch": c.model.arch, "dataset": c.data.dataset, "num_classes": p.data.num_classes,
                "in_channels": p.data.in_channels}
    for key, want in expected.items():
        have = payload.get(key)
        if have is not None and have != want:
            raise UserError(f"checkpoint '{path}' was written for {key}={have}, but {key}={want} was requested; "
                            f"pass matching --{'dataset' if key in ('num_classes', 'in_channels') else key}")
    if payload.get("train_subset") != c.data.train_subset:  # recorded only for a subset: absent means all the data
        def trained_on(n):
            return "all training images" if n is None else f"a --train_subset of {n}"
        raise UserError(f"checkpoint '{path}' was trained on {trained_on(payload.get('train_subset'))}; this run "
                        f"asks for {trained_on(c.data.train_subset)} (pass the matching --train_subset)")
    width = payload.get("width")
    if width is not None and c.model.width is not None and width != c.model.width:
        raise UserError(f"checkpoint '{path}' has width {width}, but --width {c.model.width} was requested")


def file_version(path: str | Path) -> tuple:
    """What identifies one version of a file: its resolved path, inode (an atomic rewrite is a new inode), size and
    modification time. Raises OSError when the file is missing."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


def remembered(cache: dict, kept: int, key: tuple, compute: Callable[[], Any]) -> Any:
    """`cache[key]`, computed on a miss; the cache holds at most `kept` entries and drops the oldest first."""
    if key not in cache:
        value = compute()
        if len(cache) >= kept:
            cache.pop(next(iter(cache)))
        cache[key] = value
    return cache[key]


# Every cell of a sweep reads the same original and Retrain checkpoints (about 25 ms per read, two per cell): a process
# keeps the last few versions it read, so only a changed file is read again.
_CHECKPOINTS: dict[tuple, dict] = {}
_CHECKPOINTS_KEPT = 8


def read_checkpoint(path: str | Path) -> dict:
    """`utils.load_checkpoint`, read once per file version in this process. The top-level dict is the caller's own;
    the tensors and nested values in it are shared with later callers: read them, never change them in place
    (`load_state_dict` copies)."""
    try:
        key = file_version(path)
    except OSError:
        return load_checkpoint(path)  # the one-line error of a missing file
    return dict(remembered(_CHECKPOINTS, _CHECKPOINTS_KEPT, key, lambda: load_checkpoint(path)))


def load_model(path: str | Path, p: Prepared) -> tuple[torch.nn.Module, dict]:
    """Load a weights-only checkpoint into a freshly built model, after checking its metadata. The recorded width
    wins when --width was left unset."""
    path = Path(path)
    payload = read_checkpoint(path)
    check_metadata(payload, path, p)
    width = p.config.model.width if p.config.model.width is not None else payload.get("width")
    model = build_model(p, width).to(p.device)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint '{path}' does not fit --arch {p.config.model.arch} on {p.config.data.dataset} "
                        f"({first[:150]})") from exc
    return model, payload


def train_reference(p: Prepared, retrain: bool, resume: bool = False,
                    checkpoint_path: str | Path | None = None) -> dict:
    """Train the original model (whole training split; best-by-validation weights) or the Retrain reference (retain
    set, same recipe and initialisation; final weights). Writes the checkpoint, a JSON summary and the curve plot."""
    c = p.config
    set_seed(c.data.seed)
    model = build_model(p, c.model.width, init_seed=c.model.train_seed).to(p.device)
    default_best = paths.original_model(p.save_dir, c.data, c.model)
    if retrain:
        best_path = paths.retrain_model(p.save_dir, c.data, c.model, p.split.tag)
        last_path = paths.retrain_rolling(best_path)
        part, kind, split_hash, split_tag = "retain", "retrain", p.split.hash, p.split.tag
    else:
        best_path = Path(checkpoint_path) if checkpoint_path else default_best
        last_path = paths.original_rolling(best_path, default_best)
        part, kind, split_hash, split_tag = "train", "original", None, None
    meta = retrain_metadata(p) if retrain else model_metadata(p, kind, split_hash=split_hash, split_tag=split_tag)
    ensure_writable_dir(best_path.parent)
    result = train_model(model, p.splits, c.model.recipe, seed=c.data.seed, part=part, last_checkpoint=last_path,
                         resume=resume, metadata=meta, progress=p.progress, desc=kind, amp=c.model.amp)
    state = result.model.state_dict() if retrain else result.best_state
    model.load_state_dict(state)
    evaluation = evaluate_model(model, p.splits, with_mia=retrain, amp=c.model.amp)
    accuracy = {"train": result.history["train_acc"][-1],
                "val": result.history["val_acc"][-1] if retrain else result.best_val,
                "test": evaluation.accuracy["test"]}
    # The checkpoint is what marks the model as done (later runs reuse it and skip all of this), so it is written
    # last: a run killed before it leaves no checkpoint and the model is trained again, plot and summary included.
    plot_history(result.history, paths.companion(best_path, ".png"),
                 **history_plot_labels(p, retrain, result.best_epoch))
    summary = {"checkpoint": str(best_path), "kind": kind, "accuracy": accuracy, "best_epoch": result.best_epoch,
               "train_seconds": result.seconds, "device": device_name(p.device), "split_hash": p.split.hash,
               "evaluation": evaluation.accuracy, "args": c.args_record()}
    atomic_write_json(paths.companion(best_path, ".json"), summary)
    atomic_torch_save(best_path, {**meta, "state_dict": state,
                                  "epoch": c.model.epochs if retrain else result.best_epoch, "accuracy": accuracy,
                                  "history": result.history, "train_seconds": result.seconds,
                                  "train_settings": result.settings})
    return summary


def history_plot_labels(p: Prepared, retrain: bool, best_epoch: int) -> dict[str, Any]:
    """Title, kept epoch and validation label of a reference model's training-curve plot."""
    c = p.config
    if not retrain:
        return {"title": f"original model: {c.model.arch}, {c.data.dataset}, seed {c.data.seed}",
                "selected_epoch": best_epoch, "selected_why": "best validation accuracy, kept"}
    labels = {"title": f"Retrain: {c.model.arch}, {c.data.dataset}, {c.data.scenario} forgetting "
                       f"({c.data.forget_setting}), seed {c.data.seed}",
              "selected_epoch": c.model.epochs, "selected_why": "last epoch, kept"}
    if c.data.scenario != "random":  # the validation split keeps every class, the forgotten one too
        labels["val_label"] = f"val acc (all classes, incl. forgotten class {c.data.class_to_replace})"
    return labels


def retrain_settings(p: Prepared) -> dict[str, Any]:
    """What the Retrain model of this run is trained with: the settings `training.train_model` records
    (`training.resume_settings` of the Retrain recipe on this split's retain set), as `train_reference` passes them."""
    c = p.config
    return resume_settings(retrain_metadata(p), c.model.recipe, c.data.seed, "retain", p.splits)


def retrain_metadata(p: Prepared) -> dict:
    """The metadata a Retrain checkpoint of this run records (`model_metadata` with its split)."""
    return model_metadata(p, "retrain", split_hash=p.split.hash, split_tag=p.split.tag)


def retrain_difference(path: Path, p: Prepared) -> str | None:
    """None when the Retrain model at `path` was trained with this run's full recipe (epochs, lr, schedule, seeds,
    width, dataset, augmentation, retain set, ...), else why not. The comparison is the one a --resume makes
    (`training.first_difference`). A checkpoint written before the settings were recorded is judged by the metadata
    it has (`model_metadata`); one without metadata (a bare state_dict) cannot be checked and is never reused."""
    try:
        payload = read_checkpoint(path)
    except UserError as exc:
        return str(exc)
    requested = retrain_settings(p)
    recorded = payload.get("train_settings")
    if not isinstance(recorded, dict):
        recorded = payload
        requested = {k: v for k, v in requested.items() if k in retrain_metadata(p)}
    difference = first_difference(recorded, requested)
    if difference is None:
        return None
    key, have, want = difference
    return f"it was trained with {key}={have!r}, this run's recipe has {key}={want!r}"


def find_retrain_checkpoint(p: Prepared) -> Path | None:
    """The Retrain reference of this run in --save_dir: its file when that was trained with the run's full recipe
    (`retrain_difference`), else None (a Retrain model of another recipe is never used)."""
    c = p.config
    path = paths.retrain_model(p.save_dir, c.data, c.model, p.split.tag)
    if not path.is_file():
        return None
    return path if _retrain_verdict(p, path) is None else None


def _retrain_verdict(p: Prepared, path: Path) -> str | None:
    """`retrain_difference`, read once per file version."""
    key = ("settings", *file_version(path))
    if key not in p.retrain_cache:
        p.retrain_cache[key] = retrain_difference(path, p)
    return p.retrain_cache[key]


def stale_retrain_note(p: Prepared) -> str | None:
    """Why the Retrain file of this split is not used, when there is one that is not this run's."""
    c = p.config
    path = paths.retrain_model(p.save_dir, c.data, c.model, p.split.tag)
    why = _retrain_verdict(p, path) if path.is_file() else None
    return f"Retrain model '{path}' is not this run's: {why}" if why else None


def ensure_original(p: Prepared, path: Path) -> bool:
    """Train the original model into `path` unless it exists (once, even when many jobs ask). True when trained."""
    if path.is_file():
        return False
    with file_lock(path):
        if path.is_file():  # another job trained it while this one waited
            return False
        print(f"original model '{path}' is missing: training it ({p.config.model.arch}, {p.config.model.epochs} "
              f"epochs)", flush=True)
        summary = train_reference(p, retrain=False, checkpoint_path=path)
        print(f"original model: test {summary['accuracy']['test']:.2f} % ({summary['train_seconds']:.1f} s)",
              flush=True)
    return True


def ensure_retrain(p: Prepared) -> bool:
    """Train the Retrain reference of this split into --save_dir unless one of this run's recipe exists (a file of
    another recipe is replaced). True when trained."""
    if find_retrain_checkpoint(p) is not None:
        return False
    c = p.config
    with file_lock(paths.retrain_model(p.save_dir, c.data, c.model, p.split.tag)):
        if find_retrain_checkpoint(p) is not None:
            return False
        stale = stale_retrain_note(p)
        missing = f"Retrain reference for split {p.split.tag} is missing: training it"
        why = f"{stale}; training it again" if stale else missing
        print(f"{why} ({c.model.epochs} epochs)", flush=True)
        summary = train_reference(p, retrain=True)
        print(f"Retrain reference: test {summary['accuracy']['test']:.2f} % ({summary['train_seconds']:.1f} s)",
              flush=True)
    return True


def ensure_references(p: Prepared) -> dict[str, bool]:
    """Both references of a run; Retrain is skipped when the method *is* retrain (it would train the same model
    twice)."""
    trained = {"original": ensure_original(p, paths.model_to_unlearn(p.config))}
    trained["retrain"] = False if p.config.method.base == "retrain" else ensure_retrain(p)
    return trained


# Retrain evaluations kept for the life of the process: a sweep worker runs dozens of cells against each Retrain
# model, and evaluating it again for every cell cost about 0.2 s of each. The key is the file's identity and version
# and everything else the numbers depend on (split, data, precision, device, threads), so a hit is what a fresh
# evaluation would give.
_RETRAIN_EVALUATIONS: dict[tuple, Evaluation] = {}
_RETRAIN_EVALUATIONS_KEPT = 32


def retrain_evaluation(p: Prepared) -> tuple[Evaluation | None, Path | None]:
    """The Retrain reference of the split, evaluated once per file version in this process."""
    path = find_retrain_checkpoint(p)
    if path is None:
        return None, None
    key = (*file_version(path), p.split.hash, repr(p.config.data), p.config.model.amp, str(p.device),
           torch.get_num_threads())

    def evaluate_retrain() -> Evaluation:
        model, _ = load_model(path, p)  # its split and recipe are this run's (find_retrain_checkpoint)
        return evaluate_model(model, p.splits, amp=p.config.model.amp)

    return remembered(_RETRAIN_EVALUATIONS, _RETRAIN_EVALUATIONS_KEPT, key, evaluate_retrain), path


def retrain_reference_result(p: Prepared) -> dict:
    """The Retrain row of a table: the Retrain reference evaluated like any method, its training time as RTE."""
    path = find_retrain_checkpoint(p)
    if path is None:
        raise UserError(f"no Retrain reference for split {p.split.tag} in {p.save_dir}")
    model, payload = load_model(path, p)
    evaluation = evaluate_model(model, p.splits, amp=p.config.model.amp)
    extra = {"method": "Retrain", "reference": True, "scenario": p.split.scenario, "device": device_name(p.device),
             "retrain_model": str(path), "epochs_run": payload.get("epochs"), "hyperparameters": {}}
    return build_result(evaluation, p.config.args_record(), p.split.hash,
                        float(payload.get("train_seconds", float("nan"))), evaluation, extra)


# ---------------------------------------------------------------------------------------------------------------------
# Unlearning
# ---------------------------------------------------------------------------------------------------------------------

EpochHook = Callable[[int, dict, dict], None]
ScenarioMetrics = Callable[[torch.nn.Module], dict]


@dataclass
class Unlearned:
    """What the unlearning stage hands to evaluation and the writers."""

    method: ResolvedMethod
    hp: dict
    model: torch.nn.Module                # the model to evaluate (BE: without its shadow class)
    outcome: UnlearnOutcome
    curves: list[dict]
    model_path: Path
    original_meta: dict
    retrain_eval: Evaluation | None
    retrain_path: Path | None
    width: int | None
    # The per-epoch evaluation of the final model (its last epoch), when one ran: `evaluate` reuses its predictions.
    last_evaluation: Evaluation | None = None


class Diverged(DivergenceError):
    """A method diverged; `model` holds the last finite weights (for the caller to keep on disk), `curves` the
    per-epoch evaluations of the epochs before it (empty without per-epoch evaluation): a tuning trial keeps them as
    candidates."""

    def __init__(self, message: str, epoch: int, model: torch.nn.Module, curves: list[dict] | None = None):
        super().__init__(message, epoch)
        self.model = model
        self.curves = list(curves or [])


def unlearn(p: Prepared, model_path: str | Path | None = None, epoch_eval: bool = False,
            on_epoch: EpochHook | None = None, scenario_metrics: ScenarioMetrics | None = None) -> Unlearned:
    """Load the model to unlearn, run the configured method with the shared driver, and return the result in memory.

    With `epoch_eval` (or an `on_epoch` hook) the model is evaluated after every epoch, outside the RTE timer, and
    `on_epoch(epoch, metrics, stats)` receives the metrics (the final result's keys plus cumulative RTE). With
    `--epoch-eval-metrics selection` an epoch's metrics are only those of the training pool (`epoch_metrics`)."""
    c = p.config
    method = resolve_method(c.method.name, c.method.grad_mask)
    hp = dict(c.method.hp)
    model_path = Path(model_path or paths.model_to_unlearn(c))
    model, payload = load_model(model_path, p)
    original_meta = {k: payload.get(k) for k in ("kind", "epoch", "accuracy", "arch", "dataset", "width")}
    retrain_eval, retrain_path = retrain_evaluation(p)
    if retrain_eval is None:
        why = stale_retrain_note(p) or f"no Retrain reference for split {p.split.tag} in {p.save_dir}"
        print(f"note: {why}; rUA, agreement and Avg. Gap are left out (train it with main_baseline.py --retrain "
              f"and this run's recipe)")
    set_seed(c.method.unlearn_seed)
    width = payload.get("width") or c.model.width
    ctx = UnlearnContext(
        model=model, data=p.splits, generator=make_generator(c.method.unlearn_seed), hp=hp,
        model_factory=lambda: build_model(p, width, init_seed=c.model.train_seed),
        train_recipe=c.model.recipe, retrain_seed=c.data.seed, artifacts_dir=p.save_dir, progress=p.progress,
        paper_era=c.method.paper_era, amp=c.model.amp,
    )
    instance = method.cls(ctx)
    instance.name = method.name
    curves: list[dict] = []
    last: dict[str, Any] = {}
    selection_only = c.eval.epoch_eval_metrics == "selection"
    plateau = PlateauStop(c.eval.stop_patience, c.eval.stop_tolerance, p.split.scenario) \
        if c.eval.stop_patience else None

    def epoch_hook(epoch: int, eval_model: torch.nn.Module, stats: dict, rte: float) -> bool:
        if not epoch_eval and on_epoch is None:
            return False
        evaluation, metrics = epoch_metrics(p, eval_model, rte, retrain_eval, scenario_metrics, selection_only)
        last.update(epoch=epoch, evaluation=evaluation, state=_state_fingerprint(eval_model))
        metrics.update({f"stat_{k}": v for k, v in stats.items()})
        curves.append({"epoch": epoch, **metrics})
        if on_epoch:
            on_epoch(epoch, metrics, stats)
        return plateau is not None and plateau.update(epoch, metrics)

    with warnings.catch_warnings():
        warnings.simplefilter("once")
        try:
            outcome = run_unlearning(instance, hp.get("epochs", 1), on_epoch=epoch_hook, progress=p.progress)
        except DivergenceError as exc:  # the driver restored the last finite weights: hand them to the caller
            raise Diverged(str(exc), exc.epoch, instance.evaluation_model(), curves) from exc
    # The last epoch's evaluation is the final model's when nothing changed the weights after it (checked, so that
    # a driver that did more after its last hook would only cost a fresh evaluation, never a wrong one).
    final_model = instance.evaluation_model()
    final = last.get("evaluation") if last.get("epoch") == outcome.epochs_run and \
        last.get("state") == _state_fingerprint(final_model) else None
    return Unlearned(method=method, hp=hp, model=final_model, outcome=outcome, curves=curves,
                     model_path=model_path, original_meta=original_meta, retrain_eval=retrain_eval,
                     retrain_path=retrain_path, width=width, last_evaluation=final)


def _state_fingerprint(model: torch.nn.Module) -> tuple[float, ...]:
    """Per floating-point tensor of the state, its float64 sum: equal for equal weights and BatchNorm statistics."""
    return tuple(float(v.double().sum()) for v in model.state_dict().values() if v.is_floating_point())


def epoch_metrics(p: Prepared, model: torch.nn.Module, rte: float, retrain_eval: Evaluation | None,
                  scenario_metrics: ScenarioMetrics | None = None,
                  selection_only: bool = False) -> tuple[Evaluation, dict]:
    """One epoch's evaluation and its curve entry. Full: the final result's keys (scenario metrics included).
    `selection_only`: the training pool alone (`evaluation.SELECTION_PARTS`: UA, RA, VA, MIA_efficacy_val and
    against Retrain rUA, agreement, val_gap), no test-set forward pass and no scenario metrics (they may read test
    images): all that the tuning criterion reads, in about half the time."""
    amp = p.config.model.amp
    if selection_only:
        evaluation = evaluate_model(model, p.splits, amp=amp, parts=SELECTION_PARTS)
        return evaluation, selection_entry(evaluation, rte, retrain_eval)
    evaluation = evaluate_model(model, p.splits, amp=amp)
    metrics = build_result(evaluation, {}, p.split.hash, rte, retrain_eval)
    metrics.pop("args"), metrics.pop("split_hash")
    if scenario_metrics:
        metrics.update(scenario_metrics(model))
    return evaluation, metrics


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation and files
# ---------------------------------------------------------------------------------------------------------------------

def evaluate(p: Prepared, unl: Unlearned, scenario_metrics: ScenarioMetrics | None = None,
             extra: dict | None = None) -> dict:
    """The result dict of an unlearned model: population metrics, the Retrain comparison, the run's record. The last
    epoch's evaluation of the same model is reused (whole, or its predictions on the training pool), which gives the
    numbers a fresh evaluation gives: the same forward passes and the same attack fits."""
    last = unl.last_evaluation
    if last is not None and last.has_test:
        evaluation = last
    else:
        evaluation = evaluate_model(unl.model, p.splits, amp=p.config.model.amp,
                                    known=last.outputs if last is not None else None)
    record = {
        "method": unl.method.label, "hyperparameters": unl.hp, "device": device_name(p.device),
        "epochs_run": unl.outcome.epochs_run, "epoch_stats": unl.outcome.epoch_stats, "scenario": p.split.scenario,
        "split_file": str(paths.split_file(p.save_dir, p.split.tag)),
        "original_model": {"path": str(unl.model_path), **unl.original_meta},
        "retrain_model": str(unl.retrain_path) if unl.retrain_path else None,
    }
    if unl.curves:
        record["curves"] = unl.curves
    record.update(extra or {})
    if scenario_metrics:
        record.update(scenario_metrics(unl.model))
    return build_result(evaluation, p.config.args_record(), p.split.hash, unl.outcome.rte_seconds, unl.retrain_eval,
                        record)


EVALUATION_KEYS = ("accuracy", "UA", "RA", "TA", "MIA_efficacy")


def save_unlearned_model(p: Prepared, unl_method_label: str, model: torch.nn.Module, path: Path,
                         evaluation: dict | None = None, **extra: Any) -> Path:
    payload = {**model_metadata(p, "unlearned", split_hash=p.split.hash, method=unl_method_label, **extra),
               "state_dict": model.state_dict()}
    if evaluation is not None:
        payload["evaluation"] = evaluation
    return atomic_torch_save(path, payload)


def save_diverged(p: Prepared, exc: Diverged, path: Path) -> Diverged:
    """Keep the last finite weights of a diverged run on disk, and say where in the error."""
    save_unlearned_model(p, p.config.method.label, exc.model, path, diverged_at_epoch=exc.epoch)
    exc.args = (f"{exc.args[0]}; last finite weights saved to {path}",)
    return exc


def write_outputs(p: Prepared, result: dict, result_path: Path, model: torch.nn.Module | None = None,
                  checkpoint_path: Path | None = None, scenario_keys: tuple[str, ...] = ()) -> Path:
    """The run's files, each written once and atomically: the split indices (when new), the unlearned checkpoint
    (when a path is given) and the result JSON last, so a result on disk always has its companions."""
    split_file = Path(result["split_file"])
    if not split_file.is_file():
        p.split.save(split_file)
    if model is not None and checkpoint_path is not None:
        evaluation = {**{k: result[k] for k in EVALUATION_KEYS}, **{k: result[k] for k in scenario_keys if k in result}}
        save_unlearned_model(p, result["method"], model, checkpoint_path, evaluation)
    write_result(result_path, result)
    result["result_file"] = str(result_path)
    return result_path


def format_result_line(result: dict) -> str:
    parts = [f"UA {result['UA']:.2f}", f"RA {result['RA']:.2f}", f"TA {result['TA']:.2f}",
             f"MIA-Eff {result['MIA_efficacy']:.2f}", f"RTE {result['RTE_seconds']:.2f}s"]
    if "avg_gap" in result:
        parts += [f"rUA {result['rUA']:+.2f}", f"agreement {result['agreement']:.2f}",
                  f"Avg.Gap {result['avg_gap']:.2f}"]
    return ", ".join(parts)
