"""The training loop shared by the original model, the Retrain reference and the attack reference models.

SGD with momentum and weight decay, step decay (MultiStepLR semantics: lr * 0.1^(milestones passed), stepped per
epoch), optional linear warm-up, best-by-validation copy, and an exact resume: the last checkpoint holds the model, the
optimiser state, the epoch, the history and the state of the run-owned shuffling generator, so a resumed run ends with
the same weights as an uninterrupted one.

A rolling checkpoint also records the settings it was trained with (the caller's metadata, the recipe, the shuffling
seed, the dataset, the trained samples and the augmentation). A resume continues only a checkpoint whose settings
equal the requested ones: continuing another dataset's or another recipe's run would silently produce a model that
claims settings it was not trained with.
The same settings come back in `TrainResult.settings`; a finished reference model's checkpoint records them, so a
Retrain model is reused only by a run of the same recipe (`first_difference` is the one comparison of both).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dataset import SplitData, TensorLoader
from utils import (
    DivergenceError,
    Stopwatch,
    UserError,
    atomic_torch_save,
    batch_channels_last,
    check_amp,
    forward_precision,
    load_checkpoint,
    make_generator,
    pyplot,
    save_figure,
    sha256_of_array,
    temporarily_eval,
    to_channels_last,
    to_jsonable,
)


@dataclass
class TrainRecipe:
    epochs: int = 182
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    milestones: tuple[int, ...] = (91, 136)
    gamma: float = 0.1
    warmup: int = 0

    def lr_at(self, epoch: int) -> float:
        """Learning rate of a 0-based epoch."""
        if self.warmup and epoch < self.warmup:
            return self.lr * (epoch + 1) / self.warmup
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)


def parse_milestones(text: str | None) -> tuple[int, ...]:
    if text is None or str(text).strip() == "":
        return ()
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError as exc:
        raise UserError(f"--decreasing_lr '{text}' is not a comma-separated list of epochs (e.g. 91,136)") from exc
    if any(v < 0 for v in values):
        raise UserError(f"--decreasing_lr '{text}' has a negative epoch; epochs are >= 0")
    return values


@dataclass
class TrainResult:
    model: torch.nn.Module          # final weights
    best_state: dict                # state_dict of the best-by-validation epoch
    best_epoch: int
    best_val: float
    history: dict = field(default_factory=dict)  # lists per epoch: train_loss, train_acc, val_acc, lr
    seconds: float = 0.0            # training time of all epochs, including those before an interruption
    settings: dict = field(default_factory=dict)  # what the model was trained with (`resume_settings`)


# Metadata keys that describe the circumstances of a run rather than what is trained: a resume may differ in them.
VOLATILE_METADATA_KEYS = frozenset({"torch_version", "git_commit", "device", "hostname"})
NOT_RECORDED = "<not recorded>"


def resume_settings(metadata: dict | None, recipe: TrainRecipe, seed: int, part: str,
                    data: SplitData) -> dict[str, Any]:
    """Everything a rolling checkpoint must match to be resumed, in the order they are compared: every non-volatile
    key of the caller's metadata, then what this function sees itself (so a caller that forgets a key is still
    guarded): every recipe field as `recipe.<field>`, the shuffling seed, the trained part, the dataset, a hash of the
    trained sample indices and the augmentation. Plain JSON values, so a recorded tuple equals a requested list."""
    settings = {k: v for k, v in to_jsonable(dict(metadata or {})).items() if k not in VOLATILE_METADATA_KEYS}
    settings.update({f"recipe.{k}": v for k, v in to_jsonable(asdict(recipe)).items()})
    settings.update({
        "shuffle_seed": int(seed), "train_part": part, "train_dataset": data.data.name,
        "train_indices": sha256_of_array(getattr(data.split, part)),
        "train_augment": data.data.augment if data.augment else "none",
    })
    return settings


def check_resumable(path: str | Path, requested: dict[str, Any]) -> dict:
    """Load the rolling checkpoint at `path` and return it when it may be resumed with the `requested` settings
    (`resume_settings`); otherwise a one-line UserError naming the first differing setting and both values. Reads
    only: nothing is written or removed, so a refused resume leaves every file as it was."""
    state = load_checkpoint(path)
    if not all(k in state for k in ("optimizer", "generator", "epoch", "history")):
        raise UserError(f"'{path}' is not a resumable training checkpoint (no optimizer/generator state); "
                        f"run without --resume to train from scratch")
    recorded = state.get("resume_settings")
    if not isinstance(recorded, dict):
        raise UserError(f"cannot resume from '{path}': it does not record the settings it was trained with (written by "
                        f"an older version), so it cannot be checked against this run; run without --resume")
    difference = first_difference(recorded, requested)
    if difference is not None:
        key, have, want = difference
        raise UserError(f"cannot resume from '{path}': it was trained with {key}={have!r} but this run requests "
                        f"{key}={want!r}; resume with the same settings, or run without --resume to start over")
    return state


def first_difference(recorded: dict[str, Any], requested: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first requested setting (`resume_settings`) that the recorded ones lack or hold with another value, as
    (key, recorded value, requested value); None when a model trained with `recorded` is the one `requested` asks for.
    The one comparison of training settings: a resume uses it, and so does the reuse of a finished Retrain model."""
    for key, want in requested.items():
        have = recorded.get(key, NOT_RECORDED)
        if have != want:
            return key, have, want
    return None


def make_optimizer(model: torch.nn.Module, recipe: TrainRecipe) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


@torch.no_grad()
def accuracy_of(model: torch.nn.Module, loader: TensorLoader, amp: str = "off") -> float:
    """Top-1 accuracy in % (eval mode, mode restored). The count stays on the device until the end of the pass."""
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    total = 0
    with temporarily_eval(model):
        for x, y in loader:
            with forward_precision(amp, x.device):
                logits = model(batch_channels_last(x, amp))
            correct += (logits.argmax(1) == y).sum()
            total += len(y)
    return 100.0 * correct.item() / max(total, 1)


def train_one_epoch(model: torch.nn.Module, loader: TensorLoader, optimizer: torch.optim.Optimizer,
                    amp: str = "off") -> tuple[float, float]:
    """One pass of cross-entropy SGD; returns (mean loss, accuracy %). The sums stay on the device and are read once,
    at the end of the epoch: a read per step would make the host wait for the GPU at every step. `amp` (`--amp`):
    forward pass and loss under `utils.forward_precision`."""
    model.train()
    loss_sum = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    for x, y in loader:
        with forward_precision(amp, x.device):
            logits = model(batch_channels_last(x, amp))
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
    n = max(loader.num_samples, 1)
    return loss_sum.item() / n, 100.0 * correct.item() / n


def train_model(model: torch.nn.Module, data: SplitData, recipe: TrainRecipe, seed: int, part: str = "train",
                last_checkpoint: str | Path | None = None, resume: bool = False, metadata: dict | None = None,
                on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True,
                desc: str = "train", amp: str = "off") -> TrainResult:
    """Train `model` on `data.<part>` with `recipe`; shuffles and augmentation draw from a generator seeded by `seed`.

    When `last_checkpoint` is given it is rewritten (atomically) after every epoch together with `metadata` and the
    settings of `resume_settings`; `resume=True` continues from it when those settings equal this call's (otherwise a
    UserError, raised before anything is trained or written). `on_epoch(epoch, stats)` receives 1-based epochs and the
    stats of that epoch. `TrainResult.seconds` counts the epochs before an interruption too. `amp` (`--amp`): forward
    passes under `utils.forward_precision`, and on CUDA with bf16 the channels_last layout (`utils.uses_channels_last`);
    it is not part of the resume settings here, callers record it in `metadata`.
    """
    to_channels_last(model, check_amp(amp))  # before the optimiser and the first state copy
    settings = resume_settings(metadata, recipe, seed, part, data)
    generator = make_generator(seed)
    optimizer = make_optimizer(model, recipe)
    history = {"train_loss": [], "train_acc": [], "val_acc": [], "lr": []}
    best_state, best_val, best_epoch, start_epoch = copy.deepcopy(model.state_dict()), -1.0, 0, 0
    seconds_before = 0.0  # training time spent before an interruption
    if resume and last_checkpoint and Path(last_checkpoint).is_file():
        state = check_resumable(last_checkpoint, settings)
        try:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot resume from '{last_checkpoint}': its weights do not fit this model "
                            f"({first[:150]}); run without --resume to start over") from exc
        generator.set_state(state["generator"])
        history = {k: list(v) for k, v in state["history"].items()}
        best_state, best_val, best_epoch = state["best_state_dict"], state["best_val"], state["best_epoch"]
        start_epoch = int(state["epoch"])
        seconds_before = float(state.get("elapsed_seconds", 0.0))
        print(f"resuming {desc} from epoch {start_epoch} of {recipe.epochs} ({last_checkpoint})")

    train_loader = data.train_loader(part, generator, batch_size=recipe.batch_size)
    val_loader = data.eval_loader("val") if len(data.split.val) else None
    watch = Stopwatch(data.device)
    bar = tqdm(range(start_epoch, recipe.epochs), desc=desc, disable=None if progress else True, leave=False,
               dynamic_ncols=True)
    for epoch in bar:
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(epoch)
        with watch:
            loss, acc = train_one_epoch(model, train_loader, optimizer, amp)
        if not math.isfinite(loss):
            raise DivergenceError(f"training diverged at epoch {epoch + 1} (loss {loss})", epoch + 1)
        val_acc = accuracy_of(model, val_loader, amp) if val_loader is not None else acc
        for key, value in zip(history, (loss, acc, val_acc, recipe.lr_at(epoch))):
            history[key].append(value)
        if val_acc >= best_val:  # ties: the later epoch, after more LR decay
            best_val, best_epoch, best_state = val_acc, epoch + 1, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}", val=f"{val_acc:.1f}")
        if last_checkpoint:
            atomic_torch_save(last_checkpoint, {
                **(metadata or {}), "resume_settings": settings, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "epoch": epoch + 1,
                "history": history, "best_state_dict": best_state, "best_val": best_val, "best_epoch": best_epoch,
                "elapsed_seconds": seconds_before + watch.seconds,
            })
        if on_epoch:
            on_epoch(epoch + 1, {"train_loss": loss, "train_acc": acc, "val_acc": val_acc, "lr": recipe.lr_at(epoch)})
    return TrainResult(model=model, best_state=best_state, best_epoch=best_epoch, best_val=best_val, history=history,
                       seconds=seconds_before + watch.seconds, settings=settings)


def plot_history(history: dict, path: str | Path, title: str = "", selected_epoch: int | None = None,
                 selected_why: str = "kept", val_label: str = "val acc") -> Path:
    """Training curve (loss and accuracies per epoch), written atomically as PNG. `selected_epoch` (1-based) is marked
    on both panels as the epoch whose weights were kept (`selected_why` says by which rule); `val_label` names what the
    validation accuracy covers (e.g. that it includes a class the model was trained without)."""
    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, history["train_loss"], label="train loss")
    ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("cross-entropy")
    ax_acc.plot(epochs, history["train_acc"], label="train acc")
    ax_acc.plot(epochs, history["val_acc"], label=val_label)
    if selected_epoch is not None and 1 <= selected_epoch <= len(history["val_acc"]):
        for ax in (ax_loss, ax_acc):
            ax.axvline(selected_epoch, color="k", linestyle=":", linewidth=1,
                       label=f"epoch {selected_epoch} ({selected_why})")
        ax_acc.plot([selected_epoch], [history["val_acc"][selected_epoch - 1]], marker="*", markersize=12, color="k")
    ax_loss.legend(fontsize=8)
    ax_acc.set_xlabel("epoch"), ax_acc.set_ylabel("accuracy (%)"), ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
